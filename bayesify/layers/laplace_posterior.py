"""Laplace posteriors N(θ_MAP, (H + P)⁻¹): the common base and the full and diagonal
structures (K-FAC and low rank are in :mod:`bayesify.layers.laplace_structures`).

Each structure stores the curvature H in *pieces* (one per output of a Gaussian
regressor at unit noise, so H(w) = Σ_r w_r H_r with w_r = 1/σ_r²; one piece otherwise)
as buffers whose shape is set by ``fit`` (checkpointed through ``mark_dynamic``), and
offers what the method needs for a prior precision P (one value per weight ``prior``
[P], and per group ``group_prior`` [G] where K-FAC needs it) and weights w [R]:

* ``logdet(prior, group_prior, w)``: log det(H(w) + P), differentiable in the three
  (the marginal likelihood is tuned through it), finite for any P > 0;
* ``factor(...)``: a cached factorization in float64 (recomputed when the buffers or
  hyperparameters change, also after ``load``);
* ``apply_sqrt(f, J)``: J R for a square root R Rᵀ = (H + P)⁻¹, so J Σ Jᵀ = (JR)(JR)ᵀ;
* ``sample(f, z)``: R z, a draw of θ − θ_MAP from z ~ N(0, I);
* ``ll_cov(f, φ̃, mode)``: J Σ Jᵀ of a last layer f = W φ̃ in closed form.

The curvature is projected onto the PSD cone once per fit (negative eigenvalues from
rounding are clamped to 0), so log det and the factorizations never see an indefinite
matrix. Covariance modes: ``"diag"`` [..., N, K], ``"output"`` [..., N, K, K] and
``"joint"`` [..., K, N, N] (per output, over the points of a block).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from bayesify._linalg import psd_cholesky
from bayesify.checkpoint import mark_dynamic
from bayesify.layers.laplace_layout import Group

__all__ = ["DiagLaplace", "FullLaplace", "LaplaceStructure", "factor_dtype"]


def factor_dtype(device: torch.device) -> torch.dtype:
    """float64 for the factorizations, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _psd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrize and clamp negative eigenvalues (rounding) to zero: the projected
    matrix [..., n, n] and its eigenvalues [..., n]."""
    sym = (matrix + matrix.transpose(-1, -2)) / 2
    values, vectors = torch.linalg.eigh(sym)
    values = values.clamp_min(0)
    return (vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2), values


def _is_scalar(prior: torch.Tensor) -> bool:
    """Whether a per-weight prior [P] is one value expanded (a stride-0 view)."""
    return prior.numel() == 1 or (prior.dim() == 1 and prior.stride(0) == 0)


def _diagonal_cov(v: torch.Tensor, mode: str) -> torch.Tensor:
    """A covariance diag(v) over K outputs [..., N, K] in ``mode`` ("diag"/"output")."""
    return v if mode == "diag" else torch.diag_embed(v)


def _ll_jacobian(phi: torch.Tensor, classes: int) -> torch.Tensor:
    """The Jacobian of f = W φ̃ in W's entries, [..., N, C, C·D] (for the full structure,
    whose P² covariance dominates its size anyway)."""
    eye = torch.eye(classes, dtype=phi.dtype, device=phi.device)
    jac = eye[:, :, None] * phi[..., :, None, None, :]
    return jac.reshape(*phi.shape[:-1], classes, classes * phi.shape[-1])


def _cov_from_sqrt(w: torch.Tensor, mode: str) -> torch.Tensor:
    """J Σ Jᵀ from W = J R [..., N, K, P']."""
    if mode == "diag":
        return w.pow(2).sum(-1)
    if mode == "output":
        return w @ w.transpose(-1, -2)
    return torch.einsum("...nkp,...mkp->...knm", w, w)


class LaplaceStructure(nn.Module):
    """Base of the four structures (see the module docstring).

    Args:
        num_params: P, the weights covered.
        groups: their groups (K-FAC needs the affine ones' shapes).
    """

    name: ClassVar[str] = ""
    _buffers_for_cache: ClassVar[tuple[str, ...]] = ("curvature",)

    def __init__(self, num_params: int, groups: list[Group]):
        super().__init__()
        self.num_params = num_params
        self.groups = groups
        self._cache: dict[str, Any] = {}

    def _register(self, name: str, dtype: torch.dtype, device: torch.device) -> None:
        self.register_buffer(name, torch.zeros(0, dtype=dtype, device=device))
        mark_dynamic(self, name)

    @property
    def ready(self) -> bool:
        return all(getattr(self, n).numel() > 0 for n in self._buffers_for_cache)

    @property
    def pieces(self) -> int:
        return int(getattr(self, self._buffers_for_cache[0]).shape[0])

    def _key(self) -> tuple:
        return tuple((id(t), t._version) for t in
                     (getattr(self, n) for n in self._buffers_for_cache))

    def _cached(self, name: str, build: Any, *values: torch.Tensor | None) -> Any:
        """``build()`` once per state of the buffers and of ``values``."""
        key = self._key()
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key and len(hit[1]) == len(values) and all(
                (a is None and b is None) or (a is not None and b is not None
                                              and a.shape == b.shape and torch.equal(a, b))
                for a, b in zip(hit[1], values, strict=True)):
            return hit[2]
        result = build()
        self._cache[name] = (key, [None if v is None else v.detach().clone() for v in values],
                             result)
        return result

    @property
    def fdtype(self) -> torch.dtype:
        return factor_dtype(getattr(self, self._buffers_for_cache[0]).device)

    def ll_cov(self, fac: Any, phi: torch.Tensor, classes: int, mode: str) -> torch.Tensor:
        """J Σ Jᵀ of a last layer at features φ̃ [..., N, D]."""
        return _cov_from_sqrt(self.apply_sqrt(fac, _ll_jacobian(phi, classes)), mode)

    def jac_cov(self, fac: Any, jac: torch.Tensor, mode: str) -> torch.Tensor:
        """J Σ Jᵀ from Jacobians [..., N, K, P]."""
        return _cov_from_sqrt(self.apply_sqrt(fac, jac), mode)


class FullLaplace(LaplaceStructure):
    """Dense H [R, P, P]; Σ from the Cholesky factor L of H + P (R = L⁻ᵀ)."""

    name = "full"

    def __init__(self, num_params: int, groups: list[Group], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_params, groups)
        self._register("curvature", dtype, device)

    def _projected(self) -> torch.Tensor:
        return self._cached("psd", lambda: _psd(self.curvature.to(self.fdtype)))[0]

    def _precision(self, prior: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("r,rpq->pq", w.to(self.fdtype), self._projected())
        return h + torch.diag(prior.to(self.fdtype))

    def logdet(self, prior: torch.Tensor, group_prior: torch.Tensor | None,
               w: torch.Tensor) -> torch.Tensor:
        if self.pieces == 1 and _is_scalar(prior):
            # H + δI: the eigenvalues of H (once per fit) give log det for every δ.
            values = self._cached("psd", lambda: _psd(self.curvature.to(self.fdtype)))[1][0]
            return torch.log(w.to(self.fdtype)[0] * values + prior[0].to(self.fdtype)).sum()
        chol = psd_cholesky(self._precision(prior, w), name="posterior precision H + P")
        return 2 * chol.diagonal().log().sum()

    def factor(self, prior: torch.Tensor, group_prior: torch.Tensor | None,
               w: torch.Tensor) -> torch.Tensor:
        return self._cached("factor", lambda: psd_cholesky(
            self._precision(prior, w).detach(), name="posterior precision H + P"), prior, w)

    def apply_sqrt(self, fac: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
        flat = jac.reshape(-1, jac.shape[-1]).to(fac.dtype)
        solved = torch.linalg.solve_triangular(fac, flat.T, upper=False)
        return solved.T.reshape(jac.shape)

    def sample(self, fac: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(fac.T, z.to(fac.dtype).T, upper=True).T

    def ll_cov(self, fac: torch.Tensor, phi: torch.Tensor, classes: int,
               mode: str) -> torch.Tensor:
        """From Σ = (H + P)⁻¹ as blocks Σ_cc' [D, D]: φ̃ᵀΣ_cc'φ̃, no Jacobian formed."""
        sigma = self._cached("covariance", lambda: torch.cholesky_inverse(fac), fac)
        d = phi.shape[-1]
        s4 = sigma.reshape(classes, d, classes, d)
        phi = phi.to(sigma.dtype)
        if mode == "output":
            return torch.einsum("...ni,cidj,...nj->...ncd", phi, s4, phi)
        blocks = s4.diagonal(dim1=0, dim2=2).permute(2, 0, 1)          # Σ_cc [C, D, D]
        if mode == "joint":
            return torch.einsum("...ni,cij,...mj->...cnm", phi, blocks, phi)
        return torch.einsum("...ni,cij,...nj->...nc", phi, blocks, phi)


class DiagLaplace(LaplaceStructure):
    """Diagonal H [R, P]; Σ = diag(1 / (h + p))."""

    name = "diag"

    def __init__(self, num_params: int, groups: list[Group], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_params, groups)
        self._register("curvature", dtype, device)

    def _precision(self, prior: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = (w.to(self.fdtype)[:, None] * self.curvature.to(self.fdtype).clamp_min(0)).sum(0)
        return h + prior.to(self.fdtype)

    def logdet(self, prior, group_prior, w) -> torch.Tensor:
        return self._precision(prior, w).log().sum()

    def factor(self, prior, group_prior, w) -> torch.Tensor:
        return self._cached("factor", lambda: self._precision(prior, w).detach().rsqrt(),
                            prior, w)

    def apply_sqrt(self, fac: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
        return jac.to(fac.dtype) * fac

    def sample(self, fac: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z.to(fac.dtype) * fac

    def ll_cov(self, fac: torch.Tensor, phi: torch.Tensor, classes: int,
               mode: str) -> torch.Tensor:
        var = fac.pow(2).reshape(classes, -1)
        phi = phi.to(fac.dtype)
        if mode == "joint":
            return torch.einsum("...ni,ci,...mi->...cnm", phi, var, phi)
        return _diagonal_cov(phi.pow(2) @ var.T, mode)
