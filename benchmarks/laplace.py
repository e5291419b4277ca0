"""Laplace benchmark: quality on digits, and the cost of last-layer K-FAC with many classes.

Run: ``.venv/bin/python benchmarks/laplace.py [--laplace-python /tmp/lapenv/bin/python]``
(about a minute on a laptop CPU, one thread; one to five more with the laplace-torch
comparison). Every ratio is measured in this run against a baseline on the same machine.

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
   subprocess), against one forward pass over the same data; the probit predictive on
   1,024 inputs against the plain network; and the memory guard refusing the per-class
   Jacobian route for 1,000 classes before allocating anything.
3. With ``--laplace-python PYTHON``, the same against laplace-torch (the reference
   implementation), run by that interpreter in subprocesses on the same saved weights
   and data (this script is the peer's entry point too; it imports no bayesify there):

   * agreement, in float64, for last-layer K-FAC (GGN) on the trained digits MLP: the
     log marginal likelihood at three prior precisions, the GLM Gaussian over the logits
     (means [N, C] and covariances [N, C, C]) and the probit and bridge probabilities;
     target 1e-4. laplace-torch splits a Linear head into two K-FAC blocks, G ⊗ A for
     the weight and G for the bias, with the weight-bias cross terms dropped; bayesify
     keeps one block G ⊗ Ã over [W | b] with Ã = Σ φ̃φ̃ᵀ, φ̃ = [φ, 1]. Like for like,
     the peer gets the same network with its head folded into a bias-free
     ``Linear(D + 1, C)`` after a layer appending the 1 (the same function and weights);
     the difference to the peer's own split layout is printed separately. The probit
     is the same formula in both (the diagonal of J Σ Jᵀ; see
     ``bayesify/inference/laplace.py`` for why not the centered logits);
   * a digits row: laplace-torch's last-layer K-FAC, its own marginal-likelihood prior
     tuning, probit, float32, like bayesify's "LL kron, probit";
   * fit time and peak memory of last-layer K-FAC with 10 and 1,000 classes on width-512
     features for both libraries, each fit in a fresh process, on the first
     ``N_COMPARE`` cost points (laplace-torch's default curvlinops backend backpropagates
     once per class and batch: its 1,000-class fit took 58-173 s for 1,024 points on one
     thread here, depending on the machine's load, 20-55 minutes for all 20,000, so the
     comparison uses fewer points; both fits are linear in N). laplace-torch gets a
     DataLoader with batches of ``PEER_BATCH``.

   Setting up the peer: laplace-torch 0.3 declares ``Requires-Dist: torchvision>=0.15``,
   which cannot be installed here and is never a bayesify dependency, so it lives in its
   own virtual environment, without torchvision::

       python3 -m venv /tmp/lapenv
       /tmp/lapenv/bin/pip install -c constraints.txt torch numpy scipy scikit-learn
       /tmp/lapenv/bin/pip install -c constraints.txt --no-deps laplace-torch asdfghjkl==0.1a4 \
           backpack-for-pytorch curvlinops-for-pytorch tqdm opt-einsum torchmetrics \
           lightning-utilities packaging einconv einops linear-operator unfoldnd

   (its requirements and theirs, less torchvision, each with ``--no-deps``; ``pip
   check`` then reports only the missing torchvision). ``import laplace`` does not import
   torchvision, so no stand-in for it is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch
from _digits import digits_mlp, train_digits_mlp
from torch import nn

N_COST, IN_FEATURES, WIDTH = 20_000, 64, 512
#: cost points for the comparison with laplace-torch, and its DataLoader batch size
N_COMPARE, PEER_BATCH = 1_024, 256
#: prior precisions at which the two log marginal likelihoods are compared (with ours tuned)
COMPARE_PRIORS = (1.0, 10.0)


# ----------------------------------------------------------------------------- digits


def _metrics(clean, shifted, out, data) -> dict:
    from bayesify import calibration, ood

    return {
        "acc": calibration.accuracy(clean, data.y_test),
        "nll": calibration.negative_log_likelihood(clean, data.y_test),
        "ece": calibration.expected_calibration_error(clean, data.y_test),
        "c_nll": calibration.negative_log_likelihood(shifted, data.y_test),
        "c_ece": calibration.expected_calibration_error(shifted, data.y_test),
        "auroc": ood.auroc(ood.score(clean, "max_prob"), ood.score(out, "max_prob")),
    }


def digits_table(data, net: nn.Module, peer: dict | None = None) -> None:
    import bayesify as bf
    from bayesify.predictive import CategoricalPredictive

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
            **_metrics(clean, shifted, out, data),
            "prior": ", ".join(f"{p:.3g}" for p in prior[:3]) + (" ..." if len(prior) > 3 else ""),
        })
    if peer is not None:
        clean, shifted, out = (CategoricalPredictive(peer[k].float())
                               for k in ("probs_test", "probs_corrupted", "probs_ood"))
        rows.append({"name": "laplace-torch LL kron, probit", "fit_s": peer["fit_s"],
                     **_metrics(clean, shifted, out, data), "prior": f"{peer['prior']:.3g}"})
    print(f"Digits: MLP 64-128-128-8 trained with softmax, Laplace post hoc; "
          f"{len(data.y_train)} training rows, prior precision by marginal likelihood unless "
          "noted")
    print(f"{'method':29s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s} | {'c-NLL':>6s} {'c-ECE':>6s} | "
          f"{'AUROC':>6s} | {'fit s':>6s}  prior precision")
    for r in rows:
        print(f"{r['name']:29s} {r['acc']:6.3f} {r['nll']:6.3f} {r['ece']:6.3f} | "
              f"{r['c_nll']:6.3f} {r['c_ece']:6.3f} | {r['auroc']:6.3f} | {r['fit_s']:6.2f}  "
              f"{r['prior']}")
    base = rows[0]
    for r in rows[1:]:
        print(f"  {r['name']}: NLL {r['nll'] / base['nll']:.2f}x, ECE "
              f"{r['ece'] / base['ece']:.2f}x, corrupted NLL {r['c_nll'] / base['c_nll']:.2f}x, "
              f"OOD AUROC {r['auroc'] - base['auroc']:+.3f} (vs the deterministic softmax)")
    print("  (c- = corrupted test inputs; AUROC: held-out digits 8-9 vs the clean test set, "
          "max-probability score; fit s includes the prior tuning)")
    if peer is not None:
        ours = rows[1]
        print(f"  LL kron, probit vs laplace-torch's: NLL {ours['nll'] / rows[-1]['nll']:.3f}x, "
              f"ECE {ours['ece'] / rows[-1]['ece']:.3f}x, corrupted NLL "
              f"{ours['c_nll'] / rows[-1]['c_nll']:.3f}x, OOD AUROC "
              f"{ours['auroc'] - rows[-1]['auroc']:+.4f}, fit time "
              f"{ours['fit_s'] / rows[-1]['fit_s']:.2f}x")


# ----------------------------------------------------------------------------- laplace-torch


def _import_peer():
    """laplace-torch's ``laplace`` package, not this script (which has the same name and
    whose folder Python puts first on sys.path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.modules.pop("laplace", None)
    import laplace

    return laplace


