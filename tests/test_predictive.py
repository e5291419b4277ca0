"""Predictive types: identities, exact mixture quantities against references, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special, stats

from bayesify.errors import InputError
from bayesify.predictive import (
    CategoricalPredictive,
    GaussianPredictive,
    MixturePredictive,
)

LEVELS = [0.001, 0.025, 0.3, 0.5, 0.77, 0.975, 0.999]


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _random_probs(shape, seed, concentration=1.0, dtype=torch.float64):
    """Dirichlet probability vectors of the given shape (classes last)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1])
    return torch.from_numpy(probs / probs.sum(-1, keepdims=True)).to(dtype)


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def test_entropy_splits_into_aleatoric_and_mutual_information(dtype):
    sample_probs = _random_probs((7, 5, 4), 0, dtype=dtype)
    pred = CategoricalPredictive(None, sample_probs)
    p = sample_probs.double().numpy()
    mean = p.mean(0)
    total = -(mean * np.log(mean)).sum(-1)
    expected_entropy = -(p * np.log(p)).sum(-1).mean(0)
    tol = _tol(dtype) * 100
    np.testing.assert_allclose(pred.probs.double().numpy(), mean, atol=tol)
    np.testing.assert_allclose(pred.entropy().double().numpy(), total, atol=tol)
    np.testing.assert_allclose(pred.aleatoric().double().numpy(), expected_entropy, atol=tol)
    np.testing.assert_allclose(pred.epistemic().double().numpy(), total - expected_entropy,
                               atol=tol)
    torch.testing.assert_close(pred.aleatoric() + pred.epistemic(), pred.entropy())
    assert pred.entropy().dtype == dtype
    assert bool((pred.epistemic() > 0).all())


def test_without_samples_all_uncertainty_is_aleatoric(dtype):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]], dtype=dtype)
    pred = CategoricalPredictive(probs)
    torch.testing.assert_close(pred.aleatoric(), pred.entropy())
    torch.testing.assert_close(pred.epistemic(), torch.zeros(2, dtype=dtype))
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    torch.testing.assert_close(pred.entropy(), torch.tensor([expected, 0.0], dtype=dtype))
    assert pred.labels.tolist() == [0, 1]
    torch.testing.assert_close(pred.confidence, torch.tensor([0.7, 1.0], dtype=dtype))


def test_identical_samples_carry_no_mutual_information(dtype):
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=dtype)
    pred = CategoricalPredictive(None, probs.expand(6, 1, 3))
    assert abs(float(pred.epistemic()[0])) < _tol(dtype) * 10


def test_categorical_log_prob_and_target_shapes(dtype):
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [1.0, 0.0]], dtype=dtype)
    pred = CategoricalPredictive(probs)
    y = torch.tensor([0, 1, 1])
    expected = torch.tensor([math.log(0.7), math.log(0.6), -math.inf], dtype=dtype)
    out = pred.log_prob(y)
    torch.testing.assert_close(out[:2], expected[:2])
    assert out[2] < -80  # log of zero is floored at the smallest normal float, not -inf
    torch.testing.assert_close(pred.log_prob(y[:, None]), out)
    torch.testing.assert_close(pred.log_prob(y.double()), out)
    with pytest.raises(InputError, match=r"`y` must have shape \[3\]"):
        pred.log_prob(torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"`y` must have shape \[3\]"):
        pred.log_prob(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InputError, match="`y` must be < 2"):
        pred.log_prob(torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="`y` must be integer class labels"):
        pred.log_prob(torch.tensor([0.5, 1.0, 0.0]))


def test_from_logits_matches_the_mean_of_softmax(dtype):
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(9, 4, 5, generator=generator)).to(dtype)
    pred = CategoricalPredictive.from_logits(sample_logits=logits)
    torch.testing.assert_close(pred.probs, logits.softmax(-1).mean(0))
    torch.testing.assert_close(pred.sample_probs, logits.softmax(-1))
    single = CategoricalPredictive.from_logits(logits[0])
    torch.testing.assert_close(single.probs, logits[0].softmax(-1))
    assert single.sample_probs is None
    # Logits whose softmax underflows in every sample still average exactly.
    extreme = torch.tensor([[[0.0, -200.0]], [[0.0, -202.0]]], dtype=dtype)
    pred = CategoricalPredictive.from_logits(sample_logits=extreme)
    assert bool(torch.isfinite(pred.entropy()).all())
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(1, dtype=dtype))


