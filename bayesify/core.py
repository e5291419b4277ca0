"""`bayesify()`, the :class:`BayesianModel` base class and the method registry.

A method is one subclass of :class:`BayesianModel` in ``bayesify/inference/``,
registered under its name with :func:`register_method`. The base class owns everything
methods share: turning user data into batches on the model's device and dtype, the fit
strategies (:mod:`bayesify.fitting`), batched prediction through the likelihood, the
fitted flag and checkpoints (:mod:`bayesify.checkpoint`). A method supplies:

* ``forward(x)``: the point prediction (logits [N, C] or mean [N] / [N, D]), so the
  wrapped model still drops into old code;
* ``loss(x, y)``: its training objective for one batch (a scalar);
* ``_posterior(x, num_samples, generator)``: a :class:`~bayesify.posterior.Posterior`
  over the latent outputs at inputs x [N, ...], differentiable in x;
* ``self.likelihood``: a :mod:`~bayesify.likelihoods` object mapping that posterior to a
  Predictive (categorical for classification by default);

and may name another fit strategy (``fit_strategy``) or override the gradient loop's
hooks (``training_batches``, ``on_fit_start``, ``configure_optimizer``,
``training_loss``, ``training_step``, ``on_fit_end``). ``predict``, ``fit``, ``save``
and ``load`` are never overridden.
"""

from __future__ import annotations

import abc
import copy
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from bayesify._batching import iter_inputs, to_inputs
from bayesify._fitting_mixin import FittingMixin
from bayesify._network import OutputFn, call_network
from bayesify._runtime import (
    check_outputs,
    make_generator,
    preserve_training_flags,
    with_offsets,
)
from bayesify._validation import check_choice, check_positive_int, inputs_in_user_terms
from bayesify.checkpoint import load_checkpoint, save_checkpoint
from bayesify.errors import InputError, NotFittedError
from bayesify.fitting import FitPlan
from bayesify.likelihoods import CategoricalLikelihood, Likelihood
from bayesify.posterior import Posterior, reshape_points
from bayesify.predictive import Predictive

__all__ = [
    "TASKS",
    "BayesianModel",
    "available_methods",
    "bayesify",
    "get_method",
    "preserve_training_flags",
    "register_method",
]

TASKS = ("classification", "regression")

# Built-in methods are imported on first use, so `import bayesify` stays light and a
# method's heavy dependencies (Pyro, GPyTorch) load only when that method is asked for.
_BUILTIN_MODULES: dict[str, str] = {
    "deterministic": "bayesify.inference.deterministic",
    "mc_dropout": "bayesify.inference.mc_dropout",
    "vbll": "bayesify.inference.vbll",
    "ivon": "bayesify.inference.ivon",
    "ssvi": "bayesify.inference.ssvi",
    "vi": "bayesify.inference.vi",
    "hmc": "bayesify.inference.hmc",
    "gp": "bayesify.inference.gp",
    "laplace": "bayesify.inference.laplace",
    "ensemble": "bayesify.inference.ensemble",
    "swag": "bayesify.inference.swag",
    "tfb": "bayesify.inference.tfb",
    "bayescap": "bayesify.inference.bayescap",
}
_REGISTRY: dict[str, type[BayesianModel]] = {}


