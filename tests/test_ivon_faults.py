"""IVON under faults and odd use (issue 16): a sample that fails mid-step, a schedule
that ends at lr = 0, gradient accumulation over micro-batches."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from bayesify import BayesifyError
from bayesify.optim.ivon import IVON


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _train(net: nn.Module, opt: IVON, steps: int, seed: int,
           sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """``steps`` IVON steps on fresh random batches, one sample each."""
    x, y = _batch(32 * steps, seed)
    for xb, yb in zip(x.chunk(steps), y.chunk(steps), strict=True):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()




def _batch(n: int = 32, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def test_a_failed_second_sample_discards_the_step_and_restores_the_means():
    net = _net()
    opt = IVON(net.parameters(), lr=0.2, ess=100, mc_samples=3, seed=0)
    _train(net, opt, 2, seed=0)
    x, y = _batch()
    means = copy.deepcopy(net.state_dict())
    state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in net.parameters()}
    calls = []

    def failing() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if len(calls) == 2:
            raise RuntimeError("the second sample failed")
        return loss

    with pytest.raises(RuntimeError, match="the second sample failed"):
        opt.step(failing)
    for name, value in net.state_dict().items():
        assert torch.equal(value, means[name]), name
    for p in net.parameters():
        assert set(opt.state[p]) == {"momentum", "hess", "step"}   # no partial sums left
        assert opt.state[p]["step"] == state[p]["step"] == 2
        for key in ("momentum", "hess"):
            assert torch.equal(opt.state[p][key], state[p][key])
    # The next step averages its own three samples only, exactly as a twin that never
    # saw the failure (same state, same generator).
    twin = _net()
    twin.load_state_dict(net.state_dict())
    twin_opt = IVON(twin.parameters(), lr=1.0, ess=1.0, mc_samples=3)
    twin_opt.load_state_dict(opt.state_dict())
    for model, optimizer in ((net, opt), (twin, twin_opt)):
        def closure(model=model, optimizer=optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["hess"], twin_opt.state[q]["hess"])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_checkpoint_whose_schedule_reached_lr_zero_loads_and_keeps_it(schedule):
    net = _net()
    opt = IVON(net.parameters(), lr=0.2, ess=100, beta2=0.999, seed=0)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4) if schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / 4)))
    _train(net, opt, 4, seed=0, sched=sched)
    assert opt.param_groups[0]["lr"] == 0.0
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = IVON(net.parameters(), lr=0.1, ess=1.0)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 0.0
    # lr = 0 freezes the means while the posterior keeps learning.
    means = [p.detach().clone() for p in net.parameters()]
    hess = opt2.state[net[0].weight]["hess"].clone()
    _train(net, opt2, 2, seed=1)
    assert all(torch.equal(p, m) for p, m in zip(net.parameters(), means, strict=True))
    assert not torch.equal(opt2.state[net[0].weight]["hess"], hess)
    with pytest.raises(BayesifyError, match="`lr` must be > 0, got 0"):
        IVON(net.parameters(), lr=0, ess=1.0)      # a new optimizer still needs lr > 0
    saved["opt"]["param_groups"][0]["lr"] = -0.5
    with pytest.raises(BayesifyError, match="`lr` must be >= 0, got -0.5"):
        opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 0.0       # a refused state changes nothing


def test_gradient_accumulation_across_blocks_raises_with_the_recipe():
    net = _net()
    opt = IVON(net.parameters(), lr=0.2, ess=100, seed=0)
    x, y = _batch()
    means = copy.deepcopy(net.state_dict())
    opt.zero_grad()
    # The usual recipe for Adam: loss / k per micro-batch, no zero_grad in between.
    with pytest.raises(BayesifyError, match=r"run them all inside ONE block.*loss_fn"):
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            with opt.sampled_params(train=True):
                (nn.functional.cross_entropy(net(xb), yb) / 4).backward()
    for name, value in net.state_dict().items():
        assert torch.equal(value, means[name]), name
    with pytest.raises(BayesifyError, match="no sampled gradient"):
        opt.step()      # nothing of the failed step is left to average
    # Forgetting zero_grad between steps is the same mistake.
    _train(net, opt, 1, seed=0)
    with pytest.raises(BayesifyError, match="was not zeroed since the previous"):
        with opt.sampled_params(train=True):
            nn.functional.cross_entropy(net(x), y).backward()


def test_accumulation_inside_one_block_equals_the_full_batch(dtype):
    x, y = _batch(64)
    x = x.to(dtype)
    results = []
    for micro in (1, 4):
        net = _net(dtype)
        opt = IVON(net.parameters(), lr=0.2, ess=100, beta2=0.9, seed=3)
        for _ in range(3):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
                    (nn.functional.cross_entropy(net(xb), yb) / micro).backward()
            opt.step()
        results.append([*net.parameters(), *(opt.state[p][k] for p in net.parameters()
                                             for k in ("momentum", "hess"))])
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for full, accumulated in zip(*results, strict=True):
        torch.testing.assert_close(accumulated, full, rtol=tol, atol=tol)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zeroing_inside_each_block_is_not_mistaken_for_accumulation(set_to_none):
    def run(set_to_none: bool) -> list[torch.Tensor]:
        net = _net()
        opt = IVON(net.parameters(), lr=0.2, ess=100, seed=1)
        x, y = _batch()
        for _ in range(3):
            for _ in range(2):      # two MC samples per step
                with opt.sampled_params(train=True):
                    opt.zero_grad(set_to_none=set_to_none)
                    nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return [*net.parameters(), *(opt.state[p]["hess"] for p in net.parameters())]

    for a, b in zip(run(set_to_none), run(True), strict=True):
        assert torch.equal(a, b)
