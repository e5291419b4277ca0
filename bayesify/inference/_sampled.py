"""What the methods that sample whole networks (MC dropout, IVON) share: their posterior,
raw outputs [S, N, K] checked against the task (so a wrong output shape is reported in
terms of the user's model rather than of an internal tensor) and kept in at least
float32, and the stack level that points a warning at the user's line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch

from bayesify.errors import InputError
from bayesify.posterior import SampledPosterior

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["sampled_posterior", "user_stacklevel"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 os.path.dirname(os.path.abspath(torch.__file__)))


def sampled_posterior(method: BayesianModel, outputs: torch.Tensor) -> SampledPosterior:
    """Wrap the network's outputs under S posterior samples.

    Outputs in float16/bfloat16 (low-precision weights, or ``torch.autocast``) are
    upcast to float32: the predictive averages S softmaxes or mixes S Gaussians, and at
    8 bits of mantissa a probability row already sums to 1 ± 2⁻⁸. The upcast is
    differentiable, so the posterior stays differentiable in x.

    Args:
        method: the method that drew them (its ``task`` and, for regression, ``noise``).
        outputs: [S, N, K]: logits (K = C), means (K = D) or means and raw noise
            scales (K = 2·D), in any floating dtype.

    Returns:
        A SampledPosterior over [S, N, K] in float32 or wider.

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
    if outputs.dtype in _LOW_PRECISION:
        outputs = outputs.float()
    return SampledPosterior(outputs)


def user_stacklevel() -> int:
    """``stacklevel`` for a warning issued by the caller, pointing at the first frame
    outside bayesify and torch (the user's line, however deep the call chain)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
