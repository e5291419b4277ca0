"""Numerics shared by every layer and method: the one jittered Cholesky and the one
Gaussian KL.

Every factorization of a matrix that must be positive definite (GP kernel matrices,
VBLL class covariances, low-rank capacitance matrices, Laplace precisions, OOD feature
covariances) goes through :func:`psd_cholesky`, so NaN checks, jitter and the error a
user sees are the same everywhere.
"""

from __future__ import annotations

import math
import warnings

import torch

from bayesify.errors import JitterWarning, NotPSDError

__all__ = ["gaussian_kl", "psd_cholesky"]

_MAX_TRIES = 6


def _initial_jitter(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-6


def psd_cholesky(
    matrix: torch.Tensor,
    *,
    name: str = "matrix",
    max_tries: int = _MAX_TRIES,
    warn: bool = True,
    return_jitter: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of (a batch of) symmetric positive definite matrices.

    A batch member whose factorization fails is retried with jitter ``ε·mean|diag|``
    (of that member) added to its diagonal, ε growing tenfold from 1e-8 (float64) or
    1e-6 (lower precision); members that factorize are left exactly as they are. One
    :class:`~bayesify.errors.JitterWarning` says how much was added at most.

    Args:
        matrix: [..., n, n].
        name: what the matrix is, for the warning and the error ("kernel matrix").
        max_tries: jittered attempts before giving up.
        warn: issue the JitterWarning (callers that retry themselves turn it off).
        return_jitter: also return the jitter added per batch member [...] (0 where
            none was needed).

    Returns:
        L [..., n, n] with ``matrix + diag(jitter) = L Lᵀ``; with ``return_jitter``,
        ``(L, jitter)``.

    Raises:
        NotPSDError: the matrix holds NaN or inf, or a member stays indefinite after
            the largest jitter.
    """
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise NotPSDError(f"the {name} must be square [..., n, n], got {list(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise NotPSDError(f"the {name} contains NaN or infinite entries; check the inputs "
                          "and hyperparameters that built it")
    factor, info = torch.linalg.cholesky_ex(matrix)
    batch = matrix.shape[:-2]
    added = torch.zeros(batch, dtype=matrix.dtype, device=matrix.device)
    failed = info != 0
    if not bool(failed.any()):
        return (factor, added) if return_jitter else factor
    scale = matrix.detach().diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    epsilon = _initial_jitter(matrix.dtype)
    for _ in range(max_tries):
        # Only the members that still fail get (more) jitter.
        jitter = torch.where(failed, epsilon * scale, torch.zeros_like(scale))
        retry, retry_info = torch.linalg.cholesky_ex(matrix + jitter[..., None, None] * eye)
        fixed = failed & (retry_info == 0)
        factor = torch.where(fixed[..., None, None], retry, factor)
        added = torch.where(fixed, jitter, added)
        failed = failed & (retry_info != 0)
        if not bool(failed.any()):
            if warn:
                warnings.warn(
                    f"the {name} was not positive definite in {matrix.dtype}; added up to "
                    f"{float(added.max()):.1e} to its diagonal", JitterWarning, stacklevel=2)
            return (factor, added) if return_jitter else factor
        epsilon *= 10
    largest = float((epsilon / 10) * scale.max())
    raise NotPSDError(
        f"the {name} is not positive definite even with {largest:.1e} added to its "
        "diagonal; use float64, remove duplicate inputs, or raise the noise or prior "
        "precision")


def gaussian_kl(mean: torch.Tensor, trace: torch.Tensor, logdet: torch.Tensor,
                prior_var: float | torch.Tensor) -> torch.Tensor:
    """KL(N(μ, S) ‖ N(0, s·I)) for a batch of d-dimensional Gaussians.

    KL = ½[(‖μ‖² + tr S)/s − log det S + d·log s − d]. For elementwise (mean-field)
    Gaussians pass ``mean[..., None]``, ``trace = σ²`` and ``logdet = log σ²``.

    Args:
        mean: posterior means μ [..., d].
        trace: tr S [...].
        logdet: log det S [...].
        prior_var: s, the prior variance of each coordinate (a float or a tensor that
            broadcasts against ``trace``).

    Returns:
        KL per batch member [...].
    """
    d = mean.shape[-1]
    log_s = (math.log(prior_var) if not isinstance(prior_var, torch.Tensor)
             else prior_var.log())
    return 0.5 * ((mean.pow(2).sum(-1) + trace) / prior_var - logdet + d * log_s - d)
