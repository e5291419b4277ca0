"""Split conformal against MAPIE on identical scores: intervals (absolute score) and LAC sets.

MAPIE is never a dependency: install it in a separate environment and pass its Python,

    python -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install mapie
    .venv/bin/python benchmarks/conformal_mapie.py --mapie-python /tmp/benchenv/bin/python

Both sides get the same point predictions / class probabilities (MAPIE through a
prefit identity estimator), for calibration sizes and levels that include the cases
where (n + 1)(1 - alpha) is an integer, which float arithmetic can round up by one.
Prints, per (n, alpha), bayesify's rank k, the largest interval-bound difference and
the number of differing set entries.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from bayesify.calibration import ConformalClassifier, SplitConformalRegressor, conformal_rank

MAPIE_SCRIPT = r"""
import sys
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from mapie.classification import SplitConformalClassifier
from mapie.regression import SplitConformalRegressor

class Identity(RegressorMixin, BaseEstimator):
    def fit(self, X, y):
        self.fitted_ = True
        return self
    def predict(self, X):
        return np.asarray(X)[:, 0]

class Probs(ClassifierMixin, BaseEstimator):
    def fit(self, X, y):
        self.classes_ = np.arange(np.asarray(X).shape[1])
        self.fitted_ = True
        return self
    def predict_proba(self, X):
        return np.asarray(X)
    def predict(self, X):
        return np.asarray(X).argmax(1)

data = dict(np.load(sys.argv[1]))
out = {}
for key in [k for k in data if k.startswith("reg_") and k.count("_") == 2]:
    _, n, alpha = key.split("_")
    mean_cal, y_cal, mean_test = data[key], data[key + "_y"], data[key + "_t"]
    est = Identity().fit(mean_cal[:, None], y_cal)
    scr = SplitConformalRegressor(est, confidence_level=1 - float(alpha), prefit=True)
    scr.conformalize(mean_cal[:, None], y_cal)
    try:
        _, bounds = scr.predict_interval(mean_test[:, None])
    except ValueError:  # MAPIE refuses n <= 1 / alpha
        continue
    out[key] = bounds[:, :, 0].T
for key in [k[:-3] for k in data if k.startswith("cls_") and k.endswith("_pc")]:
    _, n, alpha = key.split("_")
    probs_cal, labels_cal, probs_test = data[key + "_pc"], data[key + "_yc"], data[key + "_pt"]
    est = Probs().fit(probs_cal, labels_cal)
    scc = SplitConformalClassifier(est, confidence_level=1 - float(alpha), prefit=True,
                                   conformity_score="lac")
    scc.conformalize(probs_cal, labels_cal)
    try:
        _, sets = scc.predict_set(probs_test)
    except ValueError:  # MAPIE refuses n <= 1 / alpha
        continue
    out[key] = sets[:, :, 0]
np.savez(sys.argv[2], **out)
"""

SIZES = [19, 20, 49, 99, 100, 199, 500]
ALPHAS = ["0.05", "0.1", "0.2", "0.42"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mapie-python", required=True,
                        help="the Python of an environment with MAPIE installed")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data: dict[str, np.ndarray] = {}
    ours: dict[str, object] = {}
    for n in SIZES:
        for alpha in ALPHAS:
            x = rng.uniform(-2, 2, size=n + 300)
            y = x + rng.normal(size=n + 300) * (0.5 + np.abs(x))
            mean = x  # the model's point prediction
            key = f"reg_{n}_{alpha}"
            data[key], data[key + "_y"], data[key + "_t"] = mean[:n], y[:n], mean[n:]
            cp = SplitConformalRegressor(alpha=float(alpha)).fit(torch.from_numpy(mean[:n]),
                                                                 torch.from_numpy(y[:n]))
            lower, upper = cp.predict_interval(torch.from_numpy(mean[n:]))
            ours[key] = np.stack([lower.numpy(), upper.numpy()])
            logits = 2 * rng.normal(size=(n + 300, 6))
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            labels = np.array([rng.choice(6, p=p) for p in probs])
            key = f"cls_{n}_{alpha}"
            data[key + "_pc"], data[key + "_yc"] = probs[:n], labels[:n]
            data[key + "_pt"] = probs[n:]
            cc = ConformalClassifier(score="lac", alpha=float(alpha)).fit(
                torch.from_numpy(probs[:n]), torch.from_numpy(labels[:n]))
            ours[key] = cc.predict_set(torch.from_numpy(probs[n:])).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        script = Path(tmp) / "mapie_side.py"
        script.write_text(MAPIE_SCRIPT)
        np.savez(inputs, **data)
        subprocess.run([args.mapie_python, "-W", "ignore", str(script), str(inputs),
                        str(outputs)], check=True)
        theirs = dict(np.load(outputs))
    version = subprocess.run([args.mapie_python, "-c", "import mapie; print(mapie.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    print(f"bayesify vs MAPIE {version}, identical predictions; 300 test points each")
    print(f"{'n':>4} {'alpha':>6} {'k':>4} | {'max |d bound|':>14} | {'set entries differing':>22}")
    for n in SIZES:
        for alpha in ALPHAS:
            k = conformal_rank(n, float(alpha))
            reg, cls = f"reg_{n}_{alpha}", f"cls_{n}_{alpha}"
            if reg not in theirs or cls not in theirs:
                print(f"{n:>4} {alpha:>6} {k:>4} | MAPIE refuses n <= 1/alpha (bayesify: "
                      f"{'infinite' if k > n else 'finite'} intervals)")
                continue
            bound = np.abs(ours[reg] - theirs[reg]).max()
            sets = int((ours[cls] != theirs[cls]).sum())
            note = ""
            if bound > 0 or sets:
                wider = bool(((theirs[reg][1] - theirs[reg][0])
                              >= (ours[reg][1] - ours[reg][0])).all())
                float_k = math.ceil((n + 1) * (1 - float(alpha)))
                note = (f"  MAPIE {'wider' if wider else 'differs'}; float rank "
                        f"ceil({(n + 1) * (1 - float(alpha))!r}) = {float_k}")
            print(f"{n:>4} {alpha:>6} {k:>4} | {bound:>14.3g} | {sets:>22d}{note}")


if __name__ == "__main__":
    main()
