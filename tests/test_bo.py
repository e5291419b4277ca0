"""Bayesian optimization: the BoTorch bridge for every regression method, the loop, problems."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bayesify as bf
from bayesify.bo import (
    BayesianOptimization,
    as_botorch_model,
    fit_surrogate,
    get_problem,
    random_search,
    regret_summary,
)
from bayesify.bo.acquisition import propose
from bayesify.bo.bridge import EnsemblePosterior, GPyTorchPosterior  # botorch's, imported quietly
from bayesify.errors import BayesifyWarning, InputError
from bayesify.likelihoods import CategoricalLikelihood, GaussianLikelihood

pytestmark = [
    # The tiny HMC runs below do not converge, and say so on every prediction.
    pytest.mark.filterwarnings("ignore:HMC draws fail convergence checks"),
    # With 2 restarts from 16 raw samples, BoTorch's L-BFGS-B sometimes stops on a line
    # search and retries from new starts, saying so.
    pytest.mark.filterwarnings("ignore:Optimization failed in `gen_candidates_scipy`"),
]

# Small but real settings so every method gets through a step in about a second.
FAST_FIT = {"epochs": 30}
FAST_OPTIONS = {"hmc": {"num_samples": 8, "warmup": 8, "max_tree_depth": 3}}
FAST_ACQ = {"num_restarts": 2, "raw_samples": 16, "num_candidates": 64}


def _branin_data(n: int = 10, seed: int = 0):
    problem = get_problem("branin")
    unit = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = -problem(problem.bounds[0] + unit * (problem.bounds[1] - problem.bounds[0]))
    return unit, (y - y.mean()) / y.std()


@pytest.fixture(scope="module")
def surrogates() -> dict[str, bf.BayesianModel]:
    X, y = _branin_data()
    models = {}
    for name in bf.available_methods("regression"):
        fit = {} if name in ("gp", "hmc") else FAST_FIT
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BayesifyWarning)
            try:
                bm = fit_surrogate(name, X, y, seed=0, options=FAST_OPTIONS.get(name),
                                   fit_options=fit)
            except bf.UnsupportedModelError:
                continue  # needs another kind of network (LoRA adapters), not an MLP
        if isinstance(bm.likelihood, GaussianLikelihood):  # not BayesCap's GGD
            models[name] = bm
    assert {"gp", "vbll", "mc_dropout", "deterministic"} <= set(models)
    return models


def test_gp_bridge_matches_predict_and_has_a_psd_joint_covariance():
    X, y = _branin_data(12)
    bm = fit_surrogate("gp", X, y, seed=0)
    model = as_botorch_model(bm)
    Xq = torch.rand(3, 5, 2, dtype=torch.float64)
    latent = model.posterior(Xq)
    noisy = model.posterior(Xq, observation_noise=True)
    assert isinstance(latent, GPyTorchPosterior)
    pred = bm.predict(Xq.reshape(15, 2))
    torch.testing.assert_close(latent.mean.reshape(15), pred.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(latent.variance.reshape(15), pred.epistemic_variance,
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(noisy.variance.reshape(15), pred.variance, atol=1e-10, rtol=0)
    cov = latent.distribution.covariance_matrix.detach()  # [3, 5, 5]
    torch.testing.assert_close(cov, cov.transpose(-1, -2), atol=0, rtol=0)
    assert float(torch.linalg.eigvalsh(cov).min()) > -1e-10
    # Off-diagonal terms are the GP's, not zero: nearby points are correlated.
    assert float(cov[0].abs().sum() - cov[0].diagonal().abs().sum()) > 0


def test_bridge_mean_and_variance_equal_each_methods_predict(surrogates):
    Xq = torch.rand(4, 1, 2, dtype=torch.float64)
    for name, bm in surrogates.items():
        model = as_botorch_model(bm, seed=3)
        posterior = model.posterior(Xq)
        pred = bm.predict(Xq.reshape(4, 2), seed=3)
        if isinstance(pred, bf.MixturePredictive):
            assert isinstance(posterior, EnsemblePosterior), name
            torch.testing.assert_close(posterior.mean.reshape(4), pred.mean, atol=1e-8,
                                       rtol=1e-6, msg=name)
            # The ensemble holds the component means; its spread is the epistemic part.
            torch.testing.assert_close(posterior.values[:, :, 0, 0].T, pred.means,
                                       atol=1e-8, rtol=1e-6, msg=name)
        else:
            assert isinstance(posterior, GPyTorchPosterior), name
            torch.testing.assert_close(posterior.mean.reshape(4), pred.mean, atol=1e-8,
                                       rtol=1e-6, msg=name)
            torch.testing.assert_close(posterior.variance.reshape(4), pred.epistemic_variance,
                                       atol=1e-8, rtol=1e-6, msg=name)


def test_ensemble_members_are_fixed_within_a_step_and_move_on_resample(surrogates):
    sampling = {n: bm for n, bm in surrogates.items()
                if isinstance(bm.predict(torch.rand(2, 2, dtype=torch.float64)),
                              bf.MixturePredictive)}
    for name, bm in sampling.items():
        model = as_botorch_model(bm, seed=5)
        X = torch.rand(6, 1, 2, dtype=torch.float64)
        first, second = model.posterior(X).values, model.posterior(X).values
        torch.testing.assert_close(first, second, atol=0, rtol=0, msg=name)
        model.resample()
        x = X[:, 0]
        # HMC's and an ensemble's members are stored networks, not fresh samples.
        drawn = not torch.equal(bm.posterior(x, seed=1).samples, bm.posterior(x, seed=2).samples)
        assert torch.equal(first, model.posterior(X).values) != drawn, name


@pytest.mark.parametrize("acquisition", ["logei", "ucb", "ts"])
@pytest.mark.parametrize("q", [1, 2])
def test_every_acquisition_works_with_every_surrogate(surrogates, acquisition, q):
    X, y = _branin_data()
    for name, bm in surrogates.items():
        # Every built-in surrogate is differentiable in x: no fallback warning (an error
        # under the suite's warning filter) is expected.
        x = propose(bm, acquisition, float(y.max()), q=q, dim=2, seed=1, **FAST_ACQ)
        assert x.shape == (q, 2), name
        assert bool(((x >= 0) & (x <= 1)).all()), name


def test_vbll_bridge_has_the_joint_covariance_and_the_likelihoods_noise(surrogates):
    bm = surrogates["vbll"]
    model = as_botorch_model(bm)
    Xq = torch.rand(3, 4, 2, dtype=torch.float64)
    latent, noisy = model.posterior(Xq), model.posterior(Xq, observation_noise=True)
    cov = latent.distribution.covariance_matrix.detach()  # [3, 4, 4]
    torch.testing.assert_close(cov, bm.posterior(Xq, joint=True).covariance[:, 0].detach())
    assert float(cov[0].abs().sum() - cov[0].diagonal().abs().sum()) > 0
    pred = bm.predict(Xq.reshape(12, 2))
    torch.testing.assert_close(noisy.variance.reshape(12), pred.variance, atol=1e-10,
                               rtol=1e-8)


class _Quadratic(bf.BayesianModel):
    """A third-party method with the public contract only: f(x) = -|x - c|², a Gaussian
    posterior of fixed width, fixed noise."""

    fitted_at_init = True

    def __init__(self, model, task, *, n_data=None):
        super().__init__(model, task, n_data=n_data)
        self.center = torch.nn.Parameter(torch.full((2,), 0.3, dtype=torch.float64))
        self.likelihood = GaussianLikelihood(lambda f: (f, torch.full_like(f, 0.01)))

    def forward(self, x):
        return -(x - self.center).pow(2).sum(-1)

    def loss(self, x, y):
        return (self(x) - y).pow(2).mean()

    def _posterior(self, x, num_samples, generator):
        mean = self(x)[..., None]
        return bf.GaussianPosterior(mean, torch.full_like(mean, 0.04), kind="diagonal")


def test_a_custom_method_with_only_the_public_contract_drives_the_loop():
    bm = bf.bayesify(None, _Quadratic, task="regression")
    x = propose(bm, "logei", 0.0, q=2, dim=2, seed=0, **FAST_ACQ)
    assert x.shape == (2, 2)
    torch.testing.assert_close(x[0], torch.full((2,), 0.3, dtype=torch.float64), atol=0.05,
                               rtol=0)
    posterior = as_botorch_model(bm).posterior(torch.rand(5, 3, 2, dtype=torch.float64),
                                               observation_noise=True)
    torch.testing.assert_close(posterior.variance, torch.full((5, 3, 1), 0.05,
                                                              dtype=torch.float64))
    bm.likelihood = CategoricalLikelihood()
    with pytest.raises(InputError, match="must have a Gaussian likelihood .* has "
                                         "CategoricalLikelihood"):
        as_botorch_model(bm)


def test_bridge_is_differentiable_in_x(surrogates):
    for name, bm in surrogates.items():
        X = torch.rand(3, 2, 2, dtype=torch.float64, requires_grad=True)
        posterior = as_botorch_model(bm).posterior(X)
        (grad,) = torch.autograd.grad(posterior.mean.sum(), X)
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, name


def test_loop_on_branin_improves_on_random_search_and_keeps_a_history():
    problem = get_problem("branin")
    bo = BayesianOptimization(problem, problem.bounds, n_init=5, seed=0, progress=False)
    result = bo.run(10)
    history = result.history
    assert history.X.shape == (15, 2) and history.y.shape == (15,)
    assert history.step.tolist() == [0] * 5 + list(range(1, 11))
    assert len(history.times) == 11
    assert bool((history.best[1:] <= history.best[:-1]).all())
    assert result.best_y == float(history.y.min())
    torch.testing.assert_close(problem(result.best_x[None])[0], torch.tensor(result.best_y,
                                                                             dtype=torch.float64))
    gp_regret, _ = regret_summary([history.best], problem.optimal_value)
    random = [random_search(problem, 15, seed) for seed in range(5)]
    random_regret, _ = regret_summary(random, problem.optimal_value)
    assert gp_regret < random_regret - 0.5


def test_ask_tell_reproduces_run_and_maximize_mirrors_minimize():
    problem = get_problem("branin")
    run = BayesianOptimization(problem, problem.bounds, n_init=4, seed=2,
                               progress=False).run(2)
    manual = BayesianOptimization(None, problem.bounds, n_init=4, seed=2)
    for _ in range(3):
        x = manual.ask()
        manual.tell(x, problem(x))
    torch.testing.assert_close(manual.history.X, run.history.X)
    flipped = BayesianOptimization(lambda x: -problem(x), problem.bounds, n_init=4, seed=2,
                                   maximize=True, progress=False).run(2)
    torch.testing.assert_close(flipped.history.X, run.history.X)
    assert flipped.best_y == pytest.approx(-run.best_y)


def test_failures_are_recorded_and_the_loop_continues():
    problem = get_problem("branin")
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulator crashed")
        if calls["n"] == 3:
            return torch.full((x.shape[0],), math.nan, dtype=x.dtype)
        return problem(x)

    bo = BayesianOptimization(flaky, problem.bounds, n_init=3, seed=0, progress=False)
    with pytest.warns(BayesifyWarning) as record:
        result = bo.run(4)
    messages = " ".join(str(w.message) for w in record)
    assert "raised RuntimeError: simulator crashed" in messages
    assert "recorded as a failure" in messages
    assert result.history.failed.tolist() == [False] * 3 + [True, True, False, False]
    assert bool(torch.isnan(result.history.y[result.history.failed]).all())
    assert math.isfinite(result.best_y)


def test_batches_and_custom_surrogate_factory():
    problem = get_problem("branin")

    def factory(X, y):
        return bf.bayesify(None, "gp", task="regression", kernel="matern",
                           num_restarts=1).double()

    bo = BayesianOptimization(problem, problem.bounds, surrogate=factory,
                              acquisition="ucb", n_init=4, batch_size=3, seed=0,
                              acquisition_options=FAST_ACQ, progress=False)
    result = bo.run(2)
    assert result.history.X.shape == (10, 2)
    assert bo.model.kernel == "matern"


def test_problems_by_name():
    branin = get_problem("branin")
    minimizer = torch.tensor([[math.pi, 2.275]], dtype=torch.float64)
    assert float(branin(minimizer)[0]) == pytest.approx(branin.optimal_value, abs=1e-5)
    assert get_problem("hartmann6").bounds.shape == (2, 6)
    ackley = get_problem("ackley", dim=3)
    assert float(ackley(torch.zeros(1, 3, dtype=torch.float64))[0]) == pytest.approx(0.0,
                                                                                     abs=1e-9)
    with pytest.raises(InputError, match="`name` must be one of"):
        get_problem("rosenbrock")


def test_bad_inputs():
    problem = get_problem("branin")
    bounds = problem.bounds
    with pytest.raises(InputError, match="`bounds` must have lower < upper"):
        BayesianOptimization(problem, torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(InputError, match=r"`bounds` must have shape \[2, d\]"):
        BayesianOptimization(problem, torch.zeros(3, 2))
    with pytest.raises(InputError, match="`n_init` must be an int >= 1"):
        BayesianOptimization(problem, bounds, n_init=0)
    with pytest.raises(InputError, match="`acquisition` must be one of"):
        BayesianOptimization(problem, bounds, acquisition="pi")
    with pytest.raises(InputError, match="`surrogate` must be one of"):
        BayesianOptimization(problem, bounds, surrogate="forest")
    with pytest.raises(InputError, match="`acquisition_options` has unknown"):
        BayesianOptimization(problem, bounds, acquisition_options={"eta": 1})
    bo = BayesianOptimization(lambda x: torch.zeros(x.shape[0], 2), bounds, n_init=2,
                              progress=False)
    with pytest.raises(InputError, match="`objective` must return one value per point"):
        bo.run(1)
    with pytest.raises(InputError, match="`x` and `y` must have the same length"):
        bo.tell(torch.rand(3, 2), torch.rand(2))
    with pytest.raises(InputError, match=r"`x` must have shape \[n, 2\]"):
        bo.tell(torch.rand(3, 4), torch.rand(3))
    with pytest.raises(InputError, match="must be a regression model"):
        as_botorch_model(bf.bayesify(torch.nn.Linear(2, 3), "deterministic",
                                     task="classification"))
    with pytest.raises(bf.NotFittedError, match="before as_botorch_model"):
        as_botorch_model(bf.bayesify(None, "gp", task="regression"))


def test_cli_prints_the_regret_table(capsys):
    from bayesify.bo.cli import main

    code = main(["--problem", "branin", "--surrogate", "gp", "--iterations", "1",
                 "--seeds", "1", "--n-init", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "gp" in out and "random search" in out and "log10 regret" in out
    assert main(["--surrogate", "forest", "--iterations", "1", "--seeds", "1",
                 "--no-progress"]) == 2
