"""HuggingFace models: DataLoaders of dict batches, ``ModelOutput`` reduction, ``output=``,
the default exclusions of the layer-converting methods, and a PEFT LoRA model.

Every model is a tiny ``BertForSequenceClassification`` built from a config (never
downloaded). The data is a list of dicts ``{"input_ids", "attention_mask", "labels"}``
collated by the DataLoader's default ``collate_fn``, as a ``datasets`` user has it.

Methods are listed in :data:`METHODS` (options for the wrap, the fit and the predict);
:data:`LORA_METHODS` names those that wrap a LoRA model. Adding a ported method is one
entry in each.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import bayesify as bf
from bayesify.predictive import CategoricalPredictive

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings(
    # torch's vmap has no batching rule for CPU flash attention (SWAG, ensembles): a
    # performance note from torch, not a fault.
    "ignore:There is a performance drop because we have not yet implemented the "
    "batching rule:UserWarning",
)

ROWS, LENGTH, BATCH = 64, 8, 32

#: method -> (options of bayesify(...), options of fit, options of predict). One epoch
#: of two steps; sampling methods predict with few samples to stay fast.
ONE_EPOCH = {"epochs": 1, "lr": 1e-3}
METHODS: dict[str, tuple[dict, dict, dict]] = {
    "deterministic": ({}, ONE_EPOCH, {}),
    "vi": ({}, ONE_EPOCH, {"num_samples": 3}),
    "ssvi": ({}, ONE_EPOCH, {"num_samples": 3}),
    "ensemble": ({"members": 2, "base": "deterministic"}, ONE_EPOCH, {}),
    "swag": ({"rank": 2, "collect_every": 1}, ONE_EPOCH, {"num_samples": 3}),
    "laplace": ({}, {}, {}),            # post hoc: one pass over the data
    "mc_dropout": ({}, ONE_EPOCH, {"num_samples": 3}),
    "ivon": ({"recipe": "finetune"}, {"epochs": 1}, {"num_samples": 3}),
    # Last-layer methods on BERT's classifier, read through a hook on its input.
    "vbll": ({}, {"epochs": 2}, {"num_samples": 3}),
    "gp": ({"num_inducing": 8}, {"epochs": 2, "lr": 1e-2}, {"num_samples": 3}),
}
#: Methods that wrap a PEFT LoRA model (``deterministic`` checks the test itself).
LORA_METHODS = ["deterministic", "ivon", "mc_dropout"]


def _config(**extra):
    return transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=32, num_labels=2, **extra)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_config())


class _TupleBert(nn.Module):
    """A BERT whose forward returns ``{"hidden": [N, T, H], "scores": [N, 2]}``: the
    default rule (no 'logits', first tensor) would pick the hidden states, so only a
    user-given ``output=`` makes it a classifier."""

    def __init__(self):
        super().__init__()
        self.net = _bert()

    def forward(self, input_ids, attention_mask):
        out = self.net(input_ids=input_ids, attention_mask=attention_mask,
                       output_hidden_states=True)
        return {"hidden": out.hidden_states[-1], "scores": out.logits}


def _rows() -> list[dict[str, torch.Tensor]]:
    """ROWS sentences of LENGTH tokens; the label is whether token 1 is in the upper half
    of the vocabulary, the last two tokens of odd rows are padding."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (ROWS, LENGTH), generator=generator)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    mask[1::2, -2:] = 0
    labels = (ids[:, 1] >= 52).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            for i in range(ROWS)]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, torch.Tensor]]:
    return _rows()


