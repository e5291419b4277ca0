"""Full-batch NUTS over every weight of a small network (Pyro's ``NUTS`` kernel).

The posterior over all trainable weights θ (and, for learned regression noise, the log
noise standard deviations) is sampled with the No-U-Turn sampler on the potential

    U(θ) = -Σ_i log p(y_i | x_i, θ) - log p(θ),     p(θ) = N(0, prior_std² I),

evaluated on the whole training set at every leapfrog step, so HMC is exact (up to
Monte Carlo error) but its cost grows with N times the number of weights: it refuses
networks above ``max_parameters`` (5,000 by default). It is the gold-standard
reference the approximate methods are checked against on small problems.

Regression noise (``noise=``):

* ``"homoscedastic"`` (default): one noise std σ_d per output, sampled jointly with
  the weights as log σ_d ~ N(0, noise_prior_std²);
* a positive float: a fixed, known noise std;
* ``"heteroscedastic"``: the network outputs means then raw scales (2·D columns).

The network is evaluated functionally (``torch.func.functional_call``) on a flat
weight vector, so the user's module keeps its weights; prediction evaluates all
posterior samples in one batched call with ``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from bayesify._batching import make_train_batches
from bayesify._math import LOG_2PI
from bayesify._validation import (
    check_fraction,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.core import BayesianModel, register_method
from bayesify.errors import InputError
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.likelihoods import gaussian_nll, regression_targets
from bayesify.predictive import CategoricalPredictive, MixturePredictive, Predictive

__all__ = ["HMCModel", "gaussian_log_prior", "split_diagnostics"]

_NOISE_NAME = "log_noise_std"


def gaussian_log_prior(theta: torch.Tensor, std: float) -> torch.Tensor:
    """log N(θ | 0, std² I) of a flat vector θ [P] (a scalar)."""
    return -0.5 * (theta.square().sum() / std**2 + theta.numel() * (LOG_2PI + 2 * math.log(std)))


def split_diagnostics(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-R-hat and effective sample size per coordinate.

    Args:
        samples: draws [C, S, P] from C chains (one chain is split in two halves, so
            R-hat is defined for C = 1 too).

    Returns:
        ``(r_hat, ess)``, each [P]; the ESS is summed over chains. Both are NaN with
        fewer than 4 draws per chain.
    """
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    samples = samples.double()
    if samples.shape[1] < 4:  # too few draws to split and autocorrelate
        nan = samples.new_full(samples.shape[2:], math.nan)
        return nan, nan.clone()
    return (split_gelman_rubin(samples, chain_dim=0, sample_dim=1),
            effective_sample_size(samples, chain_dim=0, sample_dim=1))


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with ``num_threads`` torch CPU threads, restoring the count after."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _FlatParameters:
    """The map between a module's trainable parameters and one flat vector [P]."""

    def __init__(self, module: nn.Module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ [P] as the module's named parameter tensors."""
        chunks = torch.split(theta, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


@register_method("hmc")
class HMCModel(NetworkLikelihoodMixin, BayesianModel):
    """NUTS posterior over all weights of a small network.

    Args:
        model: a network outputting logits [N, C] or regression means [N, D]
            (means then raw scales, [N, 2D], for ``noise="heteroscedastic"``).
        task: ``"classification"`` or ``"regression"``.
        num_samples: kept draws per chain (all are used by ``predict``).
        warmup: adaptation draws per chain (step size and diagonal mass matrix),
            discarded.
        num_chains: independent chains, run one after the other; chain 0 starts at the
            model's weights, the others at those weights plus N(0, (0.1·prior_std)²)
            noise.
        prior_std: standard deviation of the N(0, prior_std²) prior on every weight.
        noise: regression noise: ``"homoscedastic"`` (sampled), a fixed std, or
            ``"heteroscedastic"`` (see the module docstring).
        noise_prior_std: std of the N(0, noise_prior_std²) prior on each log noise std.
        step_size: initial leapfrog step size (adapted during warmup).
        max_tree_depth: NUTS's cap on the trajectory doubling (at most 2^depth
            leapfrog steps per draw); lower it to bound the cost per draw.
        target_accept: the acceptance rate step-size adaptation aims for.
        max_parameters: refuse models with more trainable weights than this.
        seed: makes sampling repeatable (``fit(seed=)`` overrides it).
        num_threads: CPU threads torch may use while sampling (restored after).
            Full-batch NUTS on a small network is a long chain of tiny operations
            whose cost is latency, which extra threads only add synchronization to;
            ``None`` keeps torch's setting.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: unused (the full training set is always used).

    ``loss(x, y)`` is the negative log joint per datum at the model's current weights
    (mean NLL plus the negative log prior over ``n_data``), whose minimizer is the MAP
    estimate; ``fit`` does not use it. ``diagnostics()`` reports split-R-hat and ESS.
    """

    default_num_samples = None

    def __init__(self, model: nn.Module, task: str, *, num_samples: int = 200,
                 warmup: int = 200, num_chains: int = 1, prior_std: float = 1.0,
                 noise: Any = "homoscedastic", noise_prior_std: float = 2.0,
                 step_size: float = 0.05, max_tree_depth: int = 10,
                 target_accept: float = 0.8, max_parameters: int = 5000,
                 seed: int | None = None, num_threads: int | None = 1,
                 num_outputs: int | None = None,
                 n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; HMC needs a network whose weights it samples")
        super().__init__(model, task, n_data=n_data)
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.warmup = check_positive_int(warmup, "warmup", minimum=0)
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.prior_std = check_positive_float(prior_std, "prior_std")
        self.noise_prior_std = check_positive_float(noise_prior_std, "noise_prior_std")
        self.step_size = check_positive_float(step_size, "step_size")
        self.max_tree_depth = check_positive_int(max_tree_depth, "max_tree_depth")
        self.target_accept = check_fraction(target_accept, "target_accept")
        self.max_parameters = check_positive_int(max_parameters, "max_parameters")
        self.seed = None if seed is None else int(seed)
        self.num_threads = (None if num_threads is None
                            else check_positive_int(num_threads, "num_threads"))
        self._init_likelihood(noise, num_outputs)
        self._flat = _FlatParameters(model)
        if self._flat.numel == 0:
            raise InputError("`model` has no trainable parameters for HMC to sample")
        if self._flat.numel > self.max_parameters:
            raise InputError(
                f"`model` has {self._flat.numel:,} trainable parameters, more than "
                f"`max_parameters`={self.max_parameters:,}; full-batch NUTS slows down "
                "quickly with size. Use a smaller network, freeze layers "
                "(requires_grad=False), or raise `max_parameters`"
            )
        # Posterior draws [chains, samples, P (+ D log noise stds)] and per-chain
        # sampler statistics; resized when fitted or loaded.
        self.register_buffer("samples", torch.empty(0, 0, 0))
        self.register_buffer("divergences", torch.empty(0, dtype=torch.long))
        self.register_buffer("acceptance_rate", torch.empty(0))
        self.register_buffer("adapted_step_size", torch.empty(0))

    @classmethod
    def report_settings(cls, task: str) -> dict[str, dict[str, Any]] | None:
        # About 7 s of CPU for the report's d->32->32->1 regression MLP (1.2k-1.4k
        # weights, a few hundred points): depth 5 caps each draw at 32 leapfrog steps.
        if task != "regression":
            return None  # the report's digits MLP (26k weights) is too large for NUTS
        return {"options": {"num_samples": 100, "warmup": 100, "max_tree_depth": 5},
                "fit": {}}

    # ------------------------------------------------------------------- the model

    @property
    def _samples_noise(self) -> bool:
        return self.task == "regression" and self.noise.kind == "homoscedastic"

    def _split_theta(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights [..., P] and log noise stds [..., D] (or None) of draws [..., P']."""
        p = self._flat.numel
        return theta[..., :p], (theta[..., p:] if self._samples_noise else None)

    def _outputs(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Network outputs [N, K] at one flat weight vector [P]."""
        return functional_call(self.model, self._flat.unflatten(weights), (x,))

    def _sample_outputs(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [S, N, K] for draws [S, P], batched with vmap where the model allows."""
        try:
            return vmap(self._outputs, in_dims=(0, None))(weights, x)
        except RuntimeError:
            # Some modules (data-dependent control flow, in-place ops on inputs) cannot
            # be vmapped; evaluate the draws one by one instead.
            return torch.stack([self._outputs(w, x) for w in weights])

    def _mean_and_variance(self, output: torch.Tensor,
                           log_std: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Regression mean and noise variance [..., N, D] from outputs [..., N, K]."""
        if log_std is None:
            return self.noise.split(output)
        variance = torch.exp(2 * log_std)[..., None, :].expand_as(output)
        return output, variance

    def _log_likelihood(self, theta: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
        """Σ_i log p(y_i | x_i, θ) for one draw θ [P'] (a scalar)."""
        weights, log_std = self._split_theta(theta)
        output = self._outputs(weights, x)
        if self.task == "classification":
            return -F.cross_entropy(output, y, reduction="sum")
        mean, variance = self._mean_and_variance(output, log_std)
        return -gaussian_nll(mean, variance, y) * y.shape[0]

    def _log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        weights, log_std = self._split_theta(theta)
        prior = gaussian_log_prior(weights, self.prior_std)
        if log_std is not None:
            prior = prior + gaussian_log_prior(log_std, self.noise_prior_std)
        return prior

    def _check_targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Check outputs and targets once; labels [N] int64 or targets [N, D]."""
        with torch.no_grad():
            output = self.model(x[:1])
        if self.task == "classification":
            if output.dim() != 2:
                raise InputError(
                    f"a classifier must output logits [N, C], got {list(output.shape)}")
            return check_labels(y, "y", output.shape[1])
        self.noise.check_output(output)
        return regression_targets(y, self.noise.num_outputs)

    def _current_theta(self) -> torch.Tensor:
        weights = self._flat.flatten(self.model)
        if self._samples_noise:
            weights = torch.cat([weights, self.noise.log_std.detach().to(weights)])
        return weights

    # -------------------------------------------------------------------- training

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log joint per datum at the current weights (a scalar).

        ``-mean_i log p(y_i | x_i, θ) - log p(θ) / n_data`` (``n_data`` defaults to the
        batch size); the noise std is the module's ``noise`` parameter.
        """
        y = self._check_targets(x, y)
        theta = torch.cat([p.reshape(-1) for n, p in self.model.named_parameters()
                           if p.requires_grad]
                          + ([self.noise.log_std.to(x.dtype)] if self._samples_noise else []))
        n = self.n_data or x.shape[0]
        return -(self._log_likelihood(theta, x, y) / x.shape[0] + self._log_prior(theta) / n)

    def fit(self, train: Any, *, progress: bool = True, seed: int | None = None,
            **unused: Any) -> HMCModel:
        """Draw the posterior samples with NUTS on the full training set.

        Args:
            train: a DataLoader yielding ``(x, y)``, or ``(X, y)`` tensors/arrays; all of
                it is gathered into one batch: X [N, ...], y [N] or [N, D].
            progress: show Pyro's progress bar while sampling.
            seed: makes the draws repeatable (overrides the constructor's ``seed``).
            **unused: options of gradient-based fits (``epochs``, ``lr``, ...), which
                HMC has no use for; passing any raises.

        Returns:
            ``self``, fitted.
        """
        if unused:
            raise InputError(f"HMC's fit takes no {', '.join(map(repr, unused))}; set the "
                             "sampler through bayesify(..., num_samples=, warmup=, ...)")
        x, y = self._gather(train)
        y = self._check_targets(x, y)
        self.n_data = int(x.shape[0])
        seed = self.seed if seed is None else int(seed)
        if self._samples_noise:
            self._initialize_noise([(x, y)])
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None), \
                _intra_op_threads(self.num_threads):
            if seed is not None:
                torch.manual_seed(seed)
            draws, stats = self._run_chains(x, y, progress)
        self.samples = draws
        self.divergences = torch.tensor([s[0] for s in stats], dtype=torch.long,
                                        device=draws.device)
        self.acceptance_rate = torch.tensor([s[1] for s in stats], device=draws.device)
        self.adapted_step_size = torch.tensor([s[2] for s in stats], device=draws.device)
        if self._samples_noise:
            with torch.no_grad():
                log_std = self._split_theta(draws)[1]
                self.noise.log_std.copy_(log_std.mean((0, 1)).to(self.noise.log_std))
        self._mark_fitted()
        return self

    def _gather(self, train: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=2**31 - 1, shuffle=False)
        pairs = list(batches)
        if not pairs or sum(int(xb.shape[0]) for xb, _ in pairs) == 0:
            raise InputError("`train` is empty; pass at least one training example")
        return torch.cat([xb for xb, _ in pairs]), torch.cat([yb for _, yb in pairs])

    def _run_chains(self, x: torch.Tensor, y: torch.Tensor,
                    progress: bool) -> tuple[torch.Tensor, list[tuple[int, float, float]]]:
        from pyro.infer.mcmc import MCMC, NUTS

        def potential(params: dict[str, torch.Tensor]) -> torch.Tensor:
            theta = params["theta"]
            return -(self._log_likelihood(theta, x, y) + self._log_prior(theta))

        start = self._current_theta()
        draws, stats = [], []
        for chain in range(self.num_chains):
            init = start
            if chain > 0:
                init = start + 0.1 * self.prior_std * torch.randn_like(start)
            kernel = NUTS(potential_fn=potential, step_size=self.step_size,
                          adapt_step_size=True, adapt_mass_matrix=True, full_mass=False,
                          max_tree_depth=self.max_tree_depth,
                          target_accept_prob=self.target_accept)
            info: dict[str, Any] = {}

            def record(kernel: NUTS, params: Any, stage: str, i: int,
                       info: dict[str, Any] = info) -> None:
                # The kernel resets its statistics after the run; keep the final ones.
                if stage.startswith("Sample") and i == self.num_samples - 1:
                    info.update(kernel.diagnostics(), step_size=float(kernel.step_size))

            mcmc = MCMC(kernel, num_samples=self.num_samples, warmup_steps=self.warmup,
                        initial_params={"theta": init}, disable_progbar=not progress,
                        hook_fn=record)
            mcmc.run()
            draws.append(mcmc.get_samples()["theta"].detach().to(start.dtype))
            stats.append((len(info["divergences"]), float(info["acceptance rate"]),
                          info["step_size"]))
        return torch.stack(draws), stats

    def diagnostics(self) -> dict[str, Any]:
        """Convergence diagnostics of the last ``fit``.

        Returns:
            A dict with ``"parameters"``: for each named parameter (and
            ``"log_noise_std"`` when the noise is sampled) a dict with ``r_hat`` and
            ``ess`` tensors of the parameter's shape and their summaries ``r_hat_max``,
            ``ess_min``, ``ess_mean``; the overall ``r_hat_max`` and ``ess_min``; and per
            chain ``divergences`` (count after warmup), ``acceptance_rate`` (Pyro's: the
            fraction of draws that moved) and adapted ``step_size`` lists. R-hat is the
            split-R-hat, so it is defined for a single chain too.
        """
        self._check_fitted("diagnostics")
        r_hat, ess = split_diagnostics(self.samples)
        names = list(self._flat.names) + ([_NOISE_NAME] if self._samples_noise else [])
        shapes = list(self._flat.shapes) + (
            [torch.Size([self.noise.num_outputs])] if self._samples_noise else [])
        sizes = [math.prod(s) for s in shapes]
        parameters = {}
        for name, shape, r, e in zip(names, shapes, r_hat.split(sizes), ess.split(sizes),
                                     strict=True):
            parameters[name] = {"r_hat": r.view(shape), "ess": e.view(shape),
                                "r_hat_max": float(r.max()), "ess_min": float(e.min()),
                                "ess_mean": float(e.mean())}
        return {"parameters": parameters, "r_hat_max": float(r_hat.max()),
                "ess_min": float(ess.min()), "divergences": self.divergences.tolist(),
                "acceptance_rate": self.acceptance_rate.tolist(),
                "step_size": self.adapted_step_size.tolist()}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # The buffers' sizes depend on the sampler settings of the run that saved them.
        for name in ("samples", "divergences", "acceptance_rate", "adapted_step_size"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name],
                                                     device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ prediction

    def _draws(self, num_samples: int | None) -> torch.Tensor:
        """Flat posterior draws [S, P'], thinned evenly to ``num_samples`` if given."""
        draws = self.samples.reshape(-1, self.samples.shape[-1])
        if num_samples is None or num_samples == draws.shape[0]:
            return draws
        if num_samples > draws.shape[0]:
            raise InputError(f"`num_samples` must be at most the {draws.shape[0]} stored "
                             f"posterior draws, got {num_samples}")
        idx = torch.linspace(0, draws.shape[0] - 1, num_samples, device=draws.device)
        return draws[idx.round().long()]

    def _predict_batch(self, x: torch.Tensor, num_samples: int | None,
                       generator: torch.Generator | None) -> Predictive:
        weights, log_std = self._split_theta(self._draws(num_samples))
        outputs = self._sample_outputs(weights, x)
        if self.task == "classification":
            return CategoricalPredictive.from_logits(sample_logits=outputs)
        mean, variance = self._mean_and_variance(outputs, log_std)
        return MixturePredictive(self._squeeze(mean), self._squeeze(variance))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-averaged prediction once fitted (log mean probabilities or the
        mixture mean); the network's own output before."""
        if not self.is_fitted:
            return self._point(self.model(x))
        weights, _ = self._split_theta(self._draws(None))
        outputs = self._sample_outputs(weights, x)
        if self.task == "classification":
            log_probs = torch.log_softmax(outputs, dim=-1)
            return torch.logsumexp(log_probs, 0) - math.log(outputs.shape[0])
        return self._point(outputs.mean(0))
