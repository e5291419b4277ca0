"""Bayesian optimization with any bayesify regression model as the surrogate.

* :func:`as_botorch_model` makes a fitted regression BayesianModel a BoTorch
  ``Model``, so every BoTorch acquisition function and optimizer works with it.
* :class:`BayesianOptimization` runs the loop (``run`` or ``ask``/``tell``).
* :func:`get_problem` gives BoTorch's standard test functions by name.
"""

import warnings

with warnings.catch_warnings():
    # linear_operator decorates helpers with torch.jit.script, deprecated since torch 2.10.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    import botorch  # noqa: F401

from bayesify.bo.acquisition import default_network, fit_surrogate  # noqa: E402
from bayesify.bo.bridge import BayesianModelBridge, as_botorch_model  # noqa: E402
from bayesify.bo.loop import BayesianOptimization, BOHistory, BOResult  # noqa: E402
from bayesify.bo.problems import (  # noqa: E402
    PROBLEMS,
    get_problem,
    random_search,
    regret_summary,
    simple_regret,
)

__all__ = [
    "PROBLEMS",
    "BOHistory",
    "BOResult",
    "BayesianOptimization",
    "BayesianModelBridge",
    "as_botorch_model",
    "default_network",
    "fit_surrogate",
    "get_problem",
    "random_search",
    "regret_summary",
    "simple_regret",
]