def test_categorical_bad_inputs():
    good = torch.tensor([[0.5, 0.5]])
    with pytest.raises(InputError, match="`probs` rows must sum to one"):
        CategoricalPredictive(torch.tensor([[0.5, 0.6]]))
    with pytest.raises(InputError, match=r"`probs` must lie in \[0, 1\]"):
        CategoricalPredictive(torch.tensor([[1.5, -0.5]]))
    with pytest.raises(InputError, match="`probs` contains 1 NaN"):
        CategoricalPredictive(torch.tensor([[float("nan"), 0.5]]))
    with pytest.raises(InputError, match="`probs` must have 2 dimension"):
        CategoricalPredictive(torch.tensor([0.5, 0.5]))
    with pytest.raises(InputError, match="`sample_probs` must have 3 dimension"):
        CategoricalPredictive(None, good)
    with pytest.raises(InputError, match="`sample_probs` rows must sum to one"):
        CategoricalPredictive(None, torch.tensor([[[0.5, 0.2]]]))
    with pytest.raises(InputError, match=r"`probs` has shape \(1, 2\) but `sample_probs`"):
        CategoricalPredictive(good, torch.full((3, 2, 2), 0.5))
    with pytest.raises(InputError, match="`probs` must be the mean of `sample_probs`"):
        CategoricalPredictive(torch.tensor([[0.9, 0.1]]), torch.full((3, 1, 2), 0.5))
    with pytest.raises(InputError, match="`probs` is None"):
        CategoricalPredictive(None)
    with pytest.raises(InputError, match=r"pass `logits` \[N, C\] or `sample_logits`"):
        CategoricalPredictive.from_logits()
    with pytest.raises(InputError, match="`sample_logits` contains 1 NaN"):
        CategoricalPredictive.from_logits(sample_logits=torch.tensor([[[0.0, float("nan")]]]))


# --------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------


def _gaussian(dtype, shape=(6,), seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    variance = (0.1 + torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)
    return mean, variance


@pytest.mark.parametrize("shape", [(6,), (5, 3)])
def test_gaussian_matches_scipy(dtype, shape):
    mean, variance = _gaussian(dtype, shape)
    pred = GaussianPredictive(mean, variance, aleatoric_variance=0.4 * variance)
    y = mean + torch.linspace(-2, 2, math.prod(shape)).reshape(shape).to(dtype)
    ref = stats.norm(mean.double().numpy(), variance.double().sqrt().numpy())
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    log_density = ref.logpdf(y.double().numpy())
    expected = log_density if len(shape) == 1 else log_density.sum(-1)
    np.testing.assert_allclose(pred.log_prob(y).double().numpy(), expected, **tol)
    np.testing.assert_allclose(pred.cdf(y).double().numpy(), ref.cdf(y.double().numpy()), **tol)
    quantiles = pred.quantile(LEVELS)
    assert quantiles.shape == (len(LEVELS), *shape) and quantiles.dtype == dtype
    for k, q in enumerate(LEVELS):
        np.testing.assert_allclose(quantiles[k].double().numpy(), ref.ppf(q), **tol)
    torch.testing.assert_close(pred.quantile(0.3), quantiles[2])
    lo, hi = pred.interval(0.95)
    torch.testing.assert_close(lo, quantiles[1])
    torch.testing.assert_close(hi, quantiles[5])
    torch.testing.assert_close(pred.stddev, variance.sqrt())
    torch.testing.assert_close(pred.aleatoric_variance + pred.epistemic_variance, pred.variance)
    torch.testing.assert_close(pred.epistemic_variance, 0.6 * variance)


def test_gaussian_without_aleatoric_part_is_all_epistemic(dtype):
    mean, variance = _gaussian(dtype)
    pred = GaussianPredictive(mean, variance)
    torch.testing.assert_close(pred.aleatoric_variance, torch.zeros_like(variance))
    torch.testing.assert_close(pred.epistemic_variance, variance)


def test_gaussian_sample_moments_and_interval_coverage(dtype):
    mean, variance = _gaussian(dtype, (4,))
    pred = GaussianPredictive(mean, variance)
    n = 20000
    draws = pred.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, 4) and draws.dtype == dtype
    se_mean = (variance / n).sqrt()
    assert bool(((draws.mean(0) - mean).abs() < 5 * se_mean).all())
    assert bool(((draws.var(0) / variance - 1).abs() < 5 * math.sqrt(2 / n)).all())
    lo, hi = pred.interval(0.8)
    coverage = ((draws >= lo) & (draws <= hi)).double().mean(0)
    assert bool(((coverage - 0.8).abs() < 5 * math.sqrt(0.8 * 0.2 / n)).all())
    again = pred.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_gaussian_targets_n_and_n1_agree(dtype):
    mean, variance = _gaussian(dtype)
    y = mean + 0.3
    flat = GaussianPredictive(mean, variance)
    column = GaussianPredictive(mean[:, None], variance[:, None])
    for pred in (flat, column):
        torch.testing.assert_close(pred.log_prob(y), flat.log_prob(y))
        torch.testing.assert_close(pred.log_prob(y[:, None]), flat.log_prob(y))
    torch.testing.assert_close(column.cdf(y)[:, 0], flat.cdf(y[:, None]))
    with pytest.raises(InputError, match=r"`y` must have shape \[6\] to match"):
        flat.log_prob(torch.zeros(6, 2, dtype=dtype))
    with pytest.raises(InputError, match=r"`y` must have shape \[6\] to match"):
        flat.cdf(torch.zeros(5, dtype=dtype))
    wide = GaussianPredictive(torch.zeros(6, 2, dtype=dtype), torch.ones(6, 2, dtype=dtype))
    with pytest.raises(InputError, match=r"`y` must have shape \[6, 2\]"):
        wide.log_prob(y)


