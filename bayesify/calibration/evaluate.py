"""`evaluate(pred, y)`: every metric that fits the predictive's task, as one report."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from bayesify._validation import check_fraction, check_positive_int
from bayesify.calibration import classification_metrics as cls_metrics
from bayesify.calibration import regression_metrics as reg_metrics
from bayesify.errors import InputError
from bayesify.predictive import CategoricalPredictive, RegressionPredictive

__all__ = ["EvaluationReport", "evaluate"]

# Display order and one-line meaning of each key, per task.
_DESCRIPTIONS = {
    "classification": {
        "accuracy": "fraction of correct top-1 labels (higher is better)",
        "nll": "mean negative log probability of the label, nats",
        "ece": "expected calibration error, {n_bins} equal-width bins",
        "mce": "maximum calibration error over those bins",
        "ace": "adaptive ECE, {n_bins} equal-mass bins",
        "brier": "multi-class Brier score, in [0, 2]",
    },
    "regression": {
        "rmse": "root mean squared error of the mean",
        "nll": "mean negative log predictive density, nats",
        "crps": "continuous ranked probability score",
        "calibration_error": "mean |expected - observed| quantile coverage",
        "coverage": "fraction of targets inside the central {level:.0%} interval",
        "width": "mean width of the central {level:.0%} interval",
        "joint_coverage": "fraction of points with all outputs inside their intervals",
    },
}


def _describe(task: str, key: str, n_bins: int, level: float) -> str:
    """The meaning of ``key``; per-output keys ``"name[d]"`` say which output."""
    base, _, index = key.partition("[")
    meaning = _DESCRIPTIONS[task][base].format(n_bins=n_bins, level=level)
    return f"{meaning} (output {index[:-1]})" if index else meaning


class EvaluationReport(Mapping[str, float]):
    """Read-only mapping from metric name to value, printable as a table.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        num_points: N, the number of evaluated points.
        level: the interval level used for ``coverage``/``width``.
        n_bins: the number of bins used for ``ece``/``mce``/``ace``.
    """

    def __init__(self, task: str, metrics: Mapping[str, float], *, num_points: int,
                 level: float, n_bins: int):
        self.task = task
        self.num_points = num_points
        self.level = level
        self.n_bins = n_bins
        self._metrics = dict(metrics)

    def __getitem__(self, key: str) -> float:
        try:
            return self._metrics[key]
        except KeyError:
            known = ", ".join(self._metrics)
            raise KeyError(f"no metric {key!r} in this {self.task} report; it has {known}") \
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)

    def to_dict(self) -> dict[str, float]:
        """The metrics as a plain dict (a copy)."""
        return dict(self._metrics)

    def __str__(self) -> str:
        width = max(len(k) for k in self._metrics)
        lines = [f"{self.task} metrics on {self.num_points} points",
                 f"{'metric':<{width}}  {'value':>10}  meaning"]
        for key, value in self._metrics.items():
            meaning = _describe(self.task, key, self.n_bins, self.level)
            lines.append(f"{key:<{width}}  {value:>10.4f}  {meaning}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v:.4g}" for k, v in self._metrics.items())
        return f"EvaluationReport({self.task}: {body})"


def _classification(pred: CategoricalPredictive, y: Any, n_bins: int) -> dict[str, float]:
    probs, labels = cls_metrics._probs_and_labels(pred, y)
    confidence, correct = cls_metrics._top_label(probs, labels)
    ece = cls_metrics._calibration_error
    return {
        "accuracy": float(correct.mean()),
        "nll": cls_metrics.classification_nll(pred, labels),
        "ece": ece(confidence, correct, n_bins, "uniform", "mean"),
        "mce": ece(confidence, correct, n_bins, "uniform", "max"),
        "ace": ece(confidence, correct, n_bins, "quantile", "mean"),
        "brier": cls_metrics.brier_score(pred, labels),
    }


def _regression(pred: RegressionPredictive, y: Any, level: float,
                per_output: bool) -> dict[str, float]:
    pred = reg_metrics._as_regression(pred)
    target = pred._target(y, "y")
    lower, upper = pred.interval(level)
    metrics = {}
    for flag in (False, True) if per_output else (False,):
        values = {
            "rmse": reg_metrics.rmse(pred, target, per_output=flag),
            "nll": reg_metrics.regression_nll(pred, target, per_output=flag),
            "crps": reg_metrics.crps(pred, target, per_output=flag),
            "calibration_error": reg_metrics.regression_calibration_error(
                pred, target, per_output=flag),
            "coverage": reg_metrics.interval_coverage(lower, upper, target, per_output=flag),
            "width": reg_metrics.mean_interval_width(lower, upper, per_output=flag),
        }
        if not flag:
            metrics.update(values)
            if pred.num_outputs > 1:
                metrics["joint_coverage"] = reg_metrics.interval_coverage(
                    lower, upper, target, joint=True)
            continue
        for key, per in values.items():
            metrics.update({f"{key}[{d}]": v for d, v in enumerate(per)})
    return metrics


def evaluate(pred: CategoricalPredictive | RegressionPredictive, y: Any, *,
             level: float = 0.9, n_bins: int = 15,
             per_output: bool = False) -> EvaluationReport:
    """Every metric that fits the predictive's task, in one report.

    Classification (a CategoricalPredictive, ``y`` labels [N]): ``accuracy``, ``nll``,
    ``ece``, ``mce``, ``ace``, ``brier``. Regression (a Gaussian or mixture predictive,
    ``y`` targets of the mean's shape [N] or [N, D]): ``rmse``, ``nll``, ``crps``,
    ``calibration_error``, ``coverage`` and ``width`` of the central ``level`` interval,
    pooled over the D outputs, and with D > 1 ``joint_coverage`` (points with all D
    targets inside).

    Args:
        pred: the predictive to score.
        y: labels or targets.
        level: interval level in (0, 1) for coverage and width.
        n_bins: number of calibration bins for ECE, MCE and adaptive ECE.
        per_output: for regression, also each output's metrics as ``"rmse[0]"``,
            ``"rmse[1]"``, ... (after the pooled ones).

    Returns:
        An :class:`EvaluationReport` (a mapping name -> float; ``print`` shows a table).
    """
    level = check_fraction(level, "level")
    n_bins = check_positive_int(n_bins, "n_bins")
    if isinstance(pred, CategoricalPredictive):
        if per_output:
            raise InputError("`per_output` applies to regression predictives; a "
                             "classifier has one output")
        metrics, task = _classification(pred, y, n_bins), "classification"
    elif isinstance(pred, RegressionPredictive):
        metrics, task = _regression(pred, y, level, bool(per_output)), "regression"
    else:
        raise InputError(
            f"`pred` must be a CategoricalPredictive, GaussianPredictive or "
            f"MixturePredictive, got {type(pred).__name__}; wrap raw outputs first, e.g. "
            "CategoricalPredictive(probs) or GaussianPredictive(mean, variance)"
        )
    return EvaluationReport(task, metrics, num_points=len(pred), level=level, n_bins=n_bins)
