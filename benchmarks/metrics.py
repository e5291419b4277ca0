"""Time bayesify's ECE and AUROC on 1,000,000 predictions against scikit-learn/torchmetrics.

Run: ``.venv/bin/python benchmarks/metrics.py``; torchmetrics lives in a separate venv:
``/tmp/benchvenv/bin/python benchmarks/metrics.py``. A baseline that is not installed is
printed as such. Each row is the best of ``--repeats`` rounds in this one process, the
implementations interleaved within each round, input validation included on every side;
wall time and CPU time (all threads of this process: steadier on a shared machine) are
both shown. ``ratio`` is implementation time / bayesify time: >= 1 means bayesify is
no slower.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from bayesify import calibration, ood


def best_times(fns: dict[str, Callable[[], float]],
               repeats: int) -> dict[str, tuple[float, float, float]]:
    """Best wall and CPU time (s) of each function and its value, interleaved per round.

    Interleaving spreads load spikes from other processes over every implementation
    instead of penalising whichever ran during the spike. CPU time (this process, all
    threads) is the steadier measure on a shared machine.
    """
    values = {name: float(fn()) for name, fn in fns.items()}  # warm-up
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
    return {name: (wall[name], cpu[name], values[name]) for name in fns}


def make_data(n: int, num_classes: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(n, num_classes, generator=gen)
    probs = torch.softmax(logits, -1).to(device)
    # Labels drawn from the predicted probabilities, slightly sharpened, so the model is
    # mildly underconfident: a realistic, non-trivial ECE.
    labels = torch.multinomial(torch.softmax(1.3 * logits, -1), 1, generator=gen)[:, 0]
    scores = torch.randn(n, generator=gen)
    is_out = torch.rand(n, generator=gen) < 0.5
    scores = (scores + 1.5 * is_out).to(device)
    return probs, labels.to(device), scores, is_out.to(device)


def torchmetrics_call(name: str, preds: torch.Tensor, target: torch.Tensor,
                      **options) -> Callable[[], float] | None:
    """A fresh update/compute of torchmetrics.classification.<name>, or None if missing."""
    try:
        import torchmetrics.classification as tm
    except ImportError:
        return None
    metric = getattr(tm, name)(**options).to(preds.device)

    def run() -> float:
        metric.reset()
        metric.update(preds, target)
        return float(metric.compute())

    return run


def ece_functions(probs, labels, num_classes):
    fns = {"bayesify": lambda: calibration.expected_calibration_error(probs, labels, 15)}
    missing = {"scikit-learn": "no ECE in scikit-learn"}
    baseline = torchmetrics_call("MulticlassCalibrationError", probs, labels,
                                 num_classes=num_classes, n_bins=15, norm="l1")
    if baseline is None:
        missing["torchmetrics"] = "not installed"
    else:
        fns["torchmetrics"] = baseline
    return fns, missing


def auroc_functions(scores, is_out):
    s_in, s_out = scores[~is_out], scores[is_out]
    fns = {"bayesify": lambda: ood.auroc(s_in, s_out)}
    missing = {}
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        missing["scikit-learn"] = "not installed"
    else:
        y_np, s_np = is_out.cpu().numpy().astype(np.int64), scores.cpu().numpy()
        fns["scikit-learn"] = lambda: roc_auc_score(y_np, s_np)
    baseline = torchmetrics_call("BinaryAUROC", scores, is_out.long())
    if baseline is None:
        missing["torchmetrics"] = "not installed"
    else:
        fns["torchmetrics"] = baseline
    return fns, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of predictions")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probs, labels, scores, is_out = make_data(args.n, args.classes, device, args.seed)
    tables = {
        "ECE": ece_functions(probs, labels, args.classes),
        "AUROC": auroc_functions(scores, is_out),
    }
    print(f"{args.n:,} predictions, {args.classes} classes, device {device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'metric':<6} {'implementation':<14} {'wall [ms]':>10} {'ratio':>6} "
          f"{'cpu [ms]':>10} {'ratio':>6} {'value':>10}")
    for metric, (fns, missing) in tables.items():
        results = best_times(fns, args.repeats)
        our_wall, our_cpu, _ = results["bayesify"]
        for impl, (wall, cpu, value) in results.items():
            print(f"{metric:<6} {impl:<14} {1e3 * wall:>10.1f} {wall / our_wall:>6.2f} "
                  f"{1e3 * cpu:>10.1f} {cpu / our_cpu:>6.2f} {value:>10.6f}")
        for impl, why in missing.items():
            print(f"{metric:<6} {impl:<14} {'-':>10} {'-':>6} {'-':>10} {'-':>6}  {why}")
    print("ratio = implementation time / bayesify time (>= 1: bayesify no slower)")


if __name__ == "__main__":
    main()
