"""Calling the user's network with structured inputs, and reading its output.

Every method runs the wrapped network through :func:`call_network`, so networks whose
inputs are not one tensor (HuggingFace models taking ``input_ids`` and
``attention_mask``) or whose outputs are not one tensor (``ModelOutput``, dicts,
tuples) work with every method.

The rule for inputs: a mapping becomes keyword arguments when the network's
``forward`` accepts its keys (or ``**kwargs``), and is passed as one positional argument
otherwise; a tuple of tensors becomes positional arguments; a tensor is the one
argument. The rule for outputs: a tensor is used as it is; otherwise ``output(out)``
when the user gave ``output=``; else ``out.logits`` when present (HuggingFace
``ModelOutput``), a mapping's ``"logits"`` entry, or the first tensor of a mapping,
tuple or list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from bayesify.errors import UnsupportedModelError

__all__ = ["OutputFn", "call_network", "reduce_output", "split_call"]

OutputFn = Callable[[Any], torch.Tensor]


def _accepts_keywords(model: nn.Module, keys: Any) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return True
    return all(k in parameters for k in keys)


def split_call(model: nn.Module, x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that pass inputs ``x`` to ``model`` (the module docstring
    gives the rule)."""
    if isinstance(x, Mapping):
        if _accepts_keywords(model, x.keys()):
            return (), dict(x)
        return (x,), {}
    if isinstance(x, tuple):
        return x, {}
    return (x,), {}


def _first_tensor(values: Any) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def reduce_output(out: Any, output: OutputFn | None = None) -> torch.Tensor:
    """The network's logits or means [N, K] from whatever its forward returned."""
    if isinstance(out, torch.Tensor):
        return out
    if output is not None:
        reduced = output(out)
        if not isinstance(reduced, torch.Tensor):
            raise UnsupportedModelError(f"`output` returned {type(reduced).__name__}; it must "
                                        "return the logits or means as a tensor [N, K]")
        return reduced
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        found = out.get("logits")
        if not isinstance(found, torch.Tensor):
            found = _first_tensor(out.values())
    elif isinstance(out, tuple | list):
        found = _first_tensor(out)
    else:
        found = None
    if found is None:
        raise UnsupportedModelError(
            f"the network returned {type(out).__name__}, which holds no tensor bayesify can "
            "read as logits or means; pass output=lambda out: ... to bayesify(...) to pick it")
    return found


def call_network(model: nn.Module, x: Any, *, params: dict[str, torch.Tensor] | None = None,
                 output: OutputFn | None = None) -> torch.Tensor:
    """Run ``model`` on inputs ``x`` (optionally with ``params`` substituted through
    ``torch.func.functional_call``) and reduce the output to a tensor [N, K]."""
    args, kwargs = split_call(model, x)
    if params is None:
        out = model(*args, **kwargs)
    else:
        out = functional_call(model, params, args, kwargs)
    return reduce_output(out, output)
