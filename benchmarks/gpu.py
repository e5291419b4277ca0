"""bayesify on a GPU, in one run: IVON's step, VBLL's train step, MC dropout, metrics.

    python benchmarks/gpu.py            # the full sizes, on CUDA (about two minutes on an H200)
    python benchmarks/gpu.py --quick    # tiny sizes, any device (a CPU smoke test)
    python benchmarks/gpu.py --only ivon,mc_dropout

1. ``ivon``: the train step (forward, backward, update) with IVON against AdamW, and
   against the official ivon-opt when it can be imported, on GPT-2 built from its
   config with transformers (124M, sequence 256, batch 16) and on a ResNet-50-like CNN
   defined here (bottleneck blocks [3, 4, 6, 3], 224 px, batch 64, 1000 classes), in
   float32 (TF32 matmuls) and under bfloat16 autocast. IVON uses the paper's recipes.
2. ``vbll``: the train step of the ResNet-50-like model wrapped with
   ``bayesify(net, "vbll", covariance=..., freeze_backbone=False)`` (``bm.loss``, the
   optimizer of ``bm.configure_optimizer``) against the plain model with AdamW, for the
   default covariance and for "dense", "diagonal" and "lowrank"; a covariance that the
   method refuses (or that runs out of memory) is reported as such.
3. ``mc_dropout``: ``bm.posterior`` and ``bm.predict`` with 64 samples against one
   forward of the plain network, at batch 256 and 8192: an MLP 784-1024-1024-10 with
   dropout before its last layer (the fold: one GEMM for all samples) and the same with
   an Identity after the dropout (the replicated path), in float32.
4. ``metrics``: ECE (``bf.calibration.expected_calibration_error``) and AUROC
   (``bf.ood.auroc``; ``bf.ood.evaluate`` computes AUROC, both AUPRs and FPR95 at once)
   against torchmetrics on 10^7 predictions of 10 classes.

Every figure is the best of a few rounds (each the mean of several calls) after a
warm-up, timed with CUDA events on a GPU (perf_counter after a synchronize elsewhere);
every ratio compares two figures of this one run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

import bayesify as bf

# This folder holds benchmarks/ivon.py: keep it off the path so that `import ivon` can
# only find the official package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

SECTIONS = ("ivon", "vbll", "mc_dropout", "metrics")


# ------------------------------------------------------------------------ timing


def _elapsed_ms(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Mean time of ``inner`` calls of ``fn`` in ms (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    began = time.perf_counter()
    for _ in range(inner):
        fn()
    return 1e3 * (time.perf_counter() - began) / inner


def compare(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2,
            rounds: int = 3, inner: int = 3) -> dict[str, float]:
    """Best over ``rounds`` of the mean time of ``inner`` calls, per function, in ms.

    The functions are warmed up, then interleaved round by round, so a load spike from
    elsewhere slows one round of each rather than every round of one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _elapsed_ms(fn, device, inner))
    return best


def best_ms(fn: Callable[[], object], device: torch.device, **options) -> float:
    """:func:`compare` for one function."""
    return compare({"": fn}, device, **options)[""]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(title: str, rows: list[tuple[str, float | str]], base: str) -> None:
    """Print rows of (name, ms or a reason) with the ratio to the row named ``base``."""
    print(f"\n{title}")
    print(f"  {'what':52s} {'ms':>10s} {'ratio':>8s}")
    reference = dict(rows).get(base)
    for name, value in rows:
        if isinstance(value, str):
            print(f"  {name:52s} {'-':>10s} {'-':>8s}  {value}")
            continue
        ratio = value / reference if isinstance(reference, float) else float("nan")
        print(f"  {name:52s} {value:10.2f} {ratio:8.3f}")


# ------------------------------------------------------------------------ models


class Bottleneck(nn.Module):
    """ResNet's bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand (x4), plus the skip."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(True), nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet50Like(nn.Module):
    """torchvision's ResNet-50 layout (25.6M parameters at the defaults): a 7x7 stem,
    four stages of bottlenecks, global average pooling and a Linear head ``fc``.
    Images [N, 3, H, W] -> logits [N, num_classes]; features [N, 4·8·base]."""

    def __init__(self, num_classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3),
                 base: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, base, 7, 2, 3, bias=False),
                                   nn.BatchNorm2d(base), nn.ReLU(True), nn.MaxPool2d(3, 2, 1)]
        c_in = base
        for stage, count in enumerate(blocks):
            width = base * 2**stage
            for i in range(count):
                layers.append(Bottleneck(c_in, width, 2 if i == 0 and stage > 0 else 1))
                c_in = 4 * width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet_case(quick: bool, device: torch.device):
    """The CNN, an image batch and labels: 224 px, batch 64, C = 1000 (quick: tiny)."""
    torch.manual_seed(0)
    if quick:
        net, size, batch, classes = ResNet50Like(10, (1, 1, 1, 1), 8), 32, 8, 10
    else:
        net, size, batch, classes = ResNet50Like(), 224, 64, 1000
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return net.to(device), x, y, f"ResNet-50-like, {size} px, batch {batch}"


def gpt2_case(quick: bool, device: torch.device):
    """GPT-2 from its config (124M; quick: 2 layers of 64) and a batch of token ids."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = (GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=64,
                         bos_token_id=0, eos_token_id=0) if quick else GPT2Config())
    seq, batch = (32, 4) if quick else (256, 16)
    net = GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return net, ids, f"GPT-2 {params:.3g}M, seq {seq}, batch {batch}"


