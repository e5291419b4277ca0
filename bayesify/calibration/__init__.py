"""Calibration metrics and the one-call ``evaluate`` report.

>>> from bayesify import calibration
>>> calibration.expected_calibration_error(pred, y_test)      # a float
>>> print(calibration.evaluate(pred, y_test))                 # every metric that fits
"""

from bayesify.calibration.evaluate import EvaluationReport, evaluate
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
]
