"""The "ivon" method: training through fit, wrapping a user's IVON, predictions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.data import make_gap_regression


def _blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    return centers[y] + 0.8 * torch.randn(n, 2, generator=g), y


def _classifier(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)


def test_fit_then_predict_averages_over_weight_samples(dtype):
    x, y = _blobs()
    bm = bf.bayesify(_classifier(dtype), "ivon", task="classification", beta2=0.999, seed=0)
    bm.fit((x, y), epochs=15, progress=False, seed=0)
    assert isinstance(bm.optimizer, bf.IVON)
    assert bm.optimizer.param_groups[0]["ess"] == 240.0      # ess = N by default
    assert bm.history[-1] < 0.5 * bm.history[0]
    means = [p.detach().clone() for p in bm.parameters()]
    bm.train()
    x_test, y_test = _blobs(300, seed=1)
    pred = bm.predict(x_test, num_samples=16, seed=3)
    assert bm.training and all(m.training for m in bm.modules())       # flags restored
    assert all(torch.equal(p, m) for p, m in zip(bm.parameters(), means, strict=True))
    assert isinstance(pred, bf.CategoricalPredictive)
    assert pred.sample_probs.shape == (16, 300, 3) and pred.probs.dtype == dtype
    assert float((pred.labels == y_test).to(dtype).mean()) > 0.9
    # The predictive is the log-mean-exp of the sampled softmaxes.
    torch.testing.assert_close(pred.probs, pred.sample_probs.mean(0))
    assert float(pred.epistemic().mean()) > 0
    again = bm.predict(x_test, num_samples=16, seed=3)
    assert torch.equal(again.probs, pred.probs)


def test_wraps_a_model_trained_in_the_users_loop():
    x, y = _blobs()
    net = _classifier()
    opt = bf.IVON(net.parameters(), lr=0.1, ess=len(x), seed=1)
    for _ in range(60):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    bm = bf.bayesify(net, "ivon", task="classification", optimizer=opt)
    assert bm.is_fitted
    pred = bm.predict(x[:50], num_samples=8, seed=5)
    generator = torch.Generator().manual_seed(5)
    logits = []
    with torch.no_grad():
        for _ in range(8):
            with opt.sampled_params(train=False, generator=generator):
                logits.append(net(x[:50]))
    expected = bf.CategoricalPredictive.from_logits(sample_logits=torch.stack(logits))
    # Same draws; predict adds the noise out of place, so rounding may differ in the ulp.
    torch.testing.assert_close(pred.probs, expected.probs, rtol=1e-5, atol=1e-6)
    # fit continues from this posterior with the same optimizer.
    steps = opt.state[net[0].weight]["step"]
    bm.fit((x, y), epochs=1, batch_size=60, progress=False)
    assert bm.optimizer is opt and opt.state[net[0].weight]["step"] == steps + 4


def test_regression_gives_a_mixture_with_learned_noise(dtype):
    data = make_gap_regression(n_train=200, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    bm = bf.bayesify(net, "ivon", task="regression", beta2=0.999, seed=0)
    # IVON starts out as SGD with momentum: small batches and lr for a tanh regressor.
    bm.fit((data.X_train, data.y_train), epochs=40, lr=0.03, batch_size=8, progress=False,
           seed=0)
    pred = bm.predict(data.X_test, num_samples=16, seed=0)
    assert isinstance(pred, bf.MixturePredictive)
    assert pred.mean.shape == (400,) and pred.mean.dtype == dtype
    # The noise std of the problem lies in [0.05, 0.35] (RMS 0.21).
    noise_std = float(pred.aleatoric_variance.mean().sqrt())
    assert 0.1 < noise_std < 0.45
    y = data.y_test.to(dtype)
    assert float((pred.mean - y).pow(2).mean().sqrt()) < 0.4
    lo, hi = pred.interval(0.9)
    coverage = float(((y >= lo) & (y <= hi)).to(dtype).mean())
    assert 0.8 < coverage < 0.999
    assert any(p is bm.noise.log_std for p in bm.optimizer.params)   # noise is learned too


def test_save_and_load_keep_the_posterior(tmp_path):
    x, y = _blobs()
    bm = bf.bayesify(_classifier(), "ivon", task="classification", seed=0)
    bm.fit((x, y), epochs=3, progress=False, seed=0)
    bm.save(tmp_path / "ivon.pt")
    fresh = bf.bayesify(_classifier(), "ivon", task="classification")
    fresh.load(tmp_path / "ivon.pt")
    assert fresh.is_fitted
    for p, q in zip(bm.optimizer.params, fresh.optimizer.params, strict=True):
        assert torch.equal(bm.optimizer.state[p]["hess"], fresh.optimizer.state[q]["hess"])
    assert torch.equal(fresh.predict(x, num_samples=4, seed=1).probs,
                       bm.predict(x, num_samples=4, seed=1).probs)


def test_bad_use_raises_with_the_fix():
    net = _classifier()
    with pytest.raises(bf.InputError, match="`optimizer` must be a bayesify.IVON"):
        bf.bayesify(net, "ivon", task="classification",
                    optimizer=torch.optim.Adam(net.parameters()))
    partial = bf.IVON(net[0].parameters(), lr=0.1, ess=10)
    with pytest.raises(bf.InputError, match="does not hold the model's parameter '2.weight'"):
        bf.bayesify(net, "ivon", task="classification", optimizer=partial)
    with pytest.raises(bf.InputError, match="unknown option 'lr' for method 'ivon'"):
        bf.bayesify(net, "ivon", task="classification", lr=0.1)
    with pytest.raises(ValueError, match=r"`beta2` must lie in \[0, 1\), got 1.5"):
        bf.bayesify(net, "ivon", task="classification", beta2=1.5)
    bm = bf.bayesify(copy.deepcopy(net), "ivon", task="classification")
    with pytest.raises(bf.NotFittedError, match="call .fit"):
        bm.predict(torch.zeros(2, 2))
    with pytest.raises(bf.InputError, match="`optimizer` must be a bayesify.IVON for the ivon"):
        bm.fit(_blobs(), optimizer=torch.optim.SGD(bm.parameters(), lr=0.1), progress=False)
