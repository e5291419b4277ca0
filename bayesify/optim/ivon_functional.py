"""IVON's math as functions: the reference formulas and the fused kernel.

:class:`bayesify.optim.IVON` is a thin ``torch.optim.Optimizer`` around what lives here,
the way ``torch.optim`` keeps its kernels in ``torch.optim._functional``:

* :func:`price_hessian`, :func:`hessian_update` and :func:`ivon_mean_update`: one
  formula each, on tensors of any shape, as written in the paper (the tests check the
  optimizer against them);
* :func:`ivon_update_`: the same update fused into ``torch._foreach_*`` calls over a
  bucket of parameters of one device and dtype, which is what ``IVON.step`` runs;
* :func:`posterior_noise`: ε ~ N(0, I) and √(h + δ) for a bucket, from which a posterior
  sample is m + ε/√(λ(h + δ)); :func:`sample_statistics`: what one sample contributes
  to the step; :func:`all_reduce_mean_`: the average over ``torch.distributed`` ranks.

Notation: m the means (the parameters), g the momentum, h the Hessian estimate, λ the
effective sample size ``ess``, δ the weight decay (prior precision per datum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "HESS_APPROXES",
    "add_noise_",
    "add_to_pending",
    "all_reduce_mean_",
    "amp_unscale_",
    "hessian_update",
    "ivon_mean_update",
    "ivon_update_",
    "posterior_noise",
    "price_hessian",
    "sample_statistics",
]

HESS_APPROXES = ("price", "gradsq")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------- reference formulas


def price_hessian(grad_noise: torch.Tensor, hess: torch.Tensor, ess: float,
                  weight_decay: float) -> torch.Tensor:
    """Price's theorem estimate ĥ = ĝ⊙(θ − m)/σ² with 1/σ² = λ(h + δ).

    Args:
        grad_noise: the averaged ĝ⊙(θ − m) [any shape].
        hess: h, the current Hessian estimate (same shape).
        ess, weight_decay: λ and δ.

    Returns:
        ĥ, the shape of ``hess``.
    """
    return grad_noise * (hess + weight_decay) * ess


def hessian_update(hess: torch.Tensor, hess_hat: torch.Tensor, beta2: float,
                   weight_decay: float) -> torch.Tensor:
    """h ← β₂h + (1−β₂)ĥ + ½(1−β₂)²(h − ĥ)²/(h + δ), elementwise (any shape).

    The last term keeps h + δ > 0 whatever ĥ is: with a = h + δ, b = ĥ + δ and
    r = 1 − β₂, the new h + δ equals a·½[(1 − r(a−b)/a)² + 1].
    """
    r = 1.0 - beta2
    return (beta2 * hess + r * hess_hat
            + 0.5 * r * r * (hess - hess_hat).square() / (hess + weight_decay))


def ivon_mean_update(mean: torch.Tensor, momentum: torch.Tensor, hess: torch.Tensor, *,
                     lr: float, step: int, beta1: float, weight_decay: float,
                     hess_init: float, clip_radius: float = math.inf,
                     rescale_lr: bool = True) -> torch.Tensor:
    """m ← m − α·clip((g/(1−β₁ᵗ) + δm)/(h + δ), ±ξ) with α = lr·(h₀ + δ) (or lr).

    ``momentum`` is g after this step's update and ``hess`` the updated h (all three
    tensors of one shape).
    """
    alpha = lr * (hess_init + weight_decay) if rescale_lr else lr
    direction = (momentum / (1.0 - beta1**step) + weight_decay * mean) / (hess + weight_decay)
    return mean - alpha * direction.clamp(-clip_radius, clip_radius)


# ------------------------------------------------------------------ tensor lists


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of IVON's state for ``param``: float32 for bfloat16/float16 weights
    (whose 8-bit mantissa would round β₂ = 0.99999 to 1 and freeze h), else its own."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def buckets(params: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), the unit one foreach call can handle."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault((p.device, p.dtype), []).append(p)
    return out


def as_dtype(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` in ``dtype`` (the same list when they already are)."""
    return tensors if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def flat_views(like: list[torch.Tensor], dtype: torch.dtype,
               fill: Callable[[torch.Tensor], Any] | None = None) -> list[torch.Tensor]:
    """One buffer shaped as the tensors of ``like``, returned as views (one allocation);
    ``fill`` initializes the flat buffer in place."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=like[0].device)
    if fill is not None:
        fill(flat)
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like,
                                         strict=True)]


# ----------------------------------------------------------------------- kernels


def posterior_noise(params: list[torch.Tensor], hess: list[torch.Tensor], weight_decay: float,
                    generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ε ~ N(0, I) and √(h + δ) for one bucket, in the state dtype.

    A posterior sample is θ = m + ε/√(h + δ)/√λ. ε is drawn in one call for the bucket
    (one flat buffer, views per parameter), so a seed gives the same draws whatever the
    parameter shapes.

    Args:
        params: the bucket's parameters (one device and dtype).
        hess: h per parameter (state dtype).
        weight_decay: δ.
        generator: source of ε, on the parameters' device.

    Returns:
        ``(eps, root)``: two lists shaped like ``params``.
    """
    eps = flat_views(params, state_dtype(params[0]),
                     lambda flat: flat.normal_(generator=generator))
    root = torch._foreach_add(hess, weight_decay)
    torch._foreach_sqrt_(root)
    return eps, root


