"""Mean-field Bayesian Linear/Conv2d layers: conversion, LRT moments, KL, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayesify._linalg import gaussian_kl
from bayesify.errors import InputError
from bayesify.layers.bayesian import (
    BayesianConv2d,
    BayesianLinear,
    inverse_softplus,
    sampling_mode,
)


def _normal_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Elementwise KL(N(mu, sigma^2) || N(0, prior_std^2)) from torch.distributions."""
    return torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma),
        torch.distributions.Normal(torch.zeros_like(mu), torch.full_like(mu, prior_std)))

CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", groups=2),
    dict(kernel_size=3, padding=2, padding_mode="reflect", dilation=2),
    dict(kernel_size=1, stride=(2, 1), padding=1, padding_mode="circular", bias=False),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_mean_mode_equals_the_module(case, dtype):
    conv = nn.Conv2d(4, 6, **case).to(dtype)
    layer = BayesianConv2d.from_module(conv)
    x = torch.randn(3, 4, 9, 8, dtype=dtype)
    with sampling_mode(layer, "mean"):
        out = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, conv(x), atol=tol, rtol=tol)
    assert layer.weight_mu.dtype == dtype


def test_linear_mean_mode_equals_the_module(dtype):
    linear = nn.Linear(5, 3).to(dtype)
    layer = BayesianLinear.from_module(linear, init_std=0.05)
    x = torch.randn(7, 2, 5, dtype=dtype)  # extra leading axes work as for nn.Linear
    with sampling_mode(layer, "mean"):
        torch.testing.assert_close(layer(x), linear(x))
    torch.testing.assert_close(layer.weight_std, torch.full((3, 5), 0.05, dtype=dtype))


@pytest.mark.parametrize("mode", ["lrt", "weights"])
def test_sampled_moments_match_the_closed_form(mode):
    # Given the input, a pre-activation is Gaussian with mean op(x; mu) and variance
    # op(x^2; sigma^2) + bias variance; both sampling modes must reproduce it.
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, kernel_size=3, stride=2, padding=1, groups=2).double()
    layer = BayesianConv2d.from_module(conv, init_std=0.3)
    layer.set_mask(torch.rand(layer.mask.shape) < 0.6)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        mean = layer._op(x, layer.weight_mu * layer.mask, layer.bias_mu)
        var = layer._op(x * x, layer.weight_std ** 2, layer.bias_std ** 2)
        generator = torch.Generator().manual_seed(0)
        with sampling_mode(layer, mode, generator):
            if mode == "lrt":  # fresh noise per example: one batched call
                n = 4000
                draws = layer(x.expand(n, -1, -1, -1))
            else:  # one weight sample per call
                n = 500
                draws = torch.cat([layer(x) for _ in range(n)])
    # 5 standard errors of the mean and of the variance (Gaussian: sd(s^2) = var sqrt(2/n)).
    assert (draws.mean(0) - mean).abs().max() <= 5 * (var / n).sqrt().max()
    assert ((draws.var(0) - var).abs() <= 5 * var * (2 / n) ** 0.5 + 1e-12).all()


def test_the_package_kl_in_mean_field_form_matches_torch_distributions(dtype):
    # The one Gaussian KL of the package, with each entry a 1-d Gaussian.
    mu = torch.randn(10, dtype=dtype)
    sigma = torch.rand(10, dtype=dtype) + 0.1
    kl = gaussian_kl(mu[:, None], sigma**2, torch.log(sigma**2), 0.7**2)
    torch.testing.assert_close(kl, _normal_kl(mu, sigma, 0.7))


