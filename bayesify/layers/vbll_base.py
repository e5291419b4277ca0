"""What every VBLL head shares: input checks, the noise, the ELBO's regularizer.

The regularizer of a VBLL ELBO is (1/N)·[log p(Σ) − Σ_k KL_k], the Wishart-type log prior
of the noise covariance minus the KL of the weight posterior from its prior, weighted by
``regularization_weight`` = 1/N (N the training-set size).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from bayesify._linalg import gaussian_kl
from bayesify._validation import (
    check_finite,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.errors import InputError
from bayesify.layers.vbll_covariance import VBLLCovariance, wishart_log_prior

__all__ = ["VBLLHead", "check_labels_for"]


class VBLLHead(nn.Module, metaclass=abc.ABCMeta):
    """Base of the VBLL heads (not used alone).

    Args:
        in_features: d, the feature width.
        out_features: m, the number of outputs or classes.
        noise_dim: the dimension of the diagonal noise covariance (m, or d for the
            generative head).
        covariance, rank: the posterior covariance form (see :class:`VBLLCovariance`).
        regularization_weight: 1/N; may be set later (before the first ``loss``).
        prior_scale: the user's prior scale (checked as given, so an error names the
            value passed, not a derived one).
        prior_factor: s = prior_factor · prior_scale is the prior variance of each
            weight (2/d, 1/d or 1, by head).
        wishart_scale, dof: the noise prior's scale c and degrees of freedom.
    """

    def __init__(self, in_features: int, out_features: int, noise_dim: int, *,
                 covariance: str, rank: int | None, regularization_weight: float | None,
                 prior_scale: float, prior_factor: float, wishart_scale: float, dof: float,
                 dtype: torch.dtype | None, device: torch.device | str | None):
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.prior_scale = check_positive_float(prior_scale, "prior_scale")
        self.prior_var = prior_factor * self.prior_scale
        self.wishart_scale = check_positive_float(wishart_scale, "wishart_scale")
        self.dof = check_positive_float(dof, "dof")
        self.regularization_weight = regularization_weight
        self.cov = VBLLCovariance(self.out_features, self.in_features, covariance, rank=rank,
                                  dtype=dtype, device=device)
        # log σ = 0: a unit noise, so the first loss is of order one (the official random
        # initialization can start it near 1e7).
        self.noise_log_std = nn.Parameter(torch.zeros(noise_dim, dtype=dtype, device=device))

    @property
    def covariance(self) -> str:
        """The posterior covariance form: ``"dense"``, ``"diagonal"`` or ``"lowrank"``."""
        return self.cov.kind

    @property
    def regularization_weight(self) -> float | None:
        """1/N, the weight of the prior terms in the per-batch ELBO."""
        return self._regularization_weight

    @regularization_weight.setter
    def regularization_weight(self, value: float | None) -> None:
        self._regularization_weight = (None if value is None else
                                       check_positive_float(value, "regularization_weight"))

    def noise_variance(self) -> torch.Tensor:
        """The diagonal of the noise covariance Σ [noise_dim]."""
        return torch.exp(2 * self.noise_log_std)

    def check_features(self, phi: torch.Tensor, name: str = "features") -> torch.Tensor:
        """Check features [B, d]: a floating 2-D tensor of the head's width, all finite."""
        if not isinstance(phi, torch.Tensor) or not phi.is_floating_point():
            raise InputError(f"`{name}` must be a floating-point tensor [B, "
                             f"{self.in_features}], got {type(phi).__name__}")
        if phi.dim() != 2 or phi.shape[1] != self.in_features:
            raise InputError(f"`{name}` must have shape [B, {self.in_features}] (the head's "
                             f"in_features), got {list(phi.shape)}")
        return check_finite(phi, name)

    def log_noise_prior(self) -> torch.Tensor:
        """The Wishart-type log prior of the noise covariance (a scalar)."""
        return wishart_log_prior(2 * self.noise_log_std, self.dof, self.wishart_scale)

    def kl(self, trace: torch.Tensor | None = None,
           logdet: torch.Tensor | None = None) -> torch.Tensor:
        """KL of the posterior from the prior, per output row [m].

        ``trace`` and ``logdet`` of the covariances [m] may be passed when already
        computed in the same step.
        """
        if trace is None or logdet is None:
            _, trace, logdet = self.cov.terms()
        return gaussian_kl(self.posterior_mean(), trace, logdet, self.prior_var)

    @abc.abstractmethod
    def posterior_mean(self) -> torch.Tensor:
        """The posterior means w̄ [m, d] (weights, or class means)."""

    def regularizer(self, trace: torch.Tensor | None = None,
                    logdet: torch.Tensor | None = None) -> torch.Tensor:
        """(1/N)·[log p(Σ) − Σ_k KL_k], the per-batch share of the ELBO's prior terms."""
        if self._regularization_weight is None:
            raise InputError("`regularization_weight` is not set; pass "
                             "regularization_weight=1/N (N the training-set size)")
        kl = self.kl(trace, logdet).sum()
        return self._regularization_weight * (self.log_noise_prior() - kl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"covariance={self.covariance!r}, prior_var={self.prior_var:.3g}, "
                f"regularization_weight={self._regularization_weight}")


def check_labels_for(y: torch.Tensor, num_rows: int, num_classes: int) -> torch.Tensor:
    """Labels [B] in [0, C) for a batch of ``num_rows`` features, as int64."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"`y` must be a tensor of class labels [B], got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != num_rows:
        raise InputError(f"`y` must have shape [{num_rows}] (one label per feature row), got "
                         f"{list(y.shape)}")
    return check_labels(y, "y", num_classes)
