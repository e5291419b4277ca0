"""The exception and warning hierarchy.

Every error bayesify raises derives from :class:`BayesifyError` and also from the
built-in that fits it, so existing ``except ValueError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "BayesifyError",
    "BayesifyWarning",
    "CheckpointError",
    "ConvergenceWarning",
    "InputError",
    "JitterWarning",
    "NotFittedError",
    "NotPSDError",
    "NumericalError",
    "TrainingDivergedError",
    "UnsupportedModelError",
]


class BayesifyError(Exception):
    """Root of every error raised by bayesify."""


class InputError(BayesifyError, ValueError):
    """An argument has the wrong type, shape, range or content."""


class UnsupportedModelError(InputError):
    """A model cannot be wrapped by the requested method (the message names the fix)."""


class NotFittedError(BayesifyError, RuntimeError):
    """A model or evaluator was used before ``fit`` created the state it needs."""


class NotPSDError(BayesifyError, RuntimeError):
    """A matrix that must be positive definite is not, even after adding jitter."""


class TrainingDivergedError(BayesifyError, FloatingPointError):
    """A training loss or gradient turned NaN or infinite (the message names the epoch,
    the step and the fix)."""


class NumericalError(BayesifyError, FloatingPointError):
    """A computation produced NaN or inf that the user's inputs do not explain (the
    message says where, and the likely cause)."""


class CheckpointError(BayesifyError, ValueError):
    """A checkpoint file cannot be loaded into this model (the message says what the
    file holds and what was expected); the model is left as it was."""


class BayesifyWarning(UserWarning):
    """Root of every warning issued by bayesify."""


class JitterWarning(BayesifyWarning):
    """Jitter had to be added to a matrix's diagonal before it could be factorized."""


class ConvergenceWarning(BayesifyWarning):
    """The MCMC draws of a fit fail a convergence check (R-hat, ESS, divergences)."""
