"""The shared contract: bayesify(), BayesianModel's fit/predict cycle, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesify as bf
from bayesify.core import preserve_training_flags
from bayesify.posterior import GaussianPosterior


def mlp(d_in: int = 3, d_out: int = 4, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out)).to(dtype)


def blobs(n: int = 240, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    centers = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [-3.0, -3.0, 0]])
    y = torch.arange(n) % 4
    x = centers[y] + 0.5 * torch.randn(n, 3, generator=generator)
    return x.to(dtype), y


def linear_data(n: int = 400, noise: float = 0.3, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=generator, dtype=dtype)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + noise * torch.randn(
        n, generator=generator, dtype=dtype)
    return x, y


# ---------------------------------------------------------------- deterministic baseline


def test_deterministic_classifier_predicts_the_softmax_of_its_logits(dtype):
    net = mlp(dtype=dtype)
    bm = bf.bayesify(net, "deterministic", task="classification")
    x, _ = blobs(dtype=dtype)
    pred = bm.predict(x)
    assert isinstance(pred, bf.CategoricalPredictive)
    assert pred.probs.dtype == dtype
    torch.testing.assert_close(pred.probs, torch.softmax(net(x), -1).detach())
    # A single model has no epistemic part.
    assert torch.equal(pred.epistemic(), torch.zeros_like(pred.epistemic()))


def test_fit_learns_a_classifier_and_returns_self(dtype):
    x, y = blobs(dtype=dtype)
    bm = bf.bayesify(mlp(dtype=dtype), "deterministic", task="classification")
    out = bm.fit((x, y), epochs=30, lr=1e-2, progress=False, seed=0)
    assert out is bm
    assert bm.history[-1] < bm.history[0] / 4
    assert (bm.predict(x).labels == y).float().mean() > 0.95


def test_regression_noise_is_learned_to_the_true_level(dtype):
    x, y = linear_data(noise=0.3, dtype=dtype)
    net = nn.Linear(3, 1).to(dtype)
    bm = bf.bayesify(net, "deterministic", task="regression")
    bm.fit((x, y), epochs=150, lr=3e-2, progress=False, seed=0)
    pred = bm.predict(x)
    assert isinstance(pred, bf.GaussianPredictive)
    assert pred.mean.shape == (400,)
    # The MLE of a homoscedastic noise is the residual RMS: 0.3 up to sampling error.
    assert abs(float(pred.stddev[0]) - 0.3) < 0.03
    torch.testing.assert_close(pred.aleatoric_variance, pred.variance)


def test_targets_of_shape_n_and_n1_give_the_same_loss():
    x, y = linear_data()
    bm = bf.bayesify(nn.Linear(3, 1), "deterministic", task="regression")
    torch.testing.assert_close(bm.loss(x, y), bm.loss(x, y[:, None]))


def test_predict_accepts_tensor_array_and_dataloader_and_batches_consistently():
    x, y = blobs()
    bm = bf.bayesify(mlp(), "deterministic", task="classification")
    full = bm.predict(x).probs
    torch.testing.assert_close(bm.predict(x.numpy()).probs, full)
    torch.testing.assert_close(bm.predict(x, batch_size=7).probs, full)
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    torch.testing.assert_close(bm.predict(loader).probs, full)


def test_fit_accepts_a_dataloader_and_numpy_arrays():
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    bm = bf.bayesify(mlp(), "deterministic", task="classification")
    bm.fit(loader, epochs=3, progress=False)
    assert bm.n_data == 240
    bm2 = bf.bayesify(mlp(), "deterministic", task="classification")
    bm2.fit((x.numpy(), y.numpy()), epochs=3, progress=False)
    assert len(bm2.history) == 3


def test_float64_model_gets_float64_inputs_and_outputs():
    bm = bf.bayesify(mlp(dtype=torch.float64), "deterministic", task="classification")
    x, _ = blobs()  # float32 inputs
    assert bm.predict(x).probs.dtype == torch.float64


def test_copy_model_leaves_the_original_weights_untouched():
    net = mlp()
    before = [p.detach().clone() for p in net.parameters()]
    x, y = blobs()
    bf.bayesify(net, "deterministic", task="classification", copy_model=True).fit(
        (x, y), epochs=2, progress=False)
    for b, p in zip(before, net.parameters(), strict=True):
        assert torch.equal(b, p)


def test_wrapping_alone_never_changes_weights():
    net = mlp()
    before = [p.detach().clone() for p in net.parameters()]
    bm = bf.bayesify(net, "deterministic", task="classification")
    bm.predict(blobs()[0])
    for b, p in zip(before, net.parameters(), strict=True):
        assert torch.equal(b, p)


def test_predict_restores_training_flags():
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    bm = bf.bayesify(net, "deterministic", task="classification")
    bm.train()
    bm.predict(blobs()[0])
    assert all(m.training for m in bm.modules())


def test_preserve_training_flags_restores_on_exception():
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5))
    net[1].eval()
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_training_flags(net):
            net.train()
            raise RuntimeError("boom")
    assert net.training and net[0].training and not net[1].training


def test_save_and_load_round_trip_reproduces_predictions(tmp_path):
    x, y = linear_data()
    bm = bf.bayesify(nn.Linear(3, 1), "deterministic", task="regression")
    bm.fit((x, y), epochs=5, progress=False)
    path = tmp_path / "model.pt"
    bm.save(str(path))
    fresh = bf.bayesify(nn.Linear(3, 1), "deterministic", task="regression")
    assert not fresh.is_fitted
    fresh.load(str(path))
    assert fresh.is_fitted
    a, b = bm.predict(x), fresh.predict(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)


def test_fixed_noise_regressor_predicts_without_fit():
    x, _ = linear_data()
    bm = bf.bayesify(nn.Linear(3, 1), "deterministic", task="regression", noise=0.5)
    torch.testing.assert_close(bm.predict(x).stddev, torch.full((400,), 0.5))


def test_heteroscedastic_noise_uses_the_second_half_of_the_outputs():
    net = nn.Linear(3, 2)
    bm = bf.bayesify(net, "deterministic", task="regression", noise="heteroscedastic")
    x, y = linear_data()
    bm.fit((x, y), epochs=2, progress=False)
    pred = bm.predict(x)
    out = net(x).detach()
    torch.testing.assert_close(pred.mean, out[:, 0])
    torch.testing.assert_close(pred.variance,
                               torch.nn.functional.softplus(out[:, 1]) + 1e-6)


def test_registry_lists_methods_and_accepts_a_class():
    assert "deterministic" in bf.available_methods()
    assert "deterministic" in bf.available_methods("regression")
    cls = bf.get_method("deterministic")
    bm = bf.bayesify(mlp(), cls, task="classification")
    assert bm.method_name == "deterministic"


def test_a_user_registered_method_is_found_by_name():
    @bf.register_method("test_only_constant")
    class Constant(bf.BayesianModel):
        supported_tasks = ("classification",)
        fitted_at_init = True

        def forward(self, x):
            return torch.zeros(x.shape[0], 2)

        def loss(self, x, y):
            return torch.zeros(())

        def _posterior(self, x, num_samples, generator):
            return GaussianPosterior(torch.zeros(x.shape[0], 2))

    bm = bf.bayesify(None, "test_only_constant", task="classification")
    assert torch.equal(bm.predict(torch.ones(3, 1)).probs, torch.full((3, 2), 0.5))
    with pytest.raises(bf.InputError, match="does not support task='regression'"):
        bf.bayesify(None, "test_only_constant", task="regression")


# ------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: bf.bayesify(mlp(), "no_such_method", task="classification"), bf.InputError,
         "`method` must be one of"),
        (lambda: bf.bayesify(mlp(), "deterministic", task="ranking"), bf.InputError,
         "`task` must be one of"),
        (lambda: bf.bayesify(mlp(), "deterministic", task="classification", colour=1),
         bf.InputError, "unknown option 'colour'"),
        (lambda: bf.bayesify("not a model", "deterministic", task="classification"),
         bf.InputError, "`model` must be a torch.nn.Module"),
        (lambda: bf.bayesify(mlp(), 42, task="classification"), bf.InputError,
         "`method` must be a method name"),
        (lambda: bf.bayesify(mlp(), "deterministic", task="classification", n_data=0),
         bf.InputError, "`n_data` must be an int >= 1"),
        (lambda: bf.bayesify(mlp(), "deterministic", task="regression", noise="loud"),
         bf.InputError, "`noise` must be"),
        (lambda: bf.bayesify(mlp(), "deterministic", task="regression", noise=-1.0),
         bf.InputError, "`noise` must be > 0"),
        (lambda: bf.bayesify(nn.Linear(3, 3), "deterministic", task="regression",
                             noise="heteroscedastic"), bf.InputError, "2\\*D outputs"),
    ],
)
def test_bad_construction_raises_a_named_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _classifier():
    return bf.bayesify(mlp(), "deterministic", task="classification")


def _regressor():
    return bf.bayesify(nn.Linear(3, 1), "deterministic", task="regression")


X, Y = blobs()
XR, YR = linear_data()
X_NAN = X.clone()
X_NAN[3, 1] = float("nan")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: _classifier().fit((X_NAN, Y), progress=False), "`X` contains 1 NaN"),
        (lambda: _classifier().fit((X[:0], Y[:0]), progress=False), "`X` is empty"),
        (lambda: _classifier().fit((X, Y[:-1]), progress=False), "same number of rows"),
        (lambda: _classifier().fit((X, Y + 10), epochs=1, progress=False), "`y` must be < 4"),
        (lambda: _classifier().fit((X, Y - 1), progress=False), "`y` must be >= 0"),
        (lambda: _classifier().fit((X, Y + 0.5), progress=False), "integer class labels"),
        (lambda: _classifier().fit((X, Y), epochs=-1, progress=False), "`epochs` must be"),
        (lambda: _classifier().fit((X, Y), lr=-1, progress=False), "`lr` must be > 0"),
        (lambda: _classifier().fit((X, Y), batch_size=0, progress=False), "`batch_size`"),
        (lambda: _classifier().fit((X, Y), grad_clip=0, progress=False), "`grad_clip`"),
        (lambda: _classifier().fit(X, progress=False), "`train` must be a DataLoader"),
        (lambda: _classifier().predict(X_NAN), "`x` contains 1 NaN"),
        (lambda: _classifier().predict(X, num_samples=0), "`num_samples` must be"),
        (lambda: _classifier().predict(torch.tensor(1.0)), "batch dimension"),
        (lambda: _classifier().predict(X, batch_size=0), "`batch_size`"),
        (lambda: _regressor().fit((XR, torch.stack([YR, YR], 1)), progress=False),
         "`y` must have shape"),
        (lambda: _regressor().fit((XR, YR[:, None, None]), progress=False),
         "regression targets"),
        (lambda: _classifier().fit((X, Y[:, None].repeat(1, 2)), progress=False),
         "class labels of shape"),
    ],
)
def test_bad_data_raises_input_error_naming_the_argument(call, match):
    with pytest.raises(bf.InputError, match=match):
        call()


def test_predict_and_save_before_fit_raise_not_fitted(tmp_path):
    bm = _regressor()
    with pytest.raises(bf.NotFittedError, match=r"call \.fit\(train\) before \.predict"):
        bm.predict(XR)
    with pytest.raises(bf.NotFittedError, match=r"before \.save"):
        bm.save(str(tmp_path / "x.pt"))


def test_loading_another_methods_checkpoint_is_refused(tmp_path):
    bm = _classifier()
    path = tmp_path / "c.pt"
    bm.save(str(path))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["method"] = "vbll"
    torch.save(checkpoint, path)
    with pytest.raises(bf.CheckpointError, match="holds a checkpoint of method 'vbll'"):
        _classifier().load(str(path))


def test_errors_share_one_root_and_match_builtins():
    assert issubclass(bf.InputError, bf.BayesifyError)
    assert issubclass(bf.InputError, ValueError)
    assert issubclass(bf.NotFittedError, bf.BayesifyError)
    assert issubclass(bf.UnsupportedModelError, bf.InputError)
    assert issubclass(bf.JitterWarning, bf.BayesifyWarning)
    assert np.issubdtype(np.asarray(bf.TASKS).dtype, np.str_)


def test_public_subpackages_and_names_are_reachable_from_the_top():
    assert callable(bf.calibration.evaluate) and callable(bf.ood.score)
    assert callable(bf.bo.as_botorch_model) and bf.bo.BayesianOptimization is not None
    assert issubclass(bf.IVON, torch.optim.Optimizer)
    for name in bf.__all__:
        assert getattr(bf, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = bf.nonexistent


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_catches_every_non_finite_value_and_allows_overflowing_sums(bad):
    from bayesify._validation import check_finite

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows
    assert check_finite(big, "x") is big
    for values in ([1.0, bad], [bad, -bad if bad == bad else 1.0], [float("inf"), -float("inf")]):
        with pytest.raises(bf.InputError, match="`x` contains"):
            check_finite(torch.tensor(values), "x")
    with pytest.raises(bf.InputError, match="`x` contains 1 NaN or infinite"):
        check_finite(torch.tensor([[1.0, 2.0], [bad, 4.0]], dtype=torch.float64), "x")