class _AppendOne(nn.Module):
    """φ ↦ [φ, 1]: with a bias-free Linear(D + 1, C) after it, the same head as a biased
    Linear(D, C), laid out as bayesify's K-FAC sees it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


def _folded(net: nn.Sequential) -> nn.Sequential:
    head = net[-1]
    folded = nn.Linear(head.in_features + 1, head.out_features, bias=False).to(head.weight)
    with torch.no_grad():
        folded.weight.copy_(torch.cat([head.weight, head.bias[:, None]], 1))
    return nn.Sequential(*list(net)[:-1], _AppendOne(), folded).eval()


def peer_digits_child(folder: str) -> dict:
    """laplace-torch on the saved digits MLP (runs under the peer's interpreter)."""
    from torch.utils.data import DataLoader, TensorDataset

    laplace = _import_peer()
    d = torch.load(os.path.join(folder, "digits.pt"), weights_only=True)

    def wrap(model, x, y):
        la = laplace.Laplace(model, "classification", subset_of_weights="last_layer",
                             hessian_structure="kron")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=PEER_BATCH))
        return la

    net = digits_mlp(d["classes"])
    net.load_state_dict(d["state"])
    net.eval()
    out: dict = {}
    x64, y = d["X_train"].double(), d["y_train"]
    test64 = d["X_test"].double()
    priors = [torch.tensor([p], dtype=torch.float64) for p in d["priors"]]
    for key, model in (("folded", _folded(net.double())), ("native", net.double())):
        la = wrap(model, x64, y)
        out[f"lml_{key}"] = [float(la.log_marginal_likelihood(p)) for p in priors]
        la.prior_precision = priors[0]
        with torch.no_grad():
            out[f"f_mu_{key}"], out[f"f_var_{key}"] = la._glm_predictive_distribution(test64)
            for link in ("probit", "bridge"):
                out[f"{link}_{key}"] = la(test64, pred_type="glm", link_approx=link)
    # its own workflow, in float32 like the digits table: fit, tune the prior by marglik
    net.float()
    start = time.perf_counter()
    la = wrap(net, d["X_train"], y)
    la.optimize_prior_precision(method="marglik", pred_type="glm")
    out["fit_s"] = time.perf_counter() - start
    out["prior"] = float(la.prior_precision)
    with torch.no_grad():
        for split in ("test", "corrupted", "ood"):
            out[f"probs_{split}"] = la(d[f"X_{split}"], pred_type="glm", link_approx="probit")
    torch.save(out, os.path.join(folder, "peer_digits.pt"))
    return {"version": _peer_version()}


