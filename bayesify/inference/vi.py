"""``"vi"``: dense mean-field variational inference over every weight of a network.

Every ``nn.Linear`` / ``nn.Conv2d`` becomes a mean-field Gaussian layer (means start at
the layer's weights) and the network is trained by the negative ELBO per datum,

    mean_i NLL(y_i | f(x_i; w ~ q)) + beta_t * kl_weight * KL(q || N(0, prior_std^2)),

with ``kl_weight = temperature / N`` (1/N by default) and ``beta_t`` an optional linear
warm-up. The likelihood (softmax, or Gaussian noise for regression) is the one of
:class:`~bayesify.inference.deterministic.NetworkLikelihoodMixin`. The posterior over
outputs is S forward passes, each with one weight sample shared by the batch (a
:class:`~bayesify.posterior.SampledPosterior` [S, N, K]); the likelihood turns it into
a ``CategoricalPredictive`` with per-sample probabilities, or a ``MixturePredictive``.

Training in your own loop: ``bm.loss(x, y)`` is the per-datum negative ELBO (it needs
``n_data=`` for the KL weight unless ``kl_weight=`` is given); call ``bm.finish_fit()``
after the loop and the model predicts. ``fit`` adds the schedules (cosine lr, KL
warm-up), which it plans from ``self.fit_plan``.

Which layers: every ``nn.Linear`` / ``nn.Conv2d`` in scope; ``include=`` / ``exclude=``
name patterns choose the scope (``exclude=["bert.embeddings.*"]``), and Embedding and
normalization layers stay point estimates (said once through the ``"bayesify"`` logger).
Inputs may be a tensor, a mapping of keyword inputs (HuggingFace batches) or a tuple;
outputs that are not a tensor are reduced as :mod:`bayesify._network` says.

BatchNorm: layers outside the converted Linear/Conv2d keep their point weights;
BatchNorm trains as usual during ``fit`` (batch statistics in train mode) and runs in
eval mode, with its running statistics, when predicting (``predict`` puts the model
in eval mode). See :mod:`bayesify.inference.mean_field`.

Why our own layers rather than Pyro (``PyroModule`` + ``AutoNormal``): SSVI needs
exactly these layers with a mask of active weights, KL over the active weights only,
the local reparameterization trick, the dense gradient of inactive weights and masked
optimizer state, none of which an autoguide exposes; with the layers in hand, dense VI
is the same code with every weight active, so the two methods differ only in the
subspace update (a fair baseline). Own layers also keep the model an ordinary
``nn.Module`` (state_dict checkpoints, any device and dtype, no global parameter store)
and the KL in closed form instead of a Monte Carlo estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bayesify._batching import num_rows, to_inputs
from bayesify._validation import check_fraction, check_positive_float
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError
from bayesify.inference._sampled import sampled_posterior
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.inference.mean_field import LayerCount, convert_to_mean_field, count_layers
from bayesify.layers.bayesian import MeanFieldLayer, sampling_mode
from bayesify.posterior import SampledPosterior

__all__ = ["VIModel", "cosine_lr_factor", "kl_warmup_factor"]


def kl_warmup_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear KL warm-up: ``min(1, (step + 1) / (warmup * total_steps))``; 1 without warm-up."""
    if warmup <= 0 or total_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / (warmup * total_steps))


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """Cosine annealing of the learning rate from 1 at step 0 to 0 at ``total_steps``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@register_method("vi")
class VIModel(NetworkLikelihoodMixin, BayesianModel):
    """Mean-field VI over all weights (the dense baseline of SSVI).

    Args:
        model: a network outputting logits [N, C] or regression means [N, D]
            ([N, 2D] with ``noise="heteroscedastic"``). Its Linear/Conv2d layers in
            scope are replaced in place by mean-field layers.
        task: ``"classification"`` or ``"regression"``.
        prior_std: the N(0, prior_std^2) prior on every weight and bias.
        init_std: the starting posterior standard deviation of every weight.
        kl_weight: the weight of the summed KL in the per-datum loss; ``temperature / N``
            when ``None``.
        temperature: scales the default KL weight (< 1 gives a cold posterior).
        kl_warmup: fraction of training over which the KL weight grows linearly from
            0 to its value (0: no warm-up).
        keep_deterministic: names of modules to leave as point estimates, or
            ``"first"`` for the first Linear/Conv2d.
        include: module-name patterns (fnmatch, e.g. ``["bert.encoder.*"]``) of the part
            of the model to make Bayesian; the whole model when ``None``.
        exclude: module-name patterns of modules to leave as point estimates (with
            their children), e.g. ``["bert.embeddings.*", "*.LayerNorm"]``. Embedding
            and normalization layers stay point estimates anyway (logged once).
        sgd_momentum: use SGD with this momentum as the default optimizer (AdamW when
            ``None``).
        cosine_lr: anneal the default optimizer's learning rate to 0 over training.
        rho_lr: learning rate of the ``rho`` (sigma) parameters; ``lr`` when ``None``.
        noise, num_outputs: the regression noise model (see
            :class:`~bayesify.likelihoods.GaussianNoise`).
        noise_param, beta: how heteroscedastic outputs give the variance, and the
            beta-NLL weight, which then replaces the ELBO's likelihood term.
        n_data: N, the training-set size (inferred by ``fit`` when ``None``; needed by
            ``loss`` in your own loop unless ``kl_weight`` is given).
    """

    default_num_samples = 32
    default_epochs = 100
    default_lr = 1e-2
    default_batch_size = 128

    def __init__(self, model: nn.Module, task: str, *, prior_std: float = 1.0,
                 init_std: float = 1e-3, kl_weight: float | None = None,
                 temperature: float = 1.0, kl_warmup: float = 0.0,
                 keep_deterministic: str | Sequence[str] = (),
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 sgd_momentum: float | None = None, cosine_lr: bool = False,
                 rho_lr: float | None = None, noise: Any = "homoscedastic",
                 num_outputs: int | None = None, noise_param: str | None = None,
                 beta: float = 0.0, n_data: int | None = None):
        if model is None:
            raise InputError(f"`model` is None; {self.method_name!r} needs a network")
        super().__init__(model, task, n_data=n_data)
        self.prior_std = check_positive_float(prior_std, "prior_std")
        self.init_std = check_positive_float(init_std, "init_std")
        self.kl_weight = (None if kl_weight is None
                          else check_positive_float(kl_weight, "kl_weight", allow_zero=True))
        self.temperature = check_positive_float(temperature, "temperature")
        self.kl_warmup = check_fraction(kl_warmup, "kl_warmup", low_inclusive=True,
                                        high_inclusive=True)
        self.sgd_momentum = (None if sgd_momentum is None
                             else check_positive_float(sgd_momentum, "sgd_momentum",
                                                       allow_zero=True))
        self.cosine_lr = bool(cosine_lr)
        self.rho_lr = None if rho_lr is None else check_positive_float(rho_lr, "rho_lr")
        self._init_likelihood(noise, num_outputs, noise_param=noise_param, beta=beta)
        self.model, self._layers = convert_to_mean_field(
            model, method=self.method_name, keep_deterministic=keep_deterministic,
            include=include, exclude=exclude, prior_std=self.prior_std,
            init_std=self.init_std)
        # Schedule state of the running fit: the KL warm-up factor, the step counter and
        # the total steps planned from ``self.fit_plan``.
        self._kl_factor = 1.0
        self._step = 0
        self._total_steps = 0
        self._scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._positions: dict[str, int] = {}
        self._step_flops: int | None = None
        #: FLOPs of the weight layers counted over the last ``fit`` (forward and
        #: backward, backward = 2 x forward).
        self.training_flops = 0

    # ------------------------------------------------------------------ the model

    @property
    def bayesian_layers(self) -> dict[str, MeanFieldLayer]:
        """The mean-field layers by their name in the model."""
        return dict(self._layers)

    def kl(self) -> torch.Tensor:
        """KL(q || prior) summed over every mean-field layer (a scalar)."""
        return sum(layer.kl() for layer in self._layers.values())

    def effective_kl_weight(self) -> float:
        """The KL weight of the loss without warm-up: ``kl_weight`` or temperature / N."""
        if self.kl_weight is not None:
            return self.kl_weight
        if self.n_data is None:
            raise InputError(
                "the KL weight needs the training-set size N: pass n_data=N to "
                f"bayesify(..., {self.method_name!r}, ...) when training with .loss(x, y) "
                "in your own loop (or kl_weight=), or train with .fit(train), which "
                "counts it")
        return self.temperature / self.n_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean network's prediction: logits [N, C] or the regression mean [N] / [N, D]."""
        with sampling_mode(self.model, "mean"):
            return self._point(self.call_network(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per datum on a batch x [B, ...], y [B] or [B, D] (a scalar),
        with one LRT sample per example."""
        nll = self._nll(self.call_network(x), y)
        return nll + self._kl_factor * self.effective_kl_weight() * self.kl()

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """Raw outputs [S, N, K] of S networks, each one weight draw shared by the batch."""
        count = num_samples or self.default_num_samples
        with sampling_mode(self.model, "weights", generator):
            outputs = torch.stack([self.call_network(x) for _ in range(count)])
        return sampled_posterior(self, outputs)

    # ------------------------------------------------------------------ training

    def on_fit_start(self, batches: Any) -> None:
        plan = self.fit_plan
        steps = None if plan is None else plan.total_steps
        needs_n = self.n_data is None and self.kl_weight is None
        if steps is None or needs_n:
            # A loader without a length (an IterableDataset): count one pass for the
            # schedules and the KL weight's N.
            batch_count = rows = 0
            for x, _ in batches:
                batch_count, rows = batch_count + 1, rows + num_rows(x)
            steps = batch_count * (plan.epochs if plan is not None else 1)
            if needs_n and rows:
                self.n_data = rows
        self._total_steps = steps
        self._step = 0
        self._scheduler = None
        self.training_flops = 0
        self._step_flops = None
        # A probe of the mean network in eval mode (BatchNorm keeps its statistics).
        with preserve_training_flags(self), sampling_mode(self.model, "mean"):
            self.eval()
            self._initialize_noise(batches)

    def on_fit_end(self) -> None:
        self._scheduler = None

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW (or SGD with ``sgd_momentum``); ``rho`` gets ``rho_lr`` and no decay."""
        rho = [p for n, p in self.named_parameters() if n.endswith("_rho") and p.requires_grad]
        rho_ids = {id(p) for p in rho}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in rho_ids]
        groups = [{"params": rest, "weight_decay": weight_decay},
                  {"params": rho, "weight_decay": 0.0, "lr": self.rho_lr or lr}]
        if self.sgd_momentum is not None:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=self.sgd_momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        if self.cosine_lr:
            total = self._total_steps
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cosine_lr_factor(step, total))
        return optimizer

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The schedules around one update (:meth:`_update`); returns the detached loss."""
        if self._step_flops is None:
            rows = count_layers(self.model, self._layers, x, self._positions)
            self._step_flops = sum(r.flops for r in rows)
        # The warm-up weighs the KL of this step only: ``loss`` outside ``fit`` (your
        # own loop) always uses the full weight, also after a fit that stopped early.
        self._kl_factor = kl_warmup_factor(self._step, self._total_steps, self.kl_warmup)
        try:
            loss, extra_flops = self._update(x, y, optimizer)
        finally:
            self._kl_factor = 1.0
        self.training_flops += 3 * self._step_flops * num_rows(x) + extra_flops
        if self._scheduler is not None:
            self._scheduler.step()
        self._step += 1
        return loss

    def _update(self, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, int]:
        """Hook: the update of one batch x [B, ...], y [B] or [B, D]: an optimizer step
        on the negative ELBO, through the loop's divergence guard. Returns the detached
        loss and the FLOPs spent beyond one forward and backward pass (0 here)."""
        return super().training_step(x, y, optimizer), 0

    def layer_counts(self, x: Any = None) -> list[LayerCount]:
        """Weights and per-example forward FLOPs of every weight layer (see LayerCount).

        Args:
            x: an example input [B, ...] (a tensor, or a mapping or tuple of them as
                the model takes; needed once, for the convolutions' sizes).
        """
        if x is not None:
            x = to_inputs(x, "x", dtype=self.dtype, device=self.device)
        return count_layers(self.model, self._layers, x, self._positions)
