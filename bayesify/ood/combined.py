"""Bayesian predictive scores as detectors, and z-scored combinations of detectors.

:class:`PredictiveScore` turns any :func:`bayesify.ood.score` kind (max_prob, entropy,
mutual_information, energy, ...) into a detector with the same ``fit`` / ``score``
shape as the feature detectors, so a Bayesian score and a feature score sit side by
side or combine:

>>> combo = bf.ood.CombinedScore(bf.ood.PredictiveScore("mutual_information"),
...                              bf.ood.Mahalanobis())
>>> combo.fit(bm, (X_train, y_train), reference=X_val)
>>> bf.ood.evaluate(combo.score(X_test), combo.score(X_ood))

:class:`CombinedScore` standardizes each component with the mean and standard deviation
of its scores on in-distribution reference data (held-out data is best; the training
inputs by default) and sums the z-scores, optionally weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bayesify._validation import as_tensor, check_positive_int
from bayesify.errors import InputError, NotFittedError
from bayesify.ood.detectors import FeatureDetector
from bayesify.ood.features import FeatureExtractor, _is_bayesian_model
from bayesify.ood.scores import score as predictive_score
from bayesify.ood.shaping import energy_from_logits
from bayesify.predictive import CategoricalPredictive

__all__ = ["CombinedScore", "PredictiveScore"]


class PredictiveScore(FeatureDetector):
    """A predictive OOD score (:func:`bayesify.ood.score` ``kind``) as a detector.

    With a BayesianModel, ``score(x)`` is ``bf.ood.score(bm.predict(x), kind)``; with a
    plain classifier ``nn.Module``, the predictive is the softmax of its logits (so
    ``"max_prob"`` is the MSP baseline). ``kind="energy"`` reads the logits of the
    model's forward (the BayesianModel's point prediction) in both cases.

    Args:
        kind: any :func:`bayesify.ood.score` kind.
        num_samples: posterior samples for a sampling method's ``predict``.
        seed: makes a sampling method's scores repeatable.
        batch_size: inputs per forward pass.
    """

    def __init__(self, kind: str = "max_prob", *, num_samples: int | None = None,
                 seed: int | None = None, batch_size: int = 1024):
        super().__init__(batch_size=batch_size)
        if not isinstance(kind, str):
            raise InputError(f"`kind` must be a string, got {kind!r}")
        self.kind = kind
        self.num_samples = (None if num_samples is None
                            else check_positive_int(num_samples, "num_samples"))
        self.seed = seed

    def fit(self, model: Any, train: Any = None) -> PredictiveScore:
        """Bind the model (an ``nn.Module`` or a BayesianModel); ``train`` is unused."""
        self._extractor = FeatureExtractor(model, batch_size=self.batch_size,
                                           features=False)
        self._model = model
        return self

    @torch.no_grad()
    def score(self, x: Any) -> torch.Tensor:
        """OOD scores of inputs x (tensor, array or DataLoader) -> [N]; higher is more OOD."""
        extractor = self._check_fitted()
        if self.kind != "energy" and _is_bayesian_model(self._model):
            options: dict[str, Any] = {"batch_size": self.batch_size}
            if self.num_samples is not None:
                options["num_samples"] = self.num_samples
            if self.seed is not None:
                options["seed"] = self.seed
            return predictive_score(self._model.predict(x, **options), self.kind)
        return torch.cat([self._score(None, extractor.outputs(xb))
                          for xb in extractor.inputs(x)])

    def _score(self, features: torch.Tensor | None, outputs: torch.Tensor) -> torch.Tensor:
        """The score of a plain network's logits [N, C] -> [N]."""
        if self.kind == "energy":
            return energy_from_logits(outputs)
        if outputs.dim() != 2:
            raise InputError(f"`kind`={self.kind!r} on a plain network needs logits "
                             f"[N, C]; it returned shape {list(outputs.shape)}")
        return predictive_score(CategoricalPredictive.from_logits(outputs), self.kind)

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return f"PredictiveScore({self.kind!r}, {state})"


