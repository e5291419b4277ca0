"""Multi-output regression [N, D]: predictives, metrics and recalibrators against
closed forms and scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from bayesify import calibration as cal
from bayesify.calibration import IsotonicRecalibration, VarianceScaling
from bayesify.errors import InputError
from bayesify.predictive import GaussianPredictive, MixturePredictive

N, D, S = 400, 3, 4


def _gaussian(dtype, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, D, generator=g, dtype=torch.float64)
    var = 0.2 + torch.rand(n, D, generator=g, dtype=torch.float64)
    return GaussianPredictive(mean.to(dtype), var.to(dtype), (0.5 * var).to(dtype))


def _mixture(dtype, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(S, n, D, generator=g, dtype=torch.float64)
    variances = 0.1 + torch.rand(S, n, D, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    return MixturePredictive(means.to(dtype), variances.to(dtype), weights.to(dtype))


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}


def test_gaussian_quantities_match_scipy_per_entry(dtype):
    pred = _gaussian(dtype)
    y = pred.mean + torch.randn(N, D, dtype=dtype)
    m, s = pred.mean.double().numpy(), pred.stddev.double().numpy()
    t = y.double().numpy()
    tol = _tol(dtype)
    np.testing.assert_allclose(pred.log_prob(y).double(),
                               stats.norm.logpdf(t, m, s).sum(-1), **tol)
    np.testing.assert_allclose(pred.cdf(y).double(), stats.norm.cdf(t, m, s), **tol)
    np.testing.assert_allclose(pred.quantile(0.8).double(), stats.norm.ppf(0.8, m, s), **tol)
    assert pred.quantile([0.1, 0.9]).shape == (2, N, D)
    torch.testing.assert_close(pred.joint_log_prob(y), pred.log_prob(y))
    column = pred.output(1)
    assert isinstance(column, GaussianPredictive) and column.mean.shape == (N,)
    torch.testing.assert_close(column.variance, pred.variance[:, 1])
    torch.testing.assert_close(column.aleatoric_variance, pred.aleatoric_variance[:, 1])
    torch.testing.assert_close(pred.output(-1).mean, pred.mean[:, 2])
    assert torch.equal(pred.output(0).mean, pred.mean[:, 0])
    with pytest.raises(InputError, match=r"`index` must be an output index in \[-3, 3\)"):
        pred.output(3)
    flat = GaussianPredictive(pred.mean[:, 0], pred.variance[:, 0])
    assert flat.output(0) is flat


def test_mixture_marginals_and_joint_density_match_references(dtype):
    pred = _mixture(dtype, n=60)
    y = pred.mean + 0.7 * torch.randn(60, D, dtype=dtype)
    m, v = pred.means.double().numpy(), pred.variances.double().numpy()
    w = pred.weights.double().numpy()
    t = y.double().numpy()
    component = stats.norm.logpdf(t, m, np.sqrt(v))  # [S, N, D]
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10}
    # log_prob: product of the D marginal mixtures; joint: mixture of joint components.
    marginal = special.logsumexp(component + np.log(w)[:, None, None], axis=0).sum(-1)
    joint = special.logsumexp(component.sum(-1) + np.log(w)[:, None], axis=0)
    np.testing.assert_allclose(pred.log_prob(y).double(), marginal, **tol)
    np.testing.assert_allclose(pred.joint_log_prob(y).double(), joint, **tol)
    # One output: both are the same density.
    column = pred.output(2)
    torch.testing.assert_close(column.joint_log_prob(y[:, 2]), column.log_prob(y[:, 2]))
    torch.testing.assert_close(column.quantile([0.05, 0.5]), pred.quantile([0.05, 0.5])[..., 2])
    torch.testing.assert_close(column.mean, pred.mean[:, 2])
    torch.testing.assert_close(column.variance, pred.variance[:, 2])
    assert pred.sample(5).shape == (5, 60, D)
    scored = pred.with_scores(density=torch.zeros(60, dtype=dtype))
    assert set(scored.output(0).scores) == {"density"}


def test_metrics_per_output_and_pooled_match_closed_forms(dtype):
    pred = _gaussian(dtype)
    g = torch.Generator().manual_seed(3)
    y = (pred.mean.double() + pred.stddev.double() * torch.randn(N, D, generator=g,
                                                                  dtype=torch.float64)
         * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)).to(dtype)
    m, s, t = (a.double().numpy() for a in (pred.mean, pred.stddev, y))
    z = (t - m) / s
    crps_ref = s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z)
                    - 1 / math.sqrt(math.pi))
    nll_ref = -stats.norm.logpdf(t, m, s)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert cal.crps(pred, y) == pytest.approx(crps_ref.mean(), rel=tol)
    np.testing.assert_allclose(cal.crps(pred, y, per_output=True), crps_ref.mean(0), rtol=tol)
    np.testing.assert_allclose(cal.negative_log_likelihood(pred, y, per_output=True),
                               nll_ref.mean(0), rtol=tol)
    assert cal.negative_log_likelihood(pred, y) == pytest.approx(nll_ref.sum(-1).mean(), rel=tol)
    np.testing.assert_allclose(cal.rmse(pred, y, per_output=True),
                               np.sqrt(((t - m) ** 2).mean(0)), rtol=tol)
    # Calibration error per output from the PIT values, by hand.
    levels = np.arange(1, 100) / 100
    pit = stats.norm.cdf(z)
    by_hand = [np.abs(levels - (pit[:, d][:, None] <= levels).mean(0)).mean() for d in range(D)]
    np.testing.assert_allclose(cal.regression_calibration_error(pred, y, per_output=True),
                               by_hand, atol=1e-12 if dtype == torch.float64 else 0.02)
    pooled = np.abs(levels - (pit.reshape(-1)[:, None] <= levels).mean(0)).mean()
    assert cal.regression_calibration_error(pred, y) == pytest.approx(
        pooled, abs=1e-12 if dtype == torch.float64 else 0.01)
    # The too-narrow output (targets spread 2σ) is the worst calibrated.
    errors = cal.regression_calibration_error(pred, y, per_output=True)
    assert errors[2] > errors[1] and errors[0] > errors[1]


def test_interval_coverage_entries_outputs_and_joint_exactly(dtype):
    lower = torch.zeros(4, 2, dtype=dtype)
    upper = torch.ones(4, 2, dtype=dtype)
    y = torch.tensor([[0.5, 0.5], [0.5, 2.0], [-1.0, 0.5], [0.0, 1.0]], dtype=dtype)
    assert cal.interval_coverage(lower, upper, y) == 6 / 8
    assert cal.interval_coverage(lower, upper, y, per_output=True) == [3 / 4, 3 / 4]
    assert cal.interval_coverage(lower, upper, y, joint=True) == 2 / 4
    assert cal.interval_coverage(lower[:, 0], upper[:, 0], y[:, 0], joint=True) == 3 / 4
    widths = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    assert cal.mean_interval_width(lower, widths, per_output=True) == [2.0, 3.0]
    assert cal.mean_interval_width(lower, widths) == 2.5
    with pytest.raises(InputError, match="`per_output=True` or `joint=True`, not both"):
        cal.interval_coverage(lower, upper, y, per_output=True, joint=True)


def test_evaluate_reports_pooled_joint_and_per_output_metrics(dtype):
    pred = _mixture(dtype, n=80)
    y = pred.sample(1, generator=torch.Generator().manual_seed(0))[0]
    report = cal.evaluate(pred, y, per_output=True)
    assert list(report)[:7] == ["rmse", "nll", "crps", "calibration_error", "coverage",
                                "width", "joint_coverage"]
    lower, upper = pred.interval(0.9)
    assert report["joint_coverage"] == cal.interval_coverage(lower, upper, y, joint=True)
    for d in range(D):
        single = cal.evaluate(pred.output(d), y[:, d])
        for key in ("rmse", "nll", "crps", "calibration_error", "coverage", "width"):
            assert report[f"{key}[{d}]"] == pytest.approx(single[key], rel=1e-9, abs=1e-12)
    assert sum(report[f"nll[{d}]"] for d in range(D)) == pytest.approx(report["nll"])
    assert "joint_coverage" not in cal.evaluate(pred.output(0), y[:, 0])
    assert "mean width of the central 90% interval (output 2)" in str(report)
    with pytest.raises(InputError, match="`per_output` applies to regression"):
        from bayesify.predictive import CategoricalPredictive
        cal.evaluate(CategoricalPredictive(torch.full((2, 2), 0.5)), [0, 1], per_output=True)


def _miscalibrated(dtype, n, seed, factors=(2.0, 0.5)):
    """A Gaussian predictive and targets whose spread is ``factors`` times its std."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, len(factors), generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(n, len(factors), generator=g, dtype=torch.float64)
    y = mean + var.sqrt() * torch.tensor(factors, dtype=torch.float64) * torch.randn(
        n, len(factors), generator=g, dtype=torch.float64)
    return GaussianPredictive(mean.to(dtype), var.to(dtype)), y.to(dtype)


