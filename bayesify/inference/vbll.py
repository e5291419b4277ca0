"""The ``"vbll"`` method: a variational Bayesian last layer in place of a network's head.

``bayesify(model, "vbll", task=...)`` finds the model's final ``nn.Linear`` (or the module
named by ``head=``) and bypasses it with a VBLL head (:mod:`bayesify.layers`) whose mean
starts at the pretrained weights. What it does to the user's model, exactly:

* the model's modules and weights are left as they are; the head's input φ is read
  with a forward hook during each call, and the model's own output is checked, once,
  to be that head's output (a forward that does more after the head, such as a softmax
  or a reshape, raises :class:`UnsupportedModelError` naming ``head=``);
* the bypassed ``nn.Linear``'s parameters get ``requires_grad=False`` (they no longer
  affect anything), and so do the backbone's when ``freeze_backbone=True`` (the
  default), which also runs the backbone in eval mode (no dropout; BatchNorm uses its
  running statistics and never updates them). Pass ``copy_model=True`` to ``bayesify``
  to keep the original module untouched.

The posterior (``posterior(x)``) is Gaussian over the head's outputs:

* discriminative classification: logits N(W̄φ + b, diag(φᵀS_kφ + σ_k²)), mapped to
  class probabilities by Monte Carlo over the logits (``num_samples`` draws);
* generative classification: a point posterior over the class log densities, with the
  negative log feature density as score ``"density"`` (an OOD score);
* regression: the mean w̄ᵀφ + b with epistemic variance φᵀSφ (jointly over the points
  of a block: φ_iᵀ S φ_j, as Bayesian optimization needs); the learned noise σ² is the
  likelihood's.

With a frozen backbone, ``fit`` computes the features of the training set once (the
``training_batches`` hook) and trains the head on them (``training_loss``), so an
epoch costs a head pass. ``bm.loss(x, y)`` is the negative ELBO of a batch of inputs
for users' own loops (then ``bm.finish_fit()``); ``bm(x, y)`` returns the same, so a
``DistributedDataParallel`` wrapper, which synchronizes gradients only for calls
through its forward, trains it too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayesify._batching import TensorBatches, make_train_batches
from bayesify._memory import DEFAULT_MAX_MEMORY, check_memory, parse_memory
from bayesify._validation import (
    as_tensor,
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.core import BayesianModel, register_method
from bayesify.errors import InputError, NotPSDError, UnsupportedModelError
from bayesify.fitting import NonFiniteStep
from bayesify.inference._heads import find_head, run_to_head
from bayesify.layers.vbll_classification import VBLLDiscriminative, VBLLGenerative
from bayesify.layers.vbll_covariance import COVARIANCES
from bayesify.layers.vbll_regression import VBLLRegression
from bayesify.likelihoods import CategoricalLikelihood, GaussianLikelihood, regression_targets
from bayesify.posterior import GaussianPosterior

__all__ = ["VBLLModel"]

KINDS = ("discriminative", "generative")

# Rows per forward pass when caching the features of in-memory training data.
_CACHE_BATCH = 1024


#: The most entries the m dense d×d covariances may hold for "dense" to be the default.
DENSE_DEFAULT_LIMIT = 10**7
_CHEAPER = {
    "dense": "covariance='lowrank' (rank r: m·d·(r+1) entries) or 'diagonal' (m·d) fits",
    "lowrank": "a smaller `rank` or covariance='diagonal' fits",
    "diagonal": "a smaller head, or freeze_backbone with fewer classes, fits",
}
_logger = logging.getLogger("bayesify")


def _default_covariance(covariance: str | None, kind: str, m: int, d: int) -> str:
    """The user's choice (checked), or the size rule of the class docstring."""
    if covariance is not None:
        return check_choice(covariance, "covariance", COVARIANCES)
    if kind == "generative":
        return "diagonal"
    if m * d * d <= DENSE_DEFAULT_LIMIT:
        return "dense"
    _logger.warning(
        "vbll: a dense covariance for %d rows of dimension %d would hold %.1e entries "
        "(over %.0e), so the head uses covariance='diagonal'; pass covariance='lowrank' "
        "or 'dense' to choose", m, d, m * d * d, DENSE_DEFAULT_LIMIT)
    return "diagonal"


