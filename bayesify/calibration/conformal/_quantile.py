"""The conformal quantile, plain and weighted, with exact rank arithmetic (pure functions).

Given n held-out calibration scores s_1..s_n and a new exchangeable point, the k-th
smallest score with k = ceil((n + 1)(1 - alpha)) bounds the new score with probability
at least 1 - alpha (and at most 1 - alpha + 1 / (n + 1) without ties); when k > n no
finite bound does, and the interval or set is everything. ``k`` is computed with exact
rational arithmetic: a float ``alpha`` is read as its decimal value rounded to 12
significant digits (``0.1`` and ``1 - 0.9`` are both 1/10), so (n + 1)(1 - alpha)
landing on an integer never rounds up by one.

Weighted split conformal (Tibshirani et al. 2019) replaces the empirical distribution
of the scores by the weighted one, with weight w(X_i) on s_i and w(x) on +inf for the
test point x. With all weights equal it gives exactly the plain quantile above: the
comparison "cumulative weight >= (1 - alpha) * total" is made as
``den * cumulative >= num * total`` with ``1 - alpha = num / den`` in integers.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from bayesify._validation import as_tensor, check_fraction, check_same_length
from bayesify.errors import InputError

__all__ = [
    "conformal_quantile",
    "conformal_rank",
    "weighted_conformal_quantile",
]


def _exact_alpha(alpha: Any) -> Fraction:
    """``alpha`` as an exact fraction in (0, 1); floats are read to 12 significant digits."""
    if isinstance(alpha, torch.Tensor | np.ndarray):
        alpha = alpha.item()
    if isinstance(alpha, Fraction):
        value = alpha
    elif isinstance(alpha, int | Decimal) and not isinstance(alpha, bool):
        value = Fraction(alpha)
    elif isinstance(alpha, np.floating):  # np.float32(0.1) prints as 0.1
        check_fraction(alpha, "alpha")
        value = Fraction(str(alpha))
    else:
        check_fraction(alpha, "alpha")
        # 12 significant digits: 1 - 0.9 (= 0.09999999999999998) is read as 0.1.
        value = Fraction(format(float(alpha), ".12g"))
    if not 0 < value < 1:
        raise InputError(f"`alpha` must lie in (0, 1), got {alpha!r}")
    return value


def conformal_rank(n: int, alpha: Any) -> int:
    """The rank k = ceil((n + 1)(1 - alpha)) of the conformal quantile, exactly.

    Args:
        n: number of calibration scores, >= 1.
        alpha: miscoverage level in (0, 1) (float, Fraction or Decimal).

    Returns:
        k in [1, n + 1]; k = n + 1 means the quantile is +infinity.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise InputError(f"the calibration set must hold at least 1 point, got n = {n!r}")
    return max(1, math.ceil((int(n) + 1) * (1 - _exact_alpha(alpha))))


def _float_scores(scores: Any, name: str = "scores") -> torch.Tensor:
    values = as_tensor(scores, name, ndim=(1, 2), finite=False)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    if bool(torch.isnan(values).any()):
        raise InputError(f"`{name}` contains {int(torch.isnan(values).sum())} NaN value(s); "
                         "check the predictive (e.g. a zero standard deviation with the "
                         "normalized score) and the targets")
    return values


def conformal_quantile(scores: Any, alpha: Any) -> torch.Tensor:
    """The k-th smallest calibration score per column (``inf`` when k > n).

    Args:
        scores: calibration scores [n] or [n, D]; +inf is allowed, NaN is not.
        alpha: miscoverage level in (0, 1).

    Returns:
        The conformal quantile: a 0-d tensor for [n] scores, [D] for [n, D].
    """
    values = _float_scores(scores)
    k = conformal_rank(values.shape[0], alpha)
    if k > values.shape[0]:
        return torch.full(values.shape[1:], math.inf, dtype=values.dtype, device=values.device)
    return torch.kthvalue(values, k, dim=0).values


def check_weights(weights: Any, name: str, *, device: torch.device | None = None,
                  positive_sum: bool = True) -> torch.Tensor:
    """Likelihood-ratio weights [N] as float64: finite, >= 0 (and a positive sum)."""
    w = as_tensor(weights, name, ndim=1, device=device)
    if w.dtype == torch.bool or w.is_complex():
        raise InputError(f"`{name}` must be real non-negative weights, got dtype {w.dtype}")
    w = w.to(torch.float64)
    if bool((w < 0).any()):
        raise InputError(f"`{name}` must be >= 0 (likelihood ratios dP_test/dP_cal), got a "
                         f"minimum of {float(w.min()):.4g}")
    if positive_sum and not float(w.sum()) > 0:
        raise InputError(f"`{name}` must have a positive sum; all {w.shape[0]} are zero")
    return w


def weighted_conformal_quantile(scores: Any, weights: Any, test_weights: Any,
                                alpha: Any) -> torch.Tensor:
    """Weighted split-conformal quantile per test point (Tibshirani et al. 2019).

    For a test point with weight w and calibration weights w_1..w_n (likelihood ratios
    w(x) = dP_test(x) / dP_cal(x)), the quantile is the smallest calibration score s_(j)
    whose cumulative weight reaches (1 - alpha)(w_1 + ... + w_n + w), and +inf when
    only the test point's own mass at +inf reaches it.

    Args:
        scores: calibration scores [n] or [n, D] (one quantile per column).
        weights: calibration weights [n], >= 0 with a positive sum.
        test_weights: test weights [N], >= 0.
        alpha: miscoverage level in (0, 1).

    Returns:
        Quantiles [N] (or [N, D]) in the scores' dtype; equal to
        :func:`conformal_quantile` for every point when all weights are equal integers.
    """
    values = _float_scores(scores)
    w_cal = check_weights(weights, "weights", device=values.device)
    w_test = check_weights(test_weights, "test_weights", device=values.device,
                           positive_sum=False)
    check_same_length(scores=values, weights=w_cal)
    level = 1 - _exact_alpha(alpha)
    num, den = level.numerator, level.denominator
    columns = values if values.dim() == 2 else values[:, None]  # [n, D]
    order = torch.argsort(columns, dim=0, stable=True)
    sorted_scores = columns.gather(0, order)
    cumulative = torch.cumsum(w_cal[order], dim=0)  # [n, D], float64
    total = w_cal.sum() + w_test  # [N]
    # den * cum_j >= num * total  <=>  cum_j / total >= 1 - alpha, exact for integer weights.
    sequence = (den * cumulative).T.contiguous()  # [D, n]
    targets = (num * total).expand(sequence.shape[0], -1).contiguous()  # [D, N]
    index = torch.searchsorted(sequence, targets, side="left")  # [D, N]
    n = columns.shape[0]
    found = index < n
    picked = sorted_scores.T.gather(1, index.clamp(max=n - 1))  # [D, N]
    quantile = torch.where(found, picked, torch.full_like(picked, math.inf)).T  # [N, D]
    return quantile if values.dim() == 2 else quantile[:, 0]
