"""Recalibration: temperature/vector/variance scaling and isotonic recalibration."""

from __future__ import annotations

import math

import pytest
import torch

from bayesify.calibration._recalibrated import RecalibratedPredictive, compose_maps, interp
from bayesify.calibration.isotonic import IsotonicRecalibration, redistribute_top_label
from bayesify.calibration.metrics import (
    classification_nll,
    expected_calibration_error,
    regression_calibration_error,
    regression_nll,
)
from bayesify.calibration.recalibration import (
    TemperatureScaling,
    VarianceScaling,
    VectorScaling,
    scale_predictive,
)
from bayesify.errors import BayesifyError, InputError, NotFittedError
from bayesify.predictive import CategoricalPredictive, GaussianPredictive, MixturePredictive


def _classifier(n: int, classes: int = 5, seed: int = 0, sharpen: float = 1.0,
                dtype: torch.dtype = torch.float64):
    """True logits; labels drawn from softmax(true logits); predicted logits = sharpen * true."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return (sharpen * logits).to(dtype), labels


# --------------------------------------------------------------------------------------
# Temperature and vector scaling
# --------------------------------------------------------------------------------------


def test_temperature_scaling_fixes_an_overconfident_classifier(dtype):
    logits, labels = _classifier(6000, sharpen=3.0, dtype=dtype)
    val, test = slice(0, 3000), slice(3000, None)
    before = CategoricalPredictive.from_logits(logits[test])
    ts = TemperatureScaling().fit(logits[val], labels[val])
    assert 2.6 < ts.temperature < 3.4  # the logits were sharpened 3x
    after = ts.transform(before)
    assert after.probs.dtype == dtype
    assert torch.equal(after.labels, before.labels)  # accuracy unchanged, exactly
    ece_before = expected_calibration_error(before, labels[test])
    ece_after = expected_calibration_error(after, labels[test])
    assert ece_after < 0.03 < 0.15 < ece_before
    assert classification_nll(after, labels[test]) < classification_nll(before, labels[test]) - 0.3


def test_temperature_of_a_calibrated_model_is_one(dtype):
    logits, labels = _classifier(5000, seed=1, dtype=dtype)
    pred = CategoricalPredictive.from_logits(logits)
    assert abs(TemperatureScaling().fit(pred, labels).temperature - 1) < 0.1


def test_temperature_minimizes_nll_and_binary_logits_match_two_columns():
    logits, labels = _classifier(2000, classes=2, seed=2, sharpen=0.5)
    binary = logits[:, 1] - logits[:, 0]
    t_binary = TemperatureScaling().fit(binary, labels).temperature
    two = torch.stack([torch.zeros_like(binary), binary], -1)
    ts = TemperatureScaling().fit(two, labels)
    assert t_binary == pytest.approx(ts.temperature, rel=1e-6)
    assert ts.temperature == pytest.approx(0.5, abs=0.1)  # underconfident: T < 1

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(two / t, labels))

    best = ts.temperature
    assert nll(best) < min(nll(best * 1.02), nll(best / 1.02))


def test_temperature_scaling_of_a_sampled_predictive_scales_the_pooled_one():
    g = torch.Generator().manual_seed(3)
    sample_logits = 3 * torch.randn(4, 500, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (500,), generator=g)
    pred = CategoricalPredictive.from_logits(sample_logits=sample_logits)
    ts = TemperatureScaling().fit(pred, labels)
    out = ts.transform(pred)
    plain = TemperatureScaling().fit(pred.probs.log(), labels)
    assert ts.temperature == pytest.approx(plain.temperature, rel=1e-6)
    torch.testing.assert_close(out.probs, torch.softmax(pred.probs.log() / ts.temperature, -1))
    assert out.sample_probs is None
    assert torch.equal(out.labels, pred.labels)


def test_temperature_scaling_per_sample_acts_on_each_sample():
    g = torch.Generator().manual_seed(3)
    sample_logits = 3 * torch.randn(4, 500, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (500,), generator=g)
    pred = CategoricalPredictive.from_logits(sample_logits=sample_logits)
    ts = TemperatureScaling(per_sample=True).fit(pred, labels)
    out = ts.transform(pred)
    expected = torch.softmax(sample_logits / ts.temperature, -1)
    torch.testing.assert_close(out.sample_probs, expected)
    torch.testing.assert_close(out.probs, expected.mean(0))
    assert ts.temperature > 1.5  # random labels: the fit softens the predictions
    assert classification_nll(out, labels) < classification_nll(pred, labels)


def test_vector_scaling_removes_a_class_bias(dtype):
    logits, labels = _classifier(6000, classes=3, seed=4, dtype=dtype)
    biased = logits + torch.tensor([2.0, 0.0, -1.0], dtype=dtype)
    vs = VectorScaling().fit(biased[:3000], labels[:3000])
    torch.testing.assert_close(vs.weight, torch.ones(3, dtype=torch.float64), atol=0.15, rtol=0)
    centred = vs.bias - vs.bias.mean()
    shift = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(centred, -(shift - shift.mean()), atol=0.15, rtol=0)
    ts = TemperatureScaling().fit(biased[:3000], labels[:3000])
    test = biased[3000:]
    assert (classification_nll(vs.transform(test), labels[3000:])
            < classification_nll(ts.transform(test), labels[3000:]) - 0.05)


# --------------------------------------------------------------------------------------
# Variance scaling
# --------------------------------------------------------------------------------------


def _regression(n: int, seed: int, dtype: torch.dtype, std_scale: float = 0.2):
    """y = sin(3x) + 0.5 eps; the predictive has the right mean but a std too small."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    noise = 0.2 + 0.3 * x.abs()
    y = torch.sin(3 * x) + noise * torch.randn(n, generator=g, dtype=torch.float64)
    pred = GaussianPredictive(torch.sin(3 * x), (std_scale * noise) ** 2,
                              (0.5 * std_scale * noise) ** 2)
    return pred.to(dtype=dtype), y.to(dtype)


