"""Any regression BayesianModel as a BoTorch ``Model``, through its public posterior.

The bridge calls ``bm.posterior(X, joint=True, generator=...)`` on blocks [b, q, d] and
reads the noise off ``bm.likelihood``; the posterior family decides the BoTorch one:

* a :class:`~bayesify.posterior.GaussianPosterior` (``gp``, ``vbll``, ``deterministic``)
  becomes a joint ``MultivariateNormal`` over the q points of each block: the full
  q × q covariance where the method computes it (exact GP, VBLL), diagonal otherwise;
* a :class:`~bayesify.posterior.SampledPosterior` (``mc_dropout``, ``ivon``, ``vi``,
  ``ssvi``, ``hmc``) becomes an ``EnsemblePosterior`` of its S draws. The draws come
  from a generator re-seeded on every call, so the ensemble members are fixed
  functions of X during one acquisition optimization (``resample()`` moves to fresh
  draws for the next step).

Both posteriors are in the model's output units, of the latent function (add the
observation noise with ``observation_noise=True`` for the Gaussian bridge), and
differentiable in X, so BoTorch's gradient-based ``optimize_acqf`` works.
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.models.model import Model
from botorch.posteriors import Posterior
from botorch.posteriors.ensemble import EnsemblePosterior
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch import settings as gpytorch_settings
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator import to_linear_operator

from bayesify.core import BayesianModel, preserve_training_flags
from bayesify.errors import InputError, NotFittedError
from bayesify.likelihoods import GaussianLikelihood
from bayesify.posterior import GaussianPosterior, SampledPosterior

__all__ = ["BayesianModelBridge", "as_botorch_model", "is_gaussian"]


def _check_model(bm: Any) -> BayesianModel:
    if not isinstance(bm, BayesianModel):
        raise InputError(f"`bm` must be a bayesify BayesianModel, got {type(bm).__name__}")
    if bm.task != "regression":
        raise InputError(f"`bm` must be a regression model for Bayesian optimization, "
                         f"got task={bm.task!r}")
    if not bm.is_fitted:
        raise NotFittedError(f"this {type(bm).__name__} is not fitted yet; call .fit(train) "
                             "before as_botorch_model()")
    if not isinstance(bm.likelihood, GaussianLikelihood):
        raise InputError(f"`bm` must have a Gaussian likelihood (bm.likelihood a "
                         f"GaussianLikelihood) for a BoTorch posterior; method "
                         f"{bm.method_name!r} has {type(bm.likelihood).__name__}")
    return bm


def _flatten(X: torch.Tensor, dtype: torch.dtype, device: torch.device
             ) -> tuple[torch.Tensor, torch.Size]:
    """X [..., q, d] as [B, q, d] in the model's dtype, with the batch shape."""
    if X.dim() < 2:
        raise InputError(f"`X` must have shape [..., q, d], got {list(X.shape)}")
    batch = X.shape[:-2]
    return X.reshape(-1, *X.shape[-2:]).to(device=device, dtype=dtype), batch


