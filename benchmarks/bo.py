"""Bayesian optimization: bayesify's loop against a plain BoTorch loop and random search.

Branin (5 Sobol + 25 LogEI steps) and Hartmann6 (10 + 40), 3 seeds each, minimizing.
Rows: bayesify's GP surrogate; the reference, BoTorch's ``SingleTaskGP`` + analytic
``LogExpectedImprovement`` written out below with the same initial design and
``optimize_acqf`` settings; random search; and bayesify's VBLL surrogate (a 3×64 MLP
trained jointly with its VBLL head each step), with LogEI and with Thompson sampling
(the acquisition of BoTorch's community VBLL surrogate). Prints final log10 simple regret (mean
± standard error over seeds) and CPU seconds per iteration (surrogate fit +
acquisition, one thread, so other load on the machine does not distort the ratio).

Run: ``.venv/bin/python benchmarks/bo.py [--quick] [--only "bayesify vbll ts,..."]``
(--quick: 1 seed, fewer steps; --only: a subset of the rows; the reference always runs,
as the time ratios need it).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from bayesify import available_methods
from bayesify.bo import BayesianOptimization, get_problem
from bayesify.bo.problems import random_search, regret_summary

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

SETTINGS = {"branin": (5, 25), "hartmann6": (10, 40)}
ACQ = {"num_restarts": 10, "raw_samples": 512}


def initial_design(problem, n_init: int, seed: int) -> torch.Tensor:
    # The same scrambled Sobol design bayesify's loop draws for this seed.
    unit = torch.quasirandom.SobolEngine(problem.dim, scramble=True, seed=seed).draw(
        n_init, dtype=torch.float64)
    return problem.bounds[0] + unit * (problem.bounds[1] - problem.bounds[0])


def botorch_reference(problem, n_init: int, n_iter: int, seed: int) -> tuple[list, list]:
    """The plain BoTorch loop (tutorial form): returns best-so-far values and step times."""
    torch.manual_seed(seed)
    X = initial_design(problem, n_init, seed)
    y = problem(X)
    times = []
    for _ in range(n_iter):
        start = time.process_time()
        model = SingleTaskGP(X, -y[:, None], input_transform=Normalize(problem.dim,
                                                                       bounds=problem.bounds))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        acqf = LogExpectedImprovement(model, best_f=(-y).max())
        x, _ = optimize_acqf(acqf, bounds=problem.bounds, q=1, **ACQ,
                             options={"batch_limit": 5, "maxiter": 200})
        times.append(time.process_time() - start)
        X = torch.cat([X, x])
        y = torch.cat([y, problem(x)])
    return torch.cummin(y, 0).values.tolist(), times


def random_baseline(problem, n_init: int, n_iter: int, seed: int) -> tuple[list, list]:
    return random_search(problem, n_init + n_iter, seed).tolist(), [0.0] * n_iter


def bayesify_loop(surrogate: str, acquisition: str = "logei"):
    def run(problem, n_init: int, n_iter: int, seed: int) -> tuple[list, list]:
        bo = BayesianOptimization(None, problem.bounds, surrogate=surrogate,
                                  acquisition=acquisition, n_init=n_init, seed=seed,
                                  acquisition_options=ACQ, progress=False)
        X = bo.ask()  # the initial design
        bo.tell(X, problem(X))
        times = []
        for _ in range(n_iter):
            start = time.process_time()
            X = bo.ask()
            times.append(time.process_time() - start)
            bo.tell(X, problem(X))
        return bo.history.best.tolist(), times
    return run


def summarize(runs: list[tuple[list, list]], optimum: float) -> tuple[float, float, float]:
    mean, se = regret_summary([torch.tensor(r[0]) for r in runs], optimum)
    per_iter = sum(sum(r[1]) for r in runs) / sum(len(r[1]) for r in runs)
    return mean, se, per_iter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--problems", default="branin,hartmann6")
    parser.add_argument("--only", default="", help="comma-separated row names to run")
    args = parser.parse_args(argv)
    # Tiny matrices: threads only add contention (and the comparison stays fair).
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    contenders = {"bayesify gp": bayesify_loop("gp"), "botorch reference": botorch_reference,
                  "random search": random_baseline}
    for name in ("vbll",):
        if name in available_methods("regression"):
            contenders[f"bayesify {name}"] = bayesify_loop(name)
            contenders[f"bayesify {name} ts"] = bayesify_loop(name, "ts")
    if args.only:
        keep = {n.strip() for n in args.only.split(",")} | {"botorch reference"}
        contenders = {n: fn for n, fn in contenders.items() if n in keep}
    print(f"{'problem':<10} {'method':<20} {'log10 regret':>18} {'s/iter':>8} "
          f"{'time vs ref':>11}")
    for problem_name in args.problems.split(","):
        problem = get_problem(problem_name)
        n_init, n_iter = SETTINGS[problem_name]
        if args.quick:
            n_iter = max(5, n_iter // 3)
        rows = {}
        for name, fn in contenders.items():
            runs = [fn(problem, n_init, n_iter, seed) for seed in seeds]
            rows[name] = summarize(runs, problem.optimal_value)
        ref_time = rows["botorch reference"][2]
        for name, (mean, se, per_iter) in rows.items():
            ratio = f"{per_iter / ref_time:.2f}x" if per_iter > 0 else "-"
            print(f"{problem_name:<10} {name:<20} {mean:>10.3f} ± {se:<5.3f} "
                  f"{per_iter:>8.3f} {ratio:>11}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
