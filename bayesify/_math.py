"""Small numerical pieces shared across layers, likelihoods and predictives."""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_2PI", "normal_log_prob"]

LOG_2PI = math.log(2 * math.pi)


def normal_log_prob(y: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(y | mean, variance); the arguments broadcast against each other."""
    return -0.5 * (LOG_2PI + variance.log() + (y - mean) ** 2 / variance)
