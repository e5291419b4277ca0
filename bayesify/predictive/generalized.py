"""Generalized-Gaussian predictives (BayesCap's output): exact density, CDF, quantiles and
samples of p(y) = β / (2 α Γ(1/β)) · exp(−(|y − μ| / α)^β)."""

from __future__ import annotations

import math

import torch

from bayesify._validation import as_tensor, check_positive_int
from bayesify.errors import InputError
from bayesify.predictive.regression import RegressionPredictive

__all__ = ["GeneralizedGaussianPredictive"]

# Bisection on log t for the inverse regularized incomplete gamma: the bracket spans
# [1e-300, 2^k·e] (under 760 in log units), so 80 halvings leave under 1e-21 of it.
_BISECTION_STEPS = 80
_LOG_TINY = -690.0


def _check_positive(value: torch.Tensor, name: str) -> None:
    if not bool((value > 0).all()):
        raise InputError(f"`{name}` must be > 0, got a minimum of {float(value.min()):.4g}")


def _gammainc_inverse(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """t >= 0 with P(a, t) = u (the regularized lower incomplete gamma), elementwise in
    float64; u in [0, 1), t = 0 where u = 0."""
    a, u = torch.broadcast_tensors(a.double(), u.double())
    hi = torch.ones_like(u)
    for _ in range(64):  # P(a, t) -> 1 as t grows; double until the root is bracketed
        short = torch.special.gammainc(a, hi) < u
        if not bool(short.any()):
            break
        hi = torch.where(short, 2 * hi, hi)
    lo = torch.full_like(u, _LOG_TINY)
    hi = hi.log()
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = torch.special.gammainc(a, mid.exp()) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return torch.where(u > 0, (0.5 * (lo + hi)).exp(), torch.zeros_like(u))


class GeneralizedGaussianPredictive(RegressionPredictive):
    """Independent generalized-Gaussian predictives GGD(μ, α, β) for N inputs.

    Args:
        mean: location μ [N] or [N, D] (the predictive mean and median).
        alpha: scale α > 0, same shape.
        beta: shape β > 0, same shape (2: Gaussian with variance α²/2; 1: Laplace;
            large: close to uniform on [μ − α, μ + α]).

    The variance is α² Γ(3/β) / Γ(1/β). How it splits into aleatoric and epistemic
    parts is unknown, so, as for a GaussianPredictive without an aleatoric part, all of
    it is reported as epistemic.
    """

    _point_fields = ("mean", "alpha", "beta")
    _point_dims = (0, 0, 0)

    def __init__(self, mean: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        mean = as_tensor(mean, "mean", ndim=(1, 2))
        if not mean.is_floating_point():
            mean = mean.double()
        alpha = as_tensor(alpha, "alpha", dtype=mean.dtype, device=mean.device)
        beta = as_tensor(beta, "beta", dtype=mean.dtype, device=mean.device)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value.shape != mean.shape:
                raise InputError(f"`{name}` must have the shape of `mean` {list(mean.shape)}, "
                                 f"got {list(value.shape)}")
            _check_positive(value, name)
        self._mean = mean
        self._alpha = alpha
        self._beta = beta

    @property
    def mean(self) -> torch.Tensor:
        """μ, [N] or [N, D]."""
        return self._mean

    @property
    def alpha(self) -> torch.Tensor:
        """The scale α, shape of ``mean``."""
        return self._alpha

    @property
    def beta(self) -> torch.Tensor:
        """The shape β, shape of ``mean``."""
        return self._beta

    @property
    def variance(self) -> torch.Tensor:
        """α² Γ(3/β) / Γ(1/β), shape of ``mean``."""
        b = self._beta
        return self._alpha ** 2 * torch.exp(torch.lgamma(3 / b) - torch.lgamma(1 / b))

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        """Zeros: the split is unknown (see the class docstring)."""
        return torch.zeros_like(self._mean)

    def _log_prob_elementwise(self, y: torch.Tensor) -> torch.Tensor:
        a, b = self._alpha, self._beta
        z = (y - self._mean).abs() / a
        return b.log() - a.log() - torch.lgamma(1 / b) - math.log(2.0) - z ** b

    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        diff = y - self._mean
        t = (diff.abs() / self._alpha) ** self._beta
        half = 0.5 * torch.special.gammainc(1 / self._beta, t)
        return 0.5 + torch.sign(diff) * half

    def _ppf(self, p: torch.Tensor) -> torch.Tensor:
        """The quantile at levels p (float64, broadcasting against ``mean``)."""
        b = self._beta.double()
        t = _gammainc_inverse(1 / b, (2 * p - 1).abs())
        z = t ** (1 / b)
        return self._mean + (torch.sign(p - 0.5) * self._alpha.double() * z).to(self._mean.dtype)

    def _quantile(self, levels: torch.Tensor) -> torch.Tensor:
        return self._ppf(levels.reshape((-1,) + (1,) * self._mean.dim()))

    def _select_output(self, index: int) -> GeneralizedGaussianPredictive:
        return GeneralizedGaussianPredictive(self._mean[:, index], self._alpha[:, index],
                                             self._beta[:, index])

    def rescaled(self, scale: float | torch.Tensor) -> GeneralizedGaussianPredictive:
        """The predictive of μ + scale·(Y − μ): α times ``scale``, μ and β kept (what a
        variance scaling by scale² does to a generalized Gaussian, exactly)."""
        if isinstance(scale, torch.Tensor):
            scale = scale.to(dtype=self._alpha.dtype, device=self._alpha.device)
        out = GeneralizedGaussianPredictive(self._mean, self._alpha * scale, self._beta)
        return out.with_scores(**self.scores) if self.scores else out

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per point by inverting the CDF: [n, *mean.shape]."""
        n = check_positive_int(n, "n")
        p = torch.rand((n, *self._mean.shape), generator=generator, dtype=torch.float64,
                       device=self._mean.device)
        return self._ppf(p.clamp(1e-300, 1.0))

    def __repr__(self) -> str:
        return f"GeneralizedGaussianPredictive(shape={list(self._mean.shape)})"
