"""Checks of :class:`~bayesify.optim.IVON`'s inputs: hyperparameters, the states it
loads, and the gradients a sampled block hands it.

Kept apart from :mod:`bayesify.optim.ivon` so that the ``"ivon"`` method can check a
checkpoint's optimizer state before anything is loaded (see
``IVONModel._check_extra_state``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from bayesify._validation import check_choice, check_positive_float
from bayesify.errors import InputError
from bayesify.optim.ivon_functional import HESS_APPROXES, state_dtype

__all__ = ["check_group", "check_state_dict", "check_unscaled_in_block", "owned_state",
           "restore_generators", "stale_gradients"]

_ACCUMULATION_FIX = (
    "Each sampled_params(train=True) block is one Monte Carlo sample whose gradient must "
    "start from zero: call optimizer.zero_grad() inside every block. To accumulate "
    "gradients over k micro-batches, run them all inside ONE block and step once: `with "
    "optimizer.sampled_params(train=True): optimizer.zero_grad(); for xb, yb in "
    "micro_batches: (loss_fn(model(xb), yb) / k).backward()`, then `optimizer.step()`")


def check_group(group: dict[str, Any], *, zero_lr: bool = True) -> None:
    """Validate one param group's hyperparameters in place.

    Args:
        group: the defaults, a user's group override or a loaded group.
        zero_lr: accept lr = 0 (a scheduler's end point, a frozen group); the
            constructor's own ``lr`` must be > 0.
    """
    group["lr"] = check_positive_float(group["lr"], "lr", allow_zero=zero_lr)
    group["ess"] = check_positive_float(group["ess"], "ess")
    group["hess_init"] = check_positive_float(group["hess_init"], "hess_init")
    group["weight_decay"] = check_positive_float(group["weight_decay"], "weight_decay",
                                                 allow_zero=True)
    group["clip_radius"] = check_positive_float(group["clip_radius"], "clip_radius",
                                                allow_inf=True)
    for name in ("beta1", "beta2"):
        value = group[name]
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0.0 <= value < 1.0):
            raise InputError(f"`{name}` must lie in [0, 1), got {value!r}")
        group[name] = float(value)
    check_choice(group["hess_approx"], "hess_approx", HESS_APPROXES)
    group["rescale_lr"] = bool(group["rescale_lr"])
    for p in group["params"]:
        if not p.is_floating_point():
            raise InputError(f"`params` must be floating point tensors, got dtype {p.dtype}")



_GROUP_KEYS = ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "hess_approx",
               "clip_radius", "rescale_lr", "params")
_STATE_KEYS = ("momentum", "hess", "grad_sum", "hess_sum")


def check_state_dict(state_dict: Any, groups: list[dict[str, Any]]) -> None:
    """Raise InputError unless ``state_dict`` is an IVON state that fits ``groups``
    (the param groups of the optimizer it is loaded into); changes nothing."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise InputError("`state_dict` must be a dict with 'state' and 'param_groups' from "
                         f"IVON.state_dict(), got {type(state_dict).__name__}")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else "no list of"
        raise InputError(f"`state_dict` has {count} param group(s), this optimizer has "
                         f"{len(groups)}")
    shapes = {}
    for i, (saved, own) in enumerate(zip(saved_groups, groups, strict=True)):
        missing = [k for k in _GROUP_KEYS if k not in saved]
        if missing:
            raise InputError(f"`state_dict` param group {i} lacks {', '.join(missing)}; "
                             "is it from another optimizer than IVON?")
        if len(saved["params"]) != len(own["params"]):
            raise InputError(f"`state_dict` param group {i} has {len(saved['params'])} "
                             f"parameter(s), this optimizer's has {len(own['params'])}")
        check_group({**saved, "params": []})     # a copy: lr = 0 from a scheduler is fine
        shapes.update(zip(saved["params"], (p.shape for p in own["params"]), strict=True))
    for key, state in state_dict["state"].items():
        if key not in shapes:
            raise InputError(f"`state_dict` holds state for parameter {key!r}, which no "
                             "param group lists")
        if not isinstance(state, dict) or "hess" not in state or "momentum" not in state \
                or not isinstance(state.get("step"), int):
            raise InputError(f"`state_dict` state of parameter {key} lacks 'momentum', "
                             "'hess' or 'step'; is it from another optimizer than IVON?")
        for name in _STATE_KEYS:
            value = state.get(name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shapes[key]):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else \
                    type(value).__name__
                raise InputError(
                    f"`state_dict` entry {name!r} of parameter {key} has shape "
                    f"{got}, the parameter has {tuple(shapes[key])}")
    extra = state_dict.get("ivon", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("generators", {}), dict) \
            or not all(isinstance(g, torch.Tensor) for g in extra.get("generators", {}).values()):
        raise InputError("`state_dict['ivon']` must hold the seed and generator states "
                         "written by IVON.state_dict()")


