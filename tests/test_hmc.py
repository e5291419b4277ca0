"""The "hmc" method: NUTS over all weights of a small network.

Statistical assertions take their margins from the sampler's own error: Monte Carlo
standard errors from the effective sample size, the posterior's spread, or a count of
chains out of k that must show a property.

Short chains keep the tests fast, so the ConvergenceWarning is ignored module-wide: a
test about something else must not depend on whether a short chain passes a
convergence check on this machine. The warning is tested on purpose with
``pytest.warns`` (which records it anyway), and runs long enough to converge assert
``diagnostics()["problems"] == []``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pyro.ops.stats import effective_sample_size
from torch import nn

import bayesify as bf
from bayesify.data import gap_function, make_gap_regression
from bayesify.inference.hmc import (
    ConvergenceWarning,
    HMCModel,
    gaussian_log_prior,
    split_diagnostics,
)
from bayesify.posterior import SampledPosterior
from bayesify.report_settings import report_settings

pytestmark = pytest.mark.filterwarnings(
    "ignore::bayesify.inference.hmc_chains.ConvergenceWarning")


def _linear_data(n: int, sigma: float, dtype: torch.dtype, seed: int = 0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5], dtype=dtype) + 0.3
    y = y + sigma * torch.randn(n, generator=generator, dtype=dtype)
    return x.to(device), y.to(device)


def _exact_posterior(x, y, sigma, prior_std):
    """Mean [P] and covariance [P, P] of Bayesian linear regression, P = weights + bias."""
    phi = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1).double()
    precision = phi.T @ phi / sigma**2 + torch.eye(3, dtype=phi.dtype,
                                                   device=x.device) / prior_std**2
    cov = torch.linalg.inv(precision)
    return cov @ phi.T @ y.double() / sigma**2, cov


def _fit_linear(x, y, seed=0, **options):
    net = nn.Linear(x.shape[1], 1).to(x)
    bm = bf.bayesify(net, "hmc", task="regression", **options)
    return bm.fit((x, y), progress=False, seed=seed)


def test_linear_regression_matches_exact_posterior(dtype):
    sigma, prior_std = 0.5, 0.5
    x, y = _linear_data(20, sigma, dtype)
    bm = _fit_linear(x, y, noise=sigma, prior_std=prior_std, num_samples=400, warmup=200)
    draws = bm.samples.double()  # [1, S, 3]: weight (2), bias (1)
    mean, cov = _exact_posterior(x, y, sigma, prior_std)
    var = cov.diag()
    # Monte Carlo error of the sample mean is sd / sqrt(ESS); of the sample variance,
    # var * sqrt(2 / ESS') with ESS' the ESS of the squared deviations. 5 standard errors.
    ess_mean = effective_sample_size(draws)
    ess_var = effective_sample_size((draws - draws.mean(1, keepdim=True)) ** 2)
    hmc_mean, hmc_var = draws[0].mean(0), draws[0].var(0)
    assert torch.all((hmc_mean - mean).abs() <= 5 * var.sqrt() / ess_mean.sqrt())
    assert torch.all((hmc_var / var - 1).abs() <= 5 * (2 / ess_var).sqrt())
    # The prior matters here: the least-squares answer lies outside the tolerance.
    ols = torch.linalg.lstsq(torch.cat([x, torch.ones(20, 1, dtype=dtype)], 1).double(),
                             y.double()[:, None]).solution[:, 0]
    assert torch.any((ols - mean).abs() > 5 * var.sqrt() / ess_mean.sqrt())
    assert bm.samples.dtype == dtype
    diag = bm.diagnostics()
    assert diag["problems"] == [] and diag["r_hat_max"] < 1.1  # identifiable weights


def test_posterior_and_predictive_are_the_mixture_over_draws(dtype, device):
    sigma = 0.5
    x, y = _linear_data(20, sigma, dtype, device=device)
    bm = _fit_linear(x, y, noise=sigma, num_samples=50, warmup=50)
    posterior = bm.posterior(x)
    assert isinstance(posterior, SampledPosterior) and posterior.samples.shape == (50, 20, 1)
    pred = bm.predict(x)
    assert isinstance(pred, bf.MixturePredictive) and pred.num_components == 50
    assert pred.mean.dtype == dtype and pred.mean.device.type == device.type
    weights, bias = bm.samples[0, :, :2], bm.samples[0, :, 2]
    torch.testing.assert_close(pred.means, weights @ x.T + bias[:, None])
    torch.testing.assert_close(pred.aleatoric_variance, torch.full_like(pred.mean, sigma**2))
    torch.testing.assert_close(bm(x), pred.mean)
    thinned = bm.predict(x, num_samples=10)
    assert thinned.num_components == 10
    torch.testing.assert_close(thinned.means[0], pred.means[0])
    torch.testing.assert_close(thinned.means[-1], pred.means[-1])
    for tensor in [*bm.parameters(), *bm.buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == dtype and tensor.device.type == device.type


def test_learned_noise_is_sampled_and_recovers_the_truth():
    x, y = _linear_data(200, 0.5, torch.float64)
    bm = _fit_linear(x, y, num_samples=150, warmup=150)
    log_std = bm.samples[0, :, -1]
    assert bm.samples.shape[-1] == 4  # weights, bias, log noise std
    noise = log_std.exp()
    # The truth lies within 4 posterior standard deviations (plus 5 Monte Carlo
    # standard errors of the posterior mean).
    ess = float(effective_sample_size(noise[None, :, None]))
    assert abs(float(noise.mean()) - 0.5) <= float(noise.std()) * (4 + 5 / ess**0.5)
    assert float(log_std.std()) > 0.01
    raw = bm.posterior(x[:5]).samples  # means, then each draw's log noise std
    assert raw.shape == (150, 5, 2)
    torch.testing.assert_close(raw[..., 1], log_std[:, None].expand(-1, 5))
    pred = bm.predict(x[:5])
    torch.testing.assert_close(pred.variances, (2 * log_std).exp()[:, None].expand(-1, 5))
    assert "log_noise_std" in bm.diagnostics()["parameters"]


def _gap_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def test_gap_regression_has_more_epistemic_variance_in_the_gap():
    # Chains are independent replicates of the sampler: at least 2 of 3 must show a
    # gap whose epistemic variance is 3x that on the data (chains of this length give
    # 4.5x to 21x, their mixture 13x to 26x), so one chain's luck decides nothing.
    data = make_gap_regression(n_train=100)
    chains, draws = 3, 40
    bm = bf.bayesify(_gap_net(), "hmc", task="regression", num_samples=draws, warmup=60,
                     max_tree_depth=4, num_chains=chains)
    bm.fit((data.X_train, data.y_train), progress=False, seed=0)
    grid = data.X_grid[:, 0].abs()
    on_data = (grid >= 0.5) & (grid <= 1.5)
    outputs = bm.posterior(data.X_grid).samples[..., 0].reshape(chains, draws, -1)
    variance = outputs.var(1)  # [chains, grid] epistemic variance of each chain
    ratios = variance[:, data.gap_mask].mean(1) / variance[:, on_data].mean(1)
    assert int((ratios > 3).sum()) >= 2, ratios
    pred = bm.predict(data.X_grid)
    assert pred.epistemic_variance[data.gap_mask].mean() > 3 * pred.epistemic_variance[
        on_data].mean()
    assert pred.variance[data.gap_mask].mean() > pred.variance[on_data].mean()
    # The noise std of the data runs from 0.05 to 0.35: the fit must explain the data.
    assert float(bm.predict(data.X_test).log_prob(data.y_test).mean()) > -0.3


def test_classification_averages_softmax_over_draws():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2))
    bm = bf.bayesify(net, "hmc", task="classification", num_samples=60, warmup=60,
                     max_tree_depth=4)
    bm.fit((x, y), progress=False, seed=0)
    pred = bm.predict(x)
    assert isinstance(pred, bf.CategoricalPredictive)
    assert pred.sample_probs.shape == (60, 60, 2)
    # 59 or 60 of 60 over 8 seeds; the outputs' ESS is 46-63 (the checks need 10).
    assert float((pred.labels == y).float().mean()) >= 0.95
    assert bm.diagnostics()["problems"] == []
    logits = torch.stack([
        torch.func.functional_call(net, bm._flat.unflatten(w), (x,)) for w in bm.samples[0]
    ])
    torch.testing.assert_close(pred.probs, logits.softmax(-1).mean(0))
    torch.testing.assert_close(bm(x).exp(), pred.probs)
    # Far from the data, along the decision boundary, the draws disagree more.
    far = torch.tensor([[6.0, -6.0], [-6.0, 6.0]])
    assert bm.predict(far).epistemic().min() > pred.epistemic().mean()


def test_seed_repeats_and_the_network_keeps_its_weights():
    x, y = _linear_data(20, 0.5, torch.float32)
    net = nn.Linear(2, 1)
    before = [p.detach().clone() for p in net.parameters()]
    bm = bf.bayesify(net, "hmc", task="regression", noise=0.5, num_samples=30, warmup=50)
    first = bm.fit((x, y), progress=False, seed=3).samples.clone()
    second = bm.fit((x, y), progress=False, seed=3).samples.clone()
    third = bm.fit((x, y), progress=False, seed=4).samples.clone()
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    seeded = bf.bayesify(nn.Linear(2, 1), "hmc", task="regression", noise=0.5,
                         num_samples=30, warmup=50, seed=3)
    seeded.model.load_state_dict(net.state_dict())
    assert torch.equal(seeded.fit((x, y), progress=False).samples, first)


def test_two_chains_diagnostics_and_checkpoint(tmp_path):
    x, y = _linear_data(20, 0.5, torch.float64)
    bm = _fit_linear(x, y, noise=0.5, num_samples=100, warmup=100, num_chains=2)
    diag = bm.diagnostics()
    assert bm.samples.shape == (2, 100, 3) and bm.log_density.shape == (2, 100)
    assert set(diag["parameters"]) == {"weight", "bias"}
    assert diag["parameters"]["weight"]["r_hat"].shape == (1, 2)
    assert diag["parameters"]["bias"]["ess"].shape == (1,)
    assert diag["r_hat_max"] < 1.1 and diag["ess_min"] > 20
    assert diag["outputs"]["r_hat_median"] < 1.1 and diag["problems"] == []
    assert len(diag["divergences"]) == len(diag["step_size"]) == 2
    r_hat, ess = split_diagnostics(bm.samples)
    assert diag["ess_min"] == pytest.approx(float(ess.min()))
    path = tmp_path / "hmc.pt"
    bm.save(str(path))
    # A fresh model with other sampler settings: the buffers take the file's sizes.
    fresh = bf.bayesify(nn.Linear(2, 1).double(), "hmc", task="regression", noise=0.5,
                        num_samples=7)
    fresh.load(str(path))
    assert torch.equal(fresh.predict(x).means, bm.predict(x).means)
    assert fresh.diagnostics()["r_hat_max"] == pytest.approx(diag["r_hat_max"])
    assert fresh.samples.dtype == torch.float64


def test_split_rhat_flags_a_chain_that_drifts():
    steady = torch.randn(1, 400, 1, dtype=torch.float64)
    drifting = steady + torch.linspace(0, 5, 400, dtype=torch.float64)[None, :, None]
    assert float(split_diagnostics(steady)[0]) < 1.05
    assert float(split_diagnostics(drifting)[0]) > 1.5


def test_unconverged_draws_warn_after_fitting_when_predicting_and_after_loading(tmp_path):
    x, y = _linear_data(20, 0.5, torch.float32)
    bm = bf.bayesify(nn.Linear(2, 1), "hmc", task="regression", noise=0.5, num_samples=3,
                     warmup=3)
    with pytest.warns(ConvergenceWarning, match=r"after fitting.*3 draws per chain are too "
                                                r"few.*raise `warmup` and `num_samples`"):
        bm.fit((x, y), progress=False, seed=0)
    with pytest.warns(ConvergenceWarning, match=r"\(predicting\): 3 draws per chain"):
        bm.predict(x)
    problems = bm.diagnostics()["problems"]
    assert problems[0] == "3 draws per chain are too few to check convergence"
    bm.save(tmp_path / "short.pt")
    fresh = bf.bayesify(nn.Linear(2, 1), "hmc", task="regression", noise=0.5)
    fresh.load(tmp_path / "short.pt")
    with pytest.warns(ConvergenceWarning, match="too few to check convergence"):
        fresh.posterior(x)


def test_a_stuck_or_diverging_chain_is_named():
    from bayesify.inference.hmc_chains import convergence_problems

    good = torch.ones(10)
    moving = torch.randn(2, 50, dtype=torch.float64)
    assert convergence_problems(good, 50 * good, moving, torch.zeros(2)) == []
    stuck = moving.clone()
    stuck[1] = 3.0
    assert "a chain never moved" in convergence_problems(good, good, stuck, torch.zeros(2))[0]
    problems = convergence_problems(1.5 * good, 4 * good, moving, torch.tensor([6, 0]))
    assert len(problems) == 3
    assert "disagree on the outputs" in problems[0] and "split-R-hat 1.50 (> 1.1)" in problems[0]
    assert "a median of 4.0 effective draws (< 10) out of 100" in problems[1]
    assert problems[2] == "6 of 100 transitions diverged"


def test_batchnorm_network_runs_in_eval_mode_with_its_own_statistics(dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=dtype)
    y = torch.sin(x.sum(1))
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    net = net.to(dtype)
    with torch.no_grad():  # give the statistics values a fresh layer does not have
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    stats = [b.clone() for b in net[1].buffers()]
    bm = bf.bayesify(net, "hmc", task="regression", num_samples=30, warmup=50,
                     max_tree_depth=3)
    assert net.training  # a freshly built network, in train mode
    bm.fit((x, y), progress=False, seed=0)
    pred = bm.predict(x[:1])  # one row: BatchNorm must be in eval mode
    draws = bm.posterior(x).samples
    assert torch.isfinite(pred.mean).all() and torch.isfinite(draws).all()
    assert all(torch.equal(a, b) for a, b in zip(stats, net[1].buffers(), strict=True))
    assert net.training  # the user's flags are restored
    net.eval()
    weights = bm.samples[0, 0, :bm._flat.numel]
    expected = torch.func.functional_call(net, bm._flat.unflatten(weights), (x,))
    torch.testing.assert_close(draws[0, :, :1], expected)


def test_loss_is_the_negative_log_joint_per_datum(dtype):
    x, y = _linear_data(10, 0.5, dtype)
    net = nn.Linear(2, 1).to(dtype)
    bm = bf.bayesify(net, "hmc", task="regression", noise=0.5, prior_std=2.0, n_data=40)
    nll = -torch.distributions.Normal(net(x)[:, 0], 0.5).log_prob(y).mean()
    theta = torch.cat([net.weight.reshape(-1), net.bias])
    log_prior = torch.distributions.Normal(0.0, 2.0).log_prob(theta.double()).sum()
    expected = nll.double() - log_prior / 40
    torch.testing.assert_close(bm.loss(x, y).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bm.loss(x, y[:, None]), bm.loss(x, y))
    torch.testing.assert_close(gaussian_log_prior(theta.double(), 2.0), log_prior)


def test_classification_loss_uses_cross_entropy():
    x = torch.randn(8, 3)
    y = torch.randint(0, 2, (8,))
    net = nn.Linear(3, 2)
    bm = bf.bayesify(net, "hmc", task="classification", prior_std=1.0, n_data=8)
    theta = torch.cat([net.weight.reshape(-1), net.bias])
    expected = F.cross_entropy(net(x), y) - gaussian_log_prior(theta, 1.0) / 8
    torch.testing.assert_close(bm.loss(x, y), expected)


class _ScalarGate(nn.Module):
    """A module vmap cannot batch (it reads a tensor into Python)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x):
        out = self.linear(x)
        return out if bool((out.detach().abs() < 1e9).all()) else out * 0


