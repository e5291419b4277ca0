"""Turning what users pass (tensors, arrays, (X, y) pairs, DataLoaders) into batches.

In-memory data is sliced directly instead of going through ``TensorDataset`` +
``DataLoader``, whose per-row indexing and collation dominate the cost of a small
network's epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bayesify._validation import as_tensor, check_labels, check_positive_int, check_same_length
from bayesify.errors import InputError

__all__ = ["TensorBatches", "iter_inputs", "make_train_batches", "to_inputs"]


def to_inputs(x: Any, name: str, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Inputs as a tensor on ``device``; floating inputs take the model's ``dtype``."""
    tensor = as_tensor(x, name, device=device)
    if tensor.dim() == 0:
        raise InputError(f"`{name}` must have a batch dimension, got a scalar")
    # Integer inputs stay integers: they are indices for embedding layers.
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        tensor = tensor.to(dtype)
    return tensor


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
    """Shuffled mini-batches over in-memory tensors, re-iterable once per epoch.

    Args:
        tensors: tensors with the same first dimension N.
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: draw a fresh permutation each epoch.
        generator: source of the permutations (CPU generator).
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None):
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator

    @property
    def num_rows(self) -> int:
        return int(self.tensors[0].shape[0])

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = self.num_rows
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.tensors[0].device)
            tensors = [t[order] for t in self.tensors]
        else:
            tensors = list(self.tensors)
        for start in range(0, n, self.batch_size):
            yield tuple(t[start:start + self.batch_size] for t in tensors)


class LoaderBatches:
    """A user's DataLoader, with each (x, y) batch moved to the model's device and dtype."""

    def __init__(self, loader: DataLoader, *, task: str, dtype: torch.dtype,
                 device: torch.device):
        self.loader = loader
        self.task = task
        self.dtype = dtype
        self.device = device

    @property
    def num_rows(self) -> int:
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if not isinstance(batch, list | tuple) or len(batch) < 2:
                raise InputError("the training DataLoader must yield (x, y) pairs")
            x = to_inputs(batch[0], "x", dtype=self.dtype, device=self.device)
            y = to_targets(batch[1], "y", task=self.task, dtype=self.dtype, device=self.device)
            yield x, y


def make_train_batches(
    data: Any,
    *,
    task: str,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> TensorBatches | LoaderBatches:
    """Training batches from a DataLoader or an ``(X, y)`` pair of tensors/arrays."""
    if isinstance(data, DataLoader):
        return LoaderBatches(data, task=task, dtype=dtype, device=device)
    if not isinstance(data, list | tuple) or len(data) != 2:
        raise InputError(
            "`train` must be a DataLoader yielding (x, y) or a pair (X, y) of tensors/arrays, "
            f"got {type(data).__name__}"
        )
    x = to_inputs(data[0], "X", dtype=dtype, device=device)
    y = to_targets(data[1], "y", task=task, dtype=dtype, device=device)
    check_same_length(X=x, y=y)
    batch_size = check_positive_int(batch_size, "batch_size")
    return TensorBatches(x, y, batch_size=batch_size, shuffle=shuffle, generator=generator)


def iter_inputs(x: Any, *, dtype: torch.dtype, device: torch.device,
                batch_size: int) -> Iterable[torch.Tensor]:
    """Input batches for prediction from a tensor, an array or a DataLoader.

    A DataLoader may yield inputs alone or ``(x, y, ...)`` tuples; only x is used.
    """
    if isinstance(x, DataLoader):
        def from_loader() -> Iterator[torch.Tensor]:
            seen = False
            for batch in x:
                seen = True
                xb = batch[0] if isinstance(batch, list | tuple) else batch
                yield to_inputs(xb, "x", dtype=dtype, device=device)
            if not seen:
                raise InputError("`x` is an empty DataLoader; pass at least one batch")
        return from_loader()
    if isinstance(x, list | tuple) and not isinstance(x, np.ndarray):
        x = np.asarray(x)
    tensor = to_inputs(x, "x", dtype=dtype, device=device)
    batch_size = check_positive_int(batch_size, "batch_size")
    return (tensor[i:i + batch_size] for i in range(0, tensor.shape[0], batch_size))
