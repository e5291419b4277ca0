"""Laplace: exact references (Bayesian linear regression, jacrev GGNs, quadrature),
hyperparameter recovery, BatchNorm and non-Sequential networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import bayesify as bf
from bayesify.posterior import GaussianPosterior
from bayesify.testing import check_method

TOL = {torch.float64: 1e-6, torch.float32: 2e-3}


def _features_problem(dtype, outputs=1, n=300, noise=(0.3,), seed=0):
    """Frozen random tanh features, y = sin(x₀) + 0.5x₁ (+ a second output), noise σ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    clean = torch.stack([torch.sin(x[:, 0]) + 0.5 * x[:, 1], torch.cos(x[:, 2])], 1)
    y = clean[:, :outputs] + torch.tensor(noise[:outputs]) * torch.randn(n, outputs, generator=g,
                                                                         dtype=torch.float64)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, outputs)).double()
    return net, x, y


def _blr(phi, y, sigma, delta):
    """Exact Bayesian linear regression per output: covariance [D, d, d], mean [D, d],
    and the log evidence."""
    covs, means, evidence = [], [], 0.0
    for k in range(y.shape[1]):
        precision = phi.T @ phi / sigma[k] ** 2 + delta * torch.eye(phi.shape[1], dtype=phi.dtype)
        cov = torch.linalg.inv(precision)
        covs.append(cov)
        means.append(cov @ phi.T @ y[:, k] / sigma[k] ** 2)
        marginal = sigma[k] ** 2 * torch.eye(len(y), dtype=phi.dtype) + phi @ phi.T / delta
        evidence += torch.distributions.MultivariateNormal(
            torch.zeros(len(y), dtype=phi.dtype), marginal).log_prob(y[:, k])
    return torch.stack(covs), torch.stack(means), evidence


@pytest.mark.parametrize("hessian", ["full", "kron"])
@pytest.mark.parametrize("outputs", [1, 2])
def test_last_layer_equals_bayesian_linear_regression(hessian, outputs, dtype):
    net, x, y = _features_problem(torch.float64, outputs, noise=(0.3, 0.5))
    sigma, delta = [0.3, 0.5][:outputs], 2.0
    phi = torch.cat([torch.tanh(net[0](x)), torch.ones(len(x), 1, dtype=x.dtype)], 1).detach()
    cov, mean, evidence = _blr(phi, y, sigma, delta)
    with torch.no_grad():  # the MAP of a linear-Gaussian model is the posterior mean
        net[2].weight.copy_(mean[:, :-1])
        net[2].bias.copy_(mean[:, -1])
    xt = torch.randn(8, 3, dtype=torch.float64)
    phit = torch.cat([torch.tanh(net[0](xt)), torch.ones(8, 1, dtype=xt.dtype)], 1)
    exact = torch.einsum("ni,kij,mj->knm", phit, cov, phit).detach()      # [D, 8, 8]
    net = net.to(dtype)
    bm = bf.bayesify(net, "laplace", task="regression", hessian=hessian, prior_precision=delta,
                     sigma_noise=sigma, tune=None).fit((x.to(dtype), y.to(dtype)))
    post = bm.posterior(xt.to(dtype).reshape(2, 4, 3), joint=True)
    assert post.kind == "joint" and post.covariance.shape == (2, outputs, 4, 4)
    for b in range(2):
        got = post.covariance[b].double()
        want = exact[:, 4 * b:4 * b + 4, 4 * b:4 * b + 4]
        assert torch.allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max())
    pred = bm.predict(xt.to(dtype))
    var = exact.diagonal(dim1=1, dim2=2).T.squeeze(-1)
    assert torch.allclose(pred.epistemic_variance.double(), var, rtol=TOL[dtype])
    noise = torch.tensor(sigma, dtype=torch.float64) ** 2
    assert torch.allclose(pred.variance.double(), var + noise.squeeze(-1), rtol=TOL[dtype])
    lml = bm.log_marginal_likelihood().double()
    assert abs(float(lml - evidence)) <= TOL[dtype] * abs(float(evidence))
    # the weight covariance itself: φ̃ = unit vectors read off Σ's blocks per output
    eye = torch.eye(cov.shape[-1], dtype=dtype)
    weights = bm.structure.ll_cov(bm._factor(), eye, outputs, "joint").double()
    assert torch.allclose(weights, cov, rtol=TOL[dtype], atol=TOL[dtype] * cov.abs().max())