def test_kl_sums_over_active_weights_only(dtype):
    layer = BayesianLinear(6, 4, prior_std=0.5, init_std=0.1, dtype=dtype)
    with torch.no_grad():
        layer.bias_rho.normal_()
    mask = torch.rand(4, 6) < 0.5
    layer.set_mask(mask)
    expected = (_normal_kl(layer.weight_mu[mask], torch.full((int(mask.sum()),), 0.1,
                                                              dtype=dtype), 0.5).sum()
                + _normal_kl(layer.bias_mu, layer.bias_std, 0.5).sum())
    kl = layer.kl()
    torch.testing.assert_close(kl, expected)
    assert kl.dtype == dtype


def test_inactive_weights_are_zero_and_get_no_gradient():
    layer = BayesianLinear(8, 5, init_std=0.1)
    mask = torch.rand(5, 8) < 0.3
    layer.set_mask(mask)
    assert (layer.weight_mu[~mask] == 0).all() and (layer.weight_rho[~mask] == 0).all()
    (layer(torch.randn(16, 8)).pow(2).sum() + layer.kl()).backward()
    assert (layer.weight_mu.grad[~mask] == 0).all()
    assert (layer.weight_rho.grad[~mask] == 0).all()
    assert layer.weight_mu.grad[mask].abs().sum() > 0


def test_dense_gradient_is_the_gradient_of_the_effective_weight():
    layer = BayesianConv2d(3, 4, 3, padding=1)
    layer.set_mask(torch.rand(layer.mask.shape) < 0.2)
    x = torch.randn(2, 3, 6, 6)
    layer.record_dense_grad = True
    with sampling_mode(layer, "mean"):
        layer(x).sin().sum().backward()
    weight = (layer.weight_mu * layer.mask).detach().requires_grad_(True)
    torch.nn.functional.conv2d(x, weight, layer.bias_mu.detach(), padding=1).sin().sum().backward()
    torch.testing.assert_close(layer.dense_grad, weight.grad)
    assert (layer.dense_grad[~layer.mask] != 0).any()  # inactive entries are included


def test_sampling_mode_restores_modes_when_the_body_raises():
    model = nn.Sequential(BayesianLinear(2, 2), nn.ReLU(), BayesianLinear(2, 1))
    with pytest.raises(RuntimeError, match="boom"), sampling_mode(model, "mean"):
        assert model[0].sampling == "mean"
        raise RuntimeError("boom")
    assert model[0].sampling == "lrt" and model[2].sampling == "lrt"


def test_forward_flops_count_active_weights():
    layer = BayesianConv2d(2, 3, 3, stride=2, padding=1)
    layer.set_mask(torch.arange(layer.num_weights).reshape(layer.mask.shape) < 10)
    layer(torch.randn(4, 2, 8, 8))
    positions = 4 * 4  # 8x8 input, stride 2
    assert layer.forward_flops() == positions * (2 * 2 * 10 + 2 * 3)
    assert layer.forward_flops(dense=True) == positions * (2 * 2 * 54 + 2 * 3)


def test_inverse_softplus_round_trips(dtype):
    sigma = torch.tensor([1e-4, 6e-4, 0.1, 3.0, 50.0], dtype=dtype)
    torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(sigma)), sigma)


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="`prior_std` must be > 0"):
        BayesianLinear(2, 2, prior_std=0.0)
    with pytest.raises(InputError, match="`init_std` must be > 0"):
        BayesianLinear(2, 2, init_std=-1.0)
    with pytest.raises(InputError, match="`module` must be an nn.Linear"):
        BayesianLinear.from_module(nn.Conv2d(1, 1, 1))
    with pytest.raises(InputError, match="`module` must be an nn.Conv2d"):
        BayesianConv2d.from_module(nn.Linear(1, 1))
    with pytest.raises(InputError, match="`groups` .* must divide"):
        BayesianConv2d(3, 4, 3, groups=2)
    layer = BayesianLinear(2, 2)
    with pytest.raises(InputError, match="`mask` must be a bool tensor of shape"):
        layer.set_mask(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="`mode` must be one of"), sampling_mode(layer, "x"):
        pass
    with pytest.raises(InputError, match="has not seen an input yet"):
        layer.forward_flops()