def add_noise_(params: list[torch.Tensor], eps: list[torch.Tensor], root: list[torch.Tensor],
               scale: float) -> None:
    """θ ← θ + scale·ε/√(h + δ) in place, with scale = 1/√λ (ε, root from
    :func:`posterior_noise`; ε is overwritten when the dtypes differ)."""
    if eps[0].dtype == params[0].dtype:
        torch._foreach_addcdiv_(params, eps, root, value=scale)
    else:
        torch._foreach_div_(eps, root)
        torch._foreach_add_(params, as_dtype(eps, params[0].dtype), alpha=scale)


def ivon_update_(params: list[torch.Tensor], momentum: list[torch.Tensor],
                 hess: list[torch.Tensor], grad: list[torch.Tensor],
                 hess_hat: list[torch.Tensor], steps: list[int], *, lr: float, ess: float,
                 beta1: float, beta2: float, weight_decay: float, hess_init: float,
                 hess_approx: str = "price", clip_radius: float = math.inf,
                 rescale_lr: bool = True) -> None:
    """One IVON step for a bucket (one device and dtype), in place, with foreach ops.

    Updates g ← β₁g + (1−β₁)ĝ, then h by :func:`hessian_update` with ĥ from
    :func:`price_hessian` (or λ·ĝ² for ``"gradsq"``), then m by :func:`ivon_mean_update`.

    Args:
        params: the means m (updated in place).
        momentum, hess: g and h per parameter, in the state dtype (updated in place).
        grad: the averaged sampled gradients ĝ (state dtype; consumed).
        hess_hat: the averaged ĝ⊙(θ − m) for ``"price"``, or ĝ² for ``"gradsq"``
            (state dtype; overwritten).
        steps: t per parameter, counting this step.
        lr, ess, beta1, beta2, weight_decay, hess_init, hess_approx, clip_radius,
            rescale_lr: the group's hyperparameters (see :class:`~bayesify.optim.IVON`).
    """
    wd = weight_decay
    # Each line below is one pass over the bucket; the order keeps the number of
    # passes (the cost next to Adam) and of temporary tensors small.
    shifted = torch._foreach_add(hess, wd)          # h + δ before the update
    if hess_approx == "price":
        torch._foreach_mul_(hess_hat, shifted)      # ĥ = ĝ⊙(θ − m)·λ(h + δ)
    torch._foreach_mul_(hess_hat, ess)

    torch._foreach_lerp_(momentum, grad, 1.0 - beta1)

    r = 1.0 - beta2
    del grad
    square = torch._foreach_sub(hess, hess_hat)     # (h − ĥ)²
    torch._foreach_mul_(square, square)
    torch._foreach_lerp_(hess, hess_hat, r)         # β₂h + (1−β₂)ĥ
    torch._foreach_addcdiv_(hess, square, shifted, value=0.5 * r * r)
    del square, hess_hat, shifted

    # m ← m − α·clip((g/(1−β₁ᵗ) + δm)/(h + δ)); with one t and no clip, the debias
    # factor moves into the scalar: (g + δ(1−β₁ᵗ)m)/(h + δ) · α/(1−β₁ᵗ).
    debias = [1.0 - beta1**t for t in steps]
    alpha = lr * (hess_init + wd) if rescale_lr else lr
    dtype = hess[0].dtype
    shifted = torch._foreach_add(hess, wd)          # the new h + δ
    if len(set(debias)) == 1 and math.isinf(clip_radius) and params[0].dtype == dtype:
        direction = torch._foreach_add(momentum, params, alpha=wd * debias[0]) if wd \
            else momentum
        torch._foreach_addcdiv_(params, direction, shifted, value=-alpha / debias[0])
        return
    direction = torch._foreach_div(momentum, debias)
    if wd:
        torch._foreach_add_(direction, as_dtype(params, dtype), alpha=wd)
    torch._foreach_div_(direction, shifted)
    if not math.isinf(clip_radius):
        torch._foreach_clamp_min_(direction, -clip_radius)
        torch._foreach_clamp_max_(direction, clip_radius)
    torch._foreach_add_(params, as_dtype(direction, params[0].dtype), alpha=-alpha)


