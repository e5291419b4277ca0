"""Covariance parameterizations and the prior terms of variational Bayesian last layers.

A VBLL head keeps one Gaussian N(w̄_k, S_k) over each of its m weight rows (or class
means) of dimension d. :class:`VBLLCovariance` holds the m covariances S_k in one of
three forms and offers exactly the quantities the ELBO and the predictive need, none of
which forms an inverse:

* ``"dense"``: S = L Lᵀ with L lower triangular, positive diagonal by ``exp``;
  φᵀSφ = ‖Lᵀφ‖², tr S = ‖L‖²_F, log det S = 2 Σ log L_ii.  O(B·m·d²) per batch.
* ``"diagonal"``: S = diag(exp(2·log_std)).  O(B·m·d).
* ``"lowrank"``: S = U Uᵀ + diag(exp(2·log_std)) with U [d, r];
  log det S by the matrix determinant lemma through the Cholesky factor of the r×r
  capacitance I + Uᵀ D⁻¹ U (D is diagonal, so D⁻¹ is elementwise).  O(B·m·d·r).

:func:`wishart_log_prior` and the KL of :func:`bayesify._linalg.gaussian_kl` are the
regularizers of the ELBO (METHODS.md, VBLL); every factorization goes through
:func:`bayesify._linalg.psd_cholesky`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bayesify._linalg import gaussian_kl, psd_cholesky
from bayesify._validation import check_choice, check_positive_int
from bayesify.errors import InputError

__all__ = ["COVARIANCES", "VBLLCovariance", "wishart_log_prior"]

COVARIANCES = ("dense", "diagonal", "lowrank")

# A small nonzero low-rank factor at initialization: U = 0 is a stationary point of
# every term of the ELBO (all gradients in U are linear in U), so training would never
# leave it.
_LOWRANK_INIT = 0.1


def wishart_log_prior(log_var: torch.Tensor, dof: float, scale: float) -> torch.Tensor:
    """The Wishart-type log prior of a diagonal noise covariance Σ = diag(exp(log_var)).

    ν·log det Σ⁻¹ − ½·c·tr Σ⁻¹ with ν = (dof + n + 1)/2, n the dimension of Σ and
    c = ``scale`` (up to a constant in Σ).

    Args:
        log_var: log σ² per dimension [n].
        dof: the degrees of freedom.
        scale: the Wishart scale c.

    Returns:
        A scalar.
    """
    nu = 0.5 * (dof + log_var.shape[-1] + 1)
    return -nu * log_var.sum() - 0.5 * scale * torch.exp(-log_var).sum()


class VBLLCovariance(nn.Module):
    """The covariances S_1..S_m of m Gaussian rows of dimension d.

    Args:
        num_rows: m, the number of rows (outputs or classes).
        dim: d, the dimension of each row (the feature width).
        kind: ``"dense"``, ``"diagonal"`` or ``"lowrank"``.
        rank: r, the rank of the low-rank part (``"lowrank"`` only; default min(d, 10)).
        init_std: the initial standard deviation of every weight (the diagonal of L,
            or √diag S); default d^-½, the prior's scale.

    Initialization is deterministic: S_k = init_std²·I (plus, for ``"lowrank"``, a
    small fixed factor U = 0.1·init_std·[I_r; 0]).
    """

    def __init__(self, num_rows: int, dim: int, kind: str = "dense", *,
                 rank: int | None = None, init_std: float | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.num_rows = check_positive_int(num_rows, "num_rows")
        self.dim = check_positive_int(dim, "dim")
        self.kind = check_choice(kind, "covariance", COVARIANCES)
        init_std = dim ** -0.5 if init_std is None else float(init_std)
        factory = {"dtype": dtype, "device": device}
        self.log_std = nn.Parameter(torch.full((num_rows, dim), math.log(init_std), **factory))
        self.rank = 0
        if kind == "dense":
            # Only the strictly lower triangle is used; the rest stays zero (zero gradient).
            self.tril = nn.Parameter(torch.zeros(num_rows, dim, dim, **factory))
        elif kind == "lowrank":
            self.rank = check_positive_int(min(dim, 10) if rank is None else rank, "rank")
            factor = _LOWRANK_INIT * init_std * torch.eye(dim, self.rank, **factory)
            self.factor = nn.Parameter(factor.expand(num_rows, dim, self.rank).clone())
        if kind != "lowrank" and rank is not None:
            raise InputError(f"`rank` applies to covariance='lowrank' only, got rank={rank!r} "
                             f"with covariance={kind!r}")

    # ------------------------------------------------------------------ structure

    def scale_tril(self) -> torch.Tensor:
        """L [m, d, d] with S = L Lᵀ (``"dense"`` only)."""
        # One [m, d, d] pass each way: tril, then the diagonal written in place of zeros.
        return torch.diagonal_scatter(torch.tril(self.tril, diagonal=-1), self.log_std.exp(),
                                      dim1=-2, dim2=-1)

    def diagonal(self) -> torch.Tensor:
        """diag S_k for every row [m, d]."""
        if self.kind == "dense":
            return self.scale_tril().pow(2).sum(-1)
        diag = torch.exp(2 * self.log_std)
        if self.kind == "lowrank":
            diag = diag + self.factor.pow(2).sum(-1)
        return diag

    def covariance(self) -> torch.Tensor:
        """The full matrices S [m, d, d] (for inspection and tests; O(m·d²) memory)."""
        if self.kind == "dense":
            L = self.scale_tril()
            return L @ L.transpose(-1, -2)
        S = torch.diag_embed(torch.exp(2 * self.log_std))
        if self.kind == "lowrank":
            S = S + self.factor @ self.factor.transpose(-1, -2)
        return S

    # ------------------------------------------------------- quantities of the ELBO

    def quad(self, phi: torch.Tensor) -> torch.Tensor:
        """φᵀ S_k φ for every input and row: phi [B, d] -> [B, m]."""
        return self.terms(phi)[0]

    def joint(self, phi: torch.Tensor) -> torch.Tensor:
        """φ_iᵀ S_k φ_j for every pair of q points and row: phi [..., q, d] -> [..., m, q, q].

        The covariance over points of the k-th output's mean w_kᵀφ (its diagonal is
        :meth:`quad`); no inverse and no [d, d] matrix beyond the dense factor.
        """
        phi = phi.unsqueeze(-3)  # [..., 1, q, d]
        if self.kind == "dense":
            projected = phi @ self.scale_tril()  # [..., m, q, d]: rows of φ L_k
            return projected @ projected.transpose(-1, -2)
        var = torch.exp(2 * self.log_std)  # [m, d]
        cov = (phi * var.unsqueeze(-2)) @ phi.transpose(-1, -2)
        if self.kind == "lowrank":
            low = phi @ self.factor  # [..., m, q, r]
            cov = cov + low @ low.transpose(-1, -2)
        return cov

    def trace(self) -> torch.Tensor:
        """tr S_k [m]."""
        return self.terms()[1]

    def logdet(self) -> torch.Tensor:
        """log det S_k [m]."""
        return self.terms()[2]

    def terms(self, phi: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """φᵀS_kφ [B, m] (``None`` without ``phi``), tr S_k [m] and log det S_k [m].

        One call builds the factor once for all three, as a training step needs them.
        """
        logdet = 2 * self.log_std.sum(-1)
        if self.kind == "dense":
            L = self.scale_tril()
            trace = L.pow(2).sum((-1, -2))
            quad = None
            if phi is not None:
                # ‖L_kᵀφ‖² for all k from one GEMM [B, d] x [d, m·d]; no inverse.
                m, d, _ = L.shape
                projected = phi @ L.transpose(0, 1).reshape(d, m * d)
                quad = projected.reshape(-1, m, d).pow(2).sum(-1)
            return quad, trace, logdet
        var = torch.exp(2 * self.log_std)
        trace = var.sum(-1)
        quad = None if phi is None else phi.pow(2) @ var.T
        if self.kind == "lowrank":
            m, d, r = self.factor.shape
            trace = trace + self.factor.pow(2).sum((-1, -2))
            if phi is not None:
                low = phi @ self.factor.permute(1, 0, 2).reshape(d, m * r)
                quad = quad + low.reshape(-1, m, r).pow(2).sum(-1)
            # det(D + UUᵀ) = det D · det(I + Uᵀ D⁻¹ U)  (matrix determinant lemma).
            chol = psd_cholesky(self.capacitance(var), name="low-rank capacitance matrix")
            logdet = logdet + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return quad, trace, logdet

    def capacitance(self, diag: torch.Tensor) -> torch.Tensor:
        """I_r + Uᵀ diag(diag)⁻¹ U [m, r, r] for a positive diagonal ``diag`` [m, d]."""
        scaled = self.factor / diag.unsqueeze(-1)
        eye = torch.eye(self.rank, dtype=diag.dtype, device=diag.device)
        return eye + self.factor.transpose(-1, -2) @ scaled

    def kl(self, mean: torch.Tensor, prior_var: float) -> torch.Tensor:
        """KL of each row's posterior N(mean_k, S_k) from N(0, prior_var·I) [m]."""
        _, trace, logdet = self.terms()
        return gaussian_kl(mean, trace, logdet, prior_var)

    @torch.no_grad()
    def reset(self, std: torch.Tensor) -> None:
        """Set S_k = diag(std_k²) (a diagonal start), std [m, d] or broadcastable."""
        self.log_std.copy_(torch.as_tensor(std, dtype=self.log_std.dtype,
                                           device=self.log_std.device).log().expand_as(self.log_std))
        if self.kind == "dense":
            self.tril.zero_()
        elif self.kind == "lowrank":
            eye = torch.eye(self.dim, self.rank, dtype=self.factor.dtype, device=self.factor.device)
            self.factor.copy_(_LOWRANK_INIT * self.log_std.exp().unsqueeze(-1) * eye)

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.kind == "lowrank" else ""
        return f"rows={self.num_rows}, dim={self.dim}, kind={self.kind!r}{rank}"

