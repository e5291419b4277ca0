"""Surrogates and acquisition for the BO loop: every piece is BoTorch's.

``fit_surrogate`` trains a bayesify model on unit-cube inputs and standardized
scores; ``propose`` turns it into candidates with BoTorch's acquisition functions and
``optimize_acqf`` (or ``MaxPosteriorSampling`` for Thompson sampling).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from botorch.acquisition import (
    LogExpectedImprovement,
    UpperConfidenceBound,
    qLogExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.acquisition import AcquisitionFunction
from botorch.generation.sampling import MaxPosteriorSampling
from botorch.optim import optimize_acqf, optimize_acqf_discrete
from gpytorch.utils.warnings import NumericalWarning
from torch import nn

from bayesify.bo.bridge import as_botorch_model, is_gaussian
from bayesify.core import BayesianModel, bayesify
from bayesify.errors import BayesifyWarning, InputError
from bayesify.fitting import CLOSED_FORM

__all__ = [
    "ACQUISITIONS",
    "default_network",
    "fit_surrogate",
    "make_acquisition",
    "propose",
]

ACQUISITIONS = ("logei", "ucb", "ts")

#: Full-batch training of the default network surrogates (BoTorch's VBLL surrogate
#: recipe: AdamW 1e-3 with gradient clipping 1.0; more steps since N is tiny).
NETWORK_FIT = {"epochs": 1000, "lr": 1e-3, "grad_clip": 1.0}
#: Method options for a freshly initialized network (nothing pretrained to freeze).
NETWORK_OPTIONS: dict[str, dict[str, Any]] = {
    "vbll": {"freeze_backbone": False},
    "hmc": {"num_samples": 64, "warmup": 64, "max_tree_depth": 6},
}
#: (width, depth) of the default network per method; NUTS needs a small one.
NETWORK_SHAPE: dict[str, tuple[int, int]] = {"hmc": (32, 2)}
#: The GP surrogate fits its hyperparameters from the prior modes, as BoTorch does
#: (further starts only if that fit fails).
GP_OPTIONS: dict[str, Any] = {"num_restarts": 1}

Surrogate = str | Callable[[torch.Tensor, torch.Tensor], BayesianModel]


def default_network(dim: int, width: int = 64, depth: int = 3) -> nn.Sequential:
    """The default network surrogate: ``depth`` hidden ELU layers of ``width`` units."""
    layers: list[nn.Module] = []
    size = dim
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ELU()]
        size = width
    layers.append(nn.Linear(size, 1))
    return nn.Sequential(*layers)


def fit_surrogate(surrogate: Surrogate, X: torch.Tensor, y: torch.Tensor, *, seed: int,
                  options: dict[str, Any] | None = None,
                  fit_options: dict[str, Any] | None = None) -> BayesianModel:
    """Train a surrogate on unit-cube inputs X [n, d] and standardized scores y [n].

    Args:
        surrogate: a regression method name, or a factory ``f(X, y) -> BayesianModel``
            (fitted here with ``fit_options`` if it comes back unfitted).
        seed: seeds the network's initialization and training.
        options: method options for ``bayesify(...)`` (names only).
        fit_options: keyword arguments for ``fit`` (overriding the defaults; for a
            post-hoc method such as ``laplace`` they train the network first).
    """
    options = dict(options or {})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if callable(surrogate):
            bm = surrogate(X, y)
            if not isinstance(bm, BayesianModel):
                raise InputError("the `surrogate` factory must return a BayesianModel, got "
                                 f"{type(bm).__name__}")
            fit = dict(fit_options or {})
        elif surrogate == "gp":
            unit = torch.stack([torch.zeros_like(X[0]), torch.ones_like(X[0])])
            options = {"input_bounds": unit, **GP_OPTIONS, **options}
            bm = bayesify(None, "gp", task="regression", **options).to(X.dtype)
            fit = dict(fit_options or {})
        else:
            return _fit_network(surrogate, X, y, seed=seed, options=options,
                                fit_options=dict(fit_options or {}))
        if not bm.is_fitted:
            # Every method takes the same fit options; one that does not apply raises.
            bm.fit((X, y), **{"progress": False, "seed": seed, **fit})
    return bm


def _fit_network(method: str, X: torch.Tensor, y: torch.Tensor, *, seed: int,
                 options: dict[str, Any], fit_options: dict[str, Any]) -> BayesianModel:
    """A fresh :func:`default_network` surrogate, trained the way its method is fit.

    * gradient-trained methods: :data:`NETWORK_FIT`, full batch, updated by
      ``fit_options``;
    * post-hoc methods fit in closed form on a network (``laplace``): the network is
      first trained as ``"deterministic"`` (θ_MAP) with that recipe, then wrapped and
      fit;
    * MCMC (``hmc``): configured through its options, with ``fit_options`` as given.
    """
    options = {**NETWORK_OPTIONS.get(method, {}), **options}
    net = default_network(X.shape[1], *NETWORK_SHAPE.get(method, (64, 3))).to(X)
    bm = bayesify(net, method, task="regression", **options)
    strategy = bm.fit_strategy()
    run = {"progress": False, "seed": seed}
    recipe = {**NETWORK_FIT, "batch_size": X.shape[0], **fit_options}
    if "epochs" in strategy.applies:
        bm.fit((X, y), **run, **recipe)
    elif strategy is CLOSED_FORM:
        bayesify(net, "deterministic", task="regression").fit((X, y), **run, **recipe)
        bm = bayesify(net, method, task="regression", **options)
        bm.fit((X, y), **run)
    else:
        bm.fit((X, y), **run, **fit_options)
    return bm


def make_acquisition(name: str, model: Any, best_f: float, *, q: int = 1, beta: float = 2.0,
                     X_pending: torch.Tensor | None = None, analytic: bool = False
                     ) -> AcquisitionFunction:
    """BoTorch's LogEI or UCB for ``model``.

    The analytic forms are used when ``analytic`` (a Gaussian posterior), q = 1 and
    nothing is pending; otherwise the Monte Carlo forms qLogEI / qUCB.
    """
    analytic = analytic and q == 1 and X_pending is None
    if name == "logei":
        if analytic:
            return LogExpectedImprovement(model, best_f=best_f)
        return qLogExpectedImprovement(model, best_f=best_f, X_pending=X_pending)
    if name == "ucb":
        if analytic:
            return UpperConfidenceBound(model, beta=beta)
        return qUpperConfidenceBound(model, beta=beta, X_pending=X_pending)
    raise InputError(f"`acquisition` must be 'logei' or 'ucb' here, got {name!r}")


def thompson_sample(model: Any, q: int, dim: int, *, num_candidates: int,
                    seed: int) -> torch.Tensor:
    """q points maximizing joint posterior samples over Sobol candidates [q, d].

    The joint posterior of a smooth GP over thousands of candidates is numerically
    rank-deficient, so GPyTorch's sampler adds its small diagonal jitter (at most
    1e-6; it raises beyond that); that routine jitter is not reported.
    """
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    candidates = engine.draw(num_candidates, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            return MaxPosteriorSampling(model, replacement=False)(candidates, num_samples=q)


def propose(bm: BayesianModel, acquisition: str, best_f: float, *, q: int, dim: int,
            seed: int, beta: float = 2.0, num_restarts: int = 10, raw_samples: int = 512,
            num_candidates: int = 2048, X_pending: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The next q points [q, d] in the unit cube for a fitted surrogate."""
    model = as_botorch_model(bm, seed=seed)
    if acquisition == "ts":
        return thompson_sample(model, q, dim, num_candidates=num_candidates, seed=seed)
    acqf = make_acquisition(acquisition, model, best_f, q=q, beta=beta, X_pending=X_pending,
                            analytic=is_gaussian(model, dim))
    bounds = torch.stack([torch.zeros(dim), torch.ones(dim)]).double()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            candidates, _ = optimize_acqf(acqf, bounds=bounds, q=q, num_restarts=num_restarts,
                                          raw_samples=raw_samples,
                                          options={"batch_limit": 5, "maxiter": 200})
        except RuntimeError as exc:
            if "inplace operation" not in str(exc):
                raise
            # The method's predictive is not differentiable in x (it changes weights in
            # place while sampling): score Sobol candidates instead of following gradients.
            warnings.warn(f"{type(bm).__name__}'s predictive is not differentiable in x; "
                          "optimizing the acquisition over Sobol candidates instead",
                          BayesifyWarning, stacklevel=2)
            engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
            choices = engine.draw(num_candidates, dtype=torch.float64)
            with torch.no_grad():
                candidates, _ = optimize_acqf_discrete(acqf, q=q, choices=choices,
                                                       max_batch_size=raw_samples)
    return candidates.detach()
