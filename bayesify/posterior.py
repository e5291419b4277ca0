"""Posteriors over a network's latent outputs f at a batch of inputs.

``BayesianModel.posterior(x)`` returns one of two families, and a likelihood
(:mod:`bayesify.likelihoods`) turns either into a Predictive:

* :class:`SampledPosterior`: S joint draws of f, ``[S, N, K]`` (MC dropout, IVON, VI,
  SSVI, HMC, ensembles, SWAG). Row s of every point comes from the same network
  sample, so draws are joint across the N points.
* :class:`GaussianPosterior`: a Gaussian over f with mean ``[N, K]`` and a covariance
  that is zero (a point estimate), diagonal ``[N, K]``, full over the K outputs
  ``[N, K, K]``, or joint over the N points per output ``[K, N, N]`` (deterministic,
  VBLL, GP, Laplace).

Both may carry leading batch dimensions (``[..., N, K]``; the BoTorch bridge asks for
``[b, q, K]`` blocks) and per-point method scores (VBLL's feature density), which the
likelihood passes on to the Predictive.

K is the width of the network's raw output: C logits, D regression means, or 2·D
columns for a heteroscedastic regressor (means, then raw noise scales); the likelihood
knows how to read them.
"""

from __future__ import annotations

import abc

import torch

from bayesify._linalg import psd_cholesky
from bayesify._validation import check_positive_int
from bayesify.errors import InputError

__all__ = ["COVARIANCE_KINDS", "GaussianPosterior", "Posterior", "SampledPosterior"]

COVARIANCE_KINDS = ("zero", "diagonal", "output", "joint")


