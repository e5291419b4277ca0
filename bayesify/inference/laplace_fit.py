"""The passes over the training data that build a Laplace approximation.

``fit_curvature(method, x, y, ...)`` runs with the network in eval mode (BatchNorm uses
and keeps its running statistics; dropout is off) and in chunks sized to
``max_memory``, so a large training set never needs more than one chunk of
Jacobians or features at a time:

1. a forward pass for the log likelihood at θ_MAP (the residuals of a regressor, which
   also set its noise σ when none is given) and, for a last layer, its features φ;
2. the curvature: closed form in φ for a last layer, K-FAC by hooks, or Jacobians by
   ``torch.func`` for full, diagonal and low-rank structures; a subnetwork first runs a
   diagonal Laplace over all weights and keeps the ones with the largest variances.

Every allocation whose size grows with the model is estimated first (``estimate``)
and refused over ``max_memory`` with a message naming a cheaper structure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bayesify._batching import Inputs, num_rows, take_rows
from bayesify._progress import progress_bar
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.layers.laplace_curvature import (
    KronHooks,
    as_outputs,
    batch_jacobian,
    ll_diag,
    ll_full,
    ll_kron,
    ll_lambda,
    ll_matvec,
    output_sqrt,
    sqrt_jacobian,
    subspace_iteration,
)
from bayesify.layers.laplace_layout import ParameterLayout, check_memory

if TYPE_CHECKING:
    from bayesify.inference.laplace import LaplaceModel

__all__ = ["chunk_rows", "estimate", "fit_curvature"]

CHEAPER = {"full": "use hessian='kron' or 'diag', or subset='last_layer'",
           "lowrank": "lower `rank=`, or use hessian='kron' or 'diag'",
           "kron": "use hessian='diag', or subset='last_layer'",
           "diag": "cover fewer weights with subset='last_layer' or a list of modules"}


def estimate(hessian: str, layout: ParameterLayout, num_params: int, pieces: int,
             rank: int, itemsize: int) -> float:
    """Bytes of the curvature and its float64 factorization for ``hessian``."""
    p = num_params
    if hessian == "full":
        return p * p * (pieces * itemsize + 3 * 8)
    if hessian == "lowrank":
        return p * (rank + 10) * 8 * 4
    if hessian == "diag":
        return p * (pieces * itemsize + 2 * 8)
    total = 0.0
    for g in layout.groups:
        if g.kind == "affine":
            total += g.columns ** 2 * (itemsize + 3 * 8) + g.out_features ** 2 * (
                pieces * itemsize + 3 * 8)
        else:
            total += g.size * (pieces * itemsize + 2 * 8)
    return total


#: rows per chunk at most: larger chunks do not run faster, they only take memory
MAX_ROWS = 2048


def chunk_rows(per_row: float, limit: int, what: str, fix: str) -> int:
    """Rows per chunk so one chunk takes at most a quarter of ``limit``."""
    check_memory(per_row, f"{what} for one point", limit, fix)
    return max(1, min(MAX_ROWS, int(limit // 4 // max(per_row, 1))))


def _slices(n: int, rows: int) -> list[slice]:
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _itemsize(x: Inputs) -> int:
    """Bytes per number of the inputs for the memory estimates (4 unless floating)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.element_size()
    return 4


