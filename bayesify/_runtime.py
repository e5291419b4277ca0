"""Small pieces of the BayesianModel runtime: train/eval flag restoration, seeded
generators, and the checks ``predict`` runs on the network's outputs."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from bayesify._batching import num_rows
from bayesify.errors import BayesifyWarning, NumericalError
from bayesify.posterior import Posterior, SampledPosterior

__all__ = ["check_outputs", "make_generator", "preserve_training_flags", "with_offsets"]


@contextlib.contextmanager
def preserve_training_flags(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, also when the body raises."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def with_offsets(batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    start = 0
    for batch in batches:
        yield start, batch
        start += num_rows(batch)


def check_outputs(posterior: Posterior, start: int, *, first: bool, task: str) -> None:
    """Say in the user's terms when the network's outputs are not finite, and warn when
    a classifier's outputs look like probabilities rather than logits."""
    values = posterior.samples if isinstance(posterior, SampledPosterior) else posterior.mean
    finite = torch.isfinite(values).reshape(-1, values.shape[-2], values.shape[-1])
    bad = ~finite.all(-1).all(0)
    if bool(bad.any()):
        rows = (bad.nonzero()[:, 0] + start).tolist()
        raise NumericalError(
            f"the model's outputs for `x` hold NaN or inf at {len(rows)} input(s) (rows "
            f"{', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); `x` is "
            "finite, so the network's weights or its forward produce them: a diverged fit "
            "(re-fit with a lower lr or grad_clip) or a checkpoint with NaN weights")
    if first and task == "classification" and values.shape[-1] > 1:
        tol = 1e-3 if values.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if bool((values >= 0).all()) and bool(((values.sum(-1) - 1).abs() < tol).all()):
            warnings.warn(
                "the classifier's outputs look like probabilities (each row is >= 0 and "
                "sums to one), but bayesify reads them as logits, which makes every "
                "prediction nearly uniform; remove the model's final softmax (log_softmax "
                "is fine: it gives the same predictive)", BayesifyWarning, stacklevel=4)
