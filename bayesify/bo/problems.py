"""Standard test problems by name, from ``botorch.test_functions`` (minimization)."""

from __future__ import annotations

import math

import torch
from botorch.test_functions import Ackley, Branin, Hartmann
from botorch.test_functions.synthetic import SyntheticTestFunction

from bayesify._validation import check_choice

__all__ = ["PROBLEMS", "get_problem", "random_search", "regret_summary", "simple_regret"]

PROBLEMS = ("branin", "hartmann6", "ackley")


def get_problem(name: str, *, dim: int | None = None, noise_std: float | None = None,
                dtype: torch.dtype = torch.float64) -> SyntheticTestFunction:
    """A BoTorch test function to minimize: ``problem(X [n, d]) -> [n]``.

    Args:
        name: ``"branin"`` (d = 2), ``"hartmann6"`` (d = 6) or ``"ackley"`` (d = 2, or
            ``dim``).
        dim: the dimension of Ackley.
        noise_std: observation noise added by the function (exact when ``None``).
        dtype: dtype of its bounds and outputs.

    The function has ``bounds`` [2, d] and ``optimal_value`` (the minimum).
    """
    check_choice(name, "name", PROBLEMS)
    if name == "branin":
        problem = Branin(noise_std=noise_std, dtype=dtype)
    elif name == "hartmann6":
        problem = Hartmann(dim=6, noise_std=noise_std, dtype=dtype)
    else:
        problem = Ackley(dim=2 if dim is None else int(dim), noise_std=noise_std, dtype=dtype)
    return problem


def simple_regret(best_values: torch.Tensor, optimal_value: float) -> torch.Tensor:
    """Simple regret ``best − optimum`` of best-so-far values (minimization), >= 0."""
    return (best_values - optimal_value).clamp_min(0)


def regret_summary(best_curves: list[torch.Tensor], optimal_value: float
                   ) -> tuple[float, float]:
    """Mean and standard error over runs of the final log10 simple regret.

    Args:
        best_curves: per run, best-so-far values [n] (minimization).
        optimal_value: the problem's minimum.

    Returns:
        ``(mean, standard error)``; the error is NaN for a single run. Regrets are
        floored at 1e-12 so a run that hits the optimum exactly stays finite.
    """
    finals = torch.tensor([math.log10(max(float(c[-1]) - optimal_value, 1e-12))
                           for c in best_curves], dtype=torch.float64)
    se = float(finals.std() / math.sqrt(len(finals))) if len(finals) > 1 else math.nan
    return float(finals.mean()), se


def random_search(problem: SyntheticTestFunction, n: int, seed: int) -> torch.Tensor:
    """Best-so-far values [n] of n uniform random points (the baseline every
    surrogate must beat)."""
    generator = torch.Generator().manual_seed(int(seed))
    unit = torch.rand(n, problem.dim, generator=generator, dtype=problem.bounds.dtype)
    values = problem(problem.bounds[0] + unit * (problem.bounds[1] - problem.bounds[0]))
    return torch.cummin(values, 0).values
