"""Detection metrics for OOD scores: AUROC, AUPR-in/out, FPR at 95% TPR.

Conventions: out-of-distribution points are the positive class and higher scores mean
"more OOD"; scores are used as given (never squashed into [0, 1]). Every metric is
sort-based, vectorised, exact with ties, with counts in int64 and rates in float64
(float32 scores are sorted as float32, which gives exactly their float64 order):

* ``auroc``: scikit-learn's ``roc_auc_score`` (trapezoidal ROC area; ties count 1/2),
  computed as the Mann-Whitney statistic: sort both sets, binary-search one in the other.
* ``aupr_out`` / ``aupr_in``: ``average_precision_score`` with the out- / in-set as the
  positive class (for the in-set, the negated scores rank it).
* ``fpr95``: the false-positive rate at the first threshold, from the highest down,
  whose true-positive rate reaches 0.95; thresholds are the distinct score values, with
  no interpolation between them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bayesify._validation import as_tensor, check_choice, check_fraction
from bayesify.ood.scores import score
from bayesify.predictive import Predictive

__all__ = ["aupr", "auroc", "evaluate", "fpr_at_tpr"]

# On CPU numpy's vectorised sorts (x86-simd-sort) are several times faster than
# torch.sort; both give the same sorted values, so every metric is identical either way.
_CPU_SORT_WITH_NUMPY = True


def _numpy_sorts(values: torch.Tensor) -> bool:
    return _CPU_SORT_WITH_NUMPY and values.device.type == "cpu"


def _sorted_values(values: torch.Tensor) -> torch.Tensor:
    """``values`` [N] in ascending order."""
    if _numpy_sorts(values):
        return torch.from_numpy(np.sort(values.numpy()))
    return torch.sort(values).values


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices [N] that sort ``values`` from the highest down (ties in any order)."""
    if _numpy_sorts(values):
        return torch.from_numpy(np.argsort(-values.numpy()))
    return torch.sort(values, descending=True).indices


