"""All calibration metrics in one namespace, with the task-dispatching NLL.

The classification metrics live in :mod:`.classification_metrics`, the regression ones
in :mod:`.regression_metrics`; this module re-exports both and adds
:func:`negative_log_likelihood`, which serves either task.
"""

from __future__ import annotations

from typing import Any

from bayesify.calibration.classification_metrics import (
    CalibrationBins,
    accuracy,
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    classification_nll,
    expected_calibration_error,
    maximum_calibration_error,
)
from bayesify.calibration.regression_metrics import (
    crps,
    interval_coverage,
    mean_interval_width,
    regression_calibration_error,
    regression_nll,
    rmse,
)
from bayesify.errors import InputError
from bayesify.predictive import RegressionPredictive

__all__ = [
    "CalibrationBins",
    "accuracy",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "classification_nll",
    "crps",
    "expected_calibration_error",
    "interval_coverage",
    "maximum_calibration_error",
    "mean_interval_width",
    "negative_log_likelihood",
    "regression_calibration_error",
    "regression_nll",
    "rmse",
]


def negative_log_likelihood(pred: Any, y: Any, *,
                            per_output: bool = False) -> float | list[float]:
    """Mean negative log predictive density/probability of ``y``, in nats.

    Dispatches on ``pred``: a GaussianPredictive, MixturePredictive or a
    ``(mean, variance)`` pair is scored by :func:`regression_nll` (log density summed
    over outputs, averaged over points; ``per_output=True`` gives each output's, a list
    of D floats); a CategoricalPredictive or probabilities [N, C] by
    :func:`classification_nll` with ``y`` the class labels [N].
    """
    if isinstance(pred, RegressionPredictive | tuple | list):
        return regression_nll(pred, y, per_output=per_output)
    if per_output:
        raise InputError("`per_output` applies to regression predictives; a classifier "
                         "has one output")
    return classification_nll(pred, y)