class BayesianModelBridge(Model):
    """A fitted regression BayesianModel as a BoTorch model.

    Args:
        bm: the fitted model.
        num_samples: S, posterior draws per call for sampling methods (the method's
            default when ``None``).
        seed: seeds those draws; every call with the same seed gives the same
            ensemble members, so they are fixed functions of X within one
            acquisition optimization. :meth:`resample` moves to fresh ones.

    The posterior at X [..., q, d] is a ``GPyTorchPosterior`` (joint MVN) for a
    Gaussian posterior and an ``EnsemblePosterior`` of values [..., S, q, m] for a
    sampled one.
    """

    def __init__(self, bm: BayesianModel, num_samples: int | None = None, seed: int = 0):
        super().__init__()
        self.bm = _check_model(bm)
        self._dtype, self._device = bm.dtype, bm.device
        self.num_samples = num_samples
        self.seed = int(seed)
        self._num_outputs = 1  # updated by every posterior call

    @property
    def num_outputs(self) -> int:
        return self._num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    def resample(self, seed: int | None = None) -> None:
        """Move to fresh ensemble members (the next seed, or ``seed``)."""
        self.seed = self.seed + 1 if seed is None else int(seed)

    def _posterior(self, x: torch.Tensor) -> GaussianPosterior | SampledPosterior:
        """The method's posterior over the blocks x [b, q, d] (differentiable in x),
        with fresh draws from this bridge's seed for a sampling method."""
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        with preserve_training_flags(self.bm):
            self.bm.eval()
            return self.bm.posterior(x, joint=True, generator=generator,
                                     num_samples=self.num_samples)

    def posterior(self, X: torch.Tensor, output_indices: list[int] | None = None,
                  observation_noise: bool | torch.Tensor = False,
                  posterior_transform: Any = None, **kwargs: Any) -> Posterior:
        """Posterior over the q points of X [..., q, d], in the model's output units.

        ``observation_noise=True`` adds the likelihood's noise variance to the Gaussian
        posterior (a tensor gives the noise variances [..., q, m] to add); ensemble
        posteriors are over the latent function only, as BoTorch's EnsembleModel.
        """
        x, batch = _flatten(X, self._dtype, self._device)
        posterior = self._posterior(x)
        split = self.bm.likelihood.split
        if isinstance(posterior, SampledPosterior):
            means, _ = split(posterior.samples)  # [S, b, q, m]
            values = means.transpose(0, 1)  # [b, S, q, m]
            if output_indices is not None:
                values = values[..., output_indices]
            self._num_outputs = values.shape[-1]
            values = values.to(X.dtype).reshape(*batch, *values.shape[1:])
            result: Posterior = EnsemblePosterior(values)
        elif isinstance(posterior, GaussianPosterior):
            mean, noise = split(posterior.mean)  # [b, q, m] each
            m = mean.shape[-1]
            if posterior.kind == "joint":
                cov = posterior.covariance[..., :m, :, :]
            else:
                # GPyTorch's floor on variances (it warns below it): a method with no
                # epistemic variance (deterministic) gets a zero-width posterior.
                floor = gpytorch_settings.min_variance.value(mean.dtype)
                var = posterior.variance[..., :m].clamp_min(floor)
                cov = torch.diag_embed(var.transpose(-1, -2))  # [b, m, q, q]
            if isinstance(observation_noise, torch.Tensor):
                noise = observation_noise.reshape(mean.shape).to(mean)
                observation_noise = True
            if observation_noise:
                cov = cov + torch.diag_embed(noise.transpose(-1, -2))
            if output_indices is not None:
                mean, cov = mean[..., output_indices], cov[:, output_indices]
            self._num_outputs = mean.shape[-1]
            mean = mean.to(X.dtype).reshape(*batch, *mean.shape[1:])
            cov = cov.to(X.dtype).reshape(*batch, *cov.shape[1:])
            result = GPyTorchPosterior(_mvn(mean, cov))
        else:
            raise InputError(f"{type(self.bm).__name__}.posterior returned a "
                             f"{type(posterior).__name__}; the bridge needs a Gaussian or "
                             "sampled posterior")
        return result if posterior_transform is None else posterior_transform(result)


def _mvn(mean: torch.Tensor, cov: torch.Tensor) -> MultivariateNormal:
    """Independent per-output joint normals: mean [..., q, m], cov [..., m, q, q]."""
    # A lazy covariance: GPyTorch factorizes it only when sampling, with its own
    # jitter retries, instead of torch's eager Cholesky that fails on rank deficiency.
    mvns = [MultivariateNormal(mean[..., k], to_linear_operator(cov[..., k, :, :]))
            for k in range(mean.shape[-1])]
    if len(mvns) == 1:
        return mvns[0]
    return MultitaskMultivariateNormal.from_independent_mvns(mvns)


def as_botorch_model(bm: BayesianModel, *, num_samples: int | None = None,
                     seed: int = 0) -> BayesianModelBridge:
    """A BoTorch ``Model`` backed by a fitted regression BayesianModel.

    Args:
        bm: the fitted model (``task="regression"``).
        num_samples: ensemble size S for sampling methods (method default when ``None``).
        seed: seed of the ensemble members for sampling methods.

    Returns:
        A :class:`BayesianModelBridge`: its posterior at X [..., q, d] is a joint MVN
        for Gaussian posteriors (full q × q covariance where the method has it, else
        diagonal) and an ensemble of S fixed draws for sampling methods, over the
        latent function in the model's output units, differentiable in X.

    Example:
        >>> model = as_botorch_model(bayesify(None, "gp", task="regression").fit((X, y)))
        >>> acqf = botorch.acquisition.qLogExpectedImprovement(model, best_f=y.max())
    """
    return BayesianModelBridge(bm, num_samples=num_samples, seed=seed)


def is_gaussian(model: BayesianModelBridge, dim: int) -> bool:
    """Whether the bridge's posterior is Gaussian (analytic acquisitions apply)."""
    with torch.no_grad():
        probe = torch.full((1, 1, dim), 0.5, dtype=torch.float64)
        return isinstance(model.posterior(probe), GPyTorchPosterior)