def _peer_version() -> str:
    from importlib.metadata import version

    return version("laplace-torch")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def peer_digits(data, net: nn.Module, python: str, folder: str) -> dict:
    """Run the peer on the digits MLP and print the like-for-like agreement table;
    returns the peer's float32 predictions for the digits table."""
    import bayesify as bf

    x64, y, test64 = data.X_train.double(), data.y_train, data.X_test.double()
    net64 = digits_mlp(data.num_classes).double()
    net64.load_state_dict(net.state_dict())
    net64.eval()
    tuned = bf.bayesify(net64, "laplace", task="classification", approximation="mc")
    tuned.fit((x64, y), progress=False)
    prior = float(tuned.prior_precision)
    priors = [prior, *COMPARE_PRIORS]
    torch.save({"state": net.state_dict(), "classes": data.num_classes, "priors": priors,
                "X_train": data.X_train, "y_train": y, "X_test": data.X_test,
                "X_corrupted": data.X_corrupted, "X_ood": data.X_ood},
               os.path.join(folder, "digits.pt"))
    info = _run([python, __file__, "--peer-digits", folder])
    peer = torch.load(os.path.join(folder, "peer_digits.pt"), weights_only=True)
    ours = {"lml": [float(tuned.log_marginal_likelihood(p)) for p in priors]}
    with torch.no_grad():
        post = tuned.posterior(test64)
        ours["f_mu"], ours["f_var"] = post.mean, post.covariance
        for link in ("probit", "bridge"):
            bm = bf.bayesify(net64, "laplace", task="classification", approximation=link,
                             prior_precision=prior, tune=None).fit((x64, y), progress=False)
            ours[link] = bm.predict(test64).probs
    n, c = ours["f_mu"].shape
    print(f"\nlaplace-torch {info['version']} vs bayesify: last-layer K-FAC (GGN) on the "
          f"digits MLP, float64, the same weights and {len(y)} training rows; GLM "
          f"predictive on the {n} test inputs at prior precision {prior:.4g} (bayesify's "
          "marglik)")
    print(f"  {'quantity':50s} {'bayesify':>14s} {'laplace-torch':>14s} {'|difference|':>13s}")
    worst = 0.0
    for p, a, b in zip(priors, ours["lml"], peer["lml_folded"], strict=True):
        worst = max(worst, abs(a - b))
        print(f"  {f'log marginal likelihood, prior {p:.4g}':50s} {a:14.6f} {b:14.6f} "
              f"{abs(a - b):13.1e}")
    for name, key, size in (("GLM logit means", "f_mu", [n, c]),
                            ("GLM logit covariances", "f_var", [n, c, c]),
                            ("probit probabilities", "probit", [n, c]),
                            ("bridge probabilities", "bridge", [n, c])):
        diff = _max_diff(ours[key], peer[f"{key}_folded"])
        worst = max(worst, diff)
        print(f"  {f'{name} {size}, largest entry':50s} "
              f"{float(ours[key].abs().max()):14.6f} "
              f"{float(peer[f'{key}_folded'].abs().max()):14.6f} {diff:13.1e}")
    print(f"  largest difference {worst:.1e}: target 1e-4 "
          f"{'met' if worst <= 1e-4 else 'MISSED'}")
    lml_gap = max(abs(a - b) for a, b in zip(ours["lml"], peer["lml_native"], strict=True))
    print(f"  (laplace-torch got the network with its head folded into a bias-free "
          f"Linear({net64[-1].in_features + 1}, {c})\n   after a layer appending a 1: the same "
          "function and weights, one K-FAC block over [W | b]\n   as in bayesify. On the "
          "original network it takes the weight and the bias as two blocks,\n   dropping "
          "their cross terms; its log marginal likelihood then differs from bayesify's by "
          f"up to {lml_gap:.3f}\n   at these priors, its logit covariances by up to "
          f"{_max_diff(ours['f_var'], peer['f_var_native']):.3f}, its probit probabilities "
          f"by up to {_max_diff(ours['probit'], peer['probit_native']):.4f})")
    return peer


