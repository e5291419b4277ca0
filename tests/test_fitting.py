"""The shared fit machinery: one set of fit arguments, the divergence guard, the plan,
training in a user's own loop (plain and Lightning), progress-bar switches."""

from __future__ import annotations

import pytest
import torch
from _lightning import train_with_lightning
from torch import nn

import bayesify as bf
from bayesify._progress import progress_enabled
from bayesify.fitting import MCMC, FitOptions, FitPlan, GradientFit


def _net(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, out))


def _data(n: int = 64, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    return x, x[:, 0] - 2 * x[:, 1]


class _NaNAfter(nn.Module):
    """Passes its input through for the first `calls` training-mode forwards, then NaN."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        if self.training:
            self.calls -= 1
            if self.calls < 0:
                return x * float("nan")
        return x


def test_a_nan_loss_stops_fit_naming_epoch_step_and_fix(dtype):
    net = nn.Sequential(nn.Linear(3, 8), _NaNAfter(calls=5), nn.ReLU(), nn.Linear(8, 1))
    bm = bf.bayesify(net.to(dtype), "deterministic", task="regression", noise=0.5)
    before = {k: v.clone() for k, v in bm.state_dict().items()}
    with pytest.raises(bf.TrainingDivergedError,
                       match=r"epoch 1/3, step 6: the loss is nan; the weights are those of "
                             r"the last finite step\. Lower `lr`"):
        bm.fit(_data(dtype=dtype), epochs=3, batch_size=8, progress=False)
    # 5 finite steps were applied, the sixth was not: the weights moved and stayed finite
    assert all(torch.isfinite(p).all() for p in bm.parameters())
    assert not torch.equal(bm.state_dict()["model.0.weight"], before["model.0.weight"])


def test_on_nonfinite_warn_skips_bad_batches():
    net = nn.Sequential(nn.Linear(3, 8), _NaNAfter(calls=3), nn.ReLU(), nn.Linear(8, 1))
    bm = bf.bayesify(net, "deterministic", task="regression", noise=0.5)
    with pytest.warns(bf.BayesifyWarning, match="skipped 5 of 8 batches"):
        bm.fit(_data(), epochs=1, batch_size=8, progress=False, on_nonfinite="warn")
    assert bm.is_fitted and len(bm.history) == 1


def test_exploding_weights_leave_the_model_unfitted():
    bm = bf.bayesify(_net(3), "deterministic", task="classification")
    x, y = _data()
    with pytest.raises(bf.TrainingDivergedError, match="marked unfitted|last finite step"):
        bm.fit((x, (y > 0).long()), epochs=3, lr=1e30, progress=False)
    finite = all(torch.isfinite(p).all() for p in bm.parameters())
    assert finite or not bm.is_fitted


def test_an_option_that_does_not_apply_says_so():
    strategy = MCMC

    class Model:
        method_name = "hmc"

    with pytest.raises(bf.InputError, match=r"`epochs`, `lr` do not apply to method 'hmc', "
                                            r"which is fit by MCMC"):
        strategy.check_options(Model(), FitOptions(epochs=3, lr=0.1))
    strategy.check_options(Model(), FitOptions(seed=1, progress=False))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("epochs", -1, "`epochs` must be"), ("lr", 0.0, "`lr` must be > 0"),
    ("batch_size", 0, "`batch_size`"), ("weight_decay", -1.0, "`weight_decay`"),
    ("grad_clip", 0.0, "`grad_clip`"), ("seed", 1.5, "`seed` must be an int"),
    ("on_nonfinite", "ignore", "`on_nonfinite` must be one of"),
    ("optimizer", "adam", "`optimizer` must be a torch.optim.Optimizer"),
])
def test_bad_fit_options_are_named(field, value, match):
    with pytest.raises(bf.InputError, match=match):
        FitOptions(**{field: value})


def test_the_plan_is_set_before_fit_starts():
    seen = []

    class Probe(bf.get_method("deterministic")):
        def on_fit_start(self, batches):
            seen.append(self.fit_plan)
            super().on_fit_start(batches)

    bm = bf.bayesify(_net(), Probe, task="regression").fit(_data(), epochs=3, batch_size=10,
                                                           progress=False)
    assert seen == [FitPlan(epochs=3, steps_per_epoch=7)] and seen[0].total_steps == 21
    assert len(bm.history) == 3
    assert isinstance(bm.fit_strategy(), GradientFit)


def test_epochs_zero_runs_start_and_end_without_steps():
    bm = bf.bayesify(_net(), "deterministic", task="regression")
    weights = bm.model[0].weight.clone()
    bm.fit(_data(), epochs=0, progress=False)
    assert bm.is_fitted and bm.history == [] and torch.equal(bm.model[0].weight, weights)
    # the noise was still initialized from the residuals (on_fit_start ran)
    assert float(bm.noise.log_std.detach()) != 0.0


def test_a_plain_loop_with_loss_then_finish_fit_predicts():
    bm = bf.bayesify(_net(), "deterministic", task="regression")
    with pytest.raises(bf.NotFittedError, match=r"\.finish_fit\(\) after training"):
        bm.predict(torch.zeros(2, 3))
    x, y = _data()
    optimizer = bm.configure_optimizer(1e-2, 0.0)
    first = None
    for _ in range(50):
        optimizer.zero_grad()
        loss = bm.loss(x, y)
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    pred = bm.finish_fit().predict(x)
    assert bm.is_fitted and pred.mean.shape == (64,)


def test_a_lightning_module_trains_the_loss_and_the_model_predicts(tmp_path):
    bm = bf.bayesify(_net(), "deterministic", task="regression")
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    train_with_lightning(bm, loader, epochs=20, root=tmp_path, finish_in_hook=True)
    assert bm.is_fitted
    pred = bm.predict(x)
    mse = float((pred.mean - y).pow(2).mean())
    assert mse < float(y.var()) / 2, mse  # the loss was really trained


def test_progress_bars_follow_the_switch_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("BAYESIFY_PROGRESS", raising=False)
    assert progress_enabled(None)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_enabled(None) and progress_enabled(True)
    monkeypatch.delenv("TQDM_DISABLE")
    bf.set_progress_bars(False)
    try:
        assert not progress_enabled(None) and progress_enabled(True)
    finally:
        bf.set_progress_bars(None)
    monkeypatch.setenv("BAYESIFY_PROGRESS", "0")
    assert not progress_enabled(None)