def _ggn_reference(net, x, y, task, ef=False):
    """Σ_n J_nᵀ Λ_n J_n (or Σ g gᵀ) in named_parameters order, from torch.func.jacrev."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def f(theta, xi):
        params, pos = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[pos:pos + math.prod(shape)].reshape(shape)
            pos += math.prod(shape)
        return functional_call(net, params, (xi[None],))[0]

    jac = torch.stack([jacrev(f)(flat, xi) for xi in x])                 # [N, K, P]
    out = torch.stack([f(flat, xi) for xi in x]).detach()
    if task == "classification":
        p = torch.softmax(out, -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if ef:
            g = torch.einsum("nk,nkp->np", p - nn.functional.one_hot(y, p.shape[1]), jac)
            return g.T @ g
        return torch.einsum("nkp,nkl,nlq->pq", jac, lam, jac)
    return torch.stack([jac[:, k].T @ jac[:, k] for k in range(out.shape[1])])  # unit noise


def _layout_order(net):
    """Positions of the named_parameters entries in bayesify's [W | b] layout."""
    order, offset = [], 0
    for m in net.modules():
        if isinstance(m, nn.Linear):
            rows = torch.arange(m.out_features)[:, None] * (m.in_features + 1)
            order += [(offset + rows + torch.arange(m.in_features)).reshape(-1),
                      offset + rows[:, 0] + m.in_features]
            offset += m.out_features * (m.in_features + 1)
    return torch.cat(order)


class Residual(nn.Module):
    """Not Sequential: a skip connection around a hidden block."""

    def __init__(self, k):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, k)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.relu(self.hidden(h)))


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("make", [lambda k: nn.Sequential(nn.Linear(4, 5), nn.Tanh(),
                                                          nn.Linear(5, k)), Residual])
def test_ggn_equals_jacrev_reference(task, make):
    torch.manual_seed(1)
    k = 3 if task == "classification" else 2
    net = make(k).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,)) if task == "classification" else torch.randn(12, 2).double()
    order = _layout_order(net)
    ref = _ggn_reference(net, x, y, task)
    for hessian in ("full", "diag"):
        bm = bf.bayesify(net, "laplace", task=task, subset="all", hessian=hessian,
                         tune=None).fit((x, y))
        got = bm.structure.curvature                      # bayesify's [W | b] order
        if hessian == "full":
            got = got[..., order, :][..., order]
        else:
            got = got[..., order]
        want = ref if hessian == "full" else ref.diagonal(dim1=-2, dim2=-1)
        assert torch.allclose(got.reshape(want.shape), want, atol=1e-8, rtol=0)
    if task == "classification":
        bm = bf.bayesify(net, "laplace", task=task, subset="all", hessian="full", curvature="ef",
                         tune=None).fit((x, y))
        want = _ggn_reference(net, x, y, task, ef=True)
        got = bm.structure.curvature[0][order][:, order]
        assert torch.allclose(got, want, atol=1e-8, rtol=0)
        low = bf.bayesify(net, "laplace", task=task, subset="all", hessian="lowrank", rank=24,
                          tune=None).fit((x, y))   # rank(GGN) <= 12 points x 2 = 24
        u, lam = low.structure.eigenvectors[order], low.structure.eigenvalues
        assert torch.allclose(u * lam @ u.T, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("conv", [False, True])
def test_kron_is_exact_for_one_point(conv):
    """With one input (and one output position) K-FAC's blocks are the exact GGN's."""
    torch.manual_seed(2)
    if conv:
        net = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)).double()
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([1])
    full = bf.bayesify(net, "laplace", task="classification", subset="all", hessian="full",
                       tune=None).fit((x, y)).structure.curvature[0]
    kron = bf.bayesify(net, "laplace", task="classification", subset="all", tune=None
                       ).fit((x, y)).structure
    start = 0
    for i, g in enumerate(kron.groups):
        block = torch.kron(getattr(kron, f"g_{i}")[0], getattr(kron, f"a_{i}"))
        block = block / float(getattr(kron, f"count_{i}"))
        size = g.size
        assert torch.allclose(block, full[start:start + size, start:start + size], atol=1e-10)
        start += size


def test_marglik_recovers_per_output_noise():
    g = torch.Generator().manual_seed(3)
    n = 3000
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 6 - 3
    clean = torch.stack([torch.sin(x[:, 0]) + 0.5 * torch.cos(2 * x[:, 1]), 0.3 * x[:, 0]], 1)
    y = clean + torch.tensor([0.3, 0.1]) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 100), nn.Tanh(), nn.Linear(100, 2)).double()
    phi = torch.cat([torch.tanh(net[0](x)), torch.ones(n, 1, dtype=x.dtype)], 1).detach()
    head = torch.linalg.solve(phi.T @ phi + 1e-3 * torch.eye(101, dtype=x.dtype), phi.T @ y)
    with torch.no_grad():
        net[2].weight.copy_(head[:-1].T)
        net[2].bias.copy_(head[-1])
    bm = bf.bayesify(net, "laplace", task="regression", sigma_noise=1.0).fit((x, y))
    sigma = bm.sigma_noise
    assert abs(float(sigma[0]) - 0.3) < 0.05 and abs(float(sigma[1]) - 0.1) < 0.05
    start = bf.bayesify(net, "laplace", task="regression", sigma_noise=1.0, tune=None).fit((x, y))
    assert float(bm.log_marginal_likelihood()) > float(start.log_marginal_likelihood())


