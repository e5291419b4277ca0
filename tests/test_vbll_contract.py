"""The "vbll" method's contract (issue 10): posteriors, own loops, fit hooks and defaults,
and the hardening of issue 16 (BatchNorm, divergence, errors in the user's terms)."""

from __future__ import annotations

import copy

import pytest
import torch
from _lightning import train_with_lightning
from test_vbll_method import _blobs, _pretrained
from torch import nn

import bayesify as bf
from bayesify.errors import InputError


def test_users_own_loop_regression_predicts_after_finish_fit(dtype):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64, dtype=dtype)[:, None]
    y = torch.sin(2 * x[:, 0])
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    bm = bf.bayesify(net, "vbll", task="regression", n_data=64, freeze_backbone=False)
    optimizer = torch.optim.Adam(bm.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        bm.loss(x, y).backward()
        optimizer.step()
    pred = bm.finish_fit().predict(x)
    assert isinstance(pred, bf.GaussianPredictive) and pred.mean.dtype == dtype
    assert float((pred.mean - y).pow(2).mean()) < 0.1 * float(y.var())


def test_loss_reads_inputs_after_a_fit_on_cached_features():
    # fit trains on cached features; the user's loss(x, y) afterwards still takes inputs.
    net = _pretrained()
    x, y = _blobs()
    bm = bf.bayesify(net, "vbll", task="classification")
    bm.fit((x, y), epochs=2, progress=False, seed=0)
    phi = bm._features(x)
    torch.testing.assert_close(bm.loss(x, y), bm.training_loss(phi, y))
    with pytest.raises(InputError, match=r"`features` must have shape \[B, 16\]"):
        bm.training_loss(x, y)  # the loop's hook takes features, not inputs


def test_prior_scale_error_names_the_value_passed():
    for kind in ("discriminative", "generative"):
        with pytest.raises(InputError, match=r"`prior_scale` must be > 0, got -1$"):
            bf.bayesify(_pretrained(), "vbll", task="classification", kind=kind,
                        prior_scale=-1)
    with pytest.raises(InputError, match=r"`prior_scale` must be > 0, got -1$"):
        bf.bayesify(nn.Linear(3, 1), "vbll", task="regression", prior_scale=-1)


def test_a_diverging_fit_stops_with_an_error_naming_the_step():
    x, y = _blobs()
    for covariance in ("dense", "lowrank"):
        bm = bf.bayesify(_pretrained(), "vbll", task="classification", covariance=covariance)
        with pytest.raises(bf.TrainingDivergedError, match="diverged at epoch .* step"):
            bm.fit((x * 1e30, y), epochs=3, lr=1e6, progress=False, seed=0)


def test_frozen_backbone_keeps_batchnorm_statistics_bitwise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _blobs()
    net.train()
    net(x)  # some running statistics to keep
    before = copy.deepcopy(net.state_dict())
    bm = bf.bayesify(net, "vbll", task="classification")
    bm.fit((x, y), epochs=2, progress=False, seed=0)
    bm.predict(x)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_posterior_is_gaussian_and_differentiable_in_x(dtype):
    net = _pretrained(dtype=dtype)
    x, y = _blobs(dtype=dtype)
    bm = bf.bayesify(net, "vbll", task="classification").fit((x, y), epochs=2,
                                                             progress=False, seed=0)
    xq = x[:5].clone().requires_grad_()
    posterior = bm.posterior(xq)
    assert isinstance(posterior, bf.GaussianPosterior) and posterior.kind == "diagonal"
    assert posterior.mean.shape == (5, 3) and posterior.mean.dtype == dtype
    (grad,) = torch.autograd.grad(posterior.variance.sum() + posterior.mean.sum(), xq)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # predict samples the Gaussian over logits: the same draws as the posterior's
    generator = torch.Generator().manual_seed(4)
    draws = bm.posterior(x[:5]).sample(100, generator)
    torch.testing.assert_close(bm.predict(x[:5], seed=4).sample_probs,
                               torch.softmax(draws.detach(), -1))


@pytest.mark.parametrize("covariance", ["dense", "diagonal", "lowrank"])
def test_regression_joint_posterior_is_phi_s_phi(covariance, dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=dtype)
    y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], 1)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    bm = bf.bayesify(net, "vbll", task="regression", covariance=covariance)
    bm.fit((x, y), epochs=3, progress=False, seed=0)
    blocks = torch.randn(3, 4, 2, dtype=dtype)
    joint = bm.posterior(blocks, joint=True)
    assert joint.kind == "joint" and joint.mean.shape == (3, 4, 2)
    assert joint.covariance.shape == (3, 2, 4, 4)
    phi = bm._features(blocks.reshape(12, 2)).reshape(3, 4, 8)
    S = bm.vbll.cov.covariance()  # [m, d, d]
    expected = torch.einsum("bqd,mde,bpe->bmqp", phi, S, phi)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(joint.covariance, expected, rtol=tol, atol=tol)
    marginal = bm.posterior(blocks.reshape(12, 2))
    torch.testing.assert_close(joint.variance.reshape(12, 2), marginal.variance, rtol=tol,
                               atol=tol)
    pred = bm.predict(blocks.reshape(12, 2))
    torch.testing.assert_close(pred.aleatoric_variance,
                               bm.vbll.noise_variance().detach().expand(12, 2))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")
def test_lightning_trainer_then_finish_fit_predicts(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _blobs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    bm = bf.bayesify(net, "vbll", task="classification", n_data=len(y), freeze_backbone=False)

    train_with_lightning(bm, DataLoader(TensorDataset(x, y), batch_size=60, shuffle=True),
                         epochs=15, root=tmp_path)
    pred = bm.finish_fit().predict(x, seed=0)
    assert float((pred.labels == y).float().mean()) > 0.95


def test_fit_defaults_are_the_vbll_recipe():
    frozen = bf.bayesify(_pretrained(), "vbll", task="classification")
    joint = bf.bayesify(_pretrained(), "vbll", task="classification", freeze_backbone=False)
    assert frozen.fit_defaults()["epochs"] == 50 and joint.fit_defaults()["epochs"] == 20
    assert frozen.fit_defaults()["grad_clip"] == 1.0 and frozen.fit_defaults()["lr"] == 1e-3
    x, y = _blobs()
    frozen.fit((x, y), progress=False, seed=0)
    assert len(frozen.history) == 50
