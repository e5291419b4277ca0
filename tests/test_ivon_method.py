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


# ------------------------------------------------------------- your own loop


def _own_loop(bm, x, y, steps: int = 40, opt=None) -> bf.IVON:
    opt = opt or bm.configure_optimizer(0.1, 1e-4)
    bm.train()
    for step in range(steps):
        rows = slice((step % 4) * 60, (step % 4 + 1) * 60)
        with opt.sampled_params(train=True):
            opt.zero_grad()
            bm.loss(x[rows], y[rows]).backward()
        opt.step()
    return opt


def test_a_plain_loop_gives_a_model_that_predicts(tmp_path):
    x, y = _blobs()
    bm = bf.bayesify(_classifier(), "ivon", task="classification", n_data=len(x), seed=0)
    with pytest.raises(bf.NotFittedError, match="finish_fit"):
        bm.predict(x)
    with pytest.raises(bf.NotFittedError, match=r"bm.configure_optimizer\(lr, weight_decay\)"):
        bm.finish_fit()
    opt = _own_loop(bm, x, y)
    assert bm.optimizer is opt and opt.param_groups[0]["ess"] == 240.0
    # The posterior is the optimizer's state: the model predicts without finish_fit ...
    assert bm.is_fitted
    pred = bm.predict(x, num_samples=8, seed=0)
    assert float((pred.labels == y).float().mean()) > 0.9
    # ... and finish_fit marks it for good, so save and load work as after fit.
    assert bm.finish_fit() is bm and not bm.training
    bm.save(tmp_path / "own.pt")
    fresh = bf.bayesify(_classifier(), "ivon", task="classification").load(tmp_path / "own.pt")
    assert torch.equal(fresh.predict(x, num_samples=8, seed=0).probs, pred.probs)


