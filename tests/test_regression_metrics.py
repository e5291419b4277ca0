"""Regression metrics: closed forms, numerical-integration references, coverage rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.special import logsumexp

from bayesify import CategoricalPredictive, GaussianPredictive, InputError, MixturePredictive
from bayesify import calibration as cal
from bayesify.calibration import regression_metrics

PROPERTY = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64],
                                 ids=["float32", "float64"])


def textbook_gaussian_crps(mu, sigma, y):
    """Gneiting et al. (2005): sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)]."""
    z = (y - mu) / sigma
    return sigma * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


def integrated_crps(cdf, y, lo, hi):
    """CRPS = int (F(x) - 1[x >= y])^2 dx by adaptive quadrature, split at y."""
    left = integrate.quad(lambda x: cdf(x) ** 2, lo, y, epsabs=1e-12, limit=200)[0]
    right = integrate.quad(lambda x: (1 - cdf(x)) ** 2, y, hi, epsabs=1e-12, limit=200)[0]
    return left + right


def random_mixture(dtype, s=5, n=8, d=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (s, n) if d is None else (s, n, d)
    means = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    variances = 0.05 + torch.rand(shape, generator=gen, dtype=torch.float64)
    weights = torch.rand(s, generator=gen, dtype=torch.float64) + 0.2
    return MixturePredictive(means.to(dtype), variances.to(dtype),
                             (weights / weights.sum()).to(dtype))


# --------------------------------------------------------------------------------------
# CRPS
# --------------------------------------------------------------------------------------


def test_gaussian_crps_matches_closed_form(dtype):
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(200, generator=gen, dtype=torch.float64).to(dtype)
    var = (0.01 + 3 * torch.rand(200, generator=gen, dtype=torch.float64)).to(dtype)
    y = (mean.double() + 4 * torch.randn(200, generator=gen, dtype=torch.float64)).to(dtype)
    ref = textbook_gaussian_crps(mean.double().numpy(), var.double().sqrt().numpy(),
                                 y.double().numpy()).mean()
    assert cal.crps(GaussianPredictive(mean, var), y) == pytest.approx(ref, abs=1e-6)
    assert cal.crps((mean, var), y[:, None]) == pytest.approx(ref, abs=1e-6)


def test_gaussian_crps_with_zero_variance_is_absolute_error():
    mean = torch.tensor([0.0, 1.0, -2.0])
    y = torch.tensor([0.0, 3.0, -2.5])
    assert cal.crps(GaussianPredictive(mean, torch.zeros(3)), y) == pytest.approx(2.5 / 3)


@DTYPES
def test_mixture_crps_matches_numerical_integration(dtype):
    pred = random_mixture(dtype)
    gen = torch.Generator().manual_seed(5)
    y = pred.mean.double() + 2 * torch.randn(8, generator=gen, dtype=torch.float64)
    means, std = pred.means.double().numpy(), pred.variances.double().sqrt().numpy()
    w = pred.weights.double().numpy()
    refs = []
    for i, target in enumerate(y.tolist()):
        def cdf(x, i=i):
            return float(np.sum(w * stats.norm.cdf((x - means[:, i]) / std[:, i])))
        refs.append(integrated_crps(cdf, target, -40.0, 40.0))
    assert cal.crps(pred, y.to(dtype)) == pytest.approx(np.mean(refs), abs=1e-6)


def test_single_component_mixture_equals_gaussian_and_multi_output(dtype):
    pred = random_mixture(dtype, s=1, n=30, d=2)
    y = torch.randn(30, 2, dtype=dtype)
    gauss = GaussianPredictive(pred.mean, pred.variance)
    assert cal.crps(pred, y) == pytest.approx(cal.crps(gauss, y), abs=1e-9)


def test_mixture_crps_chunked_equals_unchunked(monkeypatch):
    pred = random_mixture(torch.float64, s=16, n=300, seed=3)
    y = torch.randn(300, dtype=torch.float64)
    whole = cal.crps(pred, y)
    monkeypatch.setattr(regression_metrics, "_PAIRWISE_BUDGET", 120 * 50)  # 6 chunks of 120 pairs
    assert cal.crps(pred, y) == pytest.approx(whole, abs=1e-12)


def test_sample_crps_matches_brute_force_and_zero_variance_mixture(dtype):
    gen = torch.Generator().manual_seed(7)
    samples = torch.randn(20, 15, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(15, generator=gen, dtype=torch.float64).to(dtype)
    x, t = samples.double().numpy(), y.double().numpy()
    brute = np.mean([np.mean(np.abs(x[:, i] - t[i]))
                     - 0.5 * np.mean(np.abs(x[:, i, None] - x[None, :, i]))
                     for i in range(15)])
    assert cal.crps(samples, y) == pytest.approx(brute, abs=1e-6)
    assert cal.crps(samples.numpy(), y.numpy()) == pytest.approx(brute, abs=1e-6)
    degenerate = MixturePredictive(samples, torch.zeros_like(samples))
    assert cal.crps(degenerate, y) == pytest.approx(brute, abs=1e-6)


def test_sample_crps_approaches_gaussian_closed_form():
    gen = torch.Generator().manual_seed(8)
    samples = 1.5 + 2 * torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([1.5, 0.0, 5.0], dtype=torch.float64)
    exact = cal.crps(GaussianPredictive(torch.full((3,), 1.5), torch.full((3,), 4.0)), y)
    assert cal.crps(samples, y) == pytest.approx(exact, abs=0.02)


@DTYPES
def test_quadrature_crps_matches_closed_forms(dtype):
    mix = random_mixture(dtype, s=4, n=20, seed=13)
    y = (mix.mean.double() + 3 * torch.randn(20, dtype=torch.float64)).to(dtype)
    for pred in (mix, GaussianPredictive(mix.mean, mix.variance)):
        pred64, y64 = pred.to(dtype=torch.float64), y.double()
        quad = regression_metrics.crps_quadrature(pred64, y64)
        exact = cal.crps(pred, y)
        assert float(quad.mean()) == pytest.approx(exact, abs=1e-7)


def test_crps_of_a_recalibrated_predictive_integrates_its_cdf():
    base = GaussianPredictive(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64),
                              torch.tensor([1.0, 0.25, 4.0], dtype=torch.float64))
    # CDF R(F(y)) with R through (0.3, 0.5): no longer Gaussian, so the closed form is wrong.
    pred = cal.RecalibratedPredictive(base, torch.tensor([0.0, 0.3, 1.0]),
                                      torch.tensor([0.0, 0.5, 1.0]))
    y = torch.tensor([0.5, 3.0, -2.0], dtype=torch.float64)
    refs = []
    for i, target in enumerate(y.tolist()):
        def cdf(x, i=i):
            full = base.mean.clone()
            full[i] = x
            return float(pred.cdf(full)[i])
        refs.append(integrated_crps(cdf, target, -30.0, 30.0))
    assert cal.crps(pred, y) == pytest.approx(np.mean(refs), abs=1e-6)
    assert abs(cal.crps(pred, y) - cal.crps(base, y)) > 1e-3
    assert cal.evaluate(pred, y)["crps"] == pytest.approx(np.mean(refs), abs=1e-6)


# --------------------------------------------------------------------------------------
# NLL, RMSE, calibration error, intervals
# --------------------------------------------------------------------------------------


def test_nll_gaussian_and_mixture_match_scipy(dtype):
    mix = random_mixture(dtype, s=4, n=25, d=2)
    y = torch.randn(25, 2, dtype=dtype)
    comp = stats.norm.logpdf(y.double().numpy(), mix.means.double().numpy(),
                             mix.variances.double().sqrt().numpy())
    log_w = np.log(mix.weights.double().numpy())[:, None, None]
    ref = -logsumexp(comp + log_w, axis=0).sum(-1).mean()  # summed over outputs
    assert cal.negative_log_likelihood(mix, y) == pytest.approx(ref, abs=1e-5)
    mean, var = torch.randn(40, dtype=dtype), torch.rand(40, dtype=dtype) + 0.5
    yy = torch.randn(40, dtype=dtype)
    ref = -stats.norm.logpdf(yy.double().numpy(), mean.double().numpy(),
                             var.double().sqrt().numpy()).mean()
    assert cal.negative_log_likelihood((mean, var), yy) == pytest.approx(ref, abs=1e-5)


def test_rmse_accepts_predictive_pair_or_mean(dtype):
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    y = torch.tensor([[1.0], [0.0], [7.0]], dtype=dtype)
    expected = math.sqrt((0 + 4 + 16) / 3)
    assert cal.rmse(mean, y) == pytest.approx(expected)
    assert cal.rmse(GaussianPredictive(mean, torch.ones(3, dtype=dtype)), y) == \
        pytest.approx(expected)
    assert cal.rmse((mean.numpy(), np.ones(3)), y[:, 0]) == pytest.approx(expected)


def reference_calibration_error(pit, levels):
    return sum(abs(p - sum(u <= p for u in pit) / len(pit)) for p in levels) / len(levels)


def test_regression_calibration_error_matches_reference_and_detects_miscalibration(dtype):
    gen = torch.Generator().manual_seed(9)
    mean = torch.randn(4000, generator=gen, dtype=torch.float64).to(dtype)
    y = (mean.double() + torch.randn(4000, generator=gen, dtype=torch.float64)).to(dtype)
    calibrated = GaussianPredictive(mean, torch.ones(4000, dtype=dtype))
    overconfident = GaussianPredictive(mean, torch.full((4000,), 0.1, dtype=dtype))
    levels = [0.1, 0.25, 0.5, 0.8, 0.95]
    pit = calibrated.cdf(y).double().tolist()
    assert cal.regression_calibration_error(calibrated, y, levels) == \
        pytest.approx(reference_calibration_error(pit, levels), abs=1e-9)
    assert cal.regression_calibration_error(calibrated, y) < 0.02
    # Phi(sqrt(10) z) is far from uniform: the observed coverage gap averages ~0.16.
    assert cal.regression_calibration_error(overconfident, y) > 0.12


def test_interval_coverage_and_width_are_closed_and_exact(dtype):
    lower = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=dtype)
    upper = torch.tensor([1.0, 1.0, 4.0, 1.0], dtype=dtype)
    y = torch.tensor([1.0, 1.0, 5.0, -1.5], dtype=dtype)
    assert cal.interval_coverage(lower, upper, y) == 0.5  # both bounds are inclusive
    assert cal.mean_interval_width(lower, upper) == pytest.approx(5.0 / 4)


@DTYPES
def test_evaluate_regression_reaches_nominal_coverage(dtype):
    gen = torch.Generator().manual_seed(10)
    n = 20000
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    y = mean + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    pred = GaussianPredictive(mean.to(dtype), torch.full((n,), 0.25, dtype=dtype))
    report = cal.evaluate(pred, y.to(dtype), level=0.8)
    assert list(report) == ["rmse", "nll", "crps", "calibration_error", "coverage", "width"]
    assert report["coverage"] == pytest.approx(0.8, abs=0.01)  # 3.5 binomial std
    assert report["width"] == pytest.approx(2 * 0.5 * stats.norm.ppf(0.9), rel=1e-5)
    assert report["rmse"] == pytest.approx(0.5, rel=0.02)
    assert report["crps"] == pytest.approx(cal.crps(pred, y.to(dtype)), abs=1e-12)
    assert "central 80% interval" in str(report) and "regression" in repr(report)


def test_evaluate_mixture_interval_is_exact():
    mix = random_mixture(torch.float64, s=3, n=400, seed=11)
    y = mix.sample(1, generator=torch.Generator().manual_seed(12))[0]
    report = cal.evaluate(mix, y, level=0.5)
    lower, upper = mix.interval(0.5)
    assert report["coverage"] == cal.interval_coverage(lower, upper, y)
    assert float((mix.cdf(upper) - mix.cdf(lower) - 0.5).abs().max()) < 1e-8


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------

finite = st.floats(-50, 50, allow_nan=False)


@DTYPES
@PROPERTY
@given(data=st.data(), n=st.integers(1, 12), s=st.integers(1, 6))
def test_crps_is_nonnegative_and_permutation_invariant(dtype, data, n, s):
    means = torch.tensor(data.draw(st.lists(finite, min_size=s * n, max_size=s * n)),
                         dtype=dtype).reshape(s, n)
    variances = torch.tensor(data.draw(st.lists(st.floats(0, 20), min_size=s * n,
                                                max_size=s * n)), dtype=dtype).reshape(s, n)
    y = torch.tensor(data.draw(st.lists(finite, min_size=n, max_size=n)), dtype=dtype)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 9))))
    for pred in (MixturePredictive(means, variances), GaussianPredictive(means[0], variances[0]),
                 means):
        value = cal.crps(pred, y)
        assert value >= -1e-9
        permuted = pred[:, perm] if isinstance(pred, torch.Tensor) else pred[perm]
        assert cal.crps(permuted, y[perm]) == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert cal.crps(GaussianPredictive(y, torch.zeros_like(y)), y) == 0.0


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------

GAUSS = GaussianPredictive(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("call, match", [
    (lambda: cal.crps(GAUSS, torch.zeros(4)),
     r"`y` must have shape \[3\] to match the predictive, got \[4\]"),
    (lambda: cal.crps(torch.zeros(5), torch.zeros(5)), "`pred` must have 2 or 3 dimension"),
    (lambda: cal.crps(CategoricalPredictive(torch.ones(3, 2) / 2), torch.zeros(3)),
     "`pred` must be a regression predictive, got a CategoricalPredictive"),
    (lambda: cal.negative_log_likelihood(GAUSS, [0.0, float("nan"), 1.0]),
     "`y` contains 1 NaN"),
    (lambda: cal.rmse("mean", torch.zeros(3)), "`pred` must be a tensor or array-like"),
    (lambda: cal.rmse((torch.zeros(3), -torch.ones(3)), torch.zeros(3)),
     "`variance` must be >= 0"),
    (lambda: cal.regression_calibration_error(GAUSS, torch.zeros(3), levels=[0.5, 1.0]),
     r"`levels` must lie in \(0, 1\)"),
    (lambda: cal.regression_calibration_error(GAUSS, torch.zeros(3), levels=[]),
     "`levels` is empty"),
    (lambda: cal.interval_coverage(torch.ones(2), torch.zeros(2), torch.zeros(2)),
     "`lower` must not exceed `upper`; 2 interval"),
    (lambda: cal.interval_coverage(torch.zeros(2), torch.ones(3), torch.zeros(2)),
     r"`upper` must have shape \[2\], got \[3\]"),
    (lambda: cal.mean_interval_width(torch.zeros(0), torch.zeros(0)), "`lower` is empty"),
    (lambda: cal.evaluate(GAUSS, torch.zeros(3, 2)), r"`y` must have shape \[3\]"),
])
def test_bad_regression_inputs(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_infinite_conformal_bounds_count_as_covering():
    # k > n makes split conformal return (-inf, inf): it covers everything, width inf.
    lower = torch.tensor([-float("inf"), 0.0])
    upper = torch.tensor([float("inf"), 1.0])
    y = torch.tensor([1e30, 2.0])
    assert cal.interval_coverage(lower, upper, y) == 0.5
    assert cal.mean_interval_width(lower, upper) == float("inf")
    with pytest.raises(InputError, match="`upper` contains 1 NaN"):
        cal.interval_coverage(lower, torch.tensor([float("nan"), 1.0]), y)
