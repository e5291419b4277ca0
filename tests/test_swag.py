"""SWAG: moments against SGD's stationary distribution, the sampling formula, BatchNorm
refresh and restore, schedules, own loops, checkpoints and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import bayesify as bf
from bayesify.errors import InputError, NotFittedError
from bayesify.inference.swag import SWAGModel
from bayesify.testing import check_method

# The quadratic problem: f = k ⊙ θ for every row, Gaussian NLL with unit noise, targets
# y ~ N(μ, I) drawn fresh for every batch of B rows. The loss is ½‖ȳ − k⊙θ‖² + const
# (curvature a = k²) and the gradient noise is iid N(0, k²/B), so SGD with step η is an
# AR(1) per coordinate: ρ = 1 − η a, stationary variance η / (B (2 − η a)).
K_SCALE = (0.8, 1.0, 1.3)
MU = (0.5, -1.0, 2.0)
BATCH, LR, EVERY = 8, 0.5, 3


class _Scaled(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("k", torch.tensor(K_SCALE, dtype=dtype))
        self.theta = nn.Parameter(torch.tensor(MU, dtype=dtype) / self.k)   # the optimum

    def forward(self, x):
        return (self.k * self.theta).expand(x.shape[0], -1)


class _FreshBatches(IterableDataset):
    def __init__(self, steps: int, dtype, seed: int = 0):
        self.steps, self.dtype = steps, dtype
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.steps

    def __iter__(self):
        mu = torch.tensor(MU, dtype=torch.float64)
        for _ in range(self.steps):
            y = mu + torch.randn(BATCH, 3, generator=self.generator, dtype=torch.float64)
            yield torch.zeros(BATCH, 1, dtype=self.dtype), y.to(self.dtype)


def _quadratic_swag(dtype, snapshots: int) -> SWAGModel:
    bm = bf.bayesify(_Scaled(dtype), "swag", task="regression", noise=1.0, num_outputs=3,
                     momentum=0.0, collect_every=EVERY, rank=20)
    loader = DataLoader(_FreshBatches(snapshots * EVERY, dtype), batch_size=None)
    return bm.fit(loader, epochs=1, lr=LR, weight_decay=0.0, progress=False, seed=0)


def test_moments_match_the_stationary_distribution_of_sgd(dtype):
    snapshots = 1000
    bm = _quadratic_swag(dtype, snapshots)
    moments = bm.swag_moments()
    assert int(moments["count"]) == snapshots
    for d, (k, mu) in enumerate(zip(K_SCALE, MU, strict=True)):
        eta_a = LR * k * k
        rho = (1 - eta_a) ** EVERY                     # correlation between snapshots
        var = LR / (BATCH * (2 - eta_a))
        # standard errors of a mean and a variance from an AR(1) sample
        se_mean = math.sqrt(var / snapshots * (1 + rho) / (1 - rho))
        se_var = var * math.sqrt(2 / snapshots * (1 + rho**2) / (1 - rho**2))
        assert abs(float(moments["mean"][d]) - mu / k) < 4 * se_mean
        assert abs(float(moments["variance"][d]) - var) < 4 * se_var
    # after fit the network holds the SWA mean
    torch.testing.assert_close(bm.model.theta.detach(), moments["mean"], rtol=0, atol=0)


def test_samples_follow_the_swag_covariance():
    bm = _quadratic_swag(torch.float64, 60)
    moments = bm.swag_moments()
    deviations = moments["deviations"]
    assert deviations.shape == (20, 3)
    expected = 0.5 * (torch.diag(moments["variance"]) + deviations.T @ deviations / 19)
    draws = bm.sample_parameters(40000, torch.Generator().manual_seed(0))
    centred = draws - moments["mean"]
    empirical = centred.T @ centred / draws.shape[0]
    diagonal = expected.diagonal()
    se = ((diagonal[:, None] * diagonal[None, :] + expected**2) / draws.shape[0]).sqrt()
    assert bool(((empirical - expected).abs() < 5 * se).all())
    se_mean = (diagonal / draws.shape[0]).sqrt()
    assert bool(((draws.mean(0) - moments["mean"]).abs() < 5 * se_mean).all())


def _bn_net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 3)).to(dtype)


def _data(dtype, n: int = 64):
    g = torch.Generator().manual_seed(2)
    x = 2 + torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x.to(dtype), (x[:, 0] > 2).long() + (x[:, 1] > 2.5).long()


def test_batchnorm_statistics_are_refreshed_per_draw_and_restored(dtype):
    x, y = _data(dtype)
    bm = bf.bayesify(_bn_net(dtype), "swag", task="classification", bn_update_size=48)
    bm.fit((x, y), epochs=4, lr=0.05, batch_size=16, progress=False, seed=0)
    norm = bm.model[1]
    assert bm.bn_inputs.shape == (48, 4)
    # the statistics after fit are those of θ̄ on the kept inputs
    probe = bf.bayesify(_bn_net(dtype), "swag", task="classification")
    probe.model.load_state_dict(bm.model.state_dict())
    probe.bn_inputs = bm.bn_inputs
    probe._refresh_bn(None)
    torch.testing.assert_close(norm.running_mean, probe.model[1].running_mean)
    saved = {k: v.clone() for k, v in norm.state_dict().items()}
    pred = bm.predict(x, seed=0)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert bool(torch.isfinite(pred.probs).all())
    # with a vanishing posterior scale every draw is θ̄, refreshed to θ̄'s statistics
    bm.scale = 1e-20
    draws = bm.posterior(x, num_samples=2, seed=0).samples
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(draws[0], bm(x), atol=tol, rtol=tol)
    assert norm.momentum == 0.1


def test_cyclic_schedule_collects_at_the_low_point_and_restores_lr():
    x, y = _data(torch.float32)
    bm = bf.bayesify(_bn_net(torch.float32), "swag", task="classification",
                     schedule="cyclic", collect_every=4, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD(bm.parameters(), lr=0.1)
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    bm.fit((x, y), epochs=3, batch_size=8, optimizer=optimizer, progress=False, seed=0)
    assert int(bm.swa_count) == 24 // 4
    assert lrs[3] == pytest.approx(0.01) and lrs[4] == pytest.approx(lrs[0])
    assert lrs[0] == pytest.approx(0.1 * (0.75 + 0.25 * 0.1))
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_regression_and_own_loop(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(dtype)
    bm = bf.bayesify(net, "swag", task="regression", rank=4)
    x, _ = _data(dtype)
    y = torch.sin(x[:, 0])
    optimizer = bm.configure_optimizer(1e-2, 0.0)
    with pytest.raises(NotFittedError, match="collected 0 snapshot"):
        bm.finish_fit()
    for _ in range(5):
        optimizer.zero_grad()
        bm.loss(x, y).backward()
        optimizer.step()
    bm.finish_fit()
    assert int(bm.swa_count) == 5
    pred = bm.predict(x, seed=0)
    assert isinstance(pred, bf.MixturePredictive) and pred.num_components == 30
    assert pred.mean.dtype == dtype and pred.mean.shape == (64,)


def test_checkpoint_round_trip(tmp_path):
    x, y = _data(torch.float64)
    bm = bf.bayesify(_bn_net(torch.float64), "swag", task="classification", rank=3)
    bm.fit((x, y), epochs=3, batch_size=32, progress=False, seed=0)
    bm.save(tmp_path / "swag.pt")
    fresh = bf.bayesify(_bn_net(torch.float64), "swag", task="classification", rank=3)
    fresh.load(tmp_path / "swag.pt")
    assert torch.equal(fresh.bn_inputs, bm.bn_inputs)
    assert torch.equal(bm.predict(x, seed=1).probs, fresh.predict(x, seed=1).probs)


def test_bad_options():
    net = _bn_net(torch.float32)
    wrap = bf.bayesify
    with pytest.raises(InputError, match="`rank` must be 0"):
        wrap(net, "swag", task="classification", rank=1)
    with pytest.raises(InputError, match="`schedule` must be one of"):
        wrap(net, "swag", task="classification", schedule="step")
    with pytest.raises(InputError, match="`momentum` must be < 1"):
        wrap(net, "swag", task="classification", momentum=1.0)
    with pytest.raises(InputError, match="`scale` must be > 0"):
        wrap(net, "swag", task="classification", scale=0)
    with pytest.raises(InputError, match="`collect_every` must be an int >= 1"):
        wrap(net, "swag", task="classification", collect_every=0)
    with pytest.raises(InputError, match="`min_lr_ratio` must lie in"):
        wrap(net, "swag", task="classification", min_lr_ratio=0)
    with pytest.raises(InputError, match="the swag method needs a network"):
        wrap(None, "swag", task="classification")
    bm = wrap(net, "swag", task="classification")
    x, y = _data(torch.float32)
    with pytest.raises(InputError, match="would collect 1 snapshot"):
        bm.fit((x, y), epochs=1, progress=False)
    late = wrap(net, "swag", task="classification", swa_start=2)
    with pytest.raises(InputError, match="would collect 0 snapshot"):
        late.fit((x, y), epochs=2, progress=False)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        bm.predict(x)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_conformance(task, dtype, device):
    check_method("swag", task, dtype=dtype, device=device)