def test_models_vmap_cannot_batch_fall_back_to_a_loop():
    x, y = _linear_data(15, 0.5, torch.float32)
    bm = bf.bayesify(_ScalarGate(), "hmc", task="regression", noise=0.5, num_samples=30,
                     warmup=50)
    bm.fit((x, y), progress=False, seed=0)
    pred = bm.predict(x)
    w = bm.samples[0]
    torch.testing.assert_close(pred.means, w[:, :2] @ x.T + w[:, 2:])


def test_heteroscedastic_noise_comes_from_the_network():
    x, y = _linear_data(30, 0.5, torch.float64)
    net = nn.Linear(2, 2).double()
    bm = bf.bayesify(net, "hmc", task="regression", noise="heteroscedastic",
                     num_samples=30, warmup=60, max_tree_depth=5)
    bm.fit((x, y), progress=False, seed=0)
    w = bm.samples[0]
    out = torch.stack([torch.func.functional_call(net, bm._flat.unflatten(t), (x,)) for t in w])
    pred = bm.predict(x)
    torch.testing.assert_close(pred.means, out[..., 0])
    torch.testing.assert_close(pred.variances, F.softplus(out[..., 1]) + bm.noise.min_variance)


def test_bad_inputs_are_refused():
    x, y = _linear_data(10, 0.5, torch.float32)
    net = nn.Linear(2, 1)
    with pytest.raises(bf.InputError, match="`num_samples` must be an int >= 1"):
        bf.bayesify(net, "hmc", task="regression", num_samples=0)
    with pytest.raises(bf.InputError, match="`warmup` must be an int >= 0"):
        bf.bayesify(net, "hmc", task="regression", warmup=-1)
    with pytest.raises(bf.InputError, match="`num_chains` must be an int >= 1"):
        bf.bayesify(net, "hmc", task="regression", num_chains=0)
    with pytest.raises(bf.InputError, match="`prior_std` must be > 0"):
        bf.bayesify(net, "hmc", task="regression", prior_std=0.0)
    big = nn.Linear(100, 60)
    with pytest.raises(bf.InputError, match="6,060 trainable parameters.*`max_parameters`"):
        bf.bayesify(big, "hmc", task="regression")
    assert bf.bayesify(big, "hmc", task="regression", max_parameters=7000) is not None
    bm = bf.bayesify(net, "hmc", task="regression", noise=0.5, num_samples=20, warmup=30)
    with pytest.raises(bf.NotFittedError, match=r"call \.fit\(train\) before \.predict"):
        bm.predict(x)
    with pytest.raises(bf.NotFittedError, match=r"before \.diagnostics"):
        bm.diagnostics()
    with pytest.raises(bf.InputError, match=r"\.finish_fit\(\) does not apply"):
        bm.finish_fit()
    assert not bm.is_fitted
    bad_x = x.clone()
    bad_x[3, 1] = float("nan")
    with pytest.raises(bf.InputError, match="`X` contains 1 NaN"):
        bm.fit((bad_x, y), progress=False)
    bad_y = y.clone()
    bad_y[0] = float("inf")
    with pytest.raises(bf.InputError, match="`y` contains 1 NaN or infinite"):
        bm.fit((x, bad_y), progress=False)
    with pytest.raises(bf.InputError, match=r"`y` must have shape \[N\] or \[N, 1\]"):
        bm.fit((x, torch.randn(10, 3)), progress=False)
    with pytest.raises(bf.InputError, match="`epochs` does not apply to method 'hmc', which "
                                            "is fit by MCMC.*progress, seed"):
        bm.fit((x, y), epochs=3)
    with pytest.raises(bf.InputError, match="`lr` does not apply to method 'hmc'"):
        bm.fit((x, y), lr=0.1)
    bm.fit((x, y), progress=False, seed=0)
    with pytest.raises(bf.InputError, match="`num_samples` must be at most the 20 stored"):
        bm.predict(x, num_samples=21)
    with pytest.raises(bf.InputError, match="`model` is None"):
        HMCModel(None, "regression")


