"""Likelihoods: how a posterior over latent outputs f becomes a Predictive, in one place.

* :class:`CategoricalLikelihood` reads f as logits. A sampled posterior averages the
  softmax over its draws; a Gaussian posterior does so over MC draws of the logits
  (``approximation="mc"``) or uses the probit approximation (``"probit"``).
* :class:`GaussianLikelihood` reads f as regression outputs through a noise model: a
  sampled posterior becomes a :class:`~bayesify.predictive.MixturePredictive`, a Gaussian
  one a :class:`~bayesify.predictive.GaussianPredictive` with the noise added.

Regression needs an observation noise that a plain network does not output;
:class:`GaussianNoise` supplies it in one of three forms (``noise=``):

* ``"homoscedastic"``: one learned standard deviation per output (the default);
* ``"heteroscedastic"``: the network outputs 2·D columns, means then raw scales, and
  the variance is ``softplus(raw) + min_variance`` per input;
* a positive float: a fixed noise standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._math import normal_log_prob
from bayesify._validation import (
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.errors import InputError
from bayesify.posterior import GaussianPosterior, Posterior, SampledPosterior
from bayesify.predictive import (
    CategoricalPredictive,
    GaussianPredictive,
    MixturePredictive,
    Predictive,
)

__all__ = [
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "GaussianNoise",
    "Likelihood",
    "gaussian_nll",
    "infer_output_width",
    "regression_targets",
]

#: Logit draws of the MC approximation when neither the caller nor the method says.
DEFAULT_LOGIT_SAMPLES = 100


def infer_output_width(model: nn.Module | None) -> int | None:
    """Width of a model's last layer with ``out_features`` (or ``out_channels``), if any."""
    if model is None:
        return None
    width = None
    for module in model.modules():
        for attr in ("out_features", "out_channels"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                width = value
    return width


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over points of the Gaussian negative log likelihood summed over outputs.

    Args:
        mean, variance, y: [N, D] each.

    Returns:
        A scalar.
    """
    return -normal_log_prob(y, mean, variance).sum(-1).mean()


def regression_targets(y: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Targets as [N, D]; [N] is accepted for one output, anything else raises."""
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2 or y.shape[1] != num_outputs:
        raise InputError(f"`y` must have shape [N] or [N, {num_outputs}] for a model with "
                         f"{num_outputs} output(s), got {list(y.shape)}")
    return y


def _with_scores(pred: Predictive, posterior: Posterior) -> Predictive:
    return pred.with_scores(**posterior.scores) if posterior.scores else pred


def _flat(posterior: Posterior) -> None:
    if posterior.mean.dim() != 2:
        raise InputError("a Predictive describes N points: pass a posterior with mean "
                         f"[N, K], got {list(posterior.mean.shape)}")


class Likelihood:
    """Maps a :class:`~bayesify.posterior.Posterior` over latent f to a Predictive."""

    def __call__(self, posterior: Posterior, *, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Predictive:
        _flat(posterior)
        return _with_scores(self._predictive(posterior, num_samples, generator), posterior)

    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> Predictive:
        raise NotImplementedError  # pragma: no cover - abstract


class CategoricalLikelihood(Likelihood):
    """Softmax over logits f [N, C].

    Args:
        approximation: for a Gaussian posterior over logits, ``"mc"`` averages the
            softmax over draws of the logits (exact as the draws grow) or ``"probit"``
            uses softmax(μ / √(1 + π/8·σ²)) (MacKay's approximation; deterministic).
        num_samples: logit draws for ``"mc"`` when ``predict`` does not say.
    """

    approximations = ("mc", "probit")

    def __init__(self, approximation: str = "mc", num_samples: int = DEFAULT_LOGIT_SAMPLES):
        self.approximation = check_choice(approximation, "approximation", self.approximations)
        self.num_samples = check_positive_int(num_samples, "num_samples")

    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> CategoricalPredictive:
        if isinstance(posterior, SampledPosterior):
            return CategoricalPredictive.from_logits(sample_logits=posterior.samples)
        if not isinstance(posterior, GaussianPosterior):
            raise InputError(f"cannot map a {type(posterior).__name__} to class probabilities")
        if posterior.is_deterministic:
            return CategoricalPredictive.from_logits(posterior.mean)
        if self.approximation == "probit":
            scale = torch.rsqrt(1 + (math.pi / 8) * posterior.variance)
            return CategoricalPredictive.from_logits(posterior.mean * scale)
        draws = posterior.sample(num_samples or self.num_samples, generator)
        return CategoricalPredictive.from_logits(sample_logits=draws)

    @staticmethod
    def nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of labels y [N] under logits [N, C] (a scalar)."""
        if logits.dim() != 2:
            raise InputError(f"a classifier must output logits [N, C], got {list(logits.shape)}")
        return F.cross_entropy(logits, check_labels(y, "y", logits.shape[1]))


NoiseSplit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GaussianLikelihood(Likelihood):
    """Gaussian observation noise around regression outputs.

    Args:
        split: maps raw outputs f [..., N, K] to ``(mean [..., N, D], noise variance
            [..., N, D])``, e.g. :meth:`GaussianNoise.split`.

    A sampled posterior gives the mixture of its S Gaussians (epistemic spread between
    the components, noise within); a Gaussian posterior gives N(μ, σ²_f + σ²_noise) with
    the epistemic part from the first D columns of its variance. One output (D = 1)
    gives [N]-shaped predictives.
    """

    def __init__(self, split: NoiseSplit):
        self.split = split

    @staticmethod
    def _squeeze(t: torch.Tensor) -> torch.Tensor:
        return t[..., 0] if t.shape[-1] == 1 else t

    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> Predictive:
        if isinstance(posterior, SampledPosterior):
            means, variances = self.split(posterior.samples)
            return MixturePredictive(self._squeeze(means), self._squeeze(variances))
        if not isinstance(posterior, GaussianPosterior):
            raise InputError(f"cannot map a {type(posterior).__name__} to a regression "
                             "predictive")
        mean, noise = self.split(posterior.mean)
        epistemic = posterior.variance[..., :mean.shape[-1]]
        return GaussianPredictive(self._squeeze(mean), self._squeeze(epistemic + noise),
                                  aleatoric_variance=self._squeeze(noise))


class GaussianNoise(nn.Module):
    """Gaussian observation noise for regression.

    Args:
        noise: ``"homoscedastic"``, ``"heteroscedastic"`` or a fixed standard deviation.
        num_outputs: D, the number of regression outputs.
        min_variance: floor on the heteroscedastic variance, for numerical safety.
        dtype, device: of the noise parameters: the wrapped model's (a noise made on
            the CPU would break a CUDA model's regression).
    """

    def __init__(self, noise: Any = "homoscedastic", num_outputs: int = 1,
                 min_variance: float = 1e-6, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_outputs = num_outputs
        self.min_variance = min_variance
        if isinstance(noise, str):
            if noise not in ("homoscedastic", "heteroscedastic"):
                raise InputError("`noise` must be 'homoscedastic', 'heteroscedastic' or a "
                                 f"positive float (a fixed noise std), got {noise!r}")
            self.kind = noise
        else:
            self.kind = "fixed"
            std = check_positive_float(noise, "noise")
            self.register_buffer("fixed_log_std", torch.full(
                (num_outputs,), math.log(std), dtype=dtype, device=device))
        if self.kind == "homoscedastic":
            self.log_std = nn.Parameter(torch.zeros(num_outputs, dtype=dtype, device=device))

    @property
    def model_outputs(self) -> int:
        """How many columns the network must output for this noise model."""
        return 2 * self.num_outputs if self.kind == "heteroscedastic" else self.num_outputs

    def check_output(self, output: torch.Tensor) -> None:
        """Raise unless ``output`` is [..., N, K] with K = ``model_outputs``."""
        if output.dim() < 2 or output.shape[-1] != self.model_outputs:
            extra = (" (means, then raw noise scales)" if self.kind == "heteroscedastic" else "")
            raise InputError(
                f"the model outputs shape {list(output.shape)}, but noise={self.kind!r} with "
                f"{self.num_outputs} output(s) needs [N, {self.model_outputs}]{extra}"
            )

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and noise variance from network output.

        Args:
            output: [..., N, K] with K = ``model_outputs``.

        Returns:
            ``(mean, variance)``, each [..., N, D].
        """
        self.check_output(output)
        d = self.num_outputs
        if self.kind == "heteroscedastic":
            mean, raw = output[..., :d], output[..., d:]
            return mean, F.softplus(raw) + self.min_variance
        log_std = self.log_std if self.kind == "homoscedastic" else self.fixed_log_std
        variance = torch.exp(2 * log_std).to(output.dtype).expand_as(output)
        return output, variance

    def nll(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar NLL of targets ``y`` [N] or [N, D] under network output [N, K]."""
        mean, variance = self.split(output)
        return gaussian_nll(mean, variance, regression_targets(y, self.num_outputs))

    @torch.no_grad()
    def initialize_from_residuals(self, residuals: torch.Tensor) -> None:
        """Set a homoscedastic noise to the RMS of residuals [N, D] (its MLE)."""
        if self.kind == "homoscedastic":
            rms = residuals.pow(2).mean(0).sqrt().clamp_min(1e-3)
            self.log_std.copy_(rms.log().to(self.log_std.dtype))
