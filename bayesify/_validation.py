"""Input checks used at the public edge.

Each check raises :class:`~bayesify.errors.InputError` with a message that names the
argument, says what was expected and what came, so callers can validate once and let
the inner math assume clean tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bayesify.errors import InputError

__all__ = [
    "as_tensor",
    "check_finite",
    "check_fraction",
    "check_labels",
    "check_positive_int",
    "check_positive_float",
    "check_probabilities",
    "check_same_length",
    "check_choice",
    "inputs_in_user_terms",
]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor | np.ndarray):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    return repr(value)


def as_tensor(
    value: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ndim: int | Sequence[int] | None = None,
    finite: bool = True,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Convert ``value`` (tensor, array, list or scalar) to a tensor and check it.

    Args:
        value: the input.
        name: the argument's name, used in error messages.
        dtype: convert to this dtype (floating inputs keep theirs when ``None``;
            numpy float64 arrays stay float64).
        device: move to this device.
        ndim: allowed number(s) of dimensions.
        finite: reject NaN and infinite entries.
        allow_empty: accept a tensor with zero elements.

    Returns:
        The tensor (not copied when it already fits).
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"`{name}` must be a tensor or array-like of numbers, got {_describe(value)}"
            ) from exc
    if tensor.dtype == torch.bool and dtype is not None and dtype.is_floating_point:
        tensor = tensor.to(dtype)
    if dtype is not None or device is not None:
        tensor = tensor.to(device=device, dtype=dtype)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if tensor.dim() not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise InputError(
                f"`{name}` must have {expected} dimension(s), got shape {tuple(tensor.shape)}"
            )
    if not allow_empty and tensor.numel() == 0:
        raise InputError(f"`{name}` is empty (shape {tuple(tensor.shape)}); pass at least one row")
    if finite:
        check_finite(tensor, name)
    return tensor


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Raise if ``tensor`` holds NaN or infinite values (integer tensors pass)."""
    if tensor.is_floating_point() or tensor.is_complex():
        # A sum is finite only if every entry is (NaN propagates, inf - inf is NaN), so
        # one reduction clears the common case; this check runs on every training batch.
        # Only a non-finite sum (or an overflowing one) pays for the elementwise test.
        if tensor.numel() and bool(torch.isfinite(tensor.detach().sum())):
            return tensor
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            count = int(bad.sum())
            raise InputError(
                f"`{name}` contains {count} NaN or infinite value(s); "
                "remove or impute them before calling"
            )
    return tensor


def check_probabilities(probs: torch.Tensor, name: str, *, atol: float | None = None) -> None:
    """Check that the last dimension of ``probs`` holds probability vectors."""
    if not probs.is_floating_point():
        raise InputError(f"`{name}` must be floating point probabilities, got dtype {probs.dtype}")
    # One aminmax pass screens NaN (it propagates), inf and the range; the slower
    # diagnostics run only when something is wrong.
    low, high = torch.aminmax(probs) if probs.numel() else (probs.new_zeros(()),) * 2
    if not (float(low) >= 0 and float(high) <= 1):
        check_finite(probs, name)
        raise InputError(f"`{name}` must lie in [0, 1]; got values in "
                         f"[{float(probs.min()):.4g}, {float(probs.max()):.4g}]")
    # The tolerance follows the dtype's resolution: bf16 rows of exact softmax outputs
    # sum to 1 only within a few of its eps (0.0078).
    base = 1e-4 if probs.dtype != torch.float64 else 1e-8
    tol = atol if atol is not None else max(base, 4 * torch.finfo(probs.dtype).eps)
    # A matrix-vector product is far faster than sum(-1) over a short last dimension; it
    # runs outside autocast, which would otherwise round the sums to bf16/fp16.
    with torch.autocast(probs.device.type, enabled=False):
        wide = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()
        sums = wide @ wide.new_ones(wide.shape[-1])
    error = sums - 1
    worst = float(error.abs().max())
    if worst > tol:
        high, low = float(error.max()), float(error.min())
        row_sum = 1 + (high if high >= -low else low)
        hint = (" Apply softmax to logits first" if worst > 0.1 else
                " (off by more than the dtype's rounding: renormalize the rows)")
        raise InputError(
            f"`{name}` rows must sum to one (within {tol:g}); the worst row sums to "
            f"{row_sum:.6g}." + hint
        )


