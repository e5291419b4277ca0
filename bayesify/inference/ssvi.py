"""``"ssvi"``: sparse subspace variational inference (Li et al., ICLR 2024).

The network's Linear/Conv2d layers become mean-field Gaussian layers of which only a
fixed number per layer are active from the first step to the last (``density`` of
each layer's weights; the first layer stays dense by default, as in the official
code). Inactive weights are exactly zero in the parameters and in the optimizer state.
Training minimizes the same negative ELBO as ``"vi"`` (KL over the active weights),
and every ``update_interval`` steps until ``update_end`` of training each sparse layer

1. removes the fraction zeta_t = removal_rate/2 (1 + cos(pi t / T_end)) of its active
   weights with the lowest removal score (default: the SNR of |theta|, from the
   folded-normal moments; alternatives |mu|, |mu|/sigma, E|theta|),
2. adds as many inactive weights with the largest |dL/dmu| of the dense gradient on
   that step's batch (that step takes no optimizer step, as in the official code),
3. starts the added weights at mu = 0, rho = the mean rho of the layer's remaining
   weights, with zero optimizer state.

Defaults follow the official code (github.com/ljb121002/SSVI): density 0.1, the first
layer dense, updates every 100 steps until 75% of training with removal rate 0.3, KL
weight 0.01/N (``temperature=0.01``) warmed up linearly over the first half, sigma
starting at 6e-4 (the official code draws |N(6e-4, 5e-4^2)|; here every sigma starts
at ``init_std``), SGD with momentum 0.9 and a cosine learning rate. The official
script also decays the means by 5e-4 and gives rho its own learning rate 0.01: pass
``weight_decay=5e-4`` to ``fit`` and ``rho_lr=`` to match. Deviations, all options:

* the prior is N(0, 1) rather than N(0, 0.005^2), whose pull is harmless in the
  paper's BatchNorm ResNets (scale invariant) but shrinks the weights of a network
  without normalization to nothing (``prior_std=0.005`` gives the paper's value);
* means start at the wrapped layer's weights instead of N(0, 0.01^2), so a pretrained
  network keeps what it knows (``initial_mask="magnitude"`` keeps its largest weights);
* the means kept by a random initial mask are scaled by 1/sqrt(density)
  (``rescale_init``), without which a network without normalization layers starts
  with a vanishing signal and may not train.

The subspace update runs inside ``fit`` (its schedule comes from ``self.fit_plan``); a
hand-written loop around ``loss`` trains a fixed subspace unless it calls
:meth:`SSVIModel.update_subspace` itself, and ``finish_fit()`` after it makes the model
predict. BatchNorm follows ``"vi"``'s policy: trained as usual in ``fit``, eval mode with
its running statistics at prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._batching import num_rows
from bayesify._validation import (
    check_choice,
    check_fraction,
    check_positive_int,
)
from bayesify.core import register_method
from bayesify.errors import InputError
from bayesify.fitting import NonFiniteStep, check_finite_loss, gradient_norm
from bayesify.inference.ssvi_compact import SparsityReport, compact_state, expand_state
from bayesify.inference.ssvi_update import (
    REMOVAL_SCORES,
    removal_fraction,
    removal_scores,
    select_subspace,
)
from bayesify.inference.vi import VIModel
from bayesify.layers.bayesian import MeanFieldLayer, inverse_softplus

__all__ = ["SSVIModel"]

INITIAL_MASKS = ("random", "magnitude")


@register_method("ssvi")
class SSVIModel(VIModel):
    """Sparse mean-field VI with a fixed-size, periodically updated active subspace.

    Args:
        model, task: as for ``"vi"``.
        density: fraction of each sparse layer's weights that are active, in (0, 1].
        update_interval: steps between subspace updates (Delta T).
        update_end: fraction of training after which the subspace stays fixed.
        removal_rate: the fraction removed at the first update, annealed to 0 by a cosine.
        removal_score: ``"snr"``, ``"abs_mean"``, ``"mean_over_std"`` or
            ``"expected_abs"`` (see :func:`~bayesify.inference.ssvi_update.removal_scores`).
        dense_layers: mean-field layers kept fully active: ``"first"`` (the default, as
            in the official code), a sequence of layer names, or ``()``.
        initial_mask: ``"random"`` (the paper) or ``"magnitude"`` (the largest |mu|).
        rescale_init: scale the means kept by a random initial mask by
            1/sqrt(density), so every layer's pre-activations keep their variance. A
            network without normalization layers otherwise starts with its signal
            shrunk by sqrt(density) per sparse layer and may not train at all (the
            paper's BatchNorm ResNets undo the shrinkage themselves).
        seed: seeds the random initial mask.
        prior_std, init_std, kl_weight, temperature, kl_warmup, keep_deterministic,
        include, exclude, sgd_momentum, cosine_lr, rho_lr, noise, num_outputs, noise_param,
        beta, n_data:
            as for ``"vi"``, with SSVI's defaults.
    """

    default_epochs = 100
    default_lr = 0.05

    def __init__(self, model: nn.Module, task: str, *, density: float = 0.1,
                 update_interval: int = 100, update_end: float = 0.75,
                 removal_rate: float = 0.3, removal_score: str = "snr",
                 dense_layers: str | Sequence[str] = "first", initial_mask: str = "random",
                 rescale_init: bool = True, seed: int | None = None,
                 prior_std: float = 1.0, init_std: float = 6e-4,
                 kl_weight: float | None = None, temperature: float = 0.01,
                 kl_warmup: float = 0.5, keep_deterministic: str | Sequence[str] = (),
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 sgd_momentum: float | None = 0.9, cosine_lr: bool = True,
                 rho_lr: float | None = None, noise: Any = "homoscedastic",
                 num_outputs: int | None = None, noise_param: str | None = None,
                 beta: float = 0.0, n_data: int | None = None):
        self.density = check_fraction(density, "density", high_inclusive=True)
        self.update_interval = check_positive_int(update_interval, "update_interval")
        self.update_end = check_fraction(update_end, "update_end", low_inclusive=True,
                                         high_inclusive=True)
        self.removal_rate = check_fraction(removal_rate, "removal_rate", low_inclusive=True,
                                           high_inclusive=True)
        self.removal_score = check_choice(removal_score, "removal_score", REMOVAL_SCORES)
        check_choice(initial_mask, "initial_mask", INITIAL_MASKS)
        super().__init__(model, task, prior_std=prior_std, init_std=init_std,
                         kl_weight=kl_weight, temperature=temperature, kl_warmup=kl_warmup,
                         keep_deterministic=keep_deterministic, include=include,
                         exclude=exclude, sgd_momentum=sgd_momentum,
                         cosine_lr=cosine_lr, rho_lr=rho_lr, noise=noise,
                         num_outputs=num_outputs, noise_param=noise_param, beta=beta,
                         n_data=n_data)
        dense = self._resolve_dense_layers(dense_layers)
        self._sparse = {n: m for n, m in self._layers.items() if n not in dense}
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(check_positive_int(seed, "seed",
                                                                         minimum=0))
        for layer in self._sparse.values():
            layer.set_mask(_initial_mask(layer, self.density, initial_mask, generator))
            if rescale_init and initial_mask == "random":
                with torch.no_grad():
                    layer.weight_mu.mul_((layer.num_weights / layer.num_active) ** 0.5)
        #: (step, removal fraction, weights swapped) of every subspace update of the
        #: last ``fit``.
        self.update_log: list[tuple[int, float, int]] = []

    def _resolve_dense_layers(self, dense_layers: str | Sequence[str]) -> set[str]:
        names = [dense_layers] if isinstance(dense_layers, str) else list(dense_layers)
        resolved = set()
        for name in names:
            if name == "first":
                resolved.add(next(iter(self._layers)))
            elif name not in self._layers:
                known = ", ".join(map(repr, self._layers))
                raise InputError(f"`dense_layers` names {name!r}, which is not a Bayesian "
                                 f"layer of the model; those are {known}")
            else:
                resolved.add(name)
        return resolved

    @property
    def sparse_layers(self) -> dict[str, MeanFieldLayer]:
        """The layers whose active set is sparse and updated, by name."""
        return dict(self._sparse)

    # ------------------------------------------------------------------ training

    def _is_update_step(self) -> bool:
        t = self._step + 1  # counted after the step, as the official scheduler does
        end = int(self.update_end * self._total_steps)
        return t % self.update_interval == 0 and t < end and bool(self._sparse)

    def _update(self, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, int]:
        """An optimizer step (inactive weights stay zero), or, on an update step, the
        subspace update in its place. Returns the detached loss and the extra FLOPs."""
        if not self._is_update_step():
            loss, extra = super()._update(x, y, optimizer)
            for layer in self._sparse.values():
                layer.apply_mask()
            return loss, extra
        loss = self._dense_gradient(x, y, optimizer)
        end = int(self.update_end * self._total_steps)
        fraction = removal_fraction(self._step + 1, end, self.removal_rate)
        swapped = self.update_subspace(fraction, optimizer)
        self.update_log.append((self._step + 1, fraction, swapped))
        optimizer.zero_grad(set_to_none=True)
        # The dense weight gradient costs one dense product per layer on top of the
        # sparse backward.
        extra = sum(2 * (m.num_weights - m.num_active) * m.output_positions
                    for m in self._sparse.values()) * num_rows(x)
        return loss, extra

    def _dense_gradient(self, x: torch.Tensor, y: torch.Tensor,
                        optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward pass on a batch recording every sparse layer's dense weight
        gradient (no optimizer step, as in the official code); returns the detached loss.

        Raises:
            NonFiniteStep: the loss, the gradient norm or a dense gradient is not
                finite (the loop's divergence guard); no gradient is kept.
        """
        optimizer.zero_grad(set_to_none=True)
        for layer in self._sparse.values():
            layer.record_dense_grad = True
        try:
            loss = self.training_loss(x, y)
            check_finite_loss(loss)
            loss.backward()
            gradient_norm(self.parameters(), None)
            for name, layer in self._sparse.items():
                grad = layer.dense_grad
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    raise NonFiniteStep(f"dense gradient of layer {name!r}",
                                        float(grad[~torch.isfinite(grad)][0]))
        except NonFiniteStep:
            optimizer.zero_grad(set_to_none=True)
            for layer in self._sparse.values():
                layer.dense_grad = None
            raise
        finally:
            for layer in self._sparse.values():
                layer.record_dense_grad = False
        return loss.detach()

    def on_fit_start(self, batches: Any) -> None:
        super().on_fit_start(batches)
        self.update_log = []

    def on_fit_end(self) -> None:
        super().on_fit_end()
        # An optimizer of the user's own loop (weight decay, say) must not revive
        # inactive weights.
        for layer in self._sparse.values():
            layer.apply_mask()

    @torch.no_grad()
    def update_subspace(self, fraction: float,
                        optimizer: torch.optim.Optimizer | None = None) -> int:
        """Remove-then-add ``fraction`` of every sparse layer's active weights.

        Uses the dense gradients the layers recorded in the last backward pass (run
        it with ``layer.record_dense_grad = True``). Added weights start at mu = 0 and
        rho = the mean rho of the weights that stayed; the optimizer's state of every
        weight that did not stay is zeroed.

        Returns:
            The number of weights added over all layers.
        """
        fraction = check_fraction(fraction, "fraction", low_inclusive=True,
                                  high_inclusive=True)
        added_total = 0
        for name, layer in self._sparse.items():
            if layer.dense_grad is None:
                raise InputError(f"layer {name!r} has no recorded dense gradient; run a "
                                 "backward pass with record_dense_grad=True first")
            tiny = torch.finfo(layer.weight_rho.dtype).tiny
            sigma = F.softplus(layer.weight_rho).clamp_min(tiny)
            score = removal_scores(layer.weight_mu, sigma, self.removal_score)
            new = select_subspace(layer.mask, score, layer.dense_grad.abs(),
                                  int(layer.num_active * fraction))
            added_total += _swap_in(layer, new, optimizer, self.init_std)
            layer.dense_grad = None
        return added_total

    # ------------------------------------------------------------ sparse outputs

    def sparsity_report(self, x: Any = None) -> SparsityReport:
        """Active parameters per layer and forward FLOPs, sparse versus dense.

        Args:
            x: an example input [B, ...], needed only when the model has not seen an
                input yet (convolutions need their output size).
        """
        rows = self.layer_counts(x)
        return SparsityReport(rows, training_flops=self.training_flops)

    def export_compact(self) -> dict[str, Any]:
        """The fitted state with only the active weights of the sparse layers stored.

        Returns a dict of tensors (loadable with ``torch.load(weights_only=True)``);
        each sparse layer keeps flat indices and the values of ``weight_mu`` and
        ``weight_rho`` at them. :meth:`load_compact` rebuilds the model.
        """
        self._check_fitted("export_compact")
        prefixes = [f"model.{name}." if name else "model." for name in self._sparse]
        return compact_state(self.state_dict(), prefixes, method=self.method_name)

    def load_compact(self, compact: dict[str, Any]) -> SSVIModel:
        """Load a state written by :meth:`export_compact` into this same-structure model.

        Keys and shapes are checked first: a compact state of another structure raises
        :class:`~bayesify.errors.InputError` and leaves the model as it was.
        """
        state = expand_state(compact, method=self.method_name)
        current = self.state_dict()
        wrong = sorted(set(state) ^ set(current)) + sorted(
            k for k in set(state) & set(current)
            if isinstance(current[k], torch.Tensor) and state[k].shape != current[k].shape)
        if wrong:
            raise InputError("`compact` does not fit this model (other layers or sizes): "
                             f"it differs at {', '.join(map(repr, wrong[:5]))}"
                             + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
        self.load_state_dict(state)
        return self


def _initial_mask(layer: MeanFieldLayer, density: float, kind: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    n = layer.num_weights
    active = max(1, round(density * n))
    if kind == "magnitude":
        order = torch.topk(layer.weight_mu.detach().abs().reshape(-1), active).indices
    else:
        order = torch.randperm(n, generator=generator)[:active].to(layer.mask.device)
    flat = torch.zeros(n, dtype=torch.bool, device=layer.mask.device)
    flat[order] = True
    return flat.reshape(layer.mask.shape)


def _swap_in(layer: MeanFieldLayer, new: torch.Tensor,
             optimizer: torch.optim.Optimizer | None, init_std: float) -> int:
    """Install mask ``new`` in ``layer``: reset added weights and masked optimizer state."""
    stay = new & layer.mask
    added = new & ~layer.mask
    if bool(stay.any()):
        rho = layer.weight_rho[stay].mean()
    else:
        rho = inverse_softplus(torch.tensor(init_std, dtype=layer.weight_rho.dtype,
                                            device=layer.weight_rho.device))
    layer.mask.copy_(new)
    layer.weight_mu.mul_(stay)
    layer.weight_rho.mul_(stay)
    layer.weight_rho[added] = rho
    if optimizer is not None:
        for param in (layer.weight_mu, layer.weight_rho):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(stay)
    return int(added.sum())
