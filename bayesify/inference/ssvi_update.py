"""The pure math of SSVI's subspace update (Li et al., ICLR 2024, arXiv:2402.11025).

Every ``update_interval`` steps until ``update_end`` of training, each sparse layer
removes the fraction ``removal_fraction(t)`` of its active weights with the lowest
removal score and adds as many inactive weights with the largest gradient magnitude,
so the number of active weights never changes.
"""

from __future__ import annotations

import math

import torch

from bayesify._validation import check_choice
from bayesify.errors import InputError

__all__ = [
    "REMOVAL_SCORES",
    "folded_normal_moments",
    "removal_fraction",
    "removal_scores",
    "select_subspace",
]

REMOVAL_SCORES = ("snr", "abs_mean", "mean_over_std", "expected_abs")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _folded_gap(z: torch.Tensor) -> torch.Tensor:
    """g(z) = (E|theta| - |mu|) / sigma for z = |mu| / sigma >= 0; in [0, sqrt(2/pi)]."""
    return _SQRT_2_OVER_PI * torch.exp(-0.5 * z * z) - z * torch.erfc(z / math.sqrt(2.0))


def folded_normal_moments(mu: torch.Tensor,
                          sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of |theta| for theta ~ N(mu, sigma^2), elementwise (sigma > 0).

    E|theta| = sigma sqrt(2/pi) exp(-mu^2 / 2 sigma^2) + mu erf(mu / sqrt(2) sigma) and
    Var|theta| = mu^2 + sigma^2 - E|theta|^2, evaluated as |mu| + sigma g and
    sigma^2 (1 - g (2z + g)) with z = |mu|/sigma, which avoids the cancellation of the
    textbook form when |mu| >> sigma.
    """
    z = mu.abs() / sigma
    g = _folded_gap(z)
    mean = mu.abs() + sigma * g
    var = sigma * sigma * (1.0 - g * (2.0 * z + g)).clamp_min(0.0)
    return mean, var


def removal_scores(mu: torch.Tensor, sigma: torch.Tensor, kind: str = "snr") -> torch.Tensor:
    """How much each weight is worth keeping (higher = keep), elementwise.

    Args:
        mu, sigma: posterior means and standard deviations (sigma > 0), same shape.
        kind: ``"snr"``: E|theta| / sqrt(Var|theta|), the signal-to-noise ratio of the
            weight's magnitude (the paper's preferred score); ``"abs_mean"``: |mu|;
            ``"mean_over_std"``: |mu| / sigma; ``"expected_abs"``: E|theta|.
    """
    check_choice(kind, "removal_score", REMOVAL_SCORES)
    if kind == "abs_mean":
        return mu.abs()
    if kind == "mean_over_std":
        return mu.abs() / sigma
    mean, var = folded_normal_moments(mu, sigma)
    if kind == "expected_abs":
        return mean
    tiny = torch.finfo(var.dtype).tiny
    return mean / var.clamp_min(tiny).sqrt()


def removal_fraction(step: int, end_step: int, rate: float = 0.3) -> float:
    """zeta_t = rate / 2 * (1 + cos(pi t / T_end)): rate at t = 0, annealed to 0 at T_end."""
    if end_step <= 0:
        return 0.0
    return 0.5 * rate * (1.0 + math.cos(math.pi * min(step, end_step) / end_step))


def select_subspace(mask: torch.Tensor, keep_score: torch.Tensor, grow_score: torch.Tensor,
                    num_remove: int) -> torch.Tensor:
    """One removal-then-addition step on a layer's mask.

    Keeps the ``active - num_remove`` active weights with the highest ``keep_score``,
    then activates the ``num_remove`` weights with the highest ``grow_score`` among the
    rest (a weight just removed may come straight back, as in the official code).

    Args:
        mask: bool [*shape], the current active set.
        keep_score: [*shape], scores of the active weights (others are ignored).
        grow_score: [*shape], e.g. |dL/dmu| of the dense gradient.
        num_remove: how many weights to swap.

    Returns:
        The new bool mask [*shape] with exactly as many active weights as ``mask``.
    """
    flat = mask.reshape(-1)
    active = int(flat.sum())
    if not 0 <= num_remove <= active:
        raise InputError(f"`num_remove` must lie in [0, {active}] (the active weights), "
                         f"got {num_remove}")
    if num_remove == 0:
        return mask.clone()
    lowest = torch.finfo(keep_score.dtype).min
    keep = torch.where(flat, keep_score.reshape(-1), torch.full_like(flat, lowest,
                                                                     dtype=keep_score.dtype))
    kept = torch.zeros_like(flat)
    kept[torch.topk(keep, active - num_remove).indices] = True
    grow = torch.where(kept, torch.full_like(flat, -math.inf, dtype=grow_score.dtype),
                       grow_score.reshape(-1))
    new = kept.clone()
    new[torch.topk(grow, num_remove).indices] = True
    return new.reshape(mask.shape)