def stale_gradients(entry: list[tuple[torch.Tensor, weakref.ref, int]], *,
                    zeroed: bool) -> set[int]:
    """Which gradients a sampled block did not compute, from what they were on entry.

    Args:
        entry: ``(parameter, weakref to its grad, the grad's version)`` for the
            parameters that had a gradient when the block was entered.
        zeroed: whether ``IVON.zero_grad`` ran since the previous block.

    Returns:
        Ids of the parameters whose ``grad`` is the entry one, unchanged: no gradient
        in this sample (to be ignored).

    Raises:
        InputError: a gradient present on entry was added to without being zeroed
            (gradient accumulation across blocks): it mixes other samples' gradients.
    """
    stale = set()
    for p, ref, version in entry:
        if ref() is not p.grad:
            continue            # zeroed (set to None) and computed afresh
        if p.grad._version == version:
            stale.add(id(p))
        elif not zeroed:
            raise InputError(
                "IVON got a gradient that was added to the gradient of an earlier sample: "
                "p.grad was not zeroed since the previous sampled_params block (or step). "
                + _ACCUMULATION_FIX)
    return stale


def check_unscaled_in_block(collected: tuple[torch.Tensor, torch.Tensor] | None,
                            state: dict[torch.Tensor, dict[str, Any]]) -> None:
    """Raise unless a GradScaler's ``unscale_`` unscaled the gradients that IVON collected.

    Args:
        collected: a parameter and the gradient it held when its sampled block ended.
        state: the optimizer's state (its pending ``grad_sum`` and ``count``).

    Raises:
        InputError: ``unscale_`` ran after the block (the gradient no longer equals the
            collected one: one comparison on the device) or in one block of several.
    """
    p, grad = collected or (None, None)
    pending = state.get(p, {}) if p is not None else {}
    if p is None or p.grad is not grad or "grad_sum" not in pending:
        return
    if pending["count"] == 1 and torch.equal(grad.to(pending["grad_sum"].dtype),
                                             pending["grad_sum"]):
        return
    raise InputError(
        "scaler.unscale_(optimizer) must run inside the sampled block, right after "
        "backward(), with one sample per step: it ran after the block, when IVON had "
        "already collected the scaled gradients. Or leave the unscaling to "
        "scaler.step(optimizer)")


def owned_state(saved: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """A loaded parameter state as the optimizer keeps it: floating tensors copied onto
    ``param``'s device, in float32 for bfloat16/float16 weights (else its dtype)."""
    dtype = state_dtype(param)
    return {name: value.to(device=param.device, dtype=dtype, copy=True)
            if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for name, value in saved.items()}


def restore_generators(states: dict[str, torch.Tensor]) -> dict[str, torch.Generator]:
    """Noise generators from the states in ``IVON.state_dict()['ivon']['generators']``,
    keyed by device; devices that do not exist here are left out (their generator is
    seeded afresh on first use)."""
    generators = {}
    for key, state in states.items():
        device = torch.device(key)
        if device.type != "cpu" and not getattr(torch, device.type).is_available():
            continue
        generator = torch.Generator(device=device)
        # A checkpoint loaded with map_location may have moved the state tensor.
        generator.set_state(state.to("cpu", torch.uint8))
        generators[key] = generator
    return generators