def register_method(name: str) -> Callable[[type[BayesianModel]], type[BayesianModel]]:
    """Class decorator registering a BayesianModel subclass under ``name``."""

    def decorate(cls: type[BayesianModel]) -> type[BayesianModel]:
        if not (isinstance(cls, type) and issubclass(cls, BayesianModel)):
            raise InputError(f"`{name}` must decorate a BayesianModel subclass")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_method(name: str) -> type[BayesianModel]:
    """The BayesianModel class registered as ``name`` (importing built-ins on demand)."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
        raise InputError(f"`method` must be one of {', '.join(map(repr, known))}, got {name!r}")
    return _REGISTRY[name]


def available_methods(task: str | None = None) -> list[str]:
    """Names of the methods that can be used here (for ``task``, when given)."""
    names = []
    for name in dict.fromkeys([*_BUILTIN_MODULES, *_REGISTRY]):
        try:
            cls = get_method(name)
        except ModuleNotFoundError as exc:
            # A built-in whose module is not part of this install; any other missing
            # import is a real error and propagates.
            if exc.name != _BUILTIN_MODULES.get(name):
                raise
            continue
        if task is None or task in cls.supported_tasks:
            names.append(name)
    return names


class BayesianModel(FittingMixin, nn.Module, metaclass=abc.ABCMeta):
    """Base class of every method: a wrapped network with a posterior and a predictive.

    Args:
        model: the user's network (kept, not copied; see ``bayesify(copy_model=True)``).
        task: ``"classification"`` or ``"regression"``.
        n_data: N, the training-set size that weights the prior (VBLL's 1/N
            regularizer, IVON's ess, the KL weight of VI). Inferred from the training
            set on ``fit`` when ``None``.
    """

    method_name: ClassVar[str] = ""
    supported_tasks: ClassVar[tuple[str, ...]] = TASKS
    #: The number of posterior samples ``predict`` draws by default; ``None`` for
    #: methods whose predictive is closed form.
    default_num_samples: ClassVar[int | None] = None
    #: Whether a freshly wrapped model can predict before ``fit`` (its weights are the
    #: posterior already, as for a pretrained deterministic classifier).
    fitted_at_init: ClassVar[bool] = False
    #: Whether ``_posterior`` takes ``blocks=(b, q)`` and then returns a posterior over
    #: blocks (mean [b, q, K]) with covariances joint over each block's q points, for
    #: ``posterior(x, joint=True)``; otherwise the blocks' points are independent.
    supports_joint: ClassVar[bool] = False

    def __init__(self, model: nn.Module | None, task: str, *, n_data: int | None = None):
        super().__init__()
        check_choice(task, "task", TASKS)
        if task not in self.supported_tasks:
            raise InputError(f"method {self.method_name!r} does not support task={task!r}; "
                             f"it supports {', '.join(map(repr, self.supported_tasks))}")
        if model is not None and not isinstance(model, nn.Module):
            raise InputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.task = task
        self.n_data = None if n_data is None else check_positive_int(n_data, "n_data")
        self.register_buffer("_fitted", torch.tensor(self.fitted_at_init))
        #: Picks the logits/means from a network output that is not a tensor (see
        #: :mod:`bayesify._network`); set by ``bayesify(..., output=)``.
        self.output: OutputFn | None = None
        #: The key of mapping batches that holds the labels (default 'labels'/'label').
        self.label_key: str | None = None
        #: Maps ``posterior(x)`` to a Predictive; regression methods set their own.
        self.likelihood: Likelihood = CategoricalLikelihood()
        #: Per-epoch mean training loss of the last gradient ``fit``.
        self.history: list[float] = []
        #: What the last gradient ``fit`` planned (epochs, steps), for schedules.
        self.fit_plan: FitPlan | None = None
        self._grad_clip: float | None = None

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (CPU for a parameterless model)."""
        for tensor in self._floating_tensors():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (float32 by default)."""
        for tensor in self._floating_tensors():
            return tensor.dtype
        return torch.get_default_dtype()

    def _floating_tensors(self) -> Iterator[torch.Tensor]:
        if self.model is not None:
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                if tensor.is_floating_point():
                    yield tensor
        for tensor in [*self.parameters(), *self.buffers()]:
            if tensor.is_floating_point():
                yield tensor

    @property
    def is_fitted(self) -> bool:
        """Whether the posterior exists (after ``fit``, ``finish_fit`` or ``load``)."""
        return bool(self._fitted)

    def _mark_fitted(self, value: bool = True) -> None:
        self._fitted.fill_(value)

    def _check_fitted(self, action: str = "predict") -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call .fit(train) before "
                f".{action}(), or .finish_fit() after training it in your own loop with "
                ".loss(x, y)")

    def call_network(self, x: Any, params: dict[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """The wrapped network's raw output [N, K] at inputs ``x`` (a tensor, a mapping of
        keyword inputs or a tuple of positional ones), with ``params`` substituted when
        given; outputs that are not a tensor are reduced by ``output=`` or the rule of
        :mod:`bayesify._network`."""
        return call_network(self.model, x, params=params, output=self.output)

    # ---------------------------------------------------------------- the contract

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Point prediction: logits [N, C] or regression mean [N] / [N, D]."""

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The method's training objective for one batch (a scalar to minimize)."""

    @abc.abstractmethod
    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> Posterior:
        """The posterior over latent outputs at inputs x [N, ...] (already on the
        model's device and dtype). Methods with ``supports_joint`` also take
        ``blocks=(b, q)``: x then holds b·q points, and the posterior has mean
        [b, q, K] with covariances joint within each block."""

    # -------------------------------------------------------------------- posterior

    def posterior(self, x: Any, *, num_samples: int | None = None,
                  generator: torch.Generator | None = None, seed: int | None = None,
                  joint: bool = False) -> Posterior:
        """The posterior over the network's latent outputs f at inputs ``x``.

        Differentiable in ``x`` (no ``no_grad`` inside), so an acquisition function can
        be optimized through it. ``predict`` is ``likelihood(posterior(x))`` in batches.

        Args:
            x: inputs [N, ...] (a tensor keeps its autograd graph); with ``joint=True``,
                blocks [b, q, ...] whose q points get a joint posterior.
            num_samples: S, draws of a sampling method (its default when ``None``).
            generator: source of the draws; ``seed`` makes one.
            joint: return the covariance jointly over the points of each block where the
                method has it (VBLL, GP regression); the draws of sampling methods are
                joint anyway.

        Returns:
            A :class:`~bayesify.posterior.SampledPosterior` with samples [S, N, K]
            ([S, b, q, K] for blocks) or a :class:`~bayesify.posterior.GaussianPosterior`
            with mean [N, K] ([b, q, K]); K is the raw output width (C logits, D means,
            2·D for heteroscedastic regression).
        """
        self._check_fitted("posterior")
        if num_samples is None:
            num_samples = self.default_num_samples
        if num_samples is not None:
            num_samples = check_positive_int(num_samples, "num_samples")
        if generator is None:
            generator = make_generator(seed, self.device)
        x = to_inputs(x, "x", dtype=self.dtype, device=self.device)
        if joint and x.dim() < 3:
            raise InputError("with joint=True, `x` must be blocks [b, q, ...] of q points, "
                             f"got shape {list(x.shape)}")
        with inputs_in_user_terms(self.model, x):
            if not joint:
                return self._posterior(x, num_samples, generator)
            blocks = (int(x.shape[0]), int(x.shape[1]))
            points = x.reshape(-1, *x.shape[2:])
            if self.supports_joint:
                return self._posterior(points, num_samples, generator, blocks=blocks)
            flat = self._posterior(points, num_samples, generator)
        return reshape_points(flat, blocks)

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def predict(
        self,
        x: Any,
        *,
        num_samples: int | None = None,
        batch_size: int = 1024,
        seed: int | None = None,
    ) -> Predictive:
        """The predictive distribution at inputs ``x``: ``likelihood(posterior(x))``.

        Args:
            x: inputs [N, ...] as a tensor or array, or a DataLoader yielding x or (x, y).
            num_samples: posterior samples for sampling methods (method default when
                ``None``); logit draws of a Gaussian posterior under the MC likelihood.
            batch_size: inputs per internal batch.
            seed: makes the sampling repeatable.

        Returns:
            A CategoricalPredictive (classification), or a GaussianPredictive or
            MixturePredictive (regression) over the N inputs, on the model's device.
        """
        self._check_fitted("predict")
        if num_samples is not None:
            num_samples = check_positive_int(num_samples, "num_samples")
        generator = make_generator(seed, self.device)
        batch_size = check_positive_int(batch_size, "batch_size")
        outputs = []
        with preserve_training_flags(self):
            self.eval()
            batches = iter_inputs(x, dtype=self.dtype, device=self.device,
                                  batch_size=batch_size, label_key=self.label_key)
            for start, xb in with_offsets(batches):
                posterior = self.posterior(xb, num_samples=num_samples, generator=generator)
                check_outputs(posterior, start, first=not outputs, task=self.task)
                outputs.append(self.likelihood(posterior, num_samples=num_samples,
                                               generator=generator))
        return type(outputs[0]).cat(outputs) if len(outputs) > 1 else outputs[0]

    # ----------------------------------------------------------------- checkpoints

    def save(self, path: str | os.PathLike) -> None:
        """Save the fitted state to ``path`` (atomically; loadable with
        ``weights_only=True``)."""
        self._check_fitted("save")
        save_checkpoint(self, path)

    def load(self, path: str | os.PathLike) -> BayesianModel:
        """Load a checkpoint written by :meth:`save` into this model (wrapped the same
        way). Everything is checked first: a failed load raises
        :class:`~bayesify.errors.CheckpointError` and leaves the model as it was."""
        load_checkpoint(self, path)
        return self

    def _modules_for_state(self, state_dict: dict[str, Any]) -> dict[str, nn.Module]:
        """Hook: submodules that exist only after ``fit``, built (not attached) to match
        a checkpoint's ``state_dict``; attached by ``load`` once the file is checked."""
        return {}

    def _check_extra_state(self, state_dict: dict[str, Any]) -> None:
        """Hook: check a checkpoint's non-tensor ``get_extra_state`` before loading."""

    def extra_repr(self) -> str:
        return f"task={self.task!r}, n_data={self.n_data}, fitted={self.is_fitted}"


