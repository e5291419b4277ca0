"""MC dropout: sampling semantics, the batched fast path, insertion, likelihoods, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import BayesifyError, BayesifyWarning, NotFittedError, UnsupportedModelError
from bayesify.inference.mc_dropout import (
    MCDropoutModel,
    foldable_dropout,
    split_at_first_dropout,
)
from bayesify.layers.dropout import DROPOUT_TYPES, find_dropout, sample_dropout
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


class Headed(nn.Module):
    """Not a Sequential: the fast path has to work through the dropout hook alone."""

    def __init__(self, d_in: int = 5, d_out: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, d_out)

    def forward(self, x):
        return self.head(torch.relu(self.drop(self.body(x))))


class Residual(nn.Module):
    """A skip connection from before the dropout: rows of different samples meet."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.f = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.drop(self.f(h)))


class TwoBranches(nn.Module):
    """A second dropout on a branch that bypasses the first one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)
        self.da, self.db = nn.Dropout(0.4), nn.Dropout(0.4)

    def forward(self, x):
        return self.da(self.a(x)) + self.db(self.b(x))


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


# --------------------------------------------------------------------- fast path


def _models():
    nested = nn.Sequential(nn.Sequential(nn.Linear(5, 16), nn.ReLU()),
                           nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3),
                                         nn.Linear(16, 16), nn.Dropout(0.2),
                                         nn.Linear(16, 3)))
    at_input = nn.Sequential(nn.Dropout(0.2), nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    return {"nested": nested, "module": Headed(), "at_input": at_input,
            "inserted": mlp()}


@pytest.mark.parametrize("name", ["nested", "module", "at_input", "inserted"])
@pytest.mark.parametrize("max_batch_rows", [10_000, 25])
def test_fast_path_equals_naive_loop(name, max_batch_rows, dtype):
    net = _models()[name]
    options = {"layers": 2} if name == "inserted" else {}
    fast = wrap(net, dtype=dtype, max_batch_rows=max_batch_rows, **options)
    x = torch.randn(7, 5, dtype=dtype)
    got = fast.predict(x, num_samples=12, seed=5)
    fast.fast_path = False
    want = fast.predict(x, num_samples=12, seed=5)
    # Same seed, same masks: the two paths differ only by matmul rounding.
    torch.testing.assert_close(got.sample_probs, want.sample_probs, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("folded", [False, True])
def test_fast_path_runs_prefix_once_and_suffix_batched(folded):
    # Dropout -> Linear is folded into stacked weights; Dropout -> Tanh is replicated.
    after = nn.Linear(16, 8) if folded else nn.Tanh()
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(0.3),
                        after, nn.Tanh(), nn.Linear(16 if not folded else 8, 3))
    prefix_calls, suffix_rows = [], []
    net[0].register_forward_hook(lambda m, a, o: prefix_calls.append(1))
    net[5].register_forward_hook(lambda m, a, o: suffix_rows.append(a[0].shape[0]))
    bm = wrap(net, max_batch_rows=40)
    bm.predict(torch.randn(10, 5), num_samples=9)
    assert len(prefix_calls) == 1  # once, although the samples come in 3 chunks
    assert suffix_rows == [40, 40, 10]
    prefix, suffix = split_at_first_dropout(net, [net[3]])
    assert prefix == [net[0], net[1], net[2]] and suffix == [net[3], *net[4:]]
    got = foldable_dropout(suffix, torch.zeros(10, 16))
    assert got == ((net[3], net[4], [net[5], net[6]]) if folded else None)
    # Folding pays only while the stacked weights [S*out, in] are no larger than the
    # replicated inputs [S*N, in].
    assert foldable_dropout(suffix, torch.zeros(7, 16)) is None


def _fold_models():
    head = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    deep = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 8),
                         nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(64, 3))
    not_linear = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(),
                               nn.Linear(16, 3))
    return {"head": (head, True), "deep": (deep, True), "conv": (conv, True),
            "inserted": (mlp(), True), "not_linear": (not_linear, False)}


@pytest.mark.parametrize("name", ["head", "deep", "conv", "inserted", "not_linear"])
@pytest.mark.parametrize("max_batch_rows", [10_000, 50])
def test_folded_dropout_linear_equals_loop_exactly(name, max_batch_rows):
    net, folds = _fold_models()[name]
    net = net.double()
    bm = wrap(net, dtype=torch.float64, max_batch_rows=max_batch_rows,
              **({"layers": 2} if name == "inserted" else {}))
    x = torch.randn(20, *((1, 6, 6) if name == "conv" else (5,)), dtype=torch.float64)
    dropout = [m for _, m in find_dropout(net)]
    prefix, suffix = split_at_first_dropout(net, dropout)
    with torch.no_grad():
        hidden = net.eval()[:len(prefix)](x) if prefix else x
    assert (foldable_dropout(suffix, hidden) is not None) == folds
    with torch.no_grad():
        got = bm.sample_outputs(x, 12, torch.Generator().manual_seed(5))
        bm.fast_path = False
        want = bm.sample_outputs(x, 12, torch.Generator().manual_seed(5))
    # Same seed, same masks: masked weights or masked inputs differ by rounding only.
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("fast_path", [True, False])
def test_one_mask_per_sample_shared_by_all_inputs(fast_path):
    # Identity weights: output unit j is zero exactly when input unit j was dropped.
    lin = nn.Linear(6, 6, bias=False)
    lin.weight.data.copy_(torch.eye(6))
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), lin).double()
    net[0].weight.data.copy_(torch.eye(6))
    net[0].bias.data.fill_(1.0)
    bm = wrap(net, "regression", dtype=torch.float64, noise=0.1, fast_path=fast_path)
    x = torch.rand(10, 6, dtype=torch.float64)  # inputs + 1 > 0: no zero but dropped ones
    with torch.no_grad():
        out = bm.sample_outputs(x, 200, torch.Generator().manual_seed(0))
    dropped = out == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # shared over inputs
    # One network per sample: kept units are scaled by 1 / (1 - p) for every input.
    torch.testing.assert_close(out, dropped.logical_not() * 2 * (x + 1), atol=1e-12, rtol=0)
    rate = float(dropped[:, 0].double().mean())  # over 200 samples x 6 units
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / 1200)


def test_fast_path_non_sequential_chunks_and_one_call_per_chunk():
    net = Headed()
    body_calls = []
    net.body.register_forward_hook(lambda m, a, o: body_calls.append(o.shape[0]))
    bm = wrap(net, max_batch_rows=10_000)
    bm.predict(torch.randn(10, 5), num_samples=64)
    assert body_calls == [10]


@pytest.mark.parametrize("net_cls, n", [(Residual, 6), (TwoBranches, 1)])
def test_fast_path_falls_back_when_rows_mix(net_cls, n):
    torch.manual_seed(1)
    bm = wrap(net_cls())
    x = torch.randn(n, 5)
    with pytest.warns(BayesifyWarning, match="fell back to one forward pass per sample"):
        got = bm.predict(x, num_samples=6, seed=2)
    bm.fast_path = False
    want = bm.predict(x, num_samples=6, seed=2)
    torch.testing.assert_close(got.sample_probs, want.sample_probs, atol=1e-6, rtol=0)
    # Every sample of the second branch has its own mask (no shared masks via broadcast).
    assert len({tuple(p.flatten().tolist()) for p in got.sample_probs}) == 6


def test_shared_masks_keep_each_inputs_predictive(device):
    """Masks shared over inputs change no input's marginal: torch's own train-mode
    dropout (a fresh mask per input) gives the same predictive, within Monte Carlo error."""
    torch.manual_seed(0)
    net = mlp(width=8, dropout=0.5).to(device)
    bm = bf.bayesify(net, "mc_dropout", task="classification")
    x = torch.randn(5, 5, device=device)
    ours = bm.predict(x, num_samples=4000, seed=1)
    torch.manual_seed(2)
    with torch.no_grad():
        theirs = torch.stack([torch.softmax(net.train()(x), -1) for _ in range(4000)])
    net.eval()
    se = (ours.sample_probs.var(0) / 4000 * 2).sqrt()
    assert float(((ours.probs - theirs.mean(0)).abs() / se.clamp_min(1e-6)).max()) < 5.0


def test_gradients_flow_through_samples():
    torch.manual_seed(0)
    bm = wrap(mlp(dropout=0.3))
    x = torch.randn(4, 5, requires_grad=True)
    bm.sample_outputs(x, 6, torch.Generator().manual_seed(0)).sum().backward()
    grad_fast = x.grad.clone()
    x.grad = None
    bm.fast_path = False
    bm.sample_outputs(x, 6, torch.Generator().manual_seed(0)).sum().backward()
    torch.testing.assert_close(grad_fast, x.grad, atol=1e-5, rtol=0)


def test_dropout_that_never_runs_warns():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(5, 3), nn.Dropout(0.5)

        def forward(self, x):
            return self.lin(x)

    bm = wrap(Unused())
    with pytest.warns(BayesifyWarning, match="samples are identical"):
        pred = bm.predict(torch.randn(3, 5), num_samples=4)
    assert torch.equal(pred.sample_probs[0], pred.sample_probs[3])


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


# --------------------------------------------------------------- dropout types


_SHAPES = {nn.Dropout: (40, 50), nn.AlphaDropout: (40, 50), nn.Dropout1d: (40, 30, 5),
           nn.Dropout2d: (40, 30, 3, 2), nn.Dropout3d: (40, 30, 2, 2, 2),
           nn.FeatureAlphaDropout: (40, 30, 4)}


@pytest.mark.parametrize("kind", DROPOUT_TYPES, ids=lambda k: k.__name__)
def test_each_dropout_type_matches_torch_train_mode(kind, dtype):
    p = 0.3
    module = kind(p)
    x = torch.full(_SHAPES[kind], 1.5, dtype=dtype)
    ours = sample_dropout(x, module, copies=60, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (60 * x.shape[0], *x.shape[1:]) and ours.dtype == dtype
    theirs = module.train()(x)
    # Same two values (kept, dropped) as torch's own train-mode dropout.
    torch.testing.assert_close(ours.unique(), theirs.unique(), atol=TOL[dtype], rtol=0)
    dropped = (ours != ours.max()).view(60, *x.shape)
    # One mask per sample, shared by the rows (inputs) of that sample.
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))
    dropped = dropped[:, 0]
    if dropped.dim() > 2 and kind not in (nn.Dropout, nn.AlphaDropout):
        # Feature dropout: whole channels, constant over the trailing dims.
        flat = dropped.flatten(2)
        assert bool((flat.all(-1) | ~flat.any(-1)).all())
        dropped = flat[..., 0]
    # Independent over samples and units (channels).
    rate, count = float(dropped.double().mean()), dropped.numel()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / count)


@pytest.mark.parametrize("kind", DROPOUT_TYPES, ids=lambda k: k.__name__)
def test_each_dropout_type_in_a_model(kind):
    shape = _SHAPES[kind][1:]
    net = nn.Sequential(nn.Linear(4, math.prod(shape)), nn.Unflatten(1, shape), kind(0.3),
                        nn.Flatten(), nn.Linear(math.prod(shape), 3))
    bm = wrap(net)
    assert bm.inserted == []
    x = torch.randn(6, 4)
    fast = bm.predict(x, num_samples=5, seed=0)
    bm.fast_path = False
    naive = bm.predict(x, num_samples=5, seed=0)
    torch.testing.assert_close(fast.sample_probs, naive.sample_probs, atol=1e-6, rtol=0)
    assert not torch.allclose(fast.sample_probs[0], fast.sample_probs[1])


def test_dropout_moments_closed_form(dtype):
    """Inverted dropout before a linear layer: mean w·x, variance p/(1-p) Σ w²x²."""
    p, w, x = 0.3, torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype), torch.tensor(
        [[1.0, 2.0, -0.5]], dtype=dtype)
    lin = nn.Linear(3, 1, bias=False).to(dtype)
    lin.weight.data.copy_(w)
    bm = wrap(lin, "regression", dtype=dtype, p=p, noise=0.1)
    with torch.no_grad():
        out = bm.sample_outputs(x, 40_000, torch.Generator().manual_seed(0))[:, 0, 0]
    mean, var = float((w * x).sum()), p / (1 - p) * float((w ** 2 * x ** 2).sum())
    assert abs(float(out.mean()) - mean) < 4 * math.sqrt(var / 40_000)
    assert abs(float(out.var()) / var - 1) < 0.03


def test_alpha_dropout_keeps_standard_normal_moments():
    # One sample over 200,000 units (one input): the mask is per unit.
    x = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0))
    out = sample_dropout(x, nn.AlphaDropout(0.2), generator=torch.Generator().manual_seed(1))
    assert abs(float(out.mean())) < 0.01 and abs(float(out.var()) - 1) < 0.01


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