# ------------------------------------------------------------------------- IVON


def official_ivon():
    """The official ivon-opt package, or None when it cannot be imported here."""
    try:
        module = importlib.import_module("ivon")
    except ImportError:
        return None
    return module if hasattr(module, "IVON") else None


def gpt2_loss(quick: bool, device: torch.device):
    net, ids, title = gpt2_case(quick, device)
    return net, lambda model: model(ids, labels=ids).loss, title


def resnet_loss(quick: bool, device: torch.device):
    net, x, y, title = resnet_case(quick, device)
    return net, lambda model: nn.functional.cross_entropy(model(x), y), title


#: The paper's recipes (only for realism: the cost does not depend on them).
IVON_RECIPES = {"gpt2": dict(lr=150.0, hess_init=1e-3, ess=1e10, clip_radius=1e-3),
                "resnet": dict(lr=2.5, hess_init=0.05, ess=1.28e6)}


def ivon_tables(key: str, build, args, device: torch.device) -> None:
    """Time AdamW, bayesify's IVON and ivon-opt's on copies of one model, in float32 and
    under bfloat16 autocast, interleaved."""
    official = official_ivon()
    net, loss_fn, title = build(args.quick, device)
    kinds = ["AdamW", "bayesify IVON"] + (["ivon-opt IVON"] if official else [])
    steps: dict[str, Callable[[], None]] = {}
    for kind in kinds:
        model = copy.deepcopy(net).train()
        if kind == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            cls = bf.IVON if kind.startswith("bayesify") else official.IVON
            opt = cls(model.parameters(), **IVON_RECIPES[key])
        for low in (False, True):

            def step(model=model, opt=opt, sampled=kind != "AdamW", low=low) -> None:
                with opt.sampled_params(train=True) if sampled else nullcontext():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                        loss = loss_fn(model)
                    loss.backward()
                opt.step()

            steps[f"{kind}|{low}"] = step
    net = None
    free(device)
    quick = dict(warmup=1, rounds=2, inner=1) if args.quick else dict(warmup=3, inner=5)
    times = compare(steps, device, **quick)
    for low in (False, True):
        rows: list[tuple[str, float | str]] = [(k, times[f"{k}|{low}"]) for k in kinds]
        if not official:
            rows.append(("ivon-opt IVON", "not installed"))
        precision = "bfloat16 autocast" if low else "float32"
        table(f"IVON vs AdamW, train step: {title}, {precision}", rows, "AdamW")


def section_ivon(args, device: torch.device) -> None:
    for key, build in (("gpt2", gpt2_loss), ("resnet", resnet_loss)):
        ivon_tables(key, build, args, device)
        free(device)


# ------------------------------------------------------------------------- VBLL


