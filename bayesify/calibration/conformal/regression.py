"""Split conformal intervals for regression: marginal, group-conditional, weighted, joint.

Scores: ``"absolute"`` |y - mean|; ``"normalized"`` |y - mean| / std (intervals adapt to
each input's predictive spread); ``"cqr"`` (conformalized quantile regression, Romano
et al. 2019) max(q_lo - y, y - q_hi) with the predictive quantiles at alpha/2 and
1 - alpha/2.

Multi-output targets [N, D] get one quantile per output (each output covers with
probability >= 1 - alpha) unless ``joint`` asks for a box that holds all D outputs at
once with probability >= 1 - alpha: ``"bonferroni"`` runs each output at alpha / D
(exact fractions, so the ranks stay exact); ``"max"`` takes the largest of the D
scores per point and calibrates that single score (tighter when outputs are
dependent; use it with the normalized or CQR score so that outputs are comparable).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from bayesify._validation import as_tensor, check_choice, check_same_length
from bayesify.calibration.conformal._base import Groups, _Conformal
from bayesify.calibration.conformal._quantile import (
    _exact_alpha,
    check_weights,
    conformal_quantile,
    weighted_conformal_quantile,
)
from bayesify.errors import InputError
from bayesify.predictive import Predictive, RegressionPredictive

__all__ = ["JOINT_OPTIONS", "REGRESSION_SCORES", "SplitConformalRegressor", "regression_scores"]

REGRESSION_SCORES = ("absolute", "normalized", "cqr")
JOINT_OPTIONS = ("bonferroni", "max")


def _cqr_bounds(pred: RegressionPredictive, alpha: Fraction) -> torch.Tensor:
    """Predictive quantiles at alpha/2 and 1 - alpha/2, stacked [2, N(, D)]."""
    return pred.quantile([float(alpha / 2), float(1 - alpha / 2)])


def regression_scores(pred: RegressionPredictive | torch.Tensor, y: torch.Tensor, score: str,
                      alpha: Any = None) -> torch.Tensor:
    """Nonconformity scores of targets y [N] or [N, D] (higher means less conforming).

    Args:
        pred: a regression predictive, or point predictions for the absolute score.
        y: targets of the predictive mean's shape.
        score: ``"absolute"``, ``"normalized"`` or ``"cqr"``.
        alpha: the miscoverage level whose predictive quantiles CQR uses.

    Returns:
        Scores of y's shape.
    """
    if score == "cqr":
        bounds = _cqr_bounds(pred, _exact_alpha(alpha))
        return torch.maximum(bounds[0] - y, y - bounds[1])
    mean = pred.mean if isinstance(pred, RegressionPredictive) else pred
    residual = (y - mean).abs()
    return residual / pred.stddev if score == "normalized" else residual


def _targets(y: Any, pred: RegressionPredictive | torch.Tensor) -> torch.Tensor:
    like = pred.mean if isinstance(pred, RegressionPredictive) else pred
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


class SplitConformalRegressor(_Conformal):
    """Split conformal prediction intervals around any regression predictive.

    Args:
        model: a regression BayesianModel (called as ``model.predict(x)``), or ``None``
            to pass predictives (or, for the absolute score, point predictions [N] /
            [N, D]) to ``fit`` and ``predict_interval`` directly.
        score: ``"absolute"``, ``"normalized"`` or ``"cqr"`` (see the module docstring).
        alpha: default miscoverage; intervals cover with probability >= 1 - alpha.
        predict_kwargs: extra keyword arguments for ``model.predict`` (e.g. ``seed``).
        joint: for multi-output targets [N, D]: ``None`` (one quantile per output, each
            output covered at 1 - alpha), ``"bonferroni"`` or ``"max"`` (all D outputs
            covered together with probability >= 1 - alpha).

    ``fit`` and ``predict_interval`` also take ``groups=`` (group-conditional, or
    Mondrian, intervals: one quantile per group, coverage >= 1 - alpha within every
    group) or ``weights=`` (weighted split conformal for covariate shift, Tibshirani
    et al. 2019: likelihood ratios dP_test/dP_cal of each point's input, e.g. from
    :class:`~bayesify.calibration.DomainClassifierWeights`).

    Example:
        >>> cp = SplitConformalRegressor(bm, score="normalized", alpha=0.1)
        >>> lower, upper = cp.fit(x_cal, y_cal).predict_interval(x_test)
    """

    def __init__(self, model: Any = None, score: str = "absolute", alpha: float = 0.1,
                 predict_kwargs: dict[str, Any] | None = None, *, joint: str | None = None):
        super().__init__(model, alpha, predict_kwargs)
        self.score = check_choice(score, "score", REGRESSION_SCORES)
        self.joint = None if joint is None else check_choice(joint, "joint", JOINT_OPTIONS)
        self._score_cache: dict[Fraction, torch.Tensor] = {}
        self._groups: Groups | None = None

    # ------------------------------------------------------------------ internals

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

    def _column_alpha(self, alpha: Any, outputs: int) -> Fraction:
        """The level each score column is calibrated at (alpha / D under Bonferroni)."""
        a = _exact_alpha(alpha)
        return a / outputs if self.joint == "bonferroni" else a

    def _outputs(self, values: torch.Tensor) -> int:
        return int(values.shape[1]) if values.dim() == 2 else 1

    def _scores_of(self, pred: RegressionPredictive | torch.Tensor, y: torch.Tensor,
                   alpha: Fraction) -> torch.Tensor:
        scores = regression_scores(pred, y, self.score, alpha)
        if self.joint == "max" and scores.dim() == 2:
            scores = scores.max(dim=1).values
        return scores

    def _calibration_scores(self, alpha: Any) -> tuple[torch.Tensor, Fraction]:
        a = self._column_alpha(alpha, self._outputs(self._y))
        if self.score != "cqr" or a == self._fit_alpha:
            return self._scores, a
        if a not in self._score_cache:  # CQR scores depend on alpha through the quantiles
            self._score_cache[a] = self._scores_of(self._pred, self._y, a)
        return self._score_cache[a], a

    # ------------------------------------------------------------------ public API

    def fit(self, x_or_pred: Any, y: Any, *, groups: Any = None,
            weights: Any = None) -> SplitConformalRegressor:
        """Compute the calibration scores on held-out data.

        Args:
            x_or_pred: calibration inputs (with a model) or their predictive.
            y: calibration targets, shape of the predictive mean [n] or [n, D].
            groups: optional integer group labels [n] for group-conditional intervals.
            weights: optional likelihood-ratio weights [n] (>= 0) of the calibration
                inputs for weighted conformal under covariate shift.

        Returns:
            ``self``.
        """
        if groups is not None and weights is not None:
            raise InputError("pass either `groups` (group-conditional) or `weights` "
                             "(covariate shift) to fit, not both")
        pred = self._regression(x_or_pred, "x_or_pred")
        target = _targets(y, pred)
        self._pred, self._y = pred, target
        self._score_cache = {}
        self._fit_alpha = self._column_alpha(self.alpha, self._outputs(target))
        scores = self._scores_of(pred, target, self._fit_alpha)
        conformal_quantile(scores, self._fit_alpha)  # validates n >= 1 and the absence of NaN
        n = int(scores.shape[0])
        self._groups = None if groups is None else Groups(groups, n, scores.device)
        self._weights = None
        if weights is not None:
            w = check_weights(weights, "weights", device=scores.device)
            check_same_length(x_or_pred=scores, weights=w)
            self._weights = w
        self._scores = scores
        return self

    @property
    def group_values(self) -> torch.Tensor | None:
        """The calibration groups' labels [G] (the row order of a grouped quantile)."""
        return None if self._groups is None else self._groups.values

    def quantile(self, alpha: Any = None, *, groups: Any = None,
                 weights: Any = None) -> torch.Tensor:
        """The fitted conformal score quantile at ``alpha`` (``inf`` when k > n).

        Returns:
            0-d, or [D] per output; fitted with groups: [G(, D)] in ``group_values``
            order, or [N(, D)] for test ``groups`` [N]; fitted with weights: [N(, D)] for
            the test ``weights`` [N].
        """
        self._check_fitted("quantile()")
        scores, a = self._calibration_scores(self._alpha(alpha))
        if self._weights is not None:
            w = self._test_weights(weights, None, scores.device)
            return weighted_conformal_quantile(scores, self._weights, w, a)
        self._test_weights(weights, None, scores.device)  # raises: weights without fit's
        if self._groups is None:
            if groups is not None:
                raise InputError("`groups` were given but not to `fit`; pass the "
                                 "calibration groups to fit(..., groups=...) too")
            return conformal_quantile(scores, a)
        table = torch.stack([conformal_quantile(scores[self._groups.members(g)], a)
                             for g in range(self._groups.num_groups)])
        if groups is None:
            return table
        return table[self._groups.lookup(groups)]

    def predict_interval(self, x_or_pred: Any, alpha: Any = None, *, groups: Any = None,
                         weights: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Intervals holding a new target with probability >= 1 - alpha.

        Args:
            x_or_pred: test inputs (with a model) or their predictive.
            alpha: miscoverage level; the constructor's ``alpha`` when ``None``.
            groups: the test points' group labels [N]; required when fitted with groups.
            weights: the test points' likelihood ratios [N]; required when fitted with
                weights.

        Returns:
            ``(lower, upper)``, each of the predictive mean's shape; infinite when the
            calibration set (or group) is too small for this alpha (k > n).
        """
        self._check_fitted("predict_interval()")
        alpha = self._alpha(alpha)
        pred = self._regression(x_or_pred, "x_or_pred")
        mean = pred.mean if isinstance(pred, RegressionPredictive) else pred
        n = int(mean.shape[0])
        if self._groups is not None:
            if groups is None:
                raise InputError("this conformal regressor was fitted with `groups`; pass "
                                 "the test points' group labels as `groups=` [N] too")
            self._groups.lookup(groups, n)  # one label per test point
        if self._weights is not None:
            self._test_weights(weights, n, mean.device)
        q = self.quantile(alpha, groups=groups, weights=weights)
        per_point = self._groups is not None or self._weights is not None
        if per_point and q.dim() == 1 and mean.dim() == 2:
            q = q[:, None]  # one joint ("max") quantile per point, for every output
        if self.score == "cqr":
            bounds = _cqr_bounds(pred, self._column_alpha(alpha, self._outputs(mean)))
            q = q.to(bounds)
            return bounds[0] - q, bounds[1] + q
        scale = pred.stddev if self.score == "normalized" else None
        q = q.to(mean)
        half = q if scale is None else q * scale
        # An infinite quantile means an unbounded interval, whatever the scale (0 * inf).
        half = torch.where(torch.isinf(q), torch.full_like(half, math.inf), half)
        return mean - half, mean + half

