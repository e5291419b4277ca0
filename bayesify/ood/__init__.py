"""Out-of-distribution detection: scores from a Predictive, feature-space detectors and
detection metrics.

>>> from bayesify import ood
>>> ood.evaluate(ood.score(pred_in, "entropy"), ood.score(pred_out, "entropy"))
{'auroc': ..., 'aupr_in': ..., 'aupr_out': ..., 'fpr95': ...}
>>> det = ood.Mahalanobis().fit(bm, (X_train, y_train))
>>> ood.evaluate(det.score(X_test), det.score(X_ood))

Detectors (each ``fit(model_or_bm, train)`` then ``score(x) -> [N]``, higher = more
OOD): :class:`Mahalanobis`, :class:`RelativeMahalanobis`, :class:`KNN`, :class:`ViM`,
:class:`ODIN`, :class:`ReActEnergy`, :class:`ASH`, :class:`PredictiveScore` (any
predictive ``kind``), and :class:`CombinedScore` (a z-scored sum of detectors).
"""

from bayesify.ood.combined import CombinedScore, PredictiveScore
from bayesify.ood.detectors import KNN, FeatureDetector, Mahalanobis, RelativeMahalanobis, ViM
from bayesify.ood.features import FeatureExtractor
from bayesify.ood.metrics import aupr, auroc, evaluate, fpr_at_tpr
from bayesify.ood.scores import BUILTIN_KINDS, energy_score, score
from bayesify.ood.shaping import ASH, ODIN, ReActEnergy, ash

__all__ = [
    "ASH",
    "BUILTIN_KINDS",
    "KNN",
    "ODIN",
    "CombinedScore",
    "FeatureDetector",
    "FeatureExtractor",
    "Mahalanobis",
    "PredictiveScore",
    "ReActEnergy",
    "RelativeMahalanobis",
    "ViM",
    "ash",
    "aupr",
    "auroc",
    "energy_score",
    "evaluate",
    "fpr_at_tpr",
    "score",
]