def test_variance_scaling_per_output_is_the_closed_form_per_column(dtype):
    pred, y = _miscalibrated(dtype, 2000, 0)
    r2 = ((y.double() - pred.mean.double()) ** 2 / pred.variance.double())
    per = VarianceScaling(per_output=True).fit(pred, y)
    torch.testing.assert_close(per.scale, r2.mean(0).sqrt(), **_tol(dtype))
    shared = VarianceScaling().fit(pred, y)
    assert shared.scale == pytest.approx(float(r2.mean().sqrt()), rel=1e-5)
    # The ML factor of a χ²-based estimate has standard error s / sqrt(2n).
    se = torch.tensor([2.0, 0.5], dtype=torch.float64) / math.sqrt(2 * 2000)
    assert bool(((per.scale - torch.tensor([2.0, 0.5], dtype=torch.float64)).abs()
                 < 4 * se).all())
    scaled = per.transform(pred)
    assert scaled.variance.dtype == dtype
    torch.testing.assert_close(scaled.variance, pred.variance * per.scale.to(dtype) ** 2)
    torch.testing.assert_close(scaled.mean, pred.mean)
    with pytest.raises(InputError, match=r"fitted per output on 2"):
        per.transform(GaussianPredictive(pred.mean[:, :1], pred.variance[:, :1]))


