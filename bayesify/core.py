"""`bayesify()`, the :class:`BayesianModel` base class and the method registry.

A method is one subclass of :class:`BayesianModel` in ``bayesify/inference/``,
registered under its name with :func:`register_method`. The base class owns
everything methods share: turning user data into batches on the model's device and
dtype, the training loop with its progress bar, batched prediction, the fitted flag and
checkpoints. A method supplies three things:

* ``forward(x)``: the point prediction (logits [N, C] or mean [N, D]), so the wrapped
  model still drops into old code;
* ``loss(x, y)``: its training objective for one batch (a scalar);
* ``_predict_batch(x, num_samples, generator)``: a :class:`~bayesify.predictive.Predictive`
  for one batch of inputs.

and may override the hooks ``configure_optimizer``, ``training_step``,
``on_fit_start``, ``on_fit_end`` or ``fit`` itself (closed-form and MCMC methods).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from bayesify._batching import iter_inputs, make_train_batches
from bayesify._validation import (
    check_choice,
    check_positive_float,
    check_positive_int,
)
from bayesify.errors import InputError, NotFittedError
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


@contextlib.contextmanager
def preserve_training_flags(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, also when the body raises."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


class BayesianModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every method: a wrapped network with a posterior and a predictive.

    Args:
        model: the user's network (kept, not copied; see ``bayesify(copy=True)``).
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
    default_epochs: ClassVar[int] = 10
    default_lr: ClassVar[float] = 1e-3
    default_batch_size: ClassVar[int] = 128
    #: Whether a freshly wrapped model can predict before ``fit`` (its weights are the
    #: posterior already, as for a pretrained deterministic classifier).
    fitted_at_init: ClassVar[bool] = False

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
        #: Per-epoch mean training loss of the last ``fit``.
        self.history: list[float] = []
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
        """Whether the posterior exists (after ``fit`` or a loaded checkpoint)."""
        return bool(self._fitted)

    def _mark_fitted(self, value: bool = True) -> None:
        self._fitted.fill_(value)

    def _check_fitted(self, action: str = "predict") -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call .fit(train) before "
                f".{action}()"
            )

    @classmethod
    def report_settings(cls, task: str) -> dict[str, dict[str, Any]] | None:
        """How ``bayesify report`` runs this method on a pretrained MLP.

        Returns ``{"options": {...}, "fit": {...}}``: keyword options for
        ``bayesify(...)`` and for ``fit(...)`` (``"fit": None`` skips fitting), or
        ``None`` when the report should leave this method out for ``task``. Methods
        override it with settings that suit the small embedded data sets.
        """
        return {"options": {}, "fit": {}}

    # ---------------------------------------------------------------- the contract

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Point prediction: logits [N, C] or regression mean [N] / [N, D]."""

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The method's training objective for one batch (a scalar to minimize)."""

    @abc.abstractmethod
    def _predict_batch(self, x: torch.Tensor, num_samples: int | None,
                       generator: torch.Generator | None) -> Predictive:
        """The predictive for one batch of inputs x [B, ...]."""

    # -------------------------------------------------------------------- training

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer ``fit`` uses when none is given: AdamW on trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise InputError(f"{type(self).__name__} has no trainable parameters to fit")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def on_fit_start(self, batches: Any) -> None:
        """Hook: called once before the first epoch with the training batches."""

    def on_fit_end(self) -> None:
        """Hook: called once after the last epoch."""

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One optimization step on a batch; returns the detached loss."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        if self._grad_clip is not None:
            nn.utils.clip_grad_norm_(
                [p for p in self.parameters() if p.grad is not None], self._grad_clip
            )
        optimizer.step()
        return loss.detach()

    def fit(
        self,
        train: Any,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        grad_clip: float | None = None,
        progress: bool = True,
        seed: int | None = None,
    ) -> BayesianModel:
        """Train the method's posterior on ``train``.

        Args:
            train: a DataLoader yielding ``(x, y)``, or a pair ``(X, y)`` of tensors or
                arrays: X [N, ...], y [N] (labels or targets) or [N, D] (targets).
            epochs: passes over the data (the method's default when ``None``).
            lr: learning rate of the default optimizer.
            batch_size: rows per batch for in-memory data.
            weight_decay: weight decay of the default optimizer.
            optimizer: an optimizer over this model's parameters to use instead.
            grad_clip: clip the gradient norm to this value before each step.
            progress: show a progress bar over epochs.
            seed: seeds the shuffling (and the method's sampling) for repeatable runs.

        Returns:
            ``self``, fitted.
        """
        epochs = check_positive_int(self.default_epochs if epochs is None else epochs,
                                    "epochs")
        lr = check_positive_float(self.default_lr if lr is None else lr, "lr")
        batch_size = check_positive_int(
            self.default_batch_size if batch_size is None else batch_size, "batch_size")
        check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self._grad_clip = None if grad_clip is None else check_positive_float(grad_clip,
                                                                              "grad_clip")
        if seed is not None:
            torch.manual_seed(int(seed))
        generator = _make_generator(seed, torch.device("cpu"))
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=batch_size,
                                     generator=generator)
        if batches.num_rows == 0 and not len(batches):
            raise InputError("`train` is empty; pass at least one training example")
        if self.n_data is None:
            self.n_data = batches.num_rows or None
        self.on_fit_start(batches)
        if optimizer is None:
            optimizer = self.configure_optimizer(lr, weight_decay)
        self.history = []
        self.train()
        bar = tqdm(range(epochs), desc=f"fit {self.method_name or type(self).__name__}",
                   disable=not progress, leave=False)
        try:
            for _ in bar:
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                count = 0
                for x, y in batches:
                    total += self.training_step(x, y, optimizer).double()
                    count += 1
                if count == 0:
                    raise InputError("`train` yielded no batches; pass at least one example")
                epoch_loss = float(total) / count
                self.history.append(epoch_loss)
                bar.set_postfix(loss=f"{epoch_loss:.4g}")
        finally:
            self.eval()
        self.on_fit_end()
        self._mark_fitted()
        return self

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
        """The predictive distribution at inputs ``x``.

        Args:
            x: inputs [N, ...] as a tensor or array, or a DataLoader yielding x or (x, y).
            num_samples: posterior samples for sampling methods (method default when
                ``None``; ignored by closed-form methods).
            batch_size: inputs per internal batch.
            seed: makes the sampling repeatable.

        Returns:
            A CategoricalPredictive (classification), or a GaussianPredictive or
            MixturePredictive (regression) over the N inputs, on the model's device.
        """
        self._check_fitted("predict")
        if num_samples is None:
            num_samples = self.default_num_samples
        if num_samples is not None:
            num_samples = check_positive_int(num_samples, "num_samples")
        generator = _make_generator(seed, self.device)
        outputs = []
        with preserve_training_flags(self):
            self.eval()
            for xb in iter_inputs(x, dtype=self.dtype, device=self.device,
                                  batch_size=batch_size):
                outputs.append(self._predict_batch(xb, num_samples, generator))
        return type(outputs[0]).cat(outputs) if len(outputs) > 1 else outputs[0]

    # ----------------------------------------------------------------- checkpoints

    def save(self, path: str) -> None:
        """Save the fitted state (a state_dict, loadable with ``weights_only=True``)."""
        self._check_fitted("save")
        torch.save({"method": self.method_name, "task": self.task,
                    "n_data": self.n_data, "state_dict": self.state_dict()}, path)

    def load(self, path: str) -> BayesianModel:
        """Load a checkpoint written by :meth:`save` into this (same-structure) model."""
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        if checkpoint.get("method") != self.method_name:
            raise InputError(f"`path` holds a {checkpoint.get('method')!r} checkpoint, "
                             f"but this model is {self.method_name!r}")
        self.n_data = checkpoint.get("n_data")
        self.load_state_dict(checkpoint["state_dict"])
        return self

    def extra_repr(self) -> str:
        return f"task={self.task!r}, n_data={self.n_data}, fitted={self.is_fitted}"


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
        **options: the method's own options (see its class docstring).

    Returns:
        A :class:`BayesianModel`; call ``.fit`` then ``.predict``.

    Example:
        >>> bm = bayesify(net, "mc_dropout", task="classification")
        >>> pred = bm.predict(x_test)          # CategoricalPredictive
    """
    check_choice(task, "task", TASKS)
    if isinstance(method, str):
        cls = get_method(method)
    elif isinstance(method, type) and issubclass(method, BayesianModel):
        cls = method
    else:
        raise InputError("`method` must be a method name or a BayesianModel subclass, "
                         f"got {type(method).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise InputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
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
    return cls(model, task=task, **options)

