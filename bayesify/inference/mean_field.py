"""Turning a network's Linear/Conv2d layers into mean-field layers, and counting FLOPs.

Shared by ``"vi"`` and ``"ssvi"``: both replace every ``nn.Linear`` and ``nn.Conv2d``
of the user's model (in place) by :class:`~bayesify.layers.bayesian.BayesianLinear` /
:class:`~bayesify.layers.bayesian.BayesianConv2d` whose means start at the layer's
weights. Normalization layers (BatchNorm, LayerNorm, GroupNorm, ...) stay point
estimates; any other layer that owns weights (an LSTM, an Embedding, a Conv1d) is
refused by name unless the user keeps it deterministic.

BatchNorm statistics: a BatchNorm layer of a converted network trains as usual during
``fit`` (batch statistics, running averages updated by every sampled forward pass) and
runs in eval mode, with its running statistics, at prediction. Probes (the FLOP count
below) run in eval mode, so they never update the statistics and never need more than
one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bayesify.core import preserve_training_flags
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.layers.bayesian import (
    BayesianConv2d,
    BayesianLinear,
    MeanFieldLayer,
    sampling_mode,
)

__all__ = ["LayerCount", "convert_to_mean_field", "count_layers", "resolve_keep"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d) and not isinstance(module, MeanFieldLayer)


def resolve_keep(model: nn.Module, keep_deterministic: str | Sequence[str]) -> list[str]:
    """Module names to leave as point estimates; ``"first"`` is the first Linear/Conv2d."""
    if isinstance(keep_deterministic, str):
        keep_deterministic = [keep_deterministic]
    if not isinstance(keep_deterministic, Sequence):
        raise InputError("`keep_deterministic` must be 'first' or a sequence of module names, "
                         f"got {type(keep_deterministic).__name__}")
    modules = dict(model.named_modules())
    names = []
    for name in keep_deterministic:
        if name == "first":
            first = next((n for n, m in model.named_modules() if _convertible(m)), None)
            if first is None:
                raise UnsupportedModelError("`keep_deterministic='first'` found no nn.Linear or "
                                            "nn.Conv2d in the model")
            names.append(first)
        elif not isinstance(name, str) or name not in modules:
            listing = ", ".join(repr(n) for n in modules if n) or "(none)"
            raise InputError(f"`keep_deterministic` names {name!r}, which is not a submodule of "
                             f"the model; its submodules are {listing}")
        else:
            names.append(name)
    return names


def _is_kept(name: str, keep: Sequence[str]) -> bool:
    return any(k == "" or name == k or name.startswith(k + ".") for k in keep)


def convert_to_mean_field(
    model: nn.Module,
    *,
    method: str,
    keep_deterministic: str | Sequence[str] = (),
    prior_std: float = 1.0,
    init_std: float = 1e-3,
) -> tuple[nn.Module, dict[str, MeanFieldLayer]]:
    """Replace every Linear/Conv2d of ``model`` (in place) by its mean-field twin.

    Args:
        model: the network.
        method: the method's name, for error messages.
        keep_deterministic: module names (or ``"first"``) to leave as they are; a kept
            module's children are kept too.
        prior_std, init_std: the layers' prior standard deviation and starting sigma.

    Returns:
        ``(root, layers)``: the model (a new root only when the model itself is a single
        Linear/Conv2d) and its mean-field layers by qualified name, in module order.

    Raises:
        UnsupportedModelError: a layer with weights that cannot be made Bayesian (named
            in the message), or nothing to convert.
    """
    keep = resolve_keep(model, keep_deterministic)
    to_convert, unsupported, layers = [], [], {}
    for name, module in model.named_modules():
        if _is_kept(name, keep):
            continue
        if isinstance(module, MeanFieldLayer):
            layers[name] = module
        elif _convertible(module):
            to_convert.append(name)
        elif _own_parameters(module) and not isinstance(module, _NORM_TYPES):
            unsupported.append(f"{name or '(the model)'!r} ({type(module).__name__})")
    if unsupported:
        raise UnsupportedModelError(
            f"{method!r} can make only nn.Linear and nn.Conv2d layers Bayesian; these layers "
            f"have weights it cannot handle: {', '.join(unsupported)}. Pass "
            "keep_deterministic=[...names...] to leave them as point estimates"
        )
    if not to_convert and not layers:
        reason = ("every nn.Linear / nn.Conv2d is in `keep_deterministic`" if keep
                  else "the model has no nn.Linear or nn.Conv2d layer")
        raise UnsupportedModelError(f"{method!r} found nothing to make Bayesian: {reason}")
    root = model
    for name in to_convert:
        module = model.get_submodule(name)
        cls = BayesianLinear if isinstance(module, nn.Linear) else BayesianConv2d
        new = cls.from_module(module, prior_std=prior_std, init_std=init_std)
        new.train(module.training)
        if name == "":
            root = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        layers[name] = new
    order = [n for n, _ in root.named_modules()]
    return root, {n: layers[n] for n in order if n in layers}


@dataclass
class LayerCount:
    """Weights and per-example forward FLOPs of one weight layer.

    ``flops`` counts the layer as it runs (active weights; LRT layers do a mean and a
    variance product), ``dense_flops`` the same layer with every weight active.
    """

    name: str
    kind: str  # "bayesian" or "deterministic"
    weights: int
    active: int
    flops: int
    dense_flops: int


def _deterministic_flops(module: nn.Module, positions: int) -> int:
    weights = module.weight.numel()
    bias = module.weight.shape[0] if getattr(module, "bias", None) is not None else 0
    return positions * (2 * weights + bias)


@torch.no_grad()
def count_layers(model: nn.Module, layers: dict[str, MeanFieldLayer],
                 x: torch.Tensor | None = None,
                 positions: dict[str, int] | None = None) -> list[LayerCount]:
    """Per-layer weights and forward FLOPs per example of every Linear/Conv2d layer.

    Args:
        model: the converted network.
        layers: its mean-field layers by name.
        x: an example input [B, ...]; needed once so convolutions know their output
            size (the sizes seen in the last forward pass are used when ``None``).
        positions: a cache of the deterministic layers' output sizes, filled from ``x``
            and read when ``x`` is ``None``.
    """
    positions = {} if positions is None else positions
    hooks = []
    if x is not None:
        for name, module in model.named_modules():
            if _convertible(module):
                def record(mod, inputs, out, name=name):
                    axis = -1 if isinstance(mod, nn.Linear) else 1
                    positions[name] = out.numel() // max(1, out.shape[0] * out.shape[axis])
                hooks.append(module.register_forward_hook(record))
        try:
            # A probe: eval mode, so BatchNorm neither needs two rows nor updates its
            # running statistics.
            with preserve_training_flags(model), sampling_mode(model, "mean"):
                model.eval()
                model(x[:1])
        finally:
            for hook in hooks:
                hook.remove()
    rows = []
    for name, module in model.named_modules():
        if name in layers:
            layer = layers[name]
            rows.append(LayerCount(name, "bayesian", layer.num_weights, layer.num_active,
                                   layer.forward_flops(), layer.forward_flops(dense=True)))
        elif _convertible(module):
            if name not in positions:
                raise InputError("pass an example input `x` to count the FLOPs of the "
                                 f"deterministic layer {name!r}")
            flops = _deterministic_flops(module, positions[name])
            n = module.weight.numel()
            rows.append(LayerCount(name, "deterministic", n, n, flops, flops))
    return rows
