"""The "vbll" method: wrapping, cached features, predictives, own loops, errors, checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import BayesifyError, InputError, UnsupportedModelError
from bayesify.layers import VBLLDiscriminative, VBLLRegression


def _blobs(n: int = 240, classes: int = 3, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(classes, 4, generator=generator)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, 4, generator=generator)
    return x.to(dtype), y


def _pretrained(classes: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, classes)).to(dtype)
    x, y = _blobs(classes=classes, dtype=dtype)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net


class _Counting(nn.Module):
    """A backbone that counts its forward calls."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def test_wrapping_starts_at_the_pretrained_head_and_leaves_weights(dtype):
    net = _pretrained(dtype=dtype)
    before = copy.deepcopy(net.state_dict())
    bm = bf.bayesify(net, "vbll", task="classification")
    assert isinstance(bm.vbll, VBLLDiscriminative) and bm.head_name == "2"
    x, y = _blobs(dtype=dtype)
    torch.testing.assert_close(bm(x), net(x))  # mean logits = the pretrained logits
    bm.fit((x, y), epochs=3, progress=False, seed=0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert bm.vbll.weight.dtype == dtype


def test_frozen_backbone_runs_once_per_fit():
    net = _Counting(_pretrained())
    bm = bf.bayesify(net, "vbll", task="classification", covariance="diagonal")
    x, y = _blobs()
    bm.fit((x, y), epochs=20, batch_size=32, progress=False, seed=0)
    assert net.calls == 1  # 240 rows cached in one pass; 20 epochs x 8 batches on features
    assert len(bm.history) == 20 and bm.history[-1] < bm.history[0]


def test_joint_training_updates_the_backbone():
    net = _pretrained()
    first = net[0].weight.detach().clone()
    bm = bf.bayesify(net, "vbll", task="classification", freeze_backbone=False)
    x, y = _blobs()
    bm.fit((x, y), epochs=2, lr=1e-2, progress=False, seed=0)
    assert not torch.equal(net[0].weight, first)
    assert not net[2].weight.requires_grad  # the bypassed head stays out of training


def test_head_option_and_trained_predictive():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    net.add_module("classifier", nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 3)))
    x, y = _blobs()
    bm = bf.bayesify(net, "vbll", task="classification", head="classifier.1", n_data=240)
    bm.fit((x, y), epochs=60, lr=1e-2, progress=False, seed=0)
    pred = bm.predict(x, seed=0)
    assert isinstance(pred, bf.CategoricalPredictive) and pred.sample_probs.shape == (100, 240, 3)
    assert float((pred.labels == y).float().mean()) > 0.95
    far = bm.predict(50 * torch.randn(50, 4), seed=0)
    assert float(far.epistemic().mean()) > float(pred.epistemic().mean())


def test_generative_kind_attaches_a_density_score():
    net = _pretrained()
    x, y = _blobs()
    bm = bf.bayesify(net, "vbll", task="classification", kind="generative")
    bm.fit((x, y), epochs=10, progress=False, seed=0)
    pred = bm.predict(x)
    assert float((pred.labels == y).float().mean()) > 0.95
    far = bm.predict(x + 30.0)
    # Higher score = more out-of-distribution.
    assert float(far.scores["density"].min()) > float(pred.scores["density"].max())


def test_regression_predictive_splits_epistemic_and_aleatoric(dtype):
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 200, dtype=dtype)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(200, dtype=dtype)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    bm = bf.bayesify(net, "vbll", task="regression", freeze_backbone=False)
    bm.fit((x, y), epochs=150, lr=1e-2, batch_size=50, progress=False, seed=0)
    pred = bm.predict(torch.tensor([[0.0], [8.0]], dtype=dtype))
    assert isinstance(pred, bf.GaussianPredictive) and pred.mean.shape == (2,)
    torch.testing.assert_close(pred.variance, pred.epistemic_variance + pred.aleatoric_variance)
    assert float(pred.aleatoric_variance[0]) == pytest.approx(0.01, rel=0.6)
    assert float(pred.epistemic_variance[1]) > 10 * float(pred.epistemic_variance[0])
    assert abs(float(pred.mean[0])) < 0.1


def test_users_own_loop_through_loss():
    net = _pretrained()
    x, y = _blobs()
    bm = bf.bayesify(net, "vbll", task="classification", n_data=len(y))
    optimizer = torch.optim.SGD(bm.parameters(), lr=0.05)  # any optimizer
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = bm.loss(x, y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    torch.testing.assert_close(bm(x, y), bm.loss(x, y))  # forward with y is the loss (DDP)
    with pytest.raises(bf.NotFittedError, match="finish_fit"):
        bm.predict(x)
    bm.finish_fit()
    pred = bm.predict(x, seed=0)
    assert isinstance(pred, bf.CategoricalPredictive)
    assert float((pred.labels == y).float().mean()) > 0.95


# ----------------------------------------------------------------------- bad input


def test_model_without_linear_head():
    with pytest.raises(UnsupportedModelError, match="head="):
        bf.bayesify(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()), "vbll",
                    task="classification")
    with pytest.raises(UnsupportedModelError, match="`head`='0' is a Conv1d"):
        bf.bayesify(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Linear(2, 2)), "vbll",
                    task="classification", head="0")
    with pytest.raises(UnsupportedModelError, match="`head`='nope' names no submodule"):
        bf.bayesify(_pretrained(), "vbll", task="classification", head="nope")


