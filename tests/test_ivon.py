"""The IVON optimizer: its update against METHODS.md by hand, the posterior it reaches on
Bayesian linear regression, and the torch.optim contract (groups, schedulers, state)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from bayesify import BayesifyError
from bayesify.optim.ivon import IVON, hessian_update, ivon_mean_update, price_hessian


def _quadratic(dtype: torch.dtype):
    """Two parameters in two groups and a loss with cross terms between their entries."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 2, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(4, generator=g, dtype=dtype).requires_grad_()
    A = torch.randn(8, 8, generator=g, dtype=dtype)
    H = A @ A.T / 8 + torch.eye(8, dtype=dtype)
    c = torch.randn(8, generator=g, dtype=dtype)

    def loss() -> torch.Tensor:
        theta = torch.cat([a.reshape(-1), b[:2] * b[2:]])
        return 0.5 * theta @ H @ theta - c @ theta + b.sin().sum()

    return a, b, loss


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("clip_radius", [math.inf, 0.05])
def test_two_steps_match_the_formulas_by_hand(dtype, hess_approx, clip_radius):
    a, b, loss_fn = _quadratic(dtype)
    hp = dict(hess_init=0.7, beta1=0.8, beta2=0.9, hess_approx=hess_approx,
              clip_radius=clip_radius)
    groups = [dict(params=[a], lr=0.3, ess=50.0, weight_decay=0.01),
              dict(params=[b], lr=0.1, ess=20.0, weight_decay=0.0)]
    opt = IVON(groups, lr=1.0, ess=1.0, seed=0, **hp)
    expected = {p: dict(m=p.detach().clone(), g=torch.zeros_like(p),
                        h=torch.full_like(p, hp["hess_init"])) for p in (a, b)}
    for t in (1, 2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn().backward()
            theta = {p: p.detach().clone() for p in (a, b)}
            grad = {p: p.grad.clone() for p in (a, b)}
        opt.step()
        for group in groups:
            p = group["params"][0]
            e, lam, wd = expected[p], group["ess"], group["weight_decay"]
            sigma2 = 1.0 / (lam * (e["h"] + wd))
            if hess_approx == "price":
                h_hat = grad[p] * (theta[p] - e["m"]) / sigma2
                torch.testing.assert_close(
                    h_hat, price_hessian(grad[p] * (theta[p] - e["m"]), e["h"], lam, wd))
            else:
                h_hat = lam * grad[p] ** 2
            e["g"] = hp["beta1"] * e["g"] + (1 - hp["beta1"]) * grad[p]
            r = 1 - hp["beta2"]
            e["h"] = (hp["beta2"] * e["h"] + r * h_hat
                      + 0.5 * r**2 * (e["h"] - h_hat) ** 2 / (e["h"] + wd))
            step = (e["g"] / (1 - hp["beta1"] ** t) + wd * e["m"]) / (e["h"] + wd)
            alpha = group["lr"] * (hp["hess_init"] + wd)
            e["m"] = e["m"] - alpha * step.clamp(-clip_radius, clip_radius)
            state = opt.state[p]
            assert state["step"] == t
            torch.testing.assert_close(state["momentum"], e["g"])
            torch.testing.assert_close(state["hess"], e["h"])
            torch.testing.assert_close(p.detach(), e["m"])
            # The pure functions say the same.
            torch.testing.assert_close(
                hessian_update(torch.zeros(()), torch.tensor(2.0), 0.9, 0.5),
                torch.tensor(0.1 * 2 + 0.5 * 0.01 * 4 / 0.5))
    torch.testing.assert_close(
        ivon_mean_update(torch.ones(()), torch.ones(()), torch.ones(()), lr=0.5, step=1,
                         beta1=0.5, weight_decay=1.0, hess_init=1.0, rescale_lr=False),
        torch.tensor(1 - 0.5 * (2 + 1) / 2.0))


def test_samples_are_mean_plus_sigma_times_standard_normal(dtype):
    w = torch.zeros(200, 100, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        w[:100] = 3.0
    opt = IVON([w], lr=0.1, ess=25.0, hess_init=3.0, weight_decay=1.0, seed=1)
    sigma = 1 / math.sqrt(25.0 * (3.0 + 1.0))
    torch.testing.assert_close(opt.posterior_std()[0], torch.full_like(w, sigma))
    with opt.sampled_params(train=False):
        z = ((w.detach() - 3.0 * (torch.arange(200) < 100)[:, None]) / sigma).reshape(-1)
    for draw in (z, (opt.sample()[0] - opt.posterior_mean()[0]).reshape(-1) / sigma):
        # 20000 draws: the mean's standard error is 0.007, the std's 0.005.
        assert abs(float(draw.mean())) < 0.03
        assert abs(float(draw.std()) - 1) < 0.025
    assert bool((w[:100] == 3).all()) and bool((w[100:] == 0).all())


def test_bayesian_linear_regression_reaches_the_mean_field_optimum(dtype, seed=1):
    # Squared loss with noise sn and prior N(0, 1/a): the exact posterior is N(mu, Lam^-1)
    # and the best mean-field Gaussian has mean mu and variances 1/diag(Lam). IVON with
    # ess = N and weight_decay = a/N targets it; h must reach diag(X^T X)/(N sn^2).
    g = torch.Generator().manual_seed(seed)
    n, sn, prior = 200, 0.5, 2.0
    mix = torch.tensor([[1, .5, 0, 0], [0, 1, .3, 0], [0, 0, 1, .2], [0, 0, 0, 1.5]],
                       dtype=dtype)
    X = torch.randn(n, 4, generator=g, dtype=dtype) @ mix
    y = X @ torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=dtype)
    y = y + sn * torch.randn(n, generator=g, dtype=dtype)
    precision = X.T @ X / sn**2 + prior * torch.eye(4, dtype=dtype)
    post_mean = torch.linalg.solve(precision, X.T @ y / sn**2)
    post_std = precision.diagonal().rsqrt()

    theta = torch.zeros(4, dtype=dtype, requires_grad=True)
    steps = 2000
    opt = IVON([theta], lr=0.5, ess=n, weight_decay=prior / n, hess_init=1.0, beta2=0.997,
               mc_samples=2, seed=seed)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)) + 1e-3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((y - X @ theta) ** 2).mean() / (2 * sn**2)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        sched.step()
    # Tolerances: the final h is an average of ~600 noisy Hessian estimates (about 3%
    # error on sigma), and the mean ends inside the posterior well below 0.1 std.
    assert float(((theta.detach() - post_mean) / post_std).abs().max()) < 0.2
    torch.testing.assert_close(opt.posterior_std()[0], post_std, rtol=0.08, atol=0)


