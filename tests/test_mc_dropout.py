"""MC dropout: sampling semantics, insertion (and timm's functional drop_rate), the
fast path's fallback, likelihoods, training (fit and your own loop), errors. The fast
path's exactness and the dropout types are in test_mc_dropout_sampling.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import (
    BayesifyError,
    BayesifyWarning,
    NotFittedError,
    UnsupportedModelError,
)
from bayesify.inference.mc_dropout import MCDropoutModel
from bayesify.layers.dropout import find_dropout
from bayesify.predictive import CategoricalPredictive, MixturePredictive

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def mlp(d_in: int = 5, width: int = 16, d_out: int = 3, *, bn: bool = False,
        dropout: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, width), nn.Tanh()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def wrap(net, task="classification", dtype=torch.float32, **options):
    return bf.bayesify(net.to(dtype), "mc_dropout", task=task, **options)


# ---------------------------------------------------------------------- sampling


def test_samples_differ_across_passes_and_average(dtype):
    bm = wrap(mlp(), dtype=dtype)
    x = torch.randn(6, 5, dtype=dtype)
    pred = bm.predict(x, num_samples=8, seed=0)
    assert isinstance(pred, CategoricalPredictive)
    assert pred.sample_probs.shape == (8, 6, 3) and pred.probs.dtype == dtype
    gaps = (pred.sample_probs[1:] - pred.sample_probs[:-1]).abs().amax(dim=(1, 2))
    assert bool((gaps > 1e-4).all())
    torch.testing.assert_close(pred.probs, pred.sample_probs.mean(0), atol=TOL[dtype], rtol=0)
    assert bool((pred.epistemic() > 0).all())


def test_seed_repeats_and_different_seeds_differ():
    bm = wrap(mlp())
    x = torch.randn(4, 5)
    a, b = bm.predict(x, num_samples=5, seed=3), bm.predict(x, num_samples=5, seed=3)
    c = bm.predict(x, num_samples=5, seed=4)
    assert torch.equal(a.sample_probs, b.sample_probs)
    assert not torch.allclose(a.sample_probs, c.sample_probs)


def test_batchnorm_stays_in_eval_and_its_statistics_bitwise_unchanged(dtype):
    net = mlp(bn=True, dropout=0.3).to(dtype)
    net.train()  # a user who forgot eval(): predict must not touch the running stats
    seen = []
    net[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    bm = wrap(net, dtype=dtype)
    x = torch.randn(32, 5, dtype=dtype)
    with torch.no_grad():
        deterministic = copy.deepcopy(net).eval()(x)
    pred = bm.predict(x, num_samples=10, seed=0)
    assert seen and not any(seen)
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.training for m in net.modules())
    assert not torch.allclose(pred.sample_probs[0], pred.sample_probs[1])
    # With eval-mode BatchNorm the samples scatter around the eval-mode network.
    assert float((pred.probs - torch.softmax(deterministic, -1)).abs().max()) < 0.25


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom inside the forward")


@pytest.mark.parametrize("fast_path", [True, False])
def test_flags_and_hooks_restored_when_forward_raises(fast_path):
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), Exploding())
    net.train()
    net[0].eval()  # mixed flags must come back exactly
    flags = [m.training for m in net.modules()]
    bm = wrap(net, fast_path=fast_path)
    with pytest.raises(RuntimeError, match="boom inside the forward"):
        bm.predict(torch.randn(4, 5), num_samples=3)
    assert [m.training for m in net.modules()] == flags
    assert not net[2]._forward_hooks
    with pytest.raises(RuntimeError, match="boom inside the forward"):
        bm.sample_outputs(torch.randn(4, 5), 3)
    assert [m.training for m in net.modules()] == flags


# -------------------------------------------------------------------- insertion


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_insertion_before_last_k_linear(layers):
    # Tanh, not ReLU: an exact zero on a layer's input can then only come from dropout.
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 3)).eval()
    x = torch.randn(400, 5)
    with torch.no_grad():
        before = net(x)
    keys = list(net.state_dict())
    bm = wrap(net, layers=layers, p=0.25)
    assert bm.inserted == ["0", "2", "4"][3 - layers:]
    assert list(net.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(net(x), before)  # eval mode: dropout is the identity
    zeros = {}
    for name in ["0", "2", "4"]:
        getattr(net, name).register_forward_pre_hook(
            lambda m, a, name=name: zeros.__setitem__(name, float((a[0] == 0).double().mean())))
    net.train()
    with torch.no_grad():
        net(x)
    for name in ["0", "2", "4"]:
        if name in bm.inserted:
            assert abs(zeros[name] - 0.25) < 0.03, name
        else:
            assert zeros[name] == 0.0


def test_inserted_dropout_survives_deepcopy_and_before_names():
    net = mlp()
    bm = wrap(net, before=["2"], p=0.5)
    assert bm.inserted == ["2"]
    twin = copy.deepcopy(net)
    twin[2].bayesify_dropout.p = 0.0
    twin.train()
    x = torch.randn(8, 5)
    with torch.no_grad():
        # The copy's hook uses the copy's dropout (p = 0): deterministic in train mode.
        assert torch.equal(twin(x), twin(x))
    assert net[2].bayesify_dropout.p == 0.5


def test_before_inserts_on_any_module_type():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 2 * 2, 3))
    bm = wrap(net, before="2", p=0.3)
    assert bm.inserted == ["2"]
    x = torch.randn(5, 1, 6, 6)
    fast = bm.predict(x, num_samples=6, seed=1)
    bm.fast_path = False
    naive = bm.predict(x, num_samples=6, seed=1)
    torch.testing.assert_close(fast.sample_probs, naive.sample_probs, atol=1e-6, rtol=0)
    assert not torch.allclose(fast.sample_probs[0], fast.sample_probs[1])


def test_forward_is_the_eval_mode_point_prediction_and_loss_is_cross_entropy():
    net = mlp(dropout=0.5).eval()
    bm = wrap(net)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(bm(x), net(x), atol=0, rtol=0)
        torch.testing.assert_close(bm.loss(x, y), nn.functional.cross_entropy(net(x), y))


def test_existing_dropout_is_kept_and_save_load_roundtrip(tmp_path):
    net = mlp(dropout=0.3)
    bm = wrap(net)
    assert bm.inserted == [] and [n for n, _ in find_dropout(net)] == ["4"]
    x = torch.randn(5, 5)
    want = bm.predict(x, num_samples=4, seed=0)
    bm.save(tmp_path / "mc.pt")
    other = wrap(mlp(dropout=0.3)).load(tmp_path / "mc.pt")
    torch.testing.assert_close(other.predict(x, num_samples=4, seed=0).sample_probs,
                               want.sample_probs, atol=0, rtol=0)


# ----------------------------------------------------- functional dropout (timm)


class TimmLike(nn.Module):
    """timm's ResNet/EfficientNet head: ``drop_rate`` applied with F.dropout in forward."""

    def __init__(self, drop_rate: float = 0.2, head_module: bool = False):
        super().__init__()
        self.drop_rate = drop_rate
        self.features = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.head_drop = nn.Dropout(drop_rate) if head_module else nn.Identity()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.features(x)
        if isinstance(self.head_drop, nn.Identity) and self.drop_rate:
            h = nn.functional.dropout(h, p=self.drop_rate, training=self.training)
        return self.fc(self.head_drop(h))


