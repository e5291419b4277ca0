"""MC dropout (Gal & Ghahramani, ICML 2016): keep dropout on at prediction time.

A network trained with dropout (and L2) is an approximate variational posterior; its
predictive averages S stochastic forward passes: the softmax for classification, a
mixture of S Gaussians for regression (aleatoric noise from
:class:`~bayesify.likelihoods.GaussianNoise`). Everything but dropout stays in eval mode
while sampling, so BatchNorm uses, and never updates, its running statistics.

One dropout sample is one network: its mask is drawn once per sample and unit (per
channel for Dropout1d/2d/3d) and shared by every input of the batch, which is the
paper's view of dropout as dropping weight columns. Each input's predictive is the same
as with a fresh mask per input (its marginal over masks does not change), the sampler
draws N times fewer random numbers (they dominated the cost), and the S outputs for a
batch are joint draws from S coherent networks, as Bayesian optimisation over q points
needs. Only the correlation between inputs changes: within a sample they see one net.
Dim 0 of a dropout's input is read as the batch axis (a sequence-first layout would
share each mask over time steps instead).

Sampling is batched. Each dropout module samples through a forward hook with masks from
its own generator (:class:`~bayesify.layers.dropout.DropoutSampler`); the first dropout
that runs replicates its input S times along the batch axis, so everything before it
(the deterministic prefix) runs once per chunk of samples and the stochastic rest runs
on all samples of the chunk in one call. When the model is an ``nn.Sequential`` (nested
ones included), the prefix is cut off and runs exactly once, and a first dropout
followed by an ``nn.Linear`` (or inserted on a Linear's input) is folded into that
layer: the S masked weight matrices are stacked and applied in one GEMM on the
unreplicated prefix output, when they are no larger than the replicated input would be
(out_features <= N). Chunks hold at most ``max_batch_rows`` rows (samples × inputs),
except a folded last layer, whose outputs [S·N, C] are the result: it runs in one call.
This needs the network to keep rows apart after the first dropout (row-wise layers, as
in an MLP or CNN head). When a replicated tensor meets an unreplicated one (a skip
connection from before the dropout, a second dropout on a branch that bypasses the
first, a transformer's attention mask), the shape checks fail and the whole network
runs once per chunk on its inputs tiled S times (every tensor of a mapping such as
``input_ids`` and ``attention_mask``); only when that fails too does prediction fall
back to one full forward pass per sample, with a
:class:`~bayesify.errors.BayesifyWarning`. The path that worked is kept for the next
calls. All paths draw the same masks from the same seed.

On a GPU, sampling waits for the device once per call (the per-module seeds are drawn
from the caller's generator); chunks, masks and the fold are queued without reading
anything back. Mixed precision: under ``torch.autocast`` (or with bf16/fp16 weights)
the network runs in the low precision, a dropout feeding a float32 Linear is still
folded (the masked weights are cast as autocast casts the weight), and the posterior's
samples are upcast to float32 before the predictive averages them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bayesify._batching import num_rows
from bayesify._network import reduce_output
from bayesify._validation import check_fraction, check_positive_int
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import BayesifyWarning, InputError
from bayesify.inference._sampled import sampled_posterior, user_stacklevel
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.layers.dropout import (
    DropoutSampler,
    FastPathUnavailable,
    find_dropout,
    find_functional_dropout,
    insert_dropout,
    inserted_dropout,
    masked_linear_samples,
)
from bayesify.posterior import SampledPosterior

__all__ = ["MCDropoutModel"]

_MODES = ("split", "tiled", "loop")


def _flatten_sequential(module: nn.Module) -> list[nn.Module]:
    """The chain of modules a plain ``nn.Sequential`` (nested ones too) runs in order."""
    plain = (isinstance(module, nn.Sequential)
             and type(module).forward is nn.Sequential.forward
             and not module._forward_hooks and not module._forward_pre_hooks)
    if not plain:
        return [module]
    return [leaf for child in module for leaf in _flatten_sequential(child)]


def split_at_first_dropout(model: nn.Module, dropout: Sequence[nn.Module]
                           ) -> tuple[list[nn.Module], list[nn.Module]]:
    """Split a Sequential into a dropout-free prefix and the rest.

    Returns:
        ``(prefix, suffix)``: module chains whose composition is ``model``; the prefix
        holds no sampled dropout. For a model that is not a plain Sequential the prefix
        is empty and the suffix is ``[model]``.
    """
    ids = {id(m) for m in dropout}
    chain = _flatten_sequential(model)
    for k, module in enumerate(chain):
        if any(id(m) in ids for m in module.modules()):
            return chain[:k], chain[k:]
    return [], [model]


def _run(chain: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in chain:
        x = module(x)
    return x


def _runs_plainly(module: nn.Module) -> bool:
    return not module._forward_hooks and not module._forward_pre_hooks


def foldable_dropout(suffix: Sequence[nn.Module], hidden: torch.Tensor
                     ) -> tuple[nn.Module, nn.Linear, list[nn.Module]] | None:
    """The suffix's leading dropout and the Linear it feeds, when they can be folded.

    Folding applies the masks to the Linear's weight instead of its input (see
    :func:`~bayesify.layers.dropout.masked_linear_samples`); it needs an element-wise
    ``nn.Dropout`` on a 2-D input, right before a Linear that runs as ``nn.Linear`` does
    (no hooks, no overridden forward). It pays when the S stacked weights [S·out, in]
    are no larger than the S replicated inputs [S·N, in].

    Returns:
        ``(dropout, linear, rest)`` with ``rest`` the modules after the Linear, or None.
    """
    if hidden.dim() != 2 or not suffix:
        return None
    first = suffix[0]
    if isinstance(first, nn.Dropout) and len(suffix) > 1:
        dropout, linear, rest = first, suffix[1], list(suffix[2:])
        if not (_runs_plainly(dropout) and isinstance(linear, nn.Linear)
                and _runs_plainly(linear)):
            return None
    elif isinstance(first, nn.Linear):
        # Inserted dropout: a child of the Linear, applied by bayesify's pre-hook.
        dropout, linear, rest = inserted_dropout(first), first, list(suffix[1:])
        if not (isinstance(dropout, nn.Dropout) and _runs_plainly(dropout)
                and not first._forward_hooks):
            return None
    else:
        return None
    if type(linear).forward is not nn.Linear.forward:
        return None
    if linear.out_features > hidden.shape[0] or not _same_compute_dtype(linear.weight, hidden):
        return None
    return dropout, linear, rest


def _same_compute_dtype(weight: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether a Linear with ``weight`` computes in ``hidden``'s dtype: the same dtype,
    or ``hidden`` in the dtype that ``torch.autocast`` casts both to."""
    if weight.dtype == hidden.dtype:
        return True
    kind = hidden.device.type
    return (torch.is_autocast_enabled(kind) and weight.dtype == torch.float32
            and hidden.dtype == torch.get_autocast_dtype(kind))


