"""GeneralizedGaussianPredictive against scipy's gennorm: density, CDF, quantiles,
variance, sampling, and the Predictive plumbing (indexing, cat, outputs, scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import bayesify as bf
from bayesify.calibration.regression_metrics import regression_calibration_error
from bayesify.errors import InputError
from bayesify.predictive import GaussianPredictive, GeneralizedGaussianPredictive


def _predictive(dtype, shape=(6,)):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    alpha = 0.2 + torch.rand(shape, generator=g, dtype=dtype)
    beta = torch.tensor([0.7, 1.0, 1.5, 2.0, 3.0, 8.0], dtype=dtype).reshape(-1, *[1] * (
        len(shape) - 1)).expand(shape).contiguous()
    return GeneralizedGaussianPredictive(mean, alpha, beta)


def _scipy(pred):
    return stats.gennorm(pred.beta.double().numpy(), loc=pred.mean.double().numpy(),
                         scale=pred.alpha.double().numpy())


def test_density_cdf_quantiles_and_variance_match_scipy(dtype):
    pred = _predictive(dtype)
    ref = _scipy(pred)
    y = pred.mean + torch.linspace(-1.5, 1.7, 6, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else \
        {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(pred.log_prob(y).numpy(), ref.logpdf(y.double().numpy()),
                               **tol)
    np.testing.assert_allclose(pred.cdf(y).numpy(), ref.cdf(y.double().numpy()), **tol)
    np.testing.assert_allclose(pred.variance.numpy(), ref.var(), **tol)
    levels = [0.001, 0.05, 0.3, 0.5, 0.77, 0.999]
    q = pred.quantile(levels)
    assert q.shape == (6, 6) and q.dtype == dtype
    np.testing.assert_allclose(q.numpy(), np.stack([ref.ppf(p) for p in levels]), **tol)
    lower, upper = pred.interval(0.9)
    np.testing.assert_allclose(lower.numpy(), ref.ppf(0.05), **tol)
    np.testing.assert_allclose(upper.numpy(), ref.ppf(0.95), **tol)
    np.testing.assert_allclose(pred.cdf(q[2]).double().numpy(), 0.3, **tol)


def test_beta_two_is_the_gaussian_with_variance_alpha_squared_over_two():
    mean = torch.tensor([0.0, 1.0], dtype=torch.float64)
    alpha = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ggd = GeneralizedGaussianPredictive(mean, alpha, torch.full_like(mean, 2.0))
    gauss = GaussianPredictive(mean, alpha ** 2 / 2)
    y = torch.tensor([0.3, -1.0], dtype=torch.float64)
    torch.testing.assert_close(ggd.log_prob(y), gauss.log_prob(y))
    torch.testing.assert_close(ggd.cdf(y), gauss.cdf(y))
    torch.testing.assert_close(ggd.variance, gauss.variance)
    torch.testing.assert_close(ggd.quantile([0.1, 0.9]), gauss.quantile([0.1, 0.9]))


def test_samples_follow_the_distribution():
    """KS distance of 20 000 draws per point against the exact CDF: below the 0.1% critical
    value 1.95/√n for each of the six shapes."""
    pred = _predictive(torch.float64)
    n = 20000
    draws = pred.sample(n, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (n, 6)
    for j in range(6):
        ks = stats.kstest(draws[:, j].numpy(), _scipy(pred[j:j + 1]).cdf).statistic
        assert ks < 1.95 / math.sqrt(n)
    again = pred.sample(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)


def test_multi_output_indexing_cat_scores_and_rescaling(dtype):
    pred = _predictive(dtype, shape=(6, 2)).with_scores(s=torch.arange(6.0, dtype=dtype))
    assert pred.num_outputs == 2 and pred.log_prob(pred.mean).shape == (6,)
    first = pred.output(1)
    assert first.mean.shape == (6,) and torch.equal(first.beta, pred.beta[:, 1])
    assert torch.equal(first.scores["s"], pred.scores["s"])
    both = GeneralizedGaussianPredictive.cat([pred[:2], pred[2:]])
    assert torch.equal(both.alpha, pred.alpha) and torch.equal(both.scores["s"], pred.scores["s"])
    wider = pred.rescaled(2.0)
    torch.testing.assert_close(wider.variance, 4 * pred.variance)
    torch.testing.assert_close(wider.cdf(pred.mean + 2 * (pred.quantile(0.8) - pred.mean)),
                               torch.full_like(pred.mean, 0.8))
    assert regression_calibration_error(pred, pred.mean) >= 0
    assert bf.ood.score(pred, "variance").shape == (6,)


def test_bad_parameters_are_refused():
    mean = torch.zeros(3)
    with pytest.raises(InputError, match="`alpha` must be > 0"):
        GeneralizedGaussianPredictive(mean, torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))
    with pytest.raises(InputError, match="`beta` must have the shape"):
        GeneralizedGaussianPredictive(mean, torch.ones(3), torch.ones(2))
