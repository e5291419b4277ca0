"""IVON against AdamW (and the official ivon-opt package): speed, memory, quality.

    .venv/bin/python benchmarks/ivon.py [--quick]

1. Time per training step with one train sample, measured in one process with the
   optimizers interleaved round by round (fastest round): a width-512 MLP on
   64 inputs at batch 64 and 256, and a small CNN on the 8x8 digits. The official
   package is timed when it can be imported here, or else from /tmp/ivonvenv (made
   with ``python3 -m venv /tmp/ivonvenv && /tmp/ivonvenv/bin/pip install -c
   constraints.txt torch && /tmp/ivonvenv/bin/pip install -c constraints.txt -e .
   ivon-opt``), where this script re-runs its timing part so all three come from one
   process; otherwise it prints "not installed".
2. Optimizer memory: persistent state (bytes, tensors per parameter) and the peak of
   everything allocated during one step (forward, backward, update), from the
   profiler's allocation events.
3. Quality on digits (classes 0-7; 8-9 are OOD), width-256 MLP, the same epochs and
   batch size for both, IVON predicting with 32 test samples: with 20% of training
   labels flipped, and clean. Hyperparameters follow the papers' recipes (AdamW lr 1e-3
   and torch's weight decay; IVON lr 0.2 as for the paper's ResNets, h0 1.0 (the default),
   ess = N, weight decay 1e-4, beta2 0.999 scaled to the ~1400 steps here), chosen on
   another split's (seed 11) validation set with other training seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import bayesify as bf
import bayesify.calibration
import bayesify.ood
from bayesify.data import load_digits

VENV_PYTHON = "/tmp/ivonvenv/bin/python"
# This script is itself named ivon.py: keep its folder off the path, so `import ivon` can
# only find the official package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
KINDS = ("adamw", "ivon", "official")


# ---------------------------------------------------------------- models, steps


def mlp(width: int, classes: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def cnn(classes: int = 8) -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, classes))


def make_optimizer(kind: str, model: nn.Module, n_data: int, seed: int = 0):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "ivon":
        return bf.IVON(model.parameters(), lr=0.2, ess=n_data, hess_init=1.0, beta2=0.999,
                       seed=seed)
    import ivon  # the official package, only in the benchmark venv

    return ivon.IVON(model.parameters(), lr=0.2, ess=n_data, hess_init=1.0, beta2=0.999)


def make_step(kind: str, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor):
    def adam_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def ivon_step() -> None:
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return adam_step if kind == "adamw" else ivon_step


TIMING_CASES = {
    "MLP-512 batch 64": (lambda: mlp(512), 64),
    "MLP-512 batch 256": (lambda: mlp(512), 256),
    "CNN digits batch 64": (cnn, 64),
}


def time_steps(kinds: list[str], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Ms per step for each case and optimizer, interleaved round by round.

    Each figure is the fastest round's mean: on a shared machine the other processes
    only ever slow a round down, so the minimum is the least disturbed measurement.
    """
    results = {}
    for case, (build, batch) in TIMING_CASES.items():
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(batch, 64, generator=g), torch.randint(0, 8, (batch,), generator=g)
        runs = {}
        for kind in kinds:
            torch.manual_seed(0)
            model = build()
            runs[kind] = make_step(kind, model, make_optimizer(kind, model, 1000), x, y)
            for _ in range(5):
                runs[kind]()
        times = {kind: [] for kind in kinds}
        for _ in range(rounds):
            for kind in kinds:
                start = time.perf_counter()
                for _ in range(steps):
                    runs[kind]()
                times[kind].append((time.perf_counter() - start) / steps * 1e3)
        results[case] = {kind: min(t) for kind, t in times.items()}
    return results


