"""Fit strategies: how ``BayesianModel.fit`` turns training data into a posterior.

A method names its strategy (``fit_strategy()``); every strategy takes the same
:class:`FitOptions`, and says clearly which of them do not apply to it.

* :class:`GradientFit`: the one minibatch training loop, with hooks
  (``training_batches``, ``on_fit_start``, ``configure_optimizer``, ``training_step``,
  ``on_fit_end``), a :class:`FitPlan` (epochs, steps per epoch, total steps) for
  schedules, and a guard that stops on a non-finite loss or gradient.
* :class:`FullBatchFit`: gathers the whole training set and hands it to the method's
  ``fit_full_batch`` once: closed-form and L-BFGS fits (exact GP) and MCMC (HMC).
"""

from bayesify.fitting.full_batch import CLOSED_FORM, MCMC, FullBatchFit
from bayesify.fitting.gradient import GradientFit
from bayesify.fitting.guard import NonFiniteStep, check_finite_loss, gradient_norm
from bayesify.fitting.options import FitOptions, FitPlan, FitStrategy

__all__ = [
    "CLOSED_FORM",
    "MCMC",
    "FitOptions",
    "FitPlan",
    "FitStrategy",
    "FullBatchFit",
    "GradientFit",
    "NonFiniteStep",
    "check_finite_loss",
    "gradient_norm",
]
