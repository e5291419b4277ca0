"""VBLL classification heads: discriminative (a Bayesian softmax layer) and generative.

Discriminative: logits z ~ N(W̄φ + b, diag(φᵀS_kφ + σ_k²)); trained on the Jensen bound
w̄_yᵀφ − logsumexp_k(w̄_kᵀφ + ½(φᵀS_kφ + σ_k²)); predicts by averaging the softmax over
samples of the logits (cheap: samples of C numbers per input, not of weights).

Generative: φ | y ~ N(μ_y, Σ) with μ_y ~ N(μ̄_y, S_y) and Σ diagonal; trained on
log N(φ | μ̄_y, Σ) − ½ tr(Σ⁻¹S_y) − logsumexp_k log N(φ | μ̄_k, Σ + S_k); predicts the
closed-form softmax_k log N(φ | μ̄_k, Σ + S_k), whose log-sum-exp is the feature
density, an OOD score.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bayesify._linalg import psd_cholesky
from bayesify._math import LOG_2PI
from bayesify._validation import check_positive_int
from bayesify.layers.vbll_base import VBLLHead, check_labels_for
from bayesify.layers.vbll_covariance import VBLLCovariance
from bayesify.predictive import CategoricalPredictive

__all__ = [
    "VBLLDiscriminative",
    "VBLLGenerative",
    "generative_log_marginals",
    "jensen_softmax_bound",
]


def jensen_softmax_bound(mean: torch.Tensor, variance: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """Lower bound on E log softmax(z)_y for z ~ N(mean, diag(variance)), per row.

    mean_y − logsumexp_k(mean_k + ½ variance_k).

    Args:
        mean, variance: logit moments [B, C].
        y: labels [B] (int64).

    Returns:
        The bound per row [B].
    """
    linear = mean.gather(1, y[:, None])[:, 0]
    return linear - torch.logsumexp(mean + 0.5 * variance, dim=-1)


def _diagonal_quad(phi: torch.Tensor, means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    # Σ_j (φ_j − μ_kj)²/v_kj expanded into three products, so no [B, C, d] tensor is made.
    inv = var.reciprocal()
    return (phi.pow(2) @ inv.T - 2 * phi @ (means * inv).T
            + (means.pow(2) * inv).sum(-1)).clamp_min(0)


def generative_log_marginals(phi: torch.Tensor, means: torch.Tensor, cov: VBLLCovariance,
                             noise_var: torch.Tensor) -> torch.Tensor:
    """log N(φ | μ̄_k, Σ + S_k) for every row and class, without inverses.

    Args:
        phi: features [B, d].
        means: class means μ̄ [C, d].
        cov: the class-mean covariances S_k (dense, diagonal or low rank).
        noise_var: the diagonal of Σ [d].

    Returns:
        Log densities [B, C].
    """
    d = phi.shape[-1]
    if cov.kind == "dense":
        L = cov.scale_tril()
        marginal = L @ L.transpose(-1, -2) + torch.diag_embed(noise_var).expand_as(L)
        chol = psd_cholesky(marginal, name="class covariance Σ + S_k")
        residual = (phi.unsqueeze(0) - means.unsqueeze(1)).transpose(-1, -2)  # [C, d, B]
        white = torch.linalg.solve_triangular(chol, residual, upper=False)
        quad = white.pow(2).sum(-2).T
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        diag = noise_var + torch.exp(2 * cov.log_std)  # [C, d]
        quad = _diagonal_quad(phi, means, diag)
        logdet = diag.log().sum(-1)
        if cov.kind == "lowrank":
            # Woodbury in solve form: rᵀ(D + UUᵀ)⁻¹r = rᵀD⁻¹r − ‖K⁻½ Uᵀ D⁻¹ r‖², with the
            # r×r capacitance K = I + Uᵀ D⁻¹ U factored by Cholesky (det lemma for logdet).
            chol = psd_cholesky(cov.capacitance(diag), name="low-rank capacitance matrix")
            scaled = cov.factor / diag.unsqueeze(-1)  # D⁻¹U [C, d, r]
            proj = torch.einsum("bd,cdr->cbr", phi, scaled)
            proj = proj - torch.einsum("cd,cdr->cr", means, scaled).unsqueeze(1)
            white = torch.linalg.solve_triangular(chol, proj.transpose(-1, -2), upper=False)
            quad = quad - white.pow(2).sum(-2).T
            logdet = logdet + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (d * LOG_2PI + logdet + quad)


class VBLLDiscriminative(VBLLHead):
    """Variational Bayesian last layer for discriminative classification.

    Args:
        in_features: d, the feature width.
        num_classes: C.
        regularization_weight: 1/N with N the training-set size (may be set later).
        covariance: ``"dense"`` (default), ``"diagonal"`` or ``"lowrank"``.
        rank: the rank of the low-rank part (``"lowrank"`` only).
        prior_scale: the prior variance of each weight is 2·prior_scale/d.
        wishart_scale, dof: the logit-noise prior (paper defaults 1 and 1).
        bias: learn a (point-estimated) bias per class.
        num_samples: logit samples ``predict`` averages the softmax over by default.

    Shapes: ``forward(phi [B, d]) -> mean logits [B, C]``; ``loss(phi, y [B])`` the
    scalar negative ELBO; ``predict(phi)`` a :class:`CategoricalPredictive`.
    """

    def __init__(self, in_features: int, num_classes: int, *,
                 regularization_weight: float | None = None, covariance: str = "dense",
                 rank: int | None = None, prior_scale: float = 1.0,
                 wishart_scale: float = 1.0, dof: float = 1.0, bias: bool = True,
                 num_samples: int = 100, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(in_features, num_classes, num_classes, covariance=covariance,
                         rank=rank, regularization_weight=regularization_weight,
                         prior_scale=prior_scale, prior_factor=2.0 / in_features,
                         wishart_scale=wishart_scale, dof=dof, dtype=dtype, device=device)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_classes, **factory)) if bias else None
        self.num_samples = check_positive_int(num_samples, "num_samples")

    def posterior_mean(self) -> torch.Tensor:
        return self.weight

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Mean logits W̄φ + b [B, C]."""
        return nn.functional.linear(self.check_features(phi), self.weight, self.bias)

    def logit_moments(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [B, C] and variance φᵀS_kφ + σ_k² [B, C] of the logits."""
        phi = self.check_features(phi)
        mean = nn.functional.linear(phi, self.weight, self.bias)
        return mean, self.cov.quad(phi) + self.noise_variance()

    def expected_log_likelihood(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The Jensen bound on the data term, averaged over the batch (a scalar)."""
        mean, variance = self.logit_moments(phi)
        y = check_labels_for(y, mean.shape[0], self.out_features).to(mean.device)
        return jensen_softmax_bound(mean, variance, y).mean()

    def loss(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of one batch: features [B, d], labels [B]."""
        phi = self.check_features(phi)
        y = check_labels_for(y, phi.shape[0], self.out_features).to(phi.device)
        mean = nn.functional.linear(phi, self.weight, self.bias)
        quad, trace, logdet = self.cov.terms(phi)
        data = jensen_softmax_bound(mean, quad + self.noise_variance(), y).mean()
        return -(data + self.regularizer(trace, logdet))

    @torch.no_grad()
    def predict(self, phi: torch.Tensor, num_samples: int | None = None,
                generator: torch.Generator | None = None) -> CategoricalPredictive:
        """Softmax averaged over ``num_samples`` draws of the logits (with their samples)."""
        num_samples = check_positive_int(num_samples or self.num_samples, "num_samples")
        mean, variance = self.logit_moments(phi)
        eps = torch.randn((num_samples, *mean.shape), generator=generator,
                          dtype=mean.dtype, device=mean.device)
        return CategoricalPredictive.from_logits(sample_logits=mean + eps * variance.sqrt())


class VBLLGenerative(VBLLHead):
    """Variational Bayesian last layer for generative classification.

    Args:
        in_features: d, the feature width.
        num_classes: C.
        regularization_weight: 1/N with N the training-set size (may be set later).
        covariance: form of the class-mean covariances S_k: ``"diagonal"`` (default, as
            in the paper), ``"dense"`` or ``"lowrank"``.
        rank: the rank of the low-rank part (``"lowrank"`` only).
        prior_scale: the prior variance of each class-mean coordinate.
        wishart_scale, dof: the prior of the feature noise Σ (paper defaults 1 and 1).

    Shapes: ``forward(phi [B, d]) -> logits [B, C]`` (the log marginal densities);
    ``loss(phi, y [B])``; ``predict(phi)`` a :class:`CategoricalPredictive` with the
    negative log feature density [B] attached as score ``"density"`` (higher = more
    out-of-distribution). Use :meth:`initialize_from_features` to start the class means
    and the noise at the training features' statistics.
    """

    def __init__(self, in_features: int, num_classes: int, *,
                 regularization_weight: float | None = None, covariance: str = "diagonal",
                 rank: int | None = None, prior_scale: float = 1.0,
                 wishart_scale: float = 1.0, dof: float = 1.0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(in_features, num_classes, in_features, covariance=covariance,
                         rank=rank, regularization_weight=regularization_weight,
                         prior_scale=prior_scale, prior_factor=1.0,
                         wishart_scale=wishart_scale, dof=dof,
                         dtype=dtype, device=device)
        self.means = nn.Parameter(torch.zeros(num_classes, in_features, dtype=dtype,
                                              device=device))

    def posterior_mean(self) -> torch.Tensor:
        return self.means

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Class logits log N(φ | μ̄_k, Σ + S_k) [B, C] (a uniform class prior)."""
        return generative_log_marginals(self.check_features(phi), self.means, self.cov,
                                        self.noise_variance())

    def log_density(self, phi: torch.Tensor) -> torch.Tensor:
        """log p(φ) = logsumexp_k log N(φ | μ̄_k, Σ + S_k) − log C [B]."""
        return torch.logsumexp(self(phi), dim=-1) - math.log(self.out_features)

    def expected_log_likelihood(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The Jensen bound on the data term, averaged over the batch (a scalar)."""
        phi = self.check_features(phi)
        y = check_labels_for(y, phi.shape[0], self.out_features).to(phi.device)
        noise_var = self.noise_variance()
        residual = phi - self.means[y]
        log_lik = -0.5 * (phi.shape[1] * LOG_2PI + noise_var.log().sum()
                          + (residual.pow(2) / noise_var).sum(-1))
        trace = (self.cov.diagonal()[y] / noise_var).sum(-1)
        log_marginals = generative_log_marginals(phi, self.means, self.cov, noise_var)
        return (log_lik - 0.5 * trace - torch.logsumexp(log_marginals, dim=-1)).mean()

    def loss(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of one batch: features [B, d], labels [B]."""
        return -(self.expected_log_likelihood(phi, y) + self.regularizer())

    @torch.no_grad()
    def predict(self, phi: torch.Tensor) -> CategoricalPredictive:
        """Closed-form class probabilities, with score ``"density"`` = −log p(φ) [B]."""
        logits = self(phi)
        log_density = torch.logsumexp(logits, dim=-1) - math.log(self.out_features)
        return CategoricalPredictive.from_logits(logits).with_scores(density=-log_density)

    @torch.no_grad()
    def initialize_from_features(self, phi: torch.Tensor, y: torch.Tensor) -> None:
        """Start μ̄ at the class means and Σ at the pooled within-class variance.

        Args:
            phi: training features [N, d].
            y: their labels [N].
        """
        phi = self.check_features(phi)
        y = check_labels_for(y, phi.shape[0], self.out_features).to(phi.device)
        counts = torch.bincount(y, minlength=self.out_features).to(phi.dtype)
        sums = torch.zeros_like(self.means).index_add_(0, y, phi)
        seen = counts > 0
        self.means[seen] = sums[seen] / counts[seen, None]
        residual = phi - self.means[y]
        variance = residual.pow(2).mean(0)
        variance = variance.clamp_min(1e-4 * float(variance.mean().clamp_min(1e-12)))
        self.noise_log_std.copy_(0.5 * variance.log())
        # The exact posterior of a Gaussian mean from n_k points has covariance Σ/n_k.
        self.cov.reset((variance / counts.clamp_min(1)[:, None]).sqrt())
