"""Fits that see the whole training set at once: closed form / L-BFGS and MCMC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bayesify._batching import cat_inputs, num_rows
from bayesify.errors import InputError
from bayesify.fitting.options import FitOptions, FitStrategy

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["CLOSED_FORM", "MCMC", "FullBatchFit"]

# Rows per forward pass while gathering in-memory data (the method sees all of it).
_GATHER_BATCH = 1 << 62


class FullBatchFit(FitStrategy):
    """Gather the training set into X [N, ...] (a tensor, or a mapping or tuple of them
    for structured inputs), y [N] or [N, D] and call the
    method's ``fit_full_batch(x, y, seed=..., progress=...)`` once.

    Args:
        description: what the method does with the data ("MCMC (NUTS)"), for messages.
    """

    applies = frozenset({"progress", "seed"})

    def __init__(self, description: str):
        self.description = description

    def run(self, method: BayesianModel, train: Any, options: FitOptions) -> None:
        batches = method.training_batches(train, batch_size=_GATHER_BATCH, generator=None,
                                          shuffle=False)
        pairs = list(batches)
        if not pairs:
            raise InputError("`train` is empty; pass at least one training example")
        x = cat_inputs([p[0] for p in pairs])
        y = torch.cat([p[1] for p in pairs])
        if method.n_data is None:
            method.n_data = num_rows(x)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        method.fit_full_batch(x, y, seed=options.seed, progress=options.progress)


CLOSED_FORM = FullBatchFit("a closed-form / L-BFGS fit on the whole training set")
MCMC = FullBatchFit("MCMC on the whole training set")
