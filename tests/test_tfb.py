"""TFB on peft LoRA models: the low-rank isotropic posterior, σ_q = 0, frozen base
weights, the anchor options, errors, a tiny BERT, and the conformance suite."""

from __future__ import annotations

import math

import pytest
import torch
from _models import lora_network
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesify as bf
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.testing import check_method, default_network

peft = pytest.importorskip("peft")


def _data(task: str, n: int = 120, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    if task == "classification":
        return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g,
                                                                    dtype=dtype)


def trained_lora(task: str, x: torch.Tensor, y: torch.Tensor, steps: int = 100
                 ) -> nn.Module:
    """``lora_network`` with its adapters (only) trained on (x, y): an adapter a user
    would bayesify."""
    net = lora_network(task).to(x.dtype)
    adapters = [p for n, p in net.named_parameters() if "lora_" in n]
    optimizer = torch.optim.Adam(adapters, lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        out = net(x)
        loss = (nn.functional.cross_entropy(out, y) if task == "classification"
                else (out[:, 0] - y).pow(2).mean())
        loss.backward()
        optimizer.step()
    return net


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_conformance(task, dtype):
    check_method("tfb", task, dtype=dtype, network=lora_network, fit_options={},
                 options={"iterations": 4, "num_samples": 4})


def test_sigma_zero_reproduces_the_deterministic_adapter_exactly(dtype):
    net = lora_network("classification").to(dtype)
    x, _ = _data("classification", dtype=dtype)
    bm = bf.bayesify(net, "tfb", task="classification", sigma_q=0.0)
    assert bm.is_fitted
    with torch.no_grad():
        expected = net(x)
        draws = bm.posterior(x, num_samples=7, seed=0).samples
    assert draws.shape == (7, *expected.shape)
    assert all(torch.equal(d, expected) for d in draws)
    assert torch.equal(bm(x), expected)
    det = bf.bayesify(net, "deterministic", task="classification").predict(x)
    torch.testing.assert_close(bm.predict(x, seed=0).probs, det.probs)


def test_the_posterior_is_low_rank_isotropic_in_the_left_singular_vectors_of_b():
    """Linear(4, 5) with a rank-2 adapter whose B has one zero singular value: the output
    noise s·U(Zx) has covariance σ² s² ‖x‖² u₁u₁ᵀ, nothing outside u₁."""
    torch.manual_seed(0)
    net = peft.get_peft_model(nn.Sequential(nn.Linear(4, 5)).double(),
                              peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                              init_lora_weights=False))
    layer = net.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 1] = 0.0
    sigma, samples = 0.3, 20000
    bm = bf.bayesify(net, "tfb", task="regression", sigma_q=sigma, noise=1.0, num_outputs=5)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=torch.float64)
    with torch.no_grad():
        f = bm.posterior(x, num_samples=samples, seed=0).samples[:, 0] - net(x)[0]
    u = torch.linalg.svd(layer.lora_B["default"].weight.detach())[0][:, :1]
    outside = f - (f @ u) @ u.T
    assert float(outside.abs().max()) < 1e-12 * float(f.abs().max())
    s = layer.scaling["default"]
    expected = sigma ** 2 * s ** 2 * float(x.pow(2).sum())
    var = float((f @ u).pow(2).mean())
    assert abs(var - expected) <= 5 * expected * math.sqrt(2 / samples)


def test_base_weights_are_never_copied_or_changed():
    net = lora_network("classification")
    before = _base_state(net)
    pointers = {n: p.data_ptr() for n, p in net.named_parameters()}
    x, y = _data("classification")
    bm = bf.bayesify(net, "tfb", task="classification", samples_per_pass=3)
    bm.fit((x, y), progress=False, seed=0)
    bm.predict(x, seed=0)
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert {n: p.data_ptr() for n, p in net.named_parameters()} == pointers
    own = sum(b.numel() for n, b in bm.named_buffers() if not n.startswith("model."))
    adapters = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert own <= adapters
    assert bm.sigma_q > 0


def test_anchor_at_construction_equals_fit_and_sigma_is_reported(dtype):
    x, y = _data("classification", dtype=dtype)
    torch.manual_seed(3)
    built = bf.bayesify(lora_network("classification").to(dtype), "tfb",
                        task="classification", anchor=(x, y), iterations=5)
    torch.manual_seed(3)
    fitted = bf.bayesify(lora_network("classification").to(dtype), "tfb",
                         task="classification", iterations=5).fit((x, y), progress=False)
    assert built.is_fitted and built.sigma_q == fitted.sigma_q > 0
    assert built.search_path == fitted.search_path
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    from_loader = bf.bayesify(lora_network("classification").to(dtype), "tfb",
                              task="classification", iterations=5)
    from_loader.fit(loader, progress=False, seed=1)
    assert from_loader.sigma_q > 0


