"""Exact Gaussian-mixture predictives, as sampling methods give."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bayesify._math import normal_log_prob
from bayesify._validation import as_tensor, check_positive_int, check_probabilities
from bayesify.errors import InputError
from bayesify.predictive.regression import (
    RegressionPredictive,
    _check_variance,
    _normal_cdf,
)

__all__ = ["MixturePredictive"]

# Bisection halves the bracket each step; 64 steps take any float64 bracket to its ulp.
_BISECTION_STEPS = 64


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

    def _select_output(self, index: int) -> MixturePredictive:
        return MixturePredictive(self._means[..., index], self._variances[..., index],
                                 self._weights)

    def joint_log_prob(self, y: Any) -> torch.Tensor:
        """Log density of the mixture of joint components, log Σ_s w_s Π_d N(y_d; μ_sd,
        σ²_sd), [N].

        Each component is one posterior sample of the network, which gives all D outputs
        at once, so this is the exact predictive density of the sampled posterior; it
        keeps the dependence between outputs that the samples induce. :meth:`log_prob`
        multiplies the D marginal mixtures instead (outputs independent given the
        input, as for the other predictives); the two agree for one output.
        """
        target = self._target(y)
        component = normal_log_prob(target, self._means, self._safe_variances())
        if component.dim() == 3:
            component = component.sum(-1)
        log_w = self._weights.clamp_min(torch.finfo(component.dtype).tiny).log()
        return torch.logsumexp(component + log_w[:, None], dim=0)

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
        """Draw ``n`` samples per point from the mixture: [n, *mean.shape].

        Each entry picks its component independently: the draws follow the product of
        the marginal mixtures, as :meth:`log_prob` does.
        """
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