def _reference_inputs(train: Any) -> Any:
    """The inputs of a training set given as a DataLoader, an (X, y) tuple or X."""
    if isinstance(train, tuple):
        if len(train) != 2:
            raise InputError(f"`train` as a tuple must be (X, y), got {len(train)} items")
        return train[0]
    return train


class CombinedScore:
    """A weighted sum of z-scored detector scores: Σ_i w_i (s_i(x) - m_i) / sd_i [N].

    Args:
        *detectors: two or more detectors (feature detectors, :class:`PredictiveScore`
            or anything with ``fit(model, train)`` and ``score(x) -> [N]``).
        weights: one weight per detector (all 1 by default).

    ``fit(model, train, reference=None)`` fits every detector on ``(model, train)`` and
    takes m_i and sd_i (float64) from their scores on ``reference`` (in-distribution
    inputs, ideally held out; the training inputs when ``None``).
    """

    def __init__(self, *detectors: Any, weights: Sequence[float] | None = None):
        if len(detectors) < 2:
            raise InputError(f"`detectors`: pass at least two detectors to combine, got "
                             f"{len(detectors)}")
        for i, det in enumerate(detectors):
            if not (callable(getattr(det, "fit", None)) and callable(getattr(det, "score",
                                                                            None))):
                raise InputError(f"`detectors`[{i}] must have fit(model, train) and "
                                 f"score(x), got {type(det).__name__}")
        self.detectors = list(detectors)
        if weights is None:
            self.weights = torch.ones(len(detectors), dtype=torch.float64)
        else:
            w = as_tensor(weights, "weights", dtype=torch.float64, ndim=1)
            if w.shape[0] != len(detectors):
                raise InputError(f"`weights` must hold one weight per detector "
                                 f"({len(detectors)}), got {w.shape[0]}")
            self.weights = w
        self._stats: list[tuple[float, float]] | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self._stats is not None

    def fit(self, model: Any, train: Any, *, reference: Any = None) -> CombinedScore:
        """Fit every detector, then the z-statistics on in-distribution reference inputs.

        Args:
            model: an ``nn.Module`` or a bayesify ``BayesianModel``.
            train: a DataLoader yielding x or (x, y), an ``(X, y)`` tuple, or inputs X.
            reference: in-distribution inputs [N, ...] (tensor, array or DataLoader) for
                the z-statistics; the training inputs when ``None``.

        Returns:
            ``self``.
        """
        for det in self.detectors:
            det.fit(model, train)
        ref = _reference_inputs(train) if reference is None else reference
        if ref is None:
            raise InputError("`reference` is None and so is `train`; pass in-distribution "
                             "inputs for the z-statistics")
        stats = []
        for i, det in enumerate(self.detectors):
            values = det.score(ref).double()
            mean, std = float(values.mean()), float(values.std())
            if not std > 0:
                raise InputError(f"detector {i} ({type(det).__name__}) gives constant "
                                 "scores on the reference data, so they cannot be "
                                 "z-scored; pass a more varied `reference`")
            stats.append((mean, std))
        self._stats = stats
        return self

    def components(self, x: Any) -> torch.Tensor:
        """The z-scores of every detector [N, K] (float64)."""
        if self._stats is None:
            raise NotFittedError("CombinedScore is not fitted; call `.fit(model, train)` "
                                 "before `.score(x)`")
        columns = [(det.score(x).double() - m) / s
                   for det, (m, s) in zip(self.detectors, self._stats, strict=True)]
        return torch.stack(columns, dim=1)

    def score(self, x: Any) -> torch.Tensor:
        """Combined OOD scores of inputs x -> [N] (float64); higher is more OOD."""
        z = self.components(x)
        return z @ self.weights.to(z.device)

    def __repr__(self) -> str:
        names = ", ".join(repr(d) for d in self.detectors)
        return f"CombinedScore({names})"
