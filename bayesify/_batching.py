"""Turning what users pass into batches on the model's device and dtype.

Inputs may be one tensor or array [N, ...], a mapping of them (HuggingFace style:
``{"input_ids": [N, T], "attention_mask": [N, T]}``, passed to the network as keyword
arguments), or a tuple of tensors (passed as positional arguments). Training data is a
DataLoader, an ``(X, y)`` pair, or a mapping that holds the labels under ``labels``,
``label`` or a user-given ``label_key``; batches a DataLoader yields may be ``(x, y)``
pairs or such mappings (a list of dicts collated by the default ``collate_fn``).

In-memory data is sliced directly instead of going through ``TensorDataset`` +
``DataLoader``, whose per-row indexing and collation dominate the cost of a small
network's epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bayesify._validation import as_tensor, check_labels, check_positive_int, check_same_length
from bayesify.errors import InputError

__all__ = [
    "LABEL_KEYS",
    "Inputs",
    "TensorBatches",
    "cat_inputs",
    "iter_inputs",
    "make_train_batches",
    "num_rows",
    "split_labels",
    "take_rows",
    "to_inputs",
]

#: Where a mapping batch keeps its labels when no ``label_key`` is given.
LABEL_KEYS = ("labels", "label")

Inputs = torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...]


def _is_structured_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)


def _one(value: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = as_tensor(value, name, device=device)
    if tensor.dim() == 0:
        raise InputError(f"`{name}` must have a batch dimension, got a scalar")
    # Integer inputs stay integers: they are indices for embedding layers.
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        tensor = tensor.to(dtype)
    return tensor


def to_inputs(x: Any, name: str, *, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Inputs on ``device``; floating tensors take the model's ``dtype``.

    Args:
        x: a tensor or array [N, ...], a mapping of them (keyword inputs) or a tuple of
            tensors (positional inputs); every entry shares N.
        name: the argument's name for error messages.

    Returns:
        The same structure with tensors on the device (a tensor is not copied when it
        already fits, so its autograd graph is kept).
    """
    if isinstance(x, Mapping):
        if not x:
            raise InputError(f"`{name}` is an empty mapping; pass the model's inputs")
        out = {str(k): _one(v, f"{name}[{k!r}]", dtype, device) for k, v in x.items()}
        _same_rows(out, name)
        return out
    if _is_structured_tuple(x):
        out = tuple(_one(v, f"{name}[{i}]", dtype, device) for i, v in enumerate(x))
        _same_rows(out, name)
        return out
    return _one(x, name, dtype, device)


def _entries(x: Inputs) -> list[torch.Tensor]:
    if isinstance(x, Mapping):
        return list(x.values())
    if isinstance(x, tuple):
        return list(x)
    return [x]


def _same_rows(x: Inputs, name: str) -> None:
    rows = {t.shape[0] for t in _entries(x)}
    if len(rows) > 1:
        raise InputError(f"the entries of `{name}` must share their first (batch) "
                         f"dimension, got sizes {sorted(rows)}")


def num_rows(x: Inputs) -> int:
    """N, the number of inputs."""
    return int(_entries(x)[0].shape[0])


def take_rows(x: Inputs, index: Any) -> Inputs:
    """Rows ``index`` (a slice or an index tensor) of every entry."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v[index] for v in x)
    return x[index]


def cat_inputs(parts: list[Inputs]) -> Inputs:
    """Concatenate inputs of the same structure along the batch axis."""
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(parts)


def split_labels(batch: Mapping[str, Any], label_key: str | None) -> tuple[dict, Any]:
    """``(inputs, labels)`` of a mapping batch: labels under ``label_key`` or the first
    of :data:`LABEL_KEYS` present; the rest are the inputs."""
    keys = (label_key,) if label_key is not None else LABEL_KEYS
    for key in keys:
        if key in batch:
            return {k: v for k, v in batch.items() if k != key}, batch[key]
    wanted = repr(label_key) if label_key is not None else "'labels' or 'label'"
    raise InputError(f"the batch is a mapping with keys {sorted(map(str, batch))} but no "
                     f"labels under {wanted}; pass label_key= to bayesify(...) naming the "
                     "key that holds them")


def _drop_labels(batch: Mapping[str, Any], label_key: str | None) -> dict:
    keys = {label_key} if label_key is not None else set(LABEL_KEYS)
    return {k: v for k, v in batch.items() if k not in keys}


def to_targets(y: Any, name: str, *, task: str, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Targets: int64 labels [N] for classification, floats [N] or [N, D] for regression."""
    tensor = as_tensor(y, name, device=device)
    if task == "classification":
        if tensor.dim() == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.dim() != 1:
            raise InputError(f"`{name}` must be class labels of shape [N], got "
                             f"{tuple(tensor.shape)}")
        return check_labels(tensor, name)
    if tensor.dim() not in (1, 2):
        raise InputError(f"`{name}` must be regression targets [N] or [N, D], got "
                         f"{tuple(tensor.shape)}")
    return tensor.to(dtype)