def test_report_settings_are_valid_options():
    settings = report_settings("hmc", "regression")
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 1))  # the report's regression MLP on diabetes
    bm = bf.bayesify(net, "hmc", task="regression", **settings["options"])
    assert bm.max_tree_depth <= 6 and bm.num_samples <= 200
    # The report passes seed and progress itself; nothing else applies to MCMC.
    assert not set(settings["fit"])


@pytest.mark.slow
def test_gap_regression_intervals_cover_and_chains_agree_on_the_data():
    data = make_gap_regression(n_train=200)
    bm = bf.bayesify(_gap_net(), "hmc", task="regression", num_samples=200, warmup=200,
                     num_chains=2, max_tree_depth=6)
    bm.fit((data.X_train, data.y_train), progress=False, seed=0)
    pred = bm.predict(data.X_test)
    lo, hi = pred.interval(0.9)
    coverage = float(((data.y_test >= lo) & (data.y_test <= hi)).float().mean())
    # 400 test points: the binomial standard error of a 90% coverage is 0.015; the
    # band is 5 of them below (the noise is heteroscedastic, the model's is not) and
    # 4.5 above.
    assert 0.82 <= coverage <= 0.97
    truth = gap_function(data.X_test[:, 0])
    assert float((pred.mean - truth).square().mean().sqrt()) < 0.1
    # Weights are not identifiable, but the functions the chains reach on the data agree.
    assert bm.diagnostics()["outputs"]["r_hat_median"] < 1.1


