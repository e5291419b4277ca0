"""Split conformal prediction: intervals and sets with finite-sample coverage.

Given n held-out calibration scores s_1..s_n and a new exchangeable point, the k-th
smallest score with k = ceil((n + 1)(1 - alpha)) bounds the new score with probability
at least 1 - alpha (and at most 1 - alpha + 1 / (n + 1) without ties); when k > n no
finite bound does, and the interval or set is everything. ``k`` is computed with exact
rational arithmetic: a float ``alpha`` is read as its decimal value rounded to 12
significant digits (``0.1`` and ``1 - 0.9`` are both 1/10), so (n + 1)(1 - alpha)
landing on an integer never rounds up by one.

Scores (regression): ``"absolute"`` |y - mean|; ``"normalized"`` |y - mean| / std
(intervals adapt to each input's predictive spread); ``"cqr"`` (conformalized quantile
regression, Romano et al. 2019) max(q_lo - y, y - q_hi) with the predictive quantiles
at alpha/2 and 1 - alpha/2. Scores (classification): ``"lac"`` 1 - p_y (smallest sets
on average; Sadinle et al. 2019) and ``"aps"`` the probability mass of all classes
ranked at or above y (Romano et al. 2020), randomized or not.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from bayesify._validation import (
    as_tensor,
    check_choice,
    check_fraction,
    check_labels,
    check_same_length,
)
from bayesify.errors import InputError, NotFittedError
from bayesify.predictive import CategoricalPredictive, Predictive, RegressionPredictive

__all__ = [
    "ConformalClassifier",
    "SplitConformalRegressor",
    "conformal_quantile",
    "conformal_rank",
    "mean_set_size",
    "set_coverage",
]

REGRESSION_SCORES = ("absolute", "normalized", "cqr")
CLASSIFICATION_SCORES = ("lac", "aps")


# --------------------------------------------------------------------------------------
# The conformal quantile (pure functions)
# --------------------------------------------------------------------------------------


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


def conformal_quantile(scores: Any, alpha: Any) -> torch.Tensor:
    """The k-th smallest calibration score per column (``inf`` when k > n).

    Args:
        scores: calibration scores [n] or [n, D]; +inf is allowed, NaN is not.
        alpha: miscoverage level in (0, 1).

    Returns:
        The conformal quantile: a 0-d tensor for [n] scores, [D] for [n, D].
    """
    values = as_tensor(scores, "scores", ndim=(1, 2), finite=False)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    if bool(torch.isnan(values).any()):
        raise InputError(f"`scores` contains {int(torch.isnan(values).sum())} NaN value(s); "
                         "check the predictive (e.g. a zero standard deviation with the "
                         "normalized score) and the targets")
    k = conformal_rank(values.shape[0], alpha)
    if k > values.shape[0]:
        return torch.full(values.shape[1:], math.inf, dtype=values.dtype, device=values.device)
    return torch.kthvalue(values, k, dim=0).values


# --------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------


class _Conformal:
    def __init__(self, model: Any, alpha: Any, predict_kwargs: dict[str, Any] | None):
        if model is not None and not callable(getattr(model, "predict", None)):
            raise InputError(f"`model` must be a BayesianModel (anything with .predict(x) "
                             f"returning a Predictive) or None, got {type(model).__name__}")
        _exact_alpha(alpha)
        self.model = model
        self.alpha = alpha
        self.predict_kwargs = dict(predict_kwargs or {})
        self._scores: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self._scores is not None

    def _check_fitted(self, action: str) -> None:
        if self._scores is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call "
                                 f"`.fit(x_or_pred, y)` on held-out data before `.{action}`")

    def _predictive(self, x_or_pred: Any) -> Any:
        """The model's predictive at x, or ``x_or_pred`` itself without a model."""
        if self.model is not None:
            return self.model.predict(x_or_pred, **self.predict_kwargs)
        return x_or_pred

    def _alpha(self, alpha: Any) -> Any:
        if alpha is None:
            return self.alpha
        _exact_alpha(alpha)
        return alpha


# --------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------


def _residual_scale(pred: RegressionPredictive | torch.Tensor, score: str) -> torch.Tensor | None:
    """What residuals are divided by: the predictive std for "normalized", else nothing."""
    return pred.stddev if score == "normalized" else None


