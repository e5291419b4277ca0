"""The deterministic baseline: the network as it is, softmax or point + noise.

Every table compares against this. Classification returns the softmax of the logits;
regression returns N(f(x), σ²) with the noise of :class:`~bayesify.likelihoods.GaussianNoise`
(homoscedastic by default), so its intervals reflect observation noise only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bayesify.core import BayesianModel, register_method
from bayesify.errors import InputError
from bayesify.likelihoods import (
    CategoricalLikelihood,
    GaussianLikelihood,
    GaussianNoise,
    infer_output_width,
    regression_targets,
)
from bayesify.posterior import GaussianPosterior

__all__ = ["DeterministicModel", "NetworkLikelihoodMixin"]


class NetworkLikelihoodMixin:
    """Likelihood plumbing shared by methods whose network outputs logits or means.

    Sets up ``self.noise`` and the Gaussian likelihood for regression (needs
    ``self.model``, ``self.task``) and provides the per-batch negative log likelihood,
    the point prediction, and the residual-based initialization of the noise at the
    start of training.
    """

    model: nn.Module
    task: str
    noise: GaussianNoise | None

    def _init_likelihood(self, noise: Any, num_outputs: int | None) -> None:
        """Set ``self.noise`` and ``self.likelihood`` (call before converting layers)."""
        self.noise = None
        if self.task == "regression":
            width = num_outputs
            if width is None:
                width = infer_output_width(self.model)
                if width is None:
                    raise InputError("could not infer the number of regression outputs from "
                                     "the model; pass `num_outputs=`")
                if noise == "heteroscedastic":
                    if width % 2:
                        raise InputError(
                            "noise='heteroscedastic' needs a model with 2*D outputs (means, "
                            f"then raw noise scales); its last layer has {width}"
                        )
                    width //= 2
            self.noise = GaussianNoise(noise, num_outputs=width, dtype=self.dtype,
                                       device=self.device)
            self.likelihood = GaussianLikelihood(self.noise.split)

    def _nll(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log likelihood of a batch from raw network output [B, K]."""
        if self.task == "classification":
            return CategoricalLikelihood.nll(output, y)
        return self.noise.nll(output, y)

    def _point(self, output: torch.Tensor) -> torch.Tensor:
        """Logits [N, C], or the regression mean [N] (one output) or [N, D]."""
        if self.task == "classification":
            return output
        mean, _ = self.noise.split(output)
        return mean[..., 0] if self.noise.num_outputs == 1 else mean

    @torch.no_grad()
    def _initialize_noise(self, batches: Any) -> None:
        """Start a learned homoscedastic noise at the residual RMS of the current network."""
        if self.noise is None or self.noise.kind != "homoscedastic":
            return
        residuals = []
        for x, y in batches:
            output = self.model(x)
            self.noise.check_output(output)
            residuals.append(regression_targets(y, self.noise.num_outputs) - output)
            if sum(r.shape[0] for r in residuals) >= 4096:
                break
        self.noise.initialize_from_residuals(torch.cat(residuals))


@register_method("deterministic")
class DeterministicModel(NetworkLikelihoodMixin, BayesianModel):
    """The network as a point estimate.

    Args:
        model: a network outputting logits [N, C] (classification) or means [N, D]
            (regression; [N, 2D] with ``noise="heteroscedastic"``).
        task: ``"classification"`` or ``"regression"``.
        noise: regression noise model: ``"homoscedastic"`` (learned, default),
            ``"heteroscedastic"`` or a fixed standard deviation.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: unused by this method (kept for a uniform signature).

    A classifier wraps as fitted (its weights are the whole model); a regressor needs
    ``fit`` to learn its noise unless ``noise`` is a fixed number.
    """

    def __init__(self, model: nn.Module, task: str, *, noise: Any = "homoscedastic",
                 num_outputs: int | None = None, n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; the deterministic method needs a network")
        super().__init__(model, task, n_data=n_data)
        self._init_likelihood(noise, num_outputs)
        if task == "classification" or self.noise.kind == "fixed":
            self._mark_fitted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._point(self.model(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._nll(self.model(x), y)

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            self._initialize_noise(batches)

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> GaussianPosterior:
        """A point mass at the network's output [N, K]."""
        return GaussianPosterior(self.model(x))