def _module_seeds(count: int, generator: torch.Generator | None) -> list[int]:
    """One seed per dropout module, drawn from ``generator`` (or torch's global RNG)."""
    device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (count,), generator=generator, device=device)
    return [int(s) for s in seeds.tolist()]


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


@register_method("mc_dropout")
class MCDropoutModel(NetworkLikelihoodMixin, BayesianModel):
    """Monte Carlo dropout over a network's own or inserted dropout.

    Args:
        model: a network outputting logits [N, C] (classification) or means [N, D]
            (regression; [N, 2D] with ``noise="heteroscedastic"``).
        task: ``"classification"`` or ``"regression"``.
        p: rate of inserted dropout in [0, 1) (default 0.1). Dropout is inserted when
            the model has no active dropout (any of ``nn.Dropout``, ``Dropout1d/2d/3d``,
            ``AlphaDropout``, ``FeatureAlphaDropout`` with p > 0), or when ``layers`` or
            ``before`` is given; otherwise the model's own dropout is sampled at its own
            rates and passing ``p`` alone is an error.
        layers: insert dropout on the input of the last ``layers`` ``nn.Linear`` modules
            (registration order; default 1).
        before: names of submodules (any type, e.g. ``"features.conv3"``) to insert
            dropout before, instead of ``layers``.
        noise_param, beta: how heteroscedastic outputs give the variance, and the
            beta-NLL weight (see :class:`~bayesify.likelihoods.GaussianNoise`).
        noise: regression noise: ``"homoscedastic"`` (learned, default),
            ``"heteroscedastic"`` (the network outputs means and raw scales) or a fixed
            standard deviation.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: unused (MC dropout's prior weight is the user's ``weight_decay``).
        fast_path: run the deterministic prefix once and the samples batched (see the
            module docstring); ``False`` always runs one forward pass per sample.
        max_batch_rows: at most this many rows (samples × inputs) per batched call.

    Inserted dropout hangs off its target module as ``<name>.bayesify_dropout`` and runs
    from a forward pre-hook, so parameter names and eval-mode outputs are unchanged. A
    classifier wraps as fitted (a pretrained network predicts right away; fine-tuning
    with the inserted dropout usually helps); a regressor needs ``fit`` to learn its
    noise unless ``noise`` is a number. Train with ``fit(..., weight_decay=...)``: L2 on
    the weights is the prior of the dropout posterior.

    A peft LoRA model with ``lora_dropout > 0`` has that dropout (``nn.Dropout`` on
    each adapter's input, in ``lora_dropout``) as its own, so it is sampled (with the
    base model's dropout, if any) and nothing is inserted; ``fit`` trains the adapters
    only (peft froze the base).

    ``default_num_samples`` is 64, a cost/accuracy compromise: the paper's UCI runs
    average 10,000 passes, which the Monte Carlo error rarely needs for classification.
    """

    default_num_samples = 64

    def __init__(self, model: nn.Module, task: str, *, p: float | None = None,
                 layers: int | None = None, before: str | Sequence[str] | None = None,
                 noise: Any = "homoscedastic", num_outputs: int | None = None,
                 noise_param: str | None = None, beta: float = 0.0,
                 n_data: int | None = None, fast_path: bool = True,
                 max_batch_rows: int = 32768):
        if model is None:
            raise InputError("`model` is None; MC dropout needs a network to sample")
        super().__init__(model, task, n_data=n_data)
        rate = 0.1 if p is None else check_fraction(p, "p", low_inclusive=True)
        count = 1 if layers is None else check_positive_int(layers, "layers")
        if layers is not None and before is not None:
            raise InputError("pass either `layers` (the last k nn.Linear) or `before` "
                             "(named submodules), not both")
        self.fast_path = bool(fast_path)
        self.max_batch_rows = check_positive_int(max_batch_rows, "max_batch_rows")
        # The likelihood is checked before the model is touched, so a failed wrap
        # leaves the user's network as it was.
        self._init_likelihood(noise, num_outputs, noise_param=noise_param, beta=beta)
        found = find_dropout(model)
        existing = [name for name, _ in found]
        insert = layers is not None or before is not None or not existing
        if p is not None and not insert:
            raise InputError(
                f"`p` sets the rate of inserted dropout, but the model already has dropout "
                f"({', '.join(existing[:4])}) and none is inserted; drop `p` to sample the "
                "model's own dropout, or also pass `layers=`/`before=` to insert more")
        functional = find_functional_dropout(model, [m for _, m in found])
        if functional and insert and p is None:
            rate = functional[0][1]   # timm applies drop_rate on the classifier's input
        #: Names of the modules that got inserted dropout on their input.
        self.inserted: list[str] = (insert_dropout(model, rate, layers=count, before=before)
                                    if insert else [])
        if functional:
            _warn_functional(functional, self.inserted, existing, rate, p is None)
        #: The batched path that worked last: "split", then "tiled", then "loop".
        self._fast_mode = "split"
        if task == "classification" or self.noise.kind == "fixed":
            self._mark_fitted()

    def forward(self, x: Any) -> torch.Tensor:
        return self._point(self.call_network(x))

    def loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        return self._nll(self.call_network(x), y)

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            with preserve_training_flags(self.model):
                self.model.eval()
                self._initialize_noise(batches)

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """Raw network outputs under S dropout samples, [S, N, K]."""
        outputs = self.sample_outputs(x, num_samples or self.default_num_samples, generator)
        return sampled_posterior(self, outputs)

    # -------------------------------------------------------------------- sampling

    def sample_outputs(self, x: Any, num_samples: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw network outputs under S dropout samples.

        Args:
            x: inputs [N, ...] on the model's device (a tensor, or a mapping or tuple of
                tensors, see :meth:`~bayesify.core.BayesianModel.call_network`).
            num_samples: S.
            generator: source of the masks (torch's global RNG when ``None``).

        Returns:
            [S, N, K]. Every module but dropout runs in eval mode; the training flags
            are restored afterwards, also when the forward raises.
        """
        dropout = [m for _, m in find_dropout(self.model)]
        seeds = _module_seeds(len(dropout), generator)
        with preserve_training_flags(self.model):
            self.model.eval()
            if not dropout:
                out = self.call_network(x)
                return out.unsqueeze(0).expand(num_samples, *out.shape)
            if not (self.fast_path and num_samples > 1):
                return self._sample_loop(x, num_samples, dropout, seeds)
            reasons = []
            for mode in _MODES[_MODES.index(self._fast_mode):-1]:
                try:
                    outputs = self._sample_batched(x, num_samples, dropout, seeds, mode)
                except Exception as exc:  # any failure: the next mode, the loop at last
                    reasons.append(f"{type(exc).__name__}: {exc}")
                    continue
                self._fast_mode = mode
                return outputs
            # The loop raises the model's own error if it has one; otherwise the batched
            # paths are off for this model from now on, and that is said once.
            outputs = self._sample_loop(x, num_samples, dropout, seeds)
            if self._fast_mode != "loop":
                self._fast_mode = "loop"
                warnings.warn(
                    f"MC dropout fell back to one forward pass per sample ({reasons[-1]}): "
                    "the batched paths need a network that keeps the rows of its batch "
                    "apart. Pass fast_path=False to skip the attempt",
                    BayesifyWarning, stacklevel=user_stacklevel())
            return outputs

    def _sample_loop(self, x: Any, num_samples: int, dropout: list[nn.Module],
                     seeds: list[int]) -> torch.Tensor:
        """The reference: one full forward pass per sample."""
        sampler = DropoutSampler(dropout, _generators(seeds, self.device))
        outputs = []
        with sampler.attached():
            for _ in range(num_samples):
                sampler.arm(1, num_rows(x))
                outputs.append(self.call_network(x))
                if sampler.calls == 0:
                    return _identical(outputs[0], num_samples)
        return torch.stack(outputs)

    def _sample_batched(self, x: Any, num_samples: int, dropout: list[nn.Module],
                        seeds: list[int], mode: str) -> torch.Tensor:
        """Chunks of samples in one call each: ``"split"`` runs the prefix once and
        replicates (or folds) at the first dropout; ``"tiled"`` runs the whole network on
        the inputs tiled once per sample of the chunk."""
        sampler = DropoutSampler(dropout, _generators(seeds, self.device))
        n = num_rows(x)
        prefix, suffix = split_at_first_dropout(self.model, dropout) if mode == "split" \
            else ([], [self.model])
        hidden = _run(prefix, x) if prefix else x  # the prefix holds no sampled dropout
        if prefix and (not isinstance(hidden, torch.Tensor) or hidden.dim() == 0):
            raise FastPathUnavailable("the part before the first dropout does not "
                                      "output a batched tensor")
        rows = hidden.shape[0] if prefix else n
        # Before the sampler hooks the dropout. Folded, a chunk's stacked weights
        # [copies·out, in] have no more rows than its outputs [copies·rows, out], as
        # out <= rows; with nothing after the Linear those outputs are the result
        # itself, and one chunk holds every sample.
        folded = foldable_dropout(suffix, hidden) if isinstance(hidden, torch.Tensor) \
            and mode == "split" else None
        per_chunk = max(1, self.max_batch_rows // max(1, rows))
        if folded is not None and not folded[2]:
            per_chunk = num_samples
        with sampler.attached():
            outputs = []
            for start in range(0, num_samples, per_chunk):
                copies = min(per_chunk, num_samples - start)
                sampler.arm(copies, rows, tiled=mode == "tiled")
                if folded is not None:
                    drop, linear, rest = folded
                    keep = sampler.take_first(drop, hidden.shape, hidden.dtype, hidden.device)
                    out = reduce_output(_run(rest, masked_linear_samples(
                        hidden, linear, keep, float(drop.p))), self.output)
                elif mode == "tiled":
                    out = self.call_network(_tile(x, copies))
                else:
                    out = reduce_output(_run(suffix, hidden), self.output) if prefix \
                        else self.call_network(x)
                if sampler.calls == 0:
                    return _identical(out, num_samples)
                got = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() else 0
                if got != copies * n:
                    raise FastPathUnavailable(f"the output has {got} rows where {copies} "
                                              f"samples x {n} inputs were expected")
                outputs.append(out.reshape(copies, n, *out.shape[1:]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _tile(x: Any, copies: int) -> Any:
    """Inputs repeated ``copies`` times along the batch axis, sample-major (row s·N + i
    is copy s of input i); every tensor of a mapping or tuple is tiled."""
    if isinstance(x, Mapping):
        return {k: _tile(v, copies) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_tile(v, copies) for v in x)
    if isinstance(x, torch.Tensor) and x.dim():
        return x.repeat(copies, *([1] * (x.dim() - 1)))
    return x


def _identical(output: torch.Tensor, num_samples: int) -> torch.Tensor:
    warnings.warn("none of the model's dropout modules ran in its forward pass, so all MC "
                  "dropout samples are identical", BayesifyWarning, stacklevel=user_stacklevel())
    return output.unsqueeze(0).expand(num_samples, *output.shape)


def _warn_functional(functional: list[tuple[str, float]], inserted: list[str],
                     existing: list[str], rate: float, default_rate: bool) -> None:
    """Say that a functional dropout rate (timm's ``drop_rate``) is not sampled, and what
    is sampled instead."""
    attr, value = functional[0]
    more = f" (and {', '.join(a for a, _ in functional[1:])})" if len(functional) > 1 else ""
    head = (f"model.{attr} = {value:g}{more} is applied with F.dropout inside the model's "
            "forward, which MC dropout cannot sample: it predicts in eval mode, where that "
            "dropout is off. ")
    if inserted:
        origin = f"the rate of `{attr}`" if default_rate else "the `p` you passed"
        what = (f"Inserted nn.Dropout(p={rate:g}) on the input of "
                f"{', '.join(map(repr, inserted))} instead, at {origin}. Set "
                f"model.{attr} = 0 so that fit trains with the inserted dropout alone, or "
                "pass p=/before= to choose the rate and the place")
    else:
        what = (f"Only the dropout modules ({', '.join(existing[:4])}) are sampled; set "
                f"model.{attr} = 0, or use an nn.Dropout module for that dropout")
    warnings.warn(head + what, BayesifyWarning, stacklevel=user_stacklevel())
