"""Conformal prediction: intervals and sets with finite-sample coverage.

* :class:`SplitConformalRegressor`: split conformal intervals (absolute, normalized and
  CQR scores); group-conditional (``groups=``), weighted under covariate shift
  (``weights=``) and joint multi-output (``joint="bonferroni" | "max"``) variants.
* :class:`ConformalClassifier`: prediction sets with the LAC, APS and RAPS scores,
  randomized or not; marginal, class-conditional (``conditional="class"``) or weighted.
* :class:`AdaptiveConformal`: adaptive conformal inference for a stream.
* :class:`DomainClassifierWeights`: likelihood-ratio weights from a domain classifier.

Every quantile keeps the exact rank k = ceil((n + 1)(1 - alpha)) of
:func:`conformal_rank` (see :mod:`bayesify.calibration.conformal._quantile`).
"""

from bayesify.calibration.conformal._quantile import (
    conformal_quantile,
    conformal_rank,
    weighted_conformal_quantile,
)
from bayesify.calibration.conformal.adaptive import AdaptiveConformal
from bayesify.calibration.conformal.classification import (
    CLASSIFICATION_SCORES,
    ConformalClassifier,
    classification_scores,
    mean_set_size,
    set_coverage,
)
from bayesify.calibration.conformal.regression import (
    REGRESSION_SCORES,
    SplitConformalRegressor,
    regression_scores,
)
from bayesify.calibration.conformal.shift import DomainClassifierWeights

__all__ = [
    "CLASSIFICATION_SCORES",
    "REGRESSION_SCORES",
    "AdaptiveConformal",
    "ConformalClassifier",
    "DomainClassifierWeights",
    "SplitConformalRegressor",
    "classification_scores",
    "conformal_quantile",
    "conformal_rank",
    "mean_set_size",
    "regression_scores",
    "set_coverage",
    "weighted_conformal_quantile",
]
