"""Split conformal prediction sets: LAC, APS and RAPS; marginal, class-conditional, weighted.

Scores of class c at input x (lower means more conforming), with p the predictive
probabilities, rho_c the mass of the classes ranked strictly above c (by descending
probability, ties by class index) and o_c the 1-based rank of c:

* ``"lac"``: 1 - p_c (smallest sets on average; Sadinle et al. 2019).
* ``"aps"``: rho_c + p_c, or rho_c + u p_c randomized (Romano et al. 2020).
* ``"raps"``: the APS score plus lam * max(o_c - k_reg, 0) (Angelopoulos et al. 2021);
  the penalty shrinks sets by charging for classes ranked past ``k_reg``.

Randomized APS/RAPS draw one uniform u per point (calibration and test alike), which
makes the scores continuous: marginal coverage is then exactly k / (n + 1) in
expectation, in [1 - alpha, 1 - alpha + 1 / (n + 1)), where the non-randomized sets
may over-cover (and are never empty). Sets may be empty when randomized.

``conditional="class"`` (Mondrian conformal, Vovk et al. 2003) calibrates one quantile
per class from that class's calibration points, so that coverage is >= 1 - alpha
within every class, not only on average over classes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from bayesify._validation import (
    as_tensor,
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
    check_same_length,
)
from bayesify.calibration.conformal._base import _Conformal
from bayesify.calibration.conformal._quantile import (
    check_weights,
    conformal_quantile,
    weighted_conformal_quantile,
)
from bayesify.errors import BayesifyWarning, InputError
from bayesify.predictive import CategoricalPredictive, Predictive

__all__ = [
    "CLASSIFICATION_SCORES",
    "ConformalClassifier",
    "classification_scores",
    "mean_set_size",
    "set_coverage",
]

CLASSIFICATION_SCORES = ("lac", "aps", "raps")
CONDITIONAL = ("marginal", "class")


def _ranked_mass(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class [N, C]: the mass of classes ranked strictly above it, and its
    1-based rank.

    Classes are ranked by descending probability, ties by class index, so the ranking
    is the same for calibration and test points.
    """
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_probs = probs.gather(-1, order)
    before_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    before = torch.empty_like(probs).scatter_(-1, order, before_sorted)
    positions = torch.arange(1, probs.shape[-1] + 1, device=probs.device,
                             dtype=probs.dtype).expand_as(probs)
    rank = torch.empty_like(probs).scatter_(-1, order, positions)
    return before, rank


def classification_scores(probs: torch.Tensor, score: str, u: torch.Tensor | None = None, *,
                          lam: float = 0.0, k_reg: int = 0) -> torch.Tensor:
    """Conformity scores of every class [N, C] (lower means more conforming).

    Args:
        probs: class probabilities [N, C].
        score: ``"lac"`` (1 - p_c), ``"aps"`` or ``"raps"``.
        u: per-point uniforms [N] for randomized APS/RAPS (mass above + u p_c); ``None``
            gives the non-randomized score (mass above + p_c).
        lam: the RAPS penalty per class ranked past ``k_reg``.
        k_reg: the number of top-ranked classes RAPS does not penalize.
    """
    if score == "lac":
        return 1 - probs
    before, rank = _ranked_mass(probs)
    scores = before + (probs if u is None else u[:, None] * probs)
    if score == "raps" and lam > 0:
        scores = scores + lam * (rank - k_reg).clamp_min(0)
    return scores


