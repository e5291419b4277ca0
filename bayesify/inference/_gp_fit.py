"""The data side of the ``"gp"`` method: scaling features and targets the way BoTorch's
``SingleTaskGP`` does, the whole training set as one batch for an exact GP, and the
exact GP's hyperparameter fit by SciPy's L-BFGS-B from several starts (the prior modes,
then prior draws), in float64 with closed-form gradients."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from bayesify._batching import TensorBatches, cat_inputs, num_rows
from bayesify._linalg import psd_cholesky
from bayesify._math import LOG_2PI
from bayesify._progress import progress_bar
from bayesify._validation import as_tensor
from bayesify.errors import BayesifyWarning, InputError, NotPSDError
from bayesify.layers.gp import (
    ExactGPHead,
    _scaled_sqdist,
    lengthscale_prior,
    noise_prior,
)

__all__ = [
    "check_input_bounds",
    "exact_objective_and_grad",
    "first_rows",
    "fit_exact_hyperparameters",
    "standardizer",
    "unit_cube_affine",
    "whole_training_set",
]

#: Beyond this many points, an exact GP suggests the sparse one.
EXACT_LIMIT = 5000
#: Iterations of one L-BFGS-B run.
MAX_ITER = 500
#: Starts tried in all before giving up when every one fails.
MAX_STARTS = 5
#: With several starts on more points than this, the starts run on this many rows
#: (a fixed random subset) and only the best is refined on the whole training set.
SCREEN_ROWS = 256


def check_input_bounds(input_bounds: Any) -> torch.Tensor | None:
    """The ``input_bounds`` option as a float64 [2, d] tensor with lower < upper."""
    if input_bounds is None:
        return None
    bounds = as_tensor(input_bounds, "input_bounds", dtype=torch.float64, ndim=2)
    if bounds.shape[0] != 2 or bool((bounds[1] <= bounds[0]).any()):
        raise InputError("`input_bounds` must be [2, d] with lower < upper, got shape "
                         f"{list(bounds.shape)}")
    return bounds


def unit_cube_affine(z: torch.Tensor, bounds: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower [d], range [d]) mapping features z [N, d] to [0, 1]^d.

    Args:
        z: features [N, d] (their range is used when ``bounds`` is ``None``).
        bounds: [2, d] lower and upper bounds (``input_bounds``), or ``None``.

    Constant columns get range 1, so they map to 0 instead of dividing by zero.
    """
    if bounds is not None:
        bounds = bounds.to(z)
        if bounds.shape[1] != z.shape[1]:
            raise InputError(f"`input_bounds` has {bounds.shape[1]} columns but the "
                             f"features have {z.shape[1]}")
    lower, upper = (z.min(0).values, z.max(0).values) if bounds is None else bounds
    span = upper - lower
    return lower, torch.where(span > 1e-12, span, torch.ones_like(span))