class TensorBatches:
    """Shuffled mini-batches over in-memory inputs and targets, re-iterable per epoch.

    Args:
        x: inputs (a tensor, mapping or tuple of tensors with first dimension N).
        y: targets [N, ...].
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: draw a fresh permutation each epoch.
        generator: source of the permutations (CPU generator).
    """

    def __init__(self, x: Inputs, y: torch.Tensor, *, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None):
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator

    @property
    def tensors(self) -> tuple[Inputs, torch.Tensor]:
        return self.x, self.y

    @property
    def num_rows(self) -> int:
        return num_rows(self.x)

    def _starts(self) -> list[int]:
        n = self.num_rows
        starts = list(range(0, n, self.batch_size))
        # A last batch of one row would break BatchNorm in train mode ("expected more
        # than 1 value per channel"): it joins the batch before it.
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        return starts

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        n = self.num_rows
        x, y = self.x, self.y
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(y.device)
            x, y = take_rows(x, order), y[order]
        starts = self._starts()
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else n
            yield take_rows(x, slice(start, stop)), y[start:stop]


class LoaderBatches:
    """A user's DataLoader, each batch split into inputs and targets on the model's device
    and dtype."""

    def __init__(self, loader: DataLoader, *, task: str, dtype: torch.dtype,
                 device: torch.device, label_key: str | None = None):
        self.loader = loader
        self.task = task
        self.dtype = dtype
        self.device = device
        self.label_key = label_key

    @property
    def num_rows(self) -> int:
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        for batch in self.loader:
            if isinstance(batch, Mapping):
                x, y = split_labels(batch, self.label_key)
            elif isinstance(batch, list | tuple) and len(batch) >= 2:
                x, y = batch[0], batch[1]
            else:
                raise InputError("the training DataLoader must yield (x, y) pairs or "
                                 "mappings with the labels under 'labels' (or label_key=)")
            yield (to_inputs(x, "x", dtype=self.dtype, device=self.device),
                   to_targets(y, "y", task=self.task, dtype=self.dtype, device=self.device))


def make_train_batches(
    data: Any,
    *,
    task: str,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    label_key: str | None = None,
) -> TensorBatches | LoaderBatches:
    """Training batches from a DataLoader, an ``(X, y)`` pair, or a mapping of inputs
    with the labels under ``labels``/``label``/``label_key``."""
    if isinstance(data, DataLoader):
        return LoaderBatches(data, task=task, dtype=dtype, device=device, label_key=label_key)
    if isinstance(data, Mapping):
        inputs, labels = split_labels(data, label_key)
    elif isinstance(data, list | tuple) and len(data) == 2:
        inputs, labels = data
    else:
        raise InputError(
            "`train` must be a DataLoader yielding (x, y), a pair (X, y) of tensors/arrays, "
            f"or a mapping of inputs with 'labels', got {type(data).__name__}")
    x = to_inputs(inputs, "X", dtype=dtype, device=device)
    y = to_targets(labels, "y", task=task, dtype=dtype, device=device)
    check_same_length(X=_entries(x)[0], y=y)
    batch_size = check_positive_int(batch_size, "batch_size")
    return TensorBatches(x, y, batch_size=batch_size, shuffle=shuffle, generator=generator)


def iter_inputs(x: Any, *, dtype: torch.dtype, device: torch.device, batch_size: int,
                label_key: str | None = None) -> Iterable[Inputs]:
    """Input batches for prediction from a tensor, an array, a mapping, a tuple of
    tensors or a DataLoader.

    A DataLoader may yield inputs alone, ``(x, y, ...)`` tuples (only x is used) or
    mappings (labels dropped).
    """
    if isinstance(x, DataLoader):
        def from_loader() -> Iterator[Inputs]:
            seen = False
            for batch in x:
                seen = True
                if isinstance(batch, Mapping):
                    xb = _drop_labels(batch, label_key)
                elif isinstance(batch, list | tuple):
                    xb = batch[0]
                else:
                    xb = batch
                yield to_inputs(xb, "x", dtype=dtype, device=device)
            if not seen:
                raise InputError("`x` is an empty DataLoader; pass at least one batch")
        return from_loader()
    if isinstance(x, Mapping):
        x = _drop_labels(x, label_key)
    elif isinstance(x, list) or (isinstance(x, tuple) and not _is_structured_tuple(x)):
        x = np.asarray(x)
    inputs = to_inputs(x, "x", dtype=dtype, device=device)
    batch_size = check_positive_int(batch_size, "batch_size")
    n = num_rows(inputs)
    return (take_rows(inputs, slice(i, i + batch_size)) for i in range(0, n, batch_size))
