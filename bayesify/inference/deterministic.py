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

    def _init_likelihood(self, noise: Any, num_outputs: int | None, *,
                         noise_param: str | None = None, beta: float = 0.0) -> None:
        """Set ``self.noise`` and ``self.likelihood`` (call before converting layers).

        Args:
            noise: ``"homoscedastic"``, ``"heteroscedastic"`` or a fixed noise std.
            num_outputs: D, or ``None`` to read it off the model's last layer (halved
                for a heteroscedastic network's [N, 2D] output).
            noise_param: how a heteroscedastic network's noise columns give the
                variance (:data:`~bayesify.likelihoods.NOISE_PARAMETERIZATIONS`).
            beta: β of the β-NLL training loss for heteroscedastic noise (0: the NLL).
        """
        self.noise = None
        if self.task == "classification":
            for name, value, default in (("noise_param", noise_param, None),
                                         ("beta", beta, 0.0)):
                if value != default:
                    raise InputError(f"`{name}` applies to task='regression', got "
                                     f"{name}={value!r} for classification")
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
                            f"then raw noise columns); its last layer has {width}"
                        )
                    width //= 2
            self.noise = GaussianNoise(noise, num_outputs=width, noise_param=noise_param,
                                       beta=beta, dtype=self.dtype, device=self.device)
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
            output = self.call_network(x)
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
            ``"heteroscedastic"`` (the network outputs means then noise columns) or a
            fixed standard deviation.
        noise_param: how a heteroscedastic network's noise columns r give the variance:
            ``"softplus"`` (σ² = softplus(r), default), ``"softplus_std"``,
            ``"log_variance"`` (σ² = exp(r)) or ``"log_std"``.
        beta: β-NLL exponent in [0, 1] for training a heteroscedastic network
            (Seitzer et al., 2022); 0 (default) trains on the plain NLL.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: unused by this method (kept for a uniform signature).

    A classifier wraps as fitted (its weights are the whole model), and so does a
    regressor whose noise is heteroscedastic (the network outputs it) or fixed: a
    pretrained network predicts at once. A homoscedastic regressor needs ``fit`` to
    learn its noise.

    Example:
        >>> # a pretrained network whose output is [mean, log-variance] per target
        >>> bm = bayesify(net, "deterministic", task="regression",
        ...               noise="heteroscedastic", noise_param="log_variance")
        >>> pred = bm.predict(x)              # GaussianPredictive, no fit needed
    """

    def __init__(self, model: nn.Module, task: str, *, noise: Any = "homoscedastic",
                 noise_param: str | None = None, beta: float = 0.0,
                 num_outputs: int | None = None, n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; the deterministic method needs a network")
        super().__init__(model, task, n_data=n_data)
        self._init_likelihood(noise, num_outputs, noise_param=noise_param, beta=beta)
        if task == "classification" or self.noise.kind != "homoscedastic":
            self._mark_fitted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._point(self.call_network(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._nll(self.call_network(x), y)

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            self._initialize_noise(batches)

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> GaussianPosterior:
        """A point mass at the network's output [N, K]."""
        return GaussianPosterior(self.call_network(x))
