"""TFB's σ_q search: the bisection on closed forms, and the whole method on a linear LoRA
regressor whose NLL as a function of σ_q is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from torch import nn

import bayesify as bf
from bayesify.inference.tfb import bisect_scale

peft = pytest.importorskip("peft")

TAU, D_IN, N = 0.5, 3, 400


def _closed_form_nll(r: torch.Tensor, c: torch.Tensor, sigma: float) -> float:
    """mean_i NLL of N(r_i; 0, τ² + σ² c_i), float64."""
    var = TAU ** 2 + sigma ** 2 * c
    return float((0.5 * torch.log(2 * math.pi * var) + r ** 2 / (2 * var)).mean())


def _root(r: torch.Tensor, c: torch.Tensor, tol: float) -> float:
    """σ* with a relative NLL degradation of exactly ``tol`` (to 1e-14)."""
    base = _closed_form_nll(r, c, 0.0)
    return brentq(lambda v: (_closed_form_nll(r, c, v) - base) / abs(base) - tol,
                  1e-6, 10.0, xtol=1e-14)


def _problem(seed: int):
    """X [N, 3], the residuals r [N] and c_i = s²‖x_i‖², float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    r = TAU * torch.randn(N, generator=g, dtype=torch.float64)
    return x, r


@pytest.mark.parametrize("log_scale", [True, False])
def test_bisection_returns_the_largest_scale_within_tolerance(log_scale):
    x, r = _problem(0)
    c = x.pow(2).sum(1)
    base = _closed_form_nll(r, c, 0.0)
    tol = 0.05

    def degradation(sigma: float) -> float:
        return (_closed_form_nll(r, c, sigma) - base) / abs(base)

    exact = _root(r, c, tol)
    low, high, steps = 1e-3, 2.0, 12
    sigma, path = bisect_scale(degradation, tol, low=low, high=high, iterations=steps,
                               log_scale=log_scale)
    assert degradation(sigma) <= tol
    if log_scale:
        step = (high / low) ** (1 / 2 ** steps)
        assert sigma <= exact < sigma * step
    else:
        assert sigma <= exact < sigma + (high - low) / 2 ** steps
    assert len(path) == steps + 2 and path[0][0] == high and path[1][0] == low
    passing = [s for s, d in path if d <= tol]
    assert sigma == max(passing)


def test_bisection_ends_of_the_interval():
    sigma, path = bisect_scale(lambda s: 0.0, 0.1, low=1e-3, high=1.0, iterations=5)
    assert sigma == 1.0 and path == [(1.0, 0.0)]
    sigma, path = bisect_scale(lambda s: 1.0, 0.1, low=1e-3, high=1.0, iterations=5)
    assert sigma == 0.0 and [s for s, _ in path] == [1.0, 1e-3]


def _lora_linear_model(dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, 1)).to(dtype)
    return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"],
                                                     init_lora_weights=False))


def _nll_standard_error(bm, x: torch.Tensor, y: torch.Tensor, samples: int) -> float:
    """Monte Carlo standard error of the S-draw mixture NLL, from the method's own draws:
    the NLL's error is, to first order, mean_i (p̄_i − E p_i) / E p_i = mean over draws s
    of w_s = mean_i p_si / p̄_i (minus one), whose draws are independent."""
    with torch.no_grad():
        f = bm.posterior(x, num_samples=samples, seed=123).samples[..., 0]      # [S, N]
    p = torch.exp(-(y - f) ** 2 / (2 * TAU ** 2))
    w = (p / p.mean(0)).mean(1)
    return float(w.std() / math.sqrt(samples))


def test_the_method_finds_the_closed_form_scale_of_a_linear_lora_regressor():
    """A Linear(3, 1) with a LoRA adapter: the output noise is σ·s·(z·x), z ~ N(0, I), so
    with fixed noise τ the predictive is N(μ, τ² + σ² s² ‖x‖²) as the draws grow, and
    its NLL is a closed form in σ. The search (S = 4000 draws) must land on its root."""
    dtype, samples, tol = torch.float64, 4000, 0.05
    for seed in range(3):
        net = _lora_linear_model(dtype)
        x, r = _problem(seed)
        with torch.no_grad():
            mu = net(x)[:, 0]
        y = mu + r
        layer = net.base_model.model[0]
        s = layer.scaling["default"]
        c = s ** 2 * x.pow(2).sum(1)
        base = _closed_form_nll(r, c, 0.0)
        exact = _root(r, c, tol)
        bm = bf.bayesify(net, "tfb", task="regression", noise=TAU, tolerance=tol,
                         num_samples=samples, sigma_min=1e-3, sigma_max=1.0, iterations=12,
                         search_batch_size=N)
        bm.fit((x, y), progress=False, seed=seed)
        assert bm.search_path[0] == (0.0, pytest.approx(base, rel=1e-12))
        step = math.log(1e3) / 2 ** 12
        # the degradation's slope at the root turns its MC error into one on log σ
        h = 1e-4 * exact
        slope = ((_closed_form_nll(r, c, exact + h) - _closed_form_nll(r, c, exact - h))
                 / (2 * h) / abs(base)) * exact
        margin = step + 4 * _nll_standard_error(bm, x, y, samples) / abs(base) / slope
        assert abs(math.log(bm.sigma_q) - math.log(exact)) <= margin, (bm.sigma_q, exact)


def test_the_search_path_is_reported_in_order():
    net = _lora_linear_model(torch.float64)
    x, r = _problem(1)
    with torch.no_grad():
        y = net(x)[:, 0] + r
    bm = bf.bayesify(net, "tfb", task="regression", noise=TAU, iterations=6,
                     num_samples=64, search_batch_size=N)
    bm.fit((x, y), progress=False, seed=0)
    path = bm.search_path
    assert [s for s, _ in path[:3]] == pytest.approx([0.0, 1.0, 1e-4])
    assert len(path) == 6 + 3
    base = path[0][1]
    passing = [s for s, m in path[1:] if (m - base) / abs(base) <= 0.01]
    assert bm.sigma_q == pytest.approx(max(passing), rel=1e-6)