def test_gaussian_zero_variance_is_a_point_mass():
    pred = GaussianPredictive(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(pred.quantile(0.9)[0], torch.tensor(1.0))
    torch.testing.assert_close(pred.cdf(torch.tensor([0.999, 2.0])), torch.tensor([0.0, 0.5]))
    assert float(pred.log_prob(torch.tensor([1.0, 2.0]))[0]) > 10


def test_gaussian_bad_inputs():
    with pytest.raises(InputError, match="`variance` must be >= 0"):
        GaussianPredictive(torch.zeros(3), torch.tensor([1.0, -0.1, 1.0]))
    with pytest.raises(InputError, match=r"`variance` must have the shape of `mean` \[3\]"):
        GaussianPredictive(torch.zeros(3), torch.ones(3, 1))
    with pytest.raises(InputError, match="`mean` contains 1 NaN"):
        GaussianPredictive(torch.tensor([0.0, float("nan")]), torch.ones(2))
    with pytest.raises(InputError, match="`variance` contains 1 NaN"):
        GaussianPredictive(torch.zeros(2), torch.tensor([1.0, float("inf")]))
    with pytest.raises(InputError, match="`mean` must have 1 or 2 dimension"):
        GaussianPredictive(torch.zeros(2, 2, 2), torch.ones(2, 2, 2))
    with pytest.raises(InputError, match="`aleatoric_variance` must not exceed"):
        GaussianPredictive(torch.zeros(2), torch.ones(2), aleatoric_variance=torch.full((2,), 2.0))
    with pytest.raises(InputError, match="`aleatoric_variance` must have the shape"):
        GaussianPredictive(torch.zeros(2), torch.ones(2), aleatoric_variance=torch.ones(3))
    pred = GaussianPredictive(torch.zeros(2), torch.ones(2))
    for q in (0.0, 1.0, -0.5, [0.5, 1.2]):
        with pytest.raises(InputError, match=r"`q` must lie in \(0, 1\)"):
            pred.quantile(q)
    with pytest.raises(InputError, match="`q` contains 1 NaN"):
        pred.quantile(float("nan"))
    with pytest.raises(InputError, match=r"`level` must lie in \(0, 1\)"):
        pred.interval(1.0)
    with pytest.raises(InputError, match="`n` must be an int >= 1"):
        pred.sample(0)


# --------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------


def _mixture_cdf(y: float, means: np.ndarray, stds: np.ndarray, weights: np.ndarray) -> float:
    """Reference CDF of one mixture; zero-std components are point masses."""
    total = 0.0
    for m, s, w in zip(means, stds, weights, strict=True):
        total += w * (stats.norm.cdf((y - m) / s) if s > 0 else float(y >= m))
    return total


def _brute_quantile(q, means, stds, weights) -> float:
    lo = float(np.min(means - 40 * stds)) - 1
    hi = float(np.max(means + 40 * stds)) + 1
    return optimize.brentq(lambda t: _mixture_cdf(t, means, stds, weights) - q, lo, hi,
                           xtol=1e-13, rtol=1e-14, maxiter=500)


def _mixture_cases(dtype):
    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    zero_var = 0.05 + randn(4, 5).abs()
    zero_var[1] = 0.0  # one posterior sample without noise
    zero_var[2, :2] = 0.0
    cases = {
        "equal [S, N]": (2 * randn(5, 4), 0.1 + randn(5, 4).square(), None),
        "unequal [S, N, D]": (randn(3, 4, 2) * 3, 0.01 + randn(3, 4, 2).square(),
                              torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)),
        "bimodal": (torch.tensor([[-4.0, 0.0], [4.0, 0.1]]), torch.full((2, 2), 0.25),
                    torch.tensor([0.35, 0.65], dtype=torch.float64)),
        "zero-variance components": (randn(4, 5), zero_var,
                                     torch.tensor([0.1, 0.3, 0.2, 0.4], dtype=torch.float64)),
        "tiny weight": (randn(3, 3), 0.5 + randn(3, 3).abs(),
                        torch.tensor([0.001, 0.5, 0.499], dtype=torch.float64)),
    }
    return {name: (m.to(dtype), v.to(dtype), None if w is None else w.to(dtype))
            for name, (m, v, w) in cases.items()}


