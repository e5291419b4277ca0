"""The ensemble method: distinct members, mixture identities, batched == sequential
training, fallbacks, checkpoints and errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import BayesifyWarning, InputError, UnsupportedModelError
from bayesify.inference.ensemble import EnsembleModel, member_seeds
from bayesify.testing import check_method


def _mlp(out: int = 3, *, batchnorm: bool = False, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else [])
    layers += [nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out)]
    return nn.Sequential(*layers).to(dtype)


def _data(task: str, dtype=torch.float32, n: int = 96):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    if task == "classification":
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    else:
        y = (torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
        y = y.to(dtype)
    return x.to(dtype), y


def _ensemble(task: str, dtype=torch.float32, **options) -> EnsembleModel:
    out = 3 if task == "classification" else 1
    options = {"members": 3, **options}
    return bf.bayesify(_mlp(out, batchnorm=options.pop("batchnorm", False), dtype=dtype),
                       "ensemble", task=task, **options)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_members_differ_and_the_model_is_left_alone(dtype):
    net = _mlp(dtype=dtype)
    before = _flat(net).clone()
    head = bf.bayesify(net, "ensemble", task="classification", members=3)
    everything = bf.bayesify(net, "ensemble", task="classification", members=3,
                             reinitialize="all")
    assert torch.equal(_flat(net), before)
    for m in range(1, 3):
        first, other = head.members[0].model, head.members[m].model
        assert torch.equal(first[0].weight, other[0].weight)          # backbone kept
        assert torch.equal(first[0].weight, net[0].weight)
        assert not torch.allclose(first[4].weight, other[4].weight)   # head drawn anew
        assert not torch.allclose(everything.members[0].model[0].weight,
                                  everything.members[m].model[0].weight)
    x, y = _data("classification", dtype)
    head.fit((x, y), epochs=3, lr=1e-2, progress=False, seed=0)
    outputs = torch.stack([m(x) for m in head.members])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    assert outputs.dtype == dtype


def test_same_seed_gives_the_same_members():
    a, b = _ensemble("classification", seed=3), _ensemble("classification", seed=3)
    c = _ensemble("classification", seed=4)
    assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))
    assert member_seeds(3, 3) == member_seeds(3, 3) != member_seeds(4, 3)


def test_classification_mixture_identities(dtype):
    bm = _ensemble("classification", dtype)
    x, y = _data("classification", dtype)
    bm.fit((x, y), epochs=5, lr=1e-2, progress=False, seed=0)
    pred = bm.predict(x)
    members = [m.predict(x) for m in bm.members]
    tol = {"atol": 1e-5 if dtype == torch.float32 else 1e-10, "rtol": 0}
    torch.testing.assert_close(pred.probs, torch.stack([p.probs for p in members]).mean(0),
                               **tol)
    torch.testing.assert_close(pred.entropy(), pred.aleatoric() + pred.epistemic(), **tol)
    aleatoric = torch.stack([p.entropy() for p in members]).mean(0)
    torch.testing.assert_close(pred.aleatoric(), aleatoric, **tol)
    assert bool((pred.epistemic() > 0).all())
    # forward is the log of the mixture's probabilities
    torch.testing.assert_close(bm(x).softmax(-1), pred.probs, **tol)


def test_regression_mixture_identities(dtype):
    bm = _ensemble("regression", dtype)
    x, y = _data("regression", dtype)
    bm.fit((x, y), epochs=5, lr=1e-2, progress=False, seed=0)
    pred = bm.predict(x)
    members = [m.predict(x) for m in bm.members]
    means = torch.stack([p.mean for p in members])
    variances = torch.stack([p.variance for p in members])
    tol = {"atol": 1e-5 if dtype == torch.float32 else 1e-10, "rtol": 1e-5}
    torch.testing.assert_close(pred.mean, means.mean(0), **tol)
    torch.testing.assert_close(pred.variance, variances.mean(0) + means.var(0, correction=0),
                               **tol)
    torch.testing.assert_close(pred.epistemic_variance, means.var(0, correction=0), **tol)
    # each member keeps its own learned noise
    noises = torch.stack([m.noise.log_std.detach() for m in bm.members])
    assert noises.unique().numel() == 3
    torch.testing.assert_close(pred.aleatoric_variance,
                               variances.mean(0).expand_as(pred.aleatoric_variance), **tol)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_vmapped_training_equals_sequential(task, batchnorm):
    x, y = _data(task, torch.float64)
    runs = {}
    for training in ("vmap", "sequential"):
        bm = _ensemble(task, torch.float64, training=training, batchnorm=batchnorm)
        bm.fit((x, y), epochs=3, lr=1e-2, batch_size=32, grad_clip=0.5, weight_decay=1e-3,
               progress=False, seed=7)
        assert bm.training_mode == training
        runs[training] = bm
    batched, sequential = runs["vmap"], runs["sequential"]
    torch.testing.assert_close(_flat(batched), _flat(sequential), atol=1e-6, rtol=0)
    for a, b in zip(batched.buffers(), sequential.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(m.is_fitted for m in batched.members)
    torch.testing.assert_close(torch.tensor(batched.history), torch.tensor(sequential.history),
                               atol=1e-6, rtol=0)


class _Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        out = self.layer(x)
        return out * 2 if bool(out.sum() > 0) else out


def test_untraceable_network_falls_back_once():
    x, y = _data("classification")
    bm = bf.bayesify(_Branchy(), "ensemble", task="classification", members=2)
    with pytest.warns(BayesifyWarning, match="one after another, because vmap cannot trace"):
        bm.fit((x, y), epochs=1, progress=False, seed=0)
    assert bm.training_mode == "sequential"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm.fit((x, y), epochs=1, progress=False, seed=0)      # said once
    forced = bf.bayesify(_Branchy(), "ensemble", task="classification", members=2,
                         training="vmap")
    with pytest.raises(UnsupportedModelError, match="training='vmap' is not possible"):
        forced.fit((x, y), epochs=1, progress=False)


def test_bases_with_their_own_loop_train_one_after_another():
    x, y = _data("classification")
    bm = _ensemble("classification", members=2, base="swag", rank=2, reinitialize=None)
    assert torch.equal(_flat(bm.members[0]), _flat(bm.members[1]))
    bm.fit((x, y), epochs=3, lr=1e-2, batch_size=32, progress=False, seed=0)
    assert bm.training_mode == "sequential" and "training_step" in bm.training_reason
    # each member had its own batch order, so identical copies became distinct members
    assert not torch.allclose(_flat(bm.members[0]), _flat(bm.members[1]))
    post = bm.posterior(x[:5], num_samples=6, seed=0)
    assert post.samples.shape == (6, 5, 3)
    # draw s·M + m is member m's: the first M draws hold one of each member
    first = post.samples[:2]
    assert not torch.allclose(first[0], first[1])


def test_posterior_is_differentiable_and_pools_draws(dtype):
    bm = _ensemble("regression", dtype)
    x, y = _data("regression", dtype)
    bm.fit((x, y), epochs=2, progress=False, seed=0)
    xs = x[:5].clone().requires_grad_(True)
    post = bm.posterior(xs)
    assert post.samples.shape == (3, 5, 2)           # one draw per point member; mean, log σ²
    (grad,) = torch.autograd.grad(post.mean[:, 0].sum(), xs)
    assert bool((grad != 0).any())


def test_checkpoint_round_trip(tmp_path, dtype):
    bm = _ensemble("regression", dtype)
    x, y = _data("regression", dtype)
    bm.fit((x, y), epochs=2, progress=False, seed=0)
    bm.save(tmp_path / "ens.pt")
    fresh = _ensemble("regression", dtype, seed=11).load(tmp_path / "ens.pt")
    expected, got = bm.predict(x), fresh.predict(x)
    assert torch.equal(expected.mean, got.mean) and torch.equal(expected.variance, got.variance)
    other = _ensemble("regression", dtype, members=2)
    with pytest.raises(bf.errors.CheckpointError, match="does not match this model"):
        other.load(tmp_path / "ens.pt")


def test_own_loop_and_finish_fit():
    bm = _ensemble("classification", members=2)
    x, y = _data("classification")
    optimizer = bm.configure_optimizer(1e-2, 0.0)
    for _ in range(3):
        optimizer.zero_grad()
        bm.loss(x, y).backward()
        optimizer.step()
    bm.finish_fit()
    assert bm.is_fitted and bm.predict(x).probs.shape == (96, 3)


def test_bad_options():
    net = _mlp()
    wrap = bf.bayesify
    with pytest.raises(InputError, match="`members` must be an int >= 2"):
        wrap(net, "ensemble", task="classification", members=1)
    with pytest.raises(InputError, match="`reinitialize` must be one of"):
        wrap(net, "ensemble", task="classification", reinitialize="some")
    with pytest.raises(InputError, match="`training` must be one of"):
        wrap(net, "ensemble", task="classification", training="parallel")
    with pytest.raises(InputError, match="an ensemble of ensembles"):
        wrap(net, "ensemble", task="classification", base="ensemble")
    with pytest.raises(InputError, match="`method` must be one of"):
        wrap(net, "ensemble", task="classification", base="no_such_method")
    with pytest.raises(InputError, match="unknown option 'p' for the ensemble or its base"):
        wrap(net, "ensemble", task="classification", p=0.1)
    with pytest.raises(InputError, match="identical members"):
        wrap(net, "ensemble", task="classification", reinitialize=None)
    with pytest.raises(UnsupportedModelError, match="`head`='nope' is not a submodule"):
        wrap(net, "ensemble", task="classification", base="vbll", head="nope")
    with pytest.raises(InputError, match="the ensemble method needs a network"):
        wrap(None, "ensemble", task="classification")
    with pytest.raises(InputError, match="`seed` must be an int"):
        wrap(net, "ensemble", task="classification", seed=1.5)
    bm = wrap(net, "ensemble", task="classification", members=2)
    x, y = _data("classification")
    sgd = torch.optim.SGD(bm.parameters(), lr=0.1)
    with pytest.raises(InputError, match="`optimizer` does not apply to an ensemble"):
        bm.fit((x, y), optimizer=sgd)
    with pytest.raises(bf.NotFittedError, match="not fitted yet"):
        bm.predict(x)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_conformance(task, dtype, device):
    check_method("ensemble", task, dtype=dtype, device=device)