def test_own_loop_regression_needs_the_noise_in_the_optimizer(dtype):
    data = make_gap_regression(n_train=240, seed=0)
    x, y = data.X_train.to(dtype), data.y_train.to(dtype)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    users = bf.IVON(net.parameters(), lr=0.01, ess=240, seed=0)
    bm = bf.bayesify(net, "ivon", task="regression", optimizer=users)
    _own_loop(bm, x, y, steps=4, opt=users)
    assert not bm.is_fitted            # the noise scale was not trained
    with pytest.raises(bf.NotFittedError, match="does not hold 'noise.log_std'"):
        bm.finish_fit()
    opt = bm.configure_optimizer(0.01, 1e-4)     # adds the noise as a second group
    assert opt is users and len(opt.param_groups) == 2
    _own_loop(bm, x, y, steps=8, opt=opt)
    pred = bm.finish_fit().predict(data.X_test.to(dtype), num_samples=4, seed=0)
    assert pred.mean.dtype == dtype and bool(torch.isfinite(pred.variance).all())
    floating = [*bm.parameters(), *bm.buffers(),
                *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    assert all(t.dtype == dtype for t in floating if t.is_floating_point())


def test_configure_optimizer_needs_the_training_set_size():
    bm = bf.bayesify(_classifier(), "ivon", task="classification")
    with pytest.raises(bf.InputError, match="pass n_data=N"):
        bm.configure_optimizer(0.1, 1e-4)
    assert bm.optimizer is None


def test_fit_keeps_the_optimizers_lr_unless_given():
    x, y = _blobs()
    net = _classifier()
    opt = bf.IVON([{"params": net[0].parameters(), "lr": 0.02},
                   {"params": net[2].parameters()}], lr=0.05, ess=240, seed=0)
    bm = bf.bayesify(net, "ivon", task="classification", optimizer=opt)
    bm.fit((x, y), epochs=1, progress=False)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.05]
    bm.fit((x, y), epochs=1, lr=0.01, weight_decay=1e-3, progress=False)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 1e-3)] * 2


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_of_a_schedule_that_reached_lr_zero_loads(tmp_path):
    x, y = _blobs()
    net = _classifier()
    opt = bf.IVON(net.parameters(), lr=0.1, ess=len(x), seed=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    bm = bf.bayesify(net, "ivon", task="classification", optimizer=opt)
    for _ in range(8):
        _own_loop(bm, x, y, steps=1, opt=opt)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    bm.finish_fit().save(tmp_path / "ivon.pt")
    fresh = bf.bayesify(_classifier(), "ivon", task="classification").load(tmp_path / "ivon.pt")
    assert fresh.optimizer.param_groups[0]["lr"] == 0.0
    assert torch.equal(fresh.predict(x, num_samples=4, seed=1).probs,
                       bm.predict(x, num_samples=4, seed=1).probs)


def test_checkpoint_with_two_param_groups_round_trips(tmp_path, dtype):
    data = make_gap_regression(n_train=64, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    users = bf.IVON(net.parameters(), lr=0.01, ess=64, seed=0)
    _own_loop(bf.bayesify(net, "ivon", task="regression"), data.X_train.to(dtype),
              data.y_train.to(dtype), steps=2, opt=users)
    bm = bf.bayesify(net, "ivon", task="regression", optimizer=users)
    bm.fit((data.X_train, data.y_train), epochs=1, lr=0.01, progress=False)  # + noise group
    bm.save(tmp_path / "ivon.pt")
    twin = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    fresh = bf.bayesify(twin, "ivon", task="regression").load(tmp_path / "ivon.pt")
    assert len(fresh.optimizer.param_groups) == 2
    assert fresh.optimizer.params[-1] is fresh.noise.log_std
    torch.testing.assert_close(fresh.predict(data.X_test, seed=0).mean,
                               bm.predict(data.X_test, seed=0).mean, rtol=0, atol=0)


def _tamper(path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"]["_extra_state"])
    torch.save(payload, path)


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.pop("optimizer"), "holds no IVON posterior"),
    (lambda e: e["options"].update(beta2=1.5), r"`beta2` must lie in \[0, 1\)"),
    (lambda e: e["options"].pop("seed"), "its options are"),
    (lambda e: e["param_names"].__setitem__(0, "model.9.weight"), "parameters .* this model lacks"),
    (lambda e: e["optimizer"]["state"][0].__setitem__("hess", torch.ones(7)),
     r"'hess' of parameter 0 has shape \(7,\)"),
    (lambda e: e["optimizer"]["param_groups"][0].pop("ess"), "lacks ess"),
])
def test_a_bad_ivon_state_raises_before_anything_changes(tmp_path, edit, match):
    x, y = _blobs()
    bm = bf.bayesify(_classifier(), "ivon", task="classification", seed=0)
    bm.fit((x, y), epochs=1, progress=False, seed=0)
    bm.save(tmp_path / "ivon.pt")
    _tamper(tmp_path / "ivon.pt", edit)
    other = bf.bayesify(_classifier(), "ivon", task="classification", seed=1)
    other.fit((x, y), epochs=1, lr=0.05, progress=False, seed=1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(bf.BayesifyError, match=match) as info:
        other.load(tmp_path / "ivon.pt")
    assert type(info.value).__name__ == "CheckpointError"
    after = other.state_dict()
    for key, value in before.items():
        if key != "_extra_state":
            assert torch.equal(after[key], value), key
    assert str(after["_extra_state"]) == str(before["_extra_state"])


# --------------------------------------------------------------- divergence


class _Fragile(nn.Module):
    """A classifier whose output is NaN for inputs with a first feature above 10."""

    def __init__(self):
        super().__init__()
        self.net = _classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + (10 - x[:, :1]).sqrt()


def test_divergence_guard_runs_inside_the_ivon_closure():
    x, y = _blobs()
    x = x.clone()
    x[7, 0] = 50.0
    bm = bf.bayesify(_Fragile(), "ivon", task="classification", mc_samples=2, seed=0)
    with pytest.raises(bf.BayesifyError, match=r"diverged at epoch 1/2, step 1: the loss"):
        bm.fit((x, y), epochs=2, batch_size=240, progress=False)
    assert all("grad_sum" not in s for s in bm.optimizer.state.values())
    assert all(bool(torch.isfinite(p).all()) for p in bm.parameters())
    with pytest.warns(bf.BayesifyWarning, match="skipped 1 of 4 batches"):
        bm.fit((x, y), epochs=1, batch_size=60, on_nonfinite="warn", progress=False)
    bm.fit(_blobs(), epochs=1, grad_clip=1e-3, progress=False)      # the clip applies
    assert bm.is_fitted
