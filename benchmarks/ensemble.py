"""Ensembles, SWAG and MultiSWAG on digits: the cost of training members together, and
what each method buys in accuracy, NLL, ECE and OOD detection.

Run: ``.venv/bin/python benchmarks/ensemble.py [--seeds 3] [--repeats 3] [--threads N]``

Part 1 (cost). The digits MLP (64-128-128-8, AdamW lr 3e-3, batch 128, 30 epochs: the
``bayesify report`` recipe): wall and CPU time of fitting one member, of fitting M = 5
members together (``"ensemble"``, vmapped), and of fitting the 5 one after another
(``training="sequential"``), each the best of ``--repeats`` interleaved rounds in this
one process. The target is the batched fit at <= 2.5x one member's time.

Part 2 (quality), mean ± sd over ``--seeds`` seeds, every network fresh:

* ``deterministic``: the MLP with the recipe above;
* ``ensemble (5)``: 5 members, ``reinitialize="all"``, the same recipe (batched);
* ``swag``: SGD (momentum 0.9, lr 0.1) for 30 epochs, then 20 more collecting once per
  epoch (K = 20), 30 draws;
* ``multiswag (3x)``: 3 such SWAG members (``base="swag"``), 30 draws in all;
* ``ivon`` and ``ivon ensemble (5)``: IVON from scratch (lr 0.3, h0 = 1, 30 epochs,
  batch 64), 64 draws (13 per member in the ensemble).

OOD: digits 8 and 9 (held out of training) against the test set, AUROC of the max
probability and of the predictive entropy. Figures are printed as measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import bayesify as bf
from bayesify import calibration, ood
from bayesify.data import load_digits

RECIPE = {"epochs": 30, "lr": 3e-3, "batch_size": 128}
SWAG = {"options": {"swa_start": 30}, "fit": {"epochs": 50, "lr": 0.1}}
IVON = {"options": {"hess_init": 1.0}, "fit": {"epochs": 30, "lr": 0.3}}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 8))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def cost(train: tuple, repeats: int) -> None:
    def one() -> None:
        bf.bayesify(mlp(0), "deterministic", task="classification").fit(
            train, progress=False, seed=0, **RECIPE)

    def together() -> None:
        bm = bf.bayesify(mlp(0), "ensemble", task="classification", members=5,
                         reinitialize="all")
        bm.fit(train, progress=False, seed=0, **RECIPE)
        assert bm.training_mode == "vmap"

    def apart() -> None:
        bf.bayesify(mlp(0), "ensemble", task="classification", members=5,
                    reinitialize="all", training="sequential").fit(
            train, progress=False, seed=0, **RECIPE)

    runs = {"one member": one, "5 members, batched (vmap)": together,
            "5 members, one after another": apart}
    for fn in runs.values():        # warm-up (functorch's first trace, allocator)
        fn()
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    base_wall, base_cpu = best["one member"]
    print(f"\nTraining cost, digits MLP, {RECIPE['epochs']} epochs, {len(train[0])} rows, "
          f"{torch.get_num_threads()} thread(s), best of {repeats}:")
    print(f"| {'fit':30s} | wall s | CPU s | wall / one | CPU / one |")
    print(f"|{'-' * 32}|--------|-------|------------|-----------|")
    for name, (wall, cpu) in best.items():
        print(f"| {name:30s} | {wall:6.2f} | {cpu:5.2f} | {wall / base_wall:10.2f} | "
              f"{cpu / base_cpu:9.2f} |")
    ratio = best["5 members, batched (vmap)"][0] / base_wall
    print(f"target: batched <= 2.5x one member; measured {ratio:.2f}x "
          f"({'met' if ratio <= 2.5 else 'not met'})")


def methods(seed: int) -> dict[str, tuple[Callable[[], bf.BayesianModel], dict, int | None]]:
    """name -> (wrap, fit options, predict draws)."""
    task = "classification"
    return {
        "deterministic": (lambda: bf.bayesify(mlp(seed), "deterministic", task=task),
                          RECIPE, None),
        "ensemble (5)": (lambda: bf.bayesify(mlp(seed), "ensemble", task=task, members=5,
                                             reinitialize="all", seed=seed), RECIPE, None),
        "swag": (lambda: bf.bayesify(mlp(seed), "swag", task=task, **SWAG["options"]),
                 SWAG["fit"], 30),
        "multiswag (3x)": (lambda: bf.bayesify(mlp(seed), "ensemble", task=task, members=3,
                                               base="swag", reinitialize="all", seed=seed,
                                               **SWAG["options"]), SWAG["fit"], 30),
        "ivon": (lambda: bf.bayesify(mlp(seed), "ivon", task=task, seed=seed,
                                     **IVON["options"]), IVON["fit"], 64),
        "ivon ensemble (5)": (lambda: bf.bayesify(mlp(seed), "ensemble", task=task,
                                                  members=5, base="ivon", seed=seed,
                                                  reinitialize="all", **IVON["options"]),
                              IVON["fit"], 64),
    }


def quality(seeds: int) -> None:
    d = load_digits()
    train = (d.X_train, d.y_train)
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in range(seeds):
        for name, (wrap, fit, draws) in methods(seed).items():
            bm = wrap()
            start = time.perf_counter()
            bm.fit(train, progress=False, seed=seed, **fit)
            wall = time.perf_counter() - start
            test = bm.predict(d.X_test, num_samples=draws, seed=seed)
            out = bm.predict(d.X_ood, num_samples=draws, seed=seed)
            metrics = calibration.evaluate(test, d.y_test)
            row = {"acc": metrics["accuracy"], "NLL": metrics["nll"], "ECE": metrics["ece"]}
            for kind, title in (("max_prob", "AUROC maxp"), ("entropy", "AUROC ent")):
                row[title] = ood.evaluate(ood.score(test, kind), ood.score(out, kind))["auroc"]
            row["fit s"] = wall
            rows.setdefault(name, []).append(row)
    columns = list(next(iter(rows.values()))[0])
    print(f"\nDigits (0-7; OOD: 8, 9), mean ± sd over {seeds} seed(s):")
    print("| method             | " + " | ".join(f"{c:^15s}" for c in columns) + " |")
    print("|" + "-" * 20 + "|" + "|".join("-" * 17 for _ in columns) + "|")
    for name, runs in rows.items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):7.4f} ± {sd:.4f}" if c != "fit s"
                         else f"{statistics.mean(values):7.2f} ± {sd:5.2f}")
        print(f"| {name:18s} | " + " | ".join(f"{c:15s}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", choices=("cost", "quality"), default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d = load_digits()
    if args.only != "quality":
        cost((d.X_train, d.y_train), args.repeats)
    if args.only != "cost":
        quality(args.seeds)


if __name__ == "__main__":
    main()
