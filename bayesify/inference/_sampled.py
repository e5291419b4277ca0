"""The posterior of methods that sample whole networks (MC dropout, IVON): raw outputs
[S, N, K] checked against the task, so a wrong output shape is reported in terms of
the user's model rather than of an internal tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bayesify.errors import InputError
from bayesify.posterior import SampledPosterior

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["sampled_posterior"]


def sampled_posterior(method: BayesianModel, outputs: torch.Tensor) -> SampledPosterior:
    """Wrap the network's outputs under S posterior samples.

    Args:
        method: the method that drew them (its ``task`` and, for regression, ``noise``).
        outputs: [S, N, K]: logits (K = C), means (K = D) or means and raw noise
            scales (K = 2·D).

    Raises:
        InputError: the model's output per sample is not [N, K] as the task needs.
    """
    if method.task == "classification":
        if outputs.dim() != 3:
            raise InputError("a classifier must output logits [N, C], but the model "
                             f"outputs shape {list(outputs.shape[1:])}")
    else:
        method.noise.check_output(outputs[0])
        if outputs.dim() != 3:
            raise InputError("a regressor must output [N, D], but the model outputs "
                             f"shape {list(outputs.shape[1:])}")
    return SampledPosterior(outputs)
