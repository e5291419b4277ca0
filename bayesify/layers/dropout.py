"""Dropout helpers for MC dropout: finding, inserting and sampling dropout layers.

Sampling happens outside torch's own dropout: :func:`sample_dropout` reproduces the
train-mode behaviour of every ``nn`` dropout type with masks drawn from an explicit
``torch.Generator``, one mask per sample shared over the batch rows (a sample is one
thinned network), and can replicate its input S times along the batch axis first, so a
network's deterministic prefix runs once while the rest sees S dropout samples in one
batched call; :func:`masked_linear_samples` folds the masks of a dropout followed by a
Linear into S stacked weights instead. :class:`DropoutSampler` applies the masks
through forward hooks while every module stays in eval mode (BatchNorm keeps using its
running statistics).
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
    "draw_keep",
    "find_dropout",
    "find_functional_dropout",
    "insert_dropout",
    "inserted_dropout",
    "masked_linear_samples",
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


#: Attributes holding a rate that timm-style models apply themselves with ``F.dropout``
#: in ``forward`` (``F.dropout(x, p=self.drop_rate, training=self.training)``).
FUNCTIONAL_RATE_ATTRS = ("drop_rate",)


def find_functional_dropout(model: nn.Module, sampled: Sequence[nn.Module] = ()
                            ) -> list[tuple[str, float]]:
    """Dropout rates stored as attributes and applied with ``F.dropout`` in ``forward``.

    MC dropout cannot sample these: it predicts in eval mode, where such dropout is off.
    A rate that a dropout module in ``sampled`` already has is left out (the model holds
    that dropout as a module too, as timm's ConvNeXt head does).

    Returns:
        ``(qualified attribute name, rate)`` pairs for rates in (0, 1), in registration
        order (the model's own attribute first).
    """
    known = {round(float(m.p), 12) for m in sampled}
    found = []
    for name, module in model.named_modules():
        for attr in FUNCTIONAL_RATE_ATTRS:
            value = vars(module).get(attr)
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and 0 < value < 1 and round(float(value), 12) not in known):
                found.append((f"{name}.{attr}" if name else attr, float(value)))
    return found


def _apply_inserted_dropout(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure) so deepcopy and pickling of the model keep
    # working: the hook reaches the dropout through the module it is called with.
    if not args:
        return None  # called with keyword inputs only: nothing positional to drop
    dropout = getattr(module, INSERTED_NAME)
    return (dropout(args[0]), *args[1:])


def inserted_dropout(module: nn.Module) -> nn.Module | None:
    """The dropout :func:`insert_dropout` put on ``module``'s input, when that is all
    that runs before it (bayesify's pre-hook is its only one); otherwise None."""
    hooks = list(module._forward_pre_hooks.values())
    return getattr(module, INSERTED_NAME, None) if hooks == [_apply_inserted_dropout] else None


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
    """Shape of the Bernoulli mask of one dropout sample on an input of ``shape``.

    One sample is one network (Gal & Ghahramani's dropped weight columns), so its mask
    is shared over the batch rows (dim 0): element-wise dropout masks every unit
    (``(1, *shape[1:])``), feature dropout masks whole channels (``(1, C, 1, ...)``).
    Dropout1d and Dropout3d accept an unbatched input ([C, L] and [C, D, H, W]), whose
    dim 0 is the channel; Dropout2d and FeatureAlphaDropout always read dims 0 and 1 as
    (batch, channel), as torch does. A 1-D input to element-wise dropout has no batch
    axis: every entry is a unit.
    """
    if isinstance(module, nn.Dropout | nn.AlphaDropout):
        return tuple(shape) if len(shape) < 2 else (1, *shape[1:])
    unbatched_ndim = {nn.Dropout1d: 2, nn.Dropout3d: 4}.get(type(module))
    if unbatched_ndim is not None and len(shape) == unbatched_ndim:
        return (shape[0],) + (1,) * (len(shape) - 1)
    if len(shape) < 2:
        raise InputError(f"{type(module).__name__} needs an input with a channel dim, got "
                         f"shape {list(shape)}")
    return (1, shape[1]) + (1,) * (len(shape) - 2)


def draw_keep(module: nn.Module, shape: torch.Size, samples: int,
              generator: torch.Generator | None, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """0/1 keep masks of ``samples`` dropout samples for one input of ``shape``.

    Returns:
        [S, *dropout_mask_shape(module, shape)] in ``dtype``. Masks come from float32
        uniforms for every dtype, so float32 and float64 models see the same masks from
        the same seed, and sample by sample, so S draws of one sample on one generator
        give the masks of one draw of S samples (on CPU, where torch's generator is
        sequential). Nothing is drawn for p >= 1 (every unit is dropped).
    """
    mask_shape = (samples, *dropout_mask_shape(module, shape))
    p = float(module.p)
    if p >= 1:
        return torch.zeros(mask_shape, dtype=dtype, device=device)
    keep = torch.rand(mask_shape, generator=generator, device=device, dtype=torch.float32)
    return keep.ge_(p).to(dtype)


def sample_dropout(x: torch.Tensor, module: nn.Module, *, copies: int = 1, groups: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Train-mode dropout ``module`` on x, one mask per sample shared over its rows.

    Args:
        x: the dropout's input [G·B, ...]: ``groups`` = G consecutive blocks of B rows,
            block g belonging to dropout sample g (G = 1: one sample).
        module: one of :data:`DROPOUT_TYPES` (its rate ``p`` and kind are used).
        copies: S; replicate x S times first, each copy a new sample (with G = 1).
        generator: source of the masks, on x's device.

    Returns:
        [S·G·B, ...], sample-major (rows s·B .. s·B + B - 1 are sample s). The masks are
        those of :func:`draw_keep` for S·G samples on one block [B, ...].
    """
    if x.shape[0] % groups:
        raise InputError(f"`x` has {x.shape[0]} rows, not a multiple of `groups` = {groups}")
    block = torch.Size((x.shape[0] // groups, *x.shape[1:]))
    samples = copies * groups
    p = float(module.p)
    if p >= 1:
        # torch multiplies by zero for p == 1 (alpha dropout included).
        return x.new_zeros((samples * block[0], *block[1:]))
    keep = draw_keep(module, block, samples, generator, x.dtype, x.device)
    if isinstance(module, _ALPHA_TYPES):
        a = 1.0 / ((_SELU_SATURATION ** 2 * p + 1) * (1 - p)) ** 0.5
        dropped = a * _SELU_SATURATION * (p - 1)
        gain = a * x + a * _SELU_SATURATION  # kept value minus dropped value
    else:
        dropped = None
        gain = x / (1 - p)
    out = keep.view(groups, copies, *keep.shape[1:]) * gain.view(groups, 1, *block)
    out = out.view(samples * block[0], *block[1:])
    return out if dropped is None else out.add_(dropped)


def masked_linear_samples(h: torch.Tensor, linear: nn.Linear, keep: torch.Tensor,
                          p: float) -> torch.Tensor:
    """``linear`` after inverted dropout on h, for S masks in one GEMM.

    Dropping input unit j of a sample is dropping column j of the weight, so all
    samples run as one product of h with the S masked weights stacked [S·out, in].

    Args:
        h: inputs [N, in].
        linear: the layer (weight [out, in], bias [out] or None).
        keep: 0/1 masks [S, 1, in] (from :func:`draw_keep`).
        p: the dropout rate.

    Returns:
        [S·N, out], sample-major, equal to ``linear(sample_dropout(h, ...))`` with the
        same masks up to rounding.
    """
    weight = linear.weight
    samples, out_features = keep.shape[0], weight.shape[0]
    scale = keep.view(samples, 1, -1) / (1 - p) if p < 1 else keep.view(samples, 1, -1)
    stacked = (weight.unsqueeze(0) * scale).reshape(samples * out_features, -1)
    bias = None if linear.bias is None else linear.bias.repeat(samples)
    out = nn.functional.linear(h, stacked, bias).view(h.shape[0], samples, out_features)
    return out.transpose(0, 1).reshape(samples * h.shape[0], out_features)


class FastPathUnavailable(RuntimeError):
    """The network does not keep samples apart along the batch axis after dropout."""


class DropoutSampler:
    """Forward hooks that sample dropout modules while the network stays in eval mode.

    In eval mode a dropout module returns its input; the hook replaces that output with
    :func:`sample_dropout` using a per-module generator, so the masks a module draws do
    not depend on the order in which modules run. With ``copies`` = S > 1, the first
    dropout that runs replicates its input S times (its input must have ``rows`` rows);
    every later dropout must then see S·rows rows (S blocks, one mask each), otherwise
    the samples would share masks and :class:`FastPathUnavailable` is raised. Armed
    ``tiled``, the inputs were tiled S times before the network ran, and the first
    dropout too must see S·rows rows.

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
        self.tiled = False

    def arm(self, copies: int, rows: int, *, tiled: bool = False) -> None:
        """Prepare the next forward: replicate ``rows`` rows ``copies`` times at the
        first dropout, or (``tiled``) expect inputs tiled ``copies`` times already, so
        that every dropout sees ``copies`` blocks of ``rows`` rows."""
        self.copies, self.rows, self.calls, self.tiled = copies, rows, 0, tiled

    def take_first(self, module: nn.Module, shape: torch.Size, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """Draw the first dropout's masks for all ``copies`` samples without running it.

        For a caller that applies the masks itself (a dropout folded into the next
        layer's weights); later dropouts then expect ``copies`` × ``rows`` rows.

        Returns:
            0/1 masks [copies, *dropout_mask_shape(module, shape)].
        """
        self.calls += 1
        return draw_keep(module, shape, self.copies, self.generators[id(module)], dtype, device)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        copies = groups = 1
        if self.copies > 1:
            first = self.calls == 0 and not self.tiled
            expected = self.rows if first else self.copies * self.rows
            if x.shape[0] != expected:
                raise FastPathUnavailable(
                    f"a dropout input has {x.shape[0]} rows where {expected} were expected")
            if first:
                copies = self.copies
            else:
                groups = self.copies
        self.calls += 1
        return sample_dropout(x, module, copies=copies, groups=groups,
                              generator=self.generators[id(module)])

    @contextlib.contextmanager
    def attached(self) -> Iterator[DropoutSampler]:
        """Register the hooks for the body; they are removed also when it raises."""
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
