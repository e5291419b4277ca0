"""Metrics for regression predictives: NLL, RMSE, CRPS, calibration error, intervals.

A regression predictive here is a :class:`~bayesify.predictive.GaussianPredictive`, a
:class:`~bayesify.predictive.MixturePredictive`, or a raw ``(mean, variance)`` pair
(read as independent Gaussians); :func:`crps` also takes raw samples [S, N] or
[S, N, D]. Targets ``y`` have the predictive mean's shape ([N] or [N, D]; [N] and [N, 1]
are interchangeable for one output). Everything is computed in float64 and returned as
a Python float. With several outputs, NLL sums the log density over outputs and
averages over points; every other metric averages over all N * D entries.
``per_output=True`` returns one value per output instead (a list of D floats), and
:func:`interval_coverage` with ``joint=True`` counts a point as covered only when all
of its D targets are inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from bayesify._validation import as_tensor
from bayesify.errors import InputError
from bayesify.predictive import (
    GaussianPredictive,
    MixturePredictive,
    Predictive,
    RegressionPredictive,
)

__all__ = [
    "crps",
    "interval_coverage",
    "mean_interval_width",
    "regression_calibration_error",
    "regression_nll",
    "rmse",
]

_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2)
# Bound on the [S (S - 1) / 2, chunk] pairwise tensor of the mixture CRPS (float64 elements).
_PAIRWISE_BUDGET = 1 << 20
# CRPS by quadrature (predictives without a closed form): Simpson nodes per side and
# the quantile levels where the integration range is truncated.
_QUADRATURE_POINTS = 513
_QUADRATURE_TAIL = 1e-7


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _as_regression(pred: Any, name: str = "pred") -> RegressionPredictive:
    """A float64 regression predictive from a predictive or a ``(mean, variance)`` pair."""
    if isinstance(pred, RegressionPredictive):
        return pred.to(dtype=torch.float64)
    if isinstance(pred, Predictive):
        raise InputError(f"`{name}` must be a regression predictive, got a "
                         f"{type(pred).__name__}; use the classification metrics for it")
    if isinstance(pred, tuple | list) and len(pred) == 2:
        mean = as_tensor(pred[0], f"{name}[0] (mean)", dtype=torch.float64, ndim=(1, 2))
        return GaussianPredictive(mean, as_tensor(pred[1], f"{name}[1] (variance)",
                                                  dtype=torch.float64, device=mean.device))
    raise InputError(f"`{name}` must be a GaussianPredictive, a MixturePredictive or a "
                     f"(mean, variance) pair, got {type(pred).__name__}")


def _reduce(values: torch.Tensor, per_output: bool) -> float | list[float]:
    """Mean of [N] or [N, D] values over all entries, or per output (a list of D)."""
    if not per_output:
        return float(values.mean())
    columns = values if values.dim() == 2 else values[:, None]
    return [float(v) for v in columns.mean(0)]


def _match(y: Any, like: torch.Tensor, name: str, *, finite: bool = True) -> torch.Tensor:
    """``y`` as float64 with the shape of ``like``; [N] and [N, 1] are interchangeable."""
    y = as_tensor(y, name, dtype=torch.float64, device=like.device, finite=finite)
    if like.dim() == 1 and y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif like.dim() == 2 and like.shape[1] == 1 and y.dim() == 1:
        y = y[:, None]
    if y.shape != like.shape:
        raise InputError(f"`{name}` must have shape {list(like.shape)}, got {list(y.shape)}")
    return y


# --------------------------------------------------------------------------------------
# CRPS math (pure functions on float64 tensors)
# --------------------------------------------------------------------------------------


def _expected_abs_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E|X| for X ~ N(mu, var), elementwise: 2 sigma phi(mu/sigma) + mu erf(mu/(sigma sqrt 2))."""
    sigma = var.sqrt()
    z = mu / sigma.clamp_min(torch.finfo(var.dtype).tiny)
    # erf(z / sqrt 2) = 2 Phi(z) - 1, and erf is several times cheaper than ndtr.
    smooth = (2 * _INV_SQRT_2PI) * sigma * torch.exp(-0.5 * z * z) \
        + mu * torch.special.erf(z * _INV_SQRT_2)
    return torch.where(sigma > 0, smooth, mu.abs())


