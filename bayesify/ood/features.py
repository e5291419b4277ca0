"""Reading a network's features for the feature-space OOD detectors.

A :class:`FeatureExtractor` wraps a plain ``nn.Module`` or a bayesify ``BayesianModel``
(whose network is its ``.model``) and returns, for inputs x, the features φ(x) and the
model's output:

* by default φ is the input of the final ``nn.Linear`` (the same head-finding as the
  VBLL and GP methods; ``head="classifier.3"`` picks another Linear), read by a forward
  hook;
* with ``layer="name"`` φ is the output of that named module instead.

Features are flattened to [N, d]. The output comes from the BayesianModel's forward
(its point prediction: logits for classification), or the plain network's. Forward
passes run in eval mode (dropout off, BatchNorm on running statistics); every
module's train/eval flag is restored afterwards, also when the pass raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bayesify._batching import iter_inputs
from bayesify._validation import as_tensor, check_positive_int, check_same_length
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.inference._heads import find_head

__all__ = ["FeatureExtractor", "iter_train", "output_tensor"]

Shaping = Callable[[torch.Tensor], torch.Tensor]


def _is_bayesian_model(model: Any) -> bool:
    from bayesify.core import BayesianModel  # lazy: ood sits above core

    return isinstance(model, BayesianModel)


def output_tensor(output: Any) -> torch.Tensor:
    """A model's output as a tensor: the tensor itself, ``.logits``, ``["logits"]`` or the
    first element of a tuple (HuggingFace-style outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, list | tuple) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise UnsupportedModelError(
            f"cannot read logits from a model output of type {type(output).__name__}; "
            "the model must return a tensor, a tuple starting with one, or an object with "
            "`.logits`")
    return logits


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def iter_train(train: Any, batch_size: int) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Batches ``(x, y or None)`` of a training set: a DataLoader yielding x or (x, y),
    an ``(X, y)`` tuple, or inputs X alone."""
    if isinstance(train, DataLoader):
        seen = False
        for batch in train:
            seen = True
            if isinstance(batch, list | tuple):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None
        if not seen:
            raise InputError("`train` is an empty DataLoader; pass at least one batch")
        return
    if isinstance(train, tuple):
        if len(train) != 2:
            raise InputError(f"`train` as a tuple must be (X, y), got {len(train)} items")
        x = as_tensor(train[0], "train (X)")
        y = as_tensor(train[1], "train (y)", device=x.device)
        check_same_length(**{"train (X)": x, "train (y)": y})
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    if train is None:
        raise InputError("`train` is None; pass the in-distribution training data: a "
                         "DataLoader, an (X, y) tuple or inputs X")
    x = as_tensor(train, "train")
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size], None


class FeatureExtractor:
    """Features φ(x) [N, d] and outputs [N, C] of a network or a BayesianModel.

    Args:
        model: an ``nn.Module`` or a bayesify ``BayesianModel`` (its ``.model`` network
            gives the features, its forward the outputs).
        layer: name of a module (as in ``named_modules()``) whose output is φ; ``None``
            for the input of the head.
        head: name of the final ``nn.Linear`` (default: the last one in the network).
        batch_size: inputs per forward pass.
        features: ``False`` for a detector that reads only outputs (ODIN): no head is
            looked up, and :meth:`outputs` is the only call.
    """

    def __init__(self, model: Any, *, layer: str | None = None, head: str | None = None,
                 batch_size: int = 1024, features: bool = True):
        if _is_bayesian_model(model):
            network = model.model
            if not isinstance(network, nn.Module):
                raise UnsupportedModelError(
                    f"this {type(model).__name__} wraps no network (`.model` is None), so "
                    "it has no features; fit the detector on a model with a network")
        elif isinstance(model, nn.Module):
            network = model
        else:
            raise InputError("`model` must be a torch.nn.Module or a bayesify "
                             f"BayesianModel, got {type(model).__name__}")
        self.network: nn.Module = network
        self.forward_module: nn.Module = model
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if layer is not None and head is not None:
            raise InputError("pass `layer` (a module's output) or `head` (the input of a "
                             "Linear), not both")
        self.head: nn.Linear | None = None
        self.module: nn.Module | None = None
        self.name = ""
        if not features:
            return
        if layer is None:
            try:
                self.name, self.head = find_head(network, head)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(
                    f"{exc}; or pass `layer=` naming a module whose output is the feature "
                    "(a method that replaces nn.Linear layers, such as ssvi or vi, leaves "
                    "none)") from None
            self.module = self.head
        else:
            if not isinstance(layer, str):
                raise InputError("`layer` must be a submodule's name as in "
                                 f"model.named_modules(), got {type(layer).__name__}")
            try:
                self.module = network.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in network.named_modules() if n][:20]
                raise InputError(f"`layer`={layer!r} names no submodule; the model's "
                                 f"modules include: {', '.join(map(repr, names))}") from None
            self.name = layer

    @property
    def reads_head_input(self) -> bool:
        """Whether φ is the input of the final Linear (rather than a layer's output)."""
        return self.head is not None

    def _floating(self) -> torch.Tensor | None:
        for tensor in [*self.forward_module.parameters(), *self.forward_module.buffers()]:
            if tensor.is_floating_point():
                return tensor
        return None

    @property
    def dtype(self) -> torch.dtype:
        tensor = self._floating()
        return torch.get_default_dtype() if tensor is None else tensor.dtype

    @property
    def device(self) -> torch.device:
        tensor = self._floating()
        return torch.device("cpu") if tensor is None else tensor.device

    def inputs(self, x: Any) -> Iterator[torch.Tensor]:
        """Input batches on the model's device and dtype, from a tensor, an array or a
        DataLoader (yielding x or (x, y, ...))."""
        return iter(iter_inputs(x, dtype=self.dtype, device=self.device,
                                batch_size=self.batch_size))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output [B, ...] for one batch x in eval mode (gradients if enabled)."""
        with _eval_mode(self.forward_module):
            return output_tensor(self.forward_module(x))

    def forward(self, x: torch.Tensor, shaping: Shaping | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch x [B, ...] -> (φ [B, d], output [B, ...]), with gradients if enabled.

        ``shaping`` maps φ to the shaped features the rest of the network then sees
        (ReAct clipping, ASH); the returned φ is the shaped one.
        """
        if self.module is None:
            raise InputError("this FeatureExtractor was made with features=False")
        captured: list[torch.Tensor] = []

        if self.reads_head_input:
            def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
                if not args or not isinstance(args[0], torch.Tensor):
                    return None
                if shaping is None:
                    captured.append(args[0])
                    return None
                shaped = shaping(args[0])
                captured.append(shaped)
                return (shaped, *args[1:])

            handle = self.module.register_forward_pre_hook(pre_hook)
        else:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
                if not isinstance(output, torch.Tensor):
                    return None
                shaped = output if shaping is None else shaping(output)
                captured.append(shaped)
                return None if shaping is None else shaped

            handle = self.module.register_forward_hook(hook)
        try:
            output = self.outputs(x)
        finally:
            handle.remove()
        if not captured:
            where = "input" if self.reads_head_input else "output"
            raise UnsupportedModelError(
                f"the model's forward never passed a tensor through {self.name!r} (its "
                f"{where} is the feature); name a module the forward uses with `layer=` or "
                "`head=`")
        features = captured[-1]
        return features.reshape(features.shape[0], -1), output

    @torch.no_grad()
    def run(self, x: Any, shaping: Shaping | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs x -> (φ [N, d], output [N, ...]), detached, in the model's dtype."""
        features, outputs = [], []
        for xb in self.inputs(x):
            phi, out = self.forward(xb, shaping)
            features.append(phi)
            outputs.append(out)
        return torch.cat(features), torch.cat(outputs)

    @torch.no_grad()
    def run_train(self, train: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A training set -> (φ [N, d], output [N, ...], labels [N] int64 or ``None``)."""
        features, outputs, labels = [], [], []
        for xb, yb in iter_train(train, self.batch_size):
            batch = next(iter(iter_inputs(xb, dtype=self.dtype, device=self.device,
                                          batch_size=max(1, len(xb)))))
            phi, out = self.forward(batch)
            features.append(phi)
            outputs.append(out)
            labels.append(yb)
        if any(y is None for y in labels):
            return torch.cat(features), torch.cat(outputs), None
        y = torch.cat([as_tensor(y, "train (y)", device=self.device).reshape(-1)
                       for y in labels])
        if y.shape[0] != sum(f.shape[0] for f in features):
            raise InputError("`train` labels must be one class index per input")
        return torch.cat(features), torch.cat(outputs), y


def percentile(values: torch.Tensor, q: float) -> float:
    """numpy's linearly interpolated percentile q in [0, 100] of all entries, in float64."""
    return float(np.percentile(values.detach().double().cpu().numpy(), q))