class SplitConformalRegressor(_Conformal):
    """Split conformal prediction intervals around any regression predictive.

    Args:
        model: a regression BayesianModel (called as ``model.predict(x)``), or ``None``
            to pass predictives (or, for the absolute score, point predictions [N] /
            [N, D]) to ``fit`` and ``predict_interval`` directly.
        score: ``"absolute"``, ``"normalized"`` or ``"cqr"`` (see the module docstring).
        alpha: default miscoverage; intervals cover with probability >= 1 - alpha.
        predict_kwargs: extra keyword arguments for ``model.predict`` (e.g. ``seed``).

    Multi-output predictives [N, D] get one quantile per output column.

    Example:
        >>> cp = SplitConformalRegressor(bm, score="normalized", alpha=0.1)
        >>> lower, upper = cp.fit(x_cal, y_cal).predict_interval(x_test)
    """

    def __init__(self, model: Any = None, score: str = "absolute", alpha: float = 0.1,
                 predict_kwargs: dict[str, Any] | None = None):
        super().__init__(model, alpha, predict_kwargs)
        self.score = check_choice(score, "score", REGRESSION_SCORES)
        self._cqr_cache: dict[Fraction, torch.Tensor] = {}

    def _regression(self, x_or_pred: Any, name: str) -> RegressionPredictive | torch.Tensor:
        pred = self._predictive(x_or_pred)
        if isinstance(pred, RegressionPredictive):
            return pred
        if isinstance(pred, Predictive):
            raise InputError(f"`{name}` must give a regression predictive, "
                             f"got a {type(pred).__name__}")
        if self.score != "absolute":
            raise InputError(f"`{name}` must be a regression predictive for the "
                             f"{self.score!r} score (point predictions only suit 'absolute')")
        return as_tensor(pred, name, ndim=(1, 2))

    def _scores_of(self, pred: RegressionPredictive | torch.Tensor, y: torch.Tensor,
                   alpha: Any) -> torch.Tensor:
        if self.score == "cqr":
            a = _exact_alpha(alpha)
            bounds = pred.quantile([float(a / 2), float(1 - a / 2)])
            return torch.maximum(bounds[0] - y, y - bounds[1])
        mean = pred.mean if isinstance(pred, RegressionPredictive) else pred
        scores = (y - mean).abs()
        scale = _residual_scale(pred, self.score)
        return scores if scale is None else scores / scale

    def fit(self, x_or_pred: Any, y: Any) -> SplitConformalRegressor:
        """Compute the calibration scores on held-out data.

        Args:
            x_or_pred: calibration inputs (with a model) or their predictive.
            y: calibration targets, shape of the predictive mean [n] or [n, D].

        Returns:
            ``self``.
        """
        pred = self._regression(x_or_pred, "x_or_pred")
        target = _targets(y, pred)
        self._pred, self._y = pred, target
        self._cqr_cache = {}
        scores = self._scores_of(pred, target, self.alpha)
        conformal_quantile(scores, self.alpha)  # validates n >= 1 and the absence of NaN
        self._scores = scores
        return self

    def quantile(self, alpha: Any = None) -> torch.Tensor:
        """The fitted conformal score quantile at ``alpha`` (0-d, or [D]; inf when k > n)."""
        self._check_fitted("quantile()")
        alpha = self._alpha(alpha)
        if self.score != "cqr":
            return conformal_quantile(self._scores, alpha)
        key = _exact_alpha(alpha)
        if key not in self._cqr_cache:  # CQR scores depend on alpha through the quantiles
            scores = self._scores_of(self._pred, self._y, alpha)
            self._cqr_cache[key] = conformal_quantile(scores, alpha)
        return self._cqr_cache[key]

    def predict_interval(self, x_or_pred: Any,
                         alpha: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Intervals holding a new target with probability >= 1 - alpha.

        Args:
            x_or_pred: test inputs (with a model) or their predictive.
            alpha: miscoverage level; the constructor's ``alpha`` when ``None``.

        Returns:
            ``(lower, upper)``, each of the predictive mean's shape; infinite when the
            calibration set is too small for this alpha (k > n).
        """
        self._check_fitted("predict_interval()")
        alpha = self._alpha(alpha)
        pred = self._regression(x_or_pred, "x_or_pred")
        q = self.quantile(alpha)
        if self.score == "cqr":
            a = _exact_alpha(alpha)
            bounds = pred.quantile([float(a / 2), float(1 - a / 2)])
            q = q.to(bounds)
            return bounds[0] - q, bounds[1] + q
        mean = pred.mean if isinstance(pred, RegressionPredictive) else pred
        scale = _residual_scale(pred, self.score)
        half = q.to(mean) if scale is None else q.to(mean) * scale
        # An infinite quantile means an unbounded interval, whatever the scale (0 * inf).
        half = torch.where(torch.isinf(q.to(mean)), torch.full_like(half, math.inf), half)
        return mean - half, mean + half


def _targets(y: Any, pred: RegressionPredictive | torch.Tensor) -> torch.Tensor:
    if isinstance(pred, RegressionPredictive):
        like = pred.mean
    else:
        like = pred
    target = as_tensor(y, "y", dtype=like.dtype if like.is_floating_point() else None,
                       device=like.device)
    if target.dim() == 2 and target.shape[1] == 1 and like.dim() == 1:
        target = target[:, 0]
    elif target.dim() == 1 and like.dim() == 2 and like.shape[1] == 1:
        target = target[:, None]
    check_same_length(x_or_pred=like, y=target)
    if target.shape != like.shape:
        raise InputError(f"`y` must have shape {list(like.shape)}, got {list(target.shape)}")
    return target


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def _ranked_mass(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class: the mass of classes ranked strictly above it, and its probability.

    Classes are ranked by descending probability, ties by class index, so the ranking
    is the same for calibration and test points.
    """
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_probs = probs.gather(-1, order)
    before_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    before = torch.empty_like(probs).scatter_(-1, order, before_sorted)
    return before, probs


def classification_scores(probs: torch.Tensor, score: str,
                          u: torch.Tensor | None = None) -> torch.Tensor:
    """Conformity scores of every class [N, C] (lower means more conforming).

    Args:
        probs: class probabilities [N, C].
        score: ``"lac"`` (1 - p_c) or ``"aps"``.
        u: per-point uniforms [N] for randomized APS (mass above + u p_c); ``None`` gives
            the non-randomized APS score (mass above + p_c).
    """
    if score == "lac":
        return 1 - probs
    before, p = _ranked_mass(probs)
    return before + (p if u is None else u[:, None] * p)


class ConformalClassifier(_Conformal):
    """Split conformal prediction sets for any classifier.

    Args:
        model: a classification BayesianModel (``model.predict(x)``), or ``None`` to
            pass CategoricalPredictives (or probabilities [N, C]) directly.
        score: ``"lac"`` or ``"aps"`` (see the module docstring).
        alpha: default miscoverage; sets hold the true label with probability >= 1 - alpha.
        randomized: for APS, add a uniform tie-breaker (exact coverage on average, may
            give empty sets); otherwise sets include every class whose cumulative mass
            up to and including it is within the quantile.
        generator: the source of the APS uniforms, for repeatable sets.
        predict_kwargs: extra keyword arguments for ``model.predict``.
    """

    def __init__(self, model: Any = None, score: str = "lac", alpha: float = 0.1,
                 randomized: bool = True, generator: torch.Generator | None = None,
                 predict_kwargs: dict[str, Any] | None = None):
        super().__init__(model, alpha, predict_kwargs)
        self.score = check_choice(score, "score", CLASSIFICATION_SCORES)
        self.randomized = bool(randomized)
        self.generator = generator

    def _probs(self, x_or_pred: Any, name: str) -> torch.Tensor:
        pred = self._predictive(x_or_pred)
        if isinstance(pred, CategoricalPredictive):
            return pred.probs
        if isinstance(pred, Predictive):
            raise InputError(f"`{name}` must give a CategoricalPredictive, "
                             f"got a {type(pred).__name__}")
        return CategoricalPredictive(as_tensor(pred, name, ndim=2)).probs

    def _uniforms(self, probs: torch.Tensor) -> torch.Tensor | None:
        if self.score != "aps" or not self.randomized:
            return None
        device = self.generator.device if self.generator is not None else probs.device
        return torch.rand(probs.shape[0], generator=self.generator, dtype=probs.dtype,
                          device=device).to(probs.device)

    def fit(self, x_or_pred: Any, y: Any) -> ConformalClassifier:
        """Compute the calibration scores of the true labels.

        Args:
            x_or_pred: calibration inputs (with a model) or their predictive / probs [n, C].
            y: true class indices [n].

        Returns:
            ``self``.
        """
        probs = self._probs(x_or_pred, "x_or_pred")
        labels = as_tensor(y, "y", device=probs.device)
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        check_same_length(x_or_pred=probs, y=labels)
        labels = check_labels(labels, "y", probs.shape[1])
        all_scores = classification_scores(probs, self.score, self._uniforms(probs))
        scores = all_scores.gather(1, labels[:, None])[:, 0]
        conformal_quantile(scores, self.alpha)
        self._scores = scores
        return self

    def quantile(self, alpha: Any = None) -> torch.Tensor:
        """The fitted conformal score quantile at ``alpha`` (0-d; inf when k > n)."""
        self._check_fitted("quantile()")
        return conformal_quantile(self._scores, self._alpha(alpha))

    def predict_set(self, x_or_pred: Any, alpha: Any = None) -> torch.Tensor:
        """Prediction sets as a boolean mask [N, C]: True where the class is in the set.

        Args:
            x_or_pred: test inputs (with a model) or their predictive / probs [N, C].
            alpha: miscoverage level; the constructor's ``alpha`` when ``None``.
        """
        self._check_fitted("predict_set()")
        q = self.quantile(alpha)
        probs = self._probs(x_or_pred, "x_or_pred")
        scores = classification_scores(probs, self.score, self._uniforms(probs))
        return scores <= q.to(scores)


def set_coverage(sets: Any, labels: Any) -> float:
    """Fraction of points whose true label is in its prediction set.

    Args:
        sets: boolean masks [N, C] from :meth:`ConformalClassifier.predict_set`.
        labels: true class indices [N].
    """
    mask = as_tensor(sets, "sets", ndim=2).bool()
    y = as_tensor(labels, "labels", device=mask.device).reshape(-1)
    check_same_length(sets=mask, labels=y)
    y = check_labels(y, "labels", mask.shape[1])
    return float(mask.gather(1, y[:, None]).double().mean())


def mean_set_size(sets: Any) -> float:
    """Average number of classes per prediction set [N, C] -> float."""
    return float(as_tensor(sets, "sets", ndim=2).double().sum(1).mean())
