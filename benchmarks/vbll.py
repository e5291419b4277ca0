"""VBLL benchmark: quality on digits, and the cost of a VBLL head against a Linear head.

Run: ``.venv/bin/python benchmarks/vbll.py`` (about 2-4 minutes on a laptop CPU).

1. Digits (classes 0-7 in distribution, 8-9 held out as OOD, the embedded corrupted
   split for shift): a small MLP 64-128-128-8 trained with softmax, then wrapped with
   VBLL on frozen features (discriminative and generative heads, default settings).
   Accuracy, NLL, ECE on clean and corrupted test inputs, OOD AUROC (8-9 vs clean test;
   OOD score: max probability, or the feature density for the generative head), and
   the head's fit time (feature caching included).
2. Cost: a training step (forward, backward, AdamW step of backbone and head) and a
   predict call with a VBLL discriminative head versus a plain Linear head on the same
   MLP backbone of width 512 (10 and 100 outputs) and 64 (10 outputs), each covariance. The official
   ``vbll`` package's heads are timed too when a benchmark venv has it
   (``python3 -m venv /tmp/vbllvenv && /tmp/vbllvenv/bin/pip install -c constraints.txt
   torch && /tmp/vbllvenv/bin/pip install -c constraints.txt -e . vbll``); that part
   runs in a subprocess with that interpreter. It is never a dependency of bayesify.

All timings are medians over repeats, one thread, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from _digits import train_digits_mlp
from torch import nn

OFFICIAL_PYTHON = os.environ.get("VBLL_OFFICIAL_PYTHON", "/tmp/vbllvenv/bin/python")
IN_FEATURES, BATCH, PREDICT_BATCH, N_DATA = 64, 128, 1024, 50_000
# (backbone width, outputs): the width 512 with 10 and 100 outputs, and width 64
# where the official dense head still fits in memory.
CONFIGS = ((64, 10), (512, 10), (512, 100))
# The official dense head broadcasts its Cholesky factor over the batch, materializing
# [B, m, d, d] (and several such tensors in the backward pass); past this many bytes for
# one copy it is skipped (width 512, 10 outputs would peak above 10 GB).
OFFICIAL_MEMORY_LIMIT = 5e8


# ----------------------------------------------------------------------------- digits


def digits_table() -> None:
    import bayesify as bf
    from bayesify import calibration, ood
    from bayesify.data import load_digits

    data = load_digits()
    net = train_digits_mlp(data)
    rows = []
    for name, method, options in [
        ("deterministic softmax", "deterministic", {}),
        ("vbll discriminative", "vbll", {"kind": "discriminative"}),
        ("vbll generative", "vbll", {"kind": "generative"}),
    ]:
        bm = bf.bayesify(net, method, task="classification", copy_model=True, **options)
        start = time.perf_counter()
        if method == "vbll":
            bm.fit((data.X_train, data.y_train), progress=False, seed=0)
        fit_s = time.perf_counter() - start
        kind = "density" if options.get("kind") == "generative" else "max_prob"
        clean, shifted, out = (bm.predict(x, seed=0) for x in
                               (data.X_test, data.X_corrupted, data.X_ood))
        rows.append({
            "name": name, "fit_s": fit_s if method == "vbll" else float("nan"),
            "acc": calibration.accuracy(clean, data.y_test),
            "nll": calibration.negative_log_likelihood(clean, data.y_test),
            "ece": calibration.expected_calibration_error(clean, data.y_test),
            "c_acc": calibration.accuracy(shifted, data.y_test),
            "c_nll": calibration.negative_log_likelihood(shifted, data.y_test),
            "c_ece": calibration.expected_calibration_error(shifted, data.y_test),
            "auroc": ood.auroc(ood.score(clean, kind), ood.score(out, kind)),
            "c_auroc": ood.auroc(ood.score(shifted, kind), ood.score(out, kind)),
            "score": kind,
        })
    print("Digits: MLP 64-128-128-8 (softmax-trained), VBLL heads on frozen features, "
          f"{len(data.y_train)} training rows")
    print(f"{'method':24s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s} | {'c-acc':>6s} {'c-NLL':>6s} "
          f"{'c-ECE':>6s} | {'OOD AUROC':>9s} {'c-OOD':>6s} {'score':>9s} | {'fit s':>6s}")
    for r in rows:
        print(f"{r['name']:24s} {r['acc']:6.3f} {r['nll']:6.3f} {r['ece']:6.3f} | "
              f"{r['c_acc']:6.3f} {r['c_nll']:6.3f} {r['c_ece']:6.3f} | {r['auroc']:9.3f} "
              f"{r['c_auroc']:6.3f} {r['score']:>9s} | {r['fit_s']:6.2f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"  {r['name']}: accuracy {100 * (r['acc'] - base['acc']):+.1f} points, "
              f"OOD AUROC {r['auroc'] - base['auroc']:+.3f}, corrupted NLL "
              f"{r['c_nll'] / base['c_nll']:.2f}x, corrupted ECE "
              f"{r['c_ece'] / base['c_ece']:.2f}x, "
              f"clean NLL {r['nll'] / base['nll']:.2f}x, clean ECE {r['ece'] / base['ece']:.2f}x "
              "(of the deterministic softmax)")
    print("  (c- = corrupted test inputs; OOD AUROC: held-out digits 8-9 vs the clean test "
          "set; c-OOD: vs the corrupted test set)")


# ----------------------------------------------------------------------------- timing


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _backbone(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU())


def _time_head(make_head, loss_fn, predict_fn, width: int, outputs: int,
               repeats: int) -> dict:
    torch.manual_seed(0)
    backbone, head = _backbone(width), make_head()
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x = torch.randn(BATCH, IN_FEATURES)
    y = torch.randint(0, outputs, (BATCH,))
    x_pred = torch.randn(PREDICT_BATCH, IN_FEATURES)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(head, backbone(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    @torch.no_grad()
    def predict():
        predict_fn(head, backbone(x_pred))

    return {"step_ms": _median_ms(step, repeats), "predict_ms": _median_ms(predict, repeats)}


def _repeats(covariance: str, width: int, outputs: int) -> int:
    return 3 if covariance == "dense" and width * outputs >= 5000 else 10


def _time_linear(width: int, outputs: int) -> dict:
    return _time_head(lambda: nn.Linear(width, outputs),
                      lambda h, phi, y: nn.functional.cross_entropy(h(phi), y),
                      lambda h, phi: torch.softmax(h(phi), -1), width, outputs, 10)


def time_ours() -> dict:
    from bayesify.layers import VBLLDiscriminative

    results = {}
    for width, outputs in CONFIGS:
        results[f"linear/{width}/{outputs}"] = _time_linear(width, outputs)
        for cov in ("diagonal", "lowrank", "dense"):
            results[f"{cov}/{width}/{outputs}"] = _time_head(
                lambda w=width, m=outputs, c=cov: VBLLDiscriminative(
                    w, m, covariance=c, regularization_weight=1 / N_DATA),
                lambda h, phi, y: h.loss(phi, y),
                lambda h, phi: h.predict(phi, num_samples=10), width, outputs,
                _repeats(cov, width, outputs))
    return results


def time_official() -> dict:
    # This script is itself named vbll.py: drop its folder so the package is imported.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import vbll

    results = {}
    for width, outputs in CONFIGS:
        # The same Linear head again in this process: the official heads' cost is taken
        # relative to it, so load changes between the two processes cancel.
        results[f"linear/{width}/{outputs}"] = _time_linear(width, outputs)
        for cov in ("diagonal", "lowrank", "dense"):
            key = f"{cov}/{width}/{outputs}"
            need = BATCH * outputs * width * width * 4 if cov == "dense" else 0
            if need > OFFICIAL_MEMORY_LIMIT:
                results[key] = {"skipped": f"[B,m,d,d] copies of {need / 1e9:.1f} GB each"}
                continue
            results[key] = _time_head(
                lambda w=width, m=outputs, c=cov: vbll.DiscClassification(
                    w, m, 1 / N_DATA, parameterization=c, cov_rank=10),
                lambda h, phi, y: h(phi).train_loss_fn(y),
                lambda h, phi: h(phi).predictive.probs, width, outputs,
                _repeats(cov, width, outputs))
    return results


def official_results() -> dict | str:
    if not os.path.exists(OFFICIAL_PYTHON):
        return "not installed"
    done = subprocess.run([OFFICIAL_PYTHON, __file__, "--official-json"], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def timing_table() -> None:
    ours = time_ours()
    official = official_results()
    print(f"\nHead cost: MLP {IN_FEATURES}-w-w backbone + head, train step batch {BATCH} "
          f"(AdamW, clip 1.0), predict batch {PREDICT_BATCH} (10 logit samples), 1 thread, "
          "median ms. 'x Lin' = time / the Linear head's time in the same process; "
          "'off/ours' = official x Lin / ours x Lin (the speedup over the official head).")
    print(f"{'w':>4s} {'outputs':>7s} {'head':9s} {'step ms':>9s} {'x Lin':>7s} "
          f"{'pred ms':>9s} {'x Lin':>7s} | {'off step':>9s} {'x Lin':>7s} {'off/ours':>8s} "
          f"{'off pred':>9s} {'x Lin':>7s} {'off/ours':>8s}")
    for width, outputs in CONFIGS:
        linear = ours[f"linear/{width}/{outputs}"]
        for head in ("linear", "diagonal", "lowrank", "dense"):
            key = f"{head}/{width}/{outputs}"
            r = ours[key]
            step_x = r["step_ms"] / linear["step_ms"]
            pred_x = r["predict_ms"] / linear["predict_ms"]
            line = (f"{width:4d} {outputs:7d} {head:9s} {r['step_ms']:9.2f} {step_x:7.2f} "
                    f"{r['predict_ms']:9.2f} {pred_x:7.2f} | ")
            if head == "linear":
                line += "-"
            elif isinstance(official, str):
                line += official
            elif "skipped" in official[key]:
                line += "skipped: " + official[key]["skipped"]
            else:
                o, o_lin = official[key], official[f"linear/{width}/{outputs}"]
                o_step_x = o["step_ms"] / o_lin["step_ms"]
                o_pred_x = o["predict_ms"] / o_lin["predict_ms"]
                line += (f"{o['step_ms']:9.2f} {o_step_x:7.2f} {o_step_x / step_x:8.2f} "
                         f"{o['predict_ms']:9.2f} {o_pred_x:7.2f} {o_pred_x / pred_x:8.2f}")
            print(line)
    print("Targets: diagonal step <= 1.10x Linear; dense step >= 5x faster than the official "
          "dense head.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-json", action="store_true",
                        help="time the official vbll heads only and print JSON (internal)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.official_json:
        print(json.dumps(time_official()))
        return
    if not args.skip_digits:
        digits_table()
    if not args.skip_timing:
        timing_table()


if __name__ == "__main__":
    main()
