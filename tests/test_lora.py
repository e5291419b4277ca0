"""PEFT LoRA models: the adapters are the Bayesian subset, the base is frozen and shared.

Every model is a tiny ``BertForSequenceClassification`` built from a config (never
downloaded) with LoRA adapters on the attention's query and value (peft), trained and
predicted from a DataLoader of HF dict batches ``{"input_ids", "attention_mask",
"labels"}``. Each method must leave the base weights bitwise unchanged, in the same
storage (``data_ptr``), and never copy them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import bayesify as bf
from bayesify.inference.laplace import lora_modules
from bayesify.predictive import CategoricalPredictive

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings(
    # transformers' deprecation, triggered inside peft (third-party, not ours to fix)
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    # torch's vmap has no batching rule for CPU flash attention (ensembles): a
    # performance note from torch, not a fault.
    "ignore:There is a performance drop because we have not yet implemented the "
    "batching rule:UserWarning",
)

ROWS, LENGTH, BATCH = 64, 8, 32


def _lora_bert(lora_dropout: float = 0.0, model_dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=model_dropout, attention_probs_dropout_prob=model_dropout)
    base = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(base, peft.LoraConfig(
        target_modules=["query", "value"], r=4, lora_dropout=lora_dropout))


def _rows() -> list[dict[str, torch.Tensor]]:
    """The label is whether token 1 is in the upper half of the vocabulary; the last two
    tokens of odd rows are padding."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (ROWS, LENGTH), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    mask[1::2, -2:] = 0
    labels = (ids[:, 1] >= 52).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            for i in range(ROWS)]


def _loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(_rows(), batch_size=BATCH, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def _base(model) -> dict[str, tuple[torch.Tensor, int]]:
    """Frozen parameters: a copy of the values and the storage address."""
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()
            if not p.requires_grad}