def test_closure_equals_the_explicit_loop():
    def run(use_closure: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        opt = IVON(net.parameters(), lr=0.1, ess=16, mc_samples=3, seed=4)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        losses = []
        for _ in range(3):
            if use_closure:
                losses.append(opt.step(closure))
            else:
                sample_losses = []
                for _ in range(3):
                    with opt.sampled_params(train=True):
                        sample_losses.append(closure().detach())
                opt.step()
                losses.append(sum(sample_losses) / 3)
        return [*net.parameters(), *(opt.state[p]["hess"] for p in net.parameters()),
                torch.stack(losses)]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def _train(net: nn.Module, opt: IVON, steps: int, seed: int,
           sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g, dtype=next(net.parameters()).dtype)
        y = (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 0.5).long()
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def test_state_dict_continues_training_bit_for_bit(dtype):
    net = _net(dtype)
    opt = IVON(net.parameters(), lr=0.2, ess=100, beta2=0.999, seed=7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _train(net, opt, 5, seed=0, sched=sched)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buffer)
    _train(net, opt, 6, seed=1, sched=sched)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    net2 = _net(dtype)
    net2.load_state_dict(checkpoint["model"])
    opt2 = IVON(net2.parameters(), lr=1.0, ess=1.0, seed=123)
    opt2.load_state_dict(checkpoint["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    sched2.load_state_dict(checkpoint["sched"])
    _train(net2, opt2, 6, seed=1, sched=sched2)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("momentum", "hess"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
        assert opt.state[p]["step"] == opt2.state[q]["step"] == 11
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.2 * 0.5**3


def test_schedulers_set_the_lr_of_each_group():
    net = _net()
    opt = IVON([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.5}],
               lr=0.1, ess=100, seed=0)
    # The first group stops moving after two steps, the second keeps its schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0 if t < 2 else 0.0,
                                                     lambda t: 0.5**t])
    _train(net, opt, 2, seed=0, sched=sched)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.5 * 0.25]
    frozen = [p.detach().clone() for p in net[0].parameters()]
    moving = [p.detach().clone() for p in net[2].parameters()]
    hess = [opt.state[p]["hess"].clone() for p in net[0].parameters()]
    _train(net, opt, 2, seed=1, sched=sched)
    for p, before, h in zip(net[0].parameters(), frozen, hess, strict=True):
        assert torch.equal(p.detach(), before)
        assert not torch.equal(opt.state[p]["hess"], h)   # the posterior still learns
    assert all(not torch.equal(p.detach(), q) for p, q in zip(net[2].parameters(), moving,
                                                              strict=True))


def test_exception_inside_sampled_params_restores_the_means():
    net = _net()
    opt = IVON(net.parameters(), lr=0.1, ess=10, seed=0)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with opt.sampled_params(train=True):
            nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.zeros(4).long()).backward()
            assert not torch.equal(net[0].weight, before["0.weight"])
            raise RuntimeError("boom")
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])
    with pytest.raises(BayesifyError, match="no sampled gradient"):
        opt.step()     # the failed sample left no statistics behind


def test_parameters_without_gradient_keep_mean_and_state():
    torch.manual_seed(0)
    used, unused, frozen = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 2)
    frozen.requires_grad_(False)
    params = [*used.parameters(), *unused.parameters(), *frozen.parameters()]
    opt = IVON(params, lr=0.1, ess=10, seed=0)
    untouched = [p.detach().clone() for p in [*unused.parameters(), *frozen.parameters()]]
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            frozen(used(torch.randn(5, 3))).pow(2).mean().backward()
        opt.step()
    for p, before in zip([*unused.parameters(), *frozen.parameters()], untouched, strict=True):
        assert torch.equal(p.detach(), before)
        assert opt.state[p]["step"] == 0
        assert torch.equal(opt.state[p]["hess"], torch.ones_like(p))
    assert all(opt.state[p]["step"] == 3 for p in used.parameters())


