"""Calibration metrics for classifiers: accuracy, ECE, MCE, adaptive ECE, Brier, NLL.

Every metric takes a :class:`~bayesify.predictive.CategoricalPredictive` or raw class
probabilities [N, C] (tensor or array) and integer labels [N], checks them once, and
returns a Python float computed in float64, so CPU and GPU give the same number up to
float64 rounding.

Binning conventions (stated once, used everywhere):

* **Equal-width** (``strategy="uniform"``, ECE and MCE): B bins ``[b/B, (b+1)/B)``,
  left-closed; a confidence ``c`` goes to bin ``min(floor(c * B), B - 1)``, computed in
  float64, so ``c = 1.0`` lands in the last bin (torchmetrics puts it in a hidden extra
  bin) and a value exactly on an inner edge ``b/B`` goes to bin ``b``.
* **Equal-mass** (``strategy="quantile"``, adaptive ECE): points are sorted by
  confidence (ties broken by correctness, so the result does not depend on the input
  order) and split into B consecutive groups whose sizes differ by at most one, the
  first ``N mod B`` groups holding the extra point (``numpy.array_split``'s rule).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from bayesify._validation import (
    as_tensor,
    check_choice,
    check_labels,
    check_positive_int,
    check_probabilities,
    check_same_length,
)
from bayesify.errors import InputError
from bayesify.predictive import CategoricalPredictive, Predictive

__all__ = [
    "CalibrationBins",
    "accuracy",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "classification_nll",
    "expected_calibration_error",
    "maximum_calibration_error",
]

BIN_STRATEGIES = ("uniform", "quantile")


class CalibrationBins(NamedTuple):
    """Per-bin statistics of a reliability diagram (all float64 except ``counts``).

    Attributes:
        confidence: mean confidence per bin [B] (0 for an empty bin).
        accuracy: mean correctness per bin [B] (0 for an empty bin).
        counts: number of points per bin [B] (int64); mask empty bins with ``counts > 0``.
        edges: bin edges [B + 1]; ``linspace(0, 1, B + 1)`` for equal-width bins, for
            equal-mass bins 0, the smallest confidence of bins 1..B-1, then 1.
    """

    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor
    edges: torch.Tensor


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _probs_and_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated probabilities [N, C] (caller's dtype) and int64 labels [N], same device."""
    if isinstance(probs, CategoricalPredictive):
        p = probs.probs  # validated when the predictive was built
    elif isinstance(probs, Predictive):
        raise InputError(f"`probs` must be a CategoricalPredictive or probabilities [N, C], "
                         f"got a {type(probs).__name__}; use the regression metrics for it")
    else:
        p = as_tensor(probs, "probs", ndim=2, finite=False)
        check_probabilities(p, "probs")  # includes the NaN/inf check
    y = as_tensor(labels, "labels", device=p.device)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise InputError(f"`labels` must have shape [N] (one class index per row), "
                         f"got {list(y.shape)}")
    check_same_length(probs=p, labels=y)
    return p, check_labels(y, "labels", int(p.shape[1]))


def _top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-label confidence [N] and correctness [N] (first class wins ties)."""
    # max/argmax in the input dtype are exact; only the [N] results are widened.
    confidence, predicted = probs.max(-1)
    return confidence.double(), (predicted == labels).double()


# --------------------------------------------------------------------------------------
# Binning (pure functions on float64 tensors)
# --------------------------------------------------------------------------------------


def _uniform_bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    # Truncation is floor here (confidence >= 0), and cheaper than floor + cast.
    return (confidence * n_bins).long().clamp_(max=n_bins - 1)


def _quantile_bin_index(confidence: torch.Tensor, correct: torch.Tensor,
                        n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-mass bin index of each point [N] and the sorted confidences [N]."""
    n = confidence.shape[0]
    # Lexicographic (confidence, correct) order by two stable sorts: tied confidences are
    # grouped identically whatever order the caller passed them in.
    by_correct = torch.sort(correct, stable=True).indices
    by_conf = torch.sort(confidence[by_correct], stable=True).indices
    order = by_correct[by_conf]
    base, extra = divmod(n, n_bins)
    sizes = torch.full((n_bins,), base, dtype=torch.long, device=confidence.device)
    sizes[:extra] += 1
    ends = torch.cumsum(sizes, 0)
    positions = torch.arange(n, device=confidence.device)
    index = torch.empty(n, dtype=torch.long, device=confidence.device)
    index[order] = torch.searchsorted(ends, positions, right=True)
    return index, confidence[order]