def _adapters(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _check_base_kept(model, before) -> None:
    now = dict(model.named_parameters())
    for name, (value, ptr) in before.items():
        assert torch.equal(now[name].detach(), value), name
        assert now[name].data_ptr() == ptr, name
        assert not now[name].requires_grad


def _unique_numel(module) -> int:
    """Parameter elements stored, counting shared storage once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[p.data_ptr()] = max(seen.get(p.data_ptr(), 0), p.numel())
    return sum(seen.values())


def _fit_and_predict(bm, fit: dict, predict: dict) -> CategoricalPredictive:
    bm.fit(_loader(shuffle=True), progress=False, seed=0, **fit)
    assert bm.is_fitted
    out = bm.predict(_loader(), seed=0, **predict)
    assert isinstance(out, CategoricalPredictive)
    assert out.probs.shape == (ROWS, 2) and torch.isfinite(out.probs).all()
    return out


def test_laplace_defaults_to_kfac_over_the_lora_factors():
    model = _lora_bert()
    before = _base(model)
    bm = bf.bayesify(model, "laplace", task="classification")
    assert bm.subset == "lora" and bm.hessian == "kron" and not bm.last_layer
    adapters = _adapters(model)
    assert bm.num_covered == sum(p.numel() for n, p in model.named_parameters()
                                 if n in adapters)
    assert len(lora_modules(model)) == 2 * 2 * 2   # 2 layers x (query, value) x (A, B)
    _fit_and_predict(bm, {}, {})
    _check_base_kept(model, before)
    # The same subset named explicitly; a model without adapters is refused for it.
    assert bf.bayesify(_lora_bert(), "laplace", task="classification",
                       subset="lora").num_covered == bm.num_covered
    plain = transformers.BertForSequenceClassification(model.base_model.model.config)
    assert bf.bayesify(plain, "laplace", task="classification").subset == "last_layer"
    with pytest.raises(bf.UnsupportedModelError, match=r"subset='lora'.*has none"):
        bf.bayesify(plain, "laplace", task="classification", subset="lora")


def test_ivon_optimizes_the_adapters_only():
    model = _lora_bert()
    before, adapters = _base(model), _adapters(model)
    bm = bf.bayesify(model, "ivon", task="classification", recipe="finetune")
    _fit_and_predict(bm, {"epochs": 1}, {"num_samples": 3})
    names = {id(p): n for n, p in bm.model.named_parameters()}
    assert {names[id(p)] for p in bm._optimizer.params} == adapters
    _check_base_kept(model, before)


def test_mc_dropout_samples_the_lora_dropout_without_inserting_any():
    model = _lora_bert(lora_dropout=0.2, model_dropout=0.0)
    before = _base(model)
    bm = bf.bayesify(model, "mc_dropout", task="classification")
    assert bm.inserted == []
    out = _fit_and_predict(bm, {"epochs": 1, "lr": 1e-3}, {"num_samples": 4})
    batch = {k: v for k, v in next(iter(_loader())).items() if k != "labels"}
    draws = bm.posterior(batch, num_samples=4, seed=0).samples
    assert draws.shape[:2] == (4, BATCH)
    assert (draws.std(0) > 0).any()          # the LoRA dropout is sampled
    assert torch.isfinite(out.probs).all()
    _check_base_kept(model, before)


def test_mc_dropout_without_lora_dropout_samples_the_models_own():
    bm = bf.bayesify(_lora_bert(lora_dropout=0.0), "mc_dropout", task="classification")
    assert bm.inserted == []


@pytest.mark.parametrize("base", ["deterministic", "ivon"])
def test_ensemble_members_share_the_frozen_base(base):
    model = _lora_bert()
    before, adapters = _base(model), _adapters(model)
    options = {"recipe": "finetune"} if base == "ivon" else {}
    fit = {"epochs": 1} if base == "ivon" else {"epochs": 1, "lr": 1e-3}
    bm = bf.bayesify(model, "ensemble", task="classification", members=3, base=base,
                     **options)
    assert bm.shares_base
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    # One base plus three adapter sets, not three models.
    assert _unique_numel(bm) == _unique_numel(model) - adapter_numel + 3 * adapter_numel
    for member in bm.members:
        own = dict(member.model.named_parameters())
        assert all(own[n].data_ptr() == ptr for n, (_, ptr) in before.items())
        b = [p for n, p in own.items() if "lora_B" in n]
        assert all(torch.count_nonzero(p) == 0 for p in b)   # re-drawn: B = 0
    a = [dict(m.model.named_parameters()) for m in bm.members]
    name = next(n for n in adapters if "lora_A" in n)
    assert not torch.equal(a[0][name], a[1][name])           # distinct members
    _fit_and_predict(bm, fit, {"num_samples": 3})
    if base == "deterministic":
        assert bm.training_mode == "vmap"
    _check_base_kept(model, before)
    trained = [dict(m.model.named_parameters()) for m in bm.members]
    lora_b = next(n for n in adapters if "lora_B" in n)
    assert not torch.equal(trained[0][lora_b], trained[1][lora_b])
    # The wrapped model's own adapters are not the members'.
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters()
               if "lora_B" in n)


def test_ensemble_without_reinitialization_keeps_the_wrapped_adapters():
    model = _lora_bert()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    bm = bf.bayesify(model, "ensemble", task="classification", members=2, base="ivon",
                     recipe="finetune", reinitialize=None)
    for member in bm.members:
        for n, p in member.model.named_parameters():
            if "lora_" in n:
                assert torch.equal(p, dict(model.named_parameters())[n])
                assert p.data_ptr() != dict(model.named_parameters())[n].data_ptr()


def _trained_looking(model) -> torch.nn.Module:
    with torch.no_grad():       # a non-zero B, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def test_tfb_fits_and_predicts_from_token_tensors():
    model = _trained_looking(_lora_bert())
    before = _base(model)
    rows = _rows()
    ids = torch.stack([r["input_ids"] for r in rows])     # unpadded: ids alone will do
    labels = torch.stack([r["labels"] for r in rows])
    bm = bf.bayesify(model, "tfb", task="classification", num_samples=3)
    bm.fit((ids, labels), progress=False, seed=0)
    assert bm.is_fitted and bm.sigma_q >= 0
    out = bm.predict(ids, seed=0)
    assert out.probs.shape == (ROWS, 2) and torch.isfinite(out.probs).all()
    _check_base_kept(model, before)


def test_tfb_fits_and_predicts_from_dict_batches():
    model = _trained_looking(_lora_bert())
    before = _base(model)
    bm = bf.bayesify(model, "tfb", task="classification", num_samples=3)
    _fit_and_predict(bm, {}, {"num_samples": 3})
    _check_base_kept(model, before)
