"""Dense mean-field VI ("vi"): the exact mean-field optimum, uncertainty, conversion, errors.

Statistical assertions take their margins from the method's own error: the spread of
the stochastic optimizer over seeds, or a count of seeds out of k that must show a
property. The posterior contract, own loops, BatchNorm and the divergence guard are
tested for "vi" and "ssvi" together here.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from _lightning import train_with_lightning
from torch import nn

import bayesify as bf
from bayesify.data import load_digits, make_gap_regression
from bayesify.errors import InputError, TrainingDivergedError, UnsupportedModelError
from bayesify.inference.vi import cosine_lr_factor, kl_warmup_factor
from bayesify.layers.bayesian import BayesianConv2d, BayesianLinear, sampling_mode
from bayesify.posterior import SampledPosterior
from bayesify.report_settings import report_settings


def _mlp(d_in: int = 64, width: int = 32, d_out: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out))


def test_linear_regression_reaches_the_exact_mean_field_optimum(dtype, device):
    # For y = [x, 1] w + noise with a Gaussian prior, the mean-field optimum of the ELBO
    # is q_j = N(m_j, 1 / Lambda_jj): m the exact posterior mean, Lambda its precision.
    torch.manual_seed(0)
    n, d, noise, prior = 400, 3, 0.5, 1.0
    x = torch.randn(n, d, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=dtype) + 0.2 + noise * torch.randn(n, dtype=dtype)
    design = torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1)
    precision = design.T @ design / noise**2 + torch.eye(d + 1, dtype=dtype) / prior**2
    exact_mean = torch.linalg.solve(precision, design.T @ y / noise**2).to(device)
    exact_var = (1 / torch.diag(precision)).to(device)

    bm = bf.bayesify(nn.Linear(d, 1).to(device, dtype), "vi", task="regression", noise=noise,
                     prior_std=prior, init_std=0.05, cosine_lr=True)
    bm.fit((x.to(device), y.to(device)), epochs=800, lr=0.02, batch_size=n, progress=False,
           seed=0)
    layer = bm.model
    mean = torch.cat([layer.weight_mu[0], layer.bias_mu]).detach()
    var = torch.cat([layer.weight_std[0], layer.bias_std]).detach() ** 2
    # The tolerances come from the stochastic optimizer's spread, measured over 8
    # seeds: the means land within 0.03 posterior sd; each variance lands within
    # about 4.5% (sd) of the optimum, the largest of the 4 up to 14%. A variance
    # within 25% (5.5 sd) and a mean relative error within 10% (4.5 sd of an average
    # of 4) leave no room for a systematic error such as a KL weight off by 2x.
    assert ((mean - exact_mean) / exact_var.sqrt()).abs().max() < 0.2
    ratio = var / exact_var
    assert (ratio - 1).abs().max() < 0.25 and abs(float(ratio.mean()) - 1) < 0.1
    assert bm.dtype == dtype and bm.device.type == device.type


def test_gap_regression_is_more_uncertain_in_the_gap():
    # The gap's epistemic variance over the data's is 1.5x to 3.5x over 14 seeds
    # (mean-field VI is known to be weak in between data). Each seed is a replicate:
    # at least 2 of 3 must exceed 1.2x, and the total predictive variance must be
    # larger in the gap.
    data = make_gap_regression()
    grid = data.X_grid[:, 0]
    on_data = (grid >= data.X_train.min()) & (grid <= data.X_train.max()) & ~data.gap_mask
    ratios, wider = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                            nn.Linear(50, 1))
        bm = bf.bayesify(net, "vi", task="regression", init_std=0.05)
        bm.fit((data.X_train, data.y_train), epochs=150, lr=0.03, batch_size=400,
               progress=False, seed=seed)
        pred = bm.predict(data.X_grid, seed=seed)
        assert isinstance(pred, bf.MixturePredictive) and pred.num_components == 32
        epistemic = pred.epistemic_variance
        ratios.append(float(epistemic[data.gap_mask].mean() / epistemic[on_data].mean()))
        wider.append(bool(pred.variance[data.gap_mask].mean() > pred.variance[on_data].mean()))
    assert sum(r > 1.2 for r in ratios) >= 2, ratios
    assert sum(wider) >= 2


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_classification_fits_and_predicts_sampled_probabilities(digits):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "vi", task="classification", init_std=1e-2)
    bm.fit((digits.X_train, digits.y_train), epochs=15, lr=1e-2, progress=False, seed=0)
    pred = bm.predict(digits.X_test, num_samples=8, seed=1)
    assert pred.sample_probs.shape == (8, len(digits.y_test), digits.num_classes)
    assert (pred.labels == digits.y_test).float().mean() > 0.9
    again = bm.predict(digits.X_test, num_samples=8, seed=1)
    torch.testing.assert_close(pred.probs, again.probs)
    assert (pred.epistemic() > 0).all()
    # forward is the mean network: deterministic and equal to the first sample's mean
    torch.testing.assert_close(bm(digits.X_test[:5]), bm(digits.X_test[:5]))
    assert bm.training_flops > 0


def test_conversion_keeps_named_and_normalization_layers(dtype):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(),
                          nn.Linear(16, 3)).to(dtype)
    first_weight = model[0].weight.detach().clone()
    bm = bf.bayesify(model, "vi", task="classification", keep_deterministic="first")
    assert type(bm.model[0]) is nn.Conv2d and torch.equal(bm.model[0].weight, first_weight)
    assert isinstance(bm.model[4], BayesianLinear) and isinstance(bm.model[6], BayesianLinear)
    assert list(bm.bayesian_layers) == ["4", "6"]
    bm2 = bf.bayesify(_mlp(), "vi", task="classification", keep_deterministic=["2"])
    assert isinstance(bm2.model[0], BayesianLinear) and type(bm2.model[2]) is nn.Linear
    cnn = bf.bayesify(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten()), "vi",
                      task="classification")
    assert isinstance(cnn.model[0], BayesianConv2d) and cnn.model[0].groups == 2
    x = torch.randn(5, 1, 8, 8, dtype=dtype)
    bm.fit((x, torch.tensor([0, 1, 2, 0, 1])), epochs=2, progress=False)
    assert bm.predict(x).probs.dtype == dtype


def test_a_bare_linear_model_is_converted():
    bm = bf.bayesify(nn.Linear(3, 2), "vi", task="classification")
    assert isinstance(bm.model, BayesianLinear)


def test_save_and_load_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "vi", task="classification")
    bm.fit((digits.X_train[:64], digits.y_train[:64]), epochs=2, progress=False)
    bm.save(str(tmp_path / "vi.pt"))
    other = bf.bayesify(_mlp(), "vi", task="classification").load(str(tmp_path / "vi.pt"))
    x = digits.X_test[:10]
    torch.testing.assert_close(other.predict(x, seed=3).probs, bm.predict(x, seed=3).probs)


@pytest.mark.parametrize("method", ["vi", "ssvi"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_report_settings_are_valid_options(method, task):
    settings = report_settings(method, task)
    width = 8 if task == "classification" else 1
    bm = bf.bayesify(_mlp(d_out=width), method, task=task, **settings["options"])
    assert set(settings["fit"]) <= {"epochs", "lr", "batch_size"}
    assert bm.is_fitted is False


def test_schedules():
    assert kl_warmup_factor(0, 100, 0.0) == 1.0
    assert kl_warmup_factor(9, 100, 0.5) == pytest.approx(10 / 50)
    assert kl_warmup_factor(60, 100, 0.5) == 1.0
    assert cosine_lr_factor(0, 10) == 1.0
    assert cosine_lr_factor(5, 10) == pytest.approx(0.5)
    assert cosine_lr_factor(10, 10) == pytest.approx(0.0, abs=1e-12)


def test_loss_is_nll_plus_kl_over_n():
    bm = bf.bayesify(_mlp(), "vi", task="classification", temperature=0.5, n_data=200)
    assert bm.effective_kl_weight() == pytest.approx(0.5 / 200)
    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    with torch.no_grad(), sampling_mode(bm.model, "mean"):
        expected = torch.nn.functional.cross_entropy(bm.model(x), y) + 0.5 / 200 * bm.kl()
        torch.testing.assert_close(bm.loss(x, y), expected)


def test_unsupported_layers_are_named():
    with pytest.raises(UnsupportedModelError,
                       match=r"'conv' \(Conv1d\).*exclude=\['conv'\]"):
        bf.bayesify(_with_conv1d(), "vi", task="regression", num_outputs=1)
    for option in ({"exclude": ["conv"]}, {"exclude": "co*"}, {"include": ["head"]},
                   {"keep_deterministic": ["conv"]}):
        bm = bf.bayesify(_with_conv1d(), "vi", task="regression", num_outputs=1, **option)
        assert list(bm.bayesian_layers) == ["head"]


def test_embedding_and_norm_layers_stay_deterministic_and_are_logged_once(caplog):
    from bayesify.inference import mean_field

    def model():
        return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.LayerNorm(8),
                             nn.Linear(8, 2))

    mean_field._LOGGED.clear()
    with caplog.at_level("WARNING", logger="bayesify"):
        bm = bf.bayesify(model(), "vi", task="classification")
        bf.bayesify(model(), "vi", task="classification")
    assert isinstance(bm.model[0], nn.Embedding) and isinstance(bm.model[3], BayesianLinear)
    records = [r for r in caplog.records if r.name == "bayesify"]
    assert len(records) == 1
    assert re.search(r"left 2 Embedding and normalization layer\(s\).*exclude=\[.0., .2.\]",
                     records[0].getMessage())
    caplog.clear()
    mean_field._LOGGED.clear()
    with caplog.at_level("WARNING", logger="bayesify"):
        bf.bayesify(model(), "vi", task="classification", exclude=["0", "2"])
    assert not caplog.records


def test_include_exclude_patterns_are_checked():
    with pytest.raises(InputError, match=r"`exclude` pattern 'nope\*' matches no module"):
        bf.bayesify(_mlp(), "vi", task="classification", exclude=["nope*"])
    with pytest.raises(InputError, match=r"`include` must be a module-name pattern"):
        bf.bayesify(_mlp(), "vi", task="classification", include=[3])
    with pytest.raises(UnsupportedModelError, match="outside `include`"):
        bf.bayesify(_mlp(), "vi", task="classification", include=["1"])


def _with_conv1d() -> nn.Module:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv1d(1, 1, 1))
    model.add_module("head", nn.Linear(1, 1))
    return model


def test_nothing_to_convert():
    with pytest.raises(UnsupportedModelError, match="found nothing to make Bayesian"):
        bf.bayesify(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "vi", task="regression",
                    num_outputs=3)
    with pytest.raises(UnsupportedModelError, match="every nn.Linear / nn.Conv2d is in"):
        bf.bayesify(nn.Sequential(nn.Linear(2, 2)), "vi", task="classification",
                    keep_deterministic="first")


def test_bad_inputs(digits):
    with pytest.raises(InputError, match="`keep_deterministic` names 'nope'"):
        bf.bayesify(_mlp(), "vi", task="classification", keep_deterministic=["nope"])
    with pytest.raises(InputError, match="`prior_std` must be > 0"):
        bf.bayesify(_mlp(), "vi", task="classification", prior_std=0)
    with pytest.raises(InputError, match="`temperature` must be > 0"):
        bf.bayesify(_mlp(), "vi", task="classification", temperature=-1)
    with pytest.raises(InputError, match="`kl_warmup` must lie in"):
        bf.bayesify(_mlp(), "vi", task="classification", kl_warmup=1.5)
    bm = bf.bayesify(_mlp(), "vi", task="classification")
    x = digits.X_train[:32].clone()
    x[3, 5] = float("nan")
    with pytest.raises(InputError, match="`X` contains 1 NaN"):
        bm.fit((x, digits.y_train[:32]), epochs=1, progress=False)
    with pytest.raises(InputError, match="KL weight needs the training-set size"):
        bm.loss(digits.X_train[:4], digits.y_train[:4])
    bm.fit((digits.X_train[:32], digits.y_train[:32]), epochs=1, progress=False)
    with pytest.raises(InputError, match="`num_samples` must be an int >= 1"):
        bm.predict(digits.X_test[:4], num_samples=0)
    with pytest.raises(InputError, match="`x` contains 64 NaN"):
        bm.predict(torch.full((1, 64), float("nan")))


# ------------------------------------------- the method contract, for vi and ssvi

def _options(method: str) -> dict:
    return {"density": 0.3, "update_interval": 5} if method == "ssvi" else {}


def _summary(pred) -> torch.Tensor:
    """Class probabilities [N, C] or the predictive mean [N]."""
    return pred.probs if isinstance(pred, bf.CategoricalPredictive) else pred.mean


@pytest.mark.parametrize("method", ["vi", "ssvi"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_posterior_is_sampled_raw_outputs_on_the_models_dtype_and_device(
        method, task, dtype, device):
    width = 3 if task == "classification" else 1
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, width)).to(device, dtype)
    x = torch.randn(32, 4, dtype=dtype, device=device)
    y = torch.arange(32, device=device) % 3 if width == 3 else x.sum(1)
    bm = bf.bayesify(net, method, task=task, **_options(method))
    bm.fit((x, y), epochs=2, batch_size=8, progress=False, seed=0)
    for tensor in [*bm.parameters(), *bm.buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == dtype and tensor.device.type == device.type
    inputs = x[:5].clone().requires_grad_(True)
    posterior = bm.posterior(inputs, num_samples=4, seed=0)
    assert isinstance(posterior, SampledPosterior)
    assert posterior.samples.shape == (4, 5, width) and posterior.samples.dtype == dtype
    posterior.samples.sum().backward()  # differentiable in x
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
    pred = _summary(bm.predict(x, num_samples=4, seed=0))
    assert torch.isfinite(pred).all() and pred.device.type == device.type
    assert pred.dtype == dtype
    assert torch.equal(pred, _summary(bm.predict(x, num_samples=4, seed=0)))


@pytest.mark.parametrize("method", ["vi", "ssvi"])
def test_a_plain_loop_over_loss_then_finish_fit_predicts(method, digits):
    torch.manual_seed(0)
    x, y = digits.X_train, digits.y_train
    unknown_n = bf.bayesify(_mlp(), method, task="classification")
    with pytest.raises(InputError, match="KL weight needs the training-set size N: pass "
                                         f"n_data=N to bayesify\\(..., '{method}'"):
        unknown_n.loss(x[:4], y[:4])
    bm = bf.bayesify(_mlp(), method, task="classification", n_data=len(y), **_options(method))
    with pytest.raises(bf.NotFittedError, match="finish_fit"):
        bm.predict(x[:2])
    optimizer = torch.optim.AdamW(bm.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(10):
        for i in range(0, len(y), 128):
            optimizer.zero_grad()
            bm.loss(x[i:i + 128], y[i:i + 128]).backward()
            optimizer.step()
    pred = bm.finish_fit().predict(digits.X_test, seed=0)
    assert (pred.labels == digits.y_test).float().mean() > 0.85  # 0.96-0.98 over 6 seeds
    for layer in getattr(bm, "sparse_layers", {}).values():
        assert (layer.weight_mu[~layer.mask] == 0).all()  # a fixed subspace


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")
def test_a_lightning_trainer_then_finish_fit_predicts(tmp_path, digits):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "vi", task="classification", n_data=len(digits.y_train))

    loader = DataLoader(TensorDataset(digits.X_train, digits.y_train), batch_size=128,
                        shuffle=True)
    train_with_lightning(bm, loader, epochs=10, root=tmp_path)
    pred = bm.finish_fit().predict(digits.X_test, seed=0)
    assert (pred.labels == digits.y_test).float().mean() > 0.85


@pytest.mark.parametrize("method", ["vi", "ssvi"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_batchnorm_network_fits_and_predicts(method, task, dtype):
    # BatchNorm trains as usual in fit (its running statistics move) and predicts in
    # eval mode: one row is enough, and the FLOP probe never runs a 1-row train pass.
    torch.manual_seed(0)
    width = 3 if task == "classification" else 1
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, width)).to(dtype)
    x = torch.randn(64, 4, dtype=dtype)
    y = torch.arange(64) % 3 if width == 3 else x[:, 0]
    bm = bf.bayesify(net, method, task=task, **_options(method))
    bm.fit((x, y), epochs=3, batch_size=16, progress=False, seed=0)
    assert net[1].running_mean.abs().sum() > 0 and int(net[1].num_batches_tracked) == 12
    assert torch.isfinite(_summary(bm.predict(x[:1], seed=0))).all()
    assert torch.isfinite(_summary(bm.predict(x, seed=0))).all()
    assert int(net[1].num_batches_tracked) == 12  # prediction left the statistics alone


@pytest.mark.parametrize("method", ["vi", "ssvi"])
def test_a_diverging_fit_stops_with_the_epoch_and_step(method, digits):
    bm = bf.bayesify(_mlp(), method, task="classification", sgd_momentum=0.9,
                     kl_warmup=0.5, **_options(method))
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch \d+/5, step \d+"):
        bm.fit((digits.X_train, digits.y_train), epochs=5, lr=1e9, progress=False, seed=0)
    assert bm._kl_factor == 1.0  # no warm-up factor left behind for a loop of one's own


def test_an_ssvi_update_step_is_guarded_too(digits):
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", update_interval=1, seed=0)
    calls = []

    def nan_loss(x, y):
        calls.append(bm._is_update_step())
        return bm.loss(x, y) * float("nan")

    bm.training_loss = nan_loss
    with pytest.raises(TrainingDivergedError, match="step 1: the loss is nan"):
        bm.fit((digits.X_train[:64], digits.y_train[:64]), epochs=2, batch_size=8,
               progress=False)
    assert calls == [True]  # the first step is a subspace update, and it stopped
    for layer in bm.sparse_layers.values():
        assert layer.dense_grad is None and not layer.record_dense_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.BayesifyWarning)
        bm.fit((digits.X_train[:64], digits.y_train[:64]), epochs=2, batch_size=8,
               progress=False, on_nonfinite="warn")
    assert bm.update_log == []  # skipped, not applied


class _Stream:
    """40 rows of 4 features in 5 batches, with no length and no row count (as from
    an IterableDataset)."""

    num_rows = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            yield torch.randn(8, 4, generator=generator), torch.arange(8) % 3


@pytest.mark.parametrize("method", ["vi", "ssvi"])
def test_batches_without_a_length_still_plan_the_schedules_and_count_n(method):
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    bm = bf.bayesify(net, method, task="classification", cosine_lr=True, sgd_momentum=0.9,
                     **_options(method))
    bm.training_batches = lambda train, **kwargs: _Stream()
    optimizers = []
    original = bm.configure_optimizer
    bm.configure_optimizer = lambda lr, wd: optimizers.append(original(lr, wd)) or optimizers[0]
    bm.fit((torch.zeros(1, 4), torch.zeros(1)), epochs=3, progress=False, seed=0)
    assert bm.n_data == 40 and bm.effective_kl_weight() == pytest.approx(bm.temperature / 40)
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine end