# ----------------------------------------------------------------------------- cost


def _cost_net(classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                         nn.ReLU(), nn.Linear(WIDTH, classes))


def _cost_setup(classes: int, folder: str) -> str:
    """Make and save the network and data of one class count; returns the file."""
    torch.manual_seed(0)
    net = _cost_net(classes).eval()
    x = torch.randn(N_COST, IN_FEATURES)
    with torch.no_grad():
        y = torch.cat([torch.distributions.Categorical(logits=3 * net(x[i:i + 1024])).sample()
                       for i in range(0, N_COST, 1024)])
    path = os.path.join(folder, f"cost_{classes}.pt")
    torch.save({"state": net.state_dict(), "classes": classes, "x": x, "y": y}, path)
    return path


def _load_cost(path: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    d = torch.load(path, weights_only=True)
    net = _cost_net(d["classes"])
    net.load_state_dict(d["state"])
    return net.eval(), d["x"][:n], d["y"][:n]


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


def cost_child(path: str, what: str) -> dict:
    """One measurement in a fresh process (peak RSS is per process)."""
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: ~4 s, once)

    import bayesify as bf

    torch.set_num_threads(1)
    net, x, y = _load_cost(path, N_COMPARE if what == "compare" else N_COST)
    n = len(y)
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, n, 1024):
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
    if what == "compare":
        return {"fit_s": fit_s, "extra_mb": extra_mb}
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


def peer_cost_child(path: str) -> dict:
    """laplace-torch's last-layer K-FAC fit on the first N_COMPARE cost points."""
    from torch.utils.data import DataLoader, TensorDataset

    laplace = _import_peer()
    torch.set_num_threads(1)
    net, x, y = _load_cost(path, N_COMPARE)
    loader = DataLoader(TensorDataset(x, y), batch_size=PEER_BATCH)
    la = laplace.Laplace(net, "classification", subset_of_weights="last_layer",
                         hessian_structure="kron")
    start = time.perf_counter()
    with PeakMemory() as memory:
        la.fit(loader)
    return {"fit_s": time.perf_counter() - start, "extra_mb": memory.extra_mb}


def _run(command: list[str]) -> dict:
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_child(path: str, what: str) -> dict:
    return _run([sys.executable, __file__, "--child", path, what])