class Posterior(abc.ABC):
    """A distribution over latent outputs f [..., N, K] at N inputs."""

    def __init__(self, scores: dict[str, torch.Tensor] | None = None):
        self.scores: dict[str, torch.Tensor] = dict(scores or {})

    @property
    @abc.abstractmethod
    def mean(self) -> torch.Tensor:
        """E[f], [..., N, K]."""

    @property
    @abc.abstractmethod
    def variance(self) -> torch.Tensor:
        """Marginal Var[f], [..., N, K]."""

    @abc.abstractmethod
    def sample(self, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Joint draws of f, [S, ..., N, K] (differentiable where the posterior is)."""

    @property
    def num_points(self) -> int:
        """N."""
        return int(self.mean.shape[-2])

    @property
    def num_outputs(self) -> int:
        """K."""
        return int(self.mean.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype


class SampledPosterior(Posterior):
    """S joint draws of the latent outputs.

    Args:
        samples: f drawn from S posterior samples of the network, [S, ..., N, K].
        scores: optional per-point method scores, each [N].
    """

    def __init__(self, samples: torch.Tensor, scores: dict[str, torch.Tensor] | None = None):
        super().__init__(scores)
        if not isinstance(samples, torch.Tensor) or samples.dim() < 3:
            shape = list(samples.shape) if isinstance(samples, torch.Tensor) else None
            raise InputError(f"`samples` must be a tensor [S, N, K], got {shape}")
        self.samples = samples

    @property
    def num_samples(self) -> int:
        """S."""
        return int(self.samples.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.samples.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        return self.samples.var(0, correction=0)

    def sample(self, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The stored draws, [S, ..., N, K]; the first ``num_samples`` of them if given.

        The draws are fixed when the posterior is built, so two calls return the same
        tensor: a BoTorch acquisition sees one fixed ensemble of networks.
        """
        if num_samples is None:
            return self.samples
        num_samples = check_positive_int(num_samples, "num_samples")
        if num_samples > self.num_samples:
            raise InputError(f"`num_samples` is {num_samples}, but this posterior holds "
                             f"{self.num_samples} draws; ask model.posterior(x, "
                             f"num_samples={num_samples}) for more")
        return self.samples[:num_samples]

    def __repr__(self) -> str:
        return f"SampledPosterior(samples={list(self.samples.shape)})"


class GaussianPosterior(Posterior):
    """A Gaussian over the latent outputs.

    Args:
        mean: E[f], [..., N, K].
        covariance: ``None`` (a point estimate), the marginal variance [..., N, K],
            the covariance over outputs [..., N, K, K], or the covariance over the N
            points per output [..., K, N, N]; ``kind`` says which.
        kind: ``"zero"``, ``"diagonal"``, ``"output"`` or ``"joint"``; inferred from
            ``covariance`` when ``None`` (``"output"`` and ``"joint"`` are ambiguous
            when N == K and must then be given).
        scores: optional per-point method scores, each [N].
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor | None = None,
                 kind: str | None = None, scores: dict[str, torch.Tensor] | None = None):
        super().__init__(scores)
        if not isinstance(mean, torch.Tensor) or mean.dim() < 2:
            raise InputError("`mean` must be a tensor [N, K], got "
                             f"{list(mean.shape) if isinstance(mean, torch.Tensor) else mean}")
        n, k = mean.shape[-2:]
        batch = tuple(mean.shape[:-2])
        expected = {"zero": None, "diagonal": (*batch, n, k), "output": (*batch, n, k, k),
                    "joint": (*batch, k, n, n)}
        if kind is None:
            if covariance is None:
                kind = "zero"
            else:
                shape = tuple(covariance.shape)
                matches = [name for name, want in expected.items() if want == shape]
                if len(matches) != 1:
                    raise InputError(
                        f"`covariance` of shape {list(shape)} does not fit a mean of shape "
                        f"{list(mean.shape)}: expected [..., N, K], [..., N, K, K] or "
                        "[..., K, N, N]" + (" (pass `kind=` when N == K)" if matches else ""))
                kind = matches[0]
        if kind not in COVARIANCE_KINDS:
            raise InputError(f"`kind` must be one of {COVARIANCE_KINDS}, got {kind!r}")
        if (kind == "zero") != (covariance is None):
            raise InputError("`covariance` must be None exactly when kind='zero'")
        if covariance is not None and tuple(covariance.shape) != expected[kind]:
            raise InputError(f"`covariance` for kind={kind!r} must have shape "
                             f"{list(expected[kind])}, got {list(covariance.shape)}")
        self._mean = mean
        self.covariance = covariance
        self.kind = kind

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        if self.kind == "zero":
            return torch.zeros_like(self._mean)
        if self.kind == "diagonal":
            return self.covariance
        diagonal = self.covariance.diagonal(dim1=-2, dim2=-1)
        # joint: [..., K, N] per output -> [..., N, K]
        return diagonal if self.kind == "output" else diagonal.transpose(-1, -2)

    @property
    def is_deterministic(self) -> bool:
        """Whether the covariance is exactly zero (a point estimate)."""
        return self.kind == "zero"

    def joint_covariance(self) -> torch.Tensor:
        """The covariance over points per output, [..., K, N, N] (diagonal in N unless
        the method computed it jointly)."""
        if self.kind == "joint":
            return self.covariance
        if self.kind == "output":
            diagonal = self.covariance.diagonal(dim1=-2, dim2=-1)
        else:
            diagonal = self.variance
        return torch.diag_embed(diagonal.transpose(-1, -2))

    def sample(self, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws of f by reparameterization, [S, ..., N, K] (differentiable in the
        mean and covariance)."""
        num_samples = check_positive_int(1 if num_samples is None else num_samples,
                                         "num_samples")
        mean = self._mean
        shape = (num_samples, *mean.shape)
        if self.kind == "zero":
            return mean.expand(shape)
        eps = torch.randn(shape, generator=generator, dtype=mean.dtype, device=mean.device)
        if self.kind == "diagonal":
            return mean + eps * self.covariance.clamp_min(0).sqrt()
        if self.kind == "output":
            factor = psd_cholesky(self.covariance, name="output covariance of the posterior")
            return mean + (factor @ eps.unsqueeze(-1)).squeeze(-1)
        factor = psd_cholesky(self.covariance, name="joint covariance of the posterior")
        # eps [S, ..., N, K] -> [S, ..., K, N, 1]; L [..., K, N, N]
        draws = (factor @ eps.transpose(-1, -2).unsqueeze(-1)).squeeze(-1)
        return mean + draws.transpose(-1, -2)

    def __repr__(self) -> str:
        return f"GaussianPosterior(mean={list(self._mean.shape)}, kind={self.kind!r})"


def reshape_points(posterior: Posterior, blocks: tuple[int, ...]) -> Posterior:
    """Give a posterior over b·q points the block shape [b, q] (independent points).

    Args:
        posterior: over N = b·q points (mean [N, K], samples [S, N, K]).
        blocks: ``(b, q)``.

    Returns:
        The same posterior with mean [b, q, K] (samples [S, b, q, K]).
    """
    if isinstance(posterior, SampledPosterior):
        s = posterior.samples
        return SampledPosterior(s.reshape(s.shape[0], *blocks, s.shape[-1]), posterior.scores)
    if not isinstance(posterior, GaussianPosterior):
        raise InputError(f"cannot reshape a {type(posterior).__name__}")
    mean = posterior.mean.reshape(*blocks, posterior.mean.shape[-1])
    if posterior.kind == "joint":
        raise InputError("a joint posterior over all points cannot be split into blocks")
    cov = posterior.covariance
    if cov is not None:
        cov = cov.reshape(*blocks, *cov.shape[1:])
    return GaussianPosterior(mean, cov, kind=posterior.kind, scores=posterior.scores)