def official_timings(rounds: int, steps: int) -> dict[str, dict[str, float]] | None:
    """All three optimizers timed in one process that can import the official package."""
    if importlib.util.find_spec("ivon") is not None:
        return time_steps(list(KINDS), rounds, steps)
    if not os.path.exists(VENV_PYTHON):
        return None
    command = [VENV_PYTHON, __file__, "--timing-json", f"--rounds={rounds}", f"--steps={steps}",
               f"--threads={torch.get_num_threads()}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"(the venv run failed: {done.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- memory


def state_bytes(optimizer, params: list[torch.Tensor]) -> tuple[int, int]:
    """Bytes and count of the optimizer's persistent tensors (its state and groups)."""
    own = {id(p) for p in params}
    tensors = {}
    for state in optimizer.state.values():
        if isinstance(state, dict):
            tensors.update({id(t): t for t in state.values()
                            if isinstance(t, torch.Tensor) and t.numel() > 1})
    for group in optimizer.param_groups:
        tensors.update({id(t): t for t in group.values()
                        if isinstance(t, torch.Tensor) and id(t) not in own})
    return sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors)


@contextlib.contextmanager
def _quiet_native_output():
    """Silence the profiler's native start/stop lines (file descriptors 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def peak_step_bytes(step) -> int:
    """Peak of the bytes allocated and not yet freed during one call of ``step``."""
    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def memory_rows(kinds: list[str]) -> list[tuple[str, float, int, float]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 64, generator=g), torch.randint(0, 8, (64,), generator=g)
    for kind in kinds:
        torch.manual_seed(0)
        model = mlp(512)
        params = list(model.parameters())
        optimizer = make_optimizer(kind, model, 1000)
        step = make_step(kind, model, optimizer, x, y)
        step()
        nbytes, count = state_bytes(optimizer, params)
        weights = sum(p.numel() * p.element_size() for p in params)
        rows.append((kind, nbytes / weights, count, peak_step_bytes(step) / weights))
    return rows


# --------------------------------------------------------------------- quality


def flip_labels(y: torch.Tensor, fraction: float, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = y.clone()
    idx = torch.randperm(len(y), generator=g)[: int(fraction * len(y))]
    y[idx] = (y[idx] + torch.randint(1, classes, (len(idx),), generator=g)) % classes
    return y


def train_and_predict(kind: str, data, y_train: torch.Tensor, epochs: int, seed: int):
    torch.manual_seed(seed)
    model = mlp(256, data.num_classes)
    optimizer = make_optimizer(kind, model, len(y_train), seed)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(order), 64):
            rows = order[i:i + 64]
            make_step(kind, model, optimizer, data.X_train[rows], y_train[rows])()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        if kind == "adamw":
            return ([bf.CategoricalPredictive.from_logits(model(x))
                     for x in (data.X_test, data.X_ood)], seconds)
        wrapped = bf.bayesify(model, "ivon", task="classification", optimizer=optimizer)
        return ([wrapped.predict(x, num_samples=32, seed=seed)
                 for x in (data.X_test, data.X_ood)], seconds)


def quality_rows(epochs: int, seeds: list[int]) -> list[tuple]:
    data = load_digits()
    rows = []
    for label, fraction in (("20% flipped", 0.2), ("clean", 0.0)):
        y_train = flip_labels(data.y_train, fraction, data.num_classes, seed=1234) \
            if fraction else data.y_train
        for kind in ("adamw", "ivon"):
            metrics = []
            for seed in seeds:
                (pred, pred_ood), seconds = train_and_predict(kind, data, y_train, epochs, seed)
                y = data.y_test
                scores_in = bf.ood.score(pred, "max_prob")
                scores_out = bf.ood.score(pred_ood, "max_prob")
                metrics.append((
                    100 * float((pred.labels == y).float().mean()),
                    float(bf.calibration.negative_log_likelihood(pred, y)),
                    float(bf.calibration.expected_calibration_error(pred, y)),
                    float(bf.ood.evaluate(scores_in, scores_out)["auroc"]),
                    seconds / epochs,
                ))
            rows.append((label, kind, *(statistics.mean(m) for m in zip(*metrics, strict=True))))
    return rows


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds, seeds, epochs")
    parser.add_argument("--no-quality", action="store_true", help="skip the digits runs")
    parser.add_argument("--timing-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 9)
    steps = args.steps or (10 if args.quick else 25)
    if args.timing_json:
        print(json.dumps(time_steps(list(KINDS), rounds, steps)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    timings = official_timings(rounds, steps)
    official = timings is not None
    if timings is None:
        timings = time_steps(["adamw", "ivon"], rounds, steps)
    print("time per training step (ms), one train sample; ratio = / AdamW (target <= 1.3)")
    print(f"{'case':<22}{'AdamW':>8}{'IVON':>8}{'ratio':>7}{'ivon-opt':>10}{'ratio':>7}")
    for case, t in timings.items():
        other = (f"{t['official']:>10.3f}{t['official'] / t['adamw']:>7.2f}" if official
                 else f"{'not installed':>17}")
        print(f"{case:<22}{t['adamw']:>8.3f}{t['ivon']:>8.3f}{t['ivon'] / t['adamw']:>7.2f}"
              + other)

    print("\noptimizer memory, MLP-512 batch 64, in units of the weights' size")
    print(f"{'optimizer':<10}{'state':>7}{'tensors':>9}{'peak in step':>14}")
    kinds = ["adamw", "ivon"] + (["official"] if importlib.util.find_spec("ivon") else [])
    for kind, state, count, peak in memory_rows(kinds):
        print(f"{kind:<10}{state:>7.2f}{count:>9d}{peak:>14.2f}")

    if args.no_quality:
        return
    epochs, seeds = (20, [0]) if args.quick else (100, [0, 1])
    print(f"\ndigits 0-7, MLP-256, {epochs} epochs, batch 64, mean of seeds {seeds}; IVON "
          "predicts with 32 samples; OOD = digits 8-9 by max-prob")
    print(f"{'labels':<13}{'method':<7}{'acc %':>7}{'NLL':>8}{'ECE':>8}{'AUROC':>8}"
          f"{'s/epoch':>9}")
    for label, kind, acc, nll, ece, auroc, seconds in quality_rows(epochs, seeds):
        print(f"{label:<13}{kind:<7}{acc:>7.2f}{nll:>8.3f}{ece:>8.3f}{auroc:>8.3f}"
              f"{seconds:>9.3f}")


if __name__ == "__main__":
    sys.exit(main())
