"""The divergence guard of the training loop: a non-finite loss or gradient stops the
step before the optimizer applies it, so the weights stay at their last finite state."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bayesify.errors import BayesifyError

__all__ = ["NonFiniteStep", "check_finite_loss", "gradient_norm"]


class NonFiniteStep(BayesifyError, FloatingPointError):
    """One training step produced a non-finite loss or gradient (caught by the loop,
    which reports the epoch and step)."""

    def __init__(self, what: str, value: float):
        self.what = what
        self.value = value
        super().__init__(f"the {what} is {value}")


def check_finite_loss(loss: torch.Tensor) -> None:
    """Raise :class:`NonFiniteStep` when the scalar ``loss`` is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteStep("loss", float(loss.detach().reshape(-1)[0]))


def gradient_norm(parameters: Iterable[nn.Parameter], clip: float | None) -> torch.Tensor:
    """The total gradient norm (before clipping), clipping to ``clip`` when given.

    Raises:
        NonFiniteStep: the norm is NaN or infinite (nothing is clipped then).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = nn.utils.get_total_norm([p.grad for p in params])
    if not bool(torch.isfinite(norm)):
        raise NonFiniteStep("gradient norm", float(norm))
    if clip is not None:
        nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm
