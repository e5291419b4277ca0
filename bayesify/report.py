"""`bayesify report`: pretrain a small MLP on embedded data, wrap it with each method, and
tabulate calibration, OOD and interval quality side by side.

Every method starts from the same pretrained network (the deterministic row *is* that
network), so differences in the table come from the method, not from the training run.
Each method runs with the settings of :mod:`bayesify.report_settings`. Beside each method a
recalibrated row (temperature scaling for classifiers, variance scaling for regressors,
fitted on the validation split) shows what post-hoc calibration adds, and conformal
coverage/size columns show what a split-conformal wrapper guarantees. For classifiers,
a feature-space detector (Mahalanobis, fitted on the training split through the wrapped
model) sits beside the method's own OOD score, and class-conditional conformal sets
report the coverage of their worst class.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bayesify import calibration, ood
from bayesify.core import BayesianModel, available_methods, bayesify
from bayesify.data import ClassificationData, RegressionData, load
from bayesify.errors import InputError, JitterWarning, UnsupportedModelError
from bayesify.predictive import CategoricalPredictive, Predictive
from bayesify.report_settings import report_settings

__all__ = ["ReportRow", "format_table", "run_report"]

CLASSIFICATION_COLUMNS = (
    ("accuracy", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"),
    ("ood_auroc", "OOD AUROC"), ("fpr95", "FPR95"), ("maha_auroc", "Maha AUROC"),
    ("corrupt_nll", "NLL corrupt"), ("corrupt_ece", "ECE corrupt"),
    ("set_coverage", "conf cov90"), ("set_size", "conf size"),
    ("class_coverage", "class cov90 min"), ("fit_s", "fit s"), ("predict_s", "predict s"),
)
REGRESSION_COLUMNS = (
    ("rmse", "RMSE"), ("nll", "NLL"), ("crps", "CRPS"), ("coverage", "cov90"),
    ("width", "width90"), ("conformal_coverage", "conf cov90"),
    ("conformal_width", "conf width90"), ("fit_s", "fit s"), ("predict_s", "predict s"),
)
_LEVEL = 0.9


@dataclass
class ReportRow:
    """One table row: a method (or its recalibrated version) and its metrics."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def format_table(rows: Sequence[ReportRow], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown pipe table (readable in a terminal too) of ``rows`` over ``columns``."""
    header = ["method", *[title for _, title in columns]]
    lines = [header]
    for row in rows:
        if row.error is not None:
            lines.append([row.name, f"failed: {row.error}"] + [""] * (len(columns) - 1))
            continue
        cells = [row.name]
        for key, _ in columns:
            value = row.metrics.get(key)
            cells.append("-" if value is None else f"{value:.4f}" if abs(value) < 1000
                         else f"{value:.3g}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _mlp(d_in: int, d_out: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, d_out))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _wrap_and_fit(method: str, base: nn.Module, task: str, train: tuple, seed: int
                  ) -> tuple[BayesianModel, float]:
    settings = report_settings(method, task)
    bm = bayesify(copy.deepcopy(base), method, task=task, **settings.get("options", {}))
    fit_args = settings.get("fit", {})
    if fit_args is None:
        return bm, 0.0
    _, seconds = _timed(lambda: bm.fit(train, progress=False, seed=seed, **fit_args))
    return bm, seconds


def _classification_metrics(bm: BayesianModel, d: ClassificationData, seed: int
                            ) -> tuple[dict[str, float], dict[str, Predictive]]:
    test, predict_s = _timed(lambda: bm.predict(d.X_test, seed=seed))
    preds = {"test": test, "val": bm.predict(d.X_val, seed=seed),
             "ood": bm.predict(d.X_ood, seed=seed),
             "corrupted": bm.predict(d.X_corrupted, seed=seed)}
    metrics = _classification_scores(preds, d)
    metrics["predict_s"] = predict_s
    auroc = _mahalanobis_auroc(bm, d)
    if auroc is not None:
        metrics["maha_auroc"] = auroc
    return metrics, preds


def _mahalanobis_auroc(bm: BayesianModel, d: ClassificationData) -> float | None:
    """AUROC of the Mahalanobis detector on the wrapped model's head features (test vs
    held-out classes), or ``None`` when the method leaves no final Linear to read."""
    try:
        with warnings.catch_warnings():
            # Dead ReLU units make the tied covariance of head features singular; the
            # shared Cholesky's jitter (about 1e-9 of its scale) is the expected remedy.
            warnings.simplefilter("ignore", JitterWarning)
            detector = ood.Mahalanobis().fit(bm, (d.X_train, d.y_train))
    except UnsupportedModelError:  # ssvi and vi replace the Linear layers
        return None
    return ood.evaluate(detector.score(d.X_test), detector.score(d.X_ood))["auroc"]


