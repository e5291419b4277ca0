"""Turning a network's Linear/Conv2d layers into mean-field layers, and counting FLOPs.

Shared by ``"vi"`` and ``"ssvi"``: both replace every ``nn.Linear`` and ``nn.Conv2d``
of the user's model (in place) by :class:`~bayesify.layers.bayesian.BayesianLinear` /
:class:`~bayesify.layers.bayesian.BayesianConv2d` whose means start at the layer's
weights. Which layers are converted:

* ``include=`` / ``exclude=``: name patterns (:func:`fnmatch.fnmatchcase` on the names
  of ``model.named_modules()``, e.g. ``exclude=["bert.embeddings.*"]``). A module is in
  scope when it (or a module containing it) matches some ``include`` pattern (every
  module when ``include`` is not given) and neither it nor a module containing it
  matches an ``exclude`` pattern or is named in ``keep_deterministic``. Every pattern
  must match some module (a typo is an error, not a silent no-op).
* In scope, Embedding and normalization layers (BatchNorm, LayerNorm, GroupNorm, ...)
  stay point estimates by default; the method says so once through the
  ``"bayesify"`` logger (a log record, not a Python warning), naming how many and how
  to choose otherwise. Any other layer that owns weights (an LSTM, a Conv1d, a
  HuggingFace ``Conv1D``) is refused by name, with the ``exclude=`` that leaves it out.

BatchNorm statistics: a BatchNorm layer of a converted network trains as usual during
``fit`` (batch statistics, running averages updated by every sampled forward pass) and
runs in eval mode, with its running statistics, at prediction. Probes (the FLOP count
below) run in eval mode, so they never update the statistics and never need more than
one row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from bayesify._batching import take_rows
from bayesify._network import split_call
from bayesify.core import preserve_training_flags
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.layers.bayesian import (
    BayesianConv2d,
    BayesianLinear,
    MeanFieldLayer,
    sampling_mode,
)

__all__ = [
    "LayerCount",
    "convert_to_mean_field",
    "count_layers",
    "resolve_keep",
    "resolve_patterns",
]

logger = logging.getLogger("bayesify")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)
#: Layers left as point estimates by default (with one log message saying so).
_DEFAULT_KEPT: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag, *_NORM_TYPES)
#: Messages already logged in this process (each is said once).
_LOGGED: set[str] = set()


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


def resolve_patterns(model: nn.Module, patterns: Any, argument: str) -> list[str]:
    """The module names matched by ``patterns`` (fnmatch patterns on the names of
    ``model.named_modules()``; a str is one pattern), each pattern matching some module."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise InputError(f"`{argument}` must be a module-name pattern or a list of them "
                         f"(e.g. {argument}=['bert.embeddings.*']), got {patterns!r}")
    names = [n for n, _ in model.named_modules()]
    matched = []
    for pattern in patterns:
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(repr(n) for n in names if n)
            if len(examples) > 300:
                examples = examples[:300].rsplit(", ", 1)[0] + ", ..."
            raise InputError(f"`{argument}` pattern {pattern!r} matches no module of the "
                             f"model; its modules are named {examples or '(none)'}")
        matched.extend(h for h in hits if h not in matched)
    return matched


def _say_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def _exclude_example(model: nn.Module, kept: list[tuple[str, nn.Module]]) -> list[str]:
    """Patterns that match exactly the ``kept`` modules: one per leaf name
    (``"*.LayerNorm"``) when that matches nothing else, else the names themselves."""
    names = [n for n, _ in kept]
    patterns = list(dict.fromkeys(f"*.{n.rpartition('.')[2]}" if "." in n else n
                                  for n in names))
    others = [n for n, _ in model.named_modules() if n not in set(names)]
    if any(fnmatchcase(n, p) for n in others for p in patterns):
        return names
    return patterns


