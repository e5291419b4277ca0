"""The fitting half of :class:`~bayesify.core.BayesianModel`: ``fit`` with its strategy,
the gradient loop's hooks, and ``finish_fit`` for users' own loops."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bayesify._batching import make_train_batches
from bayesify.errors import InputError
from bayesify.fitting import (
    FitOptions,
    FitPlan,
    FitStrategy,
    GradientFit,
    check_finite_loss,
    gradient_norm,
)

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["FittingMixin"]

_GRADIENT = GradientFit()


class FittingMixin:
    """Mixed into BayesianModel (an ``nn.Module``): everything ``fit`` needs."""

    default_epochs: ClassVar[int] = 10
    default_lr: ClassVar[float] = 1e-3
    default_batch_size: ClassVar[int] = 128
    default_weight_decay: ClassVar[float] = 0.0
    default_grad_clip: ClassVar[float | None] = None

    fit_plan: FitPlan | None
    history: list[float]
    _grad_clip: float | None

    # -------------------------------------------------------------------- training

    def fit_strategy(self) -> FitStrategy:
        """How ``fit`` trains this method (the gradient loop unless overridden)."""
        return _GRADIENT

    def fit_defaults(self) -> dict[str, Any]:
        """The method's defaults for the gradient loop's options."""
        return {"epochs": self.default_epochs, "lr": self.default_lr,
                "batch_size": self.default_batch_size,
                "weight_decay": self.default_weight_decay,
                "grad_clip": self.default_grad_clip}

    def training_batches(self, train: Any, *, batch_size: int,
                         generator: torch.Generator | None, shuffle: bool = True) -> Any:
        """Hook: the batches ``fit`` iterates over, yielding ``(x, y)`` on the model's
        device and dtype (a method may yield cached features instead)."""
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=batch_size,
                                     shuffle=shuffle, generator=generator,
                                     label_key=self.label_key)
        try:
            empty = batches.num_rows == 0 and not len(batches)
        except TypeError:  # a loader over an IterableDataset has no length
            empty = False
        if empty:
            raise InputError("`train` is empty; pass at least one training example")
        return batches

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer ``fit`` uses when none is given: AdamW on trainable parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise InputError(f"{type(self).__name__} has no trainable parameters to fit")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def on_fit_start(self, batches: Any) -> None:
        """Hook: called once before the first epoch (``self.fit_plan`` is set)."""

    def on_fit_end(self) -> None:
        """Hook: called once after the last epoch (and by :meth:`finish_fit`)."""

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Hook: the loss of one batch from ``training_batches`` (``loss`` by default)."""
        return self.loss(x, y)

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One optimization step on a batch; returns the detached loss.

        Raises :class:`~bayesify.fitting.NonFiniteStep` before the optimizer applies a
        step whose loss or gradient norm is not finite.
        """
        optimizer.zero_grad(set_to_none=True)
        loss = self.training_loss(x, y)
        check_finite_loss(loss)
        loss.backward()
        gradient_norm(self.parameters(), self._grad_clip)
        optimizer.step()
        return loss.detach()

    def fit_full_batch(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                       progress: bool | None) -> None:
        """Hook of the full-batch strategies: fit on all of X [N, ...], y [N] or [N, D]."""
        raise InputError(f"method {self.method_name!r} is fit by gradient descent; it has "
                         "no full-batch fit")

    def fit(
        self,
        train: Any,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        grad_clip: float | None = None,
        progress: bool | None = None,
        seed: int | None = None,
        on_nonfinite: str = "raise",
    ) -> BayesianModel:
        """Fit the method's posterior on ``train``.

        Every method takes these arguments; one that does not apply to the method's fit
        strategy (``lr`` for MCMC, say) raises an error that says so.

        Args:
            train: a DataLoader yielding ``(x, y)``, or a pair ``(X, y)`` of tensors or
                arrays: X [N, ...], y [N] (labels or targets) or [N, D] (targets).
            epochs: passes over the data (the method's default when ``None``); 0 runs
                the start and end of a fit without steps.
            lr: learning rate of the default optimizer.
            batch_size: rows per batch for in-memory data.
            weight_decay: weight decay of the default optimizer.
            optimizer: an optimizer over this model's parameters to use instead.
            grad_clip: clip the gradient norm to this value before each step.
            progress: show a progress bar (default: unless switched off globally, see
                ``bayesify.set_progress_bars`` and ``TQDM_DISABLE``).
            seed: seeds the shuffling (and the method's sampling) for repeatable runs.
            on_nonfinite: ``"raise"`` (stop with TrainingDivergedError at a NaN/inf loss
                or gradient) or ``"warn"`` (skip such batches).

        Returns:
            ``self``, fitted.
        """
        options = FitOptions(epochs=epochs, lr=lr, batch_size=batch_size,
                             weight_decay=weight_decay, optimizer=optimizer,
                             grad_clip=grad_clip, progress=progress, seed=seed,
                             on_nonfinite=on_nonfinite)
        strategy = self.fit_strategy()
        strategy.check_options(self, options)
        strategy.run(self, train, options)
        self._mark_fitted()
        return self

    def finish_fit(self) -> BayesianModel:
        """Declare training done after your own loop over ``loss(x, y)`` (plain PyTorch,
        a Lightning ``Trainer``): runs the method's end-of-fit step and marks the model
        fitted, so ``predict`` and ``save`` work. Returns ``self``."""
        self.on_fit_end()
        self.eval()
        self._mark_fitted()
        return self
