"""VBLL under torch.distributed: two CPU processes (gloo) train through the loss and agree.

Each rank wraps the same pretrained network, takes its half of every batch and steps on
``ddp(x, y)``, which is ``bm.loss(x, y)`` called through DistributedDataParallel's
forward (DDP synchronizes gradients only for calls through its forward). Both ranks
must end with identical heads, equal to one process stepping on the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bayesify as bf

STEPS = 5
N = 64


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(N, 4)
    y = torch.arange(N) % 3
    return net, x, y


def _train(bm: nn.Module, step_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(step_model.parameters(), lr=0.1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        step_model(x, y).backward()
        optimizer.step()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net, x, y = _problem()
        bm = bf.bayesify(net, "vbll", task="classification", n_data=N)
        ddp = DistributedDataParallel(bm)
        half = slice(rank * N // world, (rank + 1) * N // world)
        _train(bm, ddp, x[half], y[half])
        torch.save(bm.vbll.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while its peer still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip C++ static destructors, see tests/test_ivon_distributed.py


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_end_with_identical_heads(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    net, x, y = _problem()
    reference = bf.bayesify(net, "vbll", task="classification", n_data=N)
    initial = {k: v.clone() for k, v in reference.vbll.state_dict().items()}
    _train(reference, reference, x, y)  # one process, whole batches
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
        torch.testing.assert_close(value, reference.vbll.state_dict()[key], rtol=1e-5,
                                   atol=1e-6)
    assert not torch.equal(states[0]["weight"], initial["weight"])  # it did train
