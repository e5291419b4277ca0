"""Detection metrics for OOD scores: AUROC, AUPR-in/out, FPR at 95% TPR.

Conventions: out-of-distribution points are the positive class and higher scores mean
"more OOD"; scores are used as given (never squashed into [0, 1]). Every metric is
sort-based, vectorised, computed in float64 (counts in int64) and exact with ties:

* ``auroc``: scikit-learn's ``roc_auc_score`` (trapezoidal ROC area; ties count 1/2).
* ``aupr_out`` / ``aupr_in``: ``average_precision_score`` with the out- / in-set as the
  positive class (for the in-set, the negated scores rank it).
* ``fpr95``: the false-positive rate at the first threshold, from the highest down,
  whose true-positive rate reaches 0.95; thresholds are the distinct score values, with
  no interpolation between them.
"""

from __future__ import annotations

from typing import Any

import torch

from bayesify._validation import as_tensor, check_choice, check_fraction
from bayesify.ood.scores import score
from bayesify.predictive import Predictive

__all__ = ["aupr", "auroc", "evaluate", "fpr_at_tpr"]


def _stack(in_scores: Any, out_scores: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 scores [N_in + N_out] and the OOD indicator (bool), on one device."""
    s_in = as_tensor(in_scores, "in_scores", dtype=torch.float64, ndim=1)
    s_out = as_tensor(out_scores, "out_scores", dtype=torch.float64, ndim=1,
                      device=s_in.device)
    is_out = torch.cat([torch.zeros_like(s_in, dtype=torch.bool),
                        torch.ones_like(s_out, dtype=torch.bool)])
    return torch.cat([s_in, s_out]), is_out


def _curve(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true/false positives [K] at each distinct threshold, highest first."""
    ordered, order = torch.sort(scores, descending=True)
    tps = torch.cumsum(positive[order].long(), 0)
    fps = torch.arange(1, scores.shape[0] + 1, device=scores.device) - tps
    # Only the last point of each run of tied scores is a threshold.
    last = torch.ones_like(positive)
    last[:-1] = ordered[1:] != ordered[:-1]
    return tps[last], fps[last]


def _auroc(tps: torch.Tensor, fps: torch.Tensor) -> float:
    zero = tps.new_zeros(1)
    tps0, fps0 = torch.cat([zero, tps]), torch.cat([zero, fps])
    # Trapezoids in integer counts: exact until the final division.
    twice_area = ((fps0[1:] - fps0[:-1]) * (tps0[1:] + tps0[:-1])).sum()
    return float(twice_area.double() / (2.0 * float(tps[-1]) * float(fps[-1])))


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
    scores, is_out = _stack(in_scores, out_scores)
    return _auroc(*_curve(scores, is_out))


def aupr(in_scores: Any, out_scores: Any, positive: str = "out") -> float:
    """Average precision (sklearn ``average_precision_score``) with one set positive.

    Args:
        in_scores: scores of in-distribution inputs [N_in].
        out_scores: scores of OOD inputs [N_out].
        positive: ``"out"`` (AUPR-out: OOD positive, ranked by the scores) or ``"in"``
            (AUPR-in: in-distribution positive, ranked by the negated scores).
    """
    check_choice(positive, "positive", ("in", "out"))
    scores, is_out = _stack(in_scores, out_scores)
    if positive == "in":
        return _average_precision(*_curve(-scores, ~is_out))
    return _average_precision(*_curve(scores, is_out))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose TPR reaches ``tpr`` (OOD positive).

    Args:
        in_scores: scores of in-distribution inputs [N_in].
        out_scores: scores of OOD inputs [N_out].
        tpr: the true-positive rate to reach, in (0, 1].
    """
    tpr = check_fraction(tpr, "tpr", high_inclusive=True)
    scores, is_out = _stack(in_scores, out_scores)
    return _fpr_at(*_curve(scores, is_out), tpr)


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
    scores, is_out = _stack(in_scores, out_scores)
    tps, fps = _curve(scores, is_out)
    return {
        "auroc": _auroc(tps, fps),
        "aupr_in": _average_precision(*_curve(-scores, ~is_out)),
        "aupr_out": _average_precision(tps, fps),
        "fpr95": _fpr_at(tps, fps, 0.95),
    }