class ConformalClassifier(_Conformal):
    """Split conformal prediction sets for any classifier.

    Args:
        model: a classification BayesianModel (``model.predict(x)``), or ``None`` to
            pass CategoricalPredictives (or probabilities [N, C]) directly.
        score: ``"lac"``, ``"aps"`` or ``"raps"`` (see the module docstring).
        alpha: default miscoverage; sets hold the true label with probability >= 1 - alpha.
        randomized: for APS/RAPS, add a uniform tie-breaker (coverage exactly k / (n + 1)
            on average, may give empty sets); otherwise sets include every class whose
            cumulative mass up to and including it is within the quantile.
        generator: the source of the APS/RAPS uniforms, for repeatable sets.
        predict_kwargs: extra keyword arguments for ``model.predict``.
        lam: RAPS penalty λ >= 0 per class ranked past ``k_reg`` (default 0.01).
        k_reg: RAPS: the number of top classes left unpenalized (default 5).
        conditional: ``"marginal"`` (default) or ``"class"`` (one quantile per class:
            coverage >= 1 - alpha for every class).

    ``fit`` and ``predict_set`` also take ``weights=``: likelihood ratios dP_test/dP_cal
    of the inputs for weighted conformal under covariate shift (marginal sets only).
    """

    def __init__(self, model: Any = None, score: str = "lac", alpha: float = 0.1,
                 randomized: bool = True, generator: torch.Generator | None = None,
                 predict_kwargs: dict[str, Any] | None = None, *, lam: float | None = None,
                 k_reg: int | None = None, conditional: str | None = None):
        super().__init__(model, alpha, predict_kwargs)
        self.score = check_choice(score, "score", CLASSIFICATION_SCORES)
        if score != "raps" and (lam is not None or k_reg is not None):
            raise InputError(f"`lam` and `k_reg` are options of score='raps', not "
                             f"score={score!r}")
        self.lam = 0.01 if lam is None else check_positive_float(lam, "lam", allow_zero=True)
        self.k_reg = 5 if k_reg is None else check_positive_int(k_reg, "k_reg", minimum=0)
        self.conditional = check_choice("marginal" if conditional is None else conditional,
                                        "conditional", CONDITIONAL)
        self.randomized = bool(randomized)
        self.generator = generator
        self._labels: torch.Tensor | None = None

    def _probs(self, x_or_pred: Any, name: str) -> torch.Tensor:
        pred = self._predictive(x_or_pred)
        if isinstance(pred, CategoricalPredictive):
            return pred.probs
        if isinstance(pred, Predictive):
            raise InputError(f"`{name}` must give a CategoricalPredictive, "
                             f"got a {type(pred).__name__}")
        return CategoricalPredictive(as_tensor(pred, name, ndim=2)).probs

    def _uniforms(self, probs: torch.Tensor) -> torch.Tensor | None:
        if self.score == "lac" or not self.randomized:
            return None
        device = self.generator.device if self.generator is not None else probs.device
        return torch.rand(probs.shape[0], generator=self.generator, dtype=probs.dtype,
                          device=device).to(probs.device)

    def _all_scores(self, probs: torch.Tensor) -> torch.Tensor:
        return classification_scores(probs, self.score, self._uniforms(probs),
                                      lam=self.lam, k_reg=self.k_reg)

    def fit(self, x_or_pred: Any, y: Any, *, weights: Any = None) -> ConformalClassifier:
        """Compute the calibration scores of the true labels.

        Args:
            x_or_pred: calibration inputs (with a model) or their predictive / probs [n, C].
            y: true class indices [n].
            weights: optional likelihood-ratio weights [n] (>= 0) for covariate shift.

        Returns:
            ``self``.
        """
        probs = self._probs(x_or_pred, "x_or_pred")
        labels = as_tensor(y, "y", device=probs.device)
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        check_same_length(x_or_pred=probs, y=labels)
        labels = check_labels(labels, "y", probs.shape[1])
        scores = self._all_scores(probs).gather(1, labels[:, None])[:, 0]
        conformal_quantile(scores, self.alpha)
        self._weights = None
        if weights is not None:
            if self.conditional == "class":
                raise InputError("`weights` (covariate shift) work with conditional="
                                 "'marginal' only")
            w = check_weights(weights, "weights", device=probs.device)
            check_same_length(x_or_pred=probs, weights=w)
            self._weights = w
        if self.conditional == "class":
            counts = torch.bincount(labels, minlength=probs.shape[1])
            empty = torch.nonzero(counts == 0).flatten().tolist()
            if empty:
                warnings.warn(f"classes {empty[:10]} have no calibration points; "
                              "class-conditional sets always include them",
                              BayesifyWarning, stacklevel=2)
        self._labels = labels
        self._num_classes = int(probs.shape[1])
        self._scores = scores
        return self

    def quantile(self, alpha: Any = None, *, weights: Any = None) -> torch.Tensor:
        """The fitted conformal score quantile at ``alpha`` (``inf`` when k > n).

        Returns:
            0-d (marginal); [C] with ``conditional="class"`` (inf for a class with too
            few calibration points); [N] for test ``weights`` [N] when fitted with weights.
        """
        self._check_fitted("quantile()")
        alpha = self._alpha(alpha)
        w = self._test_weights(weights, None, self._scores.device)
        if w is not None:
            return weighted_conformal_quantile(self._scores, self._weights, w, alpha)
        if self.conditional == "marginal":
            return conformal_quantile(self._scores, alpha)
        inf = torch.tensor(float("inf"), dtype=self._scores.dtype, device=self._scores.device)
        per_class = []
        for c in range(self._num_classes):
            members = self._scores[self._labels == c]
            per_class.append(conformal_quantile(members, alpha) if members.numel() else inf)
        return torch.stack(per_class)

    def predict_set(self, x_or_pred: Any, alpha: Any = None, *,
                    weights: Any = None) -> torch.Tensor:
        """Prediction sets as a boolean mask [N, C]: True where the class is in the set.

        Args:
            x_or_pred: test inputs (with a model) or their predictive / probs [N, C].
            alpha: miscoverage level; the constructor's ``alpha`` when ``None``.
            weights: the test points' likelihood ratios [N] (required when fitted with
                weights).
        """
        self._check_fitted("predict_set()")
        probs = self._probs(x_or_pred, "x_or_pred")
        if probs.shape[1] != self._num_classes:
            raise InputError(f"`x_or_pred` must have {self._num_classes} classes as in fit, "
                             f"got {probs.shape[1]}")
        if self._weights is not None:
            self._test_weights(weights, probs.shape[0], probs.device)
        q = self.quantile(alpha, weights=weights)
        scores = self._all_scores(probs)
        q = q.to(scores)
        return scores <= (q[:, None] if self._weights is not None else q)


def set_coverage(sets: Any, labels: Any) -> float:
    """Fraction of points whose true label is in its prediction set.

    Args:
        sets: boolean masks [N, C] from :meth:`ConformalClassifier.predict_set`.
        labels: true class indices [N].
    """
    mask = as_tensor(sets, "sets", ndim=2).bool()
    y = as_tensor(labels, "labels", device=mask.device).reshape(-1)
    check_same_length(sets=mask, labels=y)
    y = check_labels(y, "labels", mask.shape[1])
    return float(mask.gather(1, y[:, None]).double().mean())


def mean_set_size(sets: Any) -> float:
    """Average number of classes per prediction set [N, C] -> float."""
    return float(as_tensor(sets, "sets", ndim=2).double().sum(1).mean())