def test_functional_drop_rate_is_not_ignored():
    net = TimmLike(0.2)
    with pytest.warns(BayesifyWarning, match=r"model.drop_rate = 0.2 is applied with "
                      r"F.dropout.*Inserted nn.Dropout\(p=0.2\) on the input of 'fc'") as rec:
        bm = wrap(net)
    assert rec[0].filename == __file__      # the warning points at the user's line
    assert bm.inserted == ["fc"] and net.fc.bayesify_dropout.p == 0.2
    with pytest.warns(BayesifyWarning, match=r"p=0.3\) on the input of 'fc' instead, at "
                      "the `p` you passed. Set model.drop_rate = 0"):
        bm = wrap(TimmLike(0.2), p=0.3)
    assert bm.inserted == ["fc"]
    net = TimmLike(0.2)
    net.features.append(nn.Dropout(0.5))
    with pytest.warns(BayesifyWarning, match=r"Only the dropout modules \(features.2\)"):
        assert wrap(net).inserted == []


def test_drop_rate_held_by_a_dropout_module_is_sampled_without_warning():
    bm = wrap(TimmLike(0.25, head_module=True))    # like timm's ConvNeXt head
    assert bm.inserted == []
    assert not torch.equal(*bm.predict(torch.randn(4, 5), num_samples=2).sample_probs)