def test_variance_scaling_gaussian_closed_form(dtype):
    pred, y = _regression(4000, 0, dtype)
    vs = VarianceScaling().fit(pred, y)
    assert vs.scale == pytest.approx(5.0, rel=0.05)  # the std was 5x too small
    out = vs.transform(pred)
    assert isinstance(out, GaussianPredictive) and out.mean.dtype == dtype
    torch.testing.assert_close(out.stddev, vs.scale * pred.stddev)
    torch.testing.assert_close(out.aleatoric_variance, vs.scale ** 2 * pred.aleatoric_variance)
    assert regression_nll(out, y) < regression_nll(pred, y) - 1.0
    mean, var = pred.mean.double(), pred.variance.double()
    assert vs.scale == pytest.approx(float(((y.double() - mean) ** 2 / var).mean().sqrt()),
                                     rel=1e-5)
    raw = VarianceScaling().fit((pred.mean, pred.variance), y)
    assert raw.scale == pytest.approx(vs.scale, rel=1e-6)


def test_variance_scaling_mixture_stretches_about_the_mean(dtype):
    base, y = _regression(1500, 1, torch.float64)
    g = torch.Generator().manual_seed(5)
    means = base.mean + 0.1 * torch.randn(6, 1500, generator=g, dtype=torch.float64)
    pred = MixturePredictive(means, base.variance.expand(6, -1)).to(dtype=dtype)
    vs = VarianceScaling().fit(pred, y)
    out = vs.transform(pred)
    assert isinstance(out, MixturePredictive)
    torch.testing.assert_close(out.mean, pred.mean)
    torch.testing.assert_close(out.stddev, vs.scale * pred.stddev)
    torch.testing.assert_close(out.epistemic_variance, vs.scale ** 2 * pred.epistemic_variance)

    def nll(scale: float) -> float:
        return regression_nll(scale_predictive(pred, scale), y)

    assert nll(vs.scale) < min(nll(vs.scale * 1.02), nll(vs.scale / 1.02))