def _pair(in_scores: Any, out_scores: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated score vectors [N_in], [N_out] in a common float dtype, on one device."""
    s_in = as_tensor(in_scores, "in_scores", ndim=1)
    s_out = as_tensor(out_scores, "out_scores", ndim=1, device=s_in.device)
    # Sorting float32 scores as float32 gives exactly their float64 order (widening is
    # monotone and exact) at half the memory traffic.
    dtype = torch.promote_types(s_in.dtype, s_out.dtype)
    if not (s_in.is_floating_point() and s_out.is_floating_point()) \
            or dtype not in (torch.float32, torch.float64):
        dtype = torch.float64
    return s_in.detach().to(dtype), s_out.detach().to(dtype)


def _curve(s_in: torch.Tensor, s_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative OOD (true) and in (false) positives [K], int64, at each distinct
    threshold from the highest down, the OOD set positive."""
    scores = torch.cat([s_in, s_out])
    is_out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    is_out[s_in.shape[0]:] = True
    order = _descending_order(scores)
    ordered = scores[order]
    tps = torch.cumsum(is_out[order], 0, dtype=torch.int64)
    # Only the last point of each run of tied scores is a threshold.
    last = torch.ones_like(is_out)
    torch.ne(ordered[1:], ordered[:-1], out=last[:-1])
    ends = torch.nonzero(last).squeeze(1)
    tps = tps[ends]
    return tps, ends + 1 - tps


def _reverse(tps: torch.Tensor, fps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The curve with the in-set positive, ranked by negated scores, from the same sort.

    Walking the thresholds from the lowest score up, the in-set count after group j is
    N_in minus the in-count above it, and likewise for the OOD set.
    """
    zero = tps.new_zeros(1)
    in_pos = fps[-1] - torch.cat([zero, fps[:-1]])
    out_neg = tps[-1] - torch.cat([zero, tps[:-1]])
    return in_pos.flip(0), out_neg.flip(0)


def _auroc(s_in: torch.Tensor, s_out: torch.Tensor) -> float:
    # Mann-Whitney: each (in, out) pair counts 1 when out > in and 1/2 when tied, which
    # equals the trapezoidal ROC area. Counts are integers: exact until the division.
    small, large, flip = (s_in, s_out, False) if s_in.shape[0] <= s_out.shape[0] \
        else (s_out, s_in, True)
    ref = _sorted_values(small)
    # Sorted queries make the binary searches cache-friendly; the counts do not change.
    queries = _sorted_values(large)
    twice = int((torch.searchsorted(ref, queries, side="left")
                 + torch.searchsorted(ref, queries, side="right")).sum())
    # Searching the OOD set counts 2 #(in < out) + #ties; searching the in-set counts the
    # complement. Python's int / int is correctly rounded.
    twice_pairs = 2 * s_in.shape[0] * s_out.shape[0]
    return (twice_pairs - twice if flip else twice) / twice_pairs


def _average_precision(tps: torch.Tensor, fps: torch.Tensor) -> float:
    precision = tps.double() / (tps + fps).double()
    recall_step = torch.diff(tps, prepend=tps.new_zeros(1)).double() / float(tps[-1])
    return float((recall_step * precision).sum())


def _fpr_at(tps: torch.Tensor, fps: torch.Tensor, target: float) -> float:
    tpr = tps.double() / float(tps[-1])
    first = int(torch.searchsorted(tpr, torch.tensor([target], dtype=torch.float64,
                                                     device=tpr.device)))
    return float(fps[first].double() / float(fps[-1]))


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve with the OOD set positive (= sklearn ``roc_auc_score``).

    Args:
        in_scores: scores of in-distribution inputs [N_in].
        out_scores: scores of OOD inputs [N_out]; higher should mean more OOD.
    """
    return _auroc(*_pair(in_scores, out_scores))


def aupr(in_scores: Any, out_scores: Any, positive: str = "out") -> float:
    """Average precision (sklearn ``average_precision_score``) with one set positive.

    Args:
        in_scores: scores of in-distribution inputs [N_in].
        out_scores: scores of OOD inputs [N_out].
        positive: ``"out"`` (AUPR-out: OOD positive, ranked by the scores) or ``"in"``
            (AUPR-in: in-distribution positive, ranked by the negated scores).
    """
    check_choice(positive, "positive", ("in", "out"))
    curve = _curve(*_pair(in_scores, out_scores))
    return _average_precision(*(_reverse(*curve) if positive == "in" else curve))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose TPR reaches ``tpr`` (OOD positive).

    Args:
        in_scores: scores of in-distribution inputs [N_in].
        out_scores: scores of OOD inputs [N_out].
        tpr: the true-positive rate to reach, in (0, 1].
    """
    tpr = check_fraction(tpr, "tpr", high_inclusive=True)
    return _fpr_at(*_curve(*_pair(in_scores, out_scores)), tpr)


def evaluate(in_scores: Any, out_scores: Any, *, kind: str = "max_prob") -> dict[str, float]:
    """All detection metrics at once: ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``.

    Args:
        in_scores: in-distribution scores [N_in], or a Predictive scored by ``kind``.
        out_scores: OOD scores [N_out], or a Predictive scored by ``kind``.
        kind: the :func:`bayesify.ood.score` kind used for Predictive inputs.

    Returns:
        A dict of floats; ``auroc`` and the AUPRs in [0, 1] (higher is better), ``fpr95``
        in [0, 1] (lower is better).
    """
    if isinstance(in_scores, Predictive):
        in_scores = score(in_scores, kind)
    if isinstance(out_scores, Predictive):
        out_scores = score(out_scores, kind)
    s_in, s_out = _pair(in_scores, out_scores)
    tps, fps = _curve(s_in, s_out)
    return {
        "auroc": _auroc(s_in, s_out),
        "aupr_in": _average_precision(*_reverse(tps, fps)),
        "aupr_out": _average_precision(tps, fps),
        "fpr95": _fpr_at(tps, fps, 0.95),
    }