def crps_gaussian(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form CRPS of N(mean, var) at y, elementwise: E|X - y| - E|X - X'| / 2."""
    return _expected_abs_normal(y - mean, var) - var.sqrt() * _INV_SQRT_PI


def crps_mixture(means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """Exact CRPS of Gaussian mixtures (Grimit et al., 2006), elementwise.

    CRPS = sum_i w_i A(y - mu_i, s_i^2) - 1/2 sum_ij w_i w_j A(mu_i - mu_j, s_i^2 + s_j^2)
    with A(m, v) = E|X|, X ~ N(m, v).

    Args:
        means, variances: components [S, *P]; weights: [S]; y: targets [*P].

    Returns:
        CRPS [*P].
    """
    num = means.shape[0]
    w = weights.reshape((num,) + (1,) * (means.dim() - 1))
    spread = (w * _expected_abs_normal(y - means, variances)).sum(0)
    flat_means = means.reshape(num, -1)
    flat_vars = variances.reshape(num, -1)
    # The double sum is symmetric: the diagonal is closed-form, A(0, 2 s^2) = 2 s / sqrt(pi),
    # and the S (S - 1) / 2 pairs above it count twice.
    diagonal = (weights[:, None] ** 2 * flat_vars.sqrt()).sum(0) * (2 * _INV_SQRT_PI)
    rows, cols = torch.triu_indices(num, num, offset=1, device=means.device)
    pair_w = (weights[rows] * weights[cols])[:, None]
    chunk = max(1, _PAIRWISE_BUDGET // max(1, rows.shape[0]))
    off_diagonal = []
    # The pairwise term is [pairs, points]: chunk over points to bound memory.
    for start in range(0, flat_means.shape[1], chunk):
        m = flat_means[:, start:start + chunk]
        v = flat_vars[:, start:start + chunk]
        a = _expected_abs_normal(m[rows] - m[cols], v[rows] + v[cols])
        off_diagonal.append(2 * (pair_w * a).sum(0))
    pairs = diagonal + torch.cat(off_diagonal)
    return spread - 0.5 * pairs.reshape(y.shape)


def crps_samples(samples: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS of the empirical distribution of S samples [S, *P] at y [*P], elementwise.

    E|X - y| - E|X - X'| / 2 with both expectations over the samples (the V-statistic,
    i.e. the exact CRPS of the empirical CDF); E|X - X'| comes from the sorted samples as
    (2 / S^2) sum_i (2i - S - 1) x_(i), in O(S log S) per point.
    """
    num = samples.shape[0]
    spread = (samples - y).abs().mean(0)
    ordered = torch.sort(samples, dim=0).values
    coef = 2 * torch.arange(1, num + 1, dtype=samples.dtype, device=samples.device) - num - 1
    coef = coef.reshape((num,) + (1,) * (samples.dim() - 1))
    pair = 2 * (coef * ordered).sum(0) / (num * num)
    return spread - 0.5 * pair


def crps_quadrature(pred: RegressionPredictive, y: torch.Tensor,
                    points: int = _QUADRATURE_POINTS) -> torch.Tensor:
    """CRPS of any regression predictive by quadrature of its CDF, elementwise.

    CRPS = int_{-inf}^{y} F(x)^2 dx + int_{y}^{inf} (1 - F(x))^2 dx, each side by
    composite Simpson on ``points`` (odd) nodes, the range cut at the 1e-7 and 1 - 1e-7 quantiles
    (what is cut off is below 1e-7 of the scale for light tails). For predictives with no
    closed form, such as isotonic-recalibrated ones.

    Args:
        pred: a float64 regression predictive; y: float64 targets of its mean's shape.

    Returns:
        CRPS, shape of ``y``.
    """
    bounds = pred.quantile([_QUADRATURE_TAIL, 1 - _QUADRATURE_TAIL]).to(y.dtype)
    lo, hi = torch.minimum(bounds[0], y), torch.maximum(bounds[1], y)
    # Composite Simpson weights (1, 4, 2, 4, ..., 4, 1) h / 3 on an odd number of nodes.
    weights = torch.full((points,), 2.0, dtype=torch.float64)
    weights[1::2] = 4.0
    weights[[0, -1]] = 1.0
    weights /= 3 * (points - 1)
    nodes = torch.linspace(0, 1, points, dtype=torch.float64)
    below = torch.zeros_like(y)
    above = torch.zeros_like(y)
    # One CDF call per node: a generic predictive's CDF only takes its own shape.
    for t, w in zip(nodes.tolist(), weights.tolist(), strict=True):
        below += w * pred.cdf(lo + (y - lo) * t).to(y.dtype) ** 2
        above += w * (1 - pred.cdf(y + (hi - y) * t).to(y.dtype)) ** 2
    return below * (y - lo) + above * (hi - y)


# --------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------


def regression_nll(pred: Any, y: Any, *, per_output: bool = False) -> float | list[float]:
    """Mean over points of -log p(y | x), summing over outputs (Gaussian or mixture).

    Args:
        pred: a Gaussian/Mixture predictive or a (mean, variance) pair, [N] or [N, D].
        y: targets, shape of the mean.
        per_output: return the mean NLL of each output's marginal, a list of D floats
            (they sum to the default value).
    """
    pred = _as_regression(pred)
    if not per_output:
        return float(-pred.log_prob(y).mean())
    return _reduce(-pred._log_prob_elementwise(pred._target(y, "y")), True)


def rmse(pred: Any, y: Any, *, per_output: bool = False) -> float | list[float]:
    """Root mean squared error of the predictive mean over all N * D entries.

    Args:
        pred: a regression predictive, a (mean, variance) pair, or the mean [N] / [N, D].
        y: targets, shape of the mean.
        per_output: return the RMSE of each output, a list of D floats.
    """
    if isinstance(pred, Predictive | tuple | list):
        mean = _as_regression(pred).mean
    else:
        mean = as_tensor(pred, "pred", dtype=torch.float64, ndim=(1, 2))
    squared = _reduce((mean - _match(y, mean, "y")) ** 2, per_output)
    return [v ** 0.5 for v in squared] if per_output else squared ** 0.5


def crps(pred: Any, y: Any, *, per_output: bool = False) -> float | list[float]:
    """Mean continuous ranked probability score (lower is better, >= 0).

    Exact where a closed form exists: for a Gaussian, for a Gaussian mixture (Grimit et
    al., 2006) and for raw samples (the empirical-CDF CRPS). Any other regression
    predictive (an isotonic-recalibrated one, say) is integrated numerically from its
    CDF by :func:`crps_quadrature`.

    Args:
        pred: a regression predictive, a (mean, variance) pair, or a raw
            tensor or array of predictive samples [S, N] or [S, N, D] (a tuple or list
            is always read as a (mean, variance) pair).
        y: targets [N] or [N, D].
        per_output: return the mean CRPS of each output, a list of D floats.

    Returns:
        CRPS averaged over all N * D entries, in the units of ``y``.
    """
    if not isinstance(pred, Predictive | tuple | list):
        samples = as_tensor(pred, "pred", dtype=torch.float64, ndim=(2, 3))
        target = _match(y, samples[0], "y")
        return _reduce(crps_samples(samples, target), per_output)
    pred = _as_regression(pred)
    target = pred._target(y, "y")
    if isinstance(pred, MixturePredictive):
        values = crps_mixture(pred.means, pred.variances, pred.weights.double(), target)
    elif isinstance(pred, GaussianPredictive):
        values = crps_gaussian(pred.mean, pred.variance, target)
    else:
        values = crps_quadrature(pred, target)
    return _reduce(values, per_output)


def _default_levels(device: torch.device) -> torch.Tensor:
    return torch.arange(1, 100, dtype=torch.float64, device=device) / 100


def regression_calibration_error(pred: Any, y: Any,
                                 levels: Sequence[float] | torch.Tensor | None = None, *,
                                 per_output: bool = False) -> float | list[float]:
    """Mean absolute gap between expected and observed quantile coverage.

    For each level p_j the observed frequency is the fraction of entries with
    F(y) <= p_j, where F is the predictive CDF (Kuleshov et al., 2018); the error is
    mean_j |p_j - observed_j| (absolute, not squared), in probability units: 0 for a
    calibrated predictive, below 1 always.

    Args:
        pred: a Gaussian/Mixture predictive or a (mean, variance) pair.
        y: targets, shape of the mean.
        levels: quantile levels in (0, 1) [Q]; default 0.01, 0.02, ..., 0.99.
        per_output: return the error of each output's PIT values, a list of D floats
            (the default pools the N * D PIT values).
    """
    pred = _as_regression(pred)
    pit = pred.cdf(y)
    if levels is None:
        p = _default_levels(pit.device)
    else:
        p = as_tensor(levels, "levels", dtype=torch.float64, device=pit.device).reshape(-1)
        if bool(((p <= 0) | (p >= 1)).any()):
            raise InputError(f"`levels` must lie in (0, 1), got {p.tolist()}")
    if not per_output:
        return _pit_error(pit.reshape(-1), p)
    columns = pit if pit.dim() == 2 else pit[:, None]
    return [_pit_error(columns[:, d], p) for d in range(columns.shape[1])]


def _pit_error(pit: torch.Tensor, p: torch.Tensor) -> float:
    """mean_j |p_j - fraction of PIT values [M] <= p_j|."""
    # Counts / M in float64 (int64 / int would give the default float32).
    observed = torch.searchsorted(torch.sort(pit).values, p, right=True).double() / pit.shape[0]
    return float((p - observed).abs().mean())


def _interval(lower: Any, upper: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # Infinite bounds are valid: split conformal returns them when the calibration set
    # is too small for the level (k > n). Only NaN is rejected.
    lo = as_tensor(lower, "lower", dtype=torch.float64, ndim=(1, 2), finite=False)
    hi = _match(upper, lo, "upper", finite=False)
    for name, bound in (("lower", lo), ("upper", hi)):
        if bool(bound.isnan().any()):
            raise InputError(f"`{name}` contains {int(bound.isnan().sum())} NaN value(s)")
    if bool((lo > hi).any()):
        count = int((lo > hi).sum())
        raise InputError(f"`lower` must not exceed `upper`; {count} interval(s) are reversed")
    return lo, hi


def interval_coverage(lower: Any, upper: Any, y: Any, *, per_output: bool = False,
                      joint: bool = False) -> float | list[float]:
    """Fraction of entries with lower <= y <= upper (closed intervals).

    Args:
        lower, upper: interval bounds [N] or [N, D] (e.g. from ``pred.interval(level)``).
        y: targets, same shape.
        per_output: return the coverage of each output, a list of D floats.
        joint: return the fraction of points whose D targets are all inside their
            intervals (what a joint conformal box guarantees).
    """
    if per_output and joint:
        raise InputError("pass `per_output=True` or `joint=True`, not both")
    lo, hi = _interval(lower, upper)
    target = _match(y, lo, "y")
    inside = ((lo <= target) & (target <= hi)).double()
    if joint:
        return float((inside if inside.dim() == 1 else inside.amin(1)).mean())
    return _reduce(inside, per_output)


def mean_interval_width(lower: Any, upper: Any, *,
                        per_output: bool = False) -> float | list[float]:
    """Mean of upper - lower over all entries.

    Args:
        lower, upper: interval bounds [N] or [N, D].
        per_output: return the mean width of each output, a list of D floats.
    """
    lo, hi = _interval(lower, upper)
    return _reduce(hi - lo, per_output)
