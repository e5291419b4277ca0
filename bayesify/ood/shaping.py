"""Logit-based OOD detectors that change what the network computes: ODIN, ReAct, ASH.

* :class:`ODIN` (Liang et al. 2018): temperature-scaled softmax after a small input
  perturbation that raises the top class's score.
* :class:`ReActEnergy` (Sun et al. 2021): clip the features at a percentile of the
  training activations, then score the energy of the resulting logits.
* :class:`ASH` (Djurisic et al. 2023): per input, prune all but the largest
  activations (and rescale or binarize them), then score the energy.

ReAct and ASH change the head's input (or ``layer``'s output) through a hook while the
model's own forward runs, so the logits are those the model computes from the shaped
features, for a plain network or a wrapped BayesianModel alike. Their energy is
-logsumexp(logits) at temperature 1; higher means more OOD. ASH was designed for
non-negative (post-ReLU) features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from bayesify._validation import check_choice, check_positive_float
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.ood.detectors import FeatureDetector
from bayesify.ood.features import FeatureExtractor, Shaping, percentile

__all__ = ["ASH", "ODIN", "ReActEnergy", "ash", "energy_from_logits"]

ASH_VARIANTS = ("p", "b", "s")


def energy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Free energy -logsumexp_c logits [N, C] -> [N] (higher means more OOD)."""
    if logits.dim() != 2:
        raise UnsupportedModelError(f"an energy score needs logits [N, C]; the model "
                                    f"returned shape {list(logits.shape)}")
    return -torch.logsumexp(logits, dim=-1)


def _check_percentile(value: Any, name: str) -> float:
    number = check_positive_float(value, name, allow_zero=True)
    if number >= 100:
        raise InputError(f"`{name}` must lie in [0, 100), got {value!r}")
    return number


