"""VBLL heads: each ELBO piece against a direct formula, gradcheck, and the exact BLR optimum."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from bayesify.layers import VBLLCovariance, VBLLDiscriminative, VBLLGenerative, VBLLRegression
from bayesify.layers.vbll_classification import generative_log_marginals, jensen_softmax_bound
from bayesify.layers.vbll_covariance import wishart_log_prior
from bayesify.layers.vbll_regression import regression_expected_log_likelihood

KINDS = ["dense", "diagonal", "lowrank"]


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter off its (structured) initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_covariance_terms_match_full_matrix(kind, dtype):
    cov = VBLLCovariance(3, 5, kind, rank=2 if kind == "lowrank" else None, dtype=dtype)
    _randomize(cov)
    phi = torch.randn(7, 5, dtype=dtype)
    S = cov.covariance().double()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    quad, trace, logdet = cov.terms(phi)
    assert quad.shape == (7, 3) and trace.shape == (3,) and logdet.shape == (3,)
    expected_quad = torch.einsum("bi,kij,bj->bk", phi.double(), S, phi.double())
    torch.testing.assert_close(quad.double(), expected_quad, rtol=tol, atol=tol)
    torch.testing.assert_close(trace.double(), S.diagonal(dim1=-2, dim2=-1).sum(-1),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(logdet.double(), torch.logdet(S), rtol=tol, atol=tol)
    torch.testing.assert_close(cov.diagonal().double(), S.diagonal(dim1=-2, dim2=-1),
                               rtol=tol, atol=tol)


def test_initialization_is_deterministic_and_near_the_prior():
    a, b = VBLLRegression(16, 2, covariance="dense"), VBLLRegression(16, 2, covariance="dense")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # Cholesky diagonal d^-½, unit noise: S = I/d, the prior of prior_scale=1.
    torch.testing.assert_close(a.cov.covariance()[0], torch.eye(16) / 16)
    torch.testing.assert_close(a.noise_variance(), torch.ones(2))
    # So the first loss on standardized data is of order one, not 1e7.
    a.regularization_weight = 1e-3
    phi, y = torch.randn(64, 16), torch.randn(64, 2)
    assert 1.0 < float(a.loss(phi, y).detach()) < 10.0


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(1)
    cov = VBLLCovariance(3, 4, "dense", dtype=torch.float64)
    _randomize(cov)
    mean = torch.randn(3, 4, dtype=torch.float64)
    s = 0.7
    kl = cov.kl(mean, s)
    for k in range(3):
        q = torch.distributions.MultivariateNormal(mean[k], cov.covariance()[k])
        p = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                                   s * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(kl[k], torch.distributions.kl_divergence(q, p),
                                   rtol=1e-12, atol=1e-12)


def test_wishart_log_prior_matches_dense_formula():
    log_var = torch.tensor([-0.3, 0.2, 1.1], dtype=torch.float64)
    dof, scale = 2.5, 0.4
    sigma = torch.diag(log_var.exp())
    nu = (dof + 3 + 1) / 2
    precision = torch.linalg.inv(sigma)
    expected = nu * torch.logdet(precision) - 0.5 * scale * torch.trace(precision)
    torch.testing.assert_close(wishart_log_prior(log_var, dof, scale), expected)


@torch.no_grad()
def test_regression_data_term_is_the_expected_log_likelihood():
    # E_{w~N(w̄,S)} log N(y | wᵀφ, σ²) by Monte Carlo over weights, float64.
    torch.manual_seed(2)
    head = VBLLRegression(3, 2, covariance="dense", bias=False, dtype=torch.float64)
    _randomize(head, seed=3)
    phi, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    mean, quad, noise_var = head.moments(phi)
    exact = regression_expected_log_likelihood(mean, quad, noise_var, y)
    L = head.cov.scale_tril()
    w = head.weight + torch.einsum("kij,skj->ski", L, torch.randn(200_000, 2, 3,
                                                                  dtype=torch.float64))
    pred = torch.einsum("bi,ski->sbk", phi, w)
    log_lik = -0.5 * (math.log(2 * math.pi) + noise_var.log() + (y - pred) ** 2 / noise_var)
    per_sample = log_lik.sum(-1).mean(-1)  # summed over outputs, averaged over rows
    se = float(per_sample.std()) / math.sqrt(per_sample.shape[0])
    assert abs(float(per_sample.mean()) - float(exact)) < 4 * se


def test_jensen_bound_formula_and_bound_property():
    torch.manual_seed(4)
    mean = torch.randn(5, 4, dtype=torch.float64)
    var = torch.rand(5, 4, dtype=torch.float64) + 0.1
    y = torch.tensor([0, 1, 2, 3, 1])
    bound = jensen_softmax_bound(mean, var, y)
    direct = torch.stack([mean[i, y[i]] - torch.log(torch.exp(mean[i] + var[i] / 2).sum())
                          for i in range(5)])
    torch.testing.assert_close(bound, direct)
    z = mean + var.sqrt() * torch.randn(100_000, 5, 4, dtype=torch.float64)
    mc = torch.log_softmax(z, -1).gather(2, y.expand(100_000, 5)[..., None])[..., 0].mean(0)
    assert bool((bound <= mc + 1e-3).all())


@pytest.mark.parametrize("kind", KINDS)
def test_generative_marginals_match_multivariate_normal(kind, dtype):
    head = VBLLGenerative(4, 3, covariance=kind, rank=2 if kind == "lowrank" else None,
                          dtype=dtype)
    _randomize(head, seed=5)
    phi = torch.randn(6, 4, dtype=dtype)
    got = generative_log_marginals(phi, head.means, head.cov, head.noise_variance())
    full = head.cov.covariance().double() + torch.diag(head.noise_variance().double())
    expected = torch.stack([
        torch.distributions.MultivariateNormal(head.means[k].double(), full[k]).log_prob(
            phi.double()) for k in range(3)], dim=-1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_generative_data_term_matches_direct_formula():
    head = VBLLGenerative(3, 2, covariance="dense", dtype=torch.float64)
    _randomize(head, seed=6)
    phi = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    sigma = torch.diag(head.noise_variance())
    S = head.cov.covariance()
    terms = []
    for i in range(5):
        own = torch.distributions.MultivariateNormal(head.means[y[i]], sigma).log_prob(phi[i])
        trace = torch.trace(torch.linalg.solve(sigma, S[y[i]]))
        marginals = torch.stack([torch.distributions.MultivariateNormal(
            head.means[k], sigma + S[k]).log_prob(phi[i]) for k in range(2)])
        terms.append(own - 0.5 * trace - torch.logsumexp(marginals, 0))
    torch.testing.assert_close(head.expected_log_likelihood(phi, y), torch.stack(terms).mean())


def _heads():
    for kind in KINDS:
        rank = 2 if kind == "lowrank" else None
        yield VBLLRegression(3, 2, covariance=kind, rank=rank), torch.randn(5, 2)
        yield VBLLDiscriminative(3, 3, covariance=kind, rank=rank), torch.tensor([0, 1, 2, 1, 0])
        yield VBLLGenerative(3, 2, covariance=kind, rank=rank), torch.tensor([0, 1, 1, 0, 1])


_HEADS = list(_heads())


@pytest.mark.parametrize("head,y", _HEADS,
                         ids=[f"{type(h).__name__}-{h.covariance}" for h, _ in _HEADS])
def test_loss_gradcheck(head, y):
    head = head.double()
    head.regularization_weight = 0.1
    _randomize(head, seed=7, scale=0.2)
    phi = torch.randn(5, 3, dtype=torch.float64)
    y = y.double() if y.is_floating_point() else y
    wrapper = _LossOf(head)
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())

    def loss(*values):
        return functional_call(wrapper, dict(zip(names, values, strict=True)), (phi, y))

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


class _LossOf(torch.nn.Module):
    """A module whose forward is a head's loss, so functional_call can vary its weights."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head.loss(phi, y)


