"""``bayesify bo``: run optimization loops on a test problem and print the regret table.

Example: ``bayesify bo --problem branin --surrogate gp,vbll --iterations 25 --seeds 3``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from bayesify.bo.acquisition import ACQUISITIONS
from bayesify.bo.loop import BayesianOptimization
from bayesify.bo.problems import PROBLEMS, get_problem, random_search, regret_summary
from bayesify.errors import BayesifyError, BayesifyWarning

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesify bo",
        description="Minimize a BoTorch test problem with each surrogate (and random "
                    "search) over several seeds; print the final log10 simple regret "
                    "(mean ± standard error) and seconds per iteration.")
    parser.add_argument("--problem", default="branin", choices=PROBLEMS)
    parser.add_argument("--surrogate", default="gp",
                        help="comma-separated method names (default: gp)")
    parser.add_argument("--acquisition", default="logei", choices=ACQUISITIONS)
    parser.add_argument("--iterations", type=int, default=25,
                        help="steps after the initial design (default: 25)")
    parser.add_argument("--n-init", type=int, default=None,
                        help="initial Sobol points (default: max(5, 2d))")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bayesify bo``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    problem = get_problem(args.problem)
    surrogates = [s.strip() for s in args.surrogate.split(",") if s.strip()]
    rows = []
    try:
        if args.seeds < 1 or args.iterations < 0:
            raise BayesifyError("--seeds must be >= 1 and --iterations >= 0")
        n_init = None
        for name in surrogates:
            curves, times = [], []
            for seed in range(args.seeds):
                bo = BayesianOptimization(problem, problem.bounds, surrogate=name,
                                          acquisition=args.acquisition, n_init=args.n_init,
                                          batch_size=args.batch_size, seed=seed,
                                          progress=not args.no_progress)
                with warnings.catch_warnings():
                    # Failed evaluations are counted in the table, not printed per point.
                    warnings.simplefilter("ignore", BayesifyWarning)
                    history = bo.run(args.iterations).history
                n_init = bo.n_init
                curves.append(history.best)
                times.extend(history.times[1:])
            per_iter = sum(times) / len(times) if times else 0.0
            rows.append((name, *regret_summary(curves, problem.optimal_value), per_iter))
    except BayesifyError as exc:
        print(f"bayesify bo: {exc}", file=sys.stderr)
        return 2
    total = (n_init or 0) + args.iterations * args.batch_size
    random = [random_search(problem, total, seed) for seed in range(args.seeds)]
    rows.append(("random search", *regret_summary(random, problem.optimal_value), 0.0))
    print(f"{args.problem}: {total} evaluations, {args.seeds} seed(s), "
          f"acquisition {args.acquisition}")
    print(f"{'surrogate':<16} {'log10 regret':>20} {'s/iter':>8}")
    for name, mean, se, per_iter in rows:
        print(f"{name:<16} {mean:>10.3f} ± {se:<7.3f} {per_iter:>8.3f}")
    return 0
