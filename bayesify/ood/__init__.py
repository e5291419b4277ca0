"""Out-of-distribution detection: scores from a Predictive and detection metrics.

>>> from bayesify import ood
>>> ood.evaluate(ood.score(pred_in, "entropy"), ood.score(pred_out, "entropy"))
{'auroc': ..., 'aupr_in': ..., 'aupr_out': ..., 'fpr95': ...}
"""

from bayesify.ood.metrics import aupr, auroc, evaluate, fpr_at_tpr
from bayesify.ood.scores import BUILTIN_KINDS, energy_score, score

__all__ = [
    "BUILTIN_KINDS",
    "aupr",
    "auroc",
    "energy_score",
    "evaluate",
    "fpr_at_tpr",
    "score",
]