class ODIN(FeatureDetector):
    """ODIN: -max softmax(f(x̃) / T) with x̃ = x - ε sign(∇ₓ CE(f(x) / T, ŷ)) [N].

    Args:
        temperature: the softmax temperature T (1000 in the paper).
        epsilon: the perturbation size ε in input units (0.0014 in the paper, for
            images in [0, 1]); 0 skips the gradient step.
        batch_size: inputs per forward pass.

    The defaults are the paper's; tuning T and ε on OOD data, as the paper does,
    overstates what it achieves on unseen OOD data. ``fit`` only binds the model
    (``train`` is not needed).
    """

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014, *,
                 batch_size: int = 1024):
        super().__init__(batch_size=batch_size)
        self.temperature = check_positive_float(temperature, "temperature")
        self.epsilon = check_positive_float(epsilon, "epsilon", allow_zero=True)

    def fit(self, model: Any, train: Any = None) -> ODIN:
        """Bind the model (an ``nn.Module`` or a BayesianModel); ``train`` is unused."""
        self._extractor = FeatureExtractor(model, batch_size=self.batch_size,
                                           features=False)
        return self

    def _perturb(self, extractor: FeatureExtractor, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise InputError("ODIN perturbs the inputs, which must be floating point; got "
                             f"dtype {x.dtype} (set epsilon=0 for temperature scaling only)")
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = extractor.outputs(x) / self.temperature
            if not logits.requires_grad:
                raise UnsupportedModelError(
                    "ODIN needs the model's output to be differentiable in its input; "
                    "set epsilon=0 for temperature scaling only")
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return (x - self.epsilon * grad.sign()).detach()

    def score(self, x: Any) -> torch.Tensor:
        """OOD scores of inputs x (tensor, array or DataLoader) -> [N]; higher is more OOD."""
        extractor = self._check_fitted()
        scores = []
        for xb in extractor.inputs(x):
            if self.epsilon > 0:
                xb = self._perturb(extractor, xb)
            with torch.no_grad():
                scores.append(self._score(None, extractor.outputs(xb)))
        return torch.cat(scores)

    def _score(self, features: torch.Tensor | None, outputs: torch.Tensor) -> torch.Tensor:
        """-max softmax(logits / T) [N] of the (perturbed) inputs' logits [N, C]."""
        if outputs.dim() != 2:
            raise UnsupportedModelError(f"ODIN needs logits [N, C]; the model "
                                        f"returned shape {list(outputs.shape)}")
        probs = torch.softmax(outputs.double() / self.temperature, dim=-1)
        return (-probs.max(dim=-1).values).to(outputs.dtype)


class ReActEnergy(FeatureDetector):
    """Energy after ReAct clipping: -logsumexp f(min(φ, c)) [N] (Sun et al. 2021).

    Args:
        percentile: c is this percentile (0-100) of all training activations (90 in
            the paper), computed as numpy's linearly interpolated percentile.
        threshold: use this c instead of a percentile.
        layer, head, batch_size: as for :class:`~bayesify.ood.FeatureDetector`.
    """

    def __init__(self, percentile: float = 90.0, threshold: float | None = None, *,
                 layer: str | None = None, head: str | None = None, batch_size: int = 1024):
        super().__init__(layer=layer, head=head, batch_size=batch_size)
        self.percentile = _check_percentile(percentile, "percentile")
        if threshold is not None and not math.isfinite(float(threshold)):
            raise InputError(f"`threshold` must be a finite number, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        energy_from_logits(outputs)  # the model must give logits [N, C]
        self.clip_ = (self.threshold if self.threshold is not None
                      else percentile(features, self.percentile))

    def _shaping(self) -> Shaping:
        clip = self.clip_
        return lambda phi: phi.clamp(max=clip)

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return energy_from_logits(outputs.double())


def ash(features: torch.Tensor, percentile: float = 90.0, variant: str = "s") -> torch.Tensor:
    """Activation shaping of each input's features [B, ...] (same shape out).

    Keeps the k = n - round(n p / 100) largest of each input's n activations (at least
    one) and zeroes the rest; ``"p"`` stops there, ``"b"`` sets the kept ones to
    s1 / k, ``"s"`` multiplies them by exp(s1 / s2), with s1 and s2 the sums before
    and after pruning.
    """
    flat = features.reshape(features.shape[0], -1)
    n = flat.shape[1]
    k = max(1, n - int(round(n * percentile / 100.0)))
    values, index = torch.topk(flat, k, dim=1)
    total = flat.sum(dim=1, keepdim=True)
    if variant == "b":
        values = (total / k).expand_as(values)
    elif variant == "s":
        kept = values.sum(dim=1, keepdim=True)
        ratio = torch.where(kept != 0, total / torch.where(kept != 0, kept, 1), 0)
        values = values * torch.exp(ratio)
    pruned = torch.zeros_like(flat).scatter_(1, index, values)
    return pruned.reshape(features.shape)


class ASH(FeatureDetector):
    """Energy after activation shaping (ASH-P, -B or -S; Djurisic et al. 2023) [N].

    Args:
        percentile: the share of each input's activations pruned, in [0, 100) (90 by
            default).
        variant: ``"s"`` (scale, default), ``"b"`` (binarize) or ``"p"`` (prune).
        layer, head, batch_size: as for :class:`~bayesify.ood.FeatureDetector`.

    ``fit`` binds the model and, given ``train``, checks that its features can be read
    and its outputs are logits; ASH itself has no statistics.
    """

    def __init__(self, percentile: float = 90.0, variant: str = "s", *,
                 layer: str | None = None, head: str | None = None, batch_size: int = 1024):
        super().__init__(layer=layer, head=head, batch_size=batch_size)
        self.percentile = _check_percentile(percentile, "percentile")
        self.variant = check_choice(variant, "variant", ASH_VARIANTS)

    def fit(self, model: Any, train: Any = None) -> ASH:
        """Bind the model (an ``nn.Module`` or a BayesianModel); ``train`` is optional."""
        if train is not None:
            return super().fit(model, train)
        self._extractor = FeatureExtractor(model, layer=self.layer, head=self.head,
                                           batch_size=self.batch_size)
        return self

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        energy_from_logits(outputs)  # the model must give logits [N, C]

    def _shaping(self) -> Shaping:
        p, variant = self.percentile, self.variant
        return lambda phi: ash(phi, p, variant)

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return energy_from_logits(outputs.double())
