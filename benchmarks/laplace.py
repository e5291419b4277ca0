"""Laplace benchmark: quality on digits, and the cost of last-layer K-FAC with many classes.

Run: ``.venv/bin/python benchmarks/laplace.py`` (about a minute on a laptop CPU, one
thread). Every ratio is measured in this run against a baseline on the same machine.

1. Digits (classes 0-7 in distribution, 8-9 held out as OOD, the embedded corrupted
   split for shift): an MLP 64-128-128-8 trained with softmax (Adam, 60 epochs), then
   wrapped post hoc with Laplace (no retraining): last-layer K-FAC / full / diagonal with
   the prior precision tuned by the marginal likelihood, the probit, bridge and MC links,
   a grid search on validation NLL, and all-layer K-FAC. Accuracy, NLL, ECE (clean and
   corrupted), OOD AUROC (max probability) and the fit time, against the deterministic
   softmax of the same network.
2. Cost: fitting last-layer K-FAC on width-512 features (MLP 64-512-512-C) with C = 10
   and C = 1,000 classes on 20,000 points: wall time and peak resident memory above the
   level before the fit (sampled every millisecond; each configuration in a fresh
   subprocess), against
   one forward pass over the same data; the probit predictive on 1,024 inputs against
   the plain network; and the memory guard refusing the per-class Jacobian route for
   1,000 classes before allocating anything.

laplace-torch (the reference implementation) is not compared: version 0.3 declares
``Requires-Dist: torchvision>=0.15`` (checked with ``pip download --no-deps
laplace-torch``), and this project does not install torchvision, not even in a separate
benchmark environment.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import torch
from torch import nn

N_COST, IN_FEATURES, WIDTH = 20_000, 64, 512


# ----------------------------------------------------------------------------- digits


def _train_mlp(data, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, data.num_classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(60):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(data.X_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
    return net.eval()


def digits_table() -> None:
    import bayesify as bf
    from bayesify import calibration, ood
    from bayesify.data import load_digits

    data = load_digits()
    net = _train_mlp(data)
    train = (data.X_train, data.y_train)
    configs = [
        ("deterministic softmax", "deterministic", {}),
        ("LL kron, probit", "laplace", {}),
        ("LL kron, bridge", "laplace", {"approximation": "bridge"}),
        ("LL kron, MC (100)", "laplace", {"approximation": "mc"}),
        ("LL full, probit", "laplace", {"hessian": "full"}),
        ("LL diag, probit", "laplace", {"hessian": "diag"}),
        ("LL kron, grid (val NLL)", "laplace", {"tune": None, "grid": True}),
        ("all kron, probit", "laplace", {"subset": "all"}),
        ("LL kron, sampled weights", "laplace", {"predictive": "nn"}),
    ]
    rows = []
    for name, method, options in configs:
        grid = options.pop("grid", False)
        bm = bf.bayesify(net, method, task="classification", copy_model=True, **options)
        start = time.perf_counter()
        if method == "laplace":
            bm.fit(train, progress=False, seed=0)
            if grid:
                bm.optimize_prior_precision("grid", val=(data.X_val, data.y_val))
        fit_s = time.perf_counter() - start
        clean, shifted, out = (bm.predict(x, seed=0) for x in
                               (data.X_test, data.X_corrupted, data.X_ood))
        prior = bm.prior_precision.tolist() if method == "laplace" else []
        rows.append({
            "name": name, "fit_s": fit_s if method == "laplace" else float("nan"),
            "acc": calibration.accuracy(clean, data.y_test),
            "nll": calibration.negative_log_likelihood(clean, data.y_test),
            "ece": calibration.expected_calibration_error(clean, data.y_test),
            "c_nll": calibration.negative_log_likelihood(shifted, data.y_test),
            "c_ece": calibration.expected_calibration_error(shifted, data.y_test),
            "auroc": ood.auroc(ood.score(clean, "max_prob"), ood.score(out, "max_prob")),
            "prior": ", ".join(f"{p:.3g}" for p in prior[:3]) + (" ..." if len(prior) > 3 else ""),
        })
    print(f"Digits: MLP 64-128-128-8 trained with softmax, Laplace post hoc; "
          f"{len(data.y_train)} training rows, prior precision by marginal likelihood unless "
          "noted")
    print(f"{'method':26s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s} | {'c-NLL':>6s} {'c-ECE':>6s} | "
          f"{'AUROC':>6s} | {'fit s':>6s}  prior precision")
    for r in rows:
        print(f"{r['name']:26s} {r['acc']:6.3f} {r['nll']:6.3f} {r['ece']:6.3f} | "
              f"{r['c_nll']:6.3f} {r['c_ece']:6.3f} | {r['auroc']:6.3f} | {r['fit_s']:6.2f}  "
              f"{r['prior']}")
    base = rows[0]
    for r in rows[1:]:
        print(f"  {r['name']}: NLL {r['nll'] / base['nll']:.2f}x, ECE "
              f"{r['ece'] / base['ece']:.2f}x, corrupted NLL {r['c_nll'] / base['c_nll']:.2f}x, "
              f"OOD AUROC {r['auroc'] - base['auroc']:+.3f} (vs the deterministic softmax)")
    print("  (c- = corrupted test inputs; AUROC: held-out digits 8-9 vs the clean test set, "
          "max-probability score)")


# ----------------------------------------------------------------------------- cost


def _cost_setup(classes: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                        nn.ReLU(), nn.Linear(WIDTH, classes)).eval()
    x = torch.randn(N_COST, IN_FEATURES)
    with torch.no_grad():  # in chunks: the setup must not raise the memory high-water mark
        y = torch.cat([torch.distributions.Categorical(logits=3 * net(x[i:i + 1024])).sample()
                       for i in range(0, N_COST, 1024)])
    return net, x, y


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """The largest resident memory above the level at entry, sampled every millisecond
    by a thread (torch kernels release the GIL, so it samples during them too)."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def extra_mb(self) -> float:
        return self.peak - self.base


