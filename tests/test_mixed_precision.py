"""MC dropout and IVON in mixed precision: training and predicting under torch.autocast
(bfloat16 on CPU; float16 too on CUDA) and with bfloat16 weights; IVON's state in float32
whatever the weights' dtype (float16 included), with and without a GradScaler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.inference import mc_dropout as mc_module
from bayesify.optim import IVON

METHODS = {"mc_dropout": {}, "ivon": {"seed": 0, "beta2": 0.999}}
FIT = {"mc_dropout": {"lr": 1e-2}, "ivon": {"lr": 0.05}}


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    return centers[y] + 0.8 * torch.randn(n, 2, generator=g), y


def _net(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, out))


def _low_dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16]


def _accuracy(bm, x, y, device, **context) -> tuple[float, torch.Tensor]:
    with torch.autocast(device.type, **context):
        samples = bm.posterior(x.to(device), num_samples=8, seed=0).samples
    probs = torch.softmax(samples.double(), -1).mean(0)
    return float((probs.argmax(-1).cpu() == y).double().mean()), samples


@pytest.mark.parametrize("method", METHODS)
def test_trains_and_samples_under_autocast_as_well_as_in_float32(method, device):
    x, y = _blobs(400, 0)
    x_test, y_test = _blobs(600, 1)
    accuracy = {}
    for low in [None, *_low_dtypes(device)]:
        bm = bf.bayesify(_net().to(device), method, task="classification", **METHODS[method])
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            bm.fit((x.to(device), y.to(device)), epochs=4, batch_size=32, progress=False,
                   seed=0, **FIT[method])
        assert all(p.dtype == torch.float32 for p in bm.parameters())
        context = {"dtype": low, "enabled": True} if low else {"enabled": False}
        accuracy[low], samples = _accuracy(bm, x_test, y_test, device, **context)
        # The network ran in low precision; the posterior holds its outputs in float32.
        assert samples.dtype == torch.float32 and bool(torch.isfinite(samples).all())
        pred = bm.predict(x_test.to(device), num_samples=8, seed=0)
        assert pred.probs.dtype == torch.float32
    # Each accuracy is a mean over 600 test points: its binomial standard error.
    p = accuracy[None]
    se = math.sqrt(p * (1 - p) / len(y_test)) + 1 / len(y_test)
    assert p > 0.85
    for low, value in accuracy.items():
        assert abs(value - p) < 4 * math.sqrt(2) * se, (low, value, p)


@pytest.mark.parametrize("method", METHODS)
def test_predicts_under_autocast(method):
    x, y = _blobs(200, 0)
    bm = bf.bayesify(_net(), method, task="classification", **METHODS[method])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bm.fit((x, y), epochs=1, batch_size=50, progress=False, seed=0, **FIT[method])
        pred = bm.predict(x, num_samples=4, seed=0)
    assert pred.probs.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_low_precision_weights_fit_and_predict(method, task, device):
    x, y = _blobs(200, 0)
    if task == "regression":
        y = x[:, 0] - x[:, 1]
    for low in [torch.bfloat16]:     # float16 weights need a loss scale (see below)
        net = _net(3 if task == "classification" else 1).to(device, low)
        bm = bf.bayesify(net, method, task=task, **METHODS[method])
        fit = FIT[method] if task == "classification" else {"lr": 1e-3}
        bm.fit((x, y), epochs=2, batch_size=50, progress=False, seed=0, **fit)
        assert all(p.dtype == low for p in net.parameters())
        pred = bm.predict(x, num_samples=4, seed=0)
        mean = pred.probs if task == "classification" else pred.mean
        assert mean.dtype == torch.float32 and bool(torch.isfinite(mean).all())
        if method == "ivon":
            states = bm.optimizer.state.values()
            assert {s[k].dtype for s in states for k in ("momentum", "hess")} == {
                torch.float32}


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float32,
                                         torch.float64])
def test_ivon_state_is_at_least_float32(param_dtype):
    net = nn.Linear(4, 2).to(param_dtype)
    opt = IVON(net.parameters(), lr=0.05, ess=100, seed=0)
    x = torch.randn(16, 4, dtype=param_dtype)
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            net(x).float().pow(2).mean().backward()
        opt.step()
    expected = torch.float64 if param_dtype == torch.float64 else torch.float32
    restored = IVON(net.parameters(), lr=0.05, ess=100)
    restored.load_state_dict(opt.state_dict())
    for state in [*opt.state.values(), *restored.state.values()]:
        assert state["momentum"].dtype == state["hess"].dtype == expected
    assert all(p.dtype == param_dtype for p in net.parameters())


def test_ivon_under_autocast_keeps_float32_state_and_weights():
    net = _net()
    opt = IVON(net.parameters(), lr=0.05, ess=100, seed=0)
    x, y = _blobs(64, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            out = net(x)
            assert out.dtype == torch.bfloat16
            nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert {s[k].dtype for s in opt.state.values() for k in ("momentum", "hess")} == {
        torch.float32}
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all())
               for p in net.parameters())


def test_mc_dropout_folds_under_autocast_within_rounding(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3))
    bm = bf.bayesify(net, "mc_dropout", task="classification")
    x = torch.randn(50, 8)
    folds = []
    original = mc_module.masked_linear_samples
    monkeypatch.setattr(mc_module, "masked_linear_samples",
                        lambda *a: folds.append(1) or original(*a))
    with torch.no_grad():
        exact = bm.sample_outputs(x, 6, torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded = bm.sample_outputs(x, 6, torch.Generator().manual_seed(0))
            bm.fast_path = False
            loop = bm.sample_outputs(x, 6, torch.Generator().manual_seed(0))
    assert len(folds) == 2 and folded.dtype == loop.dtype == torch.bfloat16
    # The fold rounds the masked weights, the loop the masked inputs: both are off the
    # float32 outputs by bfloat16 rounding; the fold no more than twice the loop.
    loop_error = (loop.float() - exact).abs().max()
    assert 0 < float(loop_error) < 0.05
    assert float((folded.float() - exact).abs().max()) <= 2 * float(loop_error)


def _scaled_steps(hess_approx: str, mc_samples: int, scaler, bad: set[tuple[int, int]] = ()
                  ) -> tuple[nn.Module, IVON]:
    """Three IVON steps of a small regression, each of ``mc_samples`` sampled blocks;
    block (step, sample) in ``bad`` gets an infinite loss."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = IVON(net.parameters(), lr=0.05, ess=50, hess_approx=hess_approx, seed=0)
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)
    for step in range(3):
        for sample in range(mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = (net(x) - y).pow(2).mean() * (math.inf if (step, sample) in bad else 1)
                (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return net, opt


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("mc_samples", [1, 2])
def test_ivon_with_a_grad_scaler_steps_as_without(hess_approx, mc_samples):
    plain, plain_opt = _scaled_steps(hess_approx, mc_samples, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, scaled_opt = _scaled_steps(hess_approx, mc_samples, scaler)
    # A power-of-two scale is exact: only the order of the roundings differs.
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("momentum", "hess"):
            torch.testing.assert_close(plain_opt.state[p][key], scaled_opt.state[q][key],
                                       rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("sample", [1, 0], ids=["last-sample", "earlier-sample"])
def test_ivon_skips_a_step_whose_scaled_gradients_are_not_finite(sample):
    """The scaler checks the gradients left in p.grad (the last sample's) and backs off;
    IVON also checks the sum over the step's samples, so an earlier sample's inf is
    caught too (the scaler, which saw none, keeps its scale then)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    net, opt = _scaled_steps("price", 2, scaler, {(1, sample)})
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert {s["step"] for s in opt.state.values()} == {2}
    assert not any("grad_sum" in s for s in opt.state.values())
    assert scaler.get_scale() == (2.0**11 if sample == 1 else 2.0**12)


def test_grad_scaler_unscale_belongs_inside_the_block():
    plain, _ = _scaled_steps("price", 1, None)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = IVON(net.parameters(), lr=0.05, ess=50, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            scaler.scale((net(x) - y).pow(2).mean()).backward()
            scaler.unscale_(opt)                 # e.g. to clip the gradients here
        scaler.step(opt)
        scaler.update()
    for p, q in zip(plain.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        scaler.scale((net(x) - y).pow(2).mean()).backward()
    scaler.unscale_(opt)
    with pytest.raises(bf.InputError, match="unscale_.* must run inside the sampled block"):
        scaler.step(opt)
    assert not any("grad_sum" in s for s in opt.state.values())