def _binary_problem(dtype=torch.float64):
    torch.manual_seed(4)
    x = torch.randn(300, 2, dtype=dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(300, dtype=dtype) > 0).long()
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    bf.bayesify(net, "deterministic", task="classification").fit((x, y), epochs=30, seed=0)
    return net, x, y


def test_probit_and_mc_agree_with_the_exact_integral():
    net, x, y = _binary_problem()
    xt = torch.randn(40, 2, dtype=torch.float64) * 2
    bm = bf.bayesify(net, "laplace", task="classification", approximation="mc",
                     hessian="full").fit((x, y))
    post = bm.posterior(xt)
    assert post.kind == "output"
    cov = post.covariance.detach()
    mean = (post.mean[:, 1] - post.mean[:, 0]).detach()
    std = (cov[:, 1, 1] + cov[:, 0, 0] - 2 * cov[:, 0, 1]).sqrt()
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)   # E[sigmoid(f₁ − f₀)]
    exact = (torch.sigmoid(mean[:, None] + std[:, None] * torch.tensor(nodes))
             * torch.tensor(weights / math.sqrt(2 * math.pi))).sum(1)
    samples = 4000
    mc = bm.predict(xt, num_samples=samples, seed=0).probs[:, 1]
    se = (exact * (1 - exact) / samples).sqrt()  # an upper bound on the MC standard error
    assert bool(((mc - exact).abs() <= 4 * se + 1e-12).all())
    bm.likelihood.approximation = "probit"
    probit = bm.predict(xt).probs[:, 1]
    diagonal = bm.posterior(xt)
    assert diagonal.kind == "diagonal"
    # the standard probit: the diagonal of J Σ Jᵀ (not of the centered logits; see laplace.py)
    assert torch.allclose(diagonal.variance, cov.diagonal(dim1=-2, dim2=-1), atol=1e-12)
    want = torch.softmax(post.mean.detach() / (1 + math.pi / 8 * diagonal.variance).sqrt(), -1)
    assert torch.allclose(probit, want[:, 1], atol=1e-12)
    # probit is an approximation: it agrees with MC up to its own error (|Δp| < 0.05 here)
    assert float((probit - mc).abs().max()) < 0.05 + 4 * float(se.max())
    bm.likelihood.approximation = "bridge"
    bridge = bm.predict(xt).probs
    assert torch.allclose(bridge.sum(1), torch.ones(40, dtype=torch.float64))
    assert float((bridge[:, 1] - exact).abs().max()) < 0.05


def test_laplace_bridge_formula_and_overflow():
    from bayesify.inference.laplace_likelihood import laplace_bridge

    mean = torch.tensor([[1.0, -0.5, 0.2]], dtype=torch.float64)
    var = torch.tensor([[0.3, 0.5, 0.2]], dtype=torch.float64)
    k = 3
    alpha = (1 - 2 / k + mean.exp() / k**2 * (-mean).exp().sum()) / var
    assert torch.allclose(laplace_bridge(mean, variance=var), alpha / alpha.sum())
    huge = laplace_bridge(torch.tensor([[1e4, 0.0, -1e4]]), variance=torch.ones(1, 3))
    assert bool(torch.isfinite(huge).all()) and float(huge[0, 0]) > 0.99


def _bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 3))


@pytest.mark.parametrize("options", [{}, {"subset": "all"}, {"subset": "all", "hessian": "diag"},
                                     {"subset": ["3", "7"], "predictive": "nn"}])
def test_batchnorm_cnn_keeps_running_statistics(options, dtype):
    torch.manual_seed(5)
    net = _bn_cnn().to(dtype)
    x = torch.randn(64, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 3, (64,))
    net.train()
    net(x)  # running statistics that differ from their initial values
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bm = bf.bayesify(net, "laplace", task="classification", **options).fit((x, y))
    pred = bm.predict(x[:10], seed=0)
    bm.posterior(x[:4].requires_grad_()).mean.sum().backward()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert net.training and net[1].training  # the user's flags are restored
    assert bool(torch.isfinite(pred.probs).all())
    assert pred.probs.dtype == dtype


@pytest.mark.parametrize("options", [{"subset": "all"}, {"subset": "all", "hessian": "full"},
                                     {"hessian": "lowrank", "rank": 5}])
