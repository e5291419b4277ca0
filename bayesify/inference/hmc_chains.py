"""HMC's sampler plumbing: the flat weight vector, Pyro's NUTS chains and the
convergence checks that decide whether a fit deserves a warning.

:func:`run_nuts` runs the chains of ``"hmc"`` on a potential over a flat vector θ [P'];
:func:`split_diagnostics` gives split-R-hat and ESS per coordinate; and
:func:`convergence_problems` reads them for the network's outputs at the training
inputs, which are identifiable whatever the network's symmetries, and says in words
what is wrong (chains that disagree, too few effective draws, a stuck chain,
divergences).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from bayesify._math import LOG_2PI
from bayesify.errors import ConvergenceWarning

__all__ = [
    "ESS_MIN",
    "R_HAT_MAX",
    "ConvergenceWarning",
    "FlatParameters",
    "convergence_problems",
    "gaussian_log_prior",
    "intra_op_threads",
    "problems_message",
    "run_nuts",
    "split_diagnostics",
    "summarize_draws",
]

#: Median split-R-hat of the outputs at the training inputs above which the chains
#: (or the halves of one chain) are taken to disagree.
R_HAT_MAX = 1.1
#: Median effective draws of those outputs below which the Monte Carlo error is too large.
ESS_MIN = 10.0
#: Fraction of divergent transitions above which the draws are biased.
DIVERGENT_MAX = 0.05

_FIX = ("raise `warmup` and `num_samples` (and use num_chains >= 2) in bayesify(..., "
        "'hmc', ...); divergences call for a smaller `step_size` or a higher "
        "`target_accept`. See bm.diagnostics()")


def gaussian_log_prior(theta: torch.Tensor, std: float) -> torch.Tensor:
    """log N(θ | 0, std² I) of a flat vector θ [P] (a scalar)."""
    return -0.5 * (theta.square().sum() / std**2 + theta.numel() * (LOG_2PI + 2 * math.log(std)))


def split_diagnostics(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-R-hat and effective sample size per coordinate.

    Args:
        samples: draws [C, S, P] from C chains (one chain is split in two halves, so
            R-hat is defined for C = 1 too).

    Returns:
        ``(r_hat, ess)``, each [P] (float64); the ESS is summed over chains. Both are
        NaN with fewer than 4 draws per chain.
    """
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    samples = samples.double()
    if samples.shape[1] < 4:  # too few draws to split and autocorrelate
        nan = samples.new_full(samples.shape[2:], math.nan)
        return nan, nan.clone()
    return (split_gelman_rubin(samples, chain_dim=0, sample_dim=1),
            effective_sample_size(samples, chain_dim=0, sample_dim=1))


def summarize_draws(samples: torch.Tensor, names: list[str], shapes: list[torch.Size],
                    log_density: torch.Tensor, function_r_hat: torch.Tensor,
                    function_ess: torch.Tensor) -> dict[str, Any]:
    """Split-R-hat and ESS of a fit's draws, per parameter, of the outputs and of the
    log density.

    Args:
        samples: the draws of the flat vector, [C, S, P'].
        names, shapes: the parameters that make up the P' coordinates, in order.
        log_density: log p(θ, data) of every draw, [C, S].
        function_r_hat, function_ess: of the outputs at the training inputs, [M].

    Returns:
        ``{"parameters": {name: {"r_hat", "ess" (tensors of the parameter's shape),
        "r_hat_max", "ess_min", "ess_mean"}}, "r_hat_max", "ess_min", "outputs":
        {"r_hat_median", "r_hat_max", "ess_median", "ess_min"}, "log_density":
        {"r_hat", "ess"}}``.
    """
    r_hat, ess = split_diagnostics(samples)
    sizes = [math.prod(s) for s in shapes]
    parameters = {}
    for name, shape, r, e in zip(names, shapes, r_hat.split(sizes), ess.split(sizes),
                                 strict=True):
        parameters[name] = {"r_hat": r.view(shape), "ess": e.view(shape),
                            "r_hat_max": float(r.max()), "ess_min": float(e.min()),
                            "ess_mean": float(e.mean())}
    lp_r_hat, lp_ess = split_diagnostics(log_density[..., None])
    return {"parameters": parameters, "r_hat_max": float(r_hat.max()),
            "ess_min": float(ess.min()),
            "outputs": {"r_hat_median": float(function_r_hat.median()),
                        "r_hat_max": float(function_r_hat.max()),
                        "ess_median": float(function_ess.median()),
                        "ess_min": float(function_ess.min())},
            "log_density": {"r_hat": float(lp_r_hat[0]), "ess": float(lp_ess[0])}}