def first_rows(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batches of the training data, up to about ``limit`` rows, as X, y."""
    xs, ys, rows = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        rows += num_rows(x)
        if rows >= limit:
            break
    if not xs:
        raise InputError("`train` is empty; pass at least one training example")
    return cat_inputs(xs), torch.cat(ys)


def whole_training_set(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int | None) -> TensorBatches:
    """All training pairs as one batch X [N, ...], y [N] / [N, D] (an exact GP's
    marginal likelihood couples every point).

    Raises:
        InputError: no data, or a ``batch_size`` below N (minibatches do not apply).
    """
    pairs = list(batches)
    if not pairs:
        raise InputError("`train` is empty; pass at least one training example")
    x, y = cat_inputs([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    n = num_rows(x)
    if batch_size is not None and batch_size < n:
        raise InputError(f"`batch_size`={batch_size} does not apply to inference='exact': "
                         f"its marginal likelihood takes all {n} training rows per step; "
                         "leave it out, or use inference='variational' for minibatches")
    if n > EXACT_LIMIT:
        # user -> fit -> strategy.run -> training_batches -> here
        warnings.warn(f"an exact GP on {n} points costs O(N³) time and O(N²) memory; "
                      "inference='variational' scales to large N", BayesifyWarning,
                      stacklevel=5)
    return TensorBatches(x, y, batch_size=n, shuffle=False)


def standardizer(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], std [D]) of targets y [N, D]; constant outputs (or N = 1) get std 1."""
    mean = y.mean(0)
    std = y.std(0) if y.shape[0] > 1 else torch.ones_like(mean)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def _kernel_and_weight(kind: str, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k(r²) and −2 dk/d(r²) [..., N, M] of the unit-variance kernel at squared scaled
    distances r2 (the second is dK/d log ℓⱼ divided by the j-th scaled squared distance)."""
    if kind == "rbf":
        k = torch.exp(-0.5 * r2)
        return k, k
    r = r2.sqrt() * math.sqrt(5)  # Matérn 5/2
    decay = torch.exp(-r)
    return (1 + r + r.pow(2) / 3) * decay, (5 / 3) * (1 + r) * decay


def _lognormal_terms(prior: torch.distributions.LogNormal, log_value: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(v), d log p / d log v) of a LogNormal prior at v = exp(log_value)."""
    mu, sigma = float(prior.loc), float(prior.scale)
    value = (-log_value - math.log(sigma) - 0.5 * LOG_2PI
             - (log_value - mu) ** 2 / (2 * sigma**2)).sum()
    return value, -1 - (log_value - mu) / sigma**2


def exact_objective_and_grad(head: ExactGPHead, z: torch.Tensor, y: torch.Tensor,
                             log_lengthscale: torch.Tensor, log_noise: torch.Tensor,
                             mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``head.objective`` at given hyperparameters, with its gradient in closed form.

    With W = K⁻¹ − ααᵀ (α = K⁻¹r), d(−log p(y))/dθ = ½ tr(W dK/dθ); the lengthscale
    terms Σᵢₖ Mᵢₖ (zᵢⱼ − zₖⱼ)² (M = W ∘ −2 dk/dr²) reduce to one product M z, so an
    evaluation costs one Cholesky, one inverse and O(N²d), without an autograd graph.

    Args:
        head: supplies the kernel, the dimension (priors) and whether noise is fixed.
        z: features [N, d]; y: standardized targets [N, D] (same dtype as the rest).
        log_lengthscale: [D, 1, d or 1]; log_noise: [D]; mean: [D].

    Returns:
        (objective, gradients by parameter name), the objective a 0-dim tensor.
    """
    n = z.shape[0]
    scale = log_lengthscale.exp()
    scaled = z.unsqueeze(0) / scale  # [D, N, d]
    k, weight = _kernel_and_weight(head.kernel, _scaled_sqdist(scaled, scaled))
    noise = log_noise.exp()
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    factor = psd_cholesky(k + noise[:, None, None] * eye, name="kernel matrix", warn=False)
    residual = (y - mean).transpose(0, 1).unsqueeze(-1)  # [D, N, 1]
    # L⁻¹ by one triangular solve and K⁻¹ = L⁻ᵀL⁻¹ by one product: both BLAS-3, and
    # faster than LAPACK's cholesky_inverse / cholesky_solve on small CPU thread counts.
    inverse_factor = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
    white = inverse_factor @ residual
    alpha = inverse_factor.transpose(-1, -2) @ white
    logdet = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    nll = (0.5 * white.pow(2).sum((-1, -2)) + logdet + 0.5 * n * LOG_2PI).sum()
    w = inverse_factor.transpose(-1, -2) @ inverse_factor - alpha @ alpha.transpose(-1, -2)
    m = w * weight
    per_dim = (scaled.pow(2) * m.sum(-1, keepdim=True)).sum(-2) - (scaled * (m @ scaled)).sum(-2)
    grad_ls = per_dim.sum(-1, keepdim=True) if log_lengthscale.shape[-1] == 1 else per_dim
    ls_prior, ls_prior_grad = _lognormal_terms(lengthscale_prior(head.dim), log_lengthscale)
    grads = {"log_lengthscale": grad_ls.reshape(log_lengthscale.shape) - ls_prior_grad,
             "mean": -alpha.sum((-1, -2))}
    value = nll - ls_prior
    if head.fixed_noise is None:
        noise_value, noise_prior_grad = _lognormal_terms(noise_prior(), log_noise)
        grads["log_noise"] = 0.5 * noise * w.diagonal(dim1=-2, dim2=-1).sum(-1) - noise_prior_grad
        value = value - noise_value
    return value / n, {name: g / n for name, g in grads.items()}


def fit_exact_hyperparameters(head: ExactGPHead, z: torch.Tensor, y: torch.Tensor, *,
                              num_restarts: int, seed: int | None,
                              progress: bool | None = False) -> float:
    """Fit an exact GP's hyperparameters by L-BFGS-B on its objective (negative log
    marginal likelihood plus priors, over N), keeping the best of several starts.

    The fit runs in float64 whatever the head's dtype (a float32 kernel matrix is too
    ill-conditioned for the line search to converge), with closed-form gradients and
    SciPy's default tolerances (as BoTorch's ``fit_gpytorch_mll``); the result is cast
    back into the head.

    Args:
        head: the GP head (its hyperparameters are overwritten).
        z: unit-cube features [N, d].
        y: standardized targets [N, D].
        num_restarts: starts: the prior modes, then prior draws; if every start fails,
            further draws up to ``MAX_STARTS`` in all. With several starts and more than
            ``SCREEN_ROWS`` points, the starts run on a random subset of that many rows
            and the best one is then refined on all of them (so the extra starts cost
            little beside the one full fit).
        seed: seeds the prior draws (0 when ``None``, so fits repeat).
        progress: a progress bar over the starts (``None``: the global setting).

    Returns:
        The best objective value.

    Raises:
        NotPSDError: every start failed to factorize its kernel matrix.
    """
    names = [name for name, p in head.named_parameters() if p.requires_grad]
    params = dict(head.named_parameters())
    bounds_by_name = head.lower_bounds()
    bounds = [(bounds_by_name.get(name), None) for name in names
              for _ in range(params[name].numel())]
    shapes = [params[name].shape for name in names]
    splits = np.cumsum([params[name].numel() for name in names])[:-1]
    z64, y64 = z.detach().double(), y.detach().double()
    fixed = {name: p.detach().double() for name, p in params.items()}

    def unpack(flat: np.ndarray) -> dict[str, torch.Tensor]:
        values = dict(fixed)
        for name, shape, chunk in zip(names, shapes, np.split(flat, splits), strict=True):
            values[name] = torch.from_numpy(chunk).to(z64.device).reshape(shape)
        return values

    def optimize(start: np.ndarray, zz: torch.Tensor, yy: torch.Tensor) -> Any:
        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            value, grads = exact_objective_and_grad(head, zz, yy, **unpack(flat))
            flat_grad = torch.cat([grads[name].reshape(-1) for name in names])
            return float(value), flat_grad.cpu().numpy()

        return minimize(fun, start, jac=True, method="L-BFGS-B", bounds=bounds,
                        options={"maxiter": MAX_ITER})

    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    screen = num_restarts > 1 and z64.shape[0] > SCREEN_ROWS
    z_start, y_start = z64, y64
    if screen:  # a fixed subset of rows, drawn before (and apart from) the prior draws
        rows = torch.randperm(z64.shape[0], generator=torch.Generator().manual_seed(
            0 if seed is None else int(seed)))[:SCREEN_ROWS].to(z64.device)
        z_start, y_start = z64[rows], y64[rows]
    best: tuple[float, np.ndarray] | None = None
    error: Exception | None = None
    bar = progress_bar(range(max(num_restarts, MAX_STARTS)), desc="GP hyperparameters",
                       progress=progress, total=num_restarts, unit="start")
    for attempt in bar:
        if attempt >= num_restarts and best is not None:
            break
        head.reset_parameters(None if attempt == 0 else generator)
        fixed = {name: p.detach().double() for name, p in params.items()}
        start = torch.cat([fixed[name].reshape(-1) for name in names]).cpu().numpy()
        try:
            result = optimize(start, z_start, y_start)
        except NotPSDError as exc:  # this start diverged; the others may not
            error = exc
            continue
        if math.isfinite(result.fun) and (best is None or result.fun < best[0]):
            best = (float(result.fun), result.x.copy())
            bar.set_postfix(best=f"{best[0]:.4g}")
    bar.close()
    if best is None:
        raise NotPSDError(f"every GP hyperparameter fit failed: {error}")
    if screen:  # refine the best start on all rows (the prior mode if that fails)
        head.reset_parameters(None)
        mode = torch.cat([params[name].detach().double().reshape(-1) for name in names])
        for start in (best[1], mode.cpu().numpy()):
            try:
                result = optimize(start, z64, y64)
            except NotPSDError as exc:
                error = exc
                continue
            if math.isfinite(result.fun):
                best = (float(result.fun), result.x.copy())
                break
        else:
            raise NotPSDError(f"every GP hyperparameter fit failed: {error}")
    with torch.no_grad():
        for name, value in unpack(best[1]).items():
            params[name].copy_(value)
    head.clamp_()  # also clears the head's solve cache
    return best[0]