# --------------------------------------------------------------------------------------
# Isotonic recalibration
# --------------------------------------------------------------------------------------


def test_isotonic_regression_recalibration_on_held_out_data(dtype):
    pred, y = _regression(4000, 2, dtype, std_scale=0.4)
    biased = GaussianPredictive(pred.mean + 0.2, pred.variance)  # shifted, std 2.5x too small
    cal, test = slice(0, 2000), slice(2000, None)
    iso = IsotonicRecalibration().fit(biased[cal], y[cal])
    out = iso.transform(biased[test])
    assert isinstance(out, RecalibratedPredictive)
    assert regression_calibration_error(biased[test], y[test]) > 0.15
    assert regression_calibration_error(out, y[test]) < 0.02
    lower, upper = out.interval(0.9)
    coverage = float(((lower <= y[test]) & (y[test] <= upper)).double().mean())
    assert 0.87 < coverage < 0.93
    assert regression_nll(out, y[test]) < regression_nll(biased[test], y[test])


@pytest.mark.parametrize("prescale", [True, False])
def test_isotonic_fixes_a_predictive_five_times_too_narrow(prescale):
    # Without the stretch, ~5% of targets lie where the CDF rounds to 1 in float64, so the
    # upper tail cannot be recalibrated: that is why prescale defaults to True.
    pred, y = _regression(4000, 5, torch.float64, std_scale=0.2)
    iso = IsotonicRecalibration(prescale=prescale).fit(pred[:2000], y[:2000])
    out = iso.transform(pred[2000:])
    lower, upper = out.interval(0.95)
    coverage = float(((lower <= y[2000:]) & (y[2000:] <= upper)).double().mean())
    if prescale:
        assert regression_calibration_error(out, y[2000:]) < 0.02
        assert 0.93 < coverage < 0.97
    else:
        assert coverage < 0.93


def test_isotonic_mixture_recalibration_and_consistency(dtype):
    base, y = _regression(800, 3, torch.float64)
    g = torch.Generator().manual_seed(6)
    means = base.mean + 0.05 * torch.randn(5, 800, generator=g, dtype=torch.float64)
    pred = MixturePredictive(means, base.variance.expand(5, -1)).to(dtype=dtype)
    out = IsotonicRecalibration(max_knots=64).fit(pred[:400], y[:400]).transform(pred[400:])
    assert out.knots_u.shape[0] <= 64
    assert regression_calibration_error(out, y[400:]) < 0.05
    # quantile inverts cdf.
    levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    q = out.quantile(levels)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(out.cdf(q[1]).double(), torch.full((400,), 0.5,
                               dtype=torch.float64), atol=tol * 10, rtol=0)
    # The sample moments match mean and variance.
    draws = out[:10].sample(20000, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(draws.mean(0), out[:10].mean.double(), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), out[:10].variance.double(), rtol=0.05, atol=0)


def test_recalibrated_predictive_identity_map_and_density():
    base = GaussianPredictive(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64),
                              torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64))
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    same = RecalibratedPredictive(base, u, u)
    torch.testing.assert_close(same.mean, base.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(same.variance, base.variance, rtol=1e-3, atol=0)
    torch.testing.assert_close(same.quantile(0.9), base.quantile(0.9))
    # A bent map: the density integrates to one and log_prob matches dR/du * f.
    bent = RecalibratedPredictive(base, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64),
                                  torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64))
    step = 1e-3
    grid = torch.arange(-30, 30, step, dtype=torch.float64)
    for i in range(3):  # G copies of point i, so one call evaluates its whole density
        copies = bent[torch.full((grid.shape[0],), i)]
        total = float(copies.log_prob(grid).exp().sum() * step)
        assert total == pytest.approx(1.0, abs=1e-3)  # Riemann sum across the kink
    y0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    slope = torch.where(base.cdf(y0) < 0.3, 2.0, 0.4 / 0.7)
    torch.testing.assert_close(bent.log_prob(y0), base.log_prob(y0) + slope.log())
    # Indexing, moving, concatenating and recalibrating twice keep the map.
    assert bent[1:].num_points == 2 and bent.to(dtype=torch.float32).mean.dtype == torch.float32
    joined = RecalibratedPredictive.cat([bent[:1], bent[1:]])
    torch.testing.assert_close(joined.cdf(y0), bent.cdf(y0))
    twice = RecalibratedPredictive(bent, torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64),
                                   torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(twice.cdf(y0), base.cdf(y0))  # the inverse map undoes it
    assert twice.base is base