def check_labels(labels: torch.Tensor, name: str, num_classes: int | None = None) -> torch.Tensor:
    """Check integer class labels in ``[0, num_classes)`` and return them as int64."""
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or bool((labels != labels.round()).any()):
            raise InputError(f"`{name}` must be integer class labels, got non-integer values")
    elif labels.dtype == torch.bool:
        pass
    elif labels.is_complex():
        raise InputError(f"`{name}` must be integer class labels, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise InputError(f"`{name}` must be >= 0, got {int(labels.min())}")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise InputError(
            f"`{name}` must be < {num_classes} (the number of classes), got {int(labels.max())}"
        )
    return labels


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False,
                         allow_inf: bool = False) -> float:
    """Return ``value`` as a float if it is > 0 (or >= 0 with ``allow_zero``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a positive number, got {value!r}") from None
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise InputError(f"`{name}` must be a finite positive number, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"`{name}` must be {bound}, got {value!r}")
    return number


def check_fraction(value: Any, name: str, *, low_inclusive: bool = False,
                   high_inclusive: bool = False) -> float:
    """Return ``value`` as a float if it lies in the interval (0, 1) (ends as asked)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a number in (0, 1), got {value!r}") from None
    low_ok = number >= 0 if low_inclusive else number > 0
    high_ok = number <= 1 if high_inclusive else number < 1
    if not (low_ok and high_ok) or math.isnan(number):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise InputError(f"`{name}` must lie in {lo}0, 1{hi}, got {value!r}")
    return number


def check_same_length(**tensors: torch.Tensor) -> int:
    """Check that all tensors have the same first dimension and return it."""
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"`{k}` has {v}" for k, v in lengths.items())
        raise InputError(f"inputs must have the same number of rows: {listing}")
    return next(iter(lengths.values()))


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise InputError(f"`{name}` must be one of {options}, got {value!r}")
    return value


_SHAPE_ERRORS = ("cannot be multiplied", "size mismatch", "channels", "must match the size",
                 "expected input", "Expected input", "input.size", "dimension",
                 "expected scalar type", "same dtype", "Input type")


def _first_input_layer(model: Any) -> tuple[str, Any] | None:
    for name, module in model.named_modules():
        if any(hasattr(module, a) for a in ("in_features", "in_channels", "num_embeddings")):
            return name, module
    return None


@contextlib.contextmanager
def inputs_in_user_terms(model: Any, x: Any, name: str = "x") -> Iterator[None]:
    """Turn a shape or dtype error of the network's forward into an InputError that
    names the user's argument, its shape and dtype, and what the model expects (read
    off its first Linear, Conv or Embedding when it has one)."""
    try:
        yield
    except RuntimeError as exc:
        message = str(exc)
        if model is None or not any(p in message for p in _SHAPE_ERRORS):
            raise
        got = (f"`{name}` has shape {list(x.shape)} and dtype {x.dtype}"
               if isinstance(x, torch.Tensor) else f"`{name}` is {type(x).__name__}")
        first = _first_input_layer(model)
        if first is None:
            expects = "the network's forward rejected it"
        else:
            layer, module = first
            if hasattr(module, "in_features"):
                expects = (f"the model's first layer {layer!r} expects {module.in_features} "
                           "input features in the last dimension")
            elif hasattr(module, "in_channels"):
                expects = (f"the model's first layer {layer!r} expects {module.in_channels} "
                           "input channels in dimension 1")
            else:
                expects = (f"the model's first layer {layer!r} is an embedding that expects "
                           "integer indices")
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and isinstance(x, torch.Tensor) \
                    and x.is_floating_point() and x.dtype != weight.dtype:
                expects += f", in {weight.dtype}"
        raise InputError(f"{got}, but {expects} ({message.splitlines()[0]})") from exc
