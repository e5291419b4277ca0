"""Dense mean-field VI ("vi"): the exact mean-field optimum, uncertainty, conversion, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.data import load_digits, make_gap_regression
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.inference.vi import cosine_lr_factor, kl_warmup_factor
from bayesify.layers.bayesian import BayesianConv2d, BayesianLinear, sampling_mode


def _mlp(d_in: int = 64, width: int = 32, d_out: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out))


def test_linear_regression_reaches_the_exact_mean_field_optimum(dtype):
    # For y = [x, 1] w + noise with a Gaussian prior, the mean-field optimum of the ELBO
    # is q_j = N(m_j, 1 / Lambda_jj): m the exact posterior mean, Lambda its precision.
    torch.manual_seed(0)
    n, d, noise, prior = 400, 3, 0.5, 1.0
    x = torch.randn(n, d, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=dtype) + 0.2 + noise * torch.randn(n, dtype=dtype)
    design = torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1)
    precision = design.T @ design / noise**2 + torch.eye(d + 1, dtype=dtype) / prior**2
    exact_mean = torch.linalg.solve(precision, design.T @ y / noise**2)
    exact_var = 1 / torch.diag(precision)

    bm = bf.bayesify(nn.Linear(d, 1).to(dtype), "vi", task="regression", noise=noise,
                     prior_std=prior, init_std=0.05, cosine_lr=True)
    bm.fit((x, y), epochs=800, lr=0.02, batch_size=n, progress=False, seed=0)
    layer = bm.model
    mean = torch.cat([layer.weight_mu[0], layer.bias_mu]).detach()
    var = torch.cat([layer.weight_std[0], layer.bias_std]).detach() ** 2
    # Tolerance: means within 0.2 posterior sd, variances within 6% (the stochastic
    # optimizer's noise; a run reaches about 0.015 sd and 3%).
    assert ((mean - exact_mean) / exact_var.sqrt()).abs().max() < 0.2
    assert ((var / exact_var) - 1).abs().max() < 0.06
    assert bm.dtype == dtype


def test_gap_regression_is_more_uncertain_in_the_gap():
    data = make_gap_regression()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                        nn.Linear(50, 1))
    bm = bf.bayesify(net, "vi", task="regression", init_std=0.05)
    bm.fit((data.X_train, data.y_train), epochs=150, lr=0.03, batch_size=400,
           progress=False, seed=0)
    pred = bm.predict(data.X_grid, seed=0)
    assert isinstance(pred, bf.MixturePredictive) and pred.num_components == 32
    grid = data.X_grid[:, 0]
    on_data = (grid >= data.X_train.min()) & (grid <= data.X_train.max()) & ~data.gap_mask
    gap_epistemic = pred.epistemic_variance[data.gap_mask].mean()
    data_epistemic = pred.epistemic_variance[on_data].mean()
    assert gap_epistemic > 1.5 * data_epistemic
    assert pred.variance[data.gap_mask].mean() > pred.variance[on_data].mean()


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
    settings = bf.get_method(method).report_settings(task)
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
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match=r"'0' \(Embedding\).*keep_deterministic"):
        bf.bayesify(model, "vi", task="classification")
    bm = bf.bayesify(model, "vi", task="classification", keep_deterministic=["0"])
    assert isinstance(bm.model[2], BayesianLinear)
    with pytest.raises(UnsupportedModelError, match=r"'conv' \(Conv1d\)"):
        bf.bayesify(_with_conv1d(), "vi", task="regression", num_outputs=1)


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
