"""Hyperparameters of a Laplace approximation: the marginal likelihood and its tuning.

The Laplace evidence of a network at θ_MAP with prior N(0, P⁻¹) and curvature H:

    log p(D) ≈ log p(D | θ_MAP) − ½ θ_MAPᵀ P θ_MAP + ½ log det P − ½ log det(H + P),

where a Gaussian regressor's log likelihood −½ Σ_k [N log(2πσ_k²) + RSS_k/σ_k²] and its
GGN H = Σ_k H_k/σ_k² both depend on the per-output noise σ. :func:`laplace_evidence` is
that formula (differentiable in P and σ); :func:`maximize` tunes log P and log σ by
L-BFGS and keeps the best finite point it saw; :func:`grid_search` picks the prior
precision with the lowest validation NLL, skipping values whose NLL is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bayesify._validation import as_tensor, check_choice, check_positive_int
from bayesify.errors import InputError, NotPSDError
from bayesify.layers.laplace_posterior import factor_dtype

__all__ = ["DEFAULT_GRID", "PRIOR_STRUCTURES", "LaplaceTuningMixin", "grid_search",
           "laplace_evidence", "maximize", "positive_vector"]

PRIOR_STRUCTURES = ("scalar", "layer", "parameter")

def positive_vector(value: Any, name: str) -> torch.Tensor:
    """A scalar or 1-d sequence of positive finite numbers as float64 [n]."""
    t = as_tensor(value, name, dtype=torch.float64, ndim=(0, 1)).reshape(-1)
    if bool((t <= 0).any()):
        raise InputError(f"`{name}` must be > 0 everywhere, got minimum {float(t.min()):g}")
    return t


#: log-space bounds on the tuned hyperparameters, so exp() never overflows
LOG_BOUND = 30.0
#: the default grid of prior precisions: 10^-4 ... 10^4, 21 values
DEFAULT_GRID = tuple(float(10 ** (k / 2.5)) for k in range(-10, 11))


def laplace_evidence(loglik: torch.Tensor, theta: torch.Tensor, prior: torch.Tensor,
                     logdet_posterior: torch.Tensor) -> torch.Tensor:
    """log p(D|θ) − ½ θᵀPθ + ½ log det P − ½ log det(H + P) (a scalar).

    Args:
        loglik: log p(D | θ_MAP).
        theta: θ_MAP [P]; prior: the prior precision per weight [P] (> 0).
        logdet_posterior: log det(H + P).
    """
    theta = theta.to(prior.dtype)
    return (loglik - 0.5 * (prior * theta.pow(2)).sum() + 0.5 * prior.log().sum()
            - 0.5 * logdet_posterior)


def gaussian_loglik(rss: torch.Tensor, n: int, sigma: torch.Tensor) -> torch.Tensor:
    """−½ Σ_k [N log(2πσ_k²) + RSS_k/σ_k²] for residual sums of squares [D]."""
    return -0.5 * (n * torch.log(2 * math.pi * sigma.pow(2)) + rss / sigma.pow(2)).sum()


def maximize(objective: Callable[..., torch.Tensor], start: Sequence[torch.Tensor], *,
             max_iter: int = 100) -> list[torch.Tensor]:
    """Maximize ``objective(*values)`` over positive hyperparameters in log space.

    Args:
        objective: maps positive tensors (shapes of ``start``) to a scalar.
        start: initial positive values (float64).
        max_iter: L-BFGS iterations.

    Returns:
        The best values found (the start when nothing improved).

    Raises:
        NotPSDError: the objective is not finite at the start.
    """
    logs = [v.detach().log().clone().requires_grad_(True) for v in start]

    def value() -> torch.Tensor:
        return objective(*[v.clamp(-LOG_BOUND, LOG_BOUND).exp() for v in logs])

    with torch.no_grad():
        first = value()
    if not bool(torch.isfinite(first)):
        raise NotPSDError(f"the log marginal likelihood is {float(first)} at the starting "
                          "hyperparameters; raise `prior_precision` or use float64")
    best = [float(first), [v.detach().clone() for v in logs]]
    optimizer = torch.optim.LBFGS(logs, lr=1.0, max_iter=max_iter,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                  tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -value()
        if not bool(torch.isfinite(loss)):
            # Steer the line search back: an infinite loss with a zero gradient.
            for v in logs:
                v.grad = torch.zeros_like(v)
            return torch.tensor(math.inf, dtype=loss.dtype)
        loss.backward()
        if -float(loss.detach()) > best[0]:
            best[0], best[1] = -float(loss.detach()), [v.detach().clone() for v in logs]
        return loss.detach()

    try:
        optimizer.step(closure)
    except NotPSDError:
        pass  # a trial point was singular; keep the best point seen
    return [v.clamp(-LOG_BOUND, LOG_BOUND).exp() for v in best[1]]


def grid_search(evaluate: Callable[[float], float], grid: Sequence[float] | torch.Tensor
                ) -> tuple[float, list[float]]:
    """The grid value with the lowest finite ``evaluate`` (a validation NLL).

    Returns:
        ``(best value, the NLL at every grid point)``.

    Raises:
        InputError: an empty or non-positive grid.
        NotPSDError: no grid point gives a finite NLL.
    """
    values = [float(v) for v in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise InputError(f"`grid` must be a non-empty list of positive prior precisions, "
                         f"got {list(values)!r}")
    scores = []
    for v in values:
        try:
            scores.append(float(evaluate(v)))
        except NotPSDError:
            scores.append(math.inf)
    finite = [(s, v) for s, v in zip(scores, values, strict=True) if math.isfinite(s)]
    if not finite:
        raise NotPSDError("no prior precision on the grid gives a finite validation NLL; "
                          "try larger values or float64")
    return min(finite)[1], scores


class LaplaceTuningMixin:
    """The evidence and hyperparameter tuning of
    :class:`~bayesify.inference.laplace.LaplaceModel` (see the module docstring)."""

    task: str

    def _evidence(self, prior: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
        fdtype = factor_dtype(self.device)
        vec, groups = self._prior_vectors(prior.to(device=self.device, dtype=fdtype))
        if self.task == "regression":
            sigma = (self.sigma_noise if sigma is None else sigma).to(device=self.device,
                                                                      dtype=fdtype)
            loglik = gaussian_loglik(self.rss.to(fdtype), int(self.num_fit), sigma)
        else:
            loglik = self.loglik.to(fdtype)
        logdet = self.structure.logdet(vec, groups, self._structure_weights(sigma))
        return laplace_evidence(loglik, self._theta().to(fdtype), vec, logdet)

    def log_marginal_likelihood(self, prior_precision: Any = None,
                                sigma_noise: Any = None) -> torch.Tensor:
        """The Laplace evidence log p(D) at the given hyperparameters (the current ones
        where ``None``); differentiable in tensors passed in. A scalar tensor."""
        self._check_fitted("log_marginal_likelihood")
        prior = self.prior_precision if prior_precision is None else prior_precision
        if not isinstance(prior, torch.Tensor):
            prior = positive_vector(prior, "prior_precision")
        elif bool((prior <= 0).any()):
            raise InputError("`prior_precision` must be > 0 everywhere")
        sigma = None
        if sigma_noise is not None:
            if self.task != "regression":
                raise InputError("`sigma_noise` applies to regression only")
            sigma = sigma_noise if isinstance(sigma_noise, torch.Tensor) else \
                positive_vector(sigma_noise, "sigma_noise")
            if bool((sigma <= 0).any()):
                raise InputError("`sigma_noise` must be > 0 everywhere")
            if sigma.numel() not in (1, self.num_outputs):
                raise InputError(f"`sigma_noise` must be a scalar or one value per output "
                                 f"({self.num_outputs}), got {sigma.numel()} values")
            sigma = sigma.reshape(-1).expand(self.num_outputs)
        return self._evidence(prior.reshape(-1), sigma).to(self.dtype)

    def optimize_prior_precision(self, method: str = "marglik", *,
                                 structure: str | None = None, val: Any = None,
                                 grid: Any = None, tune_noise: bool = True,
                                 max_iter: int = 100) -> LaplaceTuningMixin:
        """Tune the prior precision (and a regressor's noise) after ``fit``.

        Args:
            method: ``"marglik"`` (maximize the Laplace evidence by L-BFGS) or
                ``"grid"`` (lowest NLL on ``val``).
            structure: ``"scalar"``, ``"layer"`` or ``"parameter"`` (marglik; the
                current one when ``None``).
            val: ``(X, y)`` validation data for ``"grid"``.
            grid: prior precisions to try (default 10⁻⁴ … 10⁴, 21 values).
            tune_noise: also tune σ by marglik (regression with the GGN).
            max_iter: L-BFGS iterations.

        Returns:
            ``self``.
        """
        self._check_fitted("optimize_prior_precision")
        check_choice(method, "method", ("marglik", "grid"))
        if method == "marglik":
            self._tune_marglik(structure, tune_noise, check_positive_int(max_iter, "max_iter"))
            return self
        if structure not in (None, "scalar"):
            raise InputError("method='grid' tunes a scalar prior precision; use "
                             "method='marglik' for structure='layer' or 'parameter'")
        if not isinstance(val, list | tuple) or len(val) != 2:
            raise InputError("method='grid' needs validation data: val=(X_val, y_val)")
        x_val, y_val = val
        old = self.prior_precision

        def nll(value: float) -> float:
            self.prior_precision = torch.full((1,), value, dtype=self.dtype, device=self.device)
            return float(-self.predict(x_val, seed=0).log_prob(y_val).mean())
        try:
            best, _ = grid_search(nll, DEFAULT_GRID if grid is None else grid)
        finally:
            self.prior_precision = old
        self.prior_precision = torch.full((1,), best, dtype=self.dtype, device=self.device)
        return self

    def _tune_marglik(self, structure: str | None, tune_noise: bool, max_iter: int) -> None:
        current = self._prior_layout(self.prior_precision)
        structure = check_choice(current if structure is None else structure, "structure",
                                 PRIOR_STRUCTURES)
        if structure == "parameter" and self.hessian == "kron":
            raise InputError("hessian='kron' takes a scalar or per-layer prior precision; "
                             "use structure='scalar' or 'layer'")
        fdtype = factor_dtype(self.device)
        vec, groups = self._prior_vectors()
        vec = vec.to(fdtype)
        scalar = vec.log().mean().exp().reshape(1)
        if structure == "scalar":
            start = scalar
        elif structure == "layer":
            start = groups.to(fdtype) if groups is not None else scalar.expand(self.num_groups)
        else:
            start = vec
        start = start.clone()
        noise = (tune_noise and self.task == "regression" and self.curvature == "ggn"
                 and not (self.hessian == "lowrank" and self.num_outputs > 1))
        values = [start] + ([self.sigma_noise.to(fdtype)] if noise else [])
        best = maximize(lambda *v: self._evidence(v[0], v[1] if noise else None), values,
                        max_iter=max_iter)
        self.prior_precision = best[0].detach().to(self.dtype).clone()
        if noise:
            self.sigma_noise = best[1].detach().to(self.dtype).clone()
