"""Isotonic recalibration for classifiers (top-label) and regressors (the CDF).

Raw classification inputs are read as **probabilities** ([N, C], or [N] probabilities
of class 1), unlike the logit-scaling recalibrators; regression inputs are predictives
or ``(mean, variance)`` pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from bayesify._validation import (
    as_tensor,
    check_choice,
    check_positive_int,
    check_probabilities,
)
from bayesify.calibration._recalibrated import RecalibratedPredictive
from bayesify.calibration.recalibration import (
    VarianceScaling,
    _float,
    _labels,
    _Recalibrator,
    _regression,
    scale_predictive,
)
from bayesify.errors import InputError
from bayesify.predictive import (
    CategoricalPredictive,
    GaussianPredictive,
    MixturePredictive,
    Predictive,
    RegressionPredictive,
)

__all__ = ["IsotonicRecalibration", "redistribute_top_label"]


def _probabilities(value: Any, name: str) -> CategoricalPredictive:
    """A CategoricalPredictive from a predictive, probabilities [N, C] or binary [N]."""
    if isinstance(value, CategoricalPredictive):
        return value
    if isinstance(value, Predictive):
        raise InputError(f"`{name}` must be a CategoricalPredictive or probabilities, "
                         f"got a {type(value).__name__}")
    probs = _float(as_tensor(value, name, ndim=(1, 2)))
    if probs.dim() == 1:  # binary: probabilities of class 1
        probs = torch.stack([1 - probs, probs], dim=-1)
    check_probabilities(probs, name)
    return CategoricalPredictive(probs)


def redistribute_top_label(probs: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Set each row's top probability to ``confidence`` [N], rescaling the others.

    The remaining mass 1 - confidence goes to the other classes in proportion to their
    current probabilities (uniformly when they are all zero), so rows sum to one. The new
    confidence is raised where needed so the top class stays the (first) argmax.

    Args:
        probs: class probabilities [N, C], C >= 2.
        confidence: new top-label probabilities [N] in [0, 1].

    Returns:
        Probabilities [N, C].
    """
    top = probs.argmax(-1, keepdim=True)
    others = probs.scatter(1, top, 0.0)
    mass = others.sum(-1, keepdim=True)
    uniform = torch.ones_like(probs).scatter(1, top, 0.0) / (probs.shape[1] - 1)
    share = torch.where(mass > 0, others / mass.clamp_min(torch.finfo(probs.dtype).tiny),
                        uniform)
    # The top stays largest iff conf >= w_max (1 - conf), i.e. conf >= w_max / (1 + w_max).
    # A relative margin of a few ulps keeps the top strictly ahead after rounding.
    w_max = share.max(-1).values
    bound = (w_max / (1 + w_max) * (1 + 16 * torch.finfo(probs.dtype).eps)).clamp_max(1)
    confidence = torch.maximum(confidence.to(probs.dtype), bound)
    return (share * (1 - confidence)[:, None]).scatter(1, top, confidence[:, None])