@pytest.mark.parametrize("case", ["equal [S, N]", "unequal [S, N, D]", "bimodal",
                                  "zero-variance components", "tiny weight"])
def test_mixture_quantiles_match_brute_force_inversion(dtype, case):
    means, variances, weights = _mixture_cases(dtype)[case]
    pred = MixturePredictive(means, variances, weights)
    quantiles = pred.quantile(LEVELS)
    assert quantiles.shape == (len(LEVELS), *means.shape[1:]) and quantiles.dtype == dtype
    m = means.double().numpy()
    s = variances.double().sqrt().numpy()
    w = pred.weights.double().numpy()
    for index in np.ndindex(*means.shape[1:]):
        for k, q in enumerate(LEVELS):
            expected = _brute_quantile(q, m[(slice(None), *index)], s[(slice(None), *index)], w)
            assert abs(float(quantiles[(k, *index)]) - expected) < 1e-4, (case, index, q)


@pytest.mark.parametrize("case", ["equal [S, N]", "unequal [S, N, D]", "bimodal"])
def test_mixture_cdf_inverts_the_quantile(dtype, case):
    means, variances, weights = _mixture_cases(dtype)[case]
    pred = MixturePredictive(means, variances, weights)
    quantiles = pred.quantile(LEVELS)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for k, q in enumerate(LEVELS):
        cdf = pred.cdf(quantiles[k])
        assert float((cdf - q).abs().max()) < tol, (q, cdf)
    # The CDF against the reference at arbitrary points.
    y = pred.mean + pred.stddev * 0.7
    m, s, w = means.double().numpy(), variances.double().sqrt().numpy(), pred.weights.numpy()
    expected = np.zeros(tuple(y.shape))
    for index in np.ndindex(*y.shape):
        expected[index] = _mixture_cdf(float(y[index]), m[(slice(None), *index)],
                                       s[(slice(None), *index)], w.astype(np.float64))
    np.testing.assert_allclose(pred.cdf(y).double().numpy(), expected, atol=tol)


