"""The ``"ensemble"`` method: M copies of a network, each wrapped with a base method.

``base="deterministic"`` gives a deep ensemble (Lakshminarayanan et al. 2017),
``"ivon"`` multi-IVON, ``"swag"`` MultiSWAG (Wilson & Izmailov 2020), ``"vbll"`` an
ensemble of VBLL heads; any registered method works. The posterior is the equally
weighted mixture of the members' posteriors: a
:class:`~bayesify.posterior.SampledPosterior` pooling every member's draws (a point
member contributes one draw, a Gaussian one is sampled), so the disagreement between
members lands in the epistemic terms (mutual information, variance of the means).

Re-initialization (``reinitialize=``). The wrapped network is never changed: each member
starts from a deep copy, re-initialized with the layers' own ``reset_parameters`` under
its own seed. ``"head"`` (the default) re-initializes the last layer that has
parameters and ``reset_parameters`` (or the base method's ``head=`` when given) and keeps
the rest: right for a pretrained backbone, which it never throws away. For a network that
is not trained yet pass ``"all"``: every layer is re-initialized, the independent
initializations of deep ensembles. ``None`` keeps the copies identical (members then
differ only through the base method's randomness, so it is refused for a deterministic
base).

Training (``training=``). When the base is fit by the standard gradient loop without
its own step, optimizer or batches (deterministic, and methods built on the default
hooks), the members are trained together: parameters stacked with
``torch.func.stack_module_state``, losses under ``vmap`` over ``functional_call``, one
AdamW step for all members (per-member gradient clipping and divergence guard;
BatchNorm running statistics are stacked too, so they update per member). All members
see the same batch order (from ``fit(seed=...)``), so the result equals training each
member with ``member.fit(train, seed=seed)`` one after another, which is what happens
when vmap cannot trace the network (data-dependent control flow, ``.item()``; said
once) or ``training="sequential"``. Bases with their own step, optimizer or batches
(ivon, swag, vbll, ...) and full-batch bases train one member after another, member m
with ``fit(seed=member_seeds(seed, M)[m])``: its own batch order and randomness, so
even identical copies (``reinitialize=None``) become distinct members.

LoRA models (``peft``). When the network has LoRA adapters, the members share its frozen
weights (every parameter with ``requires_grad=False``: the base model): each member is a
copy whose frozen parameters are the wrapped model's own tensors, so memory stays one
model plus M sets of adapters (and of any other trainable weights, such as peft's
``modules_to_save``). ``reinitialize="head"`` or ``"all"`` then re-draws each member's
adapters as peft initializes them (A Kaiming-uniform, B = 0, so every member starts at
the base model's function), never touching the shared base; ``None`` keeps the
wrapped adapters in every member. Batched training stacks only the members' own
weights.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

from bayesify._validation import check_choice, check_positive_int
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import BayesifyError, BayesifyWarning, InputError, UnsupportedModelError
from bayesify.fitting import (
    FitOptions,
    FitStrategy,
    GradientFit,
    NonFiniteStep,
    check_finite_loss,
)
from bayesify.inference._members import (
    check_base_options,
    member_seeds,
    reinitialize_adapters,
    resolve_base,
)
from bayesify.inference._members import reinitialize as reinitialize_network
from bayesify.inference._stacked import StackedMembers
from bayesify.inference.laplace import lora_modules
from bayesify.likelihoods import DEFAULT_LOGIT_SAMPLES, GaussianLikelihood
from bayesify.posterior import SampledPosterior

__all__ = ["EnsembleModel", "member_seeds"]

_GRADIENT = GradientFit()
_OWN_HOOKS = ("training_step", "configure_optimizer", "training_batches")
#: Floor on a member's noise variance before its log is taken (regression).
_TINY = 1e-30


def _pooled_split(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression draws [..., N, 2D] (means, then log noise variances) -> (mean, var)."""
    d = raw.shape[-1] // 2
    return raw[..., :d], raw[..., d:].exp()


class _EnsembleFit(FitStrategy):
    """Fits an ensemble: the members' strategy decides which options apply."""

    def __init__(self, inner: FitStrategy):
        self.inner = inner
        self.description = inner.description
        self.applies = inner.applies - {"optimizer"}

    def check_options(self, method: BayesianModel, options: FitOptions) -> None:
        if options.optimizer is not None:
            raise InputError("`optimizer` does not apply to an ensemble: every member makes "
                             "its own (or all share one batched step); pass lr= and "
                             "weight_decay= instead")
        self.inner.check_options(method.members[0], options)

    def run(self, method: BayesianModel, train: Any, options: FitOptions) -> None:
        method._run_fit(train, options)


