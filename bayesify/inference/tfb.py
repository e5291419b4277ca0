"""The ``"tfb"`` method: Training-Free Bayesianization of LoRA adapters (Shi, Wang, Han,
Zhang, Wang, NeurIPS 2025, arXiv 2412.05723).

A trained LoRA adapter becomes a Bayesian one without training. The posterior over each
adapter is the paper's low-rank isotropic Gaussian with one scale σ_q: with the thin SVD
B = U diag(d) Vᵀ, B' = U diag(d) is kept and A' = Vᵀ A gets A'_ij ~ N(A'_ij, (σ_q/d_i)²),
so the weight update s·B'A' has mean s·B A and noise s·U Z, Z iid N(0, σ_q²) (see
:mod:`bayesify.inference._lora_noise`). σ_q is the largest scale whose anchor metric
stays within ``tolerance`` of the deterministic adapter's (σ_q = 0); the paper shows
this search is KL-regularized variational inference.

The search (:func:`bisect_scale`): the interval is [``sigma_min``, ``sigma_max``]
(default [1e-4, 1]); σ_max is tried first (kept if within tolerance), then σ_min (if it
already fails, σ_q = 0: the deterministic adapter), then ``iterations`` (default 10)
bisection steps, geometric (midpoint √(lo·hi), so the bracket ends differ by a factor
(σ_max/σ_min)^(1/2^iterations), 0.9% by default) or arithmetic (``log_scale=False``, the
paper code's [0.001, 0.2] interval). The result is the largest scale tried that met the
tolerance. Every σ is scored with the same adapter draws (common random numbers), so
the metric is a smooth function of σ and the bisection is well posed. The official code
returns the last failing midpoint instead; this one never exceeds the tolerance.

Degradation of the anchor metric m (lower is worse for ``"accuracy"``):
``"nll"`` and ``"rmse"``: (m(σ) − m(0)) / |m(0)| (relative, as in the paper);
``"accuracy"``: m(0) − m(σ) (absolute, a fraction of points); a callable
``metric(predictive, y) -> float`` (lower is better) is relative. ``relative=`` overrides.
It is one-sided: an improvement counts as no degradation. The official code bounds
|m(σ) − m(0)|, the same wherever the metric only worsens with σ, as it does for the NLL
of the adapter's own predicted classes (``pseudo_labels``, the code's criterion).

Data: ``fit(anchor)`` runs the search on the data it is given (the anchor set: training
data or held-out in-distribution data, as (x, y) pairs; ``pseudo_labels`` replaces y by
the deterministic adapter's predicted classes). It is a full-batch fit: ``lr`` and
``epochs`` do not apply. ``bayesify(..., anchor=data)`` does the same at construction,
and ``sigma_q=`` fixes the scale without a search. For regression with
``noise="homoscedastic"`` the noise is set first to the RMS residual of the
deterministic adapter on the anchor (its maximum-likelihood value).

Prediction draws S adapters (``num_samples``, default 10) and runs the network once on
the inputs tiled S times (``samples_per_pass`` bounds the copies per pass); σ_q = 0
gives the deterministic adapter's outputs exactly. U is read off B when wrapping and at
every ``fit``. The base weights and adapters are never copied or changed (nothing is
trained); tfb adds U (out × k per adapter) and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bayesify._batching import num_rows, take_rows
from bayesify._progress import progress_bar
from bayesify._runtime import make_generator
from bayesify._validation import check_choice, check_positive_float, check_positive_int
from bayesify.checkpoint import mark_dynamic
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError
from bayesify.fitting import CLOSED_FORM, FitStrategy
from bayesify.inference._lora_noise import (
    LoraFactor,
    find_lora_layers,
    lora_noise,
    repeat_batch,
)
from bayesify.inference._sampled import sampled_posterior
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.likelihoods import regression_targets
from bayesify.posterior import SampledPosterior

__all__ = ["METRICS", "TFBModel", "bisect_scale"]

#: Built-in anchor metrics and whether higher is better.
METRICS = {"nll": False, "accuracy": True, "rmse": False}


def bisect_scale(degradation: Callable[[float], float], tolerance: float, *,
                 low: float, high: float, iterations: int, log_scale: bool = True
                 ) -> tuple[float, list[tuple[float, float]]]:
    """The largest σ in [low, high] found by bisection with ``degradation(σ) <= tolerance``.

    Assumes the degradation grows with σ. Tries ``high`` (returned if it passes), then
    ``low`` (0.0 is returned if it fails), then ``iterations`` midpoints (geometric with
    ``log_scale``, else arithmetic), keeping ``low`` passing and ``high`` failing.

    Returns:
        ``(sigma, path)``: the largest passing σ tried (0.0 if none) and the (σ,
        degradation) pairs in evaluation order.
    """
    path: list[tuple[float, float]] = []

    def passes(sigma: float) -> bool:
        value = float(degradation(sigma))
        path.append((sigma, value))
        return value <= tolerance

    if passes(high):
        return high, path
    if not passes(low):
        return 0.0, path
    for _ in range(iterations):
        mid = math.sqrt(low * high) if log_scale else 0.5 * (low + high)
        if passes(mid):
            low = mid
        else:
            high = mid
    return low, path


@register_method("tfb")
class TFBModel(NetworkLikelihoodMixin, BayesianModel):
    """Training-free Bayesian LoRA: a low-rank isotropic Gaussian over every adapter.

    Args:
        model: a network with LoRA adapters (peft ``get_peft_model``/``LoraModel``, on a
            HF or plain PyTorch model), outputting logits [N, C] or means [N, D].
        task: ``"classification"`` or ``"regression"``.
        anchor: data to run the σ_q search on at construction, ``(X, y)`` or a DataLoader
            (the same as calling ``fit(anchor)`` afterwards).
        metric: ``"nll"`` (default), ``"accuracy"`` (classification), ``"rmse"``
            (regression) or ``metric(predictive, y) -> float``, lower is better.
        tolerance: the allowed degradation of the anchor metric (default 0.01).
        relative: measure the degradation relative to |m(0)| (default: yes for all but
            ``"accuracy"``).
        sigma_min, sigma_max: the search interval (default [1e-4, 1]).
        iterations: bisection steps after the two ends (default 10).
        log_scale: geometric bisection (default) or arithmetic.
        sigma_q: fix σ_q and skip the search.
        pseudo_labels: score the anchor against the deterministic adapter's predicted
            classes instead of the labels (the paper code's NLL criterion).
        num_samples: S, adapter draws per prediction and per search step (default 10).
        samples_per_pass: at most this many draws per forward pass (all by default).
        search_batch_size: anchor rows per forward pass during the search.
        noise, noise_param, num_outputs: regression noise, as for
            :class:`~bayesify.inference.deterministic.DeterministicModel`.
        n_data: unused (kept for a uniform signature).

    After fitting, ``sigma_q`` is the scale found and ``search_path`` the (σ, anchor
    metric) pairs tried, starting with (0, m(0)).

    Example:
        >>> bm = bayesify(peft_model, "tfb", task="classification", anchor=(X, y))
        >>> bm.sigma_q, bm.search_path[:3]
        >>> pred = bm.predict(x_test)
    """

    default_num_samples = 10

    def __init__(self, model: nn.Module, task: str, *, anchor: Any = None,
                 metric: str | Callable[..., float] = "nll", tolerance: float = 0.01,
                 relative: bool | None = None, sigma_min: float = 1e-4,
                 sigma_max: float = 1.0, iterations: int = 10, log_scale: bool = True,
                 sigma_q: float | None = None, pseudo_labels: bool = False,
                 num_samples: int = 10, samples_per_pass: int | None = None,
                 search_batch_size: int = 256, noise: Any = "homoscedastic",
                 noise_param: str | None = None, num_outputs: int | None = None,
                 n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; tfb needs a network with LoRA adapters")
        super().__init__(model, task, n_data=n_data)
        self._init_likelihood(noise, num_outputs, noise_param=noise_param)
        if not callable(metric):
            check_choice(metric, "metric", tuple(METRICS))
            if metric == "accuracy" and task != "classification":
                raise InputError("metric='accuracy' needs task='classification'; use 'nll' "
                                 "or 'rmse' for regression")
            if metric == "rmse" and task != "regression":
                raise InputError("metric='rmse' needs task='regression'")
        if pseudo_labels and task != "classification":
            raise InputError("pseudo_labels=True needs task='classification'")
        self.metric = metric
        self.tolerance = check_positive_float(tolerance, "tolerance", allow_zero=True)
        self.relative = (metric != "accuracy") if relative is None else bool(relative)
        self.sigma_min = check_positive_float(sigma_min, "sigma_min")
        self.sigma_max = check_positive_float(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise InputError(f"`sigma_min` ({sigma_min}) must be below `sigma_max` "
                             f"({sigma_max})")
        self.iterations = check_positive_int(iterations, "iterations", minimum=0)
        self.log_scale = bool(log_scale)
        self.pseudo_labels = bool(pseudo_labels)
        self.default_num_samples = check_positive_int(num_samples, "num_samples")
        self.samples_per_pass = (None if samples_per_pass is None else
                                 check_positive_int(samples_per_pass, "samples_per_pass"))
        self.search_batch_size = check_positive_int(search_batch_size, "search_batch_size")
        modules = dict(model.named_modules())
        self.factors = nn.ModuleList(LoraFactor(layer, adapter, modules[layer])
                                     for layer, adapter in find_lora_layers(model))
        kw = {"dtype": self.dtype, "device": self.device}
        self.register_buffer("_sigma", torch.zeros((), **kw))
        self.register_buffer("search_sigmas", torch.zeros(0, **kw))
        self.register_buffer("search_metrics", torch.zeros(0, **kw))
        mark_dynamic(self, "search_sigmas", "search_metrics")
        if anchor is not None and sigma_q is not None:
            raise InputError("pass either `anchor` (search σ_q) or `sigma_q` (fix it), not "
                             "both")
        #: whether σ_q was given (then ``fit`` only sets a homoscedastic noise)
        self._fixed_sigma = sigma_q is not None
        if sigma_q is not None:
            self._sigma.fill_(check_positive_float(sigma_q, "sigma_q", allow_zero=True))
            if task == "classification" or self.noise.kind != "homoscedastic":
                self._mark_fitted()
        if anchor is not None:
            self.fit(anchor)

    # ------------------------------------------------------------------ reports

    @property
    def sigma_q(self) -> float:
        """σ_q, the posterior scale (0 before a search: the deterministic adapter)."""
        return float(self._sigma)

    @property
    def search_path(self) -> list[tuple[float, float]]:
        """(σ, anchor metric) of every step of the last search, in order; the first is
        the deterministic adapter (σ = 0)."""
        return list(zip(self.search_sigmas.tolist(), self.search_metrics.tolist(),
                        strict=True))

    # ------------------------------------------------------------------ network

    def forward(self, x: Any) -> torch.Tensor:
        """The deterministic adapter's point prediction."""
        return self._point(self.call_network(x))

    def loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """NLL of a batch under the current posterior (tfb is fit without gradients)."""
        return -self.likelihood(self._posterior(x, None, None)).log_prob(y).mean()

    def fit_strategy(self) -> FitStrategy:
        """A full-batch fit: the σ_q search on the anchor (no gradient steps)."""
        return CLOSED_FORM

    def draw_noise(self, num_samples: int, generator: torch.Generator | None
                   ) -> list[torch.Tensor]:
        """Standard adapter draws Z/σ_q for S samples, one [S, k, in] per adapter."""
        return [factor.draw(num_samples, generator) for factor in self.factors]

    def _sampled_outputs(self, x: Any, noises: list[torch.Tensor], sigma: float
                         ) -> torch.Tensor:
        """Raw outputs [S, N, K] of the network with adapter draws σ·Z_s."""
        total = noises[0].shape[0] if noises else 1
        if sigma == 0 or not noises:
            out = self.call_network(x)
            return out.expand(total, *out.shape)
        n = num_rows(x)
        chunk = self.samples_per_pass or total
        outputs = []
        for start in range(0, total, chunk):
            part = [z[start:start + chunk] for z in noises]
            copies = part[0].shape[0]
            with lora_noise(self.model, list(self.factors), part, sigma):
                out = self.call_network(repeat_batch(x, copies))
            outputs.append(out.reshape(copies, n, *out.shape[1:]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _posterior(self, x: Any, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """The network under S adapter draws, [S, N, K] (σ_q = 0: S equal copies)."""
        samples = num_samples or self.default_num_samples
        noises = self.draw_noise(samples, generator) if self.sigma_q > 0 else []
        raw = self._sampled_outputs(x, noises, self.sigma_q)
        if not noises:
            raw = raw.expand(samples, *raw.shape[1:])
        return sampled_posterior(self, raw)

    # ------------------------------------------------------------------ search

    def _score(self, pred: Any, y: torch.Tensor) -> torch.Tensor:
        """Sum over the batch of the anchor metric's per-point terms (a scalar)."""
        if callable(self.metric):
            return torch.as_tensor(float(self.metric(pred, y)) * y.shape[0])
        if self.metric == "nll":
            return -pred.log_prob(y).double().sum()
        if self.metric == "accuracy":
            return (pred.labels == y).double().sum()
        mean = pred.mean
        target = regression_targets(y, self.noise.num_outputs).reshape(mean.shape)
        return (mean - target).double().pow(2).sum()

    @torch.no_grad()
    def anchor_metric(self, x: torch.Tensor, y: torch.Tensor, sigma: float,
                      noises: list[torch.Tensor] | None = None) -> float:
        """The anchor metric of the predictive at scale σ on X [N, ...], y [N] (or
        [N, D]), with the given standard draws (fresh ones, S = ``num_samples``, if
        ``None``). For ``"rmse"`` the root of the mean squared error."""
        if noises is None:
            noises = self.draw_noise(self.default_num_samples, None)
        total, rows = torch.zeros((), dtype=torch.float64), 0
        step = self.search_batch_size
        for start in range(0, num_rows(x), step):
            xb, yb = take_rows(x, slice(start, start + step)), y[start:start + step]
            raw = self._sampled_outputs(xb, noises if sigma > 0 else [], sigma)
            pred = self.likelihood(sampled_posterior(self, raw))
            total += self._score(pred, yb).cpu()
            rows += num_rows(xb)
        value = float(total) / rows
        return math.sqrt(value) if self.metric == "rmse" else value

    def fit_full_batch(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                       progress: bool | None) -> None:
        """Search σ_q on the anchor X [N, ...], y [N] or [N, D] (module docstring)."""
        generator = make_generator(seed, self.device)
        with preserve_training_flags(self), torch.no_grad():
            self.eval()
            for factor in self.factors:
                factor.refresh(dict(self.model.named_modules())[factor.layer])
            if self.noise is not None and self.noise.kind == "homoscedastic":
                self._initialize_noise([(x, y)])
            if self.pseudo_labels:
                step = self.search_batch_size
                y = torch.cat([self.call_network(take_rows(x, slice(i, i + step))).argmax(-1)
                               for i in range(0, num_rows(x), step)])
            if not self._fixed_sigma:
                self._search(x, y, generator, progress)

    def _search(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
                progress: bool | None) -> None:
        noises = self.draw_noise(self.default_num_samples, generator)
        base = self.anchor_metric(x, y, 0.0)
        higher_better = (not callable(self.metric)) and METRICS[self.metric]
        metrics = {0.0: base}
        bar = progress_bar(None, desc="tfb search", progress=progress,
                           total=self.iterations + 2)

        def degradation(sigma: float) -> float:
            value = self.anchor_metric(x, y, sigma, noises)
            metrics[sigma] = value
            bar.update(1)
            worse = base - value if higher_better else value - base
            return worse / max(abs(base), 1e-12) if self.relative else worse

        try:
            sigma, path = bisect_scale(degradation, self.tolerance, low=self.sigma_min,
                                       high=self.sigma_max, iterations=self.iterations,
                                       log_scale=self.log_scale)
        finally:
            bar.close()
        sigmas = [0.0] + [s for s, _ in path]
        kw = {"dtype": self.dtype, "device": self.device}
        self.search_sigmas = torch.tensor(sigmas, **kw)
        self.search_metrics = torch.tensor([metrics[s] for s in sigmas], **kw)
        self._sigma.fill_(sigma)
