"""The ``"bayescap"`` method: a Bayesian identity cap on a frozen regressor (Upadhyay et
al., "BayesCap: Bayesian Identity Cap for Calibrated Uncertainty in Frozen Neural
Networks", ECCV 2022).

The frozen network's output ŷ [N, D] (and, with ``use_inputs``, the flattened inputs)
goes through a small MLP, the cap, with three heads: a reconstruction ỹ = ŷ + r·δ (the
identity, δ's last layer starts at zero), a scale α > 0 and a shape β of a generalized
Gaussian GGD(ỹ, α, β), density β / (2αΓ(1/β)) · exp(−(|y − ỹ|/α)^β). The cap is trained
on the paper's loss, the identity term plus the generalized-Gaussian NLL::

    λ · mean ‖(ỹ − ŷ) / r‖² + mean Σ_d [(|ỹ − y|/α)^β − log β + log α + log Γ(1/β) + log 2]

with r the RMS residual of the frozen network on the cap's training rows (so λ =
``identity_weight`` is scale free; the paper weighs an L1 identity term 20:1 against
the NLL on images; the default λ = 1000 keeps ỹ within about 1% of r of ŷ on held-out
inputs). The predictive is GGD(ŷ, α, β) around the frozen mean itself (a
:class:`~bayesify.predictive.GeneralizedGaussianPredictive`: exact log density,
quantiles, samples, variance α²Γ(3/β)/Γ(1/β)); ``cap_outputs`` gives (ỹ, α, β).

Choices beyond the paper, for tabular data: the cap's inputs are standardized with
training statistics; α = r·softplus(·) starts at √2·r and β at 2 (the homoscedastic
Gaussian fitted to the residuals), and β stays in ``beta_bounds`` (default (1, 3), from
Laplace to slightly lighter than Gaussian tails: on small tabular data a free β overfits
the training residuals, and light tails make a single miss on new data catastrophic;
below β ≈ 0.08, Γ(3/β)/Γ(1/β) in the variance overflows float32). ``fraction`` of the training
rows (a random subset per fit) trains the cap; the frozen outputs are computed once per
fit, not once per epoch. The cap never extrapolates: it sees its standardized features
clamped to the box they spanned in training, and with ``inflate`` (default) α becomes
α·(1 + d) + r·d, d the Euclidean distance of the features outside that box (in
standardized units), so that the uncertainty rises off the training data (an OOD
score: ``bf.ood.score(pred, "variance")``) instead of following a ReLU extrapolation,
which can shrink α to nothing. The frozen network's weights, buffers and train/eval flags are
never changed (it always runs in eval mode), and it gets no gradients during ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._batching import TensorBatches
from bayesify._validation import check_fraction, check_positive_float, check_positive_int
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError
from bayesify.likelihoods import Likelihood, infer_output_width, regression_targets
from bayesify.posterior import GaussianPosterior, Posterior
from bayesify.predictive import GeneralizedGaussianPredictive

__all__ = ["BayesCapModel", "generalized_gaussian_nll"]


def generalized_gaussian_nll(mean: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                             y: torch.Tensor) -> torch.Tensor:
    """Mean over points of the GGD negative log likelihood summed over outputs.

    Args:
        mean, alpha, beta, y: [N, D] each.

    Returns:
        A scalar.
    """
    z = (y - mean).abs() / alpha
    nll = z ** beta - beta.log() + alpha.log() + torch.lgamma(1 / beta) + math.log(2.0)
    return nll.sum(-1).mean()


class _GeneralizedGaussianLikelihood(Likelihood):
    """Reads a point posterior over [ŷ | α | β] columns [N, 3D] as GGD(ŷ, α, β)."""

    def __init__(self, num_outputs: int):
        self.num_outputs = num_outputs

    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> GeneralizedGaussianPredictive:
        mean, alpha, beta = posterior.mean.split(self.num_outputs, dim=-1)
        if self.num_outputs == 1:
            mean, alpha, beta = mean[..., 0], alpha[..., 0], beta[..., 0]
        return GeneralizedGaussianPredictive(mean, alpha, beta)


class _Cap(nn.Module):
    """The cap MLP: features [N, F] -> (δ, raw α, raw β), each [N, D]."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int, layers: int):
        super().__init__()
        sizes = [in_features] + [hidden] * layers
        self.trunk = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:], strict=False)
                                     for m in (nn.Linear(a, b), nn.ReLU())])
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], num_outputs) for _ in range(3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.trunk:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        for head in self.heads:  # start at the identity with the base α and β
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.trunk(z)
        return tuple(head(h) for head in self.heads)


@register_method("bayescap")
class BayesCapModel(BayesianModel):
    """A generalized-Gaussian uncertainty cap on a frozen regressor.

    Args:
        model: the frozen regressor, outputting means [N, D] (or [N]).
        task: ``"regression"``.
        hidden: width of the cap's hidden layers.
        layers: hidden layers of the cap (>= 1).
        use_inputs: feed the flattened inputs to the cap besides ŷ (the paper feeds ŷ
            only; inputs let α depend on where x is, e.g. heteroscedastic noise).
        input_features: the flattened input width for ``use_inputs`` (read off the
            model's first layer's ``in_features`` when ``None``).
        identity_weight: λ of the identity term (in units of the residual scale r).
        fraction: share of the training rows the cap is trained on, in (0, 1].
        beta_bounds: the range (β_min, β_max) of the shape β.
        inflate: grow α with the distance outside the training features' range.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: N (inferred by ``fit``).

    ``cap_outputs(x)`` returns the cap's (ỹ, α, β); the predictive is GGD(ŷ, α, β).
    """

    supported_tasks = ("regression",)
    default_epochs = 50
    default_lr = 1e-3
    default_batch_size = 128

    def __init__(self, model: nn.Module, task: str, *, hidden: int = 32, layers: int = 2,
                 use_inputs: bool = False, input_features: int | None = None,
                 identity_weight: float = 1000.0, fraction: float = 1.0,
                 beta_bounds: tuple[float, float] = (1.0, 3.0),
                 inflate: bool = True,
                 num_outputs: int | None = None, n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; bayescap needs the frozen regressor")
        super().__init__(model, task, n_data=n_data)
        width = infer_output_width(model) if num_outputs is None else num_outputs
        if width is None:
            raise InputError("could not infer the number of regression outputs from the "
                             "model; pass `num_outputs=`")
        self.num_outputs = check_positive_int(width, "num_outputs")
        self.use_inputs = bool(use_inputs)
        extra = 0
        if self.use_inputs:
            extra = input_features if input_features is not None else next(
                (m.in_features for m in model.modules()
                 if isinstance(getattr(m, "in_features", None), int)), None)
            if extra is None:
                raise InputError("use_inputs=True needs the flattened input width; pass "
                                 "`input_features=`")
            extra = check_positive_int(extra, "input_features")
        self.input_features = extra
        self.identity_weight = check_positive_float(identity_weight, "identity_weight",
                                                    allow_zero=True)
        self.fraction = check_fraction(fraction, "fraction", high_inclusive=True)
        low, high = (check_positive_float(b, "beta_bounds") for b in beta_bounds)
        if low >= high:
            raise InputError(f"`beta_bounds` must be (low, high) with low < high, got "
                             f"{beta_bounds}")
        self.beta_bounds = (low, high)
        self.inflate = bool(inflate)
        features = self.num_outputs + extra
        self.cap = _Cap(features, self.num_outputs, check_positive_int(hidden, "hidden"),
                        check_positive_int(layers, "layers")).to(self.dtype).to(self.device)
        kw = {"dtype": self.dtype, "device": self.device}
        self.register_buffer("feature_shift", torch.zeros(features, **kw))
        self.register_buffer("feature_scale", torch.ones(features, **kw))
        self.register_buffer("residual_scale", torch.ones(self.num_outputs, **kw))
        self.register_buffer("feature_low", torch.full((features,), -math.inf, **kw))
        self.register_buffer("feature_high", torch.full((features,), math.inf, **kw))
        self.likelihood = _GeneralizedGaussianLikelihood(self.num_outputs)

    # ------------------------------------------------------------------ the cap

    def _frozen(self, x: torch.Tensor) -> torch.Tensor:
        """ŷ [N, D] from the frozen network, run in eval mode."""
        with preserve_training_flags(self.model):
            self.model.eval()
            out = self.model(x)
        if out.dim() == 1:
            out = out[:, None]
        if out.dim() != 2 or out.shape[1] != self.num_outputs:
            raise InputError(f"the frozen model outputs shape {list(out.shape)}; bayescap "
                             f"needs means [N, {self.num_outputs}]")
        return out

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """[ŷ | flattened x] [N, D (+ F)] for the cap."""
        yhat = self._frozen(x)
        if not self.use_inputs:
            return yhat
        flat = x.reshape(x.shape[0], -1).to(yhat.dtype)
        if flat.shape[1] != self.input_features:
            raise InputError(f"`x` flattens to {flat.shape[1]} features; the cap was built "
                             f"for input_features={self.input_features}")
        return torch.cat([yhat, flat], dim=1)

    def _heads(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ŷ, ỹ, α, β), each [N, D], from cap features [N, D (+ F)]."""
        yhat = features[:, :self.num_outputs]
        z = (features - self.feature_shift) / self.feature_scale
        inside = torch.maximum(torch.minimum(z, self.feature_high), self.feature_low)
        delta, raw_alpha, raw_beta = self.cap(inside)
        r = self.residual_scale
        alpha = r * (F.softplus(raw_alpha + math.log(math.expm1(math.sqrt(2)))) + 1e-3)
        if self.inflate:
            outside = (z - inside).norm(dim=-1, keepdim=True)
            alpha = alpha * (1 + outside) + r * outside
        low, high = self.beta_bounds
        start = math.log((2 - low) / (high - 2)) if low < 2 < high else 0.0
        beta = low + (high - low) * torch.sigmoid(raw_beta + start)
        return yhat, yhat + r * delta, alpha, beta

    def cap_outputs(self, x: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cap's reconstruction ỹ, scale α and shape β at inputs x, each [N, D]."""
        x = torch.as_tensor(x, device=self.device)
        x = x.to(self.dtype) if x.is_floating_point() else x
        _, recon, alpha, beta = self._heads(self._features(x))
        return recon, alpha, beta

    def _cap_loss(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        yhat, recon, alpha, beta = self._heads(features)
        target = regression_targets(y, self.num_outputs)
        identity = (((recon - yhat) / self.residual_scale) ** 2).sum(-1).mean()
        return (self.identity_weight * identity
                + generalized_gaussian_nll(recon, alpha, beta, target))

    # ------------------------------------------------------------------ contract

    def train(self, mode: bool = True) -> BayesCapModel:
        """Switch the cap only: the frozen network keeps its own train/eval flags (it
        always runs in eval mode here)."""
        self.training = mode
        self.cap.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen network's mean, [N] (one output) or [N, D]."""
        yhat = self._frozen(x)
        return yhat[:, 0] if self.num_outputs == 1 else yhat

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cap's loss on a batch (no gradient reaches the frozen network)."""
        with torch.no_grad():
            features = self._features(x)
        return self._cap_loss(features, y)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._cap_loss(x, y)  # ``fit`` feeds cached features

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW on the cap's parameters only."""
        return torch.optim.AdamW(self.cap.parameters(), lr=lr, weight_decay=weight_decay)

    def training_batches(self, train: Any, *, batch_size: int,
                         generator: torch.Generator | None, shuffle: bool = True) -> Any:
        """Batches of cached cap features [B, D (+ F)] and targets, over ``fraction`` of
        the rows (in-memory data: a random subset; a DataLoader: its first batches)."""
        batches = super().training_batches(train, batch_size=batch_size,
                                           generator=generator, shuffle=shuffle)
        if not isinstance(batches, TensorBatches):
            return _LoaderFeatures(self, batches)
        x, y = batches.tensors
        keep = max(1, math.ceil(self.fraction * x.shape[0]))
        if keep < x.shape[0]:
            rows = torch.randperm(x.shape[0], generator=generator)[:keep].to(x.device)
            x, y = x[rows], y[rows]
        with torch.no_grad():
            features = torch.cat([self._features(chunk) for chunk in x.split(4096)])
        return TensorBatches(features, y, batch_size=batch_size, shuffle=shuffle,
                             generator=generator)

    @torch.no_grad()
    def on_fit_start(self, batches: Any) -> None:
        """Standardize the cap's inputs, set r to the frozen RMS residual, reset the cap."""
        features, targets = [], []
        for z, y in batches:
            features.append(z)
            targets.append(regression_targets(y, self.num_outputs))
            if sum(f.shape[0] for f in features) >= 65536:
                break
        z, y = torch.cat(features), torch.cat(targets)
        self.feature_shift.copy_(z.mean(0))
        scale = z.std(0, correction=0) if z.shape[0] > 1 else torch.ones_like(z[0])
        self.feature_scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
        rms = (y - z[:, :self.num_outputs]).pow(2).mean(0).sqrt()
        floor = 1e-6 * (y.abs().mean(0) + 1)
        self.residual_scale.copy_(torch.maximum(rms, floor))
        standardized = (z - self.feature_shift) / self.feature_scale
        self.feature_low.copy_(standardized.min(0).values)
        self.feature_high.copy_(standardized.max(0).values)
        self.cap.reset_parameters()

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> GaussianPosterior:
        """A point posterior over the columns [ŷ | α | β], [N, 3D]."""
        yhat, _, alpha, beta = self._heads(self._features(x))
        return GaussianPosterior(torch.cat([yhat, alpha, beta], dim=-1))


class _LoaderFeatures:
    """A DataLoader's (x, y) batches as (cap features, y), the first ``fraction`` of them."""

    def __init__(self, method: BayesCapModel, batches: Any):
        self.method, self.batches = method, batches
        self.num_rows = batches.num_rows

    def __len__(self) -> int:
        return max(1, math.ceil(self.method.fraction * len(self.batches)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            limit = len(self)
        except TypeError:
            limit = None
        for step, (x, y) in enumerate(self.batches):
            if limit is not None and step >= limit:
                break
            with torch.no_grad():
                features = self.method._features(x)
            yield features, y