def test_variance_scaling_per_output_on_a_mixture_fits_each_column_alone(dtype):
    pred = _mixture(dtype, n=300, seed=4)
    y = (pred.mean.double() + torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
         * (pred.sample(1, generator=torch.Generator().manual_seed(5))[0].double()
            - pred.mean.double())).to(dtype)
    per = VarianceScaling(per_output=True).fit(pred, y)
    alone = [VarianceScaling().fit(pred.output(d), y[:, d]).scale for d in range(D)]
    np.testing.assert_allclose(per.scale.numpy(), alone, rtol=1e-5)
    assert per.scale[0] > 1.5 and per.scale[2] < 0.6
    single = MixturePredictive(pred.means[:1], pred.variances[:1])
    gaussian = GaussianPredictive(single.mean, single.variance)
    np.testing.assert_allclose(VarianceScaling(per_output=True).fit(single, y).scale.numpy(),
                               VarianceScaling(per_output=True).fit(gaussian, y).scale.numpy(),
                               rtol=1e-5)


def test_isotonic_pools_the_outputs_and_prescales_each_one(dtype):
    pred, y = _miscalibrated(dtype, 1000, 1)
    iso = IsotonicRecalibration(prescale=False).fit(pred, y)
    flat = GaussianPredictive(pred.mean.reshape(-1), pred.variance.reshape(-1))
    pooled = IsotonicRecalibration(prescale=False).fit(flat, y.reshape(-1))
    torch.testing.assert_close(iso.transform(pred).knots_p, pooled.transform(flat).knots_p)
    out = iso.transform(pred)
    assert out.output(1).base.mean.shape == (1000,)
    torch.testing.assert_close(out.output(1).cdf(y[:, 1]), out.cdf(y)[:, 1])
    # Test split: per-output prescaling covers each output; one shared map cannot.
    test_pred, test_y = _miscalibrated(dtype, 4000, 2)
    se = math.sqrt(0.9 * 0.1 / 4000)
    per = IsotonicRecalibration(prescale="per_output").fit(pred, y).transform(test_pred)
    shared = IsotonicRecalibration().fit(pred, y).transform(test_pred)
    per_cov = cal.interval_coverage(*per.interval(0.9), test_y, per_output=True)
    shared_cov = cal.interval_coverage(*shared.interval(0.9), test_y, per_output=True)
    # 1000 calibration points per output: their own sampling error dominates.
    assert all(abs(c - 0.9) < 0.03 + 3 * se for c in per_cov), per_cov
    # The shared map covers 90% of the pooled entries: too little of the output whose
    # targets spread 2σ (about 0.80, 10 s.e. below), too much of the other (about 1.0).
    assert shared_cov[0] < 0.9 - 10 * se and shared_cov[1] > 0.9 + 10 * se, shared_cov
    assert abs(sum(shared_cov) / 2 - 0.9) < 0.03 + 3 * se
    with pytest.raises(InputError, match="`prescale` must be one of 'shared', 'per_output'"):
        IsotonicRecalibration(prescale="each")


def test_interval_plot_draws_one_output_of_several():
    import matplotlib.pyplot as plt

    pred, y = _miscalibrated(torch.float64, 30, 3)
    x = torch.linspace(0, 1, 30)
    lower, upper = pred.interval(0.8)
    fig = cal.interval_plot(x, pred, y, output=1, bounds={"80%": (lower, upper)})
    line = [ln for ln in fig.axes[0].lines if ln.get_label() == "mean"][0]
    np.testing.assert_allclose(line.get_ydata(), pred.mean[:, 1].numpy())
    plt.close(fig)
    with pytest.raises(InputError, match="pass `output=` to draw one of them"):
        cal.interval_plot(x, pred)
