"""Heteroscedastic regression: the noise parameterizations, a pretrained network that
predicts without `fit`, and β-NLL (Seitzer et al., 2022)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesify as bf
from bayesify.errors import InputError, NotFittedError
from bayesify.likelihoods import (
    NOISE_PARAMETERIZATIONS,
    GaussianNoise,
    beta_nll,
    gaussian_nll,
)

MIN_VAR = 1e-6


def _expected_variance(raw: torch.Tensor, param: str) -> torch.Tensor:
    """The variance each parameterization promises, written out independently."""
    return {
        "softplus": torch.log1p(torch.exp(raw)),
        "softplus_std": torch.log1p(torch.exp(raw)) ** 2,
        "log_variance": torch.exp(raw),
        "log_std": torch.exp(raw) ** 2,
    }[param] + MIN_VAR


@pytest.mark.parametrize("param", list(NOISE_PARAMETERIZATIONS))
def test_each_parameterization_reads_the_noise_columns_as_documented(param, dtype):
    noise = GaussianNoise("heteroscedastic", num_outputs=2, noise_param=param, dtype=dtype)
    output = torch.randn(7, 4, dtype=dtype)
    mean, variance = noise.split(output)
    assert mean.dtype == variance.dtype == dtype
    torch.testing.assert_close(mean, output[:, :2])
    torch.testing.assert_close(variance, _expected_variance(output[:, 2:], param))
    # Leading sample dimensions pass through (the sampled posterior's [S, N, K]).
    _, sampled = noise.split(output.expand(3, 7, 4))
    torch.testing.assert_close(sampled[1], variance)


@pytest.mark.parametrize(("param", "to_raw"), [
    ("log_variance", lambda var: var.log()),
    ("log_std", lambda var: 0.5 * var.log()),
    ("softplus_std", lambda var: torch.log(torch.expm1(var.sqrt()))),
])
@pytest.mark.parametrize("d", [1, 2])
def test_pretrained_regressor_predicts_without_fit(param, to_raw, d, dtype):
    torch.manual_seed(0)
    net = nn.Linear(3, 2 * d).to(dtype)
    bm = bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic",
                     noise_param=param)
    assert bm.is_fitted
    x = torch.randn(50, 3, dtype=dtype)
    pred = bm.predict(x)
    out = net(x).detach()
    var = {"log_variance": out[:, d:].exp(), "log_std": out[:, d:].mul(2).exp(),
           "softplus_std": F.softplus(out[:, d:]) ** 2}[param] + MIN_VAR
    squeeze = (lambda t: t[:, 0]) if d == 1 else (lambda t: t)
    assert pred.mean.shape == ((50,) if d == 1 else (50, d)) and pred.mean.dtype == dtype
    torch.testing.assert_close(pred.mean, squeeze(out[:, :d]))
    torch.testing.assert_close(pred.variance, squeeze(var))
    torch.testing.assert_close(pred.aleatoric_variance, pred.variance)
    # The raw columns a user's network emits are the parameterization's inverse.
    torch.testing.assert_close(to_raw(var - MIN_VAR), out[:, d:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bm(x), squeeze(out[:, :d]))


def test_fixed_noise_predicts_without_fit_and_homoscedastic_needs_fit():
    x = torch.randn(5, 3)
    fixed = bf.bayesify(nn.Linear(3, 2), "deterministic", task="regression", noise=0.3)
    torch.testing.assert_close(fixed.predict(x).stddev, torch.full((5, 2), 0.3))
    learned = bf.bayesify(nn.Linear(3, 2), "deterministic", task="regression")
    with pytest.raises(NotFittedError, match=r"call \.fit\(train\)"):
        learned.predict(x)


def test_noise_options_are_checked_in_user_terms():
    net = nn.Linear(3, 4)
    with pytest.raises(InputError, match="`noise_param` must be one of 'softplus'"):
        bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic",
                    noise_param="exp")
    with pytest.raises(InputError, match="`noise_param` applies to noise='heteroscedastic'"):
        bf.bayesify(net, "deterministic", task="regression", noise_param="log_variance")
    with pytest.raises(InputError, match="`beta` applies to noise='heteroscedastic'"):
        bf.bayesify(net, "deterministic", task="regression", noise=0.1, beta=0.5)
    with pytest.raises(InputError, match=r"`beta` must lie in \[0, 1\]"):
        bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic",
                    beta=1.5)
    with pytest.raises(InputError, match="`noise_param` applies to task='regression'"):
        bf.bayesify(net, "deterministic", task="classification", noise_param="log_std")
    with pytest.raises(InputError, match="`min_variance` must be >= 0"):
        GaussianNoise("heteroscedastic", min_variance=-1.0)
    bm = bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic",
                     noise_param="log_variance")
    with pytest.raises(InputError, match=r"needs \[N, 4\] \(means, then raw noise columns "
                                         r"r with σ² = exp\(r\)\)"):
        bm.noise.split(torch.zeros(3, 3))


def test_beta_zero_is_the_plain_nll(dtype):
    g = torch.Generator().manual_seed(1)
    mean, y = (torch.randn(20, 3, generator=g, dtype=torch.float64).to(dtype) for _ in "ab")
    variance = torch.rand(20, 3, generator=g, dtype=torch.float64).to(dtype) + 0.1
    assert torch.equal(beta_nll(mean, variance, y, 0.0), gaussian_nll(mean, variance, y))
    # Written out: mean over points of the summed -log N(y; μ, σ²).
    by_hand = (0.5 * (math.log(2 * math.pi) + variance.log() + (y - mean) ** 2 / variance)
               ).sum(-1).mean()
    torch.testing.assert_close(beta_nll(mean, variance, y, 0.0), by_hand)
    noise = GaussianNoise("heteroscedastic", num_outputs=3, dtype=dtype)
    output = torch.cat([mean, torch.randn(20, 3, generator=g, dtype=torch.float64).to(dtype)], 1)
    m, v = noise.split(output)
    assert torch.equal(noise.nll(output, y), gaussian_nll(m, v, y))


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_beta_nll_gradient_is_the_nll_gradient_times_detached_variance_power(beta, dtype):
    g = torch.Generator().manual_seed(2)
    output = torch.randn(16, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64).to(dtype)
    plain = GaussianNoise("heteroscedastic", num_outputs=2, noise_param="log_variance",
                          dtype=dtype)
    weighted = GaussianNoise("heteroscedastic", num_outputs=2, noise_param="log_variance",
                             beta=beta, dtype=dtype)
    grads = []
    for noise in (plain, weighted):
        raw = output.clone().requires_grad_()
        noise.nll(raw, y).backward()
        grads.append(raw.grad)
    variance = plain.split(output)[1]
    factor = torch.cat([variance, variance], 1) ** beta  # the mean's and the noise column's
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(grads[1], grads[0] * factor, **tol)
    # The weight carries no gradient of its own: the value is the weighted NLL.
    nll = -(-0.5 * (math.log(2 * math.pi) + variance.log()
                    + (y - output[:, :2]) ** 2 / variance))
    torch.testing.assert_close(weighted.nll(output, y), (nll * variance ** beta).sum(-1).mean(),
                               **tol)


def test_beta_nll_trains_a_heteroscedastic_network():
    """On y = sin(3x) + (0.05 + 0.3|x|) ε, β-NLL learns the mean and the noise's shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, generator=g, dtype=torch.float64) * 4 - 2
    std = 0.05 + 0.3 * x[:, 0].abs()
    y = torch.sin(3 * x[:, 0]) + std * torch.randn(400, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 2)).double()
    bm = bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic",
                     noise_param="log_variance", beta=0.5)
    bm.fit((x, y), epochs=300, lr=1e-2, batch_size=400, progress=False, seed=0)
    grid = torch.linspace(-1.9, 1.9, 200, dtype=torch.float64)[:, None]
    pred = bm.predict(grid)
    true_std = 0.05 + 0.3 * grid[:, 0].abs()
    # The mean within under half the typical noise std (0.35) of the truth (seeds 0-2
    # give 0.065-0.099).
    assert bf.calibration.rmse(pred.mean, torch.sin(3 * grid[:, 0])) < 0.15
    # The learned std follows the true one: same ordering, about the same size.
    rank = torch.corrcoef(torch.stack([pred.stddev.argsort().argsort().double(),
                                       true_std.argsort().argsort().double()]))[0, 1]
    assert rank > 0.8
    ratio = (pred.stddev / true_std).median()
    assert 0.6 < ratio < 1.6


def test_heteroscedastic_options_reach_ensemble_members_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    bm = bf.bayesify(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)), "ensemble",
                     task="regression", members=2, noise="heteroscedastic",
                     noise_param="log_std", beta=0.5)
    assert all(m.noise.noise_param == "log_std" and m.noise.beta == 0.5 for m in bm.members)
    bm.fit((x, y), epochs=2, progress=False, seed=0)
    pred = bm.predict(x[:5])
    assert pred.mean.shape == (5, 2) and bool(pred.variance.isfinite().all())
    det = bf.bayesify(nn.Linear(3, 4), "deterministic", task="regression",
                      noise="heteroscedastic", noise_param="log_variance")
    det.save(tmp_path / "het.pt")
    other = bf.bayesify(nn.Linear(3, 4), "deterministic", task="regression",
                        noise="heteroscedastic", noise_param="log_variance")
    other.load(tmp_path / "het.pt")
    torch.testing.assert_close(other.predict(x).variance, det.predict(x).variance)
