"""Gaussian-process heads: an exact GP and a sparse variational GP (GPyTorch).

Both act on features ``z`` [N, d] that are already scaled to the unit cube (the
caller normalizes inputs or network features) and on standardized targets, the
setting in which BoTorch's current ``SingleTaskGP`` defaults hold (Hvarfner et al.,
ICML 2024): constant mean, an ARD kernel without output scale, lengthscale prior
LogNormal(√2 + ½ ln d, √3) with lengthscale ≥ 0.025, noise prior LogNormal(−4, 1)
with noise ≥ 1e-4.

* :class:`ExactGPHead` holds the training set and computes the exact marginal
  likelihood and posterior in closed form (batched over D independent outputs),
  factorizing with :func:`bayesify._linalg.psd_cholesky`.
* :class:`VariationalGPHead` is a whitened SVGP with inducing points (one latent GP
  per output or class), trained by GPyTorch's ``VariationalELBO`` on minibatches.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from bayesify._linalg import psd_cholesky
from bayesify._math import LOG_2PI
from bayesify._validation import check_choice
from bayesify.checkpoint import mark_dynamic
from bayesify.errors import InputError

with warnings.catch_warnings():
    # linear_operator decorates helpers with torch.jit.script, deprecated since torch 2.10.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    import gpytorch
    from linear_operator.utils.errors import NanError, NotPSDError

#: What GPyTorch raises when a covariance cannot be factorized (NaN, or not PSD).
GPYTORCH_FACTORIZATION_ERRORS = (NanError, NotPSDError)

__all__ = [
    "GPYTORCH_FACTORIZATION_ERRORS",
    "KERNELS",
    "MIN_LENGTHSCALE",
    "MIN_NOISE",
    "ExactGPHead",
    "VariationalGPHead",
    "exact_log_marginal",
    "gaussian_multitask_likelihood",
    "variational_gp",
    "kernel_matrix",
    "lengthscale_prior",
    "noise_prior",
]

KERNELS = ("rbf", "matern")
MIN_LENGTHSCALE = 0.025
MIN_NOISE = 1e-4


# ----------------------------------------------------------------------- priors


def lengthscale_prior(dim: int) -> torch.distributions.LogNormal:
    """BoTorch's dimension-scaled lengthscale prior LogNormal(√2 + ½ ln d, √3)."""
    return torch.distributions.LogNormal(math.sqrt(2) + 0.5 * math.log(dim), math.sqrt(3))


def noise_prior() -> torch.distributions.LogNormal:
    """BoTorch's noise-variance prior LogNormal(−4, 1)."""
    return torch.distributions.LogNormal(-4.0, 1.0)


def _lognormal_mode(prior: torch.distributions.LogNormal) -> float:
    return math.exp(float(prior.loc) - float(prior.scale) ** 2)


def _lognormal_log_prob(prior: torch.distributions.LogNormal, log_value: torch.Tensor
                        ) -> torch.Tensor:
    """log p(v) for v = exp(log_value), computed from log v (no exp/log round trip)."""
    mu, sigma = float(prior.loc), float(prior.scale)
    return (-log_value - math.log(sigma) - 0.5 * LOG_2PI
            - (log_value - mu) ** 2 / (2 * sigma**2))


# ---------------------------------------------------------------------- kernels


