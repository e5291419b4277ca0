"""Exact-GP fit time: bayesify's ``"gp"`` against BoTorch's ``SingleTaskGP`` on the same data.

Run: ``.venv/bin/python benchmarks/gp_fit.py [--sizes 200 600 2000] [--threads T]``.

Data: X uniform on [0, 1]³ (N training points, 1,000 test points), y = sin(6x₁) + x₂²
− cos(3x₃) + 0.1·ε. Both fits see the same unit-cube inputs (bayesify with
``input_bounds`` = [0, 1]³, so its features are X itself) and standardized targets.

For each N it prints the wall time of

* bayesify ``fit`` in float64 and in float32 (default ``num_restarts=3``: the prior mode
  and two prior draws, L-BFGS-B in float64 with closed-form gradients), and with
  ``num_restarts=1`` (one start, as BoTorch);
* BoTorch's ``SingleTaskGP`` + ``fit_gpytorch_mll`` in float64 (one start; GPyTorch
  switches from Cholesky to conjugate gradients above 800 points);

and, side by side, the marginal log likelihood with priors per point, both evaluated by
the same exact formula (bayesify's head objective at each fit's hyperparameters), and
the test NLL per point of the predictive (noise included) in the targets' units.
Timings are one run each on a possibly shared machine; compare within a row.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import bayesify as bf
from bayesify.layers.gp import ExactGPHead


def data(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64)
    y = (torch.sin(6 * x[:, 0]) + x[:, 1] ** 2 - torch.cos(3 * x[:, 2])
         + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    return x.to(dtype), y.to(dtype)


def gaussian_nll(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    y, mean, var = y.double(), mean.double(), var.double()
    return float((0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)).mean())


def mll_per_point(log_lengthscale: torch.Tensor, log_noise: torch.Tensor, mean: torch.Tensor,
                  z: torch.Tensor, y_std: torch.Tensor) -> float:
    """(log marginal likelihood + log prior) / N at the given hyperparameters (float64)."""
    head = ExactGPHead(z.shape[1], 1, dtype=torch.float64)
    with torch.no_grad():
        head.log_lengthscale.copy_(log_lengthscale.reshape(head.log_lengthscale.shape))
        head.log_noise.copy_(log_noise.reshape(1))
        head.mean.copy_(mean.reshape(1))
        return -float(head.objective(z.double(), y_std.double(), warn=False))


def run_bayesify(x, y, x_test, y_test, dtype, restarts):
    bounds = torch.tensor([[0.0] * 3, [1.0] * 3], dtype=dtype)
    x, y = x.to(dtype), y.to(dtype)
    start = time.perf_counter()
    bm = bf.bayesify(None, "gp", task="regression", input_bounds=bounds,
                     num_restarts=restarts).to(dtype)
    bm.fit((x, y), progress=False)
    seconds = time.perf_counter() - start
    gp = bm.gp
    mll = mll_per_point(gp.log_lengthscale.detach(), gp.log_noise.detach(), gp.mean.detach(),
                        gp.train_inputs, gp.train_targets)
    pred = bm.predict(x_test.to(dtype))
    return seconds, mll, gaussian_nll(y_test, pred.mean, pred.variance)


def run_botorch(x, y, x_test, y_test):
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    start = time.perf_counter()
    model = SingleTaskGP(x, y[:, None])
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    seconds = time.perf_counter() - start
    model.eval()
    y_std = (y - y.mean()) / y.std()
    mll = mll_per_point(model.covar_module.lengthscale.detach().log(),
                        model.likelihood.noise.detach().log(),
                        model.mean_module.constant.detach(), x, y_std[:, None])
    with torch.no_grad():
        post = model.posterior(x_test, observation_noise=True)
        nll = gaussian_nll(y_test, post.mean[:, 0], post.variance[:, 0])
    return seconds, mll, nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 2000])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # BoTorch's input-scaling and GPyTorch's CG notes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'N':>5} {'fit':<26} {'seconds':>8} {'MLL/N':>9} {'test NLL':>9}")
    for n in args.sizes:
        x, y = data(n, seed=n, dtype=torch.float64)
        x_test, y_test = data(1000, seed=n + 1, dtype=torch.float64)
        runs = [
            ("bayesify float64", run_bayesify, (torch.float64, 3)),
            ("bayesify float32", run_bayesify, (torch.float32, 3)),
            ("bayesify float64 1 start", run_bayesify, (torch.float64, 1)),
            ("botorch float64", run_botorch, ()),
        ]
        for name, fn, extra in runs:
            seconds, mll, nll = fn(x, y, x_test, y_test, *extra)
            print(f"{n:>5} {name:<26} {seconds:>8.2f} {mll:>9.4f} {nll:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
