"""OOD detection on one digits network: feature detectors next to Bayesian scores.

Trains the README's MLP (64 -> 128 -> 8) on digits 0-7, wraps it with MC dropout
(``layers=2``, which also fine-tunes it with dropout), then scores the in-distribution
test digits against two OOD sets: the held-out digits 8 and 9, and the test digits
corrupted by Gaussian pixel noise plus pixel dropout (``d.X_corrupted``). Every
detector reads the same final network:

* Bayesian scores of the MC-dropout predictive (64 samples): max_prob, entropy,
  mutual_information, and the energy of the point logits;
* MSP of the plain network (its softmax, no sampling) as the baseline;
* the feature detectors with their papers' default settings (Mahalanobis, relative
  Mahalanobis, KNN k=50, ViM, ODIN T=1000 eps=0.0014, ReAct p=90, ASH-S p=90), fitted
  on the training set, and a combination (z-scored mutual information + Mahalanobis,
  z-statistics from the in-distribution validation set).

Nothing is tuned on the OOD sets. Prints AUROC, FPR95 and AUPR-out (OOD positive), the
fit time and the time to score the test and OOD inputs, measured in this one run.

    .venv/bin/python benchmarks/ood.py [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import bayesify as bf
from bayesify.data import load_digits
from bayesify.errors import JitterWarning


def build(seed: int, epochs: int):
    torch.manual_seed(seed)
    d = load_digits(seed=seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    bf.bayesify(net, "deterministic", task="classification").fit(
        (d.X_train, d.y_train), epochs=epochs)
    bm = bf.bayesify(net, "mc_dropout", task="classification", layers=2).fit(
        (d.X_train, d.y_train))
    return d, bm


def detectors() -> dict[str, object]:
    ood = bf.ood
    return {
        "MSP (plain softmax)": ood.PredictiveScore("max_prob"),
        "MC dropout max_prob": ood.PredictiveScore("max_prob", seed=0),
        "MC dropout entropy": ood.PredictiveScore("entropy", seed=0),
        "MC dropout mutual_info": ood.PredictiveScore("mutual_information", seed=0),
        "energy (point logits)": ood.PredictiveScore("energy"),
        "Mahalanobis": ood.Mahalanobis(),
        "relative Mahalanobis": ood.RelativeMahalanobis(),
        "KNN (k=50)": ood.KNN(),
        "ViM": ood.ViM(),
        "ODIN": ood.ODIN(),
        "ReAct energy": ood.ReActEnergy(),
        "ASH-S": ood.ASH(),
        "MI + Mahalanobis (z)": ood.CombinedScore(
            ood.PredictiveScore("mutual_information", seed=0), ood.Mahalanobis()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d, bm = build(args.seed, args.epochs)
    accuracy = float((bm.predict(d.X_test, seed=0).labels == d.y_test).double().mean())
    print(f"digits 0-7: {len(d.X_train)} train, {len(d.X_test)} test (accuracy "
          f"{accuracy:.3f}); OOD: {len(d.X_ood)} digits 8-9, {len(d.X_corrupted)} corrupted")
    sets = {"digits 8-9": d.X_ood, "corrupted": d.X_corrupted}
    rows = []
    for name, det in detectors().items():
        model = bm.model if name.startswith("MSP") else bm  # the network without sampling
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", JitterWarning)  # dead ReLU units: reported below
            if isinstance(det, bf.ood.CombinedScore):
                det.fit(model, (d.X_train, d.y_train), reference=d.X_val)
            else:
                det.fit(model, (d.X_train, d.y_train))
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        s_in = det.score(d.X_test)
        s_out = {key: det.score(x) for key, x in sets.items()}
        score_s = time.perf_counter() - start
        results = {key: bf.ood.evaluate(s_in, s) for key, s in s_out.items()}
        rows.append((name, results, fit_s, score_s))
    header = (f"{'score':<24}" + "".join(f"| {k:^26}" for k in sets)
              + "| fit s | score ms")
    print(header)
    print(f"{'':<24}" + "| AUROC  FPR95  AUPR-out  " * len(sets) + "|       |")
    print("-" * len(header))
    for name, results, fit_s, score_s in rows:
        cells = "".join(f"| {r['auroc']:.3f}  {r['fpr95']:.3f}  {r['aupr_out']:.3f}     "
                        for r in results.values())
        print(f"{name:<24}{cells}| {fit_s:5.2f} | {1000 * score_s:7.1f}")
    feature = [r for r in rows if not r[0].startswith(("MSP", "MC dropout", "energy"))]
    msp = rows[0]
    for key in sets:
        best = max(feature, key=lambda r: r[1][key]["auroc"])
        print(f"{key}: MSP AUROC {msp[1][key]['auroc']:.3f} FPR95 {msp[1][key]['fpr95']:.3f}"
              f" | best feature detector {best[0]} AUROC {best[1][key]['auroc']:.3f} "
              f"FPR95 {best[1][key]['fpr95']:.3f}")
    hidden = bf.ood.FeatureExtractor(bm).run(d.X_train)[0]
    dead = int((hidden.abs().sum(0) == 0).sum())
    print(f"features: {hidden.shape[1]} ReLU units, {dead} never active on the training set "
          "(their zero variance makes the covariance singular; the shared Cholesky adds "
          "jitter)")


if __name__ == "__main__":
    main()
