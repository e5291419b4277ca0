"""Training M same-architecture members in one batched step (``torch.func``).

The members' parameters and buffers are stacked along a new leading dimension
(:func:`torch.func.stack_module_state`) and each member's training loss is evaluated
under :func:`torch.func.vmap` over :func:`torch.func.functional_call`, so one forward,
one backward and one optimizer step serve all members. Optimizers that act elementwise
(SGD, Adam, AdamW) then take exactly the steps each member's own optimizer would take;
gradient clipping and the divergence guard are applied per member.

A parameter that is the same tensor in every member (the frozen base of LoRA members,
see :mod:`bayesify.inference.ensemble`) is not stacked: the members read it in place.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from bayesify.fitting import NonFiniteStep

__all__ = ["StackedMembers", "batchnorm_layers"]


@contextlib.contextmanager
def quiet_batching_fallbacks() -> Iterator[None]:
    """Silence torch's note that an operator (CPU scaled-dot-product attention, say) has
    no vmap batching rule and runs in a loop: the result is right, the note is torch's
    performance advice, and a user's warnings-as-errors suite should not fail on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop because we have not "
                                "yet implemented the batching rule", UserWarning)
        yield


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new leaf [M, ...], trainable when every member's tensor is (as
    :func:`torch.func.stack_module_state` builds it)."""
    stacked = torch.stack([t.detach() for t in tensors])
    return stacked.requires_grad_(all(t.requires_grad for t in tensors))


class _TrainingLoss(nn.Module):
    """``forward(x, y)`` is the member's ``training_loss``, so ``functional_call`` can
    swap in one member's weights at a time."""

    def __init__(self, member: nn.Module):
        super().__init__()
        self.member = member

    def forward(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        return self.member.training_loss(x, y)


class StackedMembers:
    """The state of M members stacked [M, ...] for vmapped training.

    Args:
        members: BayesianModels of the same class and architecture (same training mode).

    Attributes:
        params: name -> stacked parameter [M, ...] (new leaves; trainable where every
            member's parameter is). Parameters shared by all members are left out.
        buffers: name -> stacked buffer [M, ...].
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        every = [dict(m.named_parameters()) for m in self.members]
        params = {name: _stack([own[name] for own in every]) for name, first in
                  every[0].items() if not all(own[name] is first for own in every[1:])}
        own_buffers = [dict(m.named_buffers()) for m in self.members]
        buffers = {name: torch.stack([own[name] for own in own_buffers]) for name in
                   own_buffers[0]}
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        self._template = _TrainingLoss(self.members[0])
        # The same tensors under the template's names, built once (not per step).
        self._state = {f"member.{k}": v for k, v in [*params.items(), *buffers.items()]}

    @property
    def num_members(self) -> int:
        return len(self.members)

    def trainable(self) -> list[torch.Tensor]:
        """The stacked parameters an optimizer should update."""
        return [p for p in self.params.values() if p.requires_grad]

    def adamw(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over the trainable stacked parameters; the fused kernel where the device
        and dtype have one (one pass over M times the weights instead of a dozen)."""
        params = self.trainable()
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def losses(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """Each member's training loss on the same batch, [M] (differentiable in the
        stacked parameters). Random operations draw independently per member."""
        def one(state: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self._template, state, (x, y))

        with quiet_batching_fallbacks():
            return vmap(one, randomness="different")(self._state)

    def clip_gradients(self, clip: float | None) -> torch.Tensor:
        """Per-member total gradient norms [M] (before clipping), clipping each member
        to ``clip`` as :func:`torch.nn.utils.clip_grad_norm_` would.

        Raises:
            NonFiniteStep: some member's gradient norm is NaN or infinite.
        """
        grads = [p.grad for p in self.trainable() if p.grad is not None]
        if not grads:
            return torch.zeros(self.num_members)
        per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1)
                                  for g in grads], 1)
        norms = torch.linalg.vector_norm(per_tensor, dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise NonFiniteStep("gradient norm", float(norms[~torch.isfinite(norms)][0]))
        if clip is not None:
            coef = (clip / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
        return norms

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked state into the members' own parameters and buffers."""
        for index, member in enumerate(self.members):
            for name, tensor in member.named_parameters():
                if name in self.params:
                    tensor.copy_(self.params[name][index])
            for name, tensor in member.named_buffers():
                if name in self.buffers:
                    tensor.copy_(self.buffers[name][index])