def _loader(rows, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(rows, batch_size=BATCH, shuffle=shuffle, generator=generator)


def _stacked(rows) -> dict[str, torch.Tensor]:
    """The whole data set as one dict batch (labels included, as a user would have it)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _check_fit_and_predict(bm, rows, fit: dict, predict: dict) -> CategoricalPredictive:
    bm.fit(_loader(rows, shuffle=True), progress=False, seed=0, **fit)
    assert bm.is_fitted
    assert all(torch.isfinite(torch.tensor(bm.history)))
    from_loader = bm.predict(_loader(rows), seed=0, **predict)
    assert isinstance(from_loader, CategoricalPredictive)
    assert from_loader.probs.shape == (ROWS, 2)
    assert torch.isfinite(from_loader.probs).all()
    # The same inputs as one dict (its labels are dropped), in the loader's batches.
    from_dict = bm.predict(_stacked(rows), batch_size=BATCH, seed=0, **predict)
    torch.testing.assert_close(from_dict.probs, from_loader.probs)
    return from_loader


@pytest.mark.parametrize("method", list(METHODS))
def test_trains_and_predicts_from_a_loader_of_hf_dicts(method, rows):
    options, fit, predict = METHODS[method]
    bm = bf.bayesify(_bert(), method, task="classification", **options)
    _check_fit_and_predict(bm, rows, fit, predict)
    batch = _stacked(rows[:8])
    labels = batch.pop("labels")
    loss = bm.loss(batch, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # A training loss takes gradients (laplace's is the NLL at the trained weights).
    loss.backward()
    assert any(p.grad is not None for p in bm.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_user_output_picks_the_logits(method, rows):
    options, fit, predict = METHODS[method]
    calls = []

    def scores(out):
        calls.append(1)
        return out["scores"]

    bm = bf.bayesify(_TupleBert(), method, task="classification", output=scores, **options)
    _check_fit_and_predict(bm, rows, fit, predict)
    assert calls
    if method == "ensemble":
        assert all(member.output is scores for member in bm.members)


def test_without_output_a_wrong_tensor_is_refused(rows):
    bm = bf.bayesify(_TupleBert(), "deterministic", task="classification")
    with pytest.raises(bf.InputError, match=r"got \[32, 8, 64\]"):
        bm.predict(_loader(rows))


@pytest.mark.parametrize("method", ["vi", "ssvi"])
def test_layer_converters_leave_embeddings_and_norms_deterministic(method, caplog):
    from bayesify.inference import mean_field
    from bayesify.layers.bayesian import MeanFieldLayer

    mean_field._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="bayesify"):
        bm = bf.bayesify(_bert(), method, task="classification")
    said = [r.getMessage() for r in caplog.records if r.name == "bayesify"]
    # 3 embeddings and 5 LayerNorms (embeddings + 2 per encoder layer)
    assert len(said) == 1 and f"{method}: left 8 Embedding and normalization" in said[0]
    assert "exclude=" in said[0]
    layers = bm.bayesian_layers
    assert "classifier" in layers and "bert.encoder.layer.0.attention.self.query" in layers
    kinds = {type(m) for m in bm.model.modules()}
    assert nn.Embedding in kinds and nn.LayerNorm in kinds
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bayesify"):
        quiet = bf.bayesify(_bert(), method, task="classification",
                            exclude=["bert.embeddings", "*.LayerNorm", "bert.pooler*"])
    assert not [r for r in caplog.records if r.name == "bayesify"]
    assert not any(n.startswith("bert.pooler") for n in quiet.bayesian_layers)
    only = bf.bayesify(_bert(), method, task="classification", include=["classifier"])
    assert list(only.bayesian_layers) == ["classifier"]
    assert isinstance(only.model.classifier, MeanFieldLayer)


def test_other_weight_layers_are_refused_naming_exclude():
    model = _bert()
    model.bert.pooler.extra = nn.Conv1d(2, 2, 1)   # weights vi cannot handle
    with pytest.raises(bf.UnsupportedModelError,
                       match=r"'bert.pooler.extra' \(Conv1d\).*exclude=\['bert.pooler.extra'\]"):
        bf.bayesify(model, "vi", task="classification")
    bm = bf.bayesify(model, "vi", task="classification", exclude=["bert.pooler.extra"])
    assert "bert.pooler.dense" in bm.bayesian_layers


@pytest.mark.filterwarnings(  # transformers' deprecation, triggered inside peft
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("method", LORA_METHODS)
def test_a_peft_lora_model_wraps_trains_and_predicts(method, rows):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_bert(), peft.LoraConfig(target_modules=["query", "value"],
                                                         r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options, fit, predict = METHODS[method]
    bm = bf.bayesify(model, method, task="classification", **options)
    _check_fit_and_predict(bm, rows, fit, predict)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    # Training moved the LoRA weights only; the frozen base stayed as it was.
    assert changed and changed <= trainable
