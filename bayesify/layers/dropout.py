"""Dropout helpers for MC dropout: finding, inserting and sampling dropout layers.

Sampling happens outside torch's own dropout: :func:`sample_dropout` reproduces the
train-mode behaviour of every ``nn`` dropout type with masks drawn from an explicit
``torch.Generator``, and can replicate its input S times along the batch axis first, so
a network's deterministic prefix runs once while the rest sees S dropout samples in one
batched call. :class:`DropoutSampler` applies it through forward hooks while every
module stays in eval mode (BatchNorm keeps using its running statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from bayesify.errors import InputError, UnsupportedModelError

__all__ = [
    "DROPOUT_TYPES",
    "DropoutSampler",
    "FastPathUnavailable",
    "dropout_mask_shape",
    "find_dropout",
    "insert_dropout",
    "sample_dropout",
]

#: The dropout modules MC dropout samples (torch's train-mode semantics, reproduced).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_ALPHA_TYPES = (nn.AlphaDropout, nn.FeatureAlphaDropout)
# SELU's negative saturation -scale*alpha, the value alpha dropout sets dropped units to
# before its affine correction (torch's ATen constant).
_SELU_SATURATION = 1.7580993408473766
#: Attribute under which inserted dropout hangs off the module it precedes.
INSERTED_NAME = "bayesify_dropout"


def find_dropout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's active dropout modules (any of :data:`DROPOUT_TYPES` with p > 0).

    Returns:
        ``(qualified name, module)`` pairs in registration order.
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, DROPOUT_TYPES) and m.p > 0]


def _apply_inserted_dropout(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure) so deepcopy and pickling of the model keep
    # working: the hook reaches the dropout through the module it is called with.
    if not args:
        return None  # called with keyword inputs only: nothing positional to drop
    dropout = getattr(module, INSERTED_NAME)
    return (dropout(args[0]), *args[1:])


def insert_dropout(model: nn.Module, p: float, *, layers: int = 1,
                   before: str | Sequence[str] | None = None) -> list[str]:
    """Insert ``nn.Dropout(p)`` on the input of the last ``layers`` ``nn.Linear`` modules.

    The dropout becomes a child ``bayesify_dropout`` of each target module and runs
    through a forward pre-hook on its first positional input, so the model's parameter
    names and its eval-mode outputs stay exactly as they were.

    Args:
        model: the network, changed in place.
        p: dropout rate in [0, 1).
        layers: how many of the last ``nn.Linear`` modules (registration order) get it.
        before: names of submodules to put dropout before instead (any module type).

    Returns:
        The qualified names of the modules that now have dropout on their input.
    """
    if before is not None:
        names = [before] if isinstance(before, str) else list(before)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing or not names:
            known = ", ".join(repr(n) for n in list(modules)[1:12])
            raise InputError(f"`before` must name submodules of the model, got {missing or names}"
                             f"; its submodules include {known}")
        targets = [(n, modules[n]) for n in names]
    else:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UnsupportedModelError(
                "the model has no dropout and no nn.Linear layer to insert dropout before; "
                "pass `before=` with the names of the submodules that should get dropout on "
                "their input, or add dropout to the model")
        if layers > len(linears):
            raise UnsupportedModelError(
                f"`layers` is {layers} but the model has only {len(linears)} nn.Linear "
                f"layer(s) ({', '.join(n for n, _ in linears)}); pass layers<={len(linears)}")
        targets = linears[len(linears) - layers:]
    for name, module in targets:
        if hasattr(module, INSERTED_NAME):
            raise InputError(f"`before`: module {name!r} already has inserted dropout")
        # The new dropout follows its module's mode: an eval-mode network stays exact.
        module.add_module(INSERTED_NAME, nn.Dropout(p).train(module.training))
        module.register_forward_pre_hook(_apply_inserted_dropout)
    return [name for name, _ in targets]


def dropout_mask_shape(module: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    """Shape of the Bernoulli mask ``module`` draws for an input of ``shape``.

    Element-wise dropout masks every entry; feature (channel) dropout masks whole
    channels, broadcasting over the trailing dims, as torch does: Dropout1d and
    Dropout3d accept an unbatched input ([C, L] and [C, D, H, W]), while Dropout2d and
    FeatureAlphaDropout always read dims 0 and 1 as (batch, channel).
    """
    if isinstance(module, nn.Dropout | nn.AlphaDropout):
        return tuple(shape)
    unbatched_ndim = {nn.Dropout1d: 2, nn.Dropout3d: 4}.get(type(module))
    if unbatched_ndim is not None and len(shape) == unbatched_ndim:
        return (shape[0],) + (1,) * (len(shape) - 1)
    if len(shape) < 2:
        raise InputError(f"{type(module).__name__} needs an input with a channel dim, got "
                         f"shape {list(shape)}")
    return (shape[0], shape[1]) + (1,) * (len(shape) - 2)


def sample_dropout(x: torch.Tensor, module: nn.Module, *, copies: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One train-mode pass of a dropout ``module`` on ``copies`` replicas of ``x``.

    Args:
        x: the dropout's input [B, ...].
        module: one of :data:`DROPOUT_TYPES` (its rate ``p`` and kind are used).
        copies: S; the output stacks S independently masked copies of x along dim 0.
        generator: source of the masks, on x's device.

    Returns:
        [S·B, ...], copy-major (rows s·B .. s·B + B - 1 are copy s). Masks are drawn in
        that order, so S calls with ``copies=1`` on one generator give the same masks as
        one call with ``copies=S`` (on CPU, where torch's generator is sequential).
    """
    p = float(module.p)
    shape = (copies * x.shape[0], *x.shape[1:]) if copies > 1 else x.shape
    if p >= 1:
        # torch multiplies by zero for p == 1 (alpha dropout included).
        return x.new_zeros(shape)
    mask_shape = dropout_mask_shape(module, torch.Size(shape))
    # Masks are drawn from float32 uniforms for every dtype, so float32 and float64
    # models see the same masks from the same seed.
    keep = torch.rand(mask_shape, generator=generator, device=x.device, dtype=torch.float32)
    keep = keep.ge_(p).to(x.dtype)
    if isinstance(module, _ALPHA_TYPES):
        a = 1.0 / ((_SELU_SATURATION ** 2 * p + 1) * (1 - p)) ** 0.5
        dropped = a * _SELU_SATURATION * (p - 1)
        gain = a * x + a * _SELU_SATURATION  # kept value minus dropped value
    else:
        dropped = None
        gain = x / (1 - p)
    out = _broadcast_mul(keep, gain, copies)
    return out if dropped is None else out.add_(dropped)


