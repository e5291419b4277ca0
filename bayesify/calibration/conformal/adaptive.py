"""Adaptive conformal inference (Gibbs & Candès 2021) for a stream of regression targets.

At step t the interval is the split-conformal one at level alpha_t, built from the
scores seen so far (or the last ``window`` of them); after y_t arrives,

    alpha_{t+1} = alpha_t + gamma (alpha - err_t),    err_t = 1 if y_t was missed,

so the level loosens after misses and tightens after hits. Whatever the data do
(drift, shifts, adversarial order), the long-run miss rate satisfies

    | (1/T) sum_t err_t - alpha | <= (max(alpha_1, 1 - alpha_1) + gamma) / (gamma T),

because alpha_t <= 0 gives an unbounded interval (never missed) and alpha_t >= 1 an
empty one (always missed). The quantile at 0 < alpha_t < 1 keeps the exact rank
k = ceil((n + 1)(1 - alpha_t)) of :func:`conformal_rank`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bayesify._validation import (
    as_tensor,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from bayesify.calibration.conformal._base import _Conformal
from bayesify.calibration.conformal._quantile import conformal_quantile
from bayesify.calibration.conformal.regression import _targets, regression_scores
from bayesify.errors import InputError, NotFittedError
from bayesify.predictive import Predictive, RegressionPredictive

__all__ = ["AdaptiveConformal"]

ADAPTIVE_SCORES = ("absolute", "normalized")


class AdaptiveConformal(_Conformal):
    """Adaptive conformal intervals for a stream: ``predict_interval`` then ``update(y_t)``.

    Args:
        model: a regression BayesianModel, or ``None`` to pass predictives (or point
            predictions for the absolute score).
        score: ``"absolute"`` or ``"normalized"``.
        alpha: the target miscoverage α (the long-run miss rate ACI steers to).
        gamma: the step size γ > 0; larger adapts faster, with a noisier level.
        window: keep only the last ``window`` scores (``None``: all of them).
        predict_kwargs: extra keyword arguments for ``model.predict``.

    ``fit(x_or_pred, y)`` is optional: it seeds the score set with calibration data;
    without it the intervals are unbounded until scores arrive. Targets are
    single-output [N]; a step may carry one point or a batch of N points sharing α_t.

    Example:
        >>> aci = AdaptiveConformal(alpha=0.1, gamma=0.01).fit(pred_cal, y_cal)
        >>> for pred_t, y_t in stream:
        ...     lower, upper = aci.predict_interval(pred_t)
        ...     aci.update(y_t)
    """

    def __init__(self, model: Any = None, score: str = "absolute", alpha: float = 0.1,
                 gamma: float = 0.005, window: int | None = None,
                 predict_kwargs: dict[str, Any] | None = None):
        super().__init__(model, alpha, predict_kwargs)
        self.score = check_choice(score, "score", ADAPTIVE_SCORES)
        self.gamma = check_positive_float(gamma, "gamma")
        self.window = None if window is None else check_positive_int(window, "window")
        self.alpha_t = float(alpha)
        #: α_t used at each step, and whether that step missed (the fraction missed).
        self.alpha_history: list[float] = []
        self.errors: list[float] = []
        self._pending: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    @property
    def is_fitted(self) -> bool:
        """Always ``True``: ACI may start without calibration scores."""
        return True

    @property
    def miss_rate(self) -> float:
        """The fraction of steps' targets that fell outside their interval so far."""
        return float(sum(self.errors) / len(self.errors)) if self.errors else math.nan

    def _regression(self, x_or_pred: Any) -> RegressionPredictive | torch.Tensor:
        pred = self._predictive(x_or_pred)
        if isinstance(pred, RegressionPredictive):
            mean = pred.mean
        elif isinstance(pred, Predictive):
            raise InputError(f"`x_or_pred` must give a regression predictive, got a "
                             f"{type(pred).__name__}")
        elif self.score != "absolute":
            raise InputError("`x_or_pred` must be a regression predictive for the "
                             "'normalized' score (point predictions only suit 'absolute')")
        else:
            pred = mean = as_tensor(pred, "x_or_pred", ndim=(1, 2))
        if mean.dim() != 1:
            raise InputError("AdaptiveConformal handles single-output targets [N]; got a "
                             f"predictive of shape {list(mean.shape)} (run one per output)")
        return pred

    def _add(self, scores: torch.Tensor) -> None:
        scores = scores.detach()
        merged = scores if self._scores is None else torch.cat([self._scores.to(scores),
                                                                 scores])
        if self.window is not None:
            merged = merged[-self.window:]
        self._scores = merged

    def fit(self, x_or_pred: Any, y: Any) -> AdaptiveConformal:
        """Seed the score set with calibration data (inputs or predictive [n], targets [n])."""
        pred = self._regression(x_or_pred)
        scores = regression_scores(pred, _targets(y, pred), self.score)
        conformal_quantile(scores, self.alpha)  # validates n >= 1 and the absence of NaN
        self._scores = None
        self._add(scores)
        return self

    def quantile(self, alpha: float | None = None) -> torch.Tensor:
        """The score quantile at level α_t (or ``alpha``): +inf for α <= 0 or too few
        scores, -inf (empty interval) for α >= 1."""
        level = self.alpha_t if alpha is None else float(alpha)
        dtype = torch.get_default_dtype() if self._scores is None else self._scores.dtype
        if level >= 1:
            return torch.tensor(-math.inf, dtype=dtype)
        if level <= 0 or self._scores is None:
            return torch.tensor(math.inf, dtype=dtype)
        return conformal_quantile(self._scores, level)

    def predict_interval(self, x_or_pred: Any,
                         alpha: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Intervals at the current level α_t for the next point(s) [N].

        Returns:
            ``(lower, upper)`` [N]; unbounded while α_t <= 0, empty (lower > upper)
            while α_t >= 1.
        """
        if alpha is not None:
            raise InputError("AdaptiveConformal sets its own level α_t; leave `alpha` out "
                             "(the target α is the constructor's)")
        pred = self._regression(x_or_pred)
        mean = pred.mean if isinstance(pred, RegressionPredictive) else pred
        q = self.quantile().to(mean)
        if self.score == "normalized":
            half = torch.where(torch.isinf(q), q.expand_as(mean), q * pred.stddev)
        else:
            half = q.expand_as(mean)
        lower, upper = mean - half, mean + half
        self._pending = (pred, lower, upper)
        return lower, upper

    def update(self, y: Any) -> AdaptiveConformal:
        """Observe the target(s) [N] of the last ``predict_interval`` and move α_t."""
        if self._pending is None:
            raise NotFittedError("call `.predict_interval(x_or_pred)` for this step before "
                                 "`.update(y)`")
        pred, lower, upper = self._pending
        target = _targets(y, pred)
        missed = ((target < lower) | (target > upper)).double().mean().item()
        self.alpha_history.append(self.alpha_t)
        self.errors.append(missed)
        self.alpha_t = self.alpha_t + self.gamma * (float(self.alpha) - missed)
        self._add(regression_scores(pred, target, self.score))
        self._pending = None
        return self
