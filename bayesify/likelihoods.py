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
* ``"heteroscedastic"``: the network outputs 2·D columns, means then raw noise columns
  r, read as ``noise_param`` says: ``"softplus"`` σ² = softplus(r) (the default),
  ``"softplus_std"`` σ = softplus(r), ``"log_variance"`` σ² = exp(r) or ``"log_std"``
  σ = exp(r); ``min_variance`` is added to σ² in every case. A pretrained network that
  outputs a mean and a log-variance is read as it is, with no conversion;
* a positive float: a fixed noise standard deviation.

Heteroscedastic training can use β-NLL (Seitzer et al., 2022, ``beta=``): each point's
NLL is weighted by its predicted variance to the power β with the gradient stopped
through the weight, so that points with large predicted variance do not stop learning
their mean. β = 0 is the plain NLL; β = 0.5 is the paper's recommendation; β = 1 gives
the mean the gradient of the squared error.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._math import normal_log_prob
from bayesify._validation import (
    check_choice,
    check_fraction,
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
    "NOISE_PARAMETERIZATIONS",
    "beta_nll",
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


def beta_nll(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor,
             beta: float) -> torch.Tensor:
    """β-NLL (Seitzer et al., 2022): the Gaussian NLL of each entry weighted by its
    variance to the power β, the weight detached; mean over points, sum over outputs.

    Args:
        mean, variance, y: [N, D] each.
        beta: β in [0, 1]; 0 gives :func:`gaussian_nll` exactly.

    Returns:
        A scalar. Its gradient in ``mean`` and ``variance`` is the NLL's times
        ``variance**beta`` entrywise.
    """
    nll = -normal_log_prob(y, mean, variance)
    if beta:
        nll = nll * variance.detach() ** beta
    return nll.sum(-1).mean()


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
        raise InputError("a Predictive describes N points: the posterior's mean must be "
                         f"[N, K] (logits or means), got {list(posterior.mean.shape)}; if "
                         "the network returns more (hidden states [N, T, H], say), pass "
                         "output=lambda out: ... to bayesify(...) to pick the logits or means")


class Likelihood(abc.ABC):
    """Maps a :class:`~bayesify.posterior.Posterior` over latent f to a Predictive."""

    def __call__(self, posterior: Posterior, *, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Predictive:
        _flat(posterior)
        return _with_scores(self._predictive(posterior, num_samples, generator), posterior)

    @abc.abstractmethod
    def _predictive(self, posterior: Posterior, num_samples: int | None,
                    generator: torch.Generator | None) -> Predictive:
        """The Predictive of a posterior over N points (mean [N, K])."""


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


#: How a heteroscedastic network's raw noise column r becomes the variance σ².
NOISE_PARAMETERIZATIONS: dict[str, str] = {
    "softplus": "σ² = softplus(r)",
    "softplus_std": "σ = softplus(r)",
    "log_variance": "σ² = exp(r)",
    "log_std": "σ = exp(r)",
}


def _raw_to_variance(raw: torch.Tensor, param: str) -> torch.Tensor:
    if param == "softplus":
        return F.softplus(raw)
    if param == "softplus_std":
        return F.softplus(raw).square()
    if param == "log_variance":
        return raw.exp()
    return (2 * raw).exp()  # log_std


class GaussianNoise(nn.Module):
    """Gaussian observation noise for regression.

    Args:
        noise: ``"homoscedastic"``, ``"heteroscedastic"`` or a fixed standard deviation.
        num_outputs: D, the number of regression outputs.
        min_variance: added to the heteroscedastic variance, for numerical safety (>= 0).
        noise_param: how the network's raw noise columns give the variance, for
            ``noise="heteroscedastic"`` only: ``"softplus"`` (default), ``"softplus_std"``,
            ``"log_variance"`` or ``"log_std"`` (see :data:`NOISE_PARAMETERIZATIONS`).
        beta: β of the β-NLL training loss, in [0, 1], for ``noise="heteroscedastic"``
            only; 0 (default) is the plain NLL. Prediction is unaffected.
        dtype, device: of the noise parameters: the wrapped model's (a noise made on
            the CPU would break a CUDA model's regression).
    """

    def __init__(self, noise: Any = "homoscedastic", num_outputs: int = 1,
                 min_variance: float = 1e-6, *, noise_param: str | None = None,
                 beta: float = 0.0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_outputs = check_positive_int(num_outputs, "num_outputs")
        self.min_variance = check_positive_float(min_variance, "min_variance", allow_zero=True)
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
        if self.kind != "heteroscedastic":
            for name, value, default in (("noise_param", noise_param, None),
                                         ("beta", beta, 0.0)):
                if value != default:
                    raise InputError(
                        f"`{name}` applies to noise='heteroscedastic' (a network that outputs "
                        f"its own noise), got {name}={value!r} with noise={noise!r}")
        self.noise_param = check_choice("softplus" if noise_param is None else noise_param,
                                        "noise_param", tuple(NOISE_PARAMETERIZATIONS))
        self.beta = check_fraction(beta, "beta", low_inclusive=True, high_inclusive=True)
        if self.kind == "homoscedastic":
            self.log_std = nn.Parameter(torch.zeros(num_outputs, dtype=dtype, device=device))

    @property
    def model_outputs(self) -> int:
        """How many columns the network must output for this noise model."""
        return 2 * self.num_outputs if self.kind == "heteroscedastic" else self.num_outputs

    def check_output(self, output: torch.Tensor) -> None:
        """Raise unless ``output`` is [..., N, K] with K = ``model_outputs``."""
        if output.dim() < 2 or output.shape[-1] != self.model_outputs:
            extra = (f" (means, then raw noise columns r with "
                     f"{NOISE_PARAMETERIZATIONS[self.noise_param]})"
                     if self.kind == "heteroscedastic" else "")
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
            return mean, _raw_to_variance(raw, self.noise_param) + self.min_variance
        log_std = self.log_std if self.kind == "homoscedastic" else self.fixed_log_std
        variance = torch.exp(2 * log_std).to(output.dtype).expand_as(output)
        return output, variance

    def nll(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of targets ``y`` [N] or [N, D] under network output [N, K]:
        the Gaussian NLL (mean over points, sum over outputs), or β-NLL when ``beta`` > 0."""
        mean, variance = self.split(output)
        return beta_nll(mean, variance, regression_targets(y, self.num_outputs), self.beta)

    def extra_repr(self) -> str:
        extra = (f", noise_param={self.noise_param!r}, beta={self.beta}"
                 if self.kind == "heteroscedastic" else "")
        return f"kind={self.kind!r}, num_outputs={self.num_outputs}{extra}"

    @torch.no_grad()
    def initialize_from_residuals(self, residuals: torch.Tensor) -> None:
        """Set a homoscedastic noise to the RMS of residuals [N, D] (its MLE)."""
        if self.kind == "homoscedastic":
            rms = residuals.pow(2).mean(0).sqrt().clamp_min(1e-3)
            self.log_std.copy_(rms.log().to(self.log_std.dtype))