def test_skip_connection_model(options):
    torch.manual_seed(6)
    net = Residual(1)
    x = torch.randn(50, 4)
    y = x[:, 0] + 0.1 * torch.randn(50)
    bm = bf.bayesify(net, "laplace", task="regression", **options).fit((x, y))
    post = bm.posterior(x[:6].reshape(2, 3, 4), joint=True)
    assert isinstance(post, GaussianPosterior) and post.kind == "joint"
    flat = bm.posterior(x[:6])
    assert torch.allclose(post.variance.reshape(6, 1), flat.variance, rtol=1e-4, atol=1e-7)
    assert bool((torch.linalg.eigvalsh(post.covariance.double()) > -1e-6).all())


def test_tuning_grid_and_differentiable_evidence(dtype):
    net, x, y = _binary_problem(dtype)
    bm = bf.bayesify(net, "laplace", task="classification", subset="all", tune=None).fit((x, y))
    start = float(bm.log_marginal_likelihood())
    bm.optimize_prior_precision("marglik", structure="layer")
    assert bm.prior_precision.shape == (2,) and float(bm.log_marginal_likelihood()) > start
    prior = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(bm.log_marginal_likelihood(prior), prior)
    step = 0.05
    numeric = (bm.log_marginal_likelihood(2.0 + step) - bm.log_marginal_likelihood(2.0 - step))
    assert math.isclose(float(grad), float(numeric) / (2 * step), rel_tol=2e-2, abs_tol=1e-3)
    bm.optimize_prior_precision("grid", val=(x[:100], y[:100]), grid=[0.01, 1.0, 100.0])
    assert float(bm.prior_precision) in (0.01, 1.0, 100.0)


@pytest.mark.parametrize("options", [
    {"subset": "all", "hessian": "kron"}, {"subset": "subnetwork", "subnetwork_size": 20},
    {"hessian": "lowrank", "predictive": "nn"}, {"approximation": "bridge"},
    {"subset": "all", "curvature": "ef", "hessian": "diag"}])
def test_conformance_of_other_structures(options, dtype):
    for task in bf.TASKS:
        if task == "regression" and "approximation" in options:
            continue
        check_method("laplace", task, dtype=dtype, options=options,
                     checks=["types_and_shapes", "dtype_device", "save_load", "finite"])


@pytest.mark.parametrize("hessian", ["full", "kron", "diag", "lowrank"])
def test_last_layer_closed_form_equals_the_jacobian_route(hessian):
    """The head's closed form in φ̃ equals Jacobians of the same head (subset=[name]):
    the same curvature, evidence and predictive; and every structured covariance equals
    J Σ Jᵀ from the structure's square root."""
    from bayesify.layers.laplace_posterior import _cov_from_sqrt, _ll_jacobian

    torch.manual_seed(7)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (60,))
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    options = {"hessian": hessian, "tune": None, "prior_precision": 0.5}
    if hessian == "lowrank":
        options["rank"] = 28   # all of P = 4 x 7: exact
    closed = bf.bayesify(net, "laplace", task="classification", **options).fit((x, y))
    jac = bf.bayesify(net, "laplace", task="classification", subset=["2"], **options
                      ).fit((x, y))
    assert torch.allclose(closed.log_marginal_likelihood(), jac.log_marginal_likelihood(),
                          rtol=1e-10)
    xt = torch.randn(9, 5, dtype=torch.float64)
    for approximation in ("probit", "mc"):
        closed.likelihood.approximation = jac.likelihood.approximation = approximation
        a, b = closed.posterior(xt), jac.posterior(xt)
        assert torch.allclose(a.covariance, b.covariance, atol=1e-10)
    fac, structure = closed._factor(), closed.structure
    _, phi = closed._features(xt)
    for mode in ("diag", "output", "joint"):
        want = _cov_from_sqrt(structure.apply_sqrt(fac, _ll_jacobian(phi, 4)), mode)
        got = structure.ll_cov(fac, phi, 4, mode)
        assert torch.allclose(got, want, atol=1e-10), mode


def test_botorch_gets_the_joint_covariance():
    from bayesify.bo import as_botorch_model

    net, x, y = _features_problem(torch.float64, n=60)
    bm = bf.bayesify(net, "laplace", task="regression", subset="all").fit((x, y[:, 0]))
    blocks = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    cov = as_botorch_model(bm).posterior(blocks).mvn.covariance_matrix
    assert cov.shape == (4, 3, 3)
    got = cov.detach()
    off = got - torch.diag_embed(got.diagonal(dim1=-2, dim2=-1))
    assert float(off.abs().max()) > 1e-6 * float(got.abs().max())   # correlated points
    assert torch.allclose(got, bm.posterior(blocks, joint=True).covariance[:, 0].detach())
    cov.sum().backward()
    assert bool(torch.isfinite(blocks.grad).all())