def test_bfloat16_weights_train_with_float32_state():
    net = _net(torch.bfloat16)
    opt = IVON(net.parameters(), lr=0.2, ess=500, beta2=0.999, seed=0)
    losses = _train(net, opt, 150, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(opt.state[p][k].dtype == torch.float32 for p in net.parameters()
               for k in ("momentum", "hess"))
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20
    # A checkpoint keeps the float32 state of low-precision weights.
    opt2 = IVON(net.parameters(), lr=0.2, ess=500)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[net[0].weight]["hess"].dtype == torch.float32
    assert torch.equal(opt2.state[net[0].weight]["hess"], opt.state[net[0].weight]["hess"])


def test_groups_on_different_dtypes_have_their_own_posterior():
    a = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1000, dtype=torch.float32, requires_grad=True)
    opt = IVON([{"params": [a], "ess": 100.0}, {"params": [b], "weight_decay": 3.0}],
               lr=0.1, ess=4.0, hess_init=1.0, weight_decay=0.0, seed=0)
    std_a, std_b = opt.posterior_std()
    assert std_a.dtype == torch.float64 and std_b.dtype == torch.float32
    torch.testing.assert_close(std_a, torch.full_like(a, 0.1))
    torch.testing.assert_close(std_b, torch.full_like(b, 0.25))
    with opt.sampled_params(train=True):
        (a.sum() + b.sum()).backward()
        assert abs(float(a.detach().std()) - 0.1) < 0.01
        assert abs(float(b.detach().std()) - 0.25) < 0.025
    opt.step()
    # Debiased momentum is the gradient 1 after one step: m = -lr (h0 + wd) / (h + wd).
    torch.testing.assert_close(a.detach(), -0.1 / opt.state[a]["hess"])
    torch.testing.assert_close(b.detach(), -0.4 / (opt.state[b]["hess"] + 3.0))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lr=0.0), "`lr` must be > 0, got 0.0"),
    (dict(lr=-1), "`lr` must be > 0, got -1"),
    (dict(ess=0), "`ess` must be > 0, got 0"),
    (dict(hess_init=0.0), "`hess_init` must be > 0, got 0.0"),
    (dict(beta1=1.0), r"`beta1` must lie in \[0, 1\), got 1.0"),
    (dict(beta2=-0.1), r"`beta2` must lie in \[0, 1\), got -0.1"),
    (dict(clip_radius=0.0), "`clip_radius` must be > 0, got 0.0"),
    (dict(hess_approx="exact"), "`hess_approx` must be one of 'price', 'gradsq', got 'exact'"),
    (dict(mc_samples=0), "`mc_samples` must be an int >= 1, got 0"),
    (dict(weight_decay=-1e-4), "`weight_decay` must be >= 0, got -0.0001"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    options = {"lr": 0.1, "ess": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        IVON(_net().parameters(), **options)
    assert isinstance(info.value, BayesifyError)


def test_bad_group_override_and_misuse_raise():
    net = _net()
    with pytest.raises(BayesifyError, match="`ess` must be > 0, got -5"):
        IVON([{"params": net.parameters(), "ess": -5}], lr=0.1, ess=10)
    opt = IVON(net.parameters(), lr=0.1, ess=10)
    with pytest.raises(BayesifyError, match="no sampled gradient"):
        opt.step()
    net(torch.randn(2, 6)).sum().backward()     # a gradient at the mean is not a sample
    with pytest.raises(BayesifyError, match="no sampled gradient"):
        opt.step()
    with opt.sampled_params():
        with pytest.raises(BayesifyError, match="already active"):
            with opt.sampled_params():
                pass
        with pytest.raises(BayesifyError, match="inside sampled_params"):
            opt.step()


def test_mismatched_state_dict_raises():
    net = _net()
    opt = IVON(net.parameters(), lr=0.1, ess=10, seed=0)
    _train(net, opt, 1, seed=0)
    state = opt.state_dict()
    other = IVON(nn.Linear(6, 3).parameters(), lr=0.1, ess=10)
    with pytest.raises(ValueError, match="param group 0 has 4 parameter"):
        other.load_state_dict(state)
    wrong = _net()
    wrong[2] = nn.Linear(16, 4)
    with pytest.raises(BayesifyError, match=r"'momentum' of parameter 2 has shape \(3, 16\)"):
        IVON(wrong.parameters(), lr=0.1, ess=10).load_state_dict(state)
    adam = torch.optim.Adam(net.parameters()).state_dict()
    with pytest.raises(BayesifyError, match="lacks ess"):
        IVON(net.parameters(), lr=0.1, ess=10).load_state_dict(adam)
    with pytest.raises(BayesifyError, match="`state_dict` must be a dict"):
        opt.load_state_dict([1, 2])
