"""Curvature of a network's negative log likelihood: the pieces Laplace accumulates.

Notation: B points per chunk, K network outputs, P covered weights, φ̃ = [φ, 1] the
features entering a last layer (with a 1 for its bias). The curvature is

    H = Σ_n J_nᵀ Λ_n J_n,

with J_n = ∂f(x_n)/∂θ [K, P] and Λ_n the output curvature: the Hessian of the negative
log likelihood in f (the generalized Gauss-Newton, GGN: diag(p) − ppᵀ for the softmax,
diag(1/σ²) for Gaussian noise) or ∇ℓ∇ℓᵀ (the empirical Fisher, EF). Every Λ_n is
written as Σ_s v_s v_sᵀ, "square-root rows" v [B, R, S, K] grouped into R *pieces*: a
Gaussian regressor's GGN keeps one piece per output at unit noise, so the observation
noise can be tuned afterwards (H = Σ_r H_r / σ_r²); everything else has one piece.

* :func:`output_sqrt` — the rows v from network outputs;
* last layer, closed form in φ̃ (no Jacobians): Λ_n = diag(a_n) + sign·u_n u_nᵀ with
  :func:`ll_lambda`; :func:`ll_full`, :func:`ll_diag`, :func:`ll_kron`, :func:`ll_matvec`;
* any module, Jacobians by ``torch.func``: :func:`batch_jacobian`, :func:`sqrt_jacobian`;
* K-FAC for Linear/Conv2d by forward hooks and batched backward passes:
  :class:`KronHooks`;
* :func:`subspace_iteration`: the top eigenpairs of H from matrix-vector products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from bayesify._batching import Inputs, num_rows, take_rows
from bayesify._network import OutputFn, call_network
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.layers.laplace_layout import Group, ParameterLayout

__all__ = [
    "KronHooks",
    "as_outputs",
    "batch_jacobian",
    "ll_diag",
    "ll_full",
    "ll_kron",
    "ll_lambda",
    "ll_matvec",
    "output_sqrt",
    "sqrt_jacobian",
    "subspace_iteration",
]

CURVATURES = ("ggn", "ef")


def as_outputs(output: object, batch: int) -> torch.Tensor:
    """Network output as [B, K] (a regressor's [B] becomes [B, 1])."""
    if not isinstance(output, torch.Tensor):
        raise UnsupportedModelError(
            f"Laplace needs the network to return a tensor of logits or means, got "
            f"{type(output).__name__}; wrap it so forward returns the tensor")
    if output.dim() == 1:
        output = output[:, None]
    if output.dim() != 2 or output.shape[0] != batch:
        raise UnsupportedModelError(f"Laplace needs outputs [N, K] (or [N] for one regression "
                                    f"output), got shape {list(output.shape)}")
    return output


def output_sqrt(task: str, curvature: str, f: torch.Tensor, y: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """Square-root rows of the output curvature, Λ_n = Σ_{r,s} v_{nrs} v_{nrs}ᵀ.

    Args:
        task: ``"classification"`` or ``"regression"``.
        curvature: ``"ggn"`` or ``"ef"``.
        f: outputs [B, K] (detached).
        y: labels [B] or targets [B, K].
        weights: 1/σ² per output [K] (regression EF; the GGN pieces are at unit noise).

    Returns:
        v [B, R, S, K]: classification GGN R=1, S=K (v_s = √p_s (e_s − p)); regression
        GGN R=K, S=1 (v = e_r); EF R=S=1 (v = ∇_f ℓ).
    """
    b, k = f.shape
    if task == "classification":
        p = torch.softmax(f, -1)
        residual = p - F.one_hot(y, k).to(f.dtype)
        if curvature == "ef":
            return residual[:, None, None, :]
        eye = torch.eye(k, dtype=f.dtype, device=f.device)
        return (p.sqrt()[:, :, None] * (eye - p[:, None, :]))[:, None]
    if curvature == "ef":
        return ((f - y) * weights)[:, None, None, :]
    return torch.eye(k, dtype=f.dtype, device=f.device).expand(b, k, k)[:, :, None, :]


# ---------------------------------------------------------------- last layer, in φ̃


def ll_lambda(task: str, curvature: str, f: torch.Tensor, y: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """Λ_n = diag(a_n) + sign·u_n u_nᵀ for a last layer with C outputs.

    Returns:
        ``(a [B, C] or None, u [B, C] or None, sign)``: softmax GGN (p, p, −1); EF
        (None, ∇_f ℓ, +1); regression GGN (the unit-noise pieces, a = 1, u = None).
    """
    if task == "classification":
        p = torch.softmax(f, -1)
        if curvature == "ef":
            return None, p - F.one_hot(y, f.shape[1]).to(f.dtype), 1.0
        return p, p, -1.0
    if curvature == "ef":
        return None, (f - y) * weights, 1.0
    return torch.ones_like(f), None, 0.0


def ll_full(phi: torch.Tensor, a: torch.Tensor | None, u: torch.Tensor | None,
            sign: float) -> torch.Tensor:
    """Σ_n Λ_n ⊗ φ̃_nφ̃_nᵀ over a chunk, [C·D, C·D] (rows of W row-major).

    Args:
        phi: φ̃ [B, D]; a, u, sign: from :func:`ll_lambda` ([B, C] each).
    """
    b, d = phi.shape
    c = (a if a is not None else u).shape[1]
    h = phi.new_zeros(c, d, c, d)
    if a is not None:
        blocks = torch.einsum("nc,ni,nj->cij", a, phi, phi)
        idx = torch.arange(c, device=phi.device)
        h[idx, :, idx, :] = blocks
    h = h.reshape(c * d, c * d)
    if u is not None:
        v = (u[:, :, None] * phi[:, None, :]).reshape(b, c * d)
        h = h + sign * (v.T @ v)
    return h


def ll_diag(phi: torch.Tensor, a: torch.Tensor | None, u: torch.Tensor | None,
            sign: float) -> torch.Tensor:
    """diag(Σ_n Λ_n ⊗ φ̃_nφ̃_nᵀ) over a chunk, [C, D]."""
    weight = (a if a is not None else 0) + (sign * u.pow(2) if u is not None else 0)
    return weight.T @ phi.pow(2)


def ll_kron(phi: torch.Tensor, a: torch.Tensor | None, u: torch.Tensor | None,
            sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC factors of a chunk: A = Σ φ̃φ̃ᵀ [D, D] and G = Σ Λ_n [C, C]."""
    g = torch.diag(a.sum(0)) if a is not None else 0
    if u is not None:
        g = g + sign * (u.T @ u)
    return phi.T @ phi, g


def ll_matvec(phi: torch.Tensor, a: torch.Tensor | None, u: torch.Tensor | None,
              sign: float, vectors: torch.Tensor) -> torch.Tensor:
    """(Σ_n Λ_n ⊗ φ̃_nφ̃_nᵀ) V for V [C, D, r] without forming the matrix; [C, D, r]."""
    t = torch.einsum("cir,ni->ncr", vectors, phi)
    s = 0
    if a is not None:
        s = a[:, :, None] * t
    if u is not None:
        s = s + sign * u[:, :, None] * torch.einsum("nc,ncr->nr", u, t)[:, None, :]
    return torch.einsum("ncr,ni->cir", s, phi)


# ---------------------------------------------------------------- Jacobians (torch.func)


def batch_jacobian(model: nn.Module, layout: ParameterLayout, x: Inputs,
                   index: torch.Tensor | None = None, *,
                   output: OutputFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and per-point Jacobians of any module (its train/eval flags as they are).

    Args:
        model: the network; x: inputs [B, ...] (a tensor, or a mapping or tuple of them
            as the network takes; the graph to x is kept).
        layout: the covered weights; index: a subnetwork's positions in them.
        output: picks the logits or means from an output that is not a tensor (see
            :mod:`bayesify._network`).

    Returns:
        ``(f [B, K], J [B, K, P])``.
    """
    params = {n: p.detach() for n, p in layout.parameters().items()}

    def single(p: dict[str, torch.Tensor], xi: Inputs):
        out = call_network(model, take_rows(xi, None), params=p, output=output)
        out = out.reshape(-1)
        return out, out

    jac, f = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(params, x)
    flat = layout.flatten(jac, batch_dims=2)
    if index is not None:
        flat = flat[..., index]
    return f, flat


def sqrt_jacobian(v: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """M = vᵀJ, the rows whose Gram matrix is the chunk's curvature, [B, R, S, P]."""
    return torch.einsum("brsk,bkp->brsp", v, jac)


# ---------------------------------------------------------------- K-FAC by hooks


def _unfold(module: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation,
                       padding=module.padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class KronHooks:
    """K-FAC factors of affine groups, from forward hooks and batched backward passes.

    For a layer with inputs a (plus a 1 for the bias) and output gradients g per
    position t (one position for a Linear on [B, in], H·W for a convolution),
    A = Σ_{n,t} a aᵀ, G_r = Σ_{n,t,s} g gᵀ per piece r, and H ≈ G ⊗ A / (N·T)
    (K-FAC-expand for shared weights). The backward passes run for the square-root
    rows of Λ (``torch.autograd.grad(..., is_grads_batched=True)``), so no Jacobian
    and no parameter gradient is formed; BatchNorm and skip connections need nothing
    special.
    """

    def __init__(self, model: nn.Module, groups: list[Group], pieces: int, *,
                 output: OutputFn | None = None):
        self.model = model
        self.output = output
        self.groups = groups
        self.pieces = pieces
        self.factors_a: list[torch.Tensor | int] = [0] * len(groups)
        self.factors_g: list[torch.Tensor | int] = [0] * len(groups)
        self.counts = [0] * len(groups)
        self._records: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        self._records = [[] for _ in self.groups]
        handles = []
        for i, g in enumerate(self.groups):
            def hook(module, inputs, output, i=i):
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                self._records[i].append((inputs[0].detach(), output))
                return output
            handles.append(g.module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def step(self, x: Inputs, sqrt_rows: Callable[[torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
        """Accumulate the factors of one chunk; returns the detached outputs [B, K].

        Args:
            x: inputs [B, ...] (a tensor, a mapping or a tuple of them);
                sqrt_rows: maps outputs [B, K] to v [B, R, S, K].
        """
        with torch.enable_grad(), self._hooked():
            out = as_outputs(call_network(self.model, x, output=self.output), num_rows(x))
            v = sqrt_rows(out.detach())
            b, r, s, k = v.shape
            grad_outputs = v.permute(1, 2, 0, 3).reshape(r * s, b, k)
            tensors = [o for rec in self._records for _, o in rec]
            if not tensors:
                raise UnsupportedModelError("hessian='kron' found no call of the covered "
                                            "Linear/Conv2d modules in the forward pass")
            grads = self._backward(out, tensors, grad_outputs)
        pos = 0
        for i, (g, rec) in enumerate(zip(self.groups, self._records, strict=True)):
            for a_in, _ in rec:
                grad = grads[pos]
                pos += 1
                if grad is None:
                    continue
                self._accumulate(i, g, a_in, grad, r, s)
        return out.detach()

    @staticmethod
    def _backward(out: torch.Tensor, tensors: list[torch.Tensor],
                  grad_outputs: torch.Tensor) -> list[torch.Tensor | None]:
        try:
            return list(torch.autograd.grad(out, tensors, grad_outputs=grad_outputs,
                                            is_grads_batched=True, allow_unused=True))
        except RuntimeError:
            # An op without a batching rule: one backward pass per row instead.
            rows = [torch.autograd.grad(out, tensors, grad_outputs=go, allow_unused=True,
                                        retain_graph=True) for go in grad_outputs]
            return [None if rows[0][j] is None else torch.stack([row[j] for row in rows])
                    for j in range(len(tensors))]

    def _accumulate(self, i: int, g: Group, a_in: torch.Tensor, grad: torch.Tensor,
                    r: int, s: int) -> None:
        if isinstance(g.module, nn.Conv2d):
            a = _unfold(g.module, a_in)
            grad = grad.movedim(2, -1)  # [RS, B, out, H, W] -> [RS, B, H, W, out]
        else:
            a = a_in.reshape(-1, a_in.shape[-1])
        if a.shape[1] != g.in_features:
            raise UnsupportedModelError(f"hessian='kron': the inputs of {g.label} have "
                                        f"{a.shape[1]} features, expected {g.in_features}")
        if g.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        grad = grad.reshape(r, -1, g.out_features)
        self.factors_a[i] = self.factors_a[i] + a.T @ a
        self.factors_g[i] = self.factors_g[i] + torch.einsum("rmi,rmj->rij", grad, grad)
        self.counts[i] += a.shape[0]


# ---------------------------------------------------------------- low rank


def subspace_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, rank: int,
                       *, iterations: int = 4, oversample: int = 10,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenpairs of a PSD matrix known by its products (randomized
    subspace iteration with Rayleigh-Ritz; each product is one pass over the data).

    Args:
        matvec: V [size, m] ↦ H V [size, m].
        size: P; rank: eigenpairs to keep.

    Returns:
        ``(U [P, rank], λ [rank])``, orthonormal columns, eigenvalues ≥ 0, descending.
    """
    if rank > size:
        raise InputError(f"`rank` must be <= the number of covered weights ({size}), got "
                         f"{rank}")
    m = min(size, rank + oversample)
    omega = torch.randn(size, m, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(omega.to(device=device, dtype=dtype))
    for _ in range(iterations):
        q, _ = torch.linalg.qr(matvec(q))
    hq = matvec(q)
    small = q.T @ hq
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    order = torch.argsort(values, descending=True)[:rank]
    return q @ vectors[:, order], values[order].clamp_min(0)