def resolve_method(method: str | type[BayesianModel], name: str = "method"
                   ) -> type[BayesianModel]:
    """The class behind a method name or class; ``name`` is the argument's name for the
    error."""
    if isinstance(method, str):
        return get_method(method)
    if isinstance(method, type) and issubclass(method, BayesianModel):
        return method
    raise InputError(f"`{name}` must be a method name or a BayesianModel subclass, "
                     f"got {type(method).__name__}")


def bayesify(
    model: nn.Module | None,
    method: str | type[BayesianModel] = "deterministic",
    *,
    task: str,
    copy_model: bool = False,
    **options: Any,
) -> BayesianModel:
    """Wrap ``model`` with a Bayesian ``method``.

    Args:
        model: the user's network, pretrained or fresh. It is used in place; pass
            ``copy_model=True`` to wrap a deep copy and leave the original untouched.
        method: a registered name (see :func:`available_methods`) or a
            BayesianModel subclass.
        task: ``"classification"`` or ``"regression"``.
        **options: the method's own options (see its class docstring), and for every
            method ``output=`` (a callable picking the logits or means from a network
            output that is not a tensor) and ``label_key=`` (the key of mapping batches
            holding the labels; 'labels' or 'label' by default).

    Returns:
        A :class:`BayesianModel`; call ``.fit`` then ``.predict``.

    Example:
        >>> bm = bayesify(net, "mc_dropout", task="classification")
        >>> pred = bm.predict(x_test)          # CategoricalPredictive
    """
    check_choice(task, "task", TASKS)
    cls = resolve_method(method)
    if model is not None and not isinstance(model, nn.Module):
        raise InputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    output = options.pop("output", None)
    label_key = options.pop("label_key", None)
    if output is not None and not callable(output):
        raise InputError(f"`output` must be a callable that picks the logits or means from "
                         f"the network's output, got {type(output).__name__}")
    if label_key is not None and not isinstance(label_key, str):
        raise InputError(f"`label_key` must be a str, got {type(label_key).__name__}")
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not accepts_any:
        valid = [n for n, p in signature.parameters.items()
                 if n not in ("self", "model", "task") and p.kind is not p.VAR_POSITIONAL]
        for key in options:
            if key not in valid:
                raise InputError(f"unknown option {key!r} for method {cls.method_name!r}; "
                                 f"its options are {', '.join(valid)}")
    if copy_model and model is not None:
        model = copy.deepcopy(model)
    bm = cls(model, task=task, **options)
    bm.output = output
    bm.label_key = label_key
    return bm

