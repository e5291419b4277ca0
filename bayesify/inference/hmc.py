"""``"hmc"``: full-batch NUTS over every weight of a small network (Pyro's ``NUTS``).

The posterior over all trainable weights θ (and, for learned regression noise, the log
noise standard deviations) is sampled with the No-U-Turn sampler on the potential

    U(θ) = -Σ_i log p(y_i | x_i, θ) - log p(θ),     p(θ) = N(0, prior_std² I),

evaluated on the whole training set at every leapfrog step, so HMC is exact (up to
Monte Carlo error) but its cost grows with N times the number of weights: it refuses
networks above ``max_parameters`` (5,000 by default). It is the gold-standard
reference the approximate methods are checked against on small problems. ``fit``
uses the :data:`~bayesify.fitting.MCMC` strategy: it gathers the training set and runs
the chains (only ``seed`` and ``progress`` apply).

Regression noise (``noise=``):

* ``"homoscedastic"`` (default): one noise std σ_d per output, sampled jointly with
  the weights as log σ_d ~ N(0, noise_prior_std²). Each draw keeps its own σ: the raw
  outputs of the posterior are [S, N, 2D], the means then the draw's log σ.
* a positive float: a fixed, known noise std;
* ``"heteroscedastic"``: the network outputs means then raw scales (2·D columns).

The network is evaluated functionally (``torch.func.functional_call``, through
:meth:`~bayesify.core.BayesianModel.call_network`, so inputs may be mappings or tuples
and outputs ``ModelOutput``s) on a flat weight vector, so the user's module keeps its
weights; the posterior evaluates all
draws in one batched call with ``torch.func.vmap``.

BatchNorm: the network always runs in eval mode, in sampling and in prediction, with
the running statistics it has when ``fit`` is called (train the network first: a
fresh BatchNorm's statistics are 0 and 1). Its affine weights are sampled like any
other weight; the statistics are not.

Last layer (``subset="last_layer"``, or a network whose only trainable weights are
its final ``nn.Linear``, the backbone frozen with ``requires_grad=False``): only the
head's weights are sampled, the backbone keeps its weights. The backbone's output (the
head's input φ, captured by a forward hook) is then computed once for the training set
and the potential runs the head alone, at every leapfrog step; prediction runs the
backbone once per batch and the head once per draw. The cache applies when the
network's output is its head's output unchanged (checked on the data;
``cache_features=False`` turns it off).

Convergence: after fitting and when predicting, a :class:`ConvergenceWarning` names
the failed check and the fix: the median split-R-hat of the outputs at (up to 256 of)
the training inputs above 1.1, their median ESS below 10, a stuck chain, or more than
5% divergent transitions. The checks read outputs (log probabilities for
classification) because the weights of a network are not identifiable: chains in
mirror-image modes have a large per-weight R-hat while every prediction agrees.
``diagnostics()`` reports the weights, the outputs and the log density.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from bayesify._batching import num_rows, take_rows
from bayesify._progress import progress_enabled
from bayesify._validation import (
    check_choice,
    check_fraction,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.checkpoint import mark_dynamic
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError, NotFittedError
from bayesify.fitting import MCMC, FitStrategy
from bayesify.inference._heads import find_head, run_to_head
from bayesify.inference._sampled import sampled_posterior, user_stacklevel
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.inference.hmc_chains import (
    ConvergenceWarning,
    FlatParameters,
    gaussian_log_prior,
    intra_op_threads,
    problems_message,
    run_nuts,
    split_diagnostics,
    summarize_draws,
)
from bayesify.inference.hmc_chains import convergence_problems as _check_convergence
from bayesify.likelihoods import GaussianLikelihood, gaussian_nll, regression_targets
from bayesify.posterior import SampledPosterior

__all__ = ["ConvergenceWarning", "HMCModel", "gaussian_log_prior", "split_diagnostics"]

_NOISE_NAME = "log_noise_std"
# Buffers whose shape is set by fit (the sampler settings of the run).
_FIT_BUFFERS = ("samples", "log_density", "function_r_hat", "function_ess", "divergences",
                "acceptance_rate", "adapted_step_size")
# Training inputs at which the convergence of the outputs is checked.
_CHECK_POINTS = 256
_SUBSETS = ("all", "last_layer")


def _only_trainable_linear(model: nn.Module, names: list[str]) -> str | None:
    """The name of the ``nn.Linear`` holding all of ``names`` (the trainable weights), if
    one does: its input can then be cached."""
    owners = {name.rpartition(".")[0] for name in names}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    if not owner:
        return None
    return owner if isinstance(model.get_submodule(owner), nn.Linear) else None


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
        noise_param: how heteroscedastic outputs give the variance (see
            :class:`~bayesify.likelihoods.GaussianNoise`).
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
        subset: ``"all"`` trainable weights, or only the ``"last_layer"`` (the ``head``).
        head: the name of the final ``nn.Linear`` for ``subset="last_layer"`` (default:
            the last Linear).
        cache_features: with last-layer sampling, compute the frozen backbone's
            features once and run only the head per leapfrog step and per draw.
        n_data: set to the training-set size by ``fit`` (the full set is always used).

    ``loss(x, y)`` is the negative log joint per datum at the model's current weights
    (mean NLL plus the negative log prior over ``n_data``), whose minimizer is the MAP
    estimate: train with it in your own loop to start the chains there. ``fit`` does
    not use it, and ``finish_fit`` does not apply (the posterior is the draws of
    ``fit``). ``diagnostics()`` reports split-R-hat and ESS.
    """

    default_num_samples = None

    def __init__(self, model: nn.Module, task: str, *, num_samples: int = 200,
                 warmup: int = 200, num_chains: int = 1, prior_std: float = 1.0,
                 noise: Any = "homoscedastic", noise_prior_std: float = 2.0,
                 step_size: float = 0.05, max_tree_depth: int = 10,
                 target_accept: float = 0.8, max_parameters: int = 5000,
                 seed: int | None = None, num_threads: int | None = 1,
                 num_outputs: int | None = None, noise_param: str | None = None,
                 subset: str = "all", head: str | None = None, cache_features: bool = True,
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
        # beta-NLL is a training weight, not a likelihood to sample under: no `beta`.
        self._init_likelihood(noise, num_outputs, noise_param=noise_param)
        if self._samples_noise:
            self.likelihood = GaussianLikelihood(self._split_sampled_noise)
        self.subset = check_choice(subset, "subset", _SUBSETS)
        self.cache_features = bool(cache_features)
        #: The sampled head's name when only the last layer is sampled, else None.
        self.head_name: str | None = None
        if self.subset == "last_layer":
            self.head_name, _ = find_head(model, head)
            self._flat = FlatParameters(model, prefix=self.head_name)
        else:
            self._flat = FlatParameters(model)
            self.head_name = _only_trainable_linear(model, self._flat.names)
        if self._flat.numel == 0:
            raise InputError("`model` has no trainable parameters for HMC to sample")
        if self._flat.numel > self.max_parameters:
            raise InputError(
                f"`model` has {self._flat.numel:,} trainable parameters, more than "
                f"`max_parameters`={self.max_parameters:,}; full-batch "
                "NUTS slows down quickly with size. Use a smaller network, freeze layers "
                "(requires_grad=False), or raise `max_parameters`"
            )
        floats = {"dtype": self.dtype, "device": self.device}
        #: Posterior draws [C chains, S, P (+ D log noise stds)].
        self.register_buffer("samples", torch.empty(0, 0, 0, **floats))
        #: log p(θ, data) of every draw, [C, S].
        self.register_buffer("log_density", torch.empty(0, 0, **floats))
        #: Split-R-hat and ESS of the outputs at up to 256 training inputs, [M] each.
        self.register_buffer("function_r_hat", torch.empty(0, **floats))
        self.register_buffer("function_ess", torch.empty(0, **floats))
        #: Per chain: divergent transitions after warmup, acceptance rate, step size.
        self.register_buffer("divergences", torch.empty(0, dtype=torch.long,
                                                        device=self.device))
        self.register_buffer("acceptance_rate", torch.empty(0, **floats))
        self.register_buffer("adapted_step_size", torch.empty(0, **floats))
        mark_dynamic(self, *_FIT_BUFFERS)

    # ------------------------------------------------------------------- the model

    @property
    def _samples_noise(self) -> bool:
        return self.task == "regression" and self.noise.kind == "homoscedastic"

    def _split_theta(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights [..., P] and log noise stds [..., D] (or None) of draws [..., P']."""
        p = self._flat.numel
        return theta[..., :p], (theta[..., p:] if self._samples_noise else None)

    def _split_sampled_noise(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and noise variance [..., N, D] from raw outputs [..., N, 2D] (means,
        then the draw's log noise stds)."""
        d = self.noise.num_outputs
        return raw[..., :d], torch.exp(2 * raw[..., d:])

    def _outputs(self, weights: torch.Tensor, x: Any,
                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Network outputs [N, K] at one flat weight vector [P] (the caller sets eval);
        given the head's cached input ``features``, the head's alone."""
        params = self._flat.unflatten(weights)
        if features is None:
            return self.call_network(x, params=params)
        skip = len(self.head_name) + 1
        head = self.model.get_submodule(self.head_name)
        return functional_call(head, {n[skip:]: t for n, t in params.items()}, (features,))

    def _head_features(self, x: Any) -> torch.Tensor | None:
        """The head's input φ at x (one backbone pass, eval mode, no autograd through
        the frozen backbone), or None when the cache does not apply: full-network
        sampling, ``cache_features=False``, or an output other than the head's."""
        if self.head_name is None or not self.cache_features:
            return None
        with torch.no_grad():
            run = run_to_head(self.model, self.head_name, x, frozen=True, output=self.output)
        return run.features.detach() if run.output_is_head_output else None

    def _sample_outputs(self, weights: torch.Tensor, x: Any) -> torch.Tensor:
        """Outputs [S, N, K] for draws [S, P] in eval mode, batched with vmap where the
        model allows (the backbone once and the head per draw when features are
        cached)."""
        features = self._head_features(x)
        if features is not None:
            return vmap(self._outputs, in_dims=(0, None, None))(weights, None, features)
        with preserve_training_flags(self.model):
            self.model.eval()
            try:
                return vmap(self._outputs, in_dims=(0, None))(weights, x)
            except RuntimeError:
                # Some modules (data-dependent control flow, in-place ops on inputs)
                # cannot be vmapped; evaluate the draws one by one instead.
                return torch.stack([self._outputs(w, x) for w in weights])

    def _log_likelihood(self, output: torch.Tensor, log_std: torch.Tensor | None,
                        y: torch.Tensor) -> torch.Tensor:
        """Σ_i log p(y_i | output_i) for outputs [N, K] and checked targets (a scalar)."""
        if self.task == "classification":
            return -F.cross_entropy(output, y, reduction="sum")
        if log_std is None:
            mean, variance = self.noise.split(output)
        else:
            mean, variance = output, torch.exp(2 * log_std).expand_as(output)
        return -gaussian_nll(mean, variance, y) * y.shape[0]

    def _log_prior(self, weights: torch.Tensor, log_std: torch.Tensor | None) -> torch.Tensor:
        prior = gaussian_log_prior(weights, self.prior_std)
        if log_std is not None:
            prior = prior + gaussian_log_prior(log_std, self.noise_prior_std)
        return prior

    def _log_joint(self, theta: torch.Tensor, x: Any, y: torch.Tensor,
                   features: torch.Tensor | None = None) -> torch.Tensor:
        """log p(θ, y | x) of one draw θ [P'] on the whole of x, y (a scalar); given
        the head's cached input ``features``, only the head runs."""
        weights, log_std = self._split_theta(theta)
        return (self._log_likelihood(self._outputs(weights, x, features), log_std, y)
                + self._log_prior(weights, log_std))

    def _check_targets(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Labels [N] int64, or targets [N, D], checked against outputs [N, K]."""
        if self.task == "classification":
            if output.dim() != 2:
                raise InputError(
                    f"a classifier must output logits [N, C], got {list(output.shape)}")
            return check_labels(y, "y", output.shape[1])
        self.noise.check_output(output)
        return regression_targets(y, self.noise.num_outputs)

    # -------------------------------------------------------------------- training

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log joint per datum at the current weights (a scalar).

        ``-mean_i log p(y_i | x_i, θ) - log p(θ) / n_data`` for x [B, ...], y [B] or
        [B, D] (``n_data`` defaults to the batch size); the noise std is the module's
        ``noise`` parameter. The network runs in its current mode.
        """
        output = self.call_network(x)
        y = self._check_targets(output, y)
        params = dict(self.model.named_parameters())
        weights = torch.cat([params[n].reshape(-1) for n in self._flat.names])
        log_std = self.noise.log_std.to(output.dtype) if self._samples_noise else None
        rows = num_rows(x)
        n = self.n_data or rows
        return -(self._log_likelihood(output, log_std, y) / rows
                 + self._log_prior(weights, log_std) / n)

    def fit_strategy(self) -> FitStrategy:
        """MCMC on the whole training set: ``fit`` takes only ``seed`` and ``progress``."""
        return MCMC

    def on_fit_end(self) -> None:
        raise InputError("HMC's posterior is the draws of .fit(train), so .finish_fit() "
                         "does not apply; a loop of your own over .loss(x, y) finds the "
                         "MAP weights, from which .fit(train) then starts its chains")

    def fit_full_batch(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                       progress: bool | None) -> None:
        """Draw the posterior samples with NUTS on all of x [N, ...], y [N] or [N, D].

        Args:
            seed: makes the draws repeatable (overrides the constructor's ``seed``).
            progress: show Pyro's progress bar (``None``: unless bars are off globally).
        """
        seed = self.seed if seed is None else int(seed)
        with preserve_training_flags(self.model):
            self.model.eval()  # BatchNorm with the network's own statistics
            with torch.no_grad():
                y = self._check_targets(self.call_network(x), y)
            self.n_data = num_rows(x)
            if self._samples_noise:
                self._initialize_noise([(x, y)])
            features = self._head_features(x)  # the frozen backbone runs once
            start = self._flat.flatten(self.model)
            if self._samples_noise:
                start = torch.cat([start, self.noise.log_std.detach().to(start)])
            devices = [y.device] if y.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=seed is not None), \
                    intra_op_threads(self.num_threads):
                if seed is not None:
                    torch.manual_seed(seed)
                draws, stats = run_nuts(
                    lambda theta: -self._log_joint(theta, x, y, features), start,
                    num_chains=self.num_chains, num_samples=self.num_samples,
                    warmup=self.warmup, step_size=self.step_size,
                    max_tree_depth=self.max_tree_depth, target_accept=self.target_accept,
                    init_scale=0.1 * self.prior_std, progress=progress_enabled(progress))
            with torch.no_grad():
                flat = draws.reshape(-1, draws.shape[-1])
                log_density = torch.stack([self._log_joint(t, x, y, features) for t in flat])
                r_hat, ess = self._function_diagnostics(draws, x)
        floats = {"dtype": draws.dtype, "device": draws.device}
        self.samples = draws
        self.log_density = log_density.reshape(draws.shape[:2]).to(**floats)
        self.function_r_hat, self.function_ess = r_hat.to(**floats), ess.to(**floats)
        divergences, acceptance, step_size = zip(*stats, strict=True)
        self.divergences = torch.tensor(divergences, dtype=torch.long, device=draws.device)
        self.acceptance_rate = torch.tensor(acceptance, **floats)
        self.adapted_step_size = torch.tensor(step_size, **floats)
        if self._samples_noise:
            with torch.no_grad():
                log_std = self._split_theta(draws)[1]
                self.noise.log_std.copy_(log_std.mean((0, 1)).to(self.noise.log_std))
        self._warn_if_unconverged("after fitting")

    # ----------------------------------------------------------------- diagnostics

    def _function_diagnostics(self, draws: torch.Tensor,
                              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-R-hat and ESS [M] of the outputs of draws [C, S, P'] at up to 256 of
        the training inputs x [N, ...] (log probabilities for classification)."""
        chains, count = draws.shape[:2]
        n = num_rows(x)
        idx = torch.linspace(0, n - 1, min(_CHECK_POINTS, n),
                             device=draws.device).round().long().unique()
        weights, _ = self._split_theta(draws.reshape(chains * count, -1))
        outputs = self._sample_outputs(weights, take_rows(x, idx))
        if self.task == "classification":
            outputs = torch.log_softmax(outputs, -1)
        return split_diagnostics(outputs.reshape(chains, count, -1))

    def convergence_problems(self) -> list[str]:
        """The failed convergence checks of the draws, in words (empty if none).

        Checks the outputs at the training inputs (median split-R-hat ≤ 1.1, median
        ESS ≥ 10), that no chain is stuck, and that at most 5% of the transitions
        diverged.
        """
        return _check_convergence(self.function_r_hat, self.function_ess, self.log_density,
                                  self.divergences)

    def _warn_if_unconverged(self, when: str) -> None:
        problems = self.convergence_problems()
        if problems:
            warnings.warn(problems_message(problems, when), ConvergenceWarning,
                          stacklevel=user_stacklevel())

    def diagnostics(self) -> dict[str, Any]:
        """Convergence diagnostics of the last ``fit``.

        Returns:
            A dict with ``"parameters"``: for each named parameter (and
            ``"log_noise_std"`` when the noise is sampled) a dict with ``r_hat`` and
            ``ess`` tensors of the parameter's shape and their summaries ``r_hat_max``,
            ``ess_min``, ``ess_mean``; the overall ``r_hat_max`` and ``ess_min`` over
            the weights; ``"outputs"``: the median and worst split-R-hat and ESS of
            the outputs at the training inputs (identifiable, unlike the weights of a
            network); ``"log_density"``: ``r_hat`` and ``ess`` of the log-density
            trace; ``"problems"``: the failed checks (see
            :meth:`convergence_problems`); and per chain
            ``divergences`` (count after warmup), ``acceptance_rate`` (Pyro's: the
            fraction of draws that moved) and adapted ``step_size`` lists. R-hat is the
            split-R-hat, so it is defined for a single chain too.
        """
        self._check_fitted("diagnostics")
        names = list(self._flat.names) + ([_NOISE_NAME] if self._samples_noise else [])
        shapes = list(self._flat.shapes) + (
            [torch.Size([self.noise.num_outputs])] if self._samples_noise else [])
        report = summarize_draws(self.samples, names, shapes, self.log_density,
                                 self.function_r_hat, self.function_ess)
        return {**report, "problems": self.convergence_problems(),
                "divergences": self.divergences.tolist(),
                "acceptance_rate": self.acceptance_rate.tolist(),
                "step_size": self.adapted_step_size.tolist()}

    # ------------------------------------------------------------------ prediction

    def _draws(self, num_samples: int | None) -> torch.Tensor:
        """Flat posterior draws [S, P'], thinned evenly to ``num_samples`` if given."""
        if self.samples.numel() == 0:
            raise NotFittedError("this HMCModel holds no posterior draws; call .fit(train)")
        draws = self.samples.reshape(-1, self.samples.shape[-1])
        if num_samples is None or num_samples == draws.shape[0]:
            return draws
        if num_samples > draws.shape[0]:
            raise InputError(f"`num_samples` must be at most the {draws.shape[0]} stored "
                             f"posterior draws, got {num_samples}")
        idx = torch.linspace(0, draws.shape[0] - 1, num_samples, device=draws.device)
        return draws[idx.round().long()]

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """Raw outputs [S, N, K] of the stored draws at x [N, ...] (K = 2D with sampled
        noise: the means, then each draw's log noise stds)."""
        self._warn_if_unconverged("predicting")
        weights, log_std = self._split_theta(self._draws(num_samples))
        posterior = sampled_posterior(self, self._sample_outputs(weights, x))
        if log_std is None:
            return posterior
        outputs = posterior.samples
        return SampledPosterior(torch.cat([outputs, log_std[:, None, :].expand_as(outputs)
                                           .to(outputs.dtype)], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-averaged prediction once fitted (log mean probabilities [N, C] or
        the mixture mean [N] / [N, D]); the network's own output before."""
        if not self.is_fitted:
            return self._point(self.call_network(x))
        weights, _ = self._split_theta(self._draws(None))
        outputs = self._sample_outputs(weights, x)
        if self.task == "classification":
            log_probs = torch.log_softmax(outputs, dim=-1)
            return torch.logsumexp(log_probs, 0) - math.log(outputs.shape[0])
        return self._point(outputs.mean(0))
