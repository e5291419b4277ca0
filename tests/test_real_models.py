"""Methods on stand-ins for real vision models (tests/_models.py): a ResNet-like CNN with
BatchNorm and skip connections and a ViT-like transformer. Each method in METHODS fits
one epoch on tiny generated images and predicts: finite probabilities of the right
shape, repeatable under a seed, and no buffer (BatchNorm's running statistics) touched
by prediction. Add a method by adding a row to METHODS."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import TinyResNet, TinyViT, count_parameters, tiny_images

import bayesify as bf

NUM_CLASSES, N_TRAIN, N_TEST = 3, 48, 20
ARCHITECTURES = {"resnet": TinyResNet.build, "vit": TinyViT.build}

#: (method, options for bayesify(...), options for fit(...)), one row per method.
METHODS = [
    pytest.param("deterministic", {}, {}, id="deterministic"),
    pytest.param("mc_dropout", {}, {}, id="mc_dropout"),
    pytest.param("ivon", {"seed": 0}, {"lr": 0.05}, id="ivon"),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stand_ins_are_small_deterministic_and_have_the_parts(arch):
    build = ARCHITECTURES[arch]
    net, same, other = build(seed=0), build(seed=0), build(seed=1)
    assert 1000 < count_parameters(net) < 10_000
    pairs = zip(net.state_dict().values(), same.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(net.state_dict()[next(iter(net.state_dict()))],
                           other.state_dict()[next(iter(other.state_dict()))])
    kinds = {type(m).__name__ for m in net.modules()}
    wanted = ({"Conv2d", "BatchNorm2d", "AdaptiveAvgPool2d", "Linear"} if arch == "resnet"
              else {"Conv2d", "LayerNorm", "MultiheadAttention", "GELU", "Linear"})
    assert wanted <= kinds
    x, _ = tiny_images(5)
    assert net.eval()(x).shape == (5, NUM_CLASSES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("method", "options", "fit"), METHODS)
def test_fits_one_epoch_and_predicts_without_touching_buffers(arch, method, options, fit,
                                                              device):
    x, y = tiny_images(N_TRAIN, NUM_CLASSES, seed=0)
    x_test, _ = tiny_images(N_TEST, NUM_CLASSES, seed=1)
    net = ARCHITECTURES[arch](seed=0).to(device)
    bm = bf.bayesify(net, method, task="classification", **options)
    bm.fit((x.to(device), y.to(device)), epochs=1, batch_size=16, progress=False, seed=0,
           **fit)
    assert len(bm.history) == 1 and torch.isfinite(torch.tensor(bm.history)).all()
    buffers = {name: b.clone() for name, b in bm.named_buffers()}
    pred = bm.predict(x_test.to(device), num_samples=4, seed=0)
    assert pred.probs.shape == (N_TEST, NUM_CLASSES)
    assert bool(torch.isfinite(pred.probs).all())
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(N_TEST, device=device,
                                                              dtype=pred.probs.dtype))
    for name, before in buffers.items():
        assert torch.equal(dict(bm.named_buffers())[name], before), name
    again = bm.predict(x_test.to(device), num_samples=4, seed=0)
    assert torch.equal(again.probs, pred.probs)


def test_resnet_batchnorm_is_updated_by_fit_only():
    x, y = tiny_images(N_TRAIN, NUM_CLASSES, seed=0)
    net = TinyResNet.build(seed=0)
    start = copy.deepcopy(net.state_dict())
    bm = bf.bayesify(net, "mc_dropout", task="classification")
    bm.fit((x, y), epochs=1, batch_size=16, progress=False, seed=0)
    moved = [k for k in start if "running_mean" in k
             and not torch.equal(start[k], net.state_dict()[k])]
    assert len(moved) == sum(1 for k in start if "running_mean" in k)


def test_vit_with_dropout_in_its_blocks_runs_tiled():
    """Dropout inside a residual block meets the unreplicated skip: the split path cannot
    run, the network runs on inputs tiled per sample, and equals the per-sample loop."""
    x, _ = tiny_images(6, NUM_CLASSES, seed=2)
    fast = bf.bayesify(TinyViT.build(seed=0, dropout=0.1), "mc_dropout",
                       task="classification")
    loop = bf.bayesify(TinyViT.build(seed=0, dropout=0.1), "mc_dropout",
                       task="classification", fast_path=False)
    assert fast.inserted == []          # its own dropout is sampled
    first = fast.posterior(x, num_samples=3, seed=0).samples
    assert fast._fast_mode == "tiled"
    reference = loop.posterior(x, num_samples=3, seed=0).samples
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-6)
    assert not torch.equal(first[0], first[1])