def test_forward_that_does_more_after_the_head():
    net = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
    bm = bf.bayesify(net, "vbll", task="classification")
    x, y = _blobs()
    with pytest.raises(UnsupportedModelError, match="does more after that layer.*`head=`"):
        bm.fit((x, y), epochs=1, progress=False)


def test_layer_input_errors():
    head = VBLLRegression(4, 2, regularization_weight=0.1)
    with pytest.raises(InputError, match=r"`features` must have shape \[B, 4\]"):
        head.loss(torch.randn(3, 5), torch.randn(3, 2))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(InputError, match="`features` contains 1 NaN"):
        head(bad)
    with pytest.raises(InputError, match=r"`y` must have shape \[N\] or \[N, 2\]"):
        head.loss(torch.randn(3, 4), torch.randn(3, 3))
    with pytest.raises(InputError, match="`regularization_weight` must be > 0"):
        VBLLRegression(4, regularization_weight=0.0)
    with pytest.raises(InputError, match="`regularization_weight` is not set"):
        VBLLRegression(4).loss(torch.randn(3, 4), torch.randn(3))
    with pytest.raises(InputError, match="`rank` applies to covariance='lowrank'"):
        VBLLRegression(4, rank=2)
    with pytest.raises(InputError, match="`covariance` must be one of"):
        VBLLDiscriminative(4, 3, covariance="full")


def test_method_input_errors():
    x, y = _blobs()
    bm = bf.bayesify(_pretrained(), "vbll", task="classification")
    with pytest.raises(BayesifyError, match="`y` must be < 3"):
        bm.fit((x, y + 1), epochs=1, progress=False)
    with pytest.raises(InputError, match="`n_data` must be an int >= 1"):
        bf.bayesify(_pretrained(), "vbll", task="classification", n_data=0)
    with pytest.raises(InputError, match="`n_data` is unknown"):
        bf.bayesify(_pretrained(), "vbll", task="classification").loss(x, y)
    with pytest.raises(InputError, match="`kind` must be one of"):
        bf.bayesify(_pretrained(), "vbll", task="classification", kind="bayes")
    reg = bf.bayesify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "vbll",
                      task="regression")
    with pytest.raises(BayesifyError, match=r"`y` must have shape \[N\] or \[N, 2\]"):
        reg.fit((x, torch.randn(240, 3)), epochs=1, progress=False)
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    with pytest.raises(InputError, match="`X` contains 1 NaN"):
        bm.fit((nan_x, y), epochs=1, progress=False)


# ----------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["discriminative", "generative"])
def test_state_dict_round_trip_reproduces_predictions(kind):
    x, y = _blobs()
    bm = bf.bayesify(_pretrained(), "vbll", task="classification", kind=kind,
                     covariance="lowrank")
    bm.fit((x, y), epochs=5, progress=False, seed=0)
    buffer = io.BytesIO()
    torch.save(bm.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    fresh = bf.bayesify(fresh_net, "vbll", task="classification", kind=kind,
                        covariance="lowrank")
    fresh.load_state_dict(state)
    a, b = bm.predict(x, seed=3), fresh.predict(x, seed=3)
    assert fresh.is_fitted and torch.equal(a.probs, b.probs)
    if kind == "generative":
        assert torch.equal(a.scores["density"], b.scores["density"])


def test_save_load_round_trip_regression(tmp_path):
    x = torch.linspace(-1, 1, 64)[:, None]
    y = x[:, 0] ** 2
    make = lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))  # noqa: E731
    bm = bf.bayesify(make(), "vbll", task="regression").fit((x, y), epochs=3, progress=False)
    bm.save(str(tmp_path / "vbll.pt"))
    other = bf.bayesify(make(), "vbll", task="regression").load(str(tmp_path / "vbll.pt"))
    a, b = bm.predict(x), other.predict(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    assert other.n_data == 64


@pytest.mark.parametrize("kind", ["discriminative", "generative"])
def test_follows_the_model_device_and_dtype(kind, device):
    net = _pretrained().to(device=device, dtype=torch.float64)
    x, y = _blobs(dtype=torch.float64)
    bm = bf.bayesify(net, "vbll", task="classification", kind=kind, covariance="dense")
    bm.fit((x.to(device), y.to(device)), epochs=2, progress=False, seed=0)
    pred = bm.predict(x, seed=0)
    assert pred.probs.device.type == device.type and pred.probs.dtype == torch.float64
    assert bm.vbll.cov.tril.device.type == device.type


def test_fit_from_a_dataloader_matches_in_memory_fit():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=48, shuffle=False)
    a = bf.bayesify(_pretrained(), "vbll", task="classification", covariance="diagonal")
    a.fit(loader, epochs=3, progress=False, seed=0)
    b = bf.bayesify(_pretrained(), "vbll", task="classification", covariance="diagonal")
    b.fit((x, y), epochs=3, batch_size=48, progress=False, seed=0)
    assert a.n_data == b.n_data == 240
    for pa, pb in zip(a.vbll.parameters(), b.vbll.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_head_that_forward_never_calls():
    x, y = _blobs()
    bm = bf.bayesify(_Unused(), "vbll", task="classification", head="spare")
    with pytest.raises(UnsupportedModelError, match="never called its head 'spare'.*`head=`"):
        bm.fit((x, y), epochs=1, progress=False)
