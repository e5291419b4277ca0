"""Observation models shared by the methods that wrap a whole network.

Classification uses the categorical likelihood on the network's logits. Regression
needs an observation noise that a plain network does not output; :class:`GaussianNoise`
supplies it in one of three forms (``noise=``):

* ``"homoscedastic"``: one learned standard deviation per output (the default);
* ``"heteroscedastic"``: the network outputs 2·D columns, means then raw scales, and
  the variance is ``softplus(raw) + min_variance`` per input;
* a positive float: a fixed noise standard deviation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._math import normal_log_prob
from bayesify._validation import check_positive_float
from bayesify.errors import InputError

__all__ = ["GaussianNoise", "infer_output_width", "gaussian_nll", "regression_targets"]



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


class GaussianNoise(nn.Module):
    """Gaussian observation noise for regression.

    Args:
        noise: ``"homoscedastic"``, ``"heteroscedastic"`` or a fixed standard deviation.
        num_outputs: D, the number of regression outputs.
        min_variance: floor on the heteroscedastic variance, for numerical safety.
    """

    def __init__(self, noise: Any = "homoscedastic", num_outputs: int = 1,
                 min_variance: float = 1e-6):
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
            self.register_buffer("fixed_log_std", torch.full((num_outputs,), math.log(std)))
        if self.kind == "homoscedastic":
            self.log_std = nn.Parameter(torch.zeros(num_outputs))

    @property
    def model_outputs(self) -> int:
        """How many columns the network must output for this noise model."""
        return 2 * self.num_outputs if self.kind == "heteroscedastic" else self.num_outputs

    def check_output(self, output: torch.Tensor) -> None:
        if output.dim() != 2 or output.shape[1] != self.model_outputs:
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
