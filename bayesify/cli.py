"""The ``bayesify`` command: ``bayesify report`` and ``bayesify bo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bayesify.errors import BayesifyError

__all__ = ["main"]


def _names(text: str) -> list[str] | None:
    names = [part.strip() for part in text.split(",") if part.strip()]
    return None if names in ([], ["all"]) else names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesify",
        description="Bayesian wrappers for PyTorch networks: reports and optimization loops.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="wrap a pretrained MLP with each method and tabulate its calibration",
        description="Pretrain a small MLP on embedded data, wrap it with each method, and "
                    "print accuracy/NLL/ECE/OOD (classification) or RMSE/NLL/CRPS/coverage "
                    "(regression) tables; write report.md and plots to --out.")
    report.add_argument("--data", default="digits,gap",
                        help="comma-separated: digits, gap, diabetes (default: digits,gap)")
    report.add_argument("--methods", default="all",
                        help="comma-separated method names, or 'all' (default)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--epochs", type=int, default=30, help="pretraining epochs")
    report.add_argument("--out", default="report", help="output folder ('' writes nothing)")
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands.add_parser("bo", add_help=False,
                        help="run a Bayesian-optimization loop and print its regret "
                             "(see `bayesify bo --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bo":
        from bayesify.bo.cli import main as bo_main

        return bo_main(argv[1:])
    args = _parser().parse_args(argv)
    from bayesify.report import run_report

    try:
        reports = run_report(_names(args.data) or ["digits", "gap"], _names(args.methods),
                             out=args.out or None, seed=args.seed, epochs=args.epochs,
                             progress=not args.no_progress)
    except BayesifyError as exc:
        print(f"bayesify report: {exc}", file=sys.stderr)
        return 2
    failed = [row.name for r in reports for row in r.rows if row.error is not None]
    if failed:
        print(f"bayesify report: methods failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
