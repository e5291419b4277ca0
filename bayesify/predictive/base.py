"""The :class:`Predictive` base: a batch of N predictive distributions, indexable and
concatenable along the point axis, with optional per-point method scores."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from bayesify._validation import as_tensor
from bayesify.errors import InputError

__all__ = ["Predictive"]

P = TypeVar("P", bound="Predictive")


class Predictive(abc.ABC):
    """Base of the predictive types: a batch of N predictive distributions."""

    _point_fields: tuple[str, ...] = ()  # tensor attributes indexed along the point axis
    _point_dims: tuple[int, ...] = ()  # the point axis of each of those fields

    @property
    @abc.abstractmethod
    def num_points(self) -> int:
        """N, the number of inputs this predictive describes."""

    def __len__(self) -> int:
        return self.num_points

    def _fields(self) -> dict[str, torch.Tensor | None]:
        fields = {name: getattr(self, "_" + name) for name in self._point_fields}
        for key, value in self.scores.items():
            fields["score:" + key] = value
        return fields

    def _dims(self) -> tuple[int, ...]:
        return self._point_dims + (0,) * len(self.scores)

    def _rebuild(self: P, fields: dict[str, torch.Tensor | None]) -> P:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        scores = {}
        for name, value in fields.items():
            if name.startswith("score:"):
                scores[name[len("score:"):]] = value
            else:
                setattr(new, "_" + name, value)
        new._scores = scores
        return new

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """Method-specific per-point scores [N] (e.g. VBLL's feature log density).

        ``bayesify.ood.score(pred, kind)`` looks kinds up here when they are not one of
        its built-in scores.
        """
        return getattr(self, "_scores", {})

    def with_scores(self: P, **scores: torch.Tensor) -> P:
        """A copy carrying extra per-point scores, each [N]."""
        fields = self._fields()
        for key, value in scores.items():
            value = as_tensor(value, key, device=self.device, ndim=1)
            if value.shape[0] != self.num_points:
                raise InputError(f"score `{key}` must have one value per point "
                                 f"({self.num_points}), got {value.shape[0]}")
            fields["score:" + key] = value
        return self._rebuild(fields)

    def __getitem__(self: P, index: Any) -> P:
        """Select points: ``pred[mask]``, ``pred[idx]`` or ``pred[a:b]``, same type."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        out = {}
        for (name, value), dim in zip(self._fields().items(), self._dims(), strict=True):
            if value is None:
                out[name] = None
            else:
                idx = index.to(value.device) if isinstance(index, torch.Tensor) else index
                out[name] = value[(slice(None),) * dim + (idx,)]
        return self._rebuild(out)

    def to(self: P, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> P:
        """Move every tensor to ``device`` and/or floating ``dtype``."""
        return self._rebuild({
            name: None if value is None else value.to(device=device, dtype=dtype)
            for name, value in self._fields().items()
        })

    @classmethod
    def cat(cls: type[P], items: Sequence[P]) -> P:
        """Concatenate predictives of the same type along the point axis."""
        if not items:
            raise InputError("`items` is empty; pass at least one predictive to concatenate")
        first = items[0]
        present = {name: value is not None for name, value in first._fields().items()}
        for item in items:
            if type(item) is not type(first):
                raise InputError(
                    f"`items` must all be {type(first).__name__}, got {type(item).__name__}"
                )
            if {name: value is not None for name, value in item._fields().items()} != present:
                raise InputError("`items` must all carry the same fields (per-sample outputs, "
                                 "aleatoric parts, scores) to be concatenated")
        out = {}
        for (name, value), dim in zip(first._fields().items(), first._dims(), strict=True):
            if value is None:
                out[name] = None
            else:
                out[name] = torch.cat([i._fields()[name] for i in items], dim=dim)
        return first._rebuild(out)

    @property
    def device(self) -> torch.device:
        return next(v for v in self._fields().values() if v is not None).device

    @property
    def dtype(self) -> torch.dtype:
        return next(v for v in self._fields().values() if v is not None).dtype
