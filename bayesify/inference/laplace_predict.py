"""Laplace predictions: the GLM (linearized) posterior over outputs and sampled weights.

:class:`LaplacePredictionMixin` gives :class:`~bayesify.inference.laplace.LaplaceModel`
its ``_posterior``: f(x*) ~ N(f(x*; θ_MAP), J* Σ J*ᵀ) with J* Σ J*ᵀ in closed form in
the head's features for a last layer (never a [B, C, P] Jacobian) and from
``torch.func`` Jacobians otherwise, in chunks sized to ``max_memory``; joint over the q
points of each block for regression; or the network at weights θ ~ N(θ_MAP, Σ)
(``predictive="nn"``).

Jacobians are per-point under ``vmap``; a network with data-dependent control flow that
vmap cannot trace (HuggingFace's SDPA attention checks its padding mask with
``mask.all()``) gets them one point at a time instead (same values, slower).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jacrev

from bayesify._batching import num_rows, take_rows
from bayesify._network import call_network
from bayesify.core import preserve_training_flags
from bayesify.inference.laplace_fit import chunk_rows
from bayesify.layers.laplace_curvature import as_outputs, batch_jacobian
from bayesify.layers.laplace_layout import check_memory
from bayesify.layers.laplace_posterior import factor_dtype
from bayesify.posterior import GaussianPosterior, Posterior, SampledPosterior, reshape_points

__all__ = ["LaplacePredictionMixin", "looped_jacobian"]


def looped_jacobian(model: Any, layout: Any, x: Any, index: torch.Tensor | None = None,
                    *, output: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`~bayesify.layers.laplace_curvature.batch_jacobian` returns, ``(f [B,
    K], J [B, K, P])``, one point at a time (no vmap over the inputs)."""
    params = {n: p.detach() for n, p in layout.parameters().items()}

    def single(p: dict[str, torch.Tensor], xi: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = call_network(model, xi, params=p, output=output).reshape(-1)
        return out, out

    jacs, outs = [], []
    for i in range(num_rows(x)):
        jac, f = jacrev(single, has_aux=True)(params, take_rows(x, slice(i, i + 1)))
        jacs.append(jac)
        outs.append(f)
    stacked = {n: torch.stack([j[n] for j in jacs]) for n in jacs[0]}
    flat = layout.flatten(stacked, batch_dims=2)
    return torch.stack(outs), flat if index is None else flat[..., index]


class LaplacePredictionMixin:
    """``_posterior`` of a Laplace approximation (see the module docstring)."""

    model: Any
    task: str

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None,
                   blocks: tuple[int, int] | None = None) -> Posterior:
        """GLM: a GaussianPosterior with mean [N, K] and variances [N, K] (probit and
        regression), covariances [N, C, C] (MC, bridge) or, for regression blocks
        ``blocks=(b, q)`` (x then holds b·q points), joint covariances [b, K, q, q];
        ``predictive="nn"``: a SampledPosterior [S, N, K]."""
        with preserve_training_flags(self.model):
            self.model.eval()
            if self.predictive == "nn":
                samples = SampledPosterior(self._weight_samples(x, num_samples, generator))
                return samples if blocks is None else reshape_points(samples, blocks)
            joint = blocks is not None and self.task == "regression"
            if self.task == "regression":
                mode = "joint" if joint else "diag"
            else:
                mode = "diag" if self.likelihood.approximation == "probit" else "output"
            mean, cov = self._glm(x, mode, blocks if joint else None)
        kind = {"diag": "diagonal", "output": "output", "joint": "joint"}[mode]
        if joint:
            return GaussianPosterior(mean.reshape(*blocks, -1), cov, kind="joint")
        post = GaussianPosterior(mean, cov, kind=kind)
        return post if blocks is None else reshape_points(post, blocks)

    def _glm(self, x: torch.Tensor, mode: str, blocks: tuple[int, int] | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [N, K] and J Σ Jᵀ in ``mode`` (joint: [b, K, q, q]), in chunks."""
        fac = self._factor()
        n = num_rows(x)
        k = self.num_outputs
        item = 8 if factor_dtype(self.device) == torch.float64 else 4
        if not self.last_layer or (self.hessian == "full" and mode == "output"):
            per_row = k * self.num_covered * item * 4      # Jacobians, or [C, C, D] blocks
        elif self.hessian == "lowrank":
            per_row = (self.head.in_features + k * (self.rank + 2)) * item * 4
        else:
            per_row = (self.head.in_features + k) * item * 4
        per_row += k * k * item * 2 if mode == "output" else 0
        if mode == "output":
            check_memory(n * k * k * item, f"the covariance over {k} classes of {n} inputs",
                         self.max_memory, "use approximation='probit' (diagonal only) or a "
                         "smaller predict(batch_size=...)")
        step = blocks[1] if blocks else 1
        rows = chunk_rows(per_row * step, self.max_memory, "the predictive covariance",
                          "use hessian='kron' or 'diag'") * step
        means, covs = [], []
        for start in range(0, n, rows):
            xb = take_rows(x, slice(start, start + rows))
            if self.last_layer:
                f, phi = self._features(xb)
                if blocks:
                    phi = phi.reshape(-1, blocks[1], phi.shape[-1])
                cov = self.structure.ll_cov(fac, phi, k, mode)
            else:
                index = self.subnet_index if self.subset == "subnetwork" else None
                f, jac = self._jacobians(xb, index)
                if blocks:
                    jac = jac.reshape(-1, blocks[1], *jac.shape[1:])
                cov = self.structure.jac_cov(fac, jac, mode)
            means.append(f)
            covs.append(cov.to(self.dtype))
        return torch.cat(means), torch.cat(covs)

    def _jacobians(self, x: Any, index: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f [B, K], J [B, K, P])``, under vmap unless the network cannot take it."""
        if not getattr(self, "_loop_jacobians", False):
            try:
                return batch_jacobian(self.model, self.layout, x, index, output=self.output)
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                self._loop_jacobians = True
        return looped_jacobian(self.model, self.layout, x, index, output=self.output)

    def _weight_samples(self, x: torch.Tensor, num_samples: int | None,
                        generator: torch.Generator | None) -> torch.Tensor:
        """Outputs at S weight draws θ ~ N(θ_MAP, Σ), [S, N, K]."""
        s = num_samples or self.default_num_samples
        fac = self._factor()
        z = torch.randn(s, self.num_covered, generator=generator, device=self.device,
                        dtype=self.dtype)
        theta = self._theta() + self.structure.sample(fac, z).to(self.dtype)
        if self.last_layer:
            f, phi = self._features(x)
            w = theta.reshape(s, self.num_outputs, -1)
            return torch.einsum("scd,nd->snc", w, phi)
        full = self.layout.vector().expand(s, -1).clone() if self.subset == "subnetwork" \
            else theta
        if self.subset == "subnetwork":
            full[:, self.subnet_index] = theta
        outs = []
        for i in range(s):
            params = self.layout.unflatten(full[i])
            outs.append(as_outputs(self.call_network(x, params=params), num_rows(x)))
        return torch.stack(outs)
