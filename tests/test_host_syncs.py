"""MC dropout's sampling and IVON's step read nothing back from the device: counted on
CPU through the Tensor methods that would wait for a GPU (item, tolist, bool, float,
int, index), and checked on CUDA (BAYESIFY_TEST_DEVICE=cuda) with torch's sync debug
mode set to raise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from _models import TinyResNet, tiny_images
from torch import nn

import bayesify as bf
from bayesify.optim import IVON

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counted_reads(monkeypatch) -> Iterator[list[str]]:
    """Record every Tensor method call that copies a value to the host."""
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        yield calls
    finally:
        monkeypatch.undo()


@contextlib.contextmanager
def no_device_sync(device: torch.device) -> Iterator[None]:
    """On CUDA, make any synchronizing call raise; elsewhere a no-op."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _mlp(folded: bool) -> nn.Sequential:
    torch.manual_seed(0)
    between = [] if folded else [nn.Identity()]   # an Identity blocks the fold
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), *between,
                         nn.Linear(32, 3))


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "replicated"])
def test_mc_dropout_reads_one_seed_batch_per_call_whatever_the_chunks(folded, monkeypatch,
                                                                      device):
    x = torch.randn(10, 6, device=device)
    counts = {}
    for rows in (1000, 20):        # one chunk, then five chunks of two samples
        bm = bf.bayesify(_mlp(folded).to(device), "mc_dropout", task="classification",
                         max_batch_rows=rows)
        with torch.no_grad(), counted_reads(monkeypatch) as calls, no_device_sync(device):
            out = bm.sample_outputs(x, 10)
        counts[rows] = list(calls)
        assert out.shape == (10, 10, 3)
    # The per-module seeds come from one draw of a CPU generator (torch's global one).
    assert counts[1000] == counts[20] == ["tolist"]


def test_mc_dropout_on_a_resnet_reads_nothing_per_chunk(monkeypatch, device):
    x, _ = tiny_images(8)
    bm = bf.bayesify(TinyResNet.build(seed=0).to(device), "mc_dropout",
                     task="classification", max_batch_rows=16)
    with torch.no_grad(), counted_reads(monkeypatch) as calls, no_device_sync(device):
        out = bm.sample_outputs(x.to(device), 12)
    assert out.shape == (12, 8, 3) and calls == ["tolist"]


def _ivon_setup(device: torch.device, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3)).to(device, dtype)
    opt = IVON(net.parameters(), lr=0.05, ess=100, seed=0, clip_radius=1.0)
    x = torch.randn(16, 6, device=device, dtype=dtype)
    y = torch.randint(0, 3, (16,), device=device)
    return net, opt, x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_ivon_step_and_samples_read_nothing(mc_samples, dtype, monkeypatch, device):
    net, opt, x, y = _ivon_setup(device, dtype)
    with counted_reads(monkeypatch) as calls, no_device_sync(device):
        for _ in range(3):         # the first step creates the state
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(x).float(), y).backward()
            opt.step()
        draws = opt.sample()
    assert calls == []
    assert len(draws) == len(opt.params)


def test_ivon_posterior_reads_nothing(monkeypatch, device):
    net, opt, x, y = _ivon_setup(device)
    for _ in range(2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    bm = bf.bayesify(net, "ivon", task="classification", optimizer=opt)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), counted_reads(monkeypatch) as calls, no_device_sync(device):
        samples = bm._posterior(x, 8, generator).samples
    assert calls == [] and samples.shape == (8, 16, 3)