def cost_child(classes: int, what: str) -> dict:
    """One measurement in a fresh process (peak RSS is per process)."""
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: ~4 s, once)

    import bayesify as bf

    torch.set_num_threads(1)
    net, x, y = _cost_setup(classes)
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, N_COST, 1024):
            net(x[i:i + 1024])
        forward_s = time.perf_counter() - start
    if what == "guard":
        start = time.perf_counter()
        with PeakMemory() as memory:
            try:
                bf.bayesify(net, "laplace", task="classification", subset=["4"],
                            hessian="diag").fit((x, y), progress=False)
                message = "fitted"
            except MemoryError as exc:
                message = str(exc)
        return {"seconds": time.perf_counter() - start, "message": message,
                "extra_mb": memory.extra_mb}
    tune = "marglik" if what == "marglik" else None
    bm = bf.bayesify(net, "laplace", task="classification", tune=tune)
    start = time.perf_counter()
    with PeakMemory() as memory:
        bm.fit((x, y), progress=False)
    fit_s = time.perf_counter() - start
    extra_mb = memory.extra_mb
    bm.predict(x[:1024])  # the first call factorizes (cached until the prior changes)
    start = time.perf_counter()
    bm.predict(x[:1024])
    predict_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        net(x[:1024])
    return {"fit_s": fit_s, "forward_s": forward_s, "extra_mb": extra_mb,
            "predict_1024_s": predict_s, "net_1024_s": time.perf_counter() - start,
            "prior": bm.prior_precision.tolist()}


def _run_child(classes: int, what: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(classes), what],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost_table() -> None:
    print(f"\nCost: last-layer K-FAC on width-{WIDTH} features (MLP {IN_FEATURES}-{WIDTH}-"
          f"{WIDTH}-C), {N_COST:,} points, one thread, each row a fresh process")
    print(f"{'classes':>7s} {'tuning':>8s} | {'fit s':>6s} {'fit / forward':>13s} | "
          f"{'peak MB':>8s} | {'predict 1024 s':>14s} {'/ network':>9s}")
    results = {}
    for classes in (10, 1000):
        for what in ("none", "marglik"):
            r = _run_child(classes, what)
            results[classes, what] = r
            print(f"{classes:7d} {what:>8s} | {r['fit_s']:6.2f} "
                  f"{r['fit_s'] / r['forward_s']:12.1f}x | {r['extra_mb']:8.1f} | "
                  f"{r['predict_1024_s']:14.3f} {r['predict_1024_s'] / r['net_1024_s']:8.1f}x")
    a, b = results[10, "none"], results[1000, "none"]
    print(f"  1,000 vs 10 classes: fit time {b['fit_s'] / a['fit_s']:.2f}x, peak memory "
          f"{b['extra_mb'] / max(a['extra_mb'], 1e-9):.2f}x (the K-FAC factors of 1,000 classes "
          f"hold {(1000**2 + 513**2) * 4 / 1e6:.1f} MB; the per-class Jacobians [N, C, P] of "
          f"{N_COST:,} points would hold {N_COST * 1000 * 513_000 * 4 / 1e12:.0f} TB)")
    guard = _run_child(1000, "guard")
    print(f"  the Jacobian route (subset=['4'], hessian='diag') for 1,000 classes is refused "
          f"in {guard['seconds'] * 1e3:.0f} ms, {guard['extra_mb']:.1f} MB allocated: "
          f"{guard['message'][:160]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CLASSES", "WHAT"))
    parser.add_argument("--only", choices=("digits", "cost"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cost_child(int(args.child[0]), args.child[1])))
        return
    torch.set_num_threads(1)
    if args.only in (None, "digits"):
        digits_table()
    if args.only in (None, "cost"):
        cost_table()
    print("\nlaplace-torch: not compared (laplace-torch 0.3 requires torchvision>=0.15, which "
          "this project does not install).")


if __name__ == "__main__":
    main()
