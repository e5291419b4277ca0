"""SSVI's sparse outputs: the compact state (active weights only) and the sparsity report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bayesify.errors import InputError
from bayesify.inference.mean_field import LayerCount

__all__ = ["SparsityReport", "compact_nbytes", "compact_state", "expand_state"]

_FORMAT = "bayesify.compact/1"
_SPARSE_KEYS = ("weight_mu", "weight_rho")


def compact_state(state: dict[str, torch.Tensor], prefixes: Sequence[str], *,
                  method: str) -> dict[str, Any]:
    """Store the masked weights of the layers at ``prefixes`` as indices + values.

    Args:
        state: a full state_dict holding ``{prefix}mask``, ``{prefix}weight_mu`` and
            ``{prefix}weight_rho`` for every prefix.
        prefixes: state-dict prefixes of the sparse layers (ending in ".").
        method: the method name, checked when loading.

    Returns:
        ``{"format", "method", "dense": {key: tensor}, "sparse": {prefix: {"shape",
        "indices", "weight_mu", "weight_rho"}}}``; indices are flat int32 (int64 for
        tensors over 2^31 entries).
    """
    dense = dict(state)
    sparse = {}
    for prefix in prefixes:
        mask = dense.pop(prefix + "mask")
        flat = mask.reshape(-1).nonzero().squeeze(1)
        index_dtype = torch.int32 if mask.numel() < 2**31 else torch.int64
        entry: dict[str, Any] = {"shape": torch.tensor(list(mask.shape)),
                                 "indices": flat.to(index_dtype)}
        for key in _SPARSE_KEYS:
            entry[key] = dense.pop(prefix + key).reshape(-1)[flat].clone()
        sparse[prefix] = entry
    return {"format": _FORMAT, "method": method, "dense": dense, "sparse": sparse}


def expand_state(compact: dict[str, Any], *, method: str) -> dict[str, torch.Tensor]:
    """The full state_dict from :func:`compact_state`'s output (zeros where inactive)."""
    if not isinstance(compact, dict) or compact.get("format") != _FORMAT:
        raise InputError("`compact` is not a compact state written by export_compact()")
    if compact.get("method") != method:
        raise InputError(f"`compact` holds a {compact.get('method')!r} model, but this model "
                         f"is {method!r}")
    state = dict(compact["dense"])
    for prefix, entry in compact["sparse"].items():
        shape = [int(s) for s in entry["shape"]]
        indices = entry["indices"].long()
        numel = 1
        for s in shape:
            numel *= s
        mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
        mask[indices] = True
        state[prefix + "mask"] = mask.reshape(shape)
        for key in _SPARSE_KEYS:
            values = entry[key]
            full = torch.zeros(numel, dtype=values.dtype, device=values.device)
            full[indices.to(values.device)] = values
            state[prefix + key] = full.reshape(shape)
    return state


def compact_nbytes(compact: dict[str, Any]) -> int:
    """Bytes of tensor data in a compact state (what storing it costs)."""
    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0
    return size(compact.get("dense", {})) + size(compact.get("sparse", {}))


@dataclass
class SparsityReport:
    """Active parameters and forward FLOPs per example of every weight layer.

    ``forward_flops`` counts the model as it runs (active weights only),
    ``dense_forward_flops`` the same Bayesian model with every weight active.
    """

    layers: list[LayerCount]
    training_flops: int = 0

    @property
    def total_weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def active_weights(self) -> int:
        return sum(r.active for r in self.layers)

    @property
    def forward_flops(self) -> int:
        return sum(r.flops for r in self.layers)

    @property
    def dense_forward_flops(self) -> int:
        return sum(r.dense_flops for r in self.layers)

    @property
    def flops_ratio(self) -> float:
        """Sparse over dense forward FLOPs."""
        return self.forward_flops / max(1, self.dense_forward_flops)

    def as_dict(self) -> dict[str, Any]:
        return {"layers": [vars(r) for r in self.layers], "total_weights": self.total_weights,
                "active_weights": self.active_weights, "forward_flops": self.forward_flops,
                "dense_forward_flops": self.dense_forward_flops,
                "flops_ratio": self.flops_ratio, "training_flops": self.training_flops}

    def __str__(self) -> str:
        lines = [f"{'layer':<16}{'kind':<15}{'active':>10}{'weights':>10}{'density':>9}"
                 f"{'FLOPs':>12}{'dense FLOPs':>13}"]
        for r in self.layers:
            lines.append(f"{r.name or '(root)':<16}{r.kind:<15}{r.active:>10}{r.weights:>10}"
                         f"{r.active / max(1, r.weights):>9.3f}{r.flops:>12}{r.dense_flops:>13}")
        lines.append(f"{'total':<31}{self.active_weights:>10}{self.total_weights:>10}"
                     f"{self.active_weights / max(1, self.total_weights):>9.3f}"
                     f"{self.forward_flops:>12}{self.dense_forward_flops:>13}")
        lines.append(f"forward FLOPs sparse/dense: {self.flops_ratio:.3f}")
        return "\n".join(lines)
