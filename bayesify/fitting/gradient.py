"""The one minibatch training loop of bayesify."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from bayesify._progress import progress_bar
from bayesify._validation import inputs_in_user_terms
from bayesify.errors import BayesifyWarning, InputError, TrainingDivergedError
from bayesify.fitting.guard import NonFiniteStep
from bayesify.fitting.options import FitOptions, FitPlan, FitStrategy

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["GradientFit"]


def _all_finite(method: BayesianModel) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in method.parameters()
               if p.is_floating_point())


class GradientFit(FitStrategy):
    """Minibatch gradient training through the method's hooks.

    Per fit: ``training_batches`` → ``on_fit_start(batches)`` (with ``method.fit_plan``
    set) → ``configure_optimizer(lr, weight_decay)`` (unless ``optimizer=`` is given)
    → per batch ``training_step(x, y, optimizer)`` → ``on_fit_end()``.

    A step whose loss or gradient norm is not finite is not applied. With
    ``on_nonfinite="raise"`` (the default) the fit stops with
    :class:`~bayesify.errors.TrainingDivergedError` naming the epoch and step; the
    weights are those of the last finite step (a method whose optimizer step itself
    produced non-finite weights is marked unfitted). ``"warn"`` skips such batches and
    warns once per epoch.
    """

    description = "gradient descent"
    applies = frozenset({"epochs", "lr", "batch_size", "weight_decay", "optimizer",
                         "grad_clip", "progress", "seed", "on_nonfinite"})

    def run(self, method: BayesianModel, train: Any, options: FitOptions) -> None:
        defaults = method.fit_defaults()
        epochs = defaults["epochs"] if options.epochs is None else options.epochs
        lr = defaults["lr"] if options.lr is None else options.lr
        batch_size = defaults["batch_size"] if options.batch_size is None else options.batch_size
        weight_decay = (defaults["weight_decay"] if options.weight_decay is None
                        else options.weight_decay)
        method._grad_clip = defaults["grad_clip"] if options.grad_clip is None \
            else options.grad_clip
        generator = None
        if options.seed is not None:
            torch.manual_seed(options.seed)
            generator = torch.Generator().manual_seed(options.seed)
        batches = method.training_batches(train, batch_size=batch_size, generator=generator)
        if method.n_data is None:
            method.n_data = batches.num_rows or None
        try:
            steps = len(batches)
        except TypeError:
            steps = None
        method.fit_plan = FitPlan(epochs=epochs, steps_per_epoch=steps)
        method.on_fit_start(batches)
        optimizer = options.optimizer or method.configure_optimizer(lr, weight_decay)
        method.history = []
        method.train()
        bar = progress_bar(range(epochs), desc=f"fit {method.method_name or type(method).__name__}",
                           progress=options.progress)
        try:
            for epoch in bar:
                total = torch.zeros((), dtype=torch.float64, device=method.device)
                count = skipped = 0
                for step, (x, y) in enumerate(batches):
                    try:
                        with inputs_in_user_terms(method.model, x):
                            loss = method.training_step(x, y, optimizer)
                    except NonFiniteStep as exc:
                        if options.on_nonfinite == "warn":
                            skipped += 1
                            continue
                        self._diverged(method, exc, epoch, epochs, step, lr)
                    total += loss.detach().double()
                    count += 1
                if count + skipped == 0:
                    raise InputError("`train` yielded no batches; pass at least one example")
                if skipped:
                    warnings.warn(f"epoch {epoch + 1}: skipped {skipped} of {count + skipped} "
                                  "batches whose loss or gradient was not finite",
                                  BayesifyWarning, stacklevel=4)
                epoch_loss = float(total) / max(count, 1)
                method.history.append(epoch_loss)
                bar.set_postfix(loss=f"{epoch_loss:.4g}")
        finally:
            method.eval()
        method.on_fit_end()

    @staticmethod
    def _diverged(method: BayesianModel, exc: NonFiniteStep, epoch: int, epochs: int,
                  step: int, lr: float) -> None:
        kept = _all_finite(method)
        if not kept:
            method._mark_fitted(False)
        state = ("the weights are those of the last finite step" if kept else
                 "the weights are no longer finite, so the model is marked unfitted")
        raise TrainingDivergedError(
            f"training of {method.method_name!r} diverged at epoch {epoch + 1}/{epochs}, step "
            f"{step + 1}: the {exc.what} is {exc.value}; {state}. Lower `lr` (it was "
            f"{lr:g}), pass `grad_clip=` (e.g. 1.0), or check the data for extreme values; "
            "on_nonfinite='warn' skips such batches instead") from exc
