"""Which weights a Laplace approximation covers, how they line up in one vector, and the
memory guard that keeps its curvature from outgrowing the machine.

The covered weights come in *groups*, one per module that owns them (a "layer"):

* an ``nn.Linear`` or ``nn.Conv2d`` (one channel group, zero padding) is an **affine**
  group: its weight W [out, in...] and bias b [out] sit in the vector as the rows of
  ``[W.reshape(out, -1) | b]`` (the homogeneous coordinate of K-FAC), row-major;
* any other module (BatchNorm, LayerNorm, Embedding, ...) is a **plain** group: its
  parameters flattened one after the other.

The layout flattens Jacobians and weight samples, expands a per-layer prior precision to
one value per weight, and names groups in error messages. The memory guard itself
(``max_memory``, :class:`MemoryLimitError`) is the library's, in :mod:`bayesify._memory`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bayesify._memory import (
    DEFAULT_MAX_MEMORY,
    MemoryLimitError,
    check_memory,
    format_bytes,
    parse_memory,
)
from bayesify.errors import InputError, UnsupportedModelError

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "Group",
    "MemoryLimitError",
    "ParameterLayout",
    "check_memory",
    "format_bytes",
    "parse_memory",
    "resolve_subset",
]

@dataclass
class Group:
    """One module's covered weights.

    Attributes:
        name: the module's name in ``model.named_modules()`` ("" for the root).
        module: the module.
        param_names: full names in ``model.named_parameters()``, in vector order.
        shapes: the parameters' shapes.
        kind: ``"affine"`` (Linear/Conv2d: [W | b] rows) or ``"plain"``.
        out_features, in_features: rows and columns of W reshaped (affine groups).
        has_bias: whether the affine group has a bias column.
    """

    name: str
    module: nn.Module
    param_names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    kind: str
    out_features: int = 0
    in_features: int = 0
    has_bias: bool = False

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def columns(self) -> int:
        """Columns of the [W | b] matrix (affine groups)."""
        return self.in_features + int(self.has_bias)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else "the root module"


def _is_affine(module: nn.Module, names: list[str]) -> bool:
    direct = {n for n, _ in module.named_parameters(recurse=False)}
    if isinstance(module, nn.Linear):
        ok = True
    elif isinstance(module, nn.Conv2d):
        ok = (module.groups == 1 and module.padding_mode == "zeros"
              and not isinstance(module.padding, str))
    else:
        return False
    wanted = {"weight"} | ({"bias"} if module.bias is not None else set())
    return ok and direct == wanted and set(names) == wanted


def _make_group(model: nn.Module, owner: str, names: list[str]) -> Group:
    module = model.get_submodule(owner)
    prefix = f"{owner}." if owner else ""
    params = dict(module.named_parameters(recurse=False))
    if _is_affine(module, names):
        weight = module.weight
        has_bias = module.bias is not None
        order = ["weight", "bias"] if has_bias else ["weight"]
        return Group(owner, module, tuple(prefix + n for n in order),
                     tuple(params[n].shape for n in order), "affine",
                     out_features=int(weight.shape[0]),
                     in_features=int(weight[0].numel()), has_bias=has_bias)
    return Group(owner, module, tuple(prefix + n for n in names),
                 tuple(params[n].shape for n in names), "plain")


def _groups_from(model: nn.Module, full_names: Sequence[str]) -> list[Group]:
    by_owner: dict[str, list[str]] = {}
    for full in full_names:
        owner, _, leaf = full.rpartition(".")
        by_owner.setdefault(owner, []).append(leaf)
    return [_make_group(model, owner, leaves) for owner, leaves in by_owner.items()]


SUBSETS = ("last_layer", "all", "subnetwork")


def resolve_subset(model: nn.Module, subset: Any, head_name: str | None = None
                   ) -> list[Group]:
    """The groups a ``subset`` covers.

    Args:
        model: the network.
        subset: ``"last_layer"`` (the module ``head_name``), ``"all"`` and
            ``"subnetwork"`` (every parameter with ``requires_grad``), or a list of
            module names (all their parameters, trainable or not).
        head_name: the head's module name, for ``"last_layer"``.

    Raises:
        InputError / UnsupportedModelError: an unknown subset, a name that is not a
            module, or a subset that covers no parameters.
    """
    if isinstance(subset, str):
        if subset == "last_layer":
            if head_name is None:
                raise InputError("subset='last_layer' needs the head's module name")
            return _groups_from(model, [f"{head_name}.{n}" if head_name else n for n, _ in
                                        model.get_submodule(head_name).named_parameters()])
        if subset in ("all", "subnetwork"):
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            if not names:
                raise InputError(f"subset={subset!r} covers the parameters with "
                                 "requires_grad=True, and the model has none; name the "
                                 "modules to cover, e.g. subset=['classifier']")
            return _groups_from(model, names)
        raise InputError(f"`subset` must be one of {', '.join(map(repr, SUBSETS))} or a "
                         f"list of module names, got {subset!r}")
    if not isinstance(subset, list | tuple) or not subset or \
            not all(isinstance(s, str) for s in subset):
        raise InputError(f"`subset` must be one of {', '.join(map(repr, SUBSETS))} or a "
                         f"non-empty list of module names, got {subset!r}")
    modules = dict(model.named_modules())
    names: list[str] = []
    for entry in subset:
        if entry not in modules:
            known = ", ".join(repr(n) for n in list(modules)[1:12])
            raise UnsupportedModelError(f"`subset` names {entry!r}, which is not a module of "
                                        f"{type(model).__name__}; its modules include {known}")
        owned = [f"{entry}.{n}" if entry else n for n, _ in modules[entry].named_parameters()]
        if not owned:
            raise InputError(f"`subset` names {entry!r}, a {type(modules[entry]).__name__} "
                             "with no parameters; name modules that have weights")
        names += [n for n in owned if n not in names]
    return _groups_from(model, names)


class ParameterLayout:
    """The covered weights as one vector of P entries, group after group.

    Args:
        model: the network that owns the weights.
        groups: from :func:`resolve_subset`.
    """

    def __init__(self, model: nn.Module, groups: list[Group]):
        self.model = model
        self.groups = groups
        self.sizes = [g.size for g in groups]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.num_params = self.offsets[-1]
        self.names = [n for g in groups for n in g.param_names]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The covered parameters by full name (the live tensors)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {n: params[n] for n in self.names}

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Per-parameter tensors [..., *shape] (``batch_dims`` leading dims) as [..., P]."""
        parts = []
        for g in self.groups:
            values = [tensors[n] for n in g.param_names]
            lead = values[0].shape[:batch_dims]
            if g.kind == "affine":
                w = values[0].reshape(*lead, g.out_features, g.in_features)
                if g.has_bias:
                    w = torch.cat([w, values[1].reshape(*lead, g.out_features, 1)], -1)
                parts.append(w.reshape(*lead, -1))
            else:
                parts += [v.reshape(*lead, -1) for v in values]
        return torch.cat(parts, -1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A vector [..., P] as per-parameter tensors [..., *shape]."""
        lead = flat.shape[:-1]
        out: dict[str, torch.Tensor] = {}
        for g, start, end in zip(self.groups, self.offsets[:-1], self.offsets[1:],
                                 strict=True):
            chunk = flat[..., start:end]
            if g.kind == "affine":
                mat = chunk.reshape(*lead, g.out_features, g.columns)
                out[g.param_names[0]] = mat[..., :g.in_features].reshape(*lead, *g.shapes[0])
                if g.has_bias:
                    out[g.param_names[1]] = mat[..., g.in_features]
            else:
                pos = 0
                for name, shape in zip(g.param_names, g.shapes, strict=True):
                    n = math.prod(shape)
                    out[name] = chunk[..., pos:pos + n].reshape(*lead, *shape)
                    pos += n
        return out

    def vector(self) -> torch.Tensor:
        """The current (MAP) weights as a detached vector [P]."""
        return self.flatten({n: p.detach() for n, p in self.parameters().items()})

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """One value per group [G] repeated over its weights, [P]."""
        sizes = torch.tensor(self.sizes, device=per_group.device)
        return torch.repeat_interleave(per_group, sizes)

    def describe(self) -> str:
        return ", ".join(f"{g.label} ({g.size})" for g in self.groups)
