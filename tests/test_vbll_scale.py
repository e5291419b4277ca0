"""VBLL's defaults scale: the covariance follows the head's size, and what would not fit
is refused before it is allocated (issue 11)."""

from __future__ import annotations

import logging
import tracemalloc

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify._memory import MemoryLimitError


def _classifier(d: int, c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, d), nn.ReLU(), nn.Linear(d, c))


def test_a_small_head_defaults_to_dense():
    bm = bf.bayesify(_classifier(64, 10), "vbll", task="classification")
    assert bm.covariance == "dense" and "covariance='dense'" in repr(bm)


def test_a_resnet50_sized_head_is_diagonal_and_under_100_mb(caplog):
    # d = 2048, C = 1000: dense would be 1000 x 2048^2 entries (16 GB in float32).
    torch.manual_seed(0)
    net = _classifier(2048, 1000)
    tracemalloc.start()
    with caplog.at_level(logging.WARNING, logger="bayesify"):
        bm = bf.bayesify(net, "vbll", task="classification")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    head = sum(t.numel() * t.element_size()
               for t in [*bm.vbll.parameters(), *bm.vbll.buffers()])
    assert bm.covariance == "diagonal" and "covariance='diagonal'" in repr(bm)
    assert head < 100e6, head
    assert peak < 100e6, peak  # nothing dense was built on the way
    assert any("covariance='diagonal'" in r.getMessage() for r in caplog.records)


def test_an_explicit_dense_head_over_max_memory_is_refused_before_allocating():
    with pytest.raises(MemoryLimitError, match=r"a dense VBLL head \(1000 rows of dimension "
                                               r"2048\) needs about 67\.\d GB, over "
                                               r"max_memory=2\.1 GB; covariance='lowrank'"):
        bf.bayesify(_classifier(2048, 1000), "vbll", task="classification",
                    covariance="dense")


def test_max_memory_can_be_raised_or_lowered():
    with pytest.raises(MemoryLimitError, match="over max_memory=1.0 KB"):
        bf.bayesify(_classifier(64, 10), "vbll", task="classification", max_memory="1KB")
    bm = bf.bayesify(_classifier(64, 10), "vbll", task="classification",
                     covariance="lowrank", rank=4, max_memory=10**7)
    assert bm.covariance == "lowrank"


@pytest.mark.parametrize(("options", "match"), [
    ({"covariance": "full"}, "`covariance` must be one of"),
    ({"covariance": "lowrank", "rank": 0}, "`rank` must be"),
    ({"max_memory": "lots"}, "`max_memory` must be a number of bytes"),
])
def test_bad_size_options_are_named(options, match):
    with pytest.raises(bf.InputError, match=match):
        bf.bayesify(_classifier(16, 3), "vbll", task="classification", **options)