def convergence_problems(function_r_hat: torch.Tensor, function_ess: torch.Tensor,
                         log_density: torch.Tensor, divergences: torch.Tensor) -> list[str]:
    """What is wrong with a fit's draws, in words (empty when they pass).

    The checks read the network's outputs at the training inputs (log probabilities or
    regression outputs), which are identifiable, unlike the weights of a network: the
    per-weight R-hat of chains in mirror-image modes is large while every prediction
    agrees.

    Args:
        function_r_hat, function_ess: split-R-hat and ESS of the outputs at up to 256
            training inputs, [M] each (M = points x outputs).
        log_density: log p(θ, data) of every kept draw, [C, S].
        divergences: divergent transitions per chain after warmup, [C].

    Returns:
        One sentence per failed check: fewer than 4 draws per chain, a chain that never
        moved, a median R-hat above :data:`R_HAT_MAX`, a median ESS below
        :data:`ESS_MIN`, divergences above 5% of the draws.
    """
    chains, draws = log_density.shape
    problems = []
    if draws < 4:
        problems.append(f"{draws} draws per chain are too few to check convergence")
    elif bool((log_density.double().var(1) == 0).any()):
        problems.append("a chain never moved (its log density is constant)")
    else:
        r_hat = float(function_r_hat.double().nan_to_num(math.inf).median())
        ess = float(function_ess.double().nan_to_num(0.0).median())
        if not r_hat <= R_HAT_MAX:
            problems.append(f"the chains (or the halves of a chain) disagree on the outputs "
                            f"at the training inputs: median split-R-hat {r_hat:.2f} "
                            f"(> {R_HAT_MAX})")
        if not ess >= ESS_MIN:
            problems.append(f"the outputs at the training inputs have a median of {ess:.1f} "
                            f"effective draws (< {ESS_MIN:g}) out of {chains * draws}")
    divergent = int(divergences.sum())
    if divergent > DIVERGENT_MAX * chains * draws:
        problems.append(f"{divergent} of {chains * draws} transitions diverged")
    return problems


def problems_message(problems: list[str], when: str) -> str:
    """The text of a :class:`ConvergenceWarning` for ``problems`` (``when``: "after
    fitting", "predicting")."""
    return (f"HMC draws fail convergence checks ({when}): {'; '.join(problems)}. The "
            f"predictive may be far from the posterior; {_FIX}")


@contextlib.contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with ``num_threads`` torch CPU threads, restoring the count after."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class FlatParameters:
    """The map between a module's trainable parameters and one flat vector [P].

    With ``prefix`` (a submodule's name), only that submodule's parameters, named as in
    ``module.named_parameters()``; the others stay the module's own.
    """

    def __init__(self, module: nn.Module, prefix: str | None = None):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad
                 and (prefix is None or n.startswith(prefix + "."))]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's current trainable parameters as one detached vector [P]."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ [P] as the module's named parameter tensors."""
        chunks = torch.split(theta, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


def run_nuts(
    potential: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    *,
    num_chains: int,
    num_samples: int,
    warmup: int,
    step_size: float,
    max_tree_depth: int,
    target_accept: float,
    init_scale: float,
    progress: bool,
) -> tuple[torch.Tensor, list[tuple[int, float, float]]]:
    """Run ``num_chains`` NUTS chains one after the other on U(θ) = ``potential(θ)``.

    Args:
        potential: the negative log joint of a flat vector θ [P'] (a scalar).
        start: θ [P'] where chain 0 starts; chain c > 0 starts at ``start`` plus
            N(0, init_scale²) noise.
        num_samples, warmup: kept and adaptation draws per chain.
        step_size, max_tree_depth, target_accept: NUTS's settings (step size and a
            diagonal mass matrix are adapted during warmup).
        progress: show Pyro's progress bar.

    Returns:
        ``(draws [C, S, P'], stats)`` with per chain (divergences after warmup,
        acceptance rate, adapted step size).
    """
    from pyro.infer.mcmc import MCMC, NUTS

    draws, stats = [], []
    for chain in range(num_chains):
        init = start
        if chain > 0:
            init = start + init_scale * torch.randn_like(start)
        kernel = NUTS(potential_fn=lambda params: potential(params["theta"]),
                      step_size=step_size, adapt_step_size=True, adapt_mass_matrix=True,
                      full_mass=False, max_tree_depth=max_tree_depth,
                      target_accept_prob=target_accept)
        info: dict[str, Any] = {}

        def record(kernel: NUTS, params: Any, stage: str, i: int,
                   info: dict[str, Any] = info) -> None:
            # The kernel resets its statistics after the run; keep the final ones.
            if stage.startswith("Sample") and i == num_samples - 1:
                info.update(kernel.diagnostics(), step_size=float(kernel.step_size))

        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup,
                    initial_params={"theta": init}, disable_progbar=not progress,
                    hook_fn=record)
        mcmc.run()
        draws.append(mcmc.get_samples()["theta"].detach().to(start.dtype))
        stats.append((len(info["divergences"]), float(info["acceptance rate"]),
                      info["step_size"]))
    return torch.stack(draws), stats