def test_mixture_log_prob_matches_a_logsumexp_reference(dtype):
    for case in ("equal [S, N]", "unequal [S, N, D]", "bimodal"):
        means, variances, weights = _mixture_cases(dtype)[case]
        pred = MixturePredictive(means, variances, weights)
        y = pred.mean + 0.5
        m, v = means.double().numpy(), variances.double().numpy()
        w = pred.weights.double().numpy().reshape((-1,) + (1,) * (m.ndim - 1))
        component = stats.norm.logpdf(y.double().numpy(), m, np.sqrt(v))
        expected = special.logsumexp(component + np.log(w), axis=0)
        if expected.ndim == 2:
            expected = expected.sum(-1)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        np.testing.assert_allclose(pred.log_prob(y).double().numpy(), expected, rtol=tol,
                                   atol=tol)
    # Far in a tail every component underflows in linear space; logsumexp does not.
    far = MixturePredictive(torch.zeros(2, 1, dtype=dtype), torch.full((2, 1), 1e-2, dtype=dtype))
    expected = stats.norm.logpdf(3.0, 0.0, 0.1)
    assert abs(float(far.log_prob(torch.tensor([3.0], dtype=dtype))) - expected) < 1e-3


def test_mixture_variance_splits_into_aleatoric_and_epistemic(dtype):
    means, variances, weights = _mixture_cases(dtype)["unequal [S, N, D]"]
    pred = MixturePredictive(means, variances, weights)
    w = weights.double()[:, None, None]
    m, v = means.double(), variances.double()
    mean = (w * m).sum(0)
    second_moment = (w * (v + m.square())).sum(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(pred.mean.double(), mean, **tol)
    torch.testing.assert_close(pred.variance.double(), second_moment - mean.square(), **tol)
    torch.testing.assert_close(pred.aleatoric_variance.double(), (w * v).sum(0), **tol)
    torch.testing.assert_close(pred.aleatoric_variance + pred.epistemic_variance, pred.variance)
    torch.testing.assert_close(pred.epistemic_variance.double(),
                               (w * (m - mean).square()).sum(0), **tol)


def test_mixture_sample_moments_and_interval_coverage(dtype):
    means, variances, weights = _mixture_cases(dtype)["bimodal"]
    pred = MixturePredictive(means, variances, weights)
    n = 20000
    draws = pred.sample(n, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (n, 2) and draws.dtype == dtype
    sd = pred.stddev
    assert bool(((draws.mean(0) - pred.mean).abs() < 5 * sd / math.sqrt(n)).all())
    # var of the sample variance = (mu4 - sigma^4) / n; mu4 from the draws themselves.
    centered = draws - pred.mean
    se_var = ((centered**4).mean(0) - pred.variance**2).clamp_min(0).sqrt() / math.sqrt(n)
    assert bool(((draws.var(0) - pred.variance).abs() < 5 * se_var).all())
    # Coverage against independent draws: pick a component, then add its noise (numpy).
    rng = np.random.default_rng(0)
    p = weights.double().numpy()
    component = rng.choice(2, size=n, p=p / p.sum())
    m, s = means.double().numpy(), variances.double().sqrt().numpy()
    y = m[component] + s[component] * rng.standard_normal((n, 2))
    for level in (0.5, 0.9):
        lo, hi = pred.interval(level)
        inside = (y >= lo.double().numpy()) & (y <= hi.double().numpy())
        assert np.all(np.abs(inside.mean(0) - level) < 5 * math.sqrt(level * (1 - level) / n))


def test_mixture_targets_n_and_n1_agree(dtype):
    means, variances, _ = _mixture_cases(dtype)["equal [S, N]"]
    flat = MixturePredictive(means, variances)
    column = MixturePredictive(means[..., None], variances[..., None])
    y = flat.mean + 0.2
    torch.testing.assert_close(column.log_prob(y), flat.log_prob(y))
    torch.testing.assert_close(flat.log_prob(y[:, None]), flat.log_prob(y))
    torch.testing.assert_close(column.cdf(y)[:, 0], flat.cdf(y))
    torch.testing.assert_close(column.quantile(0.2)[:, 0], flat.quantile(0.2))
    with pytest.raises(InputError, match=r"`y` must have shape \[4\] to match"):
        flat.log_prob(torch.zeros(4, 3, dtype=dtype))
    with pytest.raises(InputError, match=r"`y` must have shape \[4, 1\] to match"):
        column.cdf(torch.zeros(3, dtype=dtype))


def test_mixture_bad_inputs():
    means = torch.zeros(3, 2)
    with pytest.raises(InputError, match="`variances` must be >= 0"):
        MixturePredictive(means, torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]))
    with pytest.raises(InputError, match=r"`variances` must have the shape of `means`"):
        MixturePredictive(means, torch.ones(3, 3))
    with pytest.raises(InputError, match="`means` must have 2 or 3 dimension"):
        MixturePredictive(torch.zeros(3), torch.ones(3))
    with pytest.raises(InputError, match="`means` contains 1 NaN"):
        MixturePredictive(torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2))
    with pytest.raises(InputError, match="`weights` rows must sum to one"):
        MixturePredictive(means, torch.ones(3, 2), torch.tensor([0.5, 0.3, 0.1]))
    with pytest.raises(InputError, match=r"`weights` must lie in \[0, 1\]"):
        MixturePredictive(means, torch.ones(3, 2), torch.tensor([1.5, -0.3, -0.2]))
    with pytest.raises(InputError, match=r"`weights` must have one entry per component \(3\)"):
        MixturePredictive(means, torch.ones(3, 2), torch.tensor([0.5, 0.5]))
    pred = MixturePredictive(means, torch.ones(3, 2))
    with pytest.raises(InputError, match=r"`q` must lie in \(0, 1\)"):
        pred.quantile([0.1, 1.0])
    with pytest.raises(InputError, match=r"`q` must lie in \(0, 1\)"):
        pred.quantile(-0.1)
    with pytest.raises(InputError, match=r"`y` must have shape \[2\]"):
        pred.log_prob(torch.zeros(2, 2))