def _scaled_sqdist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Squared distances [..., N, M] between rows of x1 [..., N, d] and x2 [..., M, d]."""
    # The expansion keeps memory at N·M (an explicit difference needs N·M·d); the clamp
    # removes the tiny negatives it leaves for (near-)duplicate rows.
    sq1 = x1.pow(2).sum(-1, keepdim=True)
    sq2 = x2.pow(2).sum(-1, keepdim=True).transpose(-1, -2)
    return (sq1 + sq2 - 2 * x1 @ x2.transpose(-1, -2)).clamp_min(0)


def _kernel_from_sqdist(kind: str, r2: torch.Tensor) -> torch.Tensor:
    if kind == "rbf":
        return torch.exp(-0.5 * r2)
    # Matérn 5/2; the floor keeps the gradient of sqrt finite at r = 0, where the
    # kernel's own derivative is zero.
    r = r2.clamp_min(1e-30).sqrt() * math.sqrt(5)
    return (1 + r + r.pow(2) / 3) * torch.exp(-r)


def kernel_matrix(kind: str, x1: torch.Tensor, x2: torch.Tensor,
                  lengthscale: torch.Tensor) -> torch.Tensor:
    """Unit-variance ARD kernel k(x1, x2).

    Args:
        kind: ``"rbf"`` or ``"matern"`` (Matérn ν = 5/2).
        x1: [..., N, d]; x2: [..., M, d].
        lengthscale: [..., 1, d], broadcast against the inputs.

    Returns:
        [..., N, M].
    """
    return _kernel_from_sqdist(kind, _scaled_sqdist(x1 / lengthscale, x2 / lengthscale))


# --------------------------------------------------------------- linear algebra


def exact_log_marginal(factor: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """log N(r | 0, K) from K's Cholesky factor.

    Args:
        factor: L [..., N, N] with K = L Lᵀ.
        residual: r = y − m, [..., N].

    Returns:
        [...], one log marginal likelihood per batch entry.
    """
    white = torch.linalg.solve_triangular(factor, residual.unsqueeze(-1), upper=False)
    n = residual.shape[-1]
    logdet = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * white.squeeze(-1).pow(2).sum(-1) - logdet - 0.5 * n * LOG_2PI


# -------------------------------------------------------------------- exact head


class ExactGPHead(nn.Module):
    """Exact GP regression with D independent outputs on unit-cube features.

    Args:
        dim: d, the feature dimension.
        num_outputs: D, independent GPs sharing nothing but the inputs.
        kernel: ``"rbf"`` (BoTorch's default) or ``"matern"`` (Matérn 5/2).
        noise: ``None`` to learn the noise variance (≥ 1e-4, prior LogNormal(−4, 1)),
            or a fixed noise variance (standardized units).
        ard: one lengthscale per feature (default); ``False`` shares one across
            features (cheaper to fit on wide network features).

    Parameters are kept in log space: ``log_lengthscale`` [D, 1, d or 1], ``log_noise``
    [D], ``mean`` [D]. ``set_train_data(z, y)`` stores the training set (buffers
    ``train_inputs`` [N, d] and ``train_targets`` [N, D], so checkpoints hold it);
    predictions come from :meth:`posterior`.
    """

    def __init__(self, dim: int, num_outputs: int = 1, *, kernel: str = "rbf",
                 noise: float | None = None, ard: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.kernel = check_choice(kernel, "kernel", KERNELS)
        self.dim = dim
        self.num_outputs = num_outputs
        self.fixed_noise = noise
        factory = {"dtype": dtype, "device": device}
        self.log_lengthscale = nn.Parameter(torch.zeros(num_outputs, 1, dim if ard else 1,
                                                        **factory))
        self.log_noise = nn.Parameter(torch.zeros(num_outputs, **factory),
                                      requires_grad=noise is None)
        self.mean = nn.Parameter(torch.zeros(num_outputs, **factory))
        # The training set: its size is set by set_train_data (and taken from a
        # checkpoint on load).
        self.register_buffer("train_inputs", torch.zeros(0, dim, **factory))
        self.register_buffer("train_targets", torch.zeros(0, num_outputs, **factory))
        mark_dynamic(self, "train_inputs", "train_targets")
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(ExactGPHead._clear_cache)
        self.reset_parameters()

    @staticmethod
    def _clear_cache(module: nn.Module, incompatible_keys: object) -> None:
        module._cache = None  # loaded weights invalidate the solve cache

    @property
    def lengthscale(self) -> torch.Tensor:
        """[D, 1, d] (or [D, 1, 1] without ARD)."""
        return self.log_lengthscale.exp()

    @property
    def noise(self) -> torch.Tensor:
        """Observation-noise variance per output [D] (standardized units)."""
        return self.log_noise.exp()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Set hyperparameters to the prior modes, or to prior draws given ``generator``."""
        ls_prior, nz_prior = lengthscale_prior(self.dim), noise_prior()
        if generator is None:
            self.log_lengthscale.fill_(math.log(_lognormal_mode(ls_prior)))
            log_noise = torch.full_like(self.log_noise, math.log(_lognormal_mode(nz_prior)))
        else:
            def draw(prior: torch.distributions.LogNormal, like: torch.Tensor) -> torch.Tensor:
                eps = torch.randn(like.shape, generator=generator, dtype=torch.float64)
                return (float(prior.loc) + float(prior.scale) * eps).to(like)
            self.log_lengthscale.copy_(draw(ls_prior, self.log_lengthscale))
            log_noise = draw(nz_prior, self.log_noise)
        if self.fixed_noise is not None:
            log_noise = torch.full_like(self.log_noise, math.log(self.fixed_noise))
        self.log_noise.copy_(log_noise)
        self.mean.zero_()
        self.clamp_()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project onto the constraints lengthscale ≥ 0.025, noise ≥ 1e-4."""
        self.log_lengthscale.clamp_(min=math.log(MIN_LENGTHSCALE))
        if self.fixed_noise is None:
            self.log_noise.clamp_(min=math.log(MIN_NOISE))
        self._cache = None

    def lower_bounds(self) -> dict[str, float]:
        """Lower bounds of the log-space parameters (for bounded optimizers)."""
        bounds = {"log_lengthscale": math.log(MIN_LENGTHSCALE)}
        if self.fixed_noise is None:
            bounds["log_noise"] = math.log(MIN_NOISE)
        return bounds

    def set_train_data(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Store training features z [N, d] and standardized targets y [N, D]."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise InputError(f"`z` must have shape [N, {self.dim}], got {list(z.shape)}")
        if y.shape != (z.shape[0], self.num_outputs):
            raise InputError(f"`y` must have shape [{z.shape[0]}, {self.num_outputs}], "
                             f"got {list(y.shape)}")
        self.train_inputs = z.detach().to(self.mean)
        self.train_targets = y.detach().to(self.mean)
        self._cache = None

    def train(self, mode: bool = True) -> ExactGPHead:
        if mode:  # parameters may change from here on
            self._cache = None
        return super().train(mode)

    def _train_covariance(self, z: torch.Tensor) -> torch.Tensor:
        k = kernel_matrix(self.kernel, z, z, self.lengthscale)  # [D, N, N]
        eye = torch.eye(z.shape[0], dtype=k.dtype, device=k.device)
        return k + self.noise[:, None, None] * eye

    def log_prior(self) -> torch.Tensor:
        """log p(θ) of the hyperparameters (a scalar)."""
        total = _lognormal_log_prob(lengthscale_prior(self.dim), self.log_lengthscale).sum()
        if self.fixed_noise is None:
            total = total + _lognormal_log_prob(noise_prior(), self.log_noise).sum()
        return total

    def objective(self, z: torch.Tensor | None = None, y: torch.Tensor | None = None,
                  *, warn: bool = True) -> torch.Tensor:
        """Negative log marginal likelihood plus negative log prior, divided by N.

        Args:
            z: features [N, d] (the stored training inputs when ``None``).
            y: standardized targets [N, D] (the stored targets when ``None``).
        """
        z = self.train_inputs if z is None else z
        y = self.train_targets if y is None else y
        factor = psd_cholesky(self._train_covariance(z), name="kernel matrix", warn=warn)
        residual = (y - self.mean).transpose(0, 1)  # [D, N]
        log_marginal = exact_log_marginal(factor, residual).sum()
        return -(log_marginal + self.log_prior()) / z.shape[0]

    def _solve_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L [D, N, N], α = K⁻¹(y − m) [D, N, 1], scaled training inputs [D, N, d])."""
        if self._cache is not None:
            return self._cache
        if self.train_inputs.shape[0] == 0:
            raise InputError("the GP head has no training data; call set_train_data first")
        factor = psd_cholesky(self._train_covariance(self.train_inputs), name="kernel matrix")
        residual = (self.train_targets - self.mean).transpose(0, 1).unsqueeze(-1)
        alpha = torch.cholesky_solve(residual, factor)
        cache = (factor, alpha, self.train_inputs / self.lengthscale)
        if not torch.is_grad_enabled() or not self.training:
            cache = tuple(t.detach() for t in cache)
            self._cache = cache
        return cache

    def posterior(self, z: torch.Tensor, *, joint: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of the latent function at features z [..., B, d].

        Returns:
            ``(mean, cov)``: mean [..., B, D]; with ``joint`` the covariance
            [..., D, B, B] over the B points, else the variances [..., B, D].
        """
        factor, alpha, train_scaled = self._solve_cache()
        zz = z.unsqueeze(-3) / self.lengthscale  # [..., D, B, d]
        r2 = _scaled_sqdist(zz, train_scaled)
        cross = _kernel_from_sqdist(self.kernel, r2)  # [..., D, B, N]
        mean = (cross @ alpha).squeeze(-1) + self.mean[:, None]  # [..., D, B]
        white = torch.linalg.solve_triangular(factor, cross.transpose(-1, -2), upper=False)
        if joint and z.shape[-2] > 1:
            prior = _kernel_from_sqdist(self.kernel, _scaled_sqdist(zz, zz))
            cov = prior - white.transpose(-1, -2) @ white
            return mean.transpose(-1, -2), 0.5 * (cov + cov.transpose(-1, -2))
        # Unit-variance kernel: the prior variance is 1 at every point.
        var = (1 - white.pow(2).sum(-2)).clamp_min(0)
        if joint:
            return mean.transpose(-1, -2), var.unsqueeze(-1)
        return mean.transpose(-1, -2), var.transpose(-1, -2)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_outputs={self.num_outputs}, kernel={self.kernel!r}, "
                f"num_train={self.train_inputs.shape[0]}")


# -------------------------------------------------------------- variational head


class VariationalGPHead(gpytorch.models.ApproximateGP):
    """Whitened sparse variational GP with one latent GP per output or class.

    Args:
        inducing_points: initial inducing locations [M, d] (shared start for every
            latent GP; each learns its own).
        num_latents: L, the number of latent functions (D outputs or C classes).
        kernel: ``"rbf"`` or ``"matern"``.
        outputscale: learn an output scale (classification needs one: the latent
            functions are logits, whose scale is not standardized).
        ard: one lengthscale per feature (default), or one shared.

    ``head(z)`` returns a ``MultitaskMultivariateNormal`` with mean [N, L].
    """

    def __init__(self, inducing_points: torch.Tensor, num_latents: int, *,
                 kernel: str = "rbf", outputscale: bool = False, ard: bool = True):
        check_choice(kernel, "kernel", KERNELS)
        batch = torch.Size([num_latents])
        num_inducing, dim = inducing_points.shape
        distribution = gpytorch.variational.CholeskyVariationalDistribution(
            num_inducing, batch_shape=batch)
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points.expand(num_latents, num_inducing, dim).clone(),
            distribution, learn_inducing_locations=True)
        super().__init__(gpytorch.variational.IndependentMultitaskVariationalStrategy(
            strategy, num_tasks=num_latents))
        self.kernel_name = kernel
        self.num_latents = num_latents
        prior = lengthscale_prior(dim)
        gprior = gpytorch.priors.LogNormalPrior(prior.loc, prior.scale)
        constraint = gpytorch.constraints.GreaterThan(MIN_LENGTHSCALE)
        base_cls = (gpytorch.kernels.RBFKernel if kernel == "rbf"
                    else gpytorch.kernels.MaternKernel)
        base = base_cls(ard_num_dims=dim if ard else None, batch_shape=batch,
                        lengthscale_prior=gprior,
                        lengthscale_constraint=constraint)
        base.lengthscale = _lognormal_mode(prior)
        self.covar_module = (gpytorch.kernels.ScaleKernel(base, batch_shape=batch)
                             if outputscale else base)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z),
                                                         self.covar_module(z))


def gaussian_multitask_likelihood(num_outputs: int) -> gpytorch.likelihoods.Likelihood:
    """Independent per-output Gaussian noise with BoTorch's noise prior and floor."""
    prior = noise_prior()
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(
        num_tasks=num_outputs, rank=0, has_global_noise=False,
        noise_prior=gpytorch.priors.LogNormalPrior(prior.loc, prior.scale),
        noise_constraint=gpytorch.constraints.GreaterThan(MIN_NOISE))
    likelihood.task_noises = torch.full((num_outputs,), _lognormal_mode(prior))
    return likelihood


def variational_gp(inducing_points: torch.Tensor, num_latents: int, *, classification: bool,
                   kernel: str = "rbf", ard: bool = True
                   ) -> tuple[VariationalGPHead, gpytorch.likelihoods.Likelihood]:
    """An SVGP head and its GPyTorch likelihood, on ``inducing_points``' dtype and device.

    Args:
        inducing_points: initial inducing locations [M, d].
        num_latents: L, D regression outputs or C classes.
        classification: a softmax over the L latent GPs (with an output scale) instead
            of independent Gaussian noise per output.
        kernel, ard: as for :class:`VariationalGPHead`.
    """
    head = VariationalGPHead(inducing_points, num_latents, kernel=kernel,
                             outputscale=classification, ard=ard)
    if classification:
        likelihood = gpytorch.likelihoods.SoftmaxLikelihood(num_classes=num_latents,
                                                            mixing_weights=False)
    else:
        likelihood = gaussian_multitask_likelihood(num_latents)
    factory = {"device": inducing_points.device, "dtype": inducing_points.dtype}
    return head.to(**factory), likelihood.to(**factory)