@register_method("ensemble")
class EnsembleModel(BayesianModel):
    """An equally weighted mixture of M members, each the network wrapped by ``base``.

    Args:
        model: the network (pretrained or fresh); left untouched, each member wraps a
            re-initialized deep copy.
        task: ``"classification"`` or ``"regression"``.
        members: M, the number of members (>= 2).
        base: the method each member uses (a registered name or class).
        reinitialize: ``"head"`` (default: the last layer with ``reset_parameters``, or
            the base's ``head=``), ``"all"`` (every layer: for networks not trained yet),
            or ``None`` (identical copies); see the module docstring.
        training: ``"auto"`` (batched when possible, else one after another),
            ``"vmap"`` (batched or an error saying why not) or ``"sequential"``.
        seed: seeds each member's re-initialization and construction (member m uses
            ``member_seeds(seed, M)[m]``, also passed as the base's ``seed=`` where it
            has one), so the same seed gives the same members; pass another seed for
            another ensemble.
        n_data: N, passed to the members (inferred by ``fit``).
        **base_options: options of the base method, passed to every member.

    Attributes:
        members: the M wrapped members (an ``nn.ModuleList``).
        training_mode: how the last ``fit`` trained the members (``"vmap"`` or
            ``"sequential"``) and ``training_reason``: why not batched.

    Predict draws ⌈S / M⌉ posterior samples per member (S = ``num_samples``, the base's
    default by default, so prediction costs about what one member's does); point members
    give one draw each. Regression draws are [S, N, 2D]: each draw's means, then the log
    noise variance of the member it came from (members learn their own noise).
    """

    supported_tasks = ("classification", "regression")

    def __init__(self, model: nn.Module, task: str, *, members: int = 5,
                 base: Any = "deterministic", reinitialize: str | None = "head",
                 training: str = "auto", seed: int = 0,
                 n_data: int | None = None, **base_options: Any):
        if model is None:
            raise InputError("`model` is None; the ensemble method needs a network to copy")
        base_cls = resolve_base(base)
        count = check_positive_int(members, "members", minimum=2)
        check_choice(reinitialize, "reinitialize", ("head", "all", None))
        check_choice(training, "training", ("auto", "vmap", "sequential"))
        if reinitialize is None and base_cls.method_name == "deterministic":
            raise InputError("reinitialize=None with base='deterministic' would train M "
                             "identical members on the same batches; use 'head' or 'all'")
        check_base_options(base_cls, base_options)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"`seed` must be an int, got {seed!r}")
        super().__init__(None, task, n_data=n_data)
        params = inspect.signature(base_cls.__init__).parameters
        self.seed = seed
        self.base = base_cls.method_name
        self.reinitialize = reinitialize
        self.training_strategy = training
        self.training_mode: str | None = None
        self.training_reason: str | None = None
        self._stack: StackedMembers | None = None
        self._warned = False
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        self._rng_devices = devices
        lora = bool(lora_modules(model))
        #: Whether the members share the wrapped LoRA model's frozen base weights.
        self.shares_base = lora
        frozen = [p for p in model.parameters() if not p.requires_grad]
        built = []
        for member_seed in member_seeds(seed, count):
            options = dict(base_options)
            if "seed" in params and "seed" not in options:
                options["seed"] = member_seed % 2**31
            if "n_data" in params and n_data is not None:
                options["n_data"] = n_data
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(member_seed)
                if lora:
                    net = copy.deepcopy(model, {id(p): p for p in frozen})
                    if reinitialize is not None:
                        reinitialize_adapters(net)
                else:
                    net = copy.deepcopy(model)
                    reinitialize_network(net, reinitialize, base_options.get("head"))
                built.append(base_cls(net, task, **options))
        self.members = nn.ModuleList(built)
        self.output, self.label_key = self.output, self.label_key  # reach the members
        if task == "regression":
            for member in built:
                if not isinstance(member.likelihood, GaussianLikelihood):
                    raise UnsupportedModelError(
                        f"base {self.base!r} has no Gaussian likelihood for regression, so "
                        "its members' predictions cannot be pooled")
            self.likelihood = GaussianLikelihood(_pooled_split)

    # ------------------------------------------------- structured inputs and outputs

    # The members run the network, so ``bayesify(..., output=, label_key=)`` (which sets
    # these on the ensemble after construction) is passed on to every member.

    @property
    def output(self) -> Any:
        """The ``output=`` callable of the ensemble and every member (see
        :mod:`bayesify._network`)."""
        return self.__dict__.get("_output")

    @output.setter
    def output(self, value: Any) -> None:
        self.__dict__["_output"] = value
        for member in self.__dict__.get("_modules", {}).get("members", ()):
            member.output = value

    @property
    def label_key(self) -> str | None:
        """The key of mapping batches holding the labels, shared with the members."""
        return self.__dict__.get("_label_key")

    @label_key.setter
    def label_key(self, value: str | None) -> None:
        self.__dict__["_label_key"] = value
        for member in self.__dict__.get("_modules", {}).get("members", ()):
            member.label_key = value

    # ---------------------------------------------------------------- the contract

    @property
    def default_num_samples(self) -> int:  # type: ignore[override]
        """S: the base's default number of draws (100 for a Gaussian/point base)."""
        return self.members[0].default_num_samples or DEFAULT_LOGIT_SAMPLES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's point prediction: log of the mean member softmax (valid logits,
        [N, C]) or the mean of the members' means ([N] or [N, D])."""
        outputs = torch.stack([member(x) for member in self.members])
        if self.task == "classification":
            return torch.logsumexp(outputs.log_softmax(-1), 0) - math.log(len(self.members))
        return outputs.mean(0)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of the members' losses (each member gets its own loss's gradient)."""
        return torch.stack([member.loss(x, y) for member in self.members]).sum()

    def _member_draws(self, member: BayesianModel, x: torch.Tensor, per: int,
                      generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = member._posterior(x, per, generator)
        if isinstance(posterior, SampledPosterior):
            draws = posterior.samples
        elif posterior.is_deterministic:
            draws = posterior.mean.unsqueeze(0)
        else:
            draws = posterior.sample(per, generator)
        if self.task == "regression":
            mean, variance = member.likelihood.split(draws)
            draws = torch.cat([mean, variance.clamp_min(_TINY).log()], -1)
        return draws, posterior.scores

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """The members' draws pooled, [S', N, K]; draw s·M + m is member m's s-th, so
        any prefix of M·k draws holds k of every member."""
        count = len(self.members)
        per = -(-(num_samples or count) // count)
        results = [self._member_draws(member, x, per, generator) for member in self.members]
        kept = min(draws.shape[0] for draws, _ in results)
        pooled = torch.stack([draws[:kept] for draws, _ in results], 1)
        samples = pooled.reshape(kept * count, *pooled.shape[2:])
        # Method scores (a VBLL head's feature density) are averaged over the members.
        keys = set.intersection(*(set(scores) for _, scores in results))
        scores = {k: torch.stack([s[k] for _, s in results]).mean(0) for k in sorted(keys)}
        return SampledPosterior(samples, scores)

    # -------------------------------------------------------------------- training

    def fit_strategy(self) -> FitStrategy:
        return _EnsembleFit(self.members[0].fit_strategy())

    def fit_defaults(self) -> dict[str, Any]:
        return self.members[0].fit_defaults()

    def _batched_plan(self, forced: bool = True) -> str | None:
        """Why the members cannot train together (``None``: they can, if vmap traces)."""
        member = self.members[0]
        if forced and self.training_strategy == "sequential":
            return "training='sequential' was asked for"
        if not isinstance(member.fit_strategy(), GradientFit):
            return f"the {self.base!r} base is not fit by the gradient loop"
        for hook in _OWN_HOOKS:
            if getattr(type(member), hook) is not getattr(BayesianModel, hook):
                return f"the {self.base!r} base trains through its own {hook}"
        return None

    def _vmap_trial(self, train: Any, batch_size: int) -> str | None:
        """Run the batched loss and its gradient on the first batch; the error, if any
        (errors about the data itself propagate, naming the batch as fit would)."""
        batches = self.training_batches(train, batch_size=batch_size, generator=None,
                                        shuffle=False)
        first = next(iter(batches), None)
        if first is None:
            raise InputError("`train` yielded no batches; pass at least one example")
        x, y = first[:2]
        try:
            with torch.random.fork_rng(devices=self._rng_devices), \
                    preserve_training_flags(self):
                self.train()
                stack = StackedMembers(self.members)
                stack.losses(x, y).sum().backward()
        except BayesifyError:
            raise
        except (RuntimeError, NotImplementedError) as exc:
            return f"vmap cannot trace the network ({str(exc).splitlines()[0][:160]})"
        return None

    def _run_fit(self, train: Any, options: FitOptions) -> None:
        reason, warn = self._batched_plan(), False
        # Members share the batch order exactly when their base could train batched.
        shared_order = self._batched_plan(forced=False) is None
        if reason is None:
            batch_size = options.batch_size or self.fit_defaults()["batch_size"]
            reason = self._vmap_trial(train, batch_size)
            warn = reason is not None
        batched = reason is None
        if not batched and self.training_strategy == "vmap":
            raise UnsupportedModelError(f"training='vmap' is not possible: {reason}; use "
                                        "training='auto' or 'sequential'")
        if warn and not self._warned:
            self._warned = True
            warnings.warn(f"ensemble: training the {len(self.members)} members one after "
                          f"another, because {reason}", BayesifyWarning, stacklevel=4)
        self.training_mode = "vmap" if batched else "sequential"
        self.training_reason = reason
        if batched:
            try:
                _GRADIENT.run(self, train, options)
            finally:
                if self._stack is not None:      # a failed fit keeps its last steps
                    self._stack.write_back()
                    self._stack = None
            return
        given = options.given()
        given.pop("seed", None)
        seeds = [options.seed] * len(self.members)
        if options.seed is not None and not shared_order:
            seeds = [s % 2**31 for s in member_seeds(options.seed, len(self.members))]
        for member, seed in zip(self.members, seeds, strict=True):
            member.fit(train, seed=seed, **given)
        self.n_data = self.members[0].n_data
        histories = [member.history for member in self.members]
        if histories[0] and all(len(h) == len(histories[0]) for h in histories):
            self.history = [sum(v) / len(v) for v in zip(*histories, strict=True)]

    # Hooks of the batched gradient loop (used only when the members train together).

    def on_fit_start(self, batches: Any) -> None:
        generator = getattr(batches, "generator", None)
        cpu_state = torch.get_rng_state()
        gen_state = generator.get_state() if generator is not None else None
        for member in self.members:
            # Each member starts as its own fit would: the same random state, the plan.
            torch.set_rng_state(cpu_state)
            if generator is not None:
                generator.set_state(gen_state)
            if member.n_data is None:
                member.n_data = self.n_data
            member.fit_plan = self.fit_plan
            member._grad_clip = self._grad_clip
            member.on_fit_start(batches)
        self._stack = StackedMembers(self.members)

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """In a batched fit, AdamW over the stacked parameters: elementwise, so each
        member's slice takes exactly the steps of the AdamW its own ``fit`` would make.
        Otherwise (your own loop over ``loss``) AdamW over all members' parameters."""
        if self._stack is None:
            return super().configure_optimizer(lr, weight_decay)
        if not self._stack.trainable():
            raise InputError("the ensemble's members have no trainable parameters to fit")
        return self._stack.adamw(lr, weight_decay)

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One batched step of all members; returns their mean loss."""
        optimizer.zero_grad(set_to_none=True)
        losses = self._stack.losses(x, y)
        try:
            check_finite_loss(losses.sum())
            losses.sum().backward()
            self._stack.clip_gradients(self._grad_clip)
        except NonFiniteStep:
            self._stack.write_back()    # the members hold the last finite step's weights
            raise
        optimizer.step()
        return losses.detach().mean()

    def on_fit_end(self) -> None:
        if self._stack is not None:
            self._stack.write_back()
            self._stack = None
            for member in self.members:
                member.eval()
                member.on_fit_end()
                member._mark_fitted()
            return
        for member in self.members:              # after the user's own loop
            member.finish_fit()

    # ----------------------------------------------------------------- checkpoints

    @staticmethod
    def _member_state(state_dict: dict[str, Any], index: int) -> dict[str, Any]:
        prefix = f"members.{index}."
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def _modules_for_state(self, state_dict: dict[str, Any]) -> dict[str, nn.Module]:
        built = [member._modules_for_state(self._member_state(state_dict, i))
                 for i, member in enumerate(self.members)]
        if not any(built):
            return {}
        members = nn.ModuleList()
        for member, modules in zip(self.members, built, strict=True):
            clone = copy.deepcopy(member)
            for name, module in modules.items():
                setattr(clone, name, module)
            members.append(clone)
        return {"members": members}

    def _check_extra_state(self, state_dict: dict[str, Any]) -> None:
        for i, member in enumerate(self.members):
            member._check_extra_state(self._member_state(state_dict, i))

    def extra_repr(self) -> str:
        return (f"members={len(self.members)}, base={self.base!r}, "
                f"reinitialize={self.reinitialize!r}, {super().extra_repr()}")