def test_weights_in_a_lower_precision_are_accepted_and_renormalized():
    means = torch.randn(2, 3, dtype=torch.float64)
    pred = MixturePredictive(means, torch.ones(2, 3, dtype=torch.float64),
                             torch.tensor([0.35, 0.65]))  # float32 sums to 1 - 3e-8
    assert pred.weights.dtype == torch.float64
    assert abs(float(pred.weights.sum()) - 1) < 1e-15
    integer = MixturePredictive(means, torch.ones(2, 3, dtype=torch.float64),
                                torch.tensor([0, 1]))
    torch.testing.assert_close(integer.mean, means[1])


def test_scalar_levels_of_any_kind_give_the_mean_shape():
    pred = MixturePredictive(torch.randn(3, 4), torch.ones(3, 4))
    expected = pred.quantile(0.25)
    assert expected.shape == (4,)
    for q in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.array(0.25)):
        torch.testing.assert_close(pred.quantile(q), expected)
    assert pred.quantile([0.25]).shape == (1, 4)


# --------------------------------------------------------------------------------------
# Indexing, concatenation, devices and dtypes, scores
# --------------------------------------------------------------------------------------


def _all_kinds(dtype):
    sample_probs = _random_probs((3, 6, 4), 5, dtype=dtype)
    mean, variance = _gaussian(dtype, (6, 2))
    means, variances, weights = _mixture_cases(dtype)["equal [S, N]"]
    means6 = torch.cat([means, means[:, :2]], 1)
    variances6 = torch.cat([variances, variances[:, :2]], 1)
    return [
        CategoricalPredictive(None, sample_probs),
        CategoricalPredictive(sample_probs[0]),
        GaussianPredictive(mean, variance, aleatoric_variance=variance / 2),
        MixturePredictive(means6, variances6, torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])),
    ]


def _same(a, b):
    assert type(a) is type(b)
    for (name, x), (_, y) in zip(a._fields().items(), b._fields().items(), strict=True):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, msg=name)


def test_indexing_and_cat_round_trip(dtype):
    for pred in _all_kinds(dtype):
        pred = pred.with_scores(density=torch.arange(6, dtype=dtype))
        assert len(pred) == 6
        parts = [pred[:2], pred[2:5], pred[5]]
        assert [len(p) for p in parts] == [2, 3, 1]
        _same(type(pred).cat(parts), pred)
        mask = torch.tensor([True, False, True, False, False, True])
        picked = pred[mask]
        _same(picked, pred[torch.tensor([0, 2, 5])])
        torch.testing.assert_close(picked.scores["density"], torch.tensor([0, 2, 5.0],
                                                                          dtype=dtype))
        _same(pred[-1], pred[5:])
        if isinstance(pred, CategoricalPredictive):
            torch.testing.assert_close(picked.entropy(), pred.entropy()[mask])
        else:
            torch.testing.assert_close(picked.quantile(0.3), pred.quantile(0.3)[mask])
            torch.testing.assert_close(picked.variance, pred.variance[mask])


