"""Regression predictives: the shared interface, and independent Gaussians (the exact
Gaussian mixtures are in :mod:`.mixture`)."""

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
)
from bayesify.errors import InputError
from bayesify.predictive.base import Predictive

__all__ = ["GaussianPredictive", "RegressionPredictive"]


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

    def output(self, index: int) -> RegressionPredictive:
        """The predictive of one output alone: mean [N] (the same type, scores kept).

        Args:
            index: which of the D outputs, in [-D, D); a one-output predictive ([N] or
                [N, 1]) takes 0 or -1.

        Returns:
            The marginal predictive of that output over the N points.
        """
        d = self.num_outputs
        if isinstance(index, bool) or not isinstance(index, int) or not -d <= index < d:
            raise InputError(f"`index` must be an output index in [{-d}, {d}) for a "
                             f"predictive with {d} output(s), got {index!r}")
        if self._mean_ndim == 1:
            return self
        selected = self._select_output(index % d)
        return selected.with_scores(**self.scores) if self.scores else selected

    @property
    def _mean_ndim(self) -> int:
        """1 for a [N] mean, 2 for [N, D] (without computing the mean where it costs)."""
        return self.mean.dim()

    @abc.abstractmethod
    def _select_output(self, index: int) -> RegressionPredictive:
        """The predictive of output ``index`` of a [N, D] predictive, mean [N]."""

    def joint_log_prob(self, y: Any) -> torch.Tensor:
        """Log density of all D outputs of each point jointly, [N].

        Equals :meth:`log_prob` for predictives whose outputs are independent given the
        input (Gaussian, recalibrated); a mixture overrides it with the density of the
        mixture of its joint components.
        """
        return self.log_prob(y)

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

    def _select_output(self, index: int) -> GaussianPredictive:
        aleatoric = self._aleatoric_variance
        return GaussianPredictive(self._mean[:, index], self._variance[:, index],
                                  None if aleatoric is None else aleatoric[:, index])

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per point: [n, *mean.shape]."""
        n = check_positive_int(n, "n")
        eps = torch.randn((n, *self._mean.shape), generator=generator,
                          device=self._mean.device, dtype=self._mean.dtype)
        return self._mean + eps * self._variance.sqrt()

    def __repr__(self) -> str:
        return f"GaussianPredictive(shape={list(self._mean.shape)})"