@pytest.mark.parametrize("kind", ["dense", "diagonal"])
def test_regression_head_converges_to_exact_bayesian_linear_regression(kind):
    """Frozen random features, two outputs, learned noise: at the ELBO's optimum the head
    is the exact BLR posterior (dense) or its mean-field optimum, which has the exact mean
    and variances 1/diag(precision) (diagonal), under the learned noise σ_k².

    Tolerance: predictive means and epistemic variances within 1e-4 relative. N = 40
    keeps the prior visible, so a multi-output ELBO averaged over outputs instead of
    summed (prior weight doubled) would miss by about 1%.
    """
    torch.manual_seed(8)
    n, d, m = 40, 5, 2
    x = torch.randn(n + 30, 3, dtype=torch.float64)
    features = torch.tanh(x @ torch.randn(3, d, dtype=torch.float64) + 0.3)
    phi, phi_test = features[:n], features[n:]
    y = phi @ torch.randn(d, m, dtype=torch.float64) + 0.3 * torch.randn(n, m,
                                                                          dtype=torch.float64)
    head = VBLLRegression(d, m, covariance=kind, bias=False, regularization_weight=1 / n,
                          dtype=torch.float64)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = head.loss(phi, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        pred = head.predict(phi_test)
        noise_var = head.noise_variance()
        for k in range(m):
            eye = torch.eye(d, dtype=torch.float64)
            precision = eye / head.prior_var + phi.T @ phi / noise_var[k]
            mean = torch.linalg.solve(precision, phi.T @ y[:, k]) / noise_var[k]
            if kind == "dense":
                epistemic = (phi_test @ torch.linalg.solve(precision, phi_test.T)).diagonal()
            else:
                epistemic = phi_test.pow(2) @ (1 / precision.diagonal())
            torch.testing.assert_close(pred.mean[:, k], phi_test @ mean, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(pred.epistemic_variance[:, k], epistemic, rtol=1e-4,
                                       atol=1e-8)
            torch.testing.assert_close(pred.aleatoric_variance[:, k],
                                       noise_var[k].expand(30), rtol=0, atol=0)