# ------------------------------------------------------------ fast-path fallback


class RowLookup(nn.Module):
    """Reads a table of one entry per input of a batch of 6 after the dropout, as
    transformers' lookups sized at build time do: the replicated rows of the split path
    and the tiled inputs both run past its end (IndexError)."""

    def __init__(self):
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 3)
        self.table = [1.0] * 6

    def forward(self, x):
        h = self.head(self.drop(torch.tanh(self.body(x))))
        return h * self.table[h.shape[0] - 1]


def test_any_fast_path_failure_falls_back_once():
    bm = wrap(RowLookup())
    x = torch.randn(6, 5)
    with pytest.warns(BayesifyWarning, match=r"fell back .*\(IndexError: list index") as rec:
        got = bm.predict(x, num_samples=5, seed=1)
    assert len(rec) == 1 and rec[0].filename == __file__
    again = bm.predict(x, num_samples=5, seed=1)     # no second attempt, no second warning
    bm.fast_path = False
    want = bm.predict(x, num_samples=5, seed=1)
    assert torch.equal(got.sample_probs, want.sample_probs)
    assert torch.equal(again.sample_probs, want.sample_probs)


# -------------------------------------------------------------------- regression


@pytest.mark.parametrize("d_out", [1, 2])
def test_regression_mixture_homoscedastic(d_out, dtype):
    bm = wrap(mlp(d_out=d_out), "regression", dtype=dtype)
    with pytest.raises(NotFittedError, match=r"\.fit\(train\)"):
        bm.predict(torch.randn(3, 5, dtype=dtype))
    with torch.no_grad():
        bm.noise.log_std.copy_(torch.log(torch.arange(1, d_out + 1, dtype=dtype) / 4))
    bm._mark_fitted()
    x = torch.randn(9, 5, dtype=dtype)
    pred = bm.predict(x, num_samples=6, seed=0)
    raw = bm.sample_outputs(x, 6, torch.Generator().manual_seed(0))
    assert isinstance(pred, MixturePredictive) and pred.means.dtype == dtype
    shape = (6, 9) if d_out == 1 else (6, 9, d_out)
    assert pred.means.shape == shape and pred.variances.shape == shape
    want_var = (torch.arange(1, d_out + 1, dtype=dtype) / 4) ** 2
    torch.testing.assert_close(pred.variances.reshape(-1, d_out),
                               want_var.expand(6 * 9, d_out), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(pred.aleatoric_variance.reshape(-1, d_out),
                               want_var.expand(9, d_out), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(pred.epistemic_variance.reshape(9, d_out),
                               raw.var(0, unbiased=False), atol=10 * TOL[dtype], rtol=1e-4)


def test_regression_mixture_heteroscedastic(dtype):
    bm = wrap(mlp(d_out=4), "regression", dtype=dtype, noise="heteroscedastic")
    bm._mark_fitted()
    x = torch.randn(7, 5, dtype=dtype)
    pred = bm.predict(x, num_samples=5, seed=1)
    raw = bm.sample_outputs(x, 5, torch.Generator().manual_seed(1))
    assert pred.means.shape == (5, 7, 2)
    torch.testing.assert_close(pred.means, raw[..., :2], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(pred.variances,
                               torch.nn.functional.softplus(raw[..., 2:]) + 1e-6,
                               atol=TOL[dtype], rtol=1e-6)
    assert float(pred.variances.std(0).min()) > 0  # the noise varies with the sample


def test_fixed_noise_regressor_predicts_at_once():
    bm = wrap(mlp(d_out=1), "regression", noise=0.5)
    pred = bm.predict(torch.randn(4, 5), num_samples=3)
    torch.testing.assert_close(pred.variances, torch.full((3, 4), 0.25))


# ----------------------------------------------------------------------- training


def test_fit_lowers_classification_loss(dtype):
    torch.manual_seed(0)
    x = torch.randn(256, 5, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    bm = wrap(mlp(), dtype=dtype, layers=2, p=0.1)
    bm.fit((x, y), epochs=30, lr=1e-2, batch_size=64, progress=False, seed=0)
    assert bm.history[-1] < 0.6 * bm.history[0]
    assert float((bm.predict(x, seed=0).labels == y).double().mean()) > 0.85


def test_fit_regression_learns_noise_and_covers():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, generator=gen) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(300, generator=gen)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 1))
    bm = wrap(net, "regression", layers=1, p=0.05)
    bm.fit((x, y), epochs=150, lr=1e-2, batch_size=300, progress=False, seed=0)
    assert bm.history[-1] < bm.history[0] - 0.5
    assert 0.12 < math.exp(float(bm.noise.log_std.detach())) < 0.3
    x_test = torch.rand(2000, 1, generator=gen) * 4 - 2
    y_test = torch.sin(2 * x_test[:, 0]) + 0.2 * torch.randn(2000, generator=gen)
    lo, hi = bm.predict(x_test, num_samples=32, seed=0).interval(0.9)
    coverage = float(((y_test >= lo) & (y_test <= hi)).double().mean())
    assert 0.85 < coverage < 0.97


def test_your_own_loop_then_finish_fit_predicts(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, generator=gen, dtype=dtype) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(256, generator=gen, dtype=dtype)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    bm = wrap(net, "regression", dtype=dtype, p=0.05)
    assert bm.noise.log_std.dtype == dtype      # the noise follows the model's dtype
    opt = torch.optim.Adam(bm.parameters(), lr=1e-2)
    bm.train()
    for _ in range(150):
        opt.zero_grad()
        loss = bm.loss(x, y)
        loss.backward()
        opt.step()
    with pytest.raises(NotFittedError, match="finish_fit"):
        bm.predict(x)
    pred = bm.finish_fit().predict(x, num_samples=16, seed=0)
    assert not bm.training and isinstance(pred, MixturePredictive)
    assert pred.mean.dtype == dtype and float(loss.detach()) < 0.5
    assert all(t.dtype == dtype for t in [*bm.parameters(), *bm.buffers()]
               if t.is_floating_point())
    assert 0.1 < float(pred.aleatoric_variance.mean().sqrt()) < 0.4


# --------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("options, error, match", [
    ({"p": 1.0}, BayesifyError, r"`p` must lie in \[0, 1\)"),
    ({"p": -0.1}, BayesifyError, r"`p` must lie in \[0, 1\)"),
    ({"layers": 0}, BayesifyError, "`layers`"),
    ({"layers": 4}, UnsupportedModelError, "`layers` is 4 but the model has only 3"),
    ({"before": "nope"}, BayesifyError, "`before` must name submodules"),
    ({"layers": 1, "before": "0"}, BayesifyError, "either `layers`"),
    ({"max_batch_rows": 0}, BayesifyError, "`max_batch_rows`"),
    ({"unknown": 1}, BayesifyError, "unknown option 'unknown'"),
])
def test_bad_options(options, error, match):
    net = mlp()
    with pytest.raises(error, match=match):
        wrap(net, **options)
    assert not find_dropout(net)  # a failed wrap inserts nothing


def test_bad_models():
    with pytest.raises(UnsupportedModelError, match="pass `before=`"):
        wrap(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()))
    with pytest.raises(BayesifyError, match="`p` sets the rate of inserted dropout"):
        wrap(mlp(dropout=0.2), p=0.3)
    with pytest.raises(BayesifyError, match="`model` is None"):
        MCDropoutModel(None, "classification")
    with pytest.raises(BayesifyError, match="heteroscedastic"):
        wrap(mlp(d_out=3), "regression", noise="heteroscedastic")
    bm = wrap(nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3))))
    with pytest.raises(BayesifyError, match=r"logits \[N, C\]"):
        bm.predict(torch.randn(2, 5), num_samples=2)