def test_accuracy_metric_and_pseudo_labels():
    x, y = _data("classification", n=200)
    for options in ({"metric": "accuracy", "tolerance": 0.02},
                    {"pseudo_labels": True}):
        bm = bf.bayesify(trained_lora("classification", x, y), "tfb",
                         task="classification", num_samples=8, **options)
        bm.fit((x, y), progress=False, seed=0)
        base = bm.search_path[0][1]
        chosen = dict(bm.search_path)[bm.sigma_q]
        if "metric" in options:
            assert base - chosen <= 0.02
        else:
            assert (chosen - base) / base <= 0.01


def test_callable_metric_and_fixed_sigma():
    x, y = _data("classification")
    calls = []

    def nll(pred, target):
        calls.append(1)
        return float(-pred.log_prob(target).mean())

    def fit(metric):
        bm = bf.bayesify(trained_lora("classification", x, y), "tfb", task="classification",
                         metric=metric, iterations=3)
        return bm.fit((x, y), progress=False, seed=0)

    custom, builtin = fit(nll), fit("nll")
    assert calls and len(custom.search_path) == 3 + 3
    assert custom.sigma_q == builtin.sigma_q
    flat = [v for pair in custom.search_path for v in pair]
    assert flat == pytest.approx([v for pair in builtin.search_path for v in pair], rel=1e-5)
    fixed = bf.bayesify(lora_network("classification"), "tfb", task="classification",
                        sigma_q=0.05)
    fixed.fit((x, y), progress=False)
    assert fixed.sigma_q == pytest.approx(0.05) and fixed.search_path == []


def test_regression_noise_is_the_anchor_rms_residual():
    net = lora_network("regression")
    x, y = _data("regression")
    bm = bf.bayesify(net, "tfb", task="regression", iterations=3)
    bm.fit((x, y), progress=False, seed=0)
    with torch.no_grad():
        rms = (net(x)[:, 0] - y).pow(2).mean().sqrt()
    torch.testing.assert_close(bm.noise.log_std.exp()[0], rms, rtol=1e-5, atol=0)
    pred = bm.predict(x, seed=0)
    assert isinstance(pred, bf.MixturePredictive)
    fixed = bf.bayesify(lora_network("regression"), "tfb", task="regression",
                        sigma_q=0.1)
    assert not fixed.is_fitted         # a homoscedastic noise still needs fit(anchor)
    fixed.fit((x, y), progress=False)
    assert fixed.is_fitted and fixed.sigma_q == pytest.approx(0.1)


def test_samples_per_pass_gives_the_same_draws():
    net = lora_network("classification")
    x, _ = _data("classification", n=20)
    whole = bf.bayesify(net, "tfb", task="classification", sigma_q=0.2)
    parts = bf.bayesify(net, "tfb", task="classification", sigma_q=0.2, samples_per_pass=3)
    with torch.no_grad():
        a = whole.posterior(x, num_samples=10, seed=4).samples
        b = parts.posterior(x, num_samples=10, seed=4).samples
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], a[1])


def test_errors_in_user_terms():
    with pytest.raises(UnsupportedModelError, match="LoRA adapters"):
        bf.bayesify(nn.Linear(5, 3), "tfb", task="classification")
    x, y = _data("classification")
    with pytest.raises(InputError, match="either `anchor`"):
        bf.bayesify(lora_network("classification"), "tfb", task="classification",
                    anchor=(x, y), sigma_q=0.1)
    with pytest.raises(InputError, match="metric='accuracy' needs"):
        bf.bayesify(lora_network("regression"), "tfb", task="regression", metric="accuracy")
    with pytest.raises(InputError, match="sigma_min"):
        bf.bayesify(lora_network("classification"), "tfb", task="classification",
                    sigma_min=1.0, sigma_max=0.5)
    bm = bf.bayesify(lora_network("classification"), "tfb", task="classification")
    with pytest.raises(InputError, match="`epochs` does not apply"):
        bm.fit((x, y), epochs=3)
    torch.manual_seed(0)
    dora = peft.get_peft_model(default_network("classification"),
                               peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        bf.bayesify(dora, "tfb", task="classification")
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    embed = peft.get_peft_model(embed, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(UnsupportedModelError, match="embedding LoRA"):
        bf.bayesify(embed, "tfb", task="classification")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_bert_classifier_from_token_ids():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()
    model = peft.get_peft_model(bert, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["query", "value"],
                                                      init_lora_weights=False))
    ids = torch.randint(0, 50, (64, 10))
    labels = (ids[:, 0] > 25).long()
    before = _base_state(model)
    bm = bf.bayesify(model, "tfb", task="classification", iterations=4, num_samples=4,
                     search_batch_size=32).fit((ids, labels), progress=False, seed=0)
    assert len(bm.factors) == 4 and bm.sigma_q > 0
    pred = bm.predict(ids[:5], seed=0)
    assert pred.probs.shape == (5, 2) and pred.sample_probs.shape == (4, 5, 2)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
