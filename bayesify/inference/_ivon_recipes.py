"""Starting points of the ``"ivon"`` method: its recipes, and a watch on the first steps
of a fit that says when the from-scratch defaults are wrecking a pretrained network.

IVON's from-scratch defaults (lr 0.1, h₀ = 1) start as SGD with lr 0.1 and draw
weights with std 1/√(N·h₀): 0.016 for N = 4000, as large as a pretrained BERT's weights
(std 0.02), whose fine-tuning with them ends at the majority class. The ``"finetune"``
recipe starts from a posterior std of at most 1e-3 and SGD-sized steps of lr 0.003. A
pretrained start cannot be recognized from the weights, so the watch compares the loss
of the model as given with that of the initial posterior and of the first steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bayesify._runtime import preserve_training_flags
from bayesify.errors import BayesifyWarning
from bayesify.inference._sampled import user_stacklevel
from bayesify.optim.ivon import IVON

__all__ = ["RECIPES", "WATCH_DRAWS", "WATCH_STEPS", "StartWatch", "recipe_hess_init"]

#: ``fit``'s default lr and the initial Hessian h₀ of each recipe, or the initial
#: posterior std σ₀ that h₀ is solved from (h₀ = 1/(ess·σ₀²), given ess).
RECIPES: dict[str, dict[str, float]] = {
    "scratch": {"lr": 0.1, "hess_init": 1.0},
    "finetune": {"lr": 0.003, "init_std": 1e-3},
}
#: Steps after which the watch looks again at the first batch.
WATCH_STEPS = 8
#: Weight draws from the initial posterior that the watch averages on the first batch.
WATCH_DRAWS = 4


def recipe_hess_init(recipe: str, ess: float) -> float:
    """h₀ of ``recipe`` for a training set of effective size ``ess`` (> 0): its own
    value, or 1/(ess·σ₀²), which makes the initial std 1/√(ess(h₀ + δ)) at most σ₀."""
    values = RECIPES[recipe]
    if "hess_init" in values:
        return values["hess_init"]
    return 1.0 / (ess * values["init_std"] ** 2)


def _rose(before: float, after: float) -> bool:
    """Whether a loss rose by more than its own size and by more than 0.1 nats (more
    than doubled, for a positive loss)."""
    return math.isfinite(after) and after - before > max(abs(before), 0.1)


class StartWatch:
    """Warns once when IVON's start is far worse than the model it was given.

    Everything is measured on the first batch, in eval mode, so that batches of
    different difficulty are not compared: the loss of the model as given, the mean
    loss of :data:`WATCH_DRAWS` weight draws from the initial posterior (from a
    generator of its own: the training noise is not touched), and, after
    :data:`WATCH_STEPS` steps, the loss at the new means. It warns when the draws or the
    steps raised the loss by more than its own size and by more than 0.1 nats. Cost:
    WATCH_DRAWS + 2 forward passes of one batch per fit, and one read of the device.

    Args:
        ess, hess_init, weight_decay, lr: the IVON's settings (for the message).
    """

    def __init__(self, *, ess: float, hess_init: float, weight_decay: float, lr: float):
        self.settings = (ess, hess_init, weight_decay, lr)
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.losses: list[torch.Tensor] = []
        self.steps = 0
        self.done = False

    def start(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              model: nn.Module, optimizer: IVON, x: torch.Tensor, y: torch.Tensor) -> None:
        """Measure the start on the first batch (x [B, ...], y [B]), before any step."""
        self.batch = (x, y)
        generator = torch.Generator(device=optimizer.params[0].device).manual_seed(0)
        with torch.no_grad(), preserve_training_flags(model):
            model.eval()
            self.losses.append(loss_fn(x, y).detach().float().reshape(()))
            draws = []
            for _ in range(WATCH_DRAWS):
                with optimizer.sampled_params(train=False, generator=generator):
                    draws.append(loss_fn(x, y).detach().float().reshape(()))
            self.losses.append(torch.stack(draws).mean())

    def step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             model: nn.Module) -> None:
        """Count a step; after the last watched one, measure again and judge."""
        if self.done or self.batch is None:
            return
        self.steps += 1
        if self.steps < WATCH_STEPS:
            return
        self.done = True
        with torch.no_grad(), preserve_training_flags(model):
            model.eval()
            after = loss_fn(*self.batch).detach().float().reshape(())
        self.batch = None
        device = after.device
        start, drawn, after = torch.stack([*(t.to(device) for t in self.losses), after]
                                          ).tolist()
        if _rose(start, drawn) or _rose(start, after):
            self._warn(start, drawn, after)

    def _warn(self, start: float, drawn: float, after: float) -> None:
        ess, hess_init, weight_decay, lr = self.settings
        std = 1.0 / math.sqrt(ess * (hess_init + weight_decay))
        finetune = RECIPES["finetune"]
        warnings.warn(
            f"IVON's from-scratch defaults (lr={lr:g}, hess_init={hess_init:g}) are far "
            f"from the model you gave: on the first batch its loss is {start:.4g}, weights "
            f"drawn from the initial posterior (std {std:.2g}) give {drawn:.4g}, and the "
            f"first {WATCH_STEPS} steps led to {after:.4g}. That is what they do to a "
            "pretrained network. To fine-tune, wrap with recipe='finetune' (lr "
            f"{finetune['lr']:g}, initial posterior std {finetune['init_std']:g}), or "
            "choose hess_init= and fit(lr=) yourself; a model trained from scratch can "
            "ignore this", BayesifyWarning, stacklevel=user_stacklevel())
