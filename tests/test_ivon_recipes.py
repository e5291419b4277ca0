"""The ivon method's recipes: "finetune" keeps a pretrained network and still learns, the
from-scratch defaults warn when they wreck one, explicit options override the recipe."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import BayesifyWarning
from bayesify.inference._ivon_recipes import RECIPES, WATCH_STEPS

W = torch.linspace(-1, 1, 16)


def _task(n: int, seed: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, ((x @ W) + 0.3 * x[:, 0] * x[:, 1] > threshold).long()


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    return pretrain()


def pretrain() -> nn.Module:
    """A transformer-style MLP (LayerNorm, GELU, weights of std 0.02 as BERT's) trained
    with AdamW to near-zero training loss on task A."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(16, 64)]
        for _ in range(2):
            layers += [nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64)]
        net = nn.Sequential(*layers, nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 2))
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        x, y = _task(1000, 0, 1.5)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        for _ in range(25):
            for idx in torch.randperm(1000).split(50):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    return net.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def _margin(p: float, n: int) -> float:
    """Three binomial standard errors of an accuracy p on n points (plus one point)."""
    return 3 * math.sqrt(p * (1 - p) / n) + 1 / n


def test_from_scratch_defaults_on_a_pretrained_model_warn(pretrained):
    """N = 160: the initial posterior std 1/√N = 0.08 swamps weights of std ~0.05.
    Each run's warning depends on its first batch: at least 2 of 3 seeds must warn."""
    warned = []
    for seed in range(3):
        x, y = _task(160, 1 + 10 * seed, 1.5)
        bm = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification", seed=seed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            bm.fit((x, y), epochs=2, batch_size=20, progress=False, seed=seed)
        assert len(record) <= 1      # said once per fit
        warned += [str(w.message) for w in record if w.category is BayesifyWarning]
    assert len(warned) >= 2
    assert "on the first batch its loss is" in warned[0] and "recipe='finetune'" in warned[0]
    assert bm.optimizer.param_groups[0]["lr"] == RECIPES["scratch"]["lr"] == 0.1
    assert bm.optimizer.param_groups[0]["hess_init"] == 1.0


def test_finetune_recipe_keeps_the_pretrained_model_and_learns_a_new_task(pretrained):
    x_test, y_test = _task(2000, 2, 1.5)
    before = _accuracy(pretrained, x_test, y_test)
    assert before > 0.9
    # The same task: nothing to learn, nothing lost, no warning.
    x, y = _task(400, 1, 1.5)
    bm = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification",
                     recipe="finetune", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm.fit((x, y), epochs=2, batch_size=32, progress=False, seed=0)
    group = bm.optimizer.param_groups[0]
    assert group["lr"] == RECIPES["finetune"]["lr"] == 0.003
    assert group["hess_init"] == pytest.approx(1 / (400 * 1e-6))
    std = torch.cat([s.reshape(-1) for s in bm.optimizer.posterior_std()])
    assert float(std.max()) <= 1e-3 * 1.05      # h only grew in two epochs
    pred = bm.predict(x_test, num_samples=8, seed=0)
    after = float((pred.labels == y_test).double().mean())
    assert after >= before - _margin(before, len(y_test))
    # A shifted task B: the recipe moves the network towards it.
    x_b, y_b = _task(300, 3, 0.5)
    x_bt, y_bt = _task(2000, 4, 0.5)
    start = _accuracy(pretrained, x_bt, y_bt)
    tuned = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification",
                        recipe="finetune", seed=0)
    tuned.fit((x_b, y_b), epochs=5, batch_size=32, progress=False, seed=0)
    learned = float((tuned.predict(x_bt, num_samples=8, seed=0).labels == y_bt)
                    .double().mean())
    assert learned > start + _margin(start, len(y_bt))


def test_explicit_options_override_the_recipe_and_silence_the_watch(pretrained):
    x, y = _task(400, 1, 1.5)
    bm = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification",
                     hess_init=1.0, seed=0)      # the report's explicit h0: no watch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm.fit((x, y), epochs=1, batch_size=32, progress=False, seed=0, lr=0.05)
    tuned = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification",
                        recipe="finetune", hess_init=50.0, seed=0)
    tuned.fit((x, y), epochs=1, batch_size=32, progress=False, seed=0, lr=0.003)
    group = tuned.optimizer.param_groups[0]
    assert group["hess_init"] == 50.0 and group["lr"] == 0.003


def test_training_from_scratch_does_not_warn():
    x, y = _task(400, 1, 0.5)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    bm = bf.bayesify(net, "ivon", task="classification", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm.fit((x, y), epochs=2, batch_size=32, progress=False, seed=0)
    assert len(bm.history) == 2 and 400 // 32 >= WATCH_STEPS


def test_finetune_checkpoint_and_wrapped_optimizer_round_trip(tmp_path, pretrained):
    x, y = _task(200, 1, 1.5)
    bm = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification",
                     recipe="finetune", seed=0)
    bm.fit((x, y), epochs=1, batch_size=50, progress=False, seed=0)
    bm.save(tmp_path / "finetuned.pt")
    fresh = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification")
    fresh.load(tmp_path / "finetuned.pt")
    assert fresh.optimizer.param_groups[0]["hess_init"] == pytest.approx(1 / (200 * 1e-6))
    assert torch.equal(fresh.predict(x, num_samples=4, seed=0).probs,
                       bm.predict(x, num_samples=4, seed=0).probs)
    # A user's own IVON (h0 = 3): the checkpoint records its h0.
    net = copy.deepcopy(pretrained)
    opt = bf.IVON(net.parameters(), lr=0.01, ess=200, hess_init=3.0, seed=0)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    wrapped = bf.bayesify(net, "ivon", task="classification", optimizer=opt)
    wrapped.save(tmp_path / "wrapped.pt")
    again = bf.bayesify(copy.deepcopy(pretrained), "ivon", task="classification")
    again.load(tmp_path / "wrapped.pt")
    assert again.optimizer.param_groups[0]["hess_init"] == 3.0


def test_unknown_recipe_names_the_choices():
    with pytest.raises(bf.InputError, match="`recipe` must be one of .*'finetune'"):
        bf.bayesify(nn.Linear(2, 2), "ivon", task="classification", recipe="bert")
