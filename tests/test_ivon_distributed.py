"""IVON with sync=True under torch.distributed: two gloo processes on this machine."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bayesify.optim.ivon import IVON

WORLD = 2
STEPS = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)           # the same initial means and seed on every rank
        net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
        x, y = _data()
        opt = IVON(net.parameters(), lr=0.2, ess=len(x), beta2=0.999, sync=True, seed=0)
        losses, noise = [], None
        for step in range(STEPS):
            rows = slice(rank * 128 + (step % 4) * 32, rank * 128 + (step % 4 + 1) * 32)
            with opt.sampled_params(train=True):
                if noise is None:
                    noise = net[0].weight.detach().clone()
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            opt.step()
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(net(x), y)))
        torch.save({"params": [p.detach() for p in net.parameters()],
                    "hess": [opt.state[p]["hess"] for p in net.parameters()],
                    "noise": noise, "losses": losses}, os.path.join(out, f"{rank}.pt"))
        # Both ranks must be done before either tears down: rank 0 hosts the store, and a
        # rank that exits while its peer still talks to it makes gloo abort the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors: a gloo thread still joinable at interpreter
    # exit makes std::terminate abort a rank now and then ("terminate called without an
    # active exception"), after its results are already written.
    os._exit(0)


def test_sync_keeps_means_identical_across_ranks_and_trains(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    # Each rank drew its own noise ...
    assert not torch.equal(results[0]["noise"], results[1]["noise"])
    # ... yet the all-reduced statistics keep means and Hessians identical.
    for key in ("params", "hess"):
        for a, b in zip(results[0][key], results[1][key], strict=True):
            assert torch.equal(a, b)
    losses = results[0]["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