def _worst_class_coverage(sets: torch.Tensor, labels: Any) -> float:
    """The smallest, over the classes present in ``labels`` [N], of the fraction of that
    class's points whose label is in its set (``sets`` [N, C] boolean)."""
    y = torch.as_tensor(labels, device=sets.device).long()
    covered = sets.gather(1, y[:, None])[:, 0].double()
    counts = torch.bincount(y, minlength=sets.shape[1]).double()
    hits = torch.bincount(y, weights=covered, minlength=sets.shape[1])
    present = counts > 0
    return float((hits[present] / counts[present]).min())


def _ood_kind(pred: Predictive) -> str:
    # A method-specific score (VBLL's feature density) beats the generic one when present.
    return next(iter(pred.scores), "max_prob")


def _classification_scores(preds: dict[str, Predictive], d: ClassificationData
                           ) -> dict[str, float]:
    metrics = dict(calibration.evaluate(preds["test"], d.y_test))
    kind = _ood_kind(preds["test"])
    detection = ood.evaluate(ood.score(preds["test"], kind), ood.score(preds["ood"], kind))
    metrics["ood_auroc"] = detection["auroc"]
    metrics["fpr95"] = detection["fpr95"]
    metrics["corrupt_nll"] = calibration.negative_log_likelihood(preds["corrupted"], d.y_test)
    metrics["corrupt_ece"] = calibration.expected_calibration_error(preds["corrupted"], d.y_test)
    sets = calibration.ConformalClassifier(score="lac", alpha=1 - _LEVEL)
    mask = sets.fit(preds["val"], d.y_val).predict_set(preds["test"])
    metrics["set_coverage"] = calibration.set_coverage(mask, d.y_test)
    metrics["set_size"] = calibration.mean_set_size(mask)
    by_class = calibration.ConformalClassifier(score="lac", alpha=1 - _LEVEL,
                                               conditional="class")
    mask = by_class.fit(preds["val"], d.y_val).predict_set(preds["test"])
    metrics["class_coverage"] = _worst_class_coverage(mask, d.y_test)
    return metrics


def _regression_metrics(bm: BayesianModel, d: RegressionData, seed: int
                        ) -> tuple[dict[str, float], dict[str, Predictive]]:
    test, predict_s = _timed(lambda: bm.predict(d.X_test, seed=seed))
    preds = {"test": test, "val": bm.predict(d.X_val, seed=seed)}
    metrics = _regression_scores(preds, d)
    metrics["predict_s"] = predict_s
    return metrics, preds


def _regression_scores(preds: dict[str, Predictive], d: RegressionData) -> dict[str, float]:
    metrics = dict(calibration.evaluate(preds["test"], d.y_test, level=_LEVEL))
    conformal = calibration.SplitConformalRegressor(score="normalized", alpha=1 - _LEVEL)
    lower, upper = conformal.fit(preds["val"], d.y_val).predict_interval(preds["test"])
    metrics["conformal_coverage"] = calibration.interval_coverage(lower, upper, d.y_test)
    metrics["conformal_width"] = calibration.mean_interval_width(lower, upper)
    return metrics


def _recalibrated(preds: dict[str, Predictive], d: ClassificationData | RegressionData
                  ) -> dict[str, float]:
    if isinstance(preds["test"], CategoricalPredictive):
        scaler = calibration.TemperatureScaling().fit(preds["val"], d.y_val)
        return _classification_scores({k: scaler.transform(v) for k, v in preds.items()}, d)
    scaler = calibration.VarianceScaling().fit(preds["val"], d.y_val)
    return _regression_scores({k: scaler.transform(v) for k, v in preds.items()}, d)


@dataclass
class TaskReport:
    """The rows of one data set's table, its predictives (for plots) and its columns."""

    data: str
    task: str
    rows: list[ReportRow]
    predictives: dict[str, Predictive]
    columns: Sequence[tuple[str, str]]
    dataset: ClassificationData | RegressionData

    def table(self) -> str:
        return format_table(self.rows, self.columns)


