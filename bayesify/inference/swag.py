"""The ``"swag"`` method: SWA-Gaussian (Maddox et al. 2019).

From a trained network, ``fit`` runs SGD with a constant (or cyclic) learning rate for
``epochs`` epochs and, every ``collect_every`` steps, adds the weights θ to a running
mean θ̄, a running second central moment, and a ring of the last K deviations θ − θ̄
(the columns of D, K = ``rank``). The posterior is N(θ̄, ½(Σ_diag + DDᵀ/(K−1))), sampled
as θ = θ̄ + Σ_diag^½ z₁/√2 + D z₂/√(2(K−1)) (``scale`` = ½). After ``fit`` the network's
weights are θ̄ (the SWA solution), so ``forward`` is the SWA prediction.

BatchNorm. The statistics of one weight vector do not fit another, so for networks with
BatchNorm ``fit`` keeps the first ``bn_update_size`` training inputs it sees (in the
buffer ``bn_inputs``, saved with checkpoints): ``predict`` needs nothing else. Each
posterior draw re-estimates the statistics on them (one forward pass over them per
draw, running averages with ``momentum=None``), and the network's own statistics (those
of θ̄, set at the end of ``fit``) are restored afterwards. The kept inputs are one
tensor, so a network with BatchNorm takes one tensor as input; without BatchNorm, inputs
may be mappings (HuggingFace batches) or tuples as for every method.

``swag`` can be an ensemble's base: ``bayesify(net, "ensemble", base="swag")`` is
MultiSWAG (Wilson & Izmailov 2020). In your own loop, an optimizer from
``configure_optimizer(lr, weight_decay)`` collects by itself every ``collect_every``
steps (every step by default); with any other optimizer call ``collect()`` every c
steps. Then ``finish_fit()`` (with BatchNorm, after ``keep_bn_inputs(x)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from bayesify._validation import (
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from bayesify.checkpoint import mark_dynamic
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError, NotFittedError
from bayesify.fitting import check_finite_loss, gradient_norm
from bayesify.inference._sampled import sampled_posterior
from bayesify.inference._stacked import batchnorm_layers, quiet_batching_fallbacks
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.posterior import SampledPosterior

__all__ = ["SWAGModel"]


@register_method("swag")
class SWAGModel(NetworkLikelihoodMixin, BayesianModel):
    """SWA-Gaussian over the trainable weights of a (pretrained) network.

    Args:
        model: a network outputting logits [N, C] or means [N, D] ([N, 2D] with
            ``noise="heteroscedastic"``), ideally trained already.
        task: ``"classification"`` or ``"regression"``.
        rank: K, the deviations kept for the low-rank part (0: diagonal SWAG only;
            otherwise at least 2).
        collect_every: c, SGD steps between collections (default: once per epoch).
        swa_start: epochs of SGD before the first collection (0 for a trained network).
        schedule: ``"constant"`` learning rate, or ``"cyclic"``: within each period of c
            steps it falls linearly from ``lr`` to ``min_lr_ratio·lr``, and θ is
            collected at the low point.
        min_lr_ratio: the low point of the cyclic schedule, as a fraction of ``lr``.
        momentum: of the SGD that ``fit`` makes.
        scale: the posterior covariance factor (½ in the paper).
        bn_update_size: training inputs kept to refresh BatchNorm statistics.
        noise, noise_param, beta: regression noise (``"homoscedastic"``,
            ``"heteroscedastic"`` or a fixed std), how a heteroscedastic network's noise
            columns give the variance, and the β-NLL exponent; as for
            :class:`~bayesify.inference.deterministic.DeterministicModel`.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: N (inferred by ``fit``).

    ``fit(train, epochs=T, lr=...)`` is the SWAG phase itself; ``lr`` is SGD's.
    """

    default_num_samples = 30
    default_epochs = 20
    default_lr = 0.01
    default_batch_size = 128
    default_weight_decay = 1e-4

    def __init__(self, model: nn.Module, task: str, *, rank: int = 20,
                 collect_every: int | None = None, swa_start: int = 0,
                 schedule: str = "constant", min_lr_ratio: float = 0.1,
                 momentum: float = 0.9, scale: float = 0.5, bn_update_size: int = 1024,
                 noise: Any = "homoscedastic", noise_param: str | None = None,
                 beta: float = 0.0, num_outputs: int | None = None,
                 n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; the swag method needs a network")
        super().__init__(model, task, n_data=n_data)
        self.rank = check_positive_int(rank, "rank", minimum=0)
        if self.rank == 1:
            raise InputError("`rank` must be 0 (diagonal SWAG) or >= 2: the low-rank part "
                             "divides by K - 1, got 1")
        self.collect_every = (None if collect_every is None
                              else check_positive_int(collect_every, "collect_every"))
        self.swa_start = check_positive_int(swa_start, "swa_start", minimum=0)
        self.schedule = check_choice(schedule, "schedule", ("constant", "cyclic"))
        self.min_lr_ratio = check_fraction(min_lr_ratio, "min_lr_ratio", high_inclusive=True)
        self.momentum = check_positive_float(momentum, "momentum", allow_zero=True)
        if self.momentum >= 1:
            raise InputError(f"`momentum` must be < 1, got {momentum!r}")
        self.scale = check_positive_float(scale, "scale")
        self.bn_update_size = check_positive_int(bn_update_size, "bn_update_size")
        self._init_likelihood(noise, num_outputs, noise_param=noise_param, beta=beta)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise InputError("the model has no trainable parameters for SWAG to average")
        params = dict(model.named_parameters())
        self._shapes = [params[n].shape for n in self._names]
        size = sum(params[n].numel() for n in self._names)
        kw = {"dtype": self.dtype, "device": self.device}
        self.register_buffer("swa_mean", torch.zeros(size, **kw))
        self.register_buffer("swa_m2", torch.zeros(size, **kw))
        self.register_buffer("swa_deviations", torch.zeros(self.rank, size, **kw))
        self.register_buffer("swa_count", torch.zeros((), dtype=torch.long, device=self.device))
        self.register_buffer("bn_inputs", torch.zeros(0, **kw))
        mark_dynamic(self, "bn_inputs")
        self._optimizer: torch.optim.Optimizer | None = None
        self._base_lrs: list[float] = []
        self._own_loop_counting()

    def _own_loop_counting(self) -> None:
        """Outside ``fit``: collect every ``collect_every`` steps (every step)."""
        self._step, self._start_step = 0, 0
        self._period = self.collect_every or 1

    # ------------------------------------------------------------------ weights

    def _weights(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self._names]

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in zip(self._names, self._shapes, strict=True):
            size = math.prod(shape)
            out[name] = theta[..., start:start + size].reshape(*theta.shape[:-1], *shape)
            start += size
        return out

    @torch.no_grad()
    def collect(self) -> None:
        """Add the network's current weights to the SWAG moments (Welford's update)."""
        theta = torch.cat([w.detach().reshape(-1) for w in self._weights()])
        n = int(self.swa_count) + 1
        delta = theta - self.swa_mean
        self.swa_mean.add_(delta / n)
        self.swa_m2.add_(delta * (theta - self.swa_mean))
        if self.rank:
            self.swa_deviations[(n - 1) % self.rank] = theta - self.swa_mean
        self.swa_count.fill_(n)

    def swag_moments(self) -> dict[str, torch.Tensor]:
        """θ̄ [P], Σ_diag [P] (the variance of the collected weights) and D [K', P]
        (the last K' = min(n, K) deviations), over the P trainable weights."""
        n = int(self.swa_count)
        cols = min(n, self.rank)
        return {"mean": self.swa_mean, "variance": (self.swa_m2 / max(n, 1)).clamp_min(0),
                "deviations": self.swa_deviations[:cols], "count": self.swa_count}

    def sample_parameters(self, num_samples: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """S weight draws θ̄ + √scale·(Σ_diag^½ z₁ + D z₂/√(K'−1)), [S, P]."""
        moments = self.swag_moments()
        mean, deviations = moments["mean"], moments["deviations"]
        kw = {"generator": generator, "dtype": mean.dtype, "device": mean.device}
        z1 = torch.randn(num_samples, mean.shape[0], **kw)
        spread = moments["variance"].sqrt() * z1
        cols = deviations.shape[0]
        if cols >= 2:
            z2 = torch.randn(num_samples, cols, **kw)
            spread = spread + (z2 @ deviations) / math.sqrt(cols - 1)
        return mean + math.sqrt(self.scale) * spread

    # --------------------------------------------------------------- BatchNorm

    def keep_bn_inputs(self, x: torch.Tensor) -> None:
        """Keep inputs x [R, ...] (at most ``bn_update_size``) to refresh BatchNorm
        statistics (``fit`` does this itself)."""
        self.bn_inputs = x[:self.bn_update_size].detach().to(self.device).clone()

    @torch.no_grad()
    def _refresh_bn(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Recompute the BatchNorm statistics for ``weights`` (the module's own when
        ``None``) on the kept inputs, in place."""
        layers = batchnorm_layers(self.model)
        if self.bn_inputs.shape[0] == 0:
            raise NotFittedError("this network has BatchNorm, but SWAG holds no training "
                                 "inputs to refresh its statistics; call fit, or "
                                 "keep_bn_inputs(x) before finish_fit()")
        momenta = [layer.momentum for layer in layers]
        with preserve_training_flags(self.model):
            self.model.eval()
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None
                layer.train()
            try:
                for chunk in self.bn_inputs.split(self.default_batch_size):
                    self.call_network(chunk, params=weights)
            finally:
                for layer, momentum in zip(layers, momenta, strict=True):
                    layer.momentum = momentum

    # -------------------------------------------------------------------- training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._point(self.call_network(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._nll(self.call_network(x), y)

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """SGD with the method's momentum (the SWAG phase of the paper); every step it
        takes counts towards the next collection, also in your own loop."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=self.momentum,
                                    weight_decay=weight_decay)
        self._count_steps_of(optimizer)
        return optimizer

    def _count_steps_of(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(optimizer, "_bayesify_swag", None) is not self:
            optimizer._bayesify_swag = self
            optimizer.register_step_post_hook(lambda *_: self._after_step())

    def _after_step(self) -> None:
        self._step += 1
        since = self._step - self._start_step
        if since > 0 and since % self._period == 0:
            self.collect()

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            self._initialize_noise(batches)
        plan, steps = self.fit_plan, self.fit_plan.steps_per_epoch
        if steps is None and (self.collect_every is None or self.swa_start):
            raise InputError("the training DataLoader has no length, so SWAG cannot count "
                             "epochs: pass collect_every= (steps) and swa_start=0")
        self._period = self.collect_every or steps
        self._start_step = self.swa_start * (steps or 0)
        if plan.total_steps is not None:
            snapshots = max(plan.total_steps - self._start_step, 0) // self._period
            needed = 2 if self.rank else 1
            if snapshots < needed:
                raise InputError(
                    f"SWAG would collect {snapshots} snapshot(s) in {plan.epochs} epoch(s) of "
                    f"{steps} steps (swa_start={self.swa_start}, one every {self._period} "
                    f"steps); it needs at least {needed}: raise epochs= or lower "
                    "collect_every=")
        for buffer in (self.swa_mean, self.swa_m2, self.swa_deviations, self.swa_count):
            buffer.zero_()
        if batchnorm_layers(self.model):
            rows = []
            for x, _ in batches:
                if not isinstance(x, torch.Tensor):
                    raise InputError("SWAG refreshes BatchNorm statistics on kept training "
                                     "inputs, which must be one tensor for a network with "
                                     "BatchNorm; the data yield "
                                     f"{type(x).__name__}")
                rows.append(x)
                if sum(r.shape[0] for r in rows) >= self.bn_update_size:
                    break
            self.keep_bn_inputs(torch.cat(rows))
        self._step = 0
        self._optimizer = None

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if self._optimizer is not optimizer:
            self._optimizer = optimizer
            self._base_lrs = [group["lr"] for group in optimizer.param_groups]
            self._count_steps_of(optimizer)
        since = self._step - self._start_step      # steps done in the SWAG phase
        if self.schedule == "cyclic" and since >= 0:
            t = (since % self._period + 1) / self._period
            for group, lr in zip(optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = lr * ((1 - t) + t * self.min_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss = self.training_loss(x, y)
        check_finite_loss(loss)
        loss.backward()
        gradient_norm(self.parameters(), self._grad_clip)
        optimizer.step()                          # its hook counts and collects
        return loss.detach()

    def on_fit_end(self) -> None:
        if self._optimizer is not None:
            for group, lr in zip(self._optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = lr
            self._optimizer = None
        self._own_loop_counting()
        needed = 2 if self.rank else 1
        if int(self.swa_count) < needed:
            raise NotFittedError(f"SWAG collected {int(self.swa_count)} snapshot(s); it "
                                 f"needs at least {needed}: train longer or collect more "
                                 "often (collect_every=, or collect() in your own loop)")
        with torch.no_grad():
            for weight, value in zip(self._weights(), self._unflatten(self.swa_mean).values(),
                                     strict=True):
                weight.copy_(value)
        if batchnorm_layers(self.model):
            self._refresh_bn(None)

    # ------------------------------------------------------------------ posterior

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """The network at S weight draws, [S, N, K] (with BatchNorm statistics
        refreshed per draw and restored afterwards)."""
        thetas = self.sample_parameters(num_samples or self.default_num_samples, generator)
        draws = self._unflatten(thetas)
        layers = batchnorm_layers(self.model)
        if not layers:
            try:
                with quiet_batching_fallbacks():
                    return sampled_posterior(self, vmap(
                        lambda w: self.call_network(x, params=w), randomness="error")(draws))
            except RuntimeError:
                pass        # a network vmap cannot trace: one draw at a time below
        names = [f"{prefix}.{n}" if prefix else n
                 for prefix, module in self.model.named_modules()
                 if any(module is layer for layer in layers)
                 for n, _ in module.named_buffers(recurse=False)]
        buffers = dict(self.model.named_buffers())
        saved = {n: buffers[n].clone() for n in names}
        outputs = []
        try:
            for s in range(thetas.shape[0]):
                weights = {k: v[s] for k, v in draws.items()}
                if layers:
                    self._refresh_bn({k: v.detach() for k, v in weights.items()})
                    weights.update({n: buffers[n].clone() for n in names})
                outputs.append(self.call_network(x, params=weights))
        finally:
            with torch.no_grad():
                for n in names:
                    buffers[n].copy_(saved[n])
        return sampled_posterior(self, torch.stack(outputs))