def _stats(m: LaplaceModel, x: Inputs, y: torch.Tensor, rows: int,
           progress: bool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log likelihood terms at θ_MAP; returns y as [N] labels or [N, D] targets and the
    cached features φ̃ [N, D] of a last layer (when they fit in memory)."""
    n = num_rows(x)
    keep = m.last_layer and n * (m.head.in_features + 1) * _itemsize(x) * 2 \
        <= m.max_memory // 4
    feats, loglik, rss, targets, width = None, 0.0, 0.0, [], 0
    with torch.no_grad():
        for sl in progress_bar(_slices(n, rows), desc="laplace: data", progress=progress):
            if m.last_layer:
                f, phi = m._features(take_rows(x, sl), check=sl.start == 0)
                if keep:
                    if feats is None:
                        feats = phi.new_empty(n, phi.shape[1])
                    feats[sl] = phi
            else:
                f = as_outputs(m.call_network(take_rows(x, sl)), sl.stop - sl.start)
            yb = m._check_targets(f, y[sl])
            width = f.shape[1]
            if m.task == "classification":
                loglik = loglik + (-F.cross_entropy(f, yb, reduction="sum"))
            else:
                rss = rss + (yb - f).pow(2).sum(0)
            targets.append(yb)
    targets = torch.cat(targets)
    m._set_stats(n, loglik if m.task == "classification" else rss, targets, width)
    return targets, feats


def fit_curvature(m: LaplaceModel, x: Inputs, y: torch.Tensor, *,
                  seed: int | None, progress: bool | None) -> None:
    """Build ``m.structure``'s curvature from the training data X [N, ...] (a tensor, or
    a mapping or tuple of them), y."""
    if num_rows(x) == 0:
        raise InputError("`train` is empty; pass at least one training example")
    item = _itemsize(x)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if m.last_layer:
        d = m.head.in_features + int(m.head.bias is not None)
        c = m.head.out_features
        width = {"full": c * d, "lowrank": c * (m.rank + 10)}.get(m.hessian, c)
        rows = chunk_rows((width + d) * item * 4, m.max_memory, "the last-layer curvature",
                          CHEAPER[m.hessian])
        _check_size(m, item)
        y, feats = _stats(m, x, y, rows, progress)
        _last_layer(m, x, y, feats, rows, generator, progress)
    else:
        with torch.no_grad():  # one row tells the output width: check sizes before the data
            k = as_outputs(m.call_network(take_rows(x, slice(0, 1))), 1).shape[1]
        m.output_width.fill_(k)
        _check_size(m, item)
        rows = 0  # K-FAC of Linear/Conv2d layers needs no Jacobians
        if m.hessian != "kron" or any(g.kind == "plain" for g in m.layout.groups):
            rows = chunk_rows(k * m.layout.num_params * item * 4 + k * k * item, m.max_memory,
                              f"Jacobians over {m.layout.num_params:,} weights",
                              "use subset='last_layer' or hessian='kron'")
        y, _ = _stats(m, x, y, min(256, num_rows(x)), progress)
        _general(m, x, y, rows, generator, progress)


def _check_size(m: LaplaceModel, item: int) -> None:
    fix = CHEAPER[m.hessian]
    if m.last_layer and m.hessian == "kron":
        fix = "use hessian='diag'"
    check_memory(estimate(m.hessian, m.layout, m.num_covered, m._pieces(), m.rank, item),
                 f"hessian={m.hessian!r} over {m.num_covered:,} weights "
                 f"({m.layout.describe()})", m.max_memory, fix)


# ------------------------------------------------------------------ last layer


def _ll_chunks(m: LaplaceModel, x: Inputs, y: torch.Tensor, feats: torch.Tensor | None,
               rows: int, progress: bool | None, desc: str):
    """(φ̃, f, y) per chunk, from cached features or a fresh forward pass."""
    n = num_rows(x)
    with torch.no_grad():
        for sl in progress_bar(_slices(n, rows), desc=desc, progress=progress):
            if feats is not None:
                phi = feats[sl]
                f = phi @ m._head_matrix().T
            else:
                f, phi = m._features(take_rows(x, sl))
            yield phi, f, y[sl]


def _last_layer(m: LaplaceModel, x, y, feats, rows, generator, progress) -> None:
    s, hess, task = m.structure, m.hessian, m.task
    w0 = m._noise_weights().detach()
    c = m.head.out_features
    if task == "regression" and m.curvature == "ggn" and hess != "lowrank":
        a_mat = 0
        for phi, _, _ in _ll_chunks(m, x, y, feats, rows, progress, "laplace: curvature"):
            a_mat = a_mat + phi.T @ phi
        eye = torch.eye(c, dtype=a_mat.dtype, device=a_mat.device)
        if hess == "full":
            s.curvature = torch.stack([torch.kron(torch.diag(eye[r]), a_mat) for r in range(c)])
        elif hess == "diag":
            s.curvature = torch.stack([torch.kron(eye[r], a_mat.diagonal()) for r in range(c)])
        else:
            s.a_0, s.count_0 = a_mat, a_mat.new_tensor(float(num_rows(x)))
            s.g_0 = float(num_rows(x)) * torch.diag_embed(eye)
        return
    if hess == "lowrank":
        d = m.head.in_features + int(m.head.bias is not None)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            out = 0
            for phi, f, yb in _ll_chunks(m, x, y, feats, rows, False, "laplace: low rank"):
                a, u, sign = ll_lambda(task, m.curvature, f, yb, w0)
                if task == "regression" and m.curvature == "ggn":
                    a = a * w0
                out = out + ll_matvec(phi, a, u, sign, v.to(phi.dtype).reshape(c, d, -1))
            return out.reshape(c * d, -1).to(v.dtype)
        _store_lowrank(m, matvec, generator)
        return
    total = [0, 0]
    for phi, f, yb in _ll_chunks(m, x, y, feats, rows, progress, "laplace: curvature"):
        a, u, sign = ll_lambda(task, m.curvature, f, yb, w0)
        if hess == "full":
            total[0] = total[0] + ll_full(phi, a, u, sign)
        elif hess == "diag":
            total[0] = total[0] + ll_diag(phi, a, u, sign).reshape(-1)
        else:
            fa, fg = ll_kron(phi, a, u, sign)
            total[0], total[1] = total[0] + fa, total[1] + fg
    if hess == "kron":
        s.a_0, s.g_0 = total[0], total[1][None]
        s.count_0 = total[0].new_tensor(float(num_rows(x)))
    else:
        s.curvature = total[0][None]


def _store_lowrank(m: LaplaceModel, matvec, generator) -> None:
    dtype = m.structure.fdtype
    vectors, values = subspace_iteration(matvec, m.num_covered, m.rank, generator=generator,
                                         dtype=dtype, device=m.device)
    s = m.structure
    s.eigenvectors, s.eigenvalues = vectors.to(m.dtype), values.to(m.dtype)
    s.weights0 = m._structure_weights().detach().to(m.dtype)


# ------------------------------------------------------------------ any module


def _jac_chunks(m: LaplaceModel, layout: ParameterLayout, x, y, rows, progress, desc,
                index=None):
    """(f, M) per chunk: outputs and the square-root rows M = vᵀJ [B, R, S, P]."""
    w0 = m._noise_weights().detach()
    for sl in progress_bar(_slices(num_rows(x), rows), desc=desc, progress=progress):
        f, jac = batch_jacobian(m.model, layout, take_rows(x, sl), index, output=m.output)
        f, jac = f.detach(), jac.detach()
        v = output_sqrt(m.task, m.curvature, f, y[sl], w0)
        yield f, sqrt_jacobian(v, jac)


def _general(m: LaplaceModel, x, y, rows, generator, progress) -> None:
    s, hess = m.structure, m.hessian
    w0 = m._noise_weights().detach()
    if m.subset == "subnetwork":
        _select_subnetwork(m, x, y, rows, progress)
    index = m.subnet_index if m.subset == "subnetwork" else None
    if hess == "kron":
        _kron(m, x, y, progress)
        return
    if hess == "lowrank":
        weights = w0 if m.task == "regression" and m.curvature == "ggn" else None

        def matvec(v: torch.Tensor) -> torch.Tensor:
            out = 0
            for _, rows_m in _jac_chunks(m, m.layout, x, y, rows, False, "laplace: low rank",
                                         index):
                mv = torch.einsum("brsp,pk->brsk", rows_m, v.to(rows_m.dtype))
                if weights is not None:
                    mv = mv * weights[None, :, None, None]
                out = out + torch.einsum("brsp,brsk->pk", rows_m, mv)
            return out.to(v.dtype)
        _store_lowrank(m, matvec, generator)
        return
    total = 0
    for _, rows_m in _jac_chunks(m, m.layout, x, y, rows, progress, "laplace: curvature", index):
        if hess == "full":
            total = total + torch.einsum("brsp,brsq->rpq", rows_m, rows_m)
        else:
            total = total + rows_m.pow(2).sum((0, 2))
    s.curvature = total


def _select_subnetwork(m: LaplaceModel, x, y, rows, progress) -> None:
    """Keep the ``subnetwork_size`` weights with the largest marginal variances under a
    diagonal Laplace over all covered weights (Daxberger et al., ICML 2021)."""
    h = 0
    for _, rows_m in _jac_chunks(m, m.layout, x, y, rows, progress, "laplace: subnetwork"):
        h = h + rows_m.pow(2).sum((0, 2))
    w0 = m._noise_weights().detach()
    prior = m._prior_for_selection()
    variance = 1 / ((w0[:, None] * h).sum(0) + prior)
    size = m.subnetwork_size
    if size > m.layout.num_params:
        raise InputError(f"`subnetwork_size` is {size}, but the model has only "
                         f"{m.layout.num_params} trainable weights")
    top = torch.topk(variance, size).indices
    m.subnet_index = torch.sort(top).values


def _kron(m: LaplaceModel, x, y, progress) -> None:
    s = m.structure
    groups = m.layout.groups
    affine = [i for i, g in enumerate(groups) if g.kind == "affine"]
    plain = [i for i, g in enumerate(groups) if g.kind == "plain"]
    item = _itemsize(x)
    w0 = m._noise_weights().detach()
    if affine:
        hooks = KronHooks(m.model, [groups[i] for i in affine], m._pieces(), output=m.output)
        k = m.num_outputs
        rows = chunk_rows(k * k * item * 8 + 4096 * item, m.max_memory, "K-FAC rows",
                          CHEAPER["kron"])
        rows = min(rows, 256)
        for sl in progress_bar(_slices(num_rows(x), rows), desc="laplace: K-FAC",
                               progress=progress):
            hooks.step(take_rows(x, sl),
                       lambda f, sl=sl: output_sqrt(m.task, m.curvature, f, y[sl], w0))
        for j, i in enumerate(affine):
            if not hooks.counts[j]:
                raise UnsupportedModelError(f"hessian='kron': {groups[i].label} was never "
                                            "called in the forward pass; leave it out of "
                                            "`subset`")
            setattr(s, f"a_{i}", hooks.factors_a[j])
            setattr(s, f"g_{i}", hooks.factors_g[j])
            setattr(s, f"count_{i}", hooks.factors_a[j].new_tensor(float(hooks.counts[j])))
    if plain:
        sub = ParameterLayout(m.model, [groups[i] for i in plain])
        k = m.num_outputs
        rows = chunk_rows(k * sub.num_params * item * 4, m.max_memory,
                          f"Jacobians over {sub.num_params:,} weights", CHEAPER["kron"])
        total = 0
        for _, rows_m in _jac_chunks(m, sub, x, y, rows, progress, "laplace: diagonal blocks"):
            total = total + rows_m.pow(2).sum((0, 2))
        for i, offset in zip(plain, sub.offsets[:-1], strict=True):
            setattr(s, f"h_{i}", total[:, offset:offset + groups[i].size])

