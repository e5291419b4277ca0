"""The categorical likelihood of a Laplace (GLM) posterior: probit, Laplace bridge or MC.

A Gaussian posterior over logits f ~ N(μ, Σ) becomes class probabilities by

* ``"probit"``: softmax(μ_k / √(1 + π/8 · Σ_kk)) (MacKay; deterministic, uses only
  the diagonal of Σ, so a thousand classes stay cheap);
* ``"bridge"``: the Laplace bridge (Hobbhahn, Kristiadi & Hennig, UAI 2022): after
  removing the direction 1 that the softmax ignores, μ ← μ − Σ1·(1ᵀμ)/(1ᵀΣ1),
  Σ ← Σ − Σ11ᵀΣ/(1ᵀΣ1) (needs the covariance over classes; a Σ with 1ᵀΣ1 = 0 already
  has it removed and only μ is centered),
  a Dirichlet with α_k = (1 − 2/K + e^{μ_k} Σ_l e^{−μ_l} / K²) / Σ_kk, whose mean
  α / Σα is the prediction (computed in log space, so large logits do not overflow);
* ``"mc"``: the softmax averaged over draws of the logits.
"""

from __future__ import annotations

import math

import torch

from bayesify.errors import InputError
from bayesify.likelihoods import CategoricalLikelihood
from bayesify.posterior import GaussianPosterior, Posterior
from bayesify.predictive import CategoricalPredictive

__all__ = ["LaplaceCategoricalLikelihood", "laplace_bridge"]


def laplace_bridge(mean: torch.Tensor, covariance: torch.Tensor | None = None,
                   variance: torch.Tensor | None = None) -> torch.Tensor:
    """Class probabilities [N, C] of the Laplace bridge.

    Args:
        mean: logit means μ [N, C].
        covariance: logit covariances Σ [N, C, C] (enables the zero-mean correction),
            or ``None`` with ``variance`` [N, C] (the diagonal only, no correction).
    """
    k = mean.shape[-1]
    if k < 2:
        raise InputError(f"the Laplace bridge needs at least two classes, got {k}")
    if covariance is not None:
        row = covariance.sum(-1)                                   # Σ1 [N, C]
        total = row.sum(-1, keepdim=True)
        diag = covariance.diagonal(dim1=-2, dim2=-1)
        # Σ already centered (1ᵀΣ1 ≈ 0, nothing left to remove): center μ only.
        flat = total <= 1e3 * torch.finfo(mean.dtype).eps * diag.sum(-1, keepdim=True)
        safe = torch.where(flat, torch.ones_like(total), total)
        corrected = mean - row * mean.sum(-1, keepdim=True) / safe
        mean = torch.where(flat, mean - mean.mean(-1, keepdim=True), corrected)
        variance = torch.where(flat, diag, diag - row.pow(2) / safe)
    tiny = torch.finfo(mean.dtype).tiny
    log_var = variance.clamp_min(tiny).log()
    scaled = mean + torch.logsumexp(-mean, -1, keepdim=True) - 2 * math.log(k)
    constant = math.log(1 - 2 / k) if k > 2 else -math.inf
    log_alpha = torch.logaddexp(torch.full_like(scaled, constant), scaled) - log_var
    return torch.softmax(log_alpha, -1)


class LaplaceCategoricalLikelihood(CategoricalLikelihood):
    """:class:`~bayesify.likelihoods.CategoricalLikelihood` with the Laplace bridge.

    Args:
        approximation: ``"probit"`` (default), ``"bridge"`` or ``"mc"``.
        num_samples: logit draws for ``"mc"`` when ``predict`` does not say.
    """

    approximations = ("probit", "bridge", "mc")

    def __init__(self, approximation: str = "probit", num_samples: int = 100):
        super().__init__(approximation, num_samples)

    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> CategoricalPredictive:
        if (self.approximation == "bridge" and isinstance(posterior, GaussianPosterior)
                and not posterior.is_deterministic):
            if posterior.kind == "output":
                probs = laplace_bridge(posterior.mean, posterior.covariance)
            else:
                probs = laplace_bridge(posterior.mean, variance=posterior.variance)
            return CategoricalPredictive(probs)
        return super()._predictive(posterior, num_samples, generator)