def plain_step_ms(args, device: torch.device) -> tuple[float, str]:
    net, x, y, title = resnet_case(args.quick, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    net.train()
    return best_ms(step, device, **(dict(warmup=1, rounds=2, inner=1) if args.quick else {})), \
        title


def vbll_step_ms(covariance: str | None, args, device: torch.device) -> tuple[str, float | str]:
    """The train step of the ResNet-50-like model wrapped with VBLL, or why it failed."""
    name = f"vbll covariance={covariance or 'default'}"
    net, x, y, _ = resnet_case(args.quick, device)      # the same seeded network
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bm = bf.bayesify(net, "vbll", task="classification", covariance=covariance,
                             freeze_backbone=False, n_data=50_000)
            opt = bm.configure_optimizer(1e-4, 0.0)
        if covariance is None:
            name += f" ({getattr(bm.vbll, 'covariance', '?')})"
        bm.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            bm.loss(x, y).backward()
            opt.step()

        few = (covariance == "dense" and not args.quick) or args.quick
        return name, best_ms(step, device, warmup=1 if few else 2, rounds=2 if few else 3,
                             inner=1 if few else 3)
    except (bf.BayesifyError, RuntimeError) as exc:   # refused, or out of memory
        return name, f"{type(exc).__name__}: {str(exc)[:110]}"


def section_vbll(args, device: torch.device) -> None:
    plain, title = plain_step_ms(args, device)
    rows: list[tuple[str, float | str]] = [("plain model, AdamW", plain)]
    for covariance in (None, "dense", "diagonal", "lowrank"):
        free(device)
        rows.append(vbll_step_ms(covariance, args, device))
    free(device)
    table(f"VBLL train step against the plain model: {title}", rows, "plain model, AdamW")


# ------------------------------------------------------------------- MC dropout


def mc_dropout_rows(widths: tuple[int, ...], batch: int, samples: int, device: torch.device,
                    **options) -> list[tuple[str, float | str]]:
    torch.manual_seed(0)
    d_in, h1, h2, out = widths
    trunk = [nn.Linear(d_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(0.1)]
    net = nn.Sequential(*trunk, nn.Linear(h2, out)).to(device).eval()
    # The same modules with an Identity after the dropout: not foldable, so replicated.
    unfolded = nn.Sequential(*trunk, nn.Identity(), net[-1]).eval()
    x = torch.randn(batch, d_in, device=device)
    folded = bf.bayesify(net, "mc_dropout", task="classification")
    replicated = bf.bayesify(unfolded, "mc_dropout", task="classification")

    def posterior(bm, low: bool = False) -> object:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            return bm.posterior(x, num_samples=samples)

    def forward() -> object:
        with torch.no_grad():
            return net(x)

    fns = {
        "one forward of the plain network": forward,
        f"posterior, {samples} samples, folded": lambda: posterior(folded),
        f"posterior, {samples} samples, replicated": lambda: posterior(replicated),
        f"posterior, {samples} samples, folded, bf16 autocast": lambda: posterior(folded, True),
        f"predict, {samples} samples, folded (with the predictive)":
            lambda: folded.predict(x, num_samples=samples, batch_size=batch),
    }
    return list(compare(fns, device, **options).items())


def section_mc_dropout(args, device: torch.device) -> None:
    widths = (64, 128, 128, 10) if args.quick else (784, 1024, 1024, 10)
    for batch in ((256, 1024) if args.quick else (256, 8192)):
        rows = mc_dropout_rows(widths, batch, 64, device,
                               **(dict(rounds=2) if args.quick else {}))
        free(device)
        table(f"MC dropout against one forward: MLP {'-'.join(map(str, widths))}, "
              f"batch {batch}", rows, "one forward of the plain network")


# ---------------------------------------------------------------------- metrics


def section_metrics(args, device: torch.device) -> None:
    n, classes = (100_000 if args.quick else 10_000_000), 10
    gen = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.randn(n, classes, generator=gen)
    # Labels from sharpened probabilities: a mildly underconfident model, ECE ~ 0.05.
    labels = torch.multinomial(torch.softmax(1.3 * logits, -1), 1, generator=gen)[:, 0]
    probs, labels = torch.softmax(logits, -1).to(device), labels.to(device)
    is_out = torch.rand(n, generator=gen) < 0.5
    scores = (torch.randn(n, generator=gen) + 1.5 * is_out).to(device)
    is_out = is_out.to(device)
    s_in, s_out = scores[~is_out], scores[is_out]
    ece = {"bayesify expected_calibration_error":
           lambda: bf.calibration.expected_calibration_error(probs, labels, 15)}
    auroc = {"bayesify ood.auroc": lambda: bf.ood.auroc(s_in, s_out),
             "bayesify ood.evaluate (AUROC, AUPRs, FPR95)":
                 lambda: bf.ood.evaluate(s_in, s_out)["auroc"]}
    try:
        import torchmetrics.classification as tm
    except ImportError:
        tm = None
    if tm is not None:
        def run(metric, *inputs) -> float:
            metric.reset()
            metric.update(*inputs)
            return float(metric.compute())

        tm_ece = tm.MulticlassCalibrationError(num_classes=classes, n_bins=15,
                                               norm="l1").to(device)
        tm_auroc = tm.BinaryAUROC().to(device)
        ece["torchmetrics MulticlassCalibrationError"] = lambda: run(tm_ece, probs, labels)
        auroc["torchmetrics BinaryAUROC"] = lambda: run(tm_auroc, scores, is_out.long())
    for title, fns, base in ((f"ECE on {n:,} predictions of {classes} classes (15 bins)", ece,
                              "bayesify expected_calibration_error"),
                             (f"AUROC on {n:,} scores", auroc, "bayesify ood.auroc")):
        values = {name: float(fn()) for name, fn in fns.items()}
        rows: list[tuple[str, float | str]] = list(
            compare(fns, device, **(dict(rounds=2) if args.quick else {})).items())
        if tm is None:
            rows.append(("torchmetrics", "not installed"))
        table(title + ", values " + ", ".join(f"{v:.6f}" for v in values.values()), rows,
              base)


# ------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections out of {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bf.set_progress_bars(False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"bayesify {bf.__version__}, torch {torch.__version__}, {name}, "
          f"{'quick' if args.quick else 'full'} sizes; TF32 matmuls on; best of 3 rounds")
    began = time.perf_counter()
    for section in sections:
        started = time.perf_counter()
        globals()[f"section_{section}"](args, device)
        print(f"  [{section}: {time.perf_counter() - started:.1f} s]")
    print(f"\ntotal {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
