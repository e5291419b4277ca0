"""The data side of the ``"gp"`` method: scaling features and targets the way BoTorch's
``SingleTaskGP`` does, the whole training set as one batch for an exact GP, and the
exact GP's hyperparameter fit by SciPy's L-BFGS-B from several starts (the prior modes,
then prior draws)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from bayesify._batching import TensorBatches
from bayesify._validation import as_tensor
from bayesify.errors import BayesifyWarning, InputError, NotPSDError
from bayesify.layers.gp import ExactGPHead

__all__ = [
    "check_input_bounds",
    "first_rows",
    "fit_exact_hyperparameters",
    "lbfgsb",
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
        rows += x.shape[0]
        if rows >= limit:
            break
    if not xs:
        raise InputError("`train` is empty; pass at least one training example")
    return torch.cat(xs), torch.cat(ys)


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
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    n = int(x.shape[0])
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


def lbfgsb(params: list[nn.Parameter], lower: list[float | None],
           objective: Callable[[], torch.Tensor], max_iter: int) -> float:
    """Minimize ``objective()`` over ``params`` with SciPy's L-BFGS-B.

    Args:
        params: the parameters to move (any shape, dtype and device).
        lower: one lower bound (or ``None``) per parameter, for all its entries.
        objective: recomputes the scalar objective from the current ``params``.
        max_iter: the iteration budget.

    Returns:
        The objective's final value; ``params`` hold the minimizer.
    """
    sizes = [p.numel() for p in params]
    bounds = [(low, None) for p, low in zip(params, lower, strict=True)
              for _ in range(p.numel())]

    def assign(flat: np.ndarray) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, np.split(flat, np.cumsum(sizes)[:-1]), strict=True):
                p.copy_(torch.from_numpy(chunk).reshape(p.shape))

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        assign(flat)
        value = objective()
        grads = torch.autograd.grad(value, params)
        flat_grad = torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()
        return float(value.detach()), flat_grad

    start = torch.cat([p.detach().reshape(-1) for p in params]).double().cpu().numpy()
    result = minimize(fun, start, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": max_iter})
    assign(result.x)
    return float(result.fun)


def fit_exact_hyperparameters(head: ExactGPHead, z: torch.Tensor, y: torch.Tensor, *,
                              num_restarts: int, seed: int | None) -> float:
    """Fit an exact GP's hyperparameters by L-BFGS-B on its objective (negative log
    marginal likelihood plus priors, over N), keeping the best of several starts.

    Args:
        head: the GP head (its hyperparameters are overwritten).
        z: unit-cube features [N, d].
        y: standardized targets [N, D].
        num_restarts: starts: the prior modes, then prior draws; if every start fails,
            further draws up to ``MAX_STARTS`` in all.
        seed: seeds the prior draws (0 when ``None``, so fits repeat).

    Returns:
        The best objective value.

    Raises:
        NotPSDError: every start failed to factorize its kernel matrix.
    """
    params = [p for p in (head.log_lengthscale, head.log_noise, head.mean) if p.requires_grad]
    bounds = head.lower_bounds()
    lower = [bounds.get(name) for name, p in head.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    error: Exception | None = None
    for attempt in range(max(num_restarts, MAX_STARTS)):
        if attempt >= num_restarts and best is not None:
            break
        head.reset_parameters(None if attempt == 0 else generator)
        try:
            value = lbfgsb(params, lower, lambda: head.objective(z, y, warn=False),
                           max_iter=MAX_ITER)
        except NotPSDError as exc:  # this start diverged; the others may not
            error = exc
            continue
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, copy.deepcopy(head.state_dict()))
    if best is None:
        raise NotPSDError(f"every GP hyperparameter fit failed: {error}")
    head.load_state_dict(best[1])
    return best[0]
