"""MC dropout sampling: the batched fast path (prefix once, folded dropout->Linear,
fallback) against the per-sample loop, and each dropout type against torch's own."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import BayesifyWarning
from bayesify.inference.mc_dropout import foldable_dropout, split_at_first_dropout
from bayesify.layers.dropout import DROPOUT_TYPES, find_dropout, sample_dropout

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def mlp(d_in: int = 5, width: int = 16, d_out: int = 3, *,
        dropout: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width),
                               nn.Tanh()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def wrap(net, task="classification", dtype=torch.float32, **options):
    return bf.bayesify(net.to(dtype), "mc_dropout", task=task, **options)


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


class MaskedEncoder(nn.Module):
    """A transformer-style network taking ``input_ids`` and ``attention_mask``: dropout
    on the embeddings, then attention scores masked by the unreplicated mask."""

    def __init__(self):
        super().__init__()
        self.embed, self.drop = nn.Embedding(20, 8), nn.Dropout(0.2)
        self.attn_drop, self.head = nn.Dropout(0.1), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.drop(self.embed(input_ids))                              # [N, T, 8]
        scores = h @ h.transpose(1, 2) + (attention_mask[:, None, :] - 1) * 1e4
        h = self.attn_drop(torch.softmax(scores, -1)) @ h
        return {"logits": self.head(h[:, 0]), "hidden": h}


@pytest.mark.parametrize("net_cls, n", [(Residual, 6), (TwoBranches, 1),
                                        (MaskedEncoder, 5)])
def test_rows_that_mix_run_tiled_and_equal_the_loop(net_cls, n):
    """The split path fails (the replicated rows meet unreplicated ones); the whole
    network then runs once per chunk on tiled inputs, without a warning."""
    torch.manual_seed(1)
    bm = wrap(net_cls(), max_batch_rows=4 * n)
    if net_cls is MaskedEncoder:
        mask = torch.ones(n, 6)
        mask[1::2, -2:] = 0
        x = {"input_ids": torch.randint(0, 20, (n, 6)), "attention_mask": mask}
    else:
        x = torch.randn(n, 5)
    calls = []
    bm.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    got = bm.predict(x, num_samples=6, seed=2)
    assert bm._fast_mode == "tiled" and len(calls) == 1 + 2   # split, then chunks of 4, 2
    bm.fast_path = False
    want = bm.predict(x, num_samples=6, seed=2)
    torch.testing.assert_close(got.sample_probs, want.sample_probs, atol=1e-6, rtol=0)
    # Every sample has its own masks (none shared through broadcasting).
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
