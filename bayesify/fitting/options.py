"""The arguments every ``fit`` accepts, the plan a training run follows, and the
strategy interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from bayesify._validation import check_choice, check_positive_float, check_positive_int
from bayesify.errors import InputError

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["NONFINITE_POLICIES", "FitOptions", "FitPlan", "FitStrategy"]

NONFINITE_POLICIES = ("raise", "warn")


@dataclass
class FitOptions:
    """What the user passed to ``fit``; ``None`` means "the method's default".

    See :meth:`bayesify.BayesianModel.fit` for the meaning of each field.
    """

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    optimizer: torch.optim.Optimizer | None = None
    grad_clip: float | None = None
    progress: bool | None = None
    seed: int | None = None
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.epochs is not None:
            self.epochs = check_positive_int(self.epochs, "epochs", minimum=0)
        if self.lr is not None:
            self.lr = check_positive_float(self.lr, "lr")
        if self.batch_size is not None:
            self.batch_size = check_positive_int(self.batch_size, "batch_size")
        if self.weight_decay is not None:
            self.weight_decay = check_positive_float(self.weight_decay, "weight_decay",
                                                     allow_zero=True)
        if self.optimizer is not None and not isinstance(self.optimizer,
                                                         torch.optim.Optimizer):
            raise InputError("`optimizer` must be a torch.optim.Optimizer over the wrapped "
                             f"model's parameters, got {type(self.optimizer).__name__}")
        if self.grad_clip is not None:
            self.grad_clip = check_positive_float(self.grad_clip, "grad_clip")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InputError(f"`seed` must be an int, got {type(self.seed).__name__}")
        check_choice(self.on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)

    def given(self) -> dict[str, Any]:
        """The options the user set (not ``None``, and not at their default)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value != f.default:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class FitPlan:
    """What a gradient fit is about to do, for methods with schedules.

    Attributes:
        epochs: passes over the training data.
        steps_per_epoch: optimizer steps per pass (``None`` for a loader without a
            length).
        total_steps: ``epochs · steps_per_epoch`` (``None`` when unknown).
    """

    epochs: int
    steps_per_epoch: int | None

    @property
    def total_steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch


class FitStrategy(abc.ABC):
    """How a method is fit. ``applies`` names the :class:`FitOptions` it uses."""

    #: what the strategy is, for messages ("gradient descent", "MCMC")
    description: str = ""
    applies: frozenset[str] = frozenset()

    def check_options(self, method: BayesianModel, options: FitOptions) -> None:
        """Refuse options that this strategy would silently ignore."""
        unused = sorted(set(options.given()) - self.applies)
        if unused:
            names = ", ".join(f"`{n}`" for n in unused)
            usable = ", ".join(sorted(self.applies)) or "none"
            raise InputError(
                f"{names} {'does' if len(unused) == 1 else 'do'} not apply to method "
                f"{method.method_name!r}, which is fit by {self.description}; the fit "
                f"options it uses are: {usable} (its own settings go to bayesify(...))")

    @abc.abstractmethod
    def run(self, method: BayesianModel, train: Any, options: FitOptions) -> None:
        """Fit ``method`` on ``train`` (the caller marks it fitted afterwards)."""