def test_piecewise_linear_helpers():
    xp = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    fp = torch.tensor([0.0, 0.8, 1.0], dtype=torch.float64)
    x = torch.tensor([-1.0, 0.25, 0.75, 2.0], dtype=torch.float64)
    torch.testing.assert_close(interp(x, xp, fp), torch.tensor([0.0, 0.4, 0.9, 1.0],
                                                               dtype=torch.float64))
    u, p = compose_maps((xp, fp), (xp, fp))
    torch.testing.assert_close(interp(x.clamp(0, 1), u, p), interp(interp(x, xp, fp), xp, fp))


def test_isotonic_classification_keeps_argmax_and_lowers_ece(dtype):
    logits, labels = _classifier(6000, seed=7, sharpen=3.0, dtype=dtype)
    probs = torch.softmax(logits, -1)
    iso = IsotonicRecalibration().fit(probs[:3000], labels[:3000])
    before = CategoricalPredictive(probs[3000:])
    after = iso.transform(before)
    assert torch.equal(after.labels, before.labels)
    torch.testing.assert_close(after.probs.sum(-1), torch.ones(3000, dtype=dtype))
    assert expected_calibration_error(after, labels[3000:]) < 0.5 * expected_calibration_error(
        before, labels[3000:])


def test_redistribute_top_label_rules(dtype):
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.45, 0.44, 0.11]], dtype=dtype)
    out = redistribute_top_label(probs, torch.tensor([0.8, 0.7, 0.2], dtype=dtype))
    expected = torch.tensor([[0.8, 0.12, 0.08], [0.7, 0.15, 0.15]], dtype=dtype)
    torch.testing.assert_close(out[:2], expected)
    # 0.2 would demote the top class: it is raised until the top is still (just) on top.
    assert int(out[2].argmax()) == 0 and float(out[2, 0]) > float(out[2, 1])
    torch.testing.assert_close(out.sum(-1), torch.ones(3, dtype=dtype))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TemperatureScaling, VectorScaling, VarianceScaling,
                                 IsotonicRecalibration])
def test_transform_before_fit(cls):
    with pytest.raises(NotFittedError, match=r"call `.fit\(pred, y\)`"):
        cls().transform(torch.zeros(3, 2))


