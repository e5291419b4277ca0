"""Classification predictives: class probabilities, optionally per posterior sample."""

from __future__ import annotations

import math
from typing import Any

import torch

from bayesify._validation import as_tensor, check_labels, check_probabilities
from bayesify.errors import InputError
from bayesify.predictive.base import Predictive

__all__ = ["CategoricalPredictive"]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    # 0 log 0 = 0, and no NaN gradient through the zero entries.
    logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(-1)


class CategoricalPredictive(Predictive):
    """Class probabilities for N inputs, optionally with S posterior samples.

    Args:
        probs: predictive class probabilities [N, C]; rows sum to one. May be ``None``
            when ``sample_probs`` is given, in which case it is their mean.
        sample_probs: per-sample probabilities [S, N, C] from a sampling method, or
            ``None`` for a single (deterministic or analytic) predictive.

    The entropy of ``probs`` splits exactly into ``aleatoric()`` (the expected entropy
    of the samples) and ``epistemic()`` (the mutual information between label and
    weights); without samples the epistemic part is zero.
    """

    _point_fields = ("probs", "sample_probs")
    _point_dims = (0, 1)

    def __init__(self, probs: torch.Tensor | None, sample_probs: torch.Tensor | None = None):
        if sample_probs is not None:
            sample_probs = as_tensor(sample_probs, "sample_probs", ndim=3)
            check_probabilities(sample_probs, "sample_probs")
            mean = sample_probs.mean(0)
            if probs is None:
                probs = mean
            else:
                probs = as_tensor(probs, "probs", ndim=2)
                if probs.shape != mean.shape:
                    raise InputError(
                        f"`probs` has shape {tuple(probs.shape)} but `sample_probs` "
                        f"{tuple(sample_probs.shape)}; expected [N, C] and [S, N, C]"
                    )
                tol = 1e-4 if probs.dtype != torch.float64 else 1e-8
                if float((probs - mean.to(probs.dtype)).abs().max()) > tol:
                    raise InputError(
                        "`probs` must be the mean of `sample_probs` over samples; "
                        "pass probs=None to have it computed"
                    )
        elif probs is None:
            raise InputError("`probs` is None; pass probabilities [N, C] or `sample_probs`")
        probs = as_tensor(probs, "probs", ndim=2)
        check_probabilities(probs, "probs")
        self._probs = probs
        self._sample_probs = sample_probs

    @classmethod
    def from_logits(cls, logits: torch.Tensor | None = None,
                    sample_logits: torch.Tensor | None = None) -> CategoricalPredictive:
        """Build from logits [N, C] or sampled logits [S, N, C].

        Sampled logits are averaged in probability space through log-mean-exp of the
        log-softmax, which stays accurate when individual probabilities underflow.
        """
        if sample_logits is not None:
            sample_logits = as_tensor(sample_logits, "sample_logits", ndim=3)
            log_probs = torch.log_softmax(sample_logits, dim=-1)
            mean_log = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
            return cls(torch.softmax(mean_log, dim=-1), log_probs.exp())
        if logits is None:
            raise InputError("pass `logits` [N, C] or `sample_logits` [S, N, C]")
        logits = as_tensor(logits, "logits", ndim=2)
        return cls(torch.softmax(logits, dim=-1))

    @property
    def probs(self) -> torch.Tensor:
        """Predictive class probabilities [N, C]."""
        return self._probs

    @property
    def sample_probs(self) -> torch.Tensor | None:
        """Per-sample class probabilities [S, N, C], or ``None``."""
        return self._sample_probs

    @property
    def num_points(self) -> int:
        return int(self._probs.shape[0])

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return int(self._probs.shape[1])

    @property
    def labels(self) -> torch.Tensor:
        """The most probable class per input [N] (int64)."""
        return self._probs.argmax(-1)

    @property
    def confidence(self) -> torch.Tensor:
        """The probability of the most probable class [N]."""
        return self._probs.max(-1).values

    def log_prob(self, y: Any) -> torch.Tensor:
        """Log predictive probability of the labels ``y`` [N] -> [N]."""
        y = as_tensor(y, "y", device=self._probs.device)
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1 or y.shape[0] != self.num_points:
            raise InputError(
                f"`y` must have shape [{self.num_points}] (one label per point), "
                f"got {tuple(y.shape)}"
            )
        y = check_labels(y, "y", self.num_classes)
        p = self._probs.gather(1, y[:, None])[:, 0]
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))

    def entropy(self) -> torch.Tensor:
        """Total predictive entropy H[E_w p(y|x,w)] in nats [N]."""
        return _entropy(self._probs)

    def aleatoric(self) -> torch.Tensor:
        """Expected entropy E_w H[p(y|x,w)] [N]; the total entropy without samples."""
        if self._sample_probs is None:
            return self.entropy()
        return _entropy(self._sample_probs).mean(0)

    def epistemic(self) -> torch.Tensor:
        """Mutual information between label and weights, entropy - aleatoric [N]."""
        if self._sample_probs is None:
            return torch.zeros_like(self._probs[:, 0])
        return self.entropy() - self.aleatoric()

    def __repr__(self) -> str:
        samples = "" if self._sample_probs is None else f", samples={self._sample_probs.shape[0]}"
        return f"CategoricalPredictive(N={self.num_points}, C={self.num_classes}{samples})"
