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
  default), which also runs the backbone in eval mode (no dropout, fixed batch-norm).
  Pass ``copy_model=True`` to ``bayesify`` to keep the original module untouched.

With a frozen backbone, ``fit`` computes the features of the training set once and
trains the head on them, so an epoch costs a head pass. ``bm.loss(x, y)`` is the
negative ELBO of a batch for users' own loops; ``bm(x, y)`` returns the same, so a
``DistributedDataParallel`` wrapper, which synchronizes gradients only for calls
through its forward, trains it too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayesify._batching import make_train_batches, to_inputs
from bayesify._validation import (
    as_tensor,
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError, UnsupportedModelError
from bayesify.inference._heads import find_head
from bayesify.layers.vbll_classification import VBLLDiscriminative, VBLLGenerative
from bayesify.layers.vbll_regression import VBLLRegression
from bayesify.likelihoods import regression_targets
from bayesify.predictive import GaussianPredictive, Predictive

__all__ = ["VBLLModel"]

KINDS = ("discriminative", "generative")

# Rows per forward pass when caching the features of in-memory training data.
_CACHE_BATCH = 1024


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
        covariance: ``"dense"``, ``"diagonal"`` or ``"lowrank"`` (default ``"dense"``;
            ``"diagonal"`` for the generative head, as in the paper).
        rank: rank of the low-rank part (``"lowrank"`` only).
        prior_scale, wishart_scale, dof: the priors (paper defaults; wishart_scale is
            1e-2 for regression and 1 for classification when ``None``).
        num_samples: logit samples of the discriminative predictive.
        scale_lr: learning-rate multiplier of the head's log-scale parameters in the
            default optimizer (see :meth:`configure_optimizer`).
        n_data: N, the training-set size; the ELBO's regularization weight is 1/N.
            Inferred by ``fit``; needed up front only for users' own loops.

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

    def __init__(self, model: nn.Module, task: str, *, kind: str = "discriminative",
                 head: str | None = None, freeze_backbone: bool = True,
                 covariance: str | None = None, rank: int | None = None,
                 prior_scale: float = 1.0, wishart_scale: float | None = None,
                 dof: float = 1.0, num_samples: int = 100, scale_lr: float = 10.0,
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
        if covariance is None:
            covariance = "diagonal" if self.kind == "generative" else "dense"
        if wishart_scale is None:
            wishart_scale = 1e-2 if task == "regression" else 1.0
        options = {"covariance": covariance, "rank": rank, "prior_scale": prior_scale,
                   "wishart_scale": wishart_scale, "dof": dof,
                   "dtype": linear.weight.dtype, "device": linear.weight.device}
        d, m = linear.in_features, linear.out_features
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
        self.default_num_samples = (check_positive_int(num_samples, "num_samples")
                                    if self.kind == "discriminative" else None)
        linear.requires_grad_(False)
        if self.freeze_backbone:
            model.requires_grad_(False)
        self.scale_lr = check_positive_float(scale_lr, "scale_lr")
        self._verified = False
        self._on_features = False  # fit feeds cached features instead of inputs

    @classmethod
    def report_settings(cls, task: str) -> dict[str, dict[str, Any]]:
        return {"options": {"covariance": "dense"}, "fit": {"epochs": 30, "lr": 1e-3}}

    # ---------------------------------------------------------------- features

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input φ [B, d] for inputs x, read by a forward hook."""
        if not isinstance(x, torch.Tensor):
            x = to_inputs(x, "x", dtype=self.dtype, device=self.device)
        head = self.model.get_submodule(self.head_name)
        captured: list[tuple[Any, Any]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.append((args[0] if args else None, output))

        handle = head.register_forward_hook(hook)
        try:
            if self.freeze_backbone:
                with preserve_training_flags(self.model):
                    self.model.eval()
                    output = self.model(x)
            else:
                output = self.model(x)
        finally:
            handle.remove()
        if not captured or not isinstance(captured[-1][0], torch.Tensor):
            raise UnsupportedModelError(
                f"the model's forward never called its head {self.head_name!r} with a "
                "tensor; pass `head=` naming the final linear layer the forward uses")
        phi, head_output = captured[-1]
        if not self._verified:
            same = (isinstance(output, torch.Tensor) and output.shape == head_output.shape
                    and torch.equal(output, head_output))
            if not same:
                raise UnsupportedModelError(
                    f"the model's output is not the output of its head {self.head_name!r}: "
                    "its forward does more after that layer (an activation, a reshape, "
                    "another layer). VBLL replaces the final linear layer, so pass `head=` "
                    "naming the nn.Linear whose output is the model's output, or wrap a "
                    "model that ends in it")
            self._verified = True
        return phi

    def _batch_features(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._on_features else self._features(x)

    def _set_regularization(self) -> None:
        if self.n_data is None:
            raise InputError("`n_data` is unknown: pass n_data=N (the training-set size) "
                             "to bayesify(..., n_data=N) before calling .loss in your own "
                             "loop, or train with .fit")
        self.vbll.regularization_weight = 1.0 / self.n_data

    # ---------------------------------------------------------------- contract

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Point prediction (mean logits, class log densities or regression mean);
        with ``y``, the loss of the batch (so DDP wrappers can train through forward)."""
        if y is not None:
            return self.loss(x, y)
        out = self.vbll(self._features(x))
        return out[:, 0] if self.kind == "regression" and out.shape[1] == 1 else out

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of one batch: inputs x [B, ...], labels [B] or targets."""
        phi = self._batch_features(x)
        if self.vbll.regularization_weight is None or not self._on_features:
            self._set_regularization()
        y = as_tensor(y, "y", device=phi.device)
        if self.kind == "regression":
            y = y.to(phi.dtype)
        return self.vbll.loss(phi, y)

    def _predict_batch(self, x: torch.Tensor, num_samples: int | None,
                       generator: torch.Generator | None) -> Predictive:
        phi = self._features(x)
        if self.kind == "discriminative":
            return self.vbll.predict(phi, num_samples, generator)
        pred = self.vbll.predict(phi)
        if self.kind == "regression" and self.vbll.out_features == 1:
            pred = GaussianPredictive(pred.mean[:, 0], pred.variance[:, 0],
                                      aleatoric_variance=pred.aleatoric_variance[:, 0])
        return pred

    # ---------------------------------------------------------------- training

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

    def fit(self, train: Any, *, epochs: int | None = None, lr: float | None = None,
            batch_size: int | None = None, weight_decay: float = 0.0,
            optimizer: torch.optim.Optimizer | None = None, grad_clip: float | None = 1.0,
            progress: bool = True, seed: int | None = None) -> VBLLModel:
        """Train the head (and, with ``freeze_backbone=False``, the backbone).

        As :meth:`BayesianModel.fit`, with the VBLL recipe as defaults: AdamW at
        lr 1e-3 without weight decay on the head, gradient clipping at 1.0, and 50
        epochs over cached features (20 epochs when training jointly).
        """
        if epochs is None:
            epochs = self.default_epochs if self.freeze_backbone else 20
        options = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                   "optimizer": optimizer, "grad_clip": grad_clip, "progress": progress,
                   "seed": seed}
        if not self.freeze_backbone:
            super().fit(train, batch_size=batch_size, **options)
            return self
        if batch_size is None and isinstance(train, DataLoader) and train.batch_size:
            batch_size = train.batch_size
        features, targets = self._cache_features(train)
        self._on_features = True
        try:
            super().fit((features, targets), batch_size=batch_size, **options)
        finally:
            self._on_features = False
        return self

    @torch.no_grad()
    def _cache_features(self, train: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=_CACHE_BATCH,
                                     shuffle=False)
        features, targets = [], []
        for x, y in batches:
            features.append(self._features(x))
            targets.append(y)
        if not features:
            raise InputError("`train` is empty; pass at least one training example")
        targets = torch.cat(targets)
        if self.kind == "regression":
            regression_targets(targets, self.vbll.out_features)
        else:
            check_labels(targets, "y", self.vbll.out_features)
        return torch.cat(features), targets

    def on_fit_start(self, batches: Any) -> None:
        self._set_regularization()
        if self.is_fitted or self.kind == "discriminative":
            return
        with torch.no_grad():
            features, targets = [], []
            for x, y in batches:
                features.append(self._batch_features(x))
                targets.append(y)
            phi, y = torch.cat(features), torch.cat(targets)
            if self.kind == "generative":
                self.vbll.initialize_from_features(phi, y)
            else:
                # Start the noise at the pretrained head's residual RMS (its MLE).
                y = regression_targets(y, self.vbll.out_features).to(phi.dtype)
                residual = self.vbll(phi) - y
                rms = residual.pow(2).mean(0).sqrt().clamp_min(1e-3)
                self.vbll.noise_log_std.copy_(rms.log())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kind={self.kind!r}, head={self.head_name!r}, "
                f"freeze_backbone={self.freeze_backbone}")
