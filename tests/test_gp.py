"""The "gp" method and GP heads: exact posterior vs GPyTorch, BoTorch's fit, SVGP, numerics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import InputError, JitterWarning, NotFittedError
from bayesify.fitting import CLOSED_FORM, FitOptions, GradientFit
from bayesify.layers.gp import (
    ExactGPHead,
    VariationalGPHead,
    gaussian_multitask_likelihood,
    gpytorch,
)
from bayesify.report_settings import report_settings


def _data(n: int = 40, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 3, generator=g, dtype=dtype) * 4 - 2
    y = torch.sin(2 * X[:, 0]) + 0.5 * X[:, 1] ** 2 + 0.05 * torch.randn(n, generator=g,
                                                                          dtype=dtype)
    return X, y


def _net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


class _ReferenceGP(gpytorch.models.ExactGP):
    def __init__(self, z, y, likelihood, kernel):
        super().__init__(z, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, z):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z),
                                                         self.covar_module(z))


@pytest.mark.parametrize("kernel", ["rbf", "matern"])
def test_exact_head_on_frozen_features_matches_gpytorch(kernel):
    X, y = _data()
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    bm = bf.bayesify(net, "gp", task="regression", kernel=kernel).fit((X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    head = bm.gp
    d = head.dim
    assert d == 8  # the input of the final Linear
    base = (gpytorch.kernels.RBFKernel(ard_num_dims=d) if kernel == "rbf"
            else gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=d))
    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(1e-6)).double()
    ref = _ReferenceGP(head.train_inputs, head.train_targets[:, 0], likelihood,
                       base).double()
    ref.covar_module.lengthscale = head.lengthscale[0].detach()
    ref.likelihood.noise = head.noise.detach()
    ref.mean_module.constant.data.fill_(float(head.mean.detach()))
    ref.eval()
    X_test = torch.rand(25, 3, dtype=torch.float64) * 6 - 3
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        f = ref(bm.features(X_test))
    pred = bm.predict(X_test)
    std = float(bm.y_std)
    torch.testing.assert_close(pred.mean, f.mean * std + bm.y_mean, rtol=0, atol=1e-6 * std)
    torch.testing.assert_close(pred.epistemic_variance, f.variance * std**2, rtol=0,
                               atol=1e-6 * std**2)
    torch.testing.assert_close(pred.aleatoric_variance,
                               (head.noise * std**2).expand(25).detach(), rtol=0, atol=1e-12)


def test_exact_fit_uses_botorch_objective_and_reaches_its_optimum():
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    X, y = _data(30)
    unit = torch.stack([torch.full((3,), -2.0), torch.full((3,), 2.0)]).double()
    bm = bf.bayesify(None, "gp", task="regression", input_bounds=unit).double().fit((X, y))
    z, y_std = bm.gp.train_inputs, bm.gp.train_targets
    ref = SingleTaskGP(z, y_std, outcome_transform=None)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(ref.likelihood, ref)
    fit_gpytorch_mll(mll)
    ref.train()
    ref_value = float(mll(ref(z), y_std[:, 0]).detach())
    # Our objective at BoTorch's hyperparameters is BoTorch's (MLL + priors) / N ...
    twin = ExactGPHead(3, 1).double()
    with torch.no_grad():
        twin.log_lengthscale.copy_(ref.covar_module.lengthscale.log())
        twin.log_noise.copy_(ref.likelihood.noise.log())
        twin.mean.copy_(ref.mean_module.constant)
    assert float(twin.objective(z, y_std).detach()) == pytest.approx(-ref_value, abs=1e-8)
    # ... and our fit reaches at least its optimum.
    assert float(bm.gp.objective().detach()) <= -ref_value + 1e-5


def test_sparse_gp_with_inducing_points_at_training_inputs_approaches_exact():
    torch.manual_seed(0)
    X, y = _data(30)
    exact = bf.bayesify(None, "gp", task="regression").double().fit((X, y))
    head = exact.gp
    z, y_std = head.train_inputs, head.train_targets
    svgp = VariationalGPHead(z, 1, kernel="rbf").double()
    svgp.variational_strategy.base_variational_strategy.inducing_points.requires_grad_(False)
    svgp.covar_module.lengthscale = head.lengthscale[0].detach()
    svgp.mean_module.constant.data.fill_(float(head.mean.detach()))
    likelihood = gaussian_multitask_likelihood(1).double()
    likelihood.task_noises = head.noise.detach()
    variational = list(svgp.variational_strategy.base_variational_strategy
                       ._variational_distribution.parameters())
    elbo = gpytorch.mlls.VariationalELBO(likelihood, svgp, num_data=30)
    opt = torch.optim.Adam(variational, lr=0.05)
    z_test = torch.rand(20, 3, dtype=torch.float64)
    with torch.no_grad():
        mean, var = head.posterior(z_test)
    errors = []
    for step in range(1, 1001):
        opt.zero_grad()
        (-elbo(svgp(z), y_std)).backward()
        opt.step()
        if step in (250, 1000):
            svgp.eval()
            with torch.no_grad():
                f = svgp(z_test)
            errors.append((float((f.mean - mean).abs().max()),
                           float((f.variance - var).abs().max())))
            svgp.train()
    # With Z = X the ELBO's optimum is the exact posterior: the gap closes with training.
    assert errors[1][0] < errors[0][0] / 4
    assert errors[1][0] < 5e-3 and errors[1][1] < 1e-3


def test_variational_regression_and_deep_kernel_predict_sensibly():
    X, y = _data(60)
    bm = bf.bayesify(_net(), "gp", task="regression", inference="variational",
                     num_inducing=16).fit((X, y), epochs=150, lr=0.05, progress=False,
                                          batch_size=30, seed=0)
    pred = bm.predict(X)
    assert float((pred.mean - y).pow(2).mean().sqrt()) < 0.5 * float(y.std())
    assert bool((pred.epistemic_variance >= 0).all())
    assert bool((pred.aleatoric_variance > 0).all())


def test_variational_classification_on_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:500] / 16, dtype=torch.float32)
    labels = torch.tensor(digits.target[:500])
    bm = bf.bayesify(None, "gp", task="classification", num_inducing=32)
    bm.fit((X[:400], labels[:400]), epochs=15, lr=0.05, progress=False, seed=0)
    pred = bm.predict(X[400:], seed=0)
    assert isinstance(pred, bf.CategoricalPredictive)
    assert float((pred.labels == labels[400:]).float().mean()) > 0.8
    assert float(pred.epistemic().mean()) > 0  # latent uncertainty reaches the softmax


def test_joint_training_of_the_backbone_changes_weights_and_lowers_the_objective():
    X, y = _data(40)
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    bm = bf.bayesify(net, "gp", task="regression", freeze_backbone=False)
    bm.fit((X, y), epochs=60, lr=0.01, weight_decay=1e-4, progress=False)
    assert bm.history[-1] < bm.history[0]
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert bool(torch.isfinite(bm.predict(X).variance).all())


@pytest.mark.parametrize("kind", ["duplicates", "clusters"])
def test_float32_fits_on_ill_conditioned_inputs(kind):
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        if kind == "duplicates":
            X = torch.rand(8, 2, generator=g).repeat(5, 1)
        else:
            X = 0.5 + 1e-4 * torch.randn(40, 2, generator=g)
        y = X.sum(1) + 0.01 * torch.randn(40, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bm = bf.bayesify(None, "gp", task="regression", num_restarts=1).fit((X, y))
            pred = bm.predict(torch.rand(10, 2, generator=g))
        assert all(issubclass(w.category, JitterWarning) for w in caught), caught
        assert pred.mean.dtype == torch.float32
        assert bool(torch.isfinite(pred.variance).all())
        assert bool((pred.epistemic_variance >= 0).all())


def test_jitter_is_added_with_a_warning_when_the_noise_is_tiny():
    X = torch.rand(10, 2).repeat(4, 1)
    y = X.sum(1)
    with pytest.warns(JitterWarning, match="added .* to its diagonal"):
        bm = bf.bayesify(None, "gp", task="regression", noise=1e-12).fit((X, y))
        pred = bm.predict(X)
    assert bool(torch.isfinite(pred.variance).all()) and bool((pred.variance >= 0).all())


def test_constant_outputs_and_dtype(dtype):
    X = torch.rand(12, 2, dtype=dtype)
    y = torch.full((12,), 3.0, dtype=dtype)
    bm = bf.bayesify(None, "gp", task="regression").to(dtype).fit((X, y))
    pred = bm.predict(torch.rand(5, 2, dtype=dtype))
    assert pred.mean.dtype == dtype
    torch.testing.assert_close(pred.mean, torch.full((5,), 3.0, dtype=dtype), atol=1e-3,
                               rtol=0)
    assert bool(torch.isfinite(pred.variance).all())


def test_multi_output_regression_is_independent_per_output():
    X, y = _data(30)
    Y = torch.stack([y, 10 * y + 1], 1)
    bm = bf.bayesify(None, "gp", task="regression", num_restarts=1).double().fit((X, Y))
    single = bf.bayesify(None, "gp", task="regression", num_restarts=1).double().fit((X, y))
    pred, pred1 = bm.predict(X[:5]), single.predict(X[:5])
    assert pred.mean.shape == (5, 2)
    torch.testing.assert_close(pred.mean[:, 0], pred1.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(pred.mean[:, 1], 10 * pred1.mean + 1, atol=1e-3, rtol=0)


@pytest.mark.parametrize("inference", ["exact", "variational"])
def test_save_and_load_round_trip(tmp_path, inference):
    X, y = _data(30)
    kwargs = {"inference": inference, "num_inducing": 8}
    bm = bf.bayesify(_net(), "gp", task="regression", **kwargs)
    bm.fit((X, y), progress=False, **({"epochs": 5} if inference == "variational" else {}))
    bm.save(str(tmp_path / "gp.pt"))
    other = bf.bayesify(_net(), "gp", task="regression", **kwargs).load(str(tmp_path / "gp.pt"))
    torch.testing.assert_close(other.predict(X).mean, bm.predict(X).mean)
    torch.testing.assert_close(other.predict(X).variance, bm.predict(X).variance)


def test_bad_inputs():
    with pytest.raises(InputError, match="`inference`='exact' supports regression only"):
        bf.bayesify(None, "gp", task="classification", inference="exact")
    with pytest.raises(InputError, match="`kernel` must be one of"):
        bf.bayesify(None, "gp", task="regression", kernel="periodic")
    with pytest.raises(InputError, match="`noise` must be > 0"):
        bf.bayesify(None, "gp", task="regression", noise=-1.0)
    with pytest.raises(InputError, match="`input_bounds` must be"):
        bf.bayesify(None, "gp", task="regression", input_bounds=[[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(InputError, match="`num_inducing` must be an int"):
        bf.bayesify(None, "gp", task="regression", num_inducing=0)
    with pytest.raises(bf.UnsupportedModelError, match="head"):
        bf.bayesify(_net(), "gp", task="regression", head="0.weight")
    with pytest.raises(NotFittedError, match="call .fit"):
        bf.bayesify(None, "gp", task="regression").predict(torch.rand(3, 2))


def test_exact_gp_on_many_points_suggests_the_sparse_gp(monkeypatch):
    import bayesify.inference._gp_fit as gp_module

    monkeypatch.setattr(gp_module, "EXACT_LIMIT", 10)
    X, y = _data(12)
    with pytest.warns(bf.BayesifyWarning, match="inference='variational' scales"):
        bf.bayesify(None, "gp", task="regression", num_restarts=1).fit((X, y))


def test_report_settings_are_valid_options():
    for task in bf.TASKS:
        settings = report_settings("gp", task)
        bm = bf.bayesify(_net() if task == "regression" else nn.Linear(4, 3), "gp", task=task,
                         **settings["options"])
        bm.fit_strategy().check_options(bm, FitOptions(**settings["fit"]))
        assert math.isfinite(len(settings["fit"]))


# ------------------------------------------------------- the method contract (issue 10)


def test_fit_strategy_follows_inference_and_backbone():
    X, y = _data(20)
    frozen = bf.bayesify(_net(), "gp", task="regression", num_restarts=1)
    assert frozen.fit_strategy() is CLOSED_FORM
    with pytest.raises(InputError, match="`epochs` does not apply to method 'gp'"):
        frozen.fit((X, y), epochs=5)
    joint = bf.bayesify(_net(), "gp", task="regression", freeze_backbone=False)
    assert isinstance(joint.fit_strategy(), GradientFit)
    with pytest.raises(InputError, match="`batch_size`=5 does not apply to inference='exact'"):
        joint.fit((X, y), batch_size=5, progress=False)
    joint.fit((X, y), epochs=3, batch_size=20, progress=False, seed=0)
    assert len(joint.history) == 3 and joint.gp.train_inputs.shape == (20, 8)
    sparse = bf.bayesify(None, "gp", task="regression", inference="variational")
    assert isinstance(sparse.fit_strategy(), GradientFit)


def test_classification_labels_are_checked_against_the_class_count():
    X = torch.rand(30, 4)
    with pytest.raises(InputError, match=r"`y` must be < 3 \(the number of classes\), got 5"):
        bf.bayesify(nn.Linear(4, 3), "gp", task="classification").fit(
            (X, torch.arange(30) % 6), epochs=1, progress=False)
    bm = bf.bayesify(None, "gp", task="classification", num_inducing=4, num_classes=2)
    with pytest.raises(InputError, match="`y` must be < 2"):
        bm.fit((X, torch.arange(30) % 3), epochs=1, progress=False)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_frozen_backbone_keeps_batchnorm_statistics_and_outputs_bitwise(task):
    torch.manual_seed(0)
    out = 1 if task == "regression" else 3
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, out))
    X, y = _data(40, dtype=torch.float32)
    labels = (y > y.median()).long()
    net(X)  # train mode: running statistics to keep
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    outputs = net(X)
    net.train()
    bm = bf.bayesify(net, "gp", task=task, num_inducing=8, num_restarts=1)
    fit = {} if task == "regression" else {"epochs": 2, "progress": False}
    bm.fit((X, y if task == "regression" else labels), seed=0, **fit)
    bm.predict(X)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    net.eval()
    assert torch.equal(net(X), outputs)


def test_exact_joint_posterior_matches_the_marginals_and_is_differentiable(dtype):
    X, y = _data(25, dtype=dtype)
    bm = bf.bayesify(None, "gp", task="regression", num_restarts=1).to(dtype).fit((X, y))
    assert all(t.dtype == dtype for t in [*bm.parameters(), *bm.buffers()]
               if t.is_floating_point())
    blocks = (torch.rand(2, 4, 3, dtype=dtype) * 4 - 2).requires_grad_()
    joint = bm.posterior(blocks, joint=True)
    assert joint.kind == "joint" and joint.covariance.shape == (2, 1, 4, 4)
    marginal = bm.posterior(blocks.detach().reshape(8, 3))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(joint.mean.reshape(8, 1), marginal.mean, rtol=tol, atol=tol)
    torch.testing.assert_close(joint.variance.reshape(8, 1), marginal.variance, rtol=tol,
                               atol=tol)
    cov = joint.covariance.detach()
    torch.testing.assert_close(cov, cov.transpose(-1, -2), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(joint.mean.sum() + joint.covariance.sum(), blocks)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    pred = bm.predict(blocks.detach().reshape(8, 3))
    torch.testing.assert_close(pred.epistemic_variance, marginal.variance[:, 0].detach())
    torch.testing.assert_close(pred.aleatoric_variance,
                               (bm.gp.noise * bm.y_std**2).detach().expand(8))


def test_classification_checkpoint_without_a_network(tmp_path):
    X = torch.rand(40, 2)
    labels = (X[:, 0] > 0.5).long() + (X[:, 1] > 0.5).long()
    bm = bf.bayesify(None, "gp", task="classification", num_inducing=8)
    bm.fit((X, labels), epochs=3, progress=False, seed=0)
    posterior = bm.posterior(X[:5])
    assert posterior.kind == "diagonal" and posterior.mean.shape == (5, 3)
    bm.save(tmp_path / "gp.pt")
    other = bf.bayesify(None, "gp", task="classification", num_inducing=8)
    other.load(tmp_path / "gp.pt")
    assert torch.equal(other.predict(X, seed=1).probs, bm.predict(X, seed=1).probs)
    with pytest.raises(bf.CheckpointError, match="over 3 classes, but this model has 4"):
        bf.bayesify(None, "gp", task="classification", num_classes=4).load(tmp_path / "gp.pt")


def test_users_own_loop_trains_the_svgp_then_finish_fit_predicts():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    X = 3 * torch.eye(3, 4)[labels] + 0.5 * torch.randn(120, 4, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    bm = bf.bayesify(net, "gp", task="classification", n_data=120, num_inducing=16)
    optimizer = torch.optim.Adam(bm.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        bm.loss(X, labels).backward()
        optimizer.step()
    pred = bm.finish_fit().predict(X, seed=0)
    assert float((pred.labels == labels).float().mean()) > 0.9
    with pytest.raises(InputError, match=r"`y` must be < 3"):
        bm.loss(X, labels + 1)
    with pytest.raises(InputError, match=r"call \.fit\(train\) first"):
        bf.bayesify(None, "gp", task="classification").loss(X, labels)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    X, y = _data(20)
    exact = bf.bayesify(None, "gp", task="regression", num_restarts=1).double().fit((X, y))
    exact.save(tmp_path / "exact.pt")
    sparse = bf.bayesify(None, "gp", task="regression", inference="variational",
                         num_inducing=4).double()
    sparse.fit((X, y), epochs=2, progress=False, seed=0)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(bf.CheckpointError, match="does not match this model's structure"):
        sparse.load(tmp_path / "exact.pt")
    after = sparse.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kernel", ["rbf", "matern"])
@pytest.mark.parametrize("ard", [True, False])
@pytest.mark.parametrize("noise", [None, 0.01])
def test_closed_form_gradient_of_the_objective_matches_autograd(kernel, ard, noise):
    from bayesify.inference._gp_fit import exact_objective_and_grad

    g = torch.Generator().manual_seed(0)
    z = torch.rand(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    head = ExactGPHead(3, 2, kernel=kernel, ard=ard, noise=noise).double()
    with torch.no_grad():
        head.log_lengthscale.copy_(torch.randn(head.log_lengthscale.shape, generator=g))
        head.mean.copy_(torch.randn(2, generator=g))
        if noise is None:
            head.log_noise.copy_(torch.randn(2, generator=g) - 2)
    value = head.objective(z, y, warn=False)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [p for p in head.parameters() if p.requires_grad])
    mine, mine_grads = exact_objective_and_grad(
        head, z, y, head.log_lengthscale.detach(), head.log_noise.detach(), head.mean.detach())
    torch.testing.assert_close(mine, value.detach(), rtol=1e-12, atol=1e-12)
    assert sorted(mine_grads) == sorted(names)
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(mine_grads[name], grad, rtol=1e-9, atol=1e-10)


def test_float32_and_float64_fits_reach_the_same_hyperparameters():
    X, y = _data(60)
    fits = {dtype: bf.bayesify(None, "gp", task="regression", num_restarts=1).to(dtype)
            .fit((X.to(dtype), y.to(dtype)), progress=False) for dtype in (torch.float32,
                                                                       torch.float64)}
    head32, head64 = fits[torch.float32].gp, fits[torch.float64].gp
    # The fit runs in float64 either way; only the data's rounding to float32 differs.
    torch.testing.assert_close(head32.log_lengthscale.double(), head64.log_lengthscale,
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(head32.log_noise.double(), head64.log_noise, atol=1e-2, rtol=0)
