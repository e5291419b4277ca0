"""Regression predictives: independent Gaussians, and exact Gaussian mixtures."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

from bayesify._math import normal_log_prob
from bayesify._validation import (
    as_tensor,
    check_fraction,
    check_positive_int,
    check_probabilities,
)
from bayesify.errors import InputError
from bayesify.predictive.base import Predictive

__all__ = ["GaussianPredictive", "MixturePredictive", "RegressionPredictive"]

# Bisection halves the bracket each step; 64 steps take any float64 bracket to its ulp.
_BISECTION_STEPS = 64


class RegressionPredictive(Predictive):
    """Shared interface of the Gaussian and mixture predictives (mean shape [N] or [N, D])."""

    @property
    @abc.abstractmethod
    def mean(self) -> torch.Tensor:
        """Predictive mean [N] or [N, D]."""

    @property
    @abc.abstractmethod
    def variance(self) -> torch.Tensor:
        """Total predictive variance, shape of ``mean``."""

    @property
    @abc.abstractmethod
    def aleatoric_variance(self) -> torch.Tensor:
        """Observation-noise variance, shape of ``mean``."""

    @property
    def epistemic_variance(self) -> torch.Tensor:
        """Variance due to the posterior over weights: total - aleatoric, >= 0."""
        return (self.variance - self.aleatoric_variance).clamp_min(0)

    @property
    def stddev(self) -> torch.Tensor:
        """Predictive standard deviation, shape of ``mean``."""
        return self.variance.sqrt()

    @property
    def num_points(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_outputs(self) -> int:
        """D, the number of outputs (1 for a [N]-shaped mean)."""
        return 1 if self.mean.dim() == 1 else int(self.mean.shape[1])

    def _target(self, y: Any, name: str = "y") -> torch.Tensor:
        """Bring targets to the mean's shape; [N] and [N, 1] are accepted for one output."""
        y = as_tensor(y, name, dtype=self.mean.dtype, device=self.mean.device)
        shape = tuple(self.mean.shape)
        if y.dim() == 2 and y.shape[1] == 1 and len(shape) == 1:
            y = y[:, 0]
        elif y.dim() == 1 and len(shape) == 2 and shape[1] == 1:
            y = y[:, None]
        if tuple(y.shape) != shape:
            raise InputError(f"`{name}` must have shape {list(shape)} to match the predictive, "
                             f"got {list(y.shape)}")
        return y

    def _levels(self, q: Any) -> tuple[torch.Tensor, bool]:
        """Quantile levels as a float64 vector [Q], and whether a scalar was given."""
        levels = as_tensor(q, "q", dtype=torch.float64, device=self.mean.device)
        scalar = levels.dim() == 0  # also numpy scalars, which are not Python floats
        levels = levels.reshape(-1)
        if bool(((levels <= 0) | (levels >= 1)).any()):
            raise InputError(f"`q` must lie in (0, 1), got {levels.tolist()}")
        return levels, scalar

    def log_prob(self, y: Any) -> torch.Tensor:
        """Log predictive density of targets ``y`` (shape of ``mean``) -> [N]."""
        elementwise = self._log_prob_elementwise(self._target(y))
        return elementwise if elementwise.dim() == 1 else elementwise.sum(-1)

    @abc.abstractmethod
    def _log_prob_elementwise(self, y: torch.Tensor) -> torch.Tensor:
        """Log density per entry, shape of ``mean``."""

    def cdf(self, y: Any) -> torch.Tensor:
        """Predictive CDF at ``y``, elementwise; shape of ``mean``."""
        return self._cdf(self._target(y))

    @abc.abstractmethod
    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        """CDF per entry, shape of ``mean``."""

    def quantile(self, q: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Quantiles of each marginal predictive.

        Args:
            q: a level in (0, 1), or levels [Q].

        Returns:
            Shape of ``mean`` for a scalar level, [Q, *mean.shape] for a vector.
        """
        levels, scalar = self._levels(q)
        out = self._quantile(levels).to(self.mean.dtype)
        return out[0] if scalar else out

    @abc.abstractmethod
    def _quantile(self, levels: torch.Tensor) -> torch.Tensor:
        """Quantiles [Q, *mean.shape] for float64 levels [Q]."""

    def interval(self, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        """Central predictive interval holding probability ``level``.

        Returns:
            ``(lower, upper)``, each of the shape of ``mean``.
        """
        level = check_fraction(level, "level")
        bounds = self.quantile([(1 - level) / 2, (1 + level) / 2])
        return bounds[0], bounds[1]


def _check_variance(variance: torch.Tensor, name: str) -> None:
    if bool((variance < 0).any()):
        raise InputError(f"`{name}` must be >= 0, got a minimum of {float(variance.min()):.4g}")


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z)


class GaussianPredictive(RegressionPredictive):
    """Independent Gaussian predictives N(mean, variance) for N inputs.

    Args:
        mean: predictive means [N] or [N, D].
        variance: total predictive variances, same shape, >= 0.
        aleatoric_variance: the observation-noise part of ``variance`` (same shape), or
            ``None`` when the split is unknown (then it counts as zero and all variance
            is reported as epistemic).
    """

    _point_fields = ("mean", "variance", "aleatoric_variance")
    _point_dims = (0, 0, 0)

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor,
                 aleatoric_variance: torch.Tensor | None = None):
        mean = as_tensor(mean, "mean", ndim=(1, 2))
        if not mean.is_floating_point():
            mean = mean.double()
        variance = as_tensor(variance, "variance", dtype=mean.dtype, device=mean.device)
        if variance.shape != mean.shape:
            raise InputError(f"`variance` must have the shape of `mean` {list(mean.shape)}, "
                             f"got {list(variance.shape)}")
        _check_variance(variance, "variance")
        if aleatoric_variance is not None:
            aleatoric_variance = as_tensor(aleatoric_variance, "aleatoric_variance",
                                           dtype=mean.dtype, device=mean.device)
            if aleatoric_variance.shape != mean.shape:
                raise InputError("`aleatoric_variance` must have the shape of `mean` "
                                 f"{list(mean.shape)}, got {list(aleatoric_variance.shape)}")
            _check_variance(aleatoric_variance, "aleatoric_variance")
            slack = 1e-6 * (1 + variance.abs())
            if bool((aleatoric_variance > variance + slack).any()):
                raise InputError("`aleatoric_variance` must not exceed the total `variance`")
        self._mean = mean
        self._variance = variance
        self._aleatoric_variance = aleatoric_variance

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean [N] or [N, D]."""
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        """Total predictive variance, shape of ``mean``."""
        return self._variance

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        """Observation-noise variance, shape of ``mean`` (zeros when unknown)."""
        if self._aleatoric_variance is None:
            return torch.zeros_like(self._variance)
        return self._aleatoric_variance

    def _safe_variance(self) -> torch.Tensor:
        return self._variance.clamp_min(torch.finfo(self._variance.dtype).tiny)

    def _log_prob_elementwise(self, y: torch.Tensor) -> torch.Tensor:
        var = self._safe_variance()
        return normal_log_prob(y, self._mean, var)

    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        return _normal_cdf((y - self._mean) / self._safe_variance().sqrt())

    def _quantile(self, levels: torch.Tensor) -> torch.Tensor:
        z = torch.special.ndtri(levels).to(self._mean.dtype)
        z = z.reshape((-1,) + (1,) * self._mean.dim())
        return self._mean + z * self._variance.sqrt()

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per point: [n, *mean.shape]."""
        n = check_positive_int(n, "n")
        eps = torch.randn((n, *self._mean.shape), generator=generator,
                          device=self._mean.device, dtype=self._mean.dtype)
        return self._mean + eps * self._variance.sqrt()

    def __repr__(self) -> str:
        return f"GaussianPredictive(shape={list(self._mean.shape)})"


class MixturePredictive(RegressionPredictive):
    """Equal- or given-weight mixtures of S Gaussians per input, as sampling methods give.

    Args:
        means: component means [S, N] or [S, N, D] (one per posterior sample).
        variances: component (aleatoric) variances, same shape, >= 0.
        weights: component weights [S], non-negative and summing to one; uniform when
            ``None``.

    The mixture's variance splits exactly into ``aleatoric_variance`` (the mean of the
    component variances) and ``epistemic_variance`` (the variance of the component
    means).
    """

    _point_fields = ("means", "variances")
    _point_dims = (1, 1)

    def __init__(self, means: torch.Tensor, variances: torch.Tensor,
                 weights: torch.Tensor | None = None):
        means = as_tensor(means, "means", ndim=(2, 3))
        if not means.is_floating_point():
            means = means.double()
        variances = as_tensor(variances, "variances", dtype=means.dtype, device=means.device)
        if variances.shape != means.shape:
            raise InputError(f"`variances` must have the shape of `means` {list(means.shape)}, "
                             f"got {list(variances.shape)}")
        _check_variance(variances, "variances")
        num_components = means.shape[0]
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components,
                                 dtype=means.dtype, device=means.device)
        else:
            weights = as_tensor(weights, "weights", device=means.device, ndim=1)
            if not weights.is_floating_point():
                weights = weights.to(means.dtype)
            if weights.shape[0] != num_components:
                raise InputError(f"`weights` must have one entry per component "
                                 f"({num_components}), got {weights.shape[0]}")
            # Checked in the dtype they came in (float32 weights sum to one only to
            # float32 precision), then renormalized in the mixture's dtype.
            check_probabilities(weights, "weights")
            weights = weights.to(means.dtype)
            weights = weights / weights.sum()
        self._means = means
        self._variances = variances
        self._weights = weights

    @property
    def means(self) -> torch.Tensor:
        """Component means [S, N] or [S, N, D]."""
        return self._means

    @property
    def variances(self) -> torch.Tensor:
        """Component variances [S, N] or [S, N, D]."""
        return self._variances

    @property
    def weights(self) -> torch.Tensor:
        """Component weights [S]."""
        return self._weights

    @property
    def num_components(self) -> int:
        """S, the number of mixture components."""
        return int(self._means.shape[0])

    def _w(self) -> torch.Tensor:
        return self._weights.reshape((-1,) + (1,) * (self._means.dim() - 1))

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> MixturePredictive:
        new = super().to(device, dtype)
        new._weights = self._weights.to(device=device, dtype=dtype)
        return new

    @classmethod
    def cat(cls, items: Sequence[MixturePredictive]) -> MixturePredictive:
        # Only the points are concatenated, so the components must be the same ones.
        first = items[0] if items else None
        for item in items:
            if isinstance(first, MixturePredictive) and isinstance(item, MixturePredictive) \
                    and not (item.weights.shape == first.weights.shape
                             and torch.equal(item.weights, first.weights.to(item.weights))):
                raise InputError("`items` must share the mixture `weights` to be concatenated")
        return super().cat(items)

    @property
    def mean(self) -> torch.Tensor:
        """Mixture mean, [N] or [N, D]."""
        return (self._w() * self._means).sum(0)

    @property
    def aleatoric_variance(self) -> torch.Tensor:
        """Weighted mean of the component variances."""
        return (self._w() * self._variances).sum(0)

    @property
    def epistemic_variance(self) -> torch.Tensor:
        """Weighted variance of the component means."""
        return (self._w() * (self._means - self.mean) ** 2).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        """Total mixture variance = aleatoric + epistemic."""
        return self.aleatoric_variance + self.epistemic_variance

    def _safe_variances(self) -> torch.Tensor:
        return self._variances.clamp_min(torch.finfo(self._variances.dtype).tiny)

    def _log_prob_elementwise(self, y: torch.Tensor) -> torch.Tensor:
        var = self._safe_variances()
        component = normal_log_prob(y, self._means, var)
        log_w = self._w().clamp_min(torch.finfo(var.dtype).tiny).log()
        return torch.logsumexp(component + log_w, dim=0)

    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        z = (y - self._means) / self._safe_variances().sqrt()
        return (self._w() * _normal_cdf(z)).sum(0)

    def _quantile(self, levels: torch.Tensor) -> torch.Tensor:
        # The mixture CDF is a convex combination of the component CDFs, so its q-quantile
        # lies between the smallest and largest component q-quantile: an exact bracket.
        means = self._means.double()
        std = self._variances.double().sqrt()
        z = torch.special.ndtri(levels).reshape((-1,) + (1,) * means.dim())
        component_quantiles = means + z * std  # [Q, S, *point]
        lo = component_quantiles.min(1).values
        hi = component_quantiles.max(1).values
        target = levels.reshape((-1,) + (1,) * (means.dim() - 1))
        weights = self._w().double()
        var = std.square().clamp_min(torch.finfo(torch.float64).tiny)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            cdf = (weights * _normal_cdf((mid.unsqueeze(1) - means) / var.sqrt())).sum(1)
            below = cdf < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per point from the mixture: [n, *mean.shape]."""
        n = check_positive_int(n, "n")
        point_shape = self._means.shape[1:]
        num = int(torch.tensor(point_shape).prod()) if point_shape else 1
        idx = torch.multinomial(self._weights.float(), n * num, replacement=True,
                                generator=generator).reshape(n, *point_shape)
        chosen_means = self._means.gather(0, idx.to(self._means.device))
        chosen_var = self._variances.gather(0, idx.to(self._means.device))
        eps = torch.randn(chosen_means.shape, generator=generator, device=self._means.device,
                          dtype=self._means.dtype)
        return chosen_means + eps * chosen_var.sqrt()

    def __repr__(self) -> str:
        return (f"MixturePredictive(components={self.num_components}, "
                f"shape={list(self._means.shape[1:])})")