def test_bad_input_raises_bayesify_errors():
    logits = torch.zeros(4, 3)
    with pytest.raises(BayesifyError, match="same number of rows.*`y` has 3"):
        TemperatureScaling().fit(logits, torch.zeros(3))
    with pytest.raises(BayesifyError, match="`pred` contains 1 NaN"):
        TemperatureScaling().fit(torch.tensor([[0.0, float("nan")]]), torch.zeros(1))
    with pytest.raises(BayesifyError, match="`y` must be < 3"):
        TemperatureScaling().fit(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(BayesifyError, match="`pred` is empty"):
        TemperatureScaling().fit(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(BayesifyError, match="`pred` must be a CategoricalPredictive"):
        TemperatureScaling().fit(GaussianPredictive(torch.zeros(2), torch.ones(2)), [0, 1])
    with pytest.raises(BayesifyError, match=r"`y` must have shape \[4\]"):
        VarianceScaling().fit(GaussianPredictive(torch.zeros(4), torch.ones(4)), torch.zeros(3))
    with pytest.raises(BayesifyError, match="`pred` rows must sum to one"):
        IsotonicRecalibration().fit(torch.full((2, 3), 0.5), torch.zeros(2))
    with pytest.raises(BayesifyError, match="`max_knots` must be an int >= 2"):
        IsotonicRecalibration(max_knots=1)
    iso = IsotonicRecalibration().fit(torch.full((2, 2), 0.5), torch.zeros(2))
    with pytest.raises(InputError, match="`pred` must be a classification predictive"):
        iso.transform(GaussianPredictive(torch.zeros(2), torch.ones(2)))
    vs = VectorScaling().fit(logits, torch.zeros(4))
    with pytest.raises(InputError, match="`pred` has 2 classes but"):
        vs.transform(torch.zeros(4, 2))


def test_fitted_temperature_is_nan_free_under_extreme_logits():
    logits, labels = _classifier(500, seed=8, sharpen=200.0)
    ts = TemperatureScaling().fit(logits, labels)
    assert math.isfinite(ts.temperature) and ts.temperature > 20


def test_recalibrated_mixture_moves_and_concatenates():
    means = torch.tensor([[0.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    base = MixturePredictive(means, torch.ones(2, 2, dtype=torch.float64),
                             torch.tensor([0.25, 0.75], dtype=torch.float64))
    knots = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    rp = RecalibratedPredictive(base, knots, torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64))
    moved = rp.to(dtype=torch.float32)
    assert moved.base.weights.dtype == torch.float32
    torch.testing.assert_close(moved.cdf(torch.ones(2)), rp.cdf(torch.ones(2)).float())
    joined = RecalibratedPredictive.cat([rp[:1], rp[1:]])
    torch.testing.assert_close(joined.quantile(0.3), rp.quantile(0.3))
    other = RecalibratedPredictive(base, knots, knots)
    with pytest.raises(InputError, match="same recalibration map"):
        RecalibratedPredictive.cat([rp, other])


def test_recalibrators_follow_the_device(device):
    logits, labels = _classifier(400, seed=9, sharpen=2.0)
    logits, labels = logits.to(device), labels.to(device)
    out = TemperatureScaling().fit(logits, labels).transform(logits)
    assert out.probs.device.type == device.type
    iso = IsotonicRecalibration().fit(torch.softmax(logits, -1), labels)
    assert iso.transform(torch.softmax(logits, -1)).probs.device.type == device.type
    pred, y = _regression(300, 10, torch.float64)
    pred, y = pred.to(device=device), y.to(device)
    rp = IsotonicRecalibration().fit(pred, y).transform(pred)
    for value in (rp.mean, rp.interval(0.9)[0], rp.log_prob(y), rp.sample(3)):
        assert value.device.type == device.type
    assert VarianceScaling().fit(pred, y).transform(pred).mean.device.type == device.type


def test_variance_scaling_stretches_a_generalized_gaussian_exactly():
    # beta = 2 is the Gaussian with std alpha / sqrt(2): the NLL-optimal factor is the
    # Gaussian closed form sqrt(mean(y^2)) / std, reached here by L-BFGS on log s.
    from bayesify.predictive import GeneralizedGaussianPredictive

    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, generator=g, dtype=torch.float64)
    std = 0.5
    pred = GeneralizedGaussianPredictive(torch.zeros(500, dtype=torch.float64),
                                         torch.full((500,), std * 2 ** 0.5,
                                                    dtype=torch.float64),
                                         torch.full((500,), 2.0, dtype=torch.float64))
    vs = VarianceScaling().fit(pred, y)
    assert vs.scale == pytest.approx(float(y.pow(2).mean().sqrt()) / std, rel=1e-5)
    scaled = vs.transform(pred)
    assert isinstance(scaled, GeneralizedGaussianPredictive)
    torch.testing.assert_close(scaled.variance, pred.variance * vs.scale ** 2)
