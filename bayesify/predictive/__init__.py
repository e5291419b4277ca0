"""Predictive distributions: the one output type every method returns.

Three types cover every method in bayesify:

* :class:`CategoricalPredictive` for classification: averaged class probabilities
  ``probs`` [N, C] and, for sampling methods, the per-sample probabilities
  ``sample_probs`` [S, N, C] from which the entropy splits into aleatoric and epistemic
  parts.
* :class:`GaussianPredictive` for regression methods with a closed-form predictive
  (VBLL, GPs): ``mean`` and ``variance`` [N] or [N, D], with the aleatoric part kept.
* :class:`MixturePredictive` for regression methods that sample (MC dropout, IVON, VI,
  HMC): S Gaussian components [S, N] or [S, N, D]; every quantity is exact for the
  mixture (log density by logsumexp, quantiles by root finding on the mixture CDF),
  never a moment-matched Gaussian.

All tensors stay on the device and dtype they were given. Multi-output regression
([N, D] means) treats outputs as independent given the input: ``log_prob`` sums the
marginal log densities over the output dimension and returns one value per point;
``output(d)`` gives the predictive of one output (mean [N]), and a mixture's
``joint_log_prob`` the exact density of its joint components.
"""

from bayesify.predictive.base import Predictive
from bayesify.predictive.categorical import CategoricalPredictive
from bayesify.predictive.generalized import GeneralizedGaussianPredictive
from bayesify.predictive.mixture import MixturePredictive
from bayesify.predictive.regression import GaussianPredictive, RegressionPredictive

__all__ = [
    "CategoricalPredictive",
    "GaussianPredictive",
    "GeneralizedGaussianPredictive",
    "MixturePredictive",
    "Predictive",
    "RegressionPredictive",
]