def _kept_message(method: str, model: nn.Module, kept: list[tuple[str, nn.Module]]) -> str:
    kinds = sorted({type(m).__name__ for _, m in kept})
    example = _exclude_example(model, kept)
    shown = ", ".join(map(repr, example[:4])) + (", ..." if len(example) > 4 else "")
    return (f"{method}: left {len(kept)} Embedding and normalization layer(s) "
            f"({', '.join(kinds)}) as point estimates; only nn.Linear and nn.Conv2d layers "
            "become Bayesian. Name the layers to leave out with exclude= (module-name "
            f"patterns; exclude=[{shown}] names these and silences this message) or the "
            "part to make Bayesian with include=")


def convert_to_mean_field(
    model: nn.Module,
    *,
    method: str,
    keep_deterministic: str | Sequence[str] = (),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    prior_std: float = 1.0,
    init_std: float = 1e-3,
) -> tuple[nn.Module, dict[str, MeanFieldLayer]]:
    """Replace every Linear/Conv2d of ``model`` in scope (in place) by its mean-field twin.

    Args:
        model: the network.
        method: the method's name, for error messages.
        keep_deterministic: module names (or ``"first"``) to leave as they are; a kept
            module's children are kept too.
        include: name patterns of the modules to make Bayesian (with their children);
            every module when ``None``.
        exclude: name patterns of modules to leave as they are (with their children).
        prior_std, init_std: the layers' prior standard deviation and starting sigma.

    Returns:
        ``(root, layers)``: the model (a new root only when the model itself is a single
        Linear/Conv2d) and its mean-field layers by qualified name, in module order.

    Raises:
        UnsupportedModelError: a layer with weights that cannot be made Bayesian (named
            in the message), or nothing to convert.
    """
    keep = resolve_keep(model, keep_deterministic) + resolve_patterns(model, exclude, "exclude")
    scope = resolve_patterns(model, include, "include") if include is not None else [""]
    to_convert, unsupported, default_kept, layers = [], [], [], {}
    for name, module in model.named_modules():
        if _is_kept(name, keep) or not _is_kept(name, scope):
            continue
        if isinstance(module, MeanFieldLayer):
            layers[name] = module
        elif _convertible(module):
            to_convert.append(name)
        elif isinstance(module, _DEFAULT_KEPT):
            if _own_parameters(module):
                default_kept.append((name, module))
        elif _own_parameters(module):
            unsupported.append((name, type(module).__name__))
    if unsupported:
        listing = ", ".join(f"{n or '(the model)'!r} ({kind})" for n, kind in unsupported)
        example = next((n for n, _ in unsupported if n), "name")
        raise UnsupportedModelError(
            f"{method!r} can make only nn.Linear and nn.Conv2d layers Bayesian; these layers "
            f"have weights it cannot handle: {listing}. Pass exclude=[...name patterns...] "
            f"(e.g. exclude=[{example!r}]) or keep_deterministic=[...names...] to leave "
            "them as point estimates"
        )
    if not to_convert and not layers:
        reason = ("every nn.Linear / nn.Conv2d is in `keep_deterministic` / `exclude` or "
                  "outside `include`" if keep or include is not None
                  else "the model has no nn.Linear or nn.Conv2d layer")
        raise UnsupportedModelError(f"{method!r} found nothing to make Bayesian: {reason}")
    if default_kept:
        _say_once(_kept_message(method, model, default_kept))
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
                 x: Any = None,
                 positions: dict[str, int] | None = None) -> list[LayerCount]:
    """Per-layer weights and forward FLOPs per example of every Linear/Conv2d layer.

    Args:
        model: the converted network.
        layers: its mean-field layers by name.
        x: an example input [B, ...] (a tensor, or a mapping or tuple of them as the
            model takes); needed once so convolutions know their output size (the
            sizes seen in the last forward pass are used when ``None``).
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
                args, kwargs = split_call(model, take_rows(x, slice(0, 1)))
                model(*args, **kwargs)
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
