"""Calibration plots: reliability diagram, regression calibration curve, 1-D intervals.

Each function draws on ``ax`` when given (else on a new pyplot figure) and returns the
:class:`matplotlib.figure.Figure`. matplotlib is imported inside the functions, so
``import bayesify`` never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bayesify._validation import as_tensor, check_choice, check_fraction, check_probabilities
from bayesify.calibration.metrics import calibration_bins, expected_calibration_error
from bayesify.errors import InputError
from bayesify.predictive import CategoricalPredictive, Predictive, RegressionPredictive

__all__ = ["calibration_curve_plot", "interval_plot", "observed_coverage",
           "reliability_diagram"]

_CURVE_KINDS = ("interval", "quantile")


def _new_axes(ax: Any) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 4))
        return fig, ax
    return ax.figure, ax


def reliability_diagram(pred_or_probs: Any, labels: Any, n_bins: int = 15, ax: Any = None,
                        title: str = "Reliability diagram") -> Any:
    """Accuracy against confidence per equal-width bin, with the confidence histogram below.

    The bins are those of :func:`~bayesify.calibration.expected_calibration_error`, whose
    value appears in the title. Empty bins are drawn as zero-height bars.

    Args:
        pred_or_probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
        n_bins: number of equal-width confidence bins B.
        ax: an Axes to draw on; the histogram takes the lower third of it. A new
            figure when ``None``.
        title: title text; `` (ECE = 0.012)`` is appended.

    Returns:
        The Figure: the diagram's axes (B accuracy bars, the diagonal) and the
        histogram's axes (B count bars).
    """
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    ece = expected_calibration_error(pred_or_probs, labels, n_bins)  # validates the inputs
    if isinstance(pred_or_probs, CategoricalPredictive):
        probs = pred_or_probs.probs
    else:
        probs = as_tensor(pred_or_probs, "pred_or_probs", ndim=2)
        check_probabilities(probs, "pred_or_probs")
    y = as_tensor(labels, "labels", device=probs.device).reshape(-1).long()
    confidence, predicted = probs.max(-1)
    bins = calibration_bins(confidence.double(), (predicted == y).double(), n_bins)
    edges = bins.edges.cpu().numpy()
    width = edges[1:] - edges[:-1]

    if ax is None:
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(5, 5),
                                          gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, top = ax.figure, ax
        bottom = make_axes_locatable(ax).append_axes("bottom", size="33%", pad=0.1,
                                                     sharex=ax)
    top.bar(edges[:-1], bins.accuracy.cpu().numpy(), width=width, align="edge",
            edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    top.set_title(f"{title} (ECE = {ece:.3f})")
    top.tick_params(labelbottom=False)
    bottom.bar(edges[:-1], bins.counts.cpu().numpy(), width=width, align="edge",
               edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    return fig


def _as_regression(pred: Any) -> RegressionPredictive:
    if isinstance(pred, RegressionPredictive):
        return pred
    if isinstance(pred, Predictive):
        raise InputError(f"`pred` must be a regression predictive, got {type(pred).__name__}")
    raise InputError(f"`pred` must be a GaussianPredictive, MixturePredictive or "
                     f"RecalibratedPredictive, got {type(pred).__name__}")


def observed_coverage(pred: Any, y: Any, levels: Sequence[float] | torch.Tensor,
                      kind: str = "interval") -> torch.Tensor:
    """Observed coverage of a regression predictive at each level [Q] (float64).

    Args:
        pred: a regression predictive, [N] or [N, D].
        y: targets, shape of the mean.
        levels: levels in (0, 1) [Q].
        kind: ``"interval"``: fraction of targets inside the central interval holding
            each level; ``"quantile"``: fraction of targets below each quantile, i.e. of
            PIT values F(y) <= level (what ``regression_calibration_error`` averages).
    """
    pred = _as_regression(pred)
    kind = check_choice(kind, "kind", _CURVE_KINDS)
    p = as_tensor(levels, "levels", dtype=torch.float64).reshape(-1)
    for value in p.tolist():
        check_fraction(value, "levels")
    target = pred._target(y)
    if kind == "quantile":
        pit = pred.cdf(target).double().reshape(1, -1)
        return (pit <= p[:, None].to(pit.device)).double().mean(1).cpu()
    bounds = pred.quantile(torch.cat([(1 - p) / 2, (1 + p) / 2]))
    lower, upper = bounds[:p.shape[0]], bounds[p.shape[0]:]
    inside = (lower <= target) & (target <= upper)
    return inside.reshape(p.shape[0], -1).double().mean(1).cpu()


def calibration_curve_plot(pred: Any, y: Any, levels: Sequence[float] | None = None,
                           ax: Any = None, *, kind: str = "interval",
                           label: str = "model") -> Any:
    """Observed against expected coverage over levels, with the diagonal.

    Call it several times on one ``ax`` (different ``label``) to compare predictives.

    Args:
        pred: a regression predictive.
        y: targets, shape of the mean.
        levels: expected coverage levels in (0, 1); default 0.05, 0.10, ..., 0.95.
        ax: an Axes to draw on, or ``None`` for a new figure.
        kind: ``"interval"`` (central intervals) or ``"quantile"`` (one-sided), see
            :func:`observed_coverage`.
        label: legend name; the mean |expected - observed| is appended.

    Returns:
        The Figure.
    """
    if levels is None:
        levels = [i / 20 for i in range(1, 20)]
    expected = as_tensor(levels, "levels", dtype=torch.float64).reshape(-1)
    observed = observed_coverage(pred, y, expected, kind)
    error = float((observed - expected).abs().mean())
    fig, ax = _new_axes(ax)
    if not any(line.get_gid() == "diagonal" for line in ax.get_lines()):
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", gid="diagonal")
    ax.plot(expected.numpy(), observed.numpy(), marker="o", label=f"{label} ({error:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("expected coverage")
    ax.set_ylabel("observed coverage")
    ax.set_title(f"Calibration curve ({kind}s)")
    ax.legend(loc="upper left", title="mean |gap|")
    return fig


def _column(values: Any, name: str, output: int | None) -> Any:
    """Column ``output`` of [N, D] values (values as they are for ``None`` or [N])."""
    if output is None or values is None:
        return values
    values = as_tensor(values, name, ndim=(1, 2), finite=False)
    return values[:, output] if values.dim() == 2 else values


def interval_plot(x: Any, pred: Any, y: Any = None, levels: Sequence[float] = (0.5, 0.9),
                  ax: Any = None, *, bounds: dict[str, tuple[Any, Any]] | None = None,
                  output: int | None = None) -> Any:
    """A 1-D regression plot: predictive mean, central interval bands, and the data.

    Args:
        x: inputs [N] (or [N, 1]).
        pred: a regression predictive over the N inputs: one output, or D with ``output``.
        y: targets [N] ([N, D] with ``output``) to scatter, or ``None``.
        levels: interval levels drawn as bands, widest palest.
        ax: an Axes to draw on, or ``None`` for a new figure.
        bounds: extra named intervals ``{"conformal 90%": (lower, upper)}`` drawn as
            dashed lines (each [N], or [N, D] with ``output``).
        output: which output of a multi-output predictive to draw (its column of ``y``
            and of the ``bounds`` too).

    Returns:
        The Figure: one band per level, the mean line, and the data points.
    """
    pred = _as_regression(pred)
    if output is not None:
        pred = pred.output(output)
        y = _column(y, "y", output)
        bounds = {name: (_column(lo, name, output), _column(hi, name, output))
                  for name, (lo, hi) in (bounds or {}).items()}
    if pred.num_outputs != 1:
        raise InputError(f"`pred` must have one output for a 1-D plot, got "
                         f"{pred.num_outputs}; pass `output=` to draw one of them")
    xs = as_tensor(x, "x", ndim=(1, 2), dtype=torch.float64).reshape(pred.num_points, -1)
    if xs.shape[1] != 1:
        raise InputError(f"`x` must be one-dimensional [N], got {list(xs.shape)}")
    order = torch.argsort(xs[:, 0].cpu())
    xs = xs[:, 0].cpu()[order].numpy()

    def _sorted(values: Any, name: str) -> Any:
        flat = as_tensor(values, name, dtype=torch.float64).reshape(-1).cpu()
        if flat.shape[0] != order.shape[0]:
            raise InputError(f"`{name}` must have one value per point ({order.shape[0]}), "
                             f"got {flat.shape[0]}")
        return flat[order].numpy()

    fig, ax = _new_axes(ax)
    for i, level in enumerate(sorted(levels, reverse=True)):
        level = check_fraction(level, "levels")
        lower, upper = pred.interval(level)
        ax.fill_between(xs, _sorted(lower, "lower"), _sorted(upper, "upper"),
                        alpha=0.2 + 0.2 * i, color="tab:blue", linewidth=0,
                        label=f"{level:.0%} interval")
    ax.plot(xs, _sorted(pred.mean, "mean"), color="tab:blue", label="mean")
    for name, (lower, upper) in (bounds or {}).items():
        line = ax.plot(xs, _sorted(lower, name), linestyle="--", label=name)[0]
        ax.plot(xs, _sorted(upper, name), linestyle="--", color=line.get_color())
    if y is not None:
        ax.scatter(xs, _sorted(y, "y"), s=8, color="black", label="data", zorder=3)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="best")
    return fig