def test_to_converts_every_tensor():
    for pred in _all_kinds(torch.float32):
        pred = pred.with_scores(density=torch.ones(6))
        wide = pred.to(dtype=torch.float64)
        assert wide.dtype == torch.float64 and wide.scores["density"].dtype == torch.float64
        if isinstance(wide, MixturePredictive):
            assert wide.weights.dtype == torch.float64 and pred.weights.dtype == torch.float32
            torch.testing.assert_close(wide.mean, pred.mean.double())
        assert pred.to("cpu").device == torch.device("cpu")


def test_cat_refuses_mismatched_items():
    cat_a = CategoricalPredictive(torch.full((2, 3), 1 / 3))
    cat_b = CategoricalPredictive(None, torch.full((4, 2, 3), 1 / 3))
    with pytest.raises(InputError, match="`items` must all carry the same fields"):
        CategoricalPredictive.cat([cat_a, cat_b])
    with pytest.raises(InputError, match="`items` must all carry the same fields"):
        CategoricalPredictive.cat([cat_b, cat_a])
    with pytest.raises(InputError, match="`items` must all carry the same fields"):
        CategoricalPredictive.cat([cat_a.with_scores(d=torch.ones(2)), cat_a])
    with pytest.raises(InputError, match="`items` must all be CategoricalPredictive"):
        CategoricalPredictive.cat([cat_a, GaussianPredictive(torch.zeros(2), torch.ones(2))])
    with pytest.raises(InputError, match="`items` is empty"):
        MixturePredictive.cat([])
    mix = MixturePredictive(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0.3, 0.7]))
    other = MixturePredictive(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(InputError, match="`items` must share the mixture `weights`"):
        MixturePredictive.cat([mix, other])
    with pytest.raises(InputError, match="`items` must share the mixture `weights`"):
        MixturePredictive.cat([mix, MixturePredictive(torch.zeros(3, 1), torch.ones(3, 1))])
    assert len(MixturePredictive.cat([mix, mix])) == 6


def test_with_scores_checks_its_values():
    pred = GaussianPredictive(torch.zeros(3), torch.ones(3))
    with pytest.raises(InputError, match=r"score `density` must have one value per point \(3\)"):
        pred.with_scores(density=torch.ones(4))
    with pytest.raises(InputError, match="`density` contains 1 NaN"):
        pred.with_scores(density=torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(InputError, match="`density` must have 1 dimension"):
        pred.with_scores(density=torch.ones(3, 1))
    scored = pred.with_scores(density=[1.0, 2.0, 3.0])
    assert pred.scores == {} and scored.scores["density"].tolist() == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    num_components=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    levels=st.lists(st.floats(1e-4, 1 - 1e-4), min_size=2, max_size=6),
)
def test_mixture_quantiles_are_monotone_in_the_level(num_components, seed, levels):
    generator = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(num_components, 3, generator=generator, dtype=torch.float64)
    variances = torch.rand(num_components, 3, generator=generator, dtype=torch.float64) ** 3
    weights = torch.rand(num_components, generator=generator, dtype=torch.float64) + 0.01
    pred = MixturePredictive(means, variances, weights / weights.sum())
    levels = sorted(levels)
    quantiles = pred.quantile(levels)
    assert bool((quantiles[1:] >= quantiles[:-1] - 1e-12).all())
    lo = (means - 10 * variances.sqrt()).min(0).values
    hi = (means + 10 * variances.sqrt()).max(0).values
    assert bool(((quantiles >= lo) & (quantiles <= hi)).all())


@settings(max_examples=25, deadline=None)
@given(
    num_samples=st.integers(1, 6),
    num_classes=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    concentration=st.floats(0.05, 5.0),
)
def test_mutual_information_is_non_negative(num_samples, num_classes, seed, concentration):
    sample_probs = _random_probs((num_samples, 4, num_classes), seed, concentration)
    pred = CategoricalPredictive(None, sample_probs)
    assert bool((pred.epistemic() >= -1e-10).all())
    assert bool((pred.epistemic() <= math.log(min(num_samples, num_classes)) + 1e-10).all())
    torch.testing.assert_close(pred.aleatoric() + pred.epistemic(), pred.entropy())