class IsotonicRecalibration(_Recalibrator):
    """Isotonic-regression recalibration for classifiers and regressors.

    * Classification: scikit-learn's isotonic regression of top-label correctness on
      top-label confidence. The transformed predictive has that recalibrated confidence
      for its top class, and the remaining mass spread over the other classes in
      proportion to their probabilities, so rows sum to one and the argmax is kept.
      Per-sample probabilities are dropped (the map is fitted on the average).
    * Regression (Kuleshov et al., 2018): isotonic regression of the observed frequency
      P(F(Y) <= u) on the predicted CDF value u = F(y). The transformed predictive is a
      :class:`~bayesify.calibration.RecalibratedPredictive` with CDF R(F(y)); its
      ``quantile``/``interval``/``cdf``/``log_prob``/``mean``/``variance`` all follow
      exactly from the piecewise-linear R.

    Args:
        max_knots: most knots kept in the regression map R (taken evenly from the
            fitted map, so its resolution is about 1 / max_knots in probability). More
            knots cost time when computing mean and variance of mixture predictives.
        prescale: for regression, first stretch the predictive by the NLL-optimal factor
            of :class:`VarianceScaling`, then fit R on the stretched predictive's CDF.
            R alone can fix any monotone miscalibration in exact arithmetic, but a
            predictive many times too narrow puts targets where its CDF rounds to 1 in
            float64 (beyond 8.2 standard deviations), and no map of those values can
            recover the upper tail; the stretch keeps the CDF values resolvable.
            ``True`` (or ``"shared"``) uses one factor, ``"per_output"`` one per output
            of a [N, D] predictive, ``False`` none.

    Multi-output predictives [N, D] get one map R fitted on the PIT values of all
    N * D entries (outputs are exchangeable after a per-output prescale); the
    recalibrated predictive applies it to every output.
    """

    def __init__(self, max_knots: int = 256, prescale: bool | str = True):
        self.max_knots = check_positive_int(max_knots, "max_knots", minimum=2)
        if prescale is True or prescale is False:
            prescale = "shared" if prescale else "none"
        self.prescale = check_choice(prescale, "prescale", ("shared", "per_output", "none"))
        self._scale: float | torch.Tensor | None = None

    def _stretch(self, pred: RegressionPredictive) -> RegressionPredictive:
        if self._scale is None or not isinstance(pred, GaussianPredictive | MixturePredictive):
            return pred
        return scale_predictive(pred, self._scale)

    def fit(self, pred: Any, y: Any) -> IsotonicRecalibration:
        """Fit on held-out predictions.

        Args:
            pred: a CategoricalPredictive, probabilities [N, C] or binary [N]
                (classification); or a Gaussian/Mixture predictive or (mean, variance)
                pair (regression).
            y: class indices [N], or regression targets of the mean's shape.

        Returns:
            ``self``.
        """
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        if isinstance(pred, RegressionPredictive | tuple | list):
            self.task = "regression"
            reg = _regression(pred, "pred")
            self._scale = None
            if self.prescale != "none" and isinstance(reg, GaussianPredictive |
                                                      MixturePredictive):
                per_output = self.prescale == "per_output"
                self._scale = VarianceScaling(per_output=per_output).fit(reg, y).scale
            pit = self._stretch(reg).cdf(y).detach().double().reshape(-1).cpu()
            self._knots = _cdf_map(iso, pit, self.max_knots)
        else:
            self.task = "classification"
            cat = _probabilities(pred, "pred")
            labels = _labels(y, cat.num_points, cat.num_classes, cat.probs.device)
            correct = (cat.labels == labels).double().cpu().numpy()
            iso.fit(cat.confidence.detach().double().cpu().numpy(), correct)
            self._iso = iso
        self._fitted = True
        return self

    def transform(self, pred: Any) -> Predictive:
        """Recalibrate a predictive of the task the map was fitted on.

        Args:
            pred: as for :meth:`fit`.

        Returns:
            A CategoricalPredictive, or for regression a RecalibratedPredictive whose
            ``base`` is the (prescaled) input.
        """
        self._check_fitted()
        regression = isinstance(pred, RegressionPredictive | tuple | list)
        if regression != (self.task == "regression"):
            raise InputError(f"`pred` must be a {self.task} predictive: the map was fitted "
                             f"on {self.task}")
        if regression:
            return RecalibratedPredictive(self._stretch(_regression(pred, "pred")),
                                          *self._knots)
        cat = _probabilities(pred, "pred")
        confidence = self._iso.predict(cat.confidence.detach().double().cpu().numpy())
        confidence = torch.as_tensor(confidence, device=cat.probs.device)
        return CategoricalPredictive(redistribute_top_label(cat.probs, confidence))


def _cdf_map(iso: Any, pit: torch.Tensor,
             max_knots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots (u [K], p [K]) of the isotonic map from PIT values to observed frequencies."""
    n = pit.shape[0]
    pit = pit.clamp(0, 1)
    # Kuleshov et al.: the target of u_i is the fraction of calibration PITs <= u_i.
    target = torch.searchsorted(torch.sort(pit).values, pit, right=True).double() / n
    x = torch.cat([pit.new_zeros(1), pit, pit.new_ones(1)]).numpy()
    t = torch.cat([target.new_zeros(1), target, target.new_ones(1)]).numpy()
    iso.fit(x, t)
    u = torch.as_tensor(iso.X_thresholds_, dtype=torch.float64)
    p = torch.as_tensor(iso.y_thresholds_, dtype=torch.float64)
    if u.shape[0] > max_knots:
        keep = torch.unique(torch.linspace(0, u.shape[0] - 1, max_knots).round().long())
        u, p = u[keep], p[keep]
    # The ends are (0, 0) and (1, 1) already (targets rise with u); pin them exactly.
    p = p.clone()
    p[0], p[-1] = 0.0, 1.0
    return u, p