def _head_bytes(covariance: str, m: int, d: int, rank: int | None, itemsize: int) -> float:
    """Training-state bytes of a VBLL head: mean, covariance factors, noise, each with a
    gradient and AdamW's two moments (4 copies)."""
    factors = {"dense": d * d, "diagonal": d,
               "lowrank": d * (1 + (rank or min(d, 10)))}[covariance]
    return 4 * itemsize * m * (d + factors + 2)


@register_method("vbll")
class VBLLModel(BayesianModel):
    """A network whose final linear layer is a variational Bayesian last layer.

    Args:
        model: a network ending in an ``nn.Linear`` whose output is the model's output
            (logits [N, C], or regression means [N, D]).
        task: ``"classification"`` or ``"regression"``.
        kind: classification head, ``"discriminative"`` (default; starts at the
            pretrained weights) or ``"generative"`` (starts at the training features'
            class means; its predictive carries the ``"density"`` OOD score).
        head: name of the linear module to replace (default: the last ``nn.Linear``).
        freeze_backbone: train the head alone on cached features (default) or the head
            and the backbone jointly.
        covariance: ``"dense"``, ``"diagonal"`` or ``"lowrank"``. By default
            ``"dense"`` while the m dense d×d covariances hold at most 10⁷ entries
            (m·d² ≤ 10⁷: a 128-wide head with 100 classes), else ``"diagonal"`` (a
            ResNet-50 head, d = 2048 and m = 1000, would need 4·10⁹ entries, 16 GB in
            float32); ``"diagonal"`` for the generative head, as in the paper. The
            choice shows in ``repr`` and is logged once on the ``bayesify`` logger.
        rank: rank of the low-rank part (``"lowrank"`` only).
        prior_scale, wishart_scale, dof: the priors (paper defaults; wishart_scale is
            1e-2 for regression and 1 for classification when ``None``).
        num_samples: logit draws of the discriminative predictive (its likelihood's
            Monte Carlo size; ``predict(num_samples=)`` overrides it per call).
        scale_lr: learning-rate multiplier of the head's log-scale parameters in the
            default optimizer (see :meth:`configure_optimizer`).
        max_memory: refuse a head whose training state (parameters, gradients and
            AdamW's two moments) would exceed this many bytes (or "2GB"-style sizes),
            before allocating it, naming the cheaper covariance.
        n_data: N, the training-set size; the ELBO's regularization weight is 1/N.
            Inferred by ``fit``; needed up front only for users' own loops.

    ``fit`` defaults: AdamW at lr 1e-3 without weight decay on the head, gradient
    clipping at 1.0, 50 epochs over cached features (20 when training jointly).

    With little data the prior N(0, prior_scale/d) pulls a pretrained head's mean toward
    zero through the 1/N-weighted KL: on the embedded digits (N = 866) the mean logits
    shrink to about 0.4x, so in-distribution predictions turn under-confident (NLL
    0.11 vs 0.06 for the softmax; see benchmarks/vbll.py). ``prior_scale=10`` keeps
    the pretrained confidence (validation NLL 0.062 vs 0.058) while keeping most of
    the gain under distribution shift. The generative head's Wishart prior
    (ν = (dof + d + 1)/2) shrinks the feature noise hard at small N, which makes its
    class probabilities over-confident; prefer the discriminative head for post-hoc
    wrapping, and the generative head when its feature density is wanted.
    """

    default_epochs = 50
    default_lr = 1e-3
    default_batch_size = 128
    default_grad_clip = 1.0
    #: Epochs when the backbone trains with the head (each epoch runs the network).
    default_joint_epochs = 20
    supports_joint = True

    def __init__(self, model: nn.Module, task: str, *, kind: str = "discriminative",
                 head: str | None = None, freeze_backbone: bool = True,
                 covariance: str | None = None, rank: int | None = None,
                 prior_scale: float = 1.0, wishart_scale: float | None = None,
                 dof: float = 1.0, num_samples: int = 100, scale_lr: float = 10.0,
                 max_memory: int | float | str = DEFAULT_MAX_MEMORY,
                 n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; the vbll method needs a network to wrap")
        super().__init__(model, task, n_data=n_data)
        check_choice(kind, "kind", KINDS)
        if task == "regression" and kind != "discriminative":
            raise InputError(f"`kind`={kind!r} applies to classification; leave it out for "
                             "regression")
        self.kind = "regression" if task == "regression" else kind
        self.head_name, linear = find_head(model, head)
        self.freeze_backbone = bool(freeze_backbone)
        d, m = linear.in_features, linear.out_features
        covariance = _default_covariance(covariance, self.kind, m, d)
        if rank is not None:
            rank = check_positive_int(rank, "rank")
        check_memory(_head_bytes(covariance, m, d, rank, linear.weight.element_size()),
                     f"a {covariance} VBLL head ({m} rows of dimension {d})",
                     parse_memory(max_memory), _CHEAPER[covariance])
        self.covariance = covariance
        if wishart_scale is None:
            wishart_scale = 1e-2 if task == "regression" else 1.0
        factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        options = {"covariance": covariance, "rank": rank, "prior_scale": prior_scale,
                   "wishart_scale": wishart_scale, "dof": dof, **factory}
        if self.kind == "generative":
            self.vbll = VBLLGenerative(d, m, **options)
        else:
            bias = linear.bias is not None
            if self.kind == "regression":
                self.vbll = VBLLRegression(d, m, bias=bias, **options)
            else:
                self.vbll = VBLLDiscriminative(d, m, bias=bias, num_samples=num_samples,
                                               **options)
            with torch.no_grad():
                self.vbll.weight.copy_(linear.weight)
                if bias:
                    self.vbll.bias.copy_(linear.bias)
        if self.kind == "regression":
            self.likelihood = GaussianLikelihood(self._split_noise)
        elif self.kind == "discriminative":
            self.likelihood = CategoricalLikelihood(num_samples=self.vbll.num_samples)
        linear.requires_grad_(False)
        if self.freeze_backbone:
            model.requires_grad_(False)
        self.scale_lr = check_positive_float(scale_lr, "scale_lr")
        self._verified = False

    # ---------------------------------------------------------------- features

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input φ [B, d] for inputs x [B, ...] (differentiable in x)."""
        seen = run_to_head(self.model, self.head_name, x, frozen=self.freeze_backbone,
                           output=self.output)
        if not self._verified:
            if not seen.output_is_head_output:
                raise UnsupportedModelError(
                    f"the model's output is not the output of its head {self.head_name!r}: "
                    "its forward does more after that layer (an activation, a reshape, "
                    "another layer). VBLL replaces the final linear layer, so pass `head=` "
                    "naming the nn.Linear whose output is the model's output, or wrap a "
                    "model that ends in it")
            self._verified = True
        return seen.features

    def _training_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch of training inputs, recording the inputs' rank."""
        return self._features(x)

    def _set_regularization(self) -> None:
        if self.n_data is None:
            raise InputError("`n_data` is unknown: pass n_data=N (the training-set size) "
                             "to bayesify(..., n_data=N) before calling .loss in your own "
                             "loop, or train with .fit")
        self.vbll.regularization_weight = 1.0 / self.n_data

    def _split_noise(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression likelihood's split: means [..., N, m] and the learned noise
        variance σ² broadcast to them."""
        return raw, self.vbll.noise_variance().to(raw.dtype).expand_as(raw)

    # ---------------------------------------------------------------- contract

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Point prediction (mean logits, class log densities or regression mean);
        with ``y``, the loss of the batch (so DDP wrappers can train through forward)."""
        if y is not None:
            return self.loss(x, y)
        out = self.vbll(self._features(x))
        return out[:, 0] if self.kind == "regression" and out.shape[1] == 1 else out

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of one batch: inputs x [B, ...], labels [B] or targets
        [B] / [B, D]."""
        return self._head_loss(self._training_features(x), y)

    def _head_loss(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO from the head's features [B, d]."""
        self._set_regularization()
        y = as_tensor(y, "y", device=phi.device)
        if self.kind == "regression":
            y = y.to(phi.dtype)
        return self.vbll.loss(phi, y)

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None,
                   blocks: tuple[int, int] | None = None) -> GaussianPosterior:
        """Gaussian over the head's outputs at x [N, ...] (mean [N, m]), or with
        ``blocks=(b, q)`` over b blocks of q points (mean [b, q, m]; regression
        covariance joint within each block, [b, m, q, q])."""
        phi = self._features(x)
        shape = (-1, self.vbll.out_features) if blocks is None else (*blocks, -1)
        if self.kind == "generative":
            logits = self.vbll(phi)  # log N(φ | μ̄_k, Σ + S_k)
            log_density = torch.logsumexp(logits, dim=-1) - math.log(self.vbll.out_features)
            return GaussianPosterior(logits.reshape(shape),
                                     scores={"density": -log_density.reshape(shape[:-1])})
        if self.kind == "discriminative":
            mean, variance = self.vbll.logit_moments(phi)
            return GaussianPosterior(mean.reshape(shape), variance.reshape(shape),
                                     kind="diagonal")
        mean, epistemic, _ = self.vbll.moments(phi)
        if blocks is None:
            return GaussianPosterior(mean, epistemic, kind="diagonal")
        joint = self.vbll.cov.joint(phi.reshape(*blocks, -1))  # [b, m, q, q]
        return GaussianPosterior(mean.reshape(shape), joint, kind="joint")

    # ---------------------------------------------------------------- training

    def fit_defaults(self) -> dict[str, Any]:
        """The VBLL recipe: AdamW lr 1e-3, clipping at 1.0, 50 epochs on cached
        features or 20 when the backbone trains too."""
        defaults = super().fit_defaults()
        if not self.freeze_backbone:
            defaults["epochs"] = self.default_joint_epochs
        return defaults

    def training_batches(self, train: Any, *, batch_size: int,
                         generator: torch.Generator | None, shuffle: bool = True) -> Any:
        """Batches of inputs, or, with a frozen backbone, of the training set's
        features φ [B, d], computed once (a DataLoader's own batch size is kept)."""
        if not self.freeze_backbone:
            return super().training_batches(train, batch_size=batch_size,
                                             generator=generator, shuffle=shuffle)
        if isinstance(train, DataLoader) and train.batch_size:
            batch_size = train.batch_size
        features, targets = self._cache_features(train)
        return TensorBatches(features, targets, batch_size=batch_size, shuffle=shuffle,
                             generator=generator)

    @torch.no_grad()
    def _cache_features(self, train: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, d] and checked targets of the whole training set."""
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=_CACHE_BATCH,
                                     shuffle=False)
        features, targets = [], []
        for x, y in batches:
            features.append(self._training_features(x))
            targets.append(y)
        if not features:
            raise InputError("`train` is empty; pass at least one training example")
        targets = torch.cat(targets)
        if self.kind == "regression":
            regression_targets(targets, self.vbll.out_features)
        else:
            check_labels(targets, "y", self.vbll.out_features)
        return torch.cat(features), targets

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a batch from :meth:`training_batches` (features when frozen).

        A covariance that cannot be factorized mid-training (NaN or overflowing
        parameters after a too-large step) is reported as a diverged step."""
        try:
            if self.freeze_backbone:
                return self._head_loss(x, y)
            return self.loss(x, y)
        except NotPSDError as exc:
            raise NonFiniteStep("loss (the head's covariance could not be factorized)",
                                float("nan")) from exc

    def on_fit_start(self, batches: Any) -> None:
        """Set the 1/N weight; start a generative head at the class means and a
        regression head's noise at the pretrained head's residual RMS (first fit)."""
        self._set_regularization()
        if self.is_fitted or self.kind == "discriminative":
            return
        with torch.no_grad():
            if self.freeze_backbone:  # the cached features, unshuffled
                phi, y = batches.tensors
            else:
                pairs = [(self._training_features(x), y) for x, y in batches]
                phi, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            if self.kind == "generative":
                self.vbll.initialize_from_features(phi, y)
            else:
                y = regression_targets(y, self.vbll.out_features).to(phi.dtype)
                residual = self.vbll(phi) - y
                rms = residual.pow(2).mean(0).sqrt().clamp_min(1e-3)
                self.vbll.noise_log_std.copy_(rms.log())

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW: no weight decay on the head (its prior is in the ELBO), the given decay
        on a trainable backbone.

        The head's log-scale parameters (log standard deviations of the covariance and
        the noise) take ``scale_lr`` times the learning rate: Adam moves each parameter
        by about lr per step, which suits weights but would need thousands of steps to
        move a scale by a factor of e (the posterior of N points is ~N times tighter
        than its prior).
        """
        scales = [self.vbll.cov.log_std, self.vbll.noise_log_std]
        ids = {id(p) for p in scales}
        rest = [p for p in self.vbll.parameters() if id(p) not in ids]
        groups = [{"params": rest, "weight_decay": 0.0},
                  {"params": scales, "weight_decay": 0.0, "lr": lr * self.scale_lr}]
        backbone = [p for p in self.model.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "weight_decay": weight_decay})
        return torch.optim.AdamW(groups, lr=lr)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kind={self.kind!r}, head={self.head_name!r}, "
                f"covariance={self.covariance!r}, freeze_backbone={self.freeze_backbone}")