def cost_table(folder: str, peer_python: str | None) -> None:
    print(f"\nCost: last-layer K-FAC on width-{WIDTH} features (MLP {IN_FEATURES}-{WIDTH}-"
          f"{WIDTH}-C), {N_COST:,} points, one thread, each row a fresh process")
    print(f"{'classes':>7s} {'tuning':>8s} | {'fit s':>6s} {'fit / forward':>13s} | "
          f"{'peak MB':>8s} | {'predict 1024 s':>14s} {'/ network':>9s}")
    results, paths = {}, {}
    for classes in (10, 1000):
        paths[classes] = _cost_setup(classes, folder)
        for what in ("none", "marglik"):
            r = _run_child(paths[classes], what)
            results[classes, what] = r
            print(f"{classes:7d} {what:>8s} | {r['fit_s']:6.2f} "
                  f"{r['fit_s'] / r['forward_s']:12.1f}x | {r['extra_mb']:8.1f} | "
                  f"{r['predict_1024_s']:14.3f} {r['predict_1024_s'] / r['net_1024_s']:8.1f}x")
    a, b = results[10, "none"], results[1000, "none"]
    print(f"  1,000 vs 10 classes: fit time {b['fit_s'] / a['fit_s']:.2f}x, peak memory "
          f"{b['extra_mb'] / max(a['extra_mb'], 1e-9):.2f}x (the K-FAC factors of 1,000 classes "
          f"hold {(1000**2 + 513**2) * 4 / 1e6:.1f} MB; the per-class Jacobians [N, C, P] of "
          f"{N_COST:,} points would hold {N_COST * 1000 * 513_000 * 4 / 1e12:.0f} TB)")
    guard = _run_child(paths[1000], "guard")
    print(f"  the Jacobian route (subset=['4'], hessian='diag') for 1,000 classes is refused "
          f"in {guard['seconds'] * 1e3:.0f} ms, {guard['extra_mb']:.1f} MB allocated: "
          f"{guard['message'][:160]}...")
    if peer_python is None:
        return
    print(f"\nCost against laplace-torch: last-layer K-FAC (GGN, no prior tuning) on the first "
          f"{N_COMPARE:,} of the same points, the same saved networks, one thread, each fit "
          f"in a fresh process (laplace-torch: default curvlinops backend, batches of "
          f"{PEER_BATCH})")
    print(f"{'classes':>7s} | {'bayesify s':>10s} {'laplace-torch s':>15s} {'ratio':>7s} | "
          f"{'bayesify MB':>11s} {'laplace-torch MB':>16s} {'ratio':>7s}")
    for classes in (10, 1000):
        ours = _run_child(paths[classes], "compare")
        theirs = _run([peer_python, __file__, "--peer-cost", paths[classes]])
        memory = ours["extra_mb"] / max(theirs["extra_mb"], 1e-9)
        print(f"{classes:7d} | {ours['fit_s']:10.3f} {theirs['fit_s']:15.3f} "
              f"{ours['fit_s'] / theirs['fit_s']:6.3f}x | {ours['extra_mb']:11.1f} "
              f"{theirs['extra_mb']:16.1f} {memory:6.3f}x")
    print("  (ratio: bayesify / laplace-torch; peak MB: resident memory above the level "
          "before the fit, sampled every millisecond)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("PATH", "WHAT"))
    parser.add_argument("--peer-digits", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--peer-cost", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("digits", "cost"))
    parser.add_argument("--laplace-python", metavar="PYTHON",
                        help="an interpreter with laplace-torch installed (a separate "
                             "environment; see the module docstring): compare with it")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cost_child(*args.child)))
        return
    if args.peer_digits:
        print(json.dumps(peer_digits_child(args.peer_digits)))
        return
    if args.peer_cost:
        print(json.dumps(peer_cost_child(args.peer_cost)))
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bayesify-laplace-") as folder:
        if args.only in (None, "digits"):
            from bayesify.data import load_digits

            data = load_digits()
            net = train_digits_mlp(data)
            peer = None
            if args.laplace_python:
                peer = peer_digits(data, net, args.laplace_python, folder)
                print()
            digits_table(data, net, peer)
        if args.only in (None, "cost"):
            cost_table(folder, args.laplace_python)
    if not args.laplace_python:
        print("\nlaplace-torch: not compared (pass --laplace-python with an environment that "
              "has it; see the module docstring)")


if __name__ == "__main__":
    main()
