"""The VBLL regression head: a Bayesian linear model on features, trained without sampling.

Posterior per output k: w_k ~ N(w̄_k, S_k); noise Σ = diag(σ_k²). Per batch of B rows
the loss is the negative ELBO, summed over the m outputs (the official package averages
over outputs, which weights the prior m times too strongly for multi-output data)::

    −(1/B) Σ_i Σ_k [log N(y_ik | w̄_kᵀφ_i + b_k, σ_k²) − ½ φ_iᵀS_kφ_i / σ_k²]
        − (1/N)·[log p(Σ) − Σ_k KL_k]

With frozen features its optimum is the exact Bayesian linear regression posterior.
The predictive is closed form: N(w̄ᵀφ + b, φᵀSφ + σ²), epistemic φᵀSφ, aleatoric σ².
"""

from __future__ import annotations

import torch
from torch import nn

from bayesify._math import LOG_2PI
from bayesify._validation import check_finite, check_same_length
from bayesify.layers.vbll_base import VBLLHead
from bayesify.likelihoods import regression_targets
from bayesify.predictive import GaussianPredictive

__all__ = ["VBLLRegression", "regression_expected_log_likelihood"]


def regression_expected_log_likelihood(mean: torch.Tensor, quad: torch.Tensor,
                                       noise_var: torch.Tensor,
                                       y: torch.Tensor) -> torch.Tensor:
    """E_q[log p(y | w, φ)] averaged over rows and summed over outputs.

    Σ_k [log N(y_k | mean_k, σ_k²) − ½ quad_k / σ_k²], averaged over the batch.

    Args:
        mean: w̄ᵀφ + b [B, m].
        quad: φᵀS_kφ [B, m].
        noise_var: σ² [m].
        y: targets [B, m].

    Returns:
        A scalar.
    """
    per_entry = -0.5 * (LOG_2PI + noise_var.log() + ((y - mean).pow(2) + quad) / noise_var)
    return per_entry.sum(-1).mean()


class VBLLRegression(VBLLHead):
    """Variational Bayesian last layer for regression.

    Args:
        in_features: d, the feature width.
        out_features: m, the number of regression outputs.
        regularization_weight: 1/N with N the training-set size (may be set later).
        covariance: ``"dense"`` (default), ``"diagonal"`` or ``"lowrank"``.
        rank: the rank of the low-rank part (``"lowrank"`` only).
        prior_scale: the prior variance of each weight is prior_scale/d.
        wishart_scale: c of the noise prior (paper default 1e-2).
        dof: degrees of freedom of the noise prior (paper default 1).
        bias: learn a (point-estimated) bias per output.

    Shapes: ``forward(phi [B, d]) -> mean [B, m]``; ``loss(phi, y [B] or [B, m])`` is the
    scalar negative ELBO; ``predict(phi)`` a :class:`GaussianPredictive` [B, m].

    Initialization is deterministic: w̄ = 0, b = 0, σ = 1, S = I/d.
    """

    def __init__(self, in_features: int, out_features: int = 1, *,
                 regularization_weight: float | None = None, covariance: str = "dense",
                 rank: int | None = None, prior_scale: float = 1.0,
                 wishart_scale: float = 1e-2, dof: float = 1.0, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, out_features, covariance=covariance,
                         rank=rank, regularization_weight=regularization_weight,
                         prior_scale=prior_scale, prior_factor=1.0 / in_features,
                         wishart_scale=wishart_scale, dof=dof, dtype=dtype, device=device)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    def posterior_mean(self) -> torch.Tensor:
        return self.weight

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """The predictive mean w̄ᵀφ + b [B, m] for features [B, d]."""
        return nn.functional.linear(self.check_features(phi), self.weight, self.bias)

    def moments(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictive mean [B, m], epistemic variance φᵀSφ [B, m], noise variance [m]."""
        phi = self.check_features(phi)
        mean = nn.functional.linear(phi, self.weight, self.bias)
        return mean, self.cov.quad(phi), self.noise_variance()

    def _targets(self, y: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        y = check_finite(regression_targets(y, self.out_features), "y")
        check_same_length(features=phi, y=y)
        return y.to(phi.dtype)

    def expected_log_likelihood(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The data term of the ELBO for a batch (a scalar, mean over rows)."""
        mean, quad, noise_var = self.moments(phi)
        return regression_expected_log_likelihood(mean, quad, noise_var, self._targets(y, phi))

    def loss(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of one batch: features [B, d], targets [B] or [B, m]."""
        phi = self.check_features(phi)
        y = self._targets(y, phi)
        mean = nn.functional.linear(phi, self.weight, self.bias)
        quad, trace, logdet = self.cov.terms(phi)
        data = regression_expected_log_likelihood(mean, quad, self.noise_variance(), y)
        return -(data + self.regularizer(trace, logdet))

    def predict(self, phi: torch.Tensor) -> GaussianPredictive:
        """N(w̄ᵀφ + b, φᵀSφ + σ²) per row and output, [B, m]."""
        mean, quad, noise_var = self.moments(phi)
        aleatoric = noise_var.expand_as(mean)
        return GaussianPredictive(mean, quad + aleatoric, aleatoric_variance=aleatoric)