def _bin_sums(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int,
              strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin sums of confidence and correctness [B], counts [B] and edges [B + 1]."""
    if strategy == "uniform":
        index = _uniform_bin_index(confidence, n_bins)
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=confidence.device)
    else:
        index, sorted_conf = _quantile_bin_index(confidence, correct, n_bins)
        n = confidence.shape[0]
        starts = torch.arange(1, n_bins, device=confidence.device) * (n // n_bins)
        starts += torch.arange(1, n_bins, device=confidence.device).clamp(max=n % n_bins)
        inner = sorted_conf[starts.clamp(max=n - 1)]
        edges = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
    counts = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    return conf_sum, correct_sum, counts, edges


def _calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int,
                       strategy: str, reduction: str) -> float:
    conf_sum, correct_sum, counts, _ = _bin_sums(confidence, correct, n_bins, strategy)
    gap = (correct_sum - conf_sum).abs()  # = n_b * |acc_b - conf_b|
    if reduction == "mean":
        return float(gap.sum() / confidence.shape[0])
    nonempty = counts > 0
    return float((gap[nonempty] / counts[nonempty]).max())


def _checked_calibration_error(probs: Any, labels: Any, n_bins: Any, strategy: str,
                               reduction: str) -> float:
    n_bins = check_positive_int(n_bins, "n_bins")
    confidence, correct = _top_label(*_probs_and_labels(probs, labels))
    return _calibration_error(confidence, correct, n_bins, strategy, reduction)


# --------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------


def calibration_bins(confidence: Any, correct: Any, n_bins: int = 15, *,
                     strategy: str = "uniform") -> CalibrationBins:
    """Bin top-label predictions for a reliability diagram.

    Args:
        confidence: predicted confidence per point [N], in [0, 1].
        correct: whether each prediction was right [N] (bool, 0/1, or a value in [0, 1]).
        n_bins: number of bins B.
        strategy: ``"uniform"`` (equal-width, the ECE bins) or ``"quantile"`` (equal-mass,
            the adaptive-ECE bins); see the module docstring for the exact rules.

    Returns:
        :class:`CalibrationBins` ``(confidence [B], accuracy [B], counts [B], edges [B+1])``
        in float64 on the input's device.
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    strategy = check_choice(strategy, "strategy", BIN_STRATEGIES)
    conf = as_tensor(confidence, "confidence", ndim=1, dtype=torch.float64)
    hit = as_tensor(correct, "correct", ndim=1, dtype=torch.float64, device=conf.device)
    check_same_length(confidence=conf, correct=hit)
    for name, values in (("confidence", conf), ("correct", hit)):
        if bool((values < 0).any()) or bool((values > 1).any()):
            raise InputError(f"`{name}` must lie in [0, 1], got values in "
                             f"[{float(values.min()):.4g}, {float(values.max()):.4g}]")
    conf_sum, correct_sum, counts, edges = _bin_sums(conf, hit, n_bins, strategy)
    safe = counts.clamp_min(1).double()
    return CalibrationBins(conf_sum / safe, correct_sum / safe, counts, edges)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins.

    ECE = sum_b (n_b / N) |acc_b - conf_b| over B equal-width, left-closed bins; a
    confidence c goes to bin min(floor(c * B), B - 1) (so 1.0 is in the last bin),
    computed in float64.

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N] (or [N, 1]).
        n_bins: number of bins B.

    Returns:
        ECE in [0, 1].
    """
    return _checked_calibration_error(probs, labels, n_bins, "uniform", "mean")


def maximum_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Largest |acc_b - conf_b| over the non-empty equal-width bins of the ECE.

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
        n_bins: number of bins B (same binning as :func:`expected_calibration_error`).

    Returns:
        MCE in [0, 1]; always >= the ECE.
    """
    return _checked_calibration_error(probs, labels, n_bins, "uniform", "max")


def adaptive_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass bins (each bin holds N/B points, ±1).

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
        n_bins: number of bins B; with B > N the extra bins are empty and ignored.

    Returns:
        Adaptive ECE in [0, 1], computed in float64.
    """
    return _checked_calibration_error(probs, labels, n_bins, "quantile", "mean")


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of points whose most probable class is the label (first class wins ties).

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
    """
    _, correct = _top_label(*_probs_and_labels(probs, labels))
    return float(correct.mean())


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over points of sum_c (p_c - 1[c = y])^2, in [0, 2].

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
    """
    p, y = _probs_and_labels(probs, labels)
    p = p.double()
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1, without materialising one-hots.
    p_true = p.gather(1, y[:, None])[:, 0]
    return float(((p * p).sum(-1) - 2 * p_true + 1).mean())


def classification_nll(probs: Any, labels: Any) -> float:
    """Mean negative log probability of the true class, in nats.

    Probabilities of exactly zero are clamped to the smallest normal float64, so the
    result stays finite (about 708 for such a point).

    Args:
        probs: a CategoricalPredictive or class probabilities [N, C].
        labels: true class indices [N].
    """
    p, y = _probs_and_labels(probs, labels)
    p_true = p.gather(1, y[:, None])[:, 0].double()
    return float(-torch.log(p_true.clamp_min(torch.finfo(torch.float64).tiny)).mean())
