"""The factored Laplace structures, K-FAC and low rank, and the table of all four.

See :mod:`bayesify.layers.laplace_posterior` for the interface every structure offers
(``logdet``, ``factor``, ``apply_sqrt``, ``sample``, ``ll_cov``).
"""

from __future__ import annotations

import torch

from bayesify._linalg import psd_cholesky
from bayesify.errors import InputError
from bayesify.layers.laplace_layout import Group
from bayesify.layers.laplace_posterior import (
    DiagLaplace,
    FullLaplace,
    LaplaceStructure,
    _diagonal_cov,
)

__all__ = ["STRUCTURES", "KronLaplace", "LowRankLaplace"]


class KronLaplace(LaplaceStructure):
    """K-FAC: per affine group H ≈ G ⊗ A / (N·T), eigendecomposed (A = Q_A Λ_A Q_Aᵀ,
    G = Q_G Λ_G Q_Gᵀ) so (H + δ)⁻¹ has the square root (Q_G ⊗ Q_A) diag(S^-½) with
    S = Λ_G Λ_Aᵀ/(N·T) + δ; plain groups (BatchNorm, ...) are diagonal blocks. The prior
    precision is one value per group."""

    name = "kron"

    def __init__(self, num_params: int, groups: list[Group], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_params, groups)
        names = []
        for i, g in enumerate(groups):
            if g.kind == "affine":
                for n in (f"a_{i}", f"g_{i}", f"count_{i}"):
                    self._register(n, dtype, device)
                names += [f"a_{i}", f"g_{i}"]
            else:
                self._register(f"h_{i}", dtype, device)
                names.append(f"h_{i}")
        # instance attribute: the cache key and `ready` follow every group's buffers
        self._buffers_for_cache = tuple(names)

    @property
    def pieces(self) -> int:
        g = self.groups[0]
        return int(getattr(self, "g_0" if g.kind == "affine" else "h_0").shape[0])

    def _eig(self, i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            m = getattr(self, f"{name}_{i}").to(self.fdtype)
            if name == "g":
                m = m[0]
            values, vectors = torch.linalg.eigh((m + m.T) / 2)
            return values.clamp_min(0), vectors
        return self._cached(f"eig_{name}_{i}", build)

    def _g_values(self, i: int, w: torch.Tensor, differentiable: bool) -> tuple:
        if self.pieces == 1:
            values, vectors = self._eig(i, "g")
            return values * w.to(self.fdtype)[0], vectors
        g = torch.einsum("r,rij->ij", w.to(self.fdtype), getattr(self, f"g_{i}").to(self.fdtype))
        g = (g + g.T) / 2
        if differentiable:
            return torch.linalg.eigvalsh(g).clamp_min(0), None
        values, vectors = torch.linalg.eigh(g)
        return values.clamp_min(0), vectors

    def _plain(self, i: int, w: torch.Tensor) -> torch.Tensor:
        h = getattr(self, f"h_{i}").to(self.fdtype).clamp_min(0)
        return (w.to(self.fdtype)[:, None] * h).sum(0)

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for g in self.groups:
            out.append(slice(start, start + g.size))
            start += g.size
        return out

    def logdet(self, prior, group_prior, w) -> torch.Tensor:
        if group_prior is None:
            raise InputError("hessian='kron' takes one prior precision per layer (or a "
                             "scalar), not one per weight; use hessian='diag' or 'full' "
                             "for a per-weight prior")
        total = 0
        for i, g in enumerate(self.groups):
            delta = group_prior[i].to(self.fdtype)
            if g.kind == "affine":
                lam_a, _ = self._eig(i, "a")
                lam_g, _ = self._g_values(i, w, differentiable=True)
                count = float(getattr(self, f"count_{i}"))
                total = total + torch.log(lam_g[:, None] * lam_a[None, :] / count + delta).sum()
            else:
                total = total + torch.log(self._plain(i, w) + delta).sum()
        return total

    def factor(self, prior, group_prior, w) -> list[tuple]:
        if group_prior is None:
            self.logdet(prior, group_prior, w)  # raises the explanation

        def build():
            blocks = []
            for i, g in enumerate(self.groups):
                delta = group_prior[i].to(self.fdtype)
                if g.kind == "affine":
                    lam_a, q_a = self._eig(i, "a")
                    lam_g, q_g = self._g_values(i, w, differentiable=False)
                    count = float(getattr(self, f"count_{i}"))
                    inv_sqrt = (lam_g[:, None] * lam_a[None, :] / count + delta).rsqrt()
                    blocks.append(("affine", q_g, q_a, inv_sqrt))
                else:
                    blocks.append(("plain", (self._plain(i, w) + delta).rsqrt()))
            return blocks
        return self._cached("factor", build, group_prior, w)

    def apply_sqrt(self, fac: list[tuple], jac: torch.Tensor) -> torch.Tensor:
        jac = jac.to(self.fdtype)
        parts = []
        for block, g, sl in zip(fac, self.groups, self._slices(), strict=True):
            part = jac[..., sl]
            if block[0] == "affine":
                _, q_g, q_a, inv_sqrt = block
                mat = part.reshape(*part.shape[:-1], g.out_features, g.columns)
                parts.append(((q_g.T @ mat @ q_a) * inv_sqrt).flatten(-2))
            else:
                parts.append(part * block[1])
        return torch.cat(parts, -1)

    def sample(self, fac: list[tuple], z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.fdtype)
        parts = []
        for block, g, sl in zip(fac, self.groups, self._slices(), strict=True):
            if block[0] == "affine":
                _, q_g, q_a, inv_sqrt = block
                mat = z[..., sl].reshape(*z.shape[:-1], g.out_features, g.columns)
                parts.append((q_g @ (mat * inv_sqrt) @ q_a.T).flatten(-2))
            else:
                parts.append(z[..., sl] * block[1])
        return torch.cat(parts, -1)

    def ll_cov(self, fac: list[tuple], phi: torch.Tensor, classes: int,
               mode: str) -> torch.Tensor:
        _, q_g, q_a, inv_sqrt = fac[0]
        u = phi.to(self.fdtype) @ q_a                        # [..., N, D]
        s_inv = inv_sqrt.pow(2)                              # [C, D]
        if mode == "joint":
            inner = torch.einsum("...nj,...mj,ij->...inm", u, u, s_inv)
            return torch.einsum("ki,...inm->...knm", q_g.pow(2), inner)
        m = u.pow(2) @ s_inv.T                               # [..., N, C]
        if mode == "diag":
            return m @ q_g.pow(2).T
        return torch.einsum("ci,...ni,di->...ncd", q_g, m, q_g)


class LowRankLaplace(LaplaceStructure):
    """H ≈ U diag(λ) Uᵀ (top eigenpairs at the fit's noise weights w₀) plus the prior:
    with V = P^-½ U diag(λ)^½ = V_q diag(s) Eᵀ, (H + P)⁻¹ has the square root
    P^-½ (I − V_q diag(d) V_qᵀ), d = 1 − (1 + s²)^-½, and log det = Σ log p + Σ log(1 + s²)."""

    name = "lowrank"
    _buffers_for_cache = ("eigenvectors", "eigenvalues", "weights0")

    def __init__(self, num_params: int, groups: list[Group], dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_params, groups)
        for n in self._buffers_for_cache:
            self._register(n, dtype, device)

    @property
    def pieces(self) -> int:
        return int(self.weights0.shape[0])

    def _values(self, w: torch.Tensor) -> torch.Tensor:
        w0 = self.weights0.to(self.fdtype)
        w = w.to(self.fdtype)
        lam = self.eigenvalues.to(self.fdtype).clamp_min(0)
        if self.pieces == 1:
            return lam * (w[0] / w0[0])
        if not torch.allclose(w.detach(), w0, rtol=1e-6):
            raise InputError("hessian='lowrank' keeps the curvature of a multi-output "
                             "regressor at the noise it was fit with; refit after changing "
                             "`sigma_noise`, or use hessian='diag', 'kron' or 'full'")
        return lam

    def _v(self, prior: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        lam = self._values(w)
        return self.eigenvectors.to(self.fdtype) * (lam.sqrt()[None, :]
                                                    * prior.to(self.fdtype).rsqrt()[:, None])

    def logdet(self, prior, group_prior, w) -> torch.Tensor:
        v = self._v(prior, w)
        eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
        chol = psd_cholesky(eye + v.T @ v, name="low-rank capacitance matrix")
        return prior.to(self.fdtype).log().sum() + 2 * chol.diagonal().log().sum()

    def factor(self, prior, group_prior, w) -> tuple[torch.Tensor, ...]:
        def build():
            v = self._v(prior.detach(), w.detach())
            values, vectors = torch.linalg.eigh(v.T @ v)
            s2 = values.clamp_min(0)
            keep = s2 > 1e-12 * s2.max().clamp_min(1e-300)
            scale = torch.where(keep, s2.clamp_min(1e-300).rsqrt(), torch.zeros_like(s2))
            v_q = v @ vectors * scale
            d = torch.where(keep, 1 - (1 + s2).rsqrt(), torch.zeros_like(s2))
            return prior.detach().to(self.fdtype).rsqrt(), v_q, d
        return self._cached("factor", build, prior, w)

    def apply_sqrt(self, fac: tuple[torch.Tensor, ...], jac: torch.Tensor) -> torch.Tensor:
        std, v_q, d = fac
        jp = jac.to(std.dtype) * std
        return jp - ((jp @ v_q) * d) @ v_q.T

    def sample(self, fac: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
        std, v_q, d = fac
        z = z.to(std.dtype)
        return (z - ((z @ v_q) * d) @ v_q.T) * std

    def ll_cov(self, fac: tuple[torch.Tensor, ...], phi: torch.Tensor, classes: int,
               mode: str) -> torch.Tensor:
        std, v_q, d = fac
        phi = phi.to(std.dtype)
        var = std.pow(2).reshape(classes, -1)                          # [C, D]
        vq = (v_q * std[:, None]).reshape(classes, -1, v_q.shape[1])   # [C, D, r]
        y = torch.einsum("...ni,cir->...ncr", phi, vq)
        g = 2 * d - d.pow(2)
        if mode == "joint":
            base = torch.einsum("...ni,ci,...mi->...cnm", phi, var, phi)
            return base - torch.einsum("...ncr,r,...mcr->...cnm", y, g, y)
        base = _diagonal_cov(phi.pow(2) @ var.T, mode)
        if mode == "diag":
            return base - y.pow(2) @ g
        return base - torch.einsum("...ncr,r,...nkr->...nck", y, g, y)


STRUCTURES = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace,
              "lowrank": LowRankLaplace}