def sample_statistics(params: list[torch.Tensor], means: list[torch.Tensor],
                      hess_approx: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sample's statistics for a bucket: ĝ and ĝ⊙(θ − m) (``"price"``) or ĝ².

    Args:
        params: the parameters, holding the sample θ with its gradient ĝ in ``.grad``;
            for ``"price"`` they are left holding θ − m (the caller restores m).
        means: m per parameter.
        hess_approx: ``"price"`` or ``"gradsq"``.

    Returns:
        ``(grads, second)``: new tensors in the state dtype, shaped like ``params``.
    """
    dtype = state_dtype(params[0])
    grads = [p.grad for p in params]
    if grads[0].dtype == dtype:
        grads = torch._foreach_mul(grads, 1.0)  # a copy: the user may zero p.grad
    else:
        grads = as_dtype(grads, dtype)
    if hess_approx == "price":
        torch._foreach_sub_(params, means)
        return grads, torch._foreach_mul(grads, as_dtype(params, dtype))
    return grads, torch._foreach_mul(grads, grads)


def add_to_pending(states: list[dict[str, Any]], grads: list[torch.Tensor],
                   second: list[torch.Tensor]) -> None:
    """Add one sample's statistics (from :func:`sample_statistics`) to the sums
    ``grad_sum``/``hess_sum`` and the ``count`` kept in each parameter's state dict."""
    pending = ["grad_sum" in s for s in states]
    if all(pending):
        torch._foreach_add_([s["grad_sum"] for s in states], grads)
        torch._foreach_add_([s["hess_sum"] for s in states], second)
    for s, g, h, seen in zip(states, grads, second, pending, strict=True):
        if not seen:
            s["grad_sum"], s["hess_sum"], s["count"] = g, h, 1
        elif all(pending):
            s["count"] += 1
        else:   # some parameters got no gradient in an earlier sample of this step
            s["grad_sum"].add_(g)
            s["hess_sum"].add_(h)
            s["count"] += 1


def amp_unscale_(work: list[tuple[dict[str, Any], list[dict[str, Any]]]],
                 scale: torch.Tensor | None, found: torch.Tensor | None) -> bool:
    """Undo a GradScaler's loss scale s on the pending sums of a step, in place.

    ``torch.amp.GradScaler.step`` sets ``grad_scale`` (s) and ``found_inf`` (its count
    of inf/NaN gradients) on an optimizer that declares ``_step_supports_amp_scaling``.
    ĝ and ĝ⊙(θ − m) are divided by s, ĝ² (``"gradsq"``) by s².

    Args:
        work: ``(param group, [state dict per parameter])`` with pending sums.
        scale, found: the scaler's tensors (``None`` without a scaler).

    Returns:
        False when the step must be skipped: the scaler found inf/NaN, or a sum over
        several samples is not finite (one wait for the device for all of them).
    """
    if scale is None and found is None:
        return True
    grads = [s["grad_sum"] for _, states in work for s in states]
    if scale is not None:
        inverse = scale.double().reciprocal().to(grads[0].device, torch.float32)
        for group, states in work:
            second = [s["hess_sum"] for s in states]
            torch._foreach_mul_([s["grad_sum"] for s in states], inverse)
            for _ in range(2 if group["hess_approx"] == "gradsq" else 1):
                torch._foreach_mul_(second, inverse)
    if found is None:
        return True
    total = found.reshape(()).float()
    for bucket in buckets(grads).values():
        norms = torch.stack(torch._foreach_norm(bucket))
        total = total + (~torch.isfinite(norms)).sum().to(total.device)
    return not bool(total)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the ``torch.distributed`` ranks, one flat
    all-reduce per (device, dtype) bucket."""
    world = dist.get_world_size()
    for bucket in buckets(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in bucket]),
                                              bucket, strict=True)]
        torch._foreach_copy_(bucket, views)
