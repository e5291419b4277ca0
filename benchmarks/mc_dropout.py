"""MC dropout prediction cost: the batched fast path against the per-sample loop.

An MLP 784 -> 1024 -> 1024 -> 10 with dropout only before its last layer, 64 samples
for a batch of 256 inputs. Prints the median time of one deterministic forward, of the
fast path (deterministic prefix once, the dropout folded into the last layer: all 64
samples in one GEMM with stacked masked weights), of the fast path without folding
(the prefix output replicated 64 times; an Identity between dropout and Linear blocks
the fold), of the naive loop (one full forward per sample, bayesify's and plain
torch's), and of drawing the dropout uniforms alone: S·D (one mask per sample, shared
by the inputs, as bayesify draws) and S·N·D (a mask per input, as torch's train mode
draws), each as a ratio to the deterministic forward, all measured in this one run.

    .venv/bin/python benchmarks/mc_dropout.py [--batch 256] [--samples 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import bayesify as bf


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds, after two warmup calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Dropout(0.1), nn.Linear(1024, 10)).to(device).eval()
    x = torch.randn(args.batch, 784, device=device)
    s = args.samples
    bm = bf.bayesify(net, "mc_dropout", task="classification")
    # The same modules with an Identity after the dropout: not foldable, so replicated.
    unfolded = bf.bayesify(nn.Sequential(*net[:5], nn.Identity(), net[5]), "mc_dropout",
                           task="classification")
    generator = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def deterministic() -> object:
        return net(x)

    @torch.no_grad()
    def fast() -> object:
        bm.fast_path = True
        return bm.sample_outputs(x, s, generator)

    @torch.no_grad()
    def replicated() -> object:
        return unfolded.sample_outputs(x, s, generator)

    def fast_predict() -> object:
        bm.fast_path = True
        return bm.predict(x, num_samples=s, seed=0)

    @torch.no_grad()
    def naive() -> object:
        bm.fast_path = False
        return bm.sample_outputs(x, s, generator)

    @torch.no_grad()
    def torch_loop() -> object:
        net.train()
        try:
            return torch.stack([net(x) for _ in range(s)])
        finally:
            net.eval()

    def masks_alone() -> object:
        return torch.rand((s, 1, 1024), generator=generator, device=device)

    def masks_per_input() -> object:
        return torch.rand((s * args.batch, 1024), generator=generator, device=device)

    rows = [("one deterministic forward", deterministic),
            ("fast path (bayesify sample_outputs)", fast),
            ("fast path + predictive (bayesify predict)", fast_predict),
            ("fast path, replicated, not folded", replicated),
            ("naive loop (bayesify, fast_path=False)", naive),
            ("naive loop (plain torch, model.train())", torch_loop),
            ("dropout uniforms alone (S*1024)", masks_alone),
            ("per-input uniforms (S*N*1024, not drawn)", masks_per_input)]
    # The loops cost ~S forwards each: fewer repeats keep the run within a few minutes.
    slow = {"naive loop (bayesify, fast_path=False)", "naive loop (plain torch, model.train())"}
    times = {name: median_time(fn, max(3, args.repeats // 4) if name in slow else args.repeats,
                               device)
             for name, fn in rows}
    base = times["one deterministic forward"]
    print(f"MC dropout, MLP 784-1024-1024-10, dropout before the last layer, "
          f"batch {args.batch}, {s} samples, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (loops: {max(3, args.repeats // 4)}) after 2 warmups")
    print(f"{'what':44s} {'ms':>9s} {'x deterministic':>16s}")
    for name, _ in rows:
        print(f"{name:44s} {1e3 * times[name]:9.2f} {times[name] / base:16.1f}")
    rest = times[rows[1][0]] - times[rows[6][0]]
    print(f"{'fast path minus its uniforms (derived)':44s} {1e3 * rest:9.2f} "
          f"{rest / base:16.1f}")
    print(f"target: fast path <= 3x deterministic -> "
          f"{'met' if times[rows[1][0]] <= 3 * base else 'missed'}; "
          f"fast path is {times[rows[4][0]] / times[rows[1][0]]:.1f}x faster than the loop")


if __name__ == "__main__":
    main()