def _small_cnn(dtype):
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3)).to(dtype)


@pytest.mark.parametrize("frozen_by", ["subset", "requires_grad"])
def test_last_layer_hmc_caches_backbone_features_with_the_same_draws(dtype, frozen_by):
    import time

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 8, 8, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (60,), generator=generator)
    options = {"num_samples": 15, "warmup": 15, "max_tree_depth": 4}
    if frozen_by == "subset":
        options["subset"] = "last_layer"
    fits, seconds = {}, {}
    for cache in (True, False):
        net = _small_cnn(dtype)
        if frozen_by == "requires_grad":
            for p in net[:-1].parameters():
                p.requires_grad_(False)
        before = [p.detach().clone() for p in net.parameters()]
        bm = bf.bayesify(net, "hmc", task="classification", cache_features=cache, **options)
        start = time.perf_counter()
        fits[cache] = bm.fit((x, y), progress=False, seed=0)
        seconds[cache] = time.perf_counter() - start
        assert bm.head_name == "6"
        assert bm.samples.shape[-1] == 16 * 3 + 3  # only the head is sampled
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    print(f"last-layer HMC fit ({frozen_by}, {dtype}): cached {seconds[True]:.2f} s, "
          f"uncached {seconds[False]:.2f} s")
    cached, uncached = fits[True], fits[False]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(cached.samples, uncached.samples, **tol)
    torch.testing.assert_close(cached.log_density, uncached.log_density, **tol)
    x_test = torch.randn(20, 1, 8, 8, generator=generator, dtype=dtype)
    start = time.perf_counter()
    probs = cached.predict(x_test).probs
    middle = time.perf_counter()
    reference = uncached.predict(x_test).probs
    print(f"predict: cached {middle - start:.3f} s, uncached {time.perf_counter() - middle:.3f} s")
    torch.testing.assert_close(probs, reference, **tol)


def test_last_layer_cache_is_skipped_when_the_output_is_not_the_heads():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(2, 4), nn.Linear(4, 1)

        def forward(self, x):
            return 2 * self.head(torch.tanh(self.body(x)))

    x, y = _linear_data(30, 0.3, torch.float64)
    bm = bf.bayesify(Scaled().double(), "hmc", task="regression", subset="last_layer",
                     num_samples=10, warmup=10, noise=0.3)
    assert bm._head_features(x) is None  # the model scales its head's output
    bm.fit((x, y), progress=False, seed=0)
    assert bm.samples.shape[-1] == 5
    weights = bm._split_theta(bm._draws(None))[0]
    manual = torch.stack([2 * F.linear(torch.tanh(bm.model.body(x)), w[:4].view(1, 4), w[4:])
                          for w in weights])
    torch.testing.assert_close(bm._sample_outputs(weights, x), manual)


def test_subset_is_checked():
    with pytest.raises(bf.InputError, match="`subset` must be one of"):
        bf.bayesify(nn.Linear(2, 1), "hmc", task="regression", subset="first_layer")
