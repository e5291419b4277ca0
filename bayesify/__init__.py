"""bayesify: turn PyTorch networks into Bayesian ones with one call.

>>> import bayesify as bf
>>> bm = bf.bayesify(model, "mc_dropout", task="classification").fit((X, y))
>>> pred = bm.predict(X_test)                      # a Predictive
>>> bf.calibration.evaluate(pred, y_test)          # accuracy, NLL, ECE, ...
"""

from bayesify import calibration, data, likelihoods, ood
from bayesify._progress import set_progress_bars
from bayesify.core import (
    TASKS,
    BayesianModel,
    available_methods,
    bayesify,
    get_method,
    register_method,
)
from bayesify.errors import (
    BayesifyError,
    BayesifyWarning,
    CheckpointError,
    ConvergenceWarning,
    InputError,
    JitterWarning,
    NotFittedError,
    NotPSDError,
    NumericalError,
    TrainingDivergedError,
    UnsupportedModelError,
)
from bayesify.optim.ivon import IVON
from bayesify.posterior import GaussianPosterior, Posterior, SampledPosterior
from bayesify.predictive import (
    CategoricalPredictive,
    GaussianPredictive,
    GeneralizedGaussianPredictive,
    MixturePredictive,
    Predictive,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # bf.bo imports BoTorch, which takes seconds, and bf.testing is for method authors:
    # both load on first use only.
    if name in ("bo", "testing"):
        import importlib

        return importlib.import_module(f"bayesify.{name}")
    raise AttributeError(f"module 'bayesify' has no attribute {name!r}")


__all__ = [
    "TASKS",
    "bo",
    "testing",
    "calibration",
    "data",
    "likelihoods",
    "ood",
    "BayesianModel",
    "BayesifyError",
    "BayesifyWarning",
    "CategoricalPredictive",
    "CheckpointError",
    "ConvergenceWarning",
    "GaussianPosterior",
    "GaussianPredictive",
    "GeneralizedGaussianPredictive",
    "IVON",
    "InputError",
    "JitterWarning",
    "MixturePredictive",
    "NotFittedError",
    "NotPSDError",
    "NumericalError",
    "Posterior",
    "Predictive",
    "SampledPosterior",
    "TrainingDivergedError",
    "UnsupportedModelError",
    "available_methods",
    "bayesify",
    "get_method",
    "register_method",
    "set_progress_bars",
]
