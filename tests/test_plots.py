"""Calibration plots render headless and draw what they claim."""

from __future__ import annotations

import matplotlib.pyplot as plt  # conftest selects the Agg backend
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection

from bayesify.calibration.metrics import (
    calibration_bins,
    expected_calibration_error,
)
from bayesify.calibration.plots import (
    calibration_curve_plot,
    interval_plot,
    observed_coverage,
    reliability_diagram,
)
from bayesify.errors import InputError
from bayesify.predictive import CategoricalPredictive, GaussianPredictive


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _classifier(n: int = 500):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=g)
    return CategoricalPredictive.from_logits(logits), labels


def _regression(n: int = 200, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.linspace(-1, 1, n, dtype=torch.float64)
    y = x ** 2 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    pred = GaussianPredictive(x ** 2, torch.full((n,), 0.1 ** 2, dtype=torch.float64))
    return x.to(dtype), pred.to(dtype=dtype), y.to(dtype)


def test_reliability_diagram_bars_histogram_and_title():
    pred, labels = _classifier()
    fig = reliability_diagram(pred, labels, n_bins=10)
    top, bottom = fig.axes
    ece = expected_calibration_error(pred, labels, n_bins=10)
    assert top.get_title() == f"Reliability diagram (ECE = {ece:.3f})"
    assert len(top.patches) == 10 and len(bottom.patches) == 10
    bins = calibration_bins(pred.confidence, (pred.labels == labels).double(), 10)
    heights = torch.tensor([bar.get_height() for bar in top.patches], dtype=torch.float64)
    torch.testing.assert_close(heights, bins.accuracy)
    assert sum(bar.get_height() for bar in bottom.patches) == 500  # the confidence histogram


def test_reliability_diagram_on_given_axes_with_raw_probs():
    pred, labels = _classifier()
    fig, ax = plt.subplots()
    out = reliability_diagram(pred.probs.numpy(), labels.numpy(), n_bins=5, ax=ax,
                              title="after")
    assert out is fig and len(fig.axes) == 2  # the histogram was split off below
    assert ax.get_title().startswith("after (ECE = ")
    assert len(ax.patches) == 5


def test_observed_coverage_closed_form():
    # Targets exactly at the mean: every central interval covers them; the PIT is 0.5.
    pred = GaussianPredictive(torch.zeros(4, dtype=torch.float64), torch.ones(4,
                                                                              dtype=torch.float64))
    levels = [0.2, 0.5, 0.8]
    assert observed_coverage(pred, torch.zeros(4), levels).tolist() == [1.0, 1.0, 1.0]
    assert observed_coverage(pred, torch.zeros(4), levels, kind="quantile").tolist() == [
        0.0, 1.0, 1.0]
    # Targets at +-1 std: inside the central interval iff level >= 2 Phi(1) - 1 = 0.6827.
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert observed_coverage(pred, y, [0.68, 0.69]).tolist() == [0.0, 1.0]


def test_calibration_curve_plot_points_and_reuse(dtype):
    x, pred, y = _regression(dtype=dtype)
    fig = calibration_curve_plot(pred, y, label="raw")
    (ax,) = fig.axes
    diagonal, curve = ax.get_lines()
    assert diagonal.get_gid() == "diagonal" and len(curve.get_xdata()) == 19
    expected = torch.arange(1, 20, dtype=torch.float64) / 20
    torch.testing.assert_close(torch.as_tensor(curve.get_ydata()),
                               observed_coverage(pred, y, expected))
    assert float(curve.get_ydata()[-1]) < 0.7  # std 0.1 against noise 0.2: undercovers
    wide = GaussianPredictive(pred.mean, 4 * pred.variance)
    calibration_curve_plot(wide, y, ax=ax, label="scaled")
    assert len(ax.get_lines()) == 3  # one diagonal, two curves
    assert ax.get_title() == "Calibration curve (intervals)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("raw (") and labels[1].startswith("scaled (")


def test_interval_plot_bands_mean_and_data(dtype):
    x, pred, y = _regression(dtype=dtype)
    lower, upper = pred.interval(0.95)
    fig = interval_plot(x, pred, y, levels=(0.5, 0.9), bounds={"other": (lower, upper)})
    (ax,) = fig.axes
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(bands) == 2 and len(points) == 1
    assert len(ax.get_lines()) == 3  # mean + the two dashed bounds
    mean_line = ax.get_lines()[0]
    torch.testing.assert_close(torch.as_tensor(mean_line.get_ydata()), pred.mean.double())
    with pytest.raises(InputError, match="`y` must have one value per point"):
        interval_plot(x, pred, y[:-1])


def test_plot_bad_input():
    pred, labels = _classifier(20)
    with pytest.raises(InputError, match="`n_bins` must be an int"):
        reliability_diagram(pred, labels, n_bins=0)
    with pytest.raises(InputError, match="`pred` must be a regression predictive"):
        calibration_curve_plot(pred, labels)
    x, reg, y = _regression(10)
    with pytest.raises(InputError, match="`levels` must lie in"):
        calibration_curve_plot(reg, y, levels=[0.5, 1.0])
    with pytest.raises(InputError, match="`kind` must be one of"):
        observed_coverage(reg, y, [0.5], kind="pit")
