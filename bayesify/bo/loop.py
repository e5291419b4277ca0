"""The Bayesian-optimization loop: any bayesify surrogate, BoTorch acquisition.

Inputs are mapped to the unit cube from ``bounds`` and the scores (the values, negated
when minimizing) are standardized before each surrogate fit, as BoTorch's
``SingleTaskGP`` does with ``Normalize`` and ``Standardize``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bayesify._progress import progress_bar
from bayesify._validation import as_tensor, check_choice, check_positive_int
from bayesify.bo.acquisition import ACQUISITIONS, Surrogate, fit_surrogate, propose
from bayesify.core import available_methods
from bayesify.errors import BayesifyWarning, InputError

__all__ = ["BayesianOptimization", "BOHistory", "BOResult"]


@dataclass
class BOHistory:
    """Everything evaluated so far, in order.

    Attributes:
        X: evaluated points [n, d] (original units).
        y: their values [n] (NaN for failures).
        failed: whether the evaluation failed [n].
        step: index of the ``ask()`` that proposed each point [n] (0 = the initial
            design).
        best: best value so far after each evaluation [n] (NaN before any success).
        times: seconds each ``ask()`` took (surrogate fit + acquisition) [asks].
    """

    X: torch.Tensor
    y: torch.Tensor
    failed: torch.Tensor
    step: torch.Tensor
    best: torch.Tensor
    times: list[float] = field(default_factory=list)


@dataclass
class BOResult:
    """Outcome of :meth:`BayesianOptimization.run`: the best point and the history."""

    best_x: torch.Tensor
    best_y: float
    history: BOHistory


def _check_bounds(bounds: Any) -> torch.Tensor:
    bounds = as_tensor(bounds, "bounds", dtype=torch.float64, ndim=2)
    if bounds.shape[0] != 2 or bounds.shape[1] < 1:
        raise InputError(f"`bounds` must have shape [2, d] (lower row, upper row), got "
                         f"{list(bounds.shape)}")
    bad = (bounds[1] <= bounds[0]).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"`bounds` must have lower < upper in every dimension; dimension(s) "
                         f"{bad} do not")
    return bounds


class BayesianOptimization:
    """Optimize a black box with a bayesify surrogate and BoTorch's acquisition.

    Args:
        objective: ``f(X [q, d]) -> [q]`` in original units, or ``None`` when the
            points are evaluated elsewhere (``ask``/``tell`` only).
        bounds: [2, d] lower and upper bounds of the search box.
        surrogate: a regression method name (``"gp"``, ``"vbll"``, ``"mc_dropout"``,
            ...; networks get a 3×64 ELU MLP, retrained each step) or a factory
            ``f(X_unit [n, d], y_standardized [n]) -> BayesianModel``.
        acquisition: ``"logei"`` (log expected improvement), ``"ucb"`` (upper
            confidence bound) or ``"ts"`` (Thompson sampling over Sobol candidates).
        n_init: size of the initial Sobol design (``max(5, 2d)`` when ``None``).
        batch_size: q, points proposed per step.
        maximize: maximize the objective instead of minimizing it.
        seed: makes the design, the surrogate fits and the acquisition repeatable.
        surrogate_options: method options for ``bayesify(...)``.
        fit_options: keyword arguments for the surrogate's ``fit``.
        acquisition_options: ``beta`` (UCB), ``num_restarts``, ``raw_samples``
            (``optimize_acqf``) and ``num_candidates`` (Thompson sampling).
        progress: show a progress bar in :meth:`run` (default: unless switched off
            globally, see ``bayesify.set_progress_bars`` and ``TQDM_DISABLE``).
    """

    def __init__(self, objective: Callable[[torch.Tensor], Any] | None, bounds: Any,
                 surrogate: Surrogate = "gp", acquisition: str = "logei",
                 n_init: int | None = None, batch_size: int = 1, maximize: bool = False,
                 seed: int | None = None, *, surrogate_options: dict[str, Any] | None = None,
                 fit_options: dict[str, Any] | None = None,
                 acquisition_options: dict[str, Any] | None = None,
                 progress: bool | None = None):
        if objective is not None and not callable(objective):
            raise InputError(f"`objective` must be callable or None, got "
                             f"{type(objective).__name__}")
        self.objective = objective
        self.bounds = _check_bounds(bounds)
        self.dim = int(self.bounds.shape[1])
        if not callable(surrogate):
            check_choice(surrogate, "surrogate", available_methods("regression"))
        self.surrogate = surrogate
        self.acquisition = check_choice(acquisition, "acquisition", ACQUISITIONS)
        self.n_init = check_positive_int(max(5, 2 * self.dim) if n_init is None else n_init,
                                         "n_init")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.maximize = bool(maximize)
        self.seed = int(torch.randint(1 << 30, ()).item()) if seed is None else int(seed)
        self.surrogate_options = dict(surrogate_options or {})
        self.fit_options = dict(fit_options or {})
        options = dict(acquisition_options or {})
        unknown = set(options) - {"beta", "num_restarts", "raw_samples", "num_candidates"}
        if unknown:
            raise InputError(f"`acquisition_options` has unknown key(s) {sorted(unknown)}")
        self.acquisition_options = options
        self.progress = progress
        self.model = None  # the last fitted surrogate
        self._sobol = torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=self.seed)
        self._X: list[torch.Tensor] = []
        self._y: list[float] = []
        self._failed: list[bool] = []
        self._step: list[int] = []
        self._times: list[float] = []
        self._pending: list[torch.Tensor] = []

    # --------------------------------------------------------------- helpers

    def _to_unit(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.bounds[0]) / (self.bounds[1] - self.bounds[0])

    def _from_unit(self, U: torch.Tensor) -> torch.Tensor:
        return self.bounds[0] + U * (self.bounds[1] - self.bounds[0])

    @property
    def num_evaluations(self) -> int:
        """How many points were told so far (failures included)."""
        return len(self._y)

    def _training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ok = [i for i, f in enumerate(self._failed) if not f]
        X = self._to_unit(torch.stack([self._X[i] for i in ok]))
        scores = torch.tensor([self._y[i] for i in ok], dtype=torch.float64)
        scores = scores if self.maximize else -scores
        std = scores.std() if len(ok) > 1 else torch.tensor(1.0, dtype=torch.float64)
        std = std if float(std) > 1e-12 else torch.tensor(1.0, dtype=torch.float64)
        return X, (scores - scores.mean()) / std

    # ------------------------------------------------------------ ask / tell

    def ask(self) -> torch.Tensor:
        """Points to evaluate next [q, d] (original units).

        The remaining initial Sobol design while fewer than ``n_init`` points are
        known (told or pending), then ``batch_size`` points from the acquisition.
        """
        start = time.perf_counter()
        known = len(self._y) + sum(p.shape[0] for p in self._pending)
        successes = sum(not f for f in self._failed)
        if known < self.n_init:
            unit = self._sobol.draw(self.n_init - known, dtype=torch.float64)
        elif successes < 2:
            warnings.warn(f"only {successes} successful evaluation(s) so far; proposing "
                          "Sobol points until the surrogate has two", BayesifyWarning,
                          stacklevel=2)
            unit = self._sobol.draw(self.batch_size, dtype=torch.float64)
        else:
            step_seed = self.seed + 7919 * (len(self._times) + 1)
            X, y = self._training_data()
            self.model = fit_surrogate(self.surrogate, X, y, seed=step_seed,
                                       options=self.surrogate_options,
                                       fit_options=self.fit_options)
            pending = (self._to_unit(torch.cat(self._pending)) if self._pending else None)
            unit = propose(self.model, self.acquisition, float(y.max()), q=self.batch_size,
                           dim=self.dim, seed=step_seed, X_pending=pending,
                           **self.acquisition_options)
        X = self._from_unit(unit.to(torch.float64))
        self._pending.append(X)
        self._times.append(time.perf_counter() - start)
        return X

    def tell(self, x: Any, y: Any) -> None:
        """Record evaluations: points x [n, d] and values y [n] (NaN marks a failure)."""
        x = as_tensor(x, "x", dtype=torch.float64)
        x = x[None] if x.dim() == 1 else x
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"`x` must have shape [n, {self.dim}], got {list(x.shape)}")
        y = as_tensor(y, "y", dtype=torch.float64, finite=False).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise InputError(f"`x` and `y` must have the same length: `x` has {x.shape[0]} "
                             f"point(s), `y` has {y.shape[0]} value(s)")
        self._record(x, y, torch.ones_like(y, dtype=torch.bool))

    def _record(self, x: torch.Tensor, y: torch.Tensor, warn: torch.Tensor) -> None:
        step = max(len(self._times) - 1, 0)
        for xi, yi, wi in zip(x, y.tolist(), warn.tolist(), strict=True):
            failed = not math.isfinite(yi)
            if failed and wi:
                warnings.warn(f"the objective gave {yi} at x={xi.tolist()}; recorded as a "
                              "failure", BayesifyWarning, stacklevel=3)
            self._X.append(xi)
            self._y.append(float("nan") if failed else yi)
            self._failed.append(failed)
            self._step.append(step)
        self._pending = []

    # --------------------------------------------------------------- running

    def _evaluate(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values [q] of the objective at X [q, d] (NaN where it raised) and a mask [q]
        of the points that did not raise (those still need a warning if NaN)."""
        try:
            values = self.objective(X)
        except Exception as exc:  # a broken evaluation is data, not a crash
            if X.shape[0] > 1:
                parts = [self._evaluate(X[i:i + 1]) for i in range(X.shape[0])]
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            warnings.warn(f"the objective raised {type(exc).__name__}: {exc} at "
                          f"x={X[0].tolist()}; recorded as a failure", BayesifyWarning,
                          stacklevel=3)
            return (torch.full((1,), math.nan, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.bool))
        values = as_tensor(values, "objective", dtype=torch.float64, finite=False)
        if values.shape not in ((X.shape[0],), (X.shape[0], 1)):
            raise InputError(f"`objective` must return one value per point, shape "
                             f"[{X.shape[0]}] or [{X.shape[0]}, 1] for X of shape "
                             f"{list(X.shape)}; got {list(values.shape)}")
        return values.reshape(-1), torch.ones(X.shape[0], dtype=torch.bool)

    def run(self, n_iterations: int) -> BOResult:
        """Evaluate the initial design (if not done), then ``n_iterations`` steps."""
        n_iterations = check_positive_int(n_iterations, "n_iterations", minimum=0)
        if self.objective is None:
            raise InputError("`objective` is None; pass one to run(), or use ask()/tell()")
        if len(self._y) < self.n_init:
            X = self.ask()
            self._record(X, *self._evaluate(X))
        bar = progress_bar(range(n_iterations), desc=f"BO {self._surrogate_name()}",
                           progress=self.progress)
        for _ in bar:
            X = self.ask()
            self._record(X, *self._evaluate(X))
            best = self.history.best[-1]
            bar.set_postfix(best=f"{float(best):.4g}")
        return self.result()

    def _surrogate_name(self) -> str:
        return self.surrogate if isinstance(self.surrogate, str) else "custom"

    @property
    def history(self) -> BOHistory:
        """The evaluations so far (see :class:`BOHistory`)."""
        y = torch.tensor(self._y, dtype=torch.float64)
        sign = 1.0 if self.maximize else -1.0
        scored = torch.where(torch.isnan(y), -math.inf, sign * y)
        best = sign * torch.cummax(scored, 0).values if len(y) else y
        best = torch.where(torch.isinf(best), math.nan, best)
        X = torch.stack(self._X) if self._X else torch.zeros(0, self.dim, dtype=torch.float64)
        return BOHistory(X=X, y=y, failed=torch.tensor(self._failed, dtype=torch.bool),
                         step=torch.tensor(self._step, dtype=torch.long), best=best,
                         times=list(self._times))

    def result(self) -> BOResult:
        """The best point and value so far, with the history."""
        history = self.history
        ok = (~history.failed).nonzero().flatten()
        if ok.numel() == 0:
            raise InputError("no successful evaluation yet; run() or tell() first")
        values = history.y[ok]
        index = ok[values.argmax() if self.maximize else values.argmin()]
        return BOResult(best_x=history.X[index], best_y=float(history.y[index]),
                        history=history)
