"""Calibration metrics and the one-call ``evaluate`` report.

>>> from bayesify import calibration
>>> calibration.expected_calibration_error(pred, y_test)      # a float
>>> print(calibration.evaluate(pred, y_test))                 # every metric that fits
"""

from bayesify.calibration._recalibrated import RecalibratedPredictive
from bayesify.calibration.conformal import (
    AdaptiveConformal,
    ConformalClassifier,
    DomainClassifierWeights,
    SplitConformalRegressor,
    conformal_quantile,
    conformal_rank,
    mean_set_size,
    set_coverage,
    weighted_conformal_quantile,
)
from bayesify.calibration.evaluate import EvaluationReport, evaluate
from bayesify.calibration.isotonic import IsotonicRecalibration
from bayesify.calibration.metrics import (
    CalibrationBins,
    accuracy,
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    crps,
    expected_calibration_error,
    interval_coverage,
    maximum_calibration_error,
    mean_interval_width,
    negative_log_likelihood,
    regression_calibration_error,
    rmse,
)
from bayesify.calibration.plots import (
    calibration_curve_plot,
    interval_plot,
    observed_coverage,
    reliability_diagram,
)
from bayesify.calibration.recalibration import (
    TemperatureScaling,
    VarianceScaling,
    VectorScaling,
)

__all__ = [
    "CalibrationBins",
    "EvaluationReport",
    "accuracy",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "crps",
    "evaluate",
    "expected_calibration_error",
    "interval_coverage",
    "maximum_calibration_error",
    "mean_interval_width",
    "negative_log_likelihood",
    "regression_calibration_error",
    "rmse",
    # recalibration, conformal prediction, plots
    "AdaptiveConformal",
    "ConformalClassifier",
    "DomainClassifierWeights",
    "IsotonicRecalibration",
    "RecalibratedPredictive",
    "SplitConformalRegressor",
    "TemperatureScaling",
    "VarianceScaling",
    "VectorScaling",
    "calibration_curve_plot",
    "conformal_quantile",
    "conformal_rank",
    "interval_plot",
    "mean_set_size",
    "observed_coverage",
    "reliability_diagram",
    "set_coverage",
    "weighted_conformal_quantile",
]
