"""OOD scores from a Predictive: one number per input, higher means more out-of-distribution.

Built-in kinds:

* ``"max_prob"``: 1 - max_c p(c | x) (Hendrycks & Gimpel, 2017).
* ``"entropy"``: total predictive entropy H[p(y | x)], nats.
* ``"mutual_information"``: the epistemic part of the entropy, I[y; w | x]; zero for a
  predictive without per-sample probabilities.
* ``"energy"``: -logsumexp_c f_c(x) from the logits f (Liu et al., 2020, temperature 1).
  Probabilities alone cannot give it (-logsumexp of log-probabilities is always 0), so
  pass the logits [N, C] as a raw tensor, or a predictive carrying
  ``pred.scores["energy"]``.
* ``"variance"``: total predictive variance, summed over outputs (regression).
* ``"epistemic_variance"``: the posterior's part of it, summed over outputs.

Any other kind is looked up in ``pred.scores`` (method-specific scores such as VBLL's
``"density"``, which methods attach already oriented so that higher means more OOD).
"""

from __future__ import annotations

from typing import Any

import torch

from bayesify._validation import as_tensor
from bayesify.errors import InputError
from bayesify.predictive import CategoricalPredictive, Predictive, RegressionPredictive

__all__ = ["BUILTIN_KINDS", "energy_score", "score"]

_CLASSIFICATION_KINDS = ("max_prob", "entropy", "mutual_information", "energy")
_REGRESSION_KINDS = ("variance", "epistemic_variance")
BUILTIN_KINDS = _CLASSIFICATION_KINDS + _REGRESSION_KINDS


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """Free energy -logsumexp_c logits [N, C] -> [N]; higher means more OOD.

    Raises:
        InputError: ``logits`` is not [N, C] or holds NaN or inf.
    """
    return -torch.logsumexp(as_tensor(logits, "logits", ndim=2), dim=-1)


def _available(pred: Predictive) -> str:
    kinds = _CLASSIFICATION_KINDS if isinstance(pred, CategoricalPredictive) \
        else _REGRESSION_KINDS
    return ", ".join(repr(k) for k in (*kinds, *pred.scores))


def _from_raw(values: Any, kind: str) -> torch.Tensor:
    if kind == "energy":
        return energy_score(as_tensor(values, "pred (logits)", ndim=2))
    if kind in ("max_prob", "entropy", "mutual_information"):
        return score(CategoricalPredictive(as_tensor(values, "pred (probs)", ndim=2)), kind)
    raise InputError(f"`kind` {kind!r} needs a Predictive; a raw tensor is read as logits "
                     "for kind 'energy' or probabilities [N, C] for 'max_prob', 'entropy' "
                     "and 'mutual_information'")


def score(pred: Predictive | torch.Tensor, kind: str = "max_prob") -> torch.Tensor:
    """Per-input OOD score, oriented so that higher means more out-of-distribution.

    Args:
        pred: a Predictive, or a raw tensor/array: logits [N, C] for ``kind="energy"``,
            class probabilities [N, C] for ``"max_prob"``, ``"entropy"`` and
            ``"mutual_information"``.
        kind: one of the built-in kinds in the module docstring, or the name of a
            method-specific score in ``pred.scores``.

    Returns:
        Scores [N] on the predictive's device and dtype.
    """
    if not isinstance(kind, str):
        raise InputError(f"`kind` must be a string, got {kind!r}")
    if not isinstance(pred, Predictive):
        return _from_raw(pred, kind)
    if kind in pred.scores:
        return pred.scores[kind]
    if isinstance(pred, CategoricalPredictive) and kind in _CLASSIFICATION_KINDS:
        if kind == "max_prob":
            return 1 - pred.confidence
        if kind == "entropy":
            return pred.entropy()
        if kind == "mutual_information":
            return pred.epistemic()
        raise InputError(
            "`kind` 'energy' needs logits, which a CategoricalPredictive does not keep: "
            "call score(logits, 'energy') with logits [N, C], or attach them with "
            "pred.with_scores(energy=-torch.logsumexp(logits, -1))"
        )
    if isinstance(pred, RegressionPredictive) and kind in _REGRESSION_KINDS:
        values = pred.variance if kind == "variance" else pred.epistemic_variance
        return values if values.dim() == 1 else values.sum(-1)
    if kind in BUILTIN_KINDS:
        raise InputError(f"`kind` {kind!r} does not apply to a {type(pred).__name__}; "
                         f"available: {_available(pred)}")
    raise InputError(f"unknown `kind` {kind!r} for this {type(pred).__name__}; available: "
                     f"{_available(pred)}")