def run_task(name: str, methods: Sequence[str] | None, *, seed: int = 0, epochs: int = 30,
             progress: bool = True) -> TaskReport:
    """Pretrain, wrap with every method, and evaluate on one embedded data set."""
    d = load(name, seed=seed)
    task = d.task
    usable = [m for m in available_methods(task)
              if report_settings(m, task) is not None]
    wanted = usable if methods is None else [m for m in methods if m in usable]
    if not wanted:
        raise InputError(f"`methods` has none usable for {name} ({task}); "
                         f"available: {', '.join(usable)}")
    train = (d.X_train, d.y_train)
    if task == "classification":
        base = _mlp(d.X_train.shape[1], d.num_classes, 128, seed)
        evaluate_fn, columns = _classification_metrics, CLASSIFICATION_COLUMNS
    else:
        # Small enough (about 1.2k weights) for full-batch HMC in seconds.
        base = _mlp(d.X_train.shape[1], 1, 32, seed)
        evaluate_fn, columns = _regression_metrics, REGRESSION_COLUMNS
    deterministic = bayesify(base, "deterministic", task=task)
    _, pretrain_s = _timed(lambda: deterministic.fit(train, epochs=epochs, lr=3e-3,
                                                     progress=False, seed=seed))
    rows: list[ReportRow] = []
    predictives: dict[str, Predictive] = {}
    bar = tqdm(wanted, desc=f"report {name}", disable=not progress, leave=False)
    for method in bar:
        bar.set_postfix(method=method)
        try:
            if method == "deterministic":
                bm, fit_s = deterministic, pretrain_s
            else:
                bm, fit_s = _wrap_and_fit(method, base, task, train, seed)
            metrics, preds = evaluate_fn(bm, d, seed)
        except Exception as exc:  # one broken method must not hide the others' rows
            traceback.print_exc()
            rows.append(ReportRow(method, error=f"{type(exc).__name__}: {exc}"[:120]))
            continue
        metrics["fit_s"] = fit_s
        rows.append(ReportRow(method, metrics))
        recalibrated = _recalibrated(preds, d)
        scaler = "TS" if task == "classification" else "VS"
        rows.append(ReportRow(f"{method} + {scaler}", recalibrated))
        predictives[method] = preds["test"]
    return TaskReport(name, task, rows, predictives, columns, d)


def _figure(report: TaskReport, path: Path) -> None:
    import matplotlib.pyplot as plt

    d = report.dataset
    names = list(report.predictives)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pred = report.predictives[name]
        if report.task == "classification":
            calibration.reliability_diagram(pred, d.y_test, ax=ax)
        else:
            calibration.calibration_curve_plot(pred, d.y_test, ax=ax)
        ax.set_title(f"{name}\n{ax.get_title()}", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_report(data: Sequence[str], methods: Sequence[str] | None, *, out: str | None,
               seed: int = 0, epochs: int = 30, progress: bool = True,
               echo: Callable[[str], None] = print) -> list[TaskReport]:
    """Run the report on each data set, print the tables, and write ``report.md`` + plots.

    Args:
        data: embedded data set names (``"digits"``, ``"gap"``, ``"diabetes"``).
        methods: method names, or ``None`` for every available method.
        out: folder for ``report.md`` and PNG figures (``None`` writes nothing).
        seed: seed of the data split, the network and the methods.
        epochs: epochs of the shared deterministic pretraining.
        progress: show progress bars.
        echo: where the tables are printed.

    Returns:
        One TaskReport per data set.
    """
    reports = []
    sections = ["# bayesify report", "",
                f"Seed {seed}; {epochs} pretraining epochs; intervals and conformal sets "
                f"at {_LEVEL:.0%}. `+ TS`/`+ VS`: temperature / variance scaling fitted on the "
                "validation split. `Maha AUROC`: the Mahalanobis detector on the wrapped "
                "network's head features, fitted on the training split. `class cov90 min`: "
                "the worst class's coverage of class-conditional conformal sets.", ""]
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name in data:
        started = time.perf_counter()
        report = run_task(name, methods, seed=seed, epochs=epochs, progress=progress)
        elapsed = time.perf_counter() - started
        title = f"## {name} ({report.task}), {elapsed:.1f} s"
        echo(f"\n{title}\n{report.table()}")
        sections += [title, "", report.table(), ""]
        if out_dir is not None and report.predictives:
            figure = f"{'reliability' if report.task == 'classification' else 'calibration'}"
            path = out_dir / f"{figure}_{name}.png"
            _figure(report, path)
            sections += [f"![{figure} diagrams]({path.name})", ""]
        reports.append(report)
    if out_dir is not None:
        (out_dir / "report.md").write_text("\n".join(sections))
        echo(f"\nwrote {out_dir / 'report.md'}")
    return reports