def _broadcast_mul(keep: torch.Tensor, gain: torch.Tensor, copies: int) -> torch.Tensor:
    """keep [S·B, ...] (or a channel mask) times gain [B, ...] replicated S times."""
    batch = gain.shape[0]
    full = (copies, batch, *gain.shape[1:])
    in_place = not (gain.requires_grad and torch.is_grad_enabled())
    if in_place and keep.shape == torch.Size((copies * batch, *gain.shape[1:])):
        # The mask already has the output's size: multiply in place, no extra tensor.
        return keep.view(full).mul_(gain).view(copies * batch, *gain.shape[1:])
    return (keep.view(copies, batch, *keep.shape[1:]) * gain).view(copies * batch,
                                                                    *gain.shape[1:])


class FastPathUnavailable(RuntimeError):
    """The network does not keep samples apart along the batch axis after dropout."""


class DropoutSampler:
    """Forward hooks that sample dropout modules while the network stays in eval mode.

    In eval mode a dropout module returns its input; the hook replaces that output with
    :func:`sample_dropout` using a per-module generator, so the masks a module draws do
    not depend on the order in which modules run. With ``copies`` = S > 1, the first
    dropout that runs replicates its input S times (its input must have ``rows`` rows);
    every later dropout must then see S·rows rows, otherwise the samples would share
    masks and :class:`FastPathUnavailable` is raised.

    Args:
        modules: the dropout modules to sample.
        generators: one generator per module, on the model's device.
    """

    def __init__(self, modules: Sequence[nn.Module], generators: Sequence[torch.Generator]):
        self.generators = {id(m): g for m, g in zip(modules, generators, strict=True)}
        self.modules = list(modules)
        self.copies = 1
        self.rows = 0
        self.calls = 0

    def arm(self, copies: int, rows: int) -> None:
        """Prepare the next forward: replicate ``rows`` rows ``copies`` times."""
        self.copies, self.rows, self.calls = copies, rows, 0

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        copies = 1
        if self.copies > 1:
            expected = self.rows if self.calls == 0 else self.copies * self.rows
            if x.shape[0] != expected:
                raise FastPathUnavailable(
                    f"a dropout input has {x.shape[0]} rows where {expected} were expected")
            copies = self.copies if self.calls == 0 else 1
        self.calls += 1
        return sample_dropout(x, module, copies=copies, generator=self.generators[id(module)])

    @contextlib.contextmanager
    def attached(self) -> Iterator[DropoutSampler]:
        """Register the hooks for the body; they are removed also when it raises."""
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
