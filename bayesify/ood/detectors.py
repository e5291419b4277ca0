"""Feature-space OOD detectors: Mahalanobis, relative Mahalanobis, KNN and ViM.

Each detector is fitted on in-distribution training data through a network or a
wrapped BayesianModel and scores new inputs, higher meaning more out-of-distribution:

>>> det = bf.ood.Mahalanobis().fit(bm, (X_train, y_train))
>>> bf.ood.evaluate(det.score(X_test), det.score(X_ood))

Features φ [N, d] are read as :class:`~bayesify.ood.features.FeatureExtractor` says
(the input of the final ``nn.Linear``, or ``layer="name"``'s output). Statistics
(means, covariances, feature banks) are kept in float64, covariances are factorized by
the shared jittered Cholesky :func:`bayesify._linalg.psd_cholesky`, and scores come
back in the model's dtype on its device.

Detectors that need class labels (Mahalanobis, relative Mahalanobis) take them from
the training set's y; when ``train`` holds inputs only, the model's predicted classes
(argmax of an output [N, C] with C >= 2) stand in, or one class for other outputs.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from bayesify._linalg import psd_cholesky
from bayesify._validation import check_labels, check_positive_int
from bayesify.errors import InputError, NotFittedError
from bayesify.ood.features import FeatureExtractor, Shaping

__all__ = ["KNN", "FeatureDetector", "Mahalanobis", "RelativeMahalanobis", "ViM"]

# Rows of test x train distances computed at once by KNN (about 256 MiB in float64).
_KNN_BLOCK_ELEMENTS = 2**25


class FeatureDetector(abc.ABC):
    """Base class: ``fit(model_or_bm, train)`` then ``score(x) -> [N]``.

    Args:
        layer: read φ from this named module's output instead of the head's input.
        head: name of the final ``nn.Linear`` when it is not the network's last one.
        batch_size: inputs per forward pass.
    """

    #: Whether the detector needs class labels of the training set.
    needs_labels = False

    def __init__(self, *, layer: str | None = None, head: str | None = None,
                 batch_size: int = 1024):
        self.layer = layer
        self.head = head
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self._extractor: FeatureExtractor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self._extractor is not None

    def _check_fitted(self) -> FeatureExtractor:
        if self._extractor is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call "
                                 "`.fit(model, train)` before `.score(x)`")
        return self._extractor

    def fit(self, model: Any, train: Any) -> FeatureDetector:
        """Read the features of the in-distribution training data and fit the statistics.

        Args:
            model: an ``nn.Module`` or a bayesify ``BayesianModel``.
            train: a DataLoader yielding x or (x, y), an ``(X, y)`` tuple, or inputs X.

        Returns:
            ``self``.
        """
        extractor = FeatureExtractor(model, layer=self.layer, head=self.head,
                                     batch_size=self.batch_size)
        features, outputs, labels = extractor.run_train(train)
        if self.needs_labels:
            labels = _class_labels(labels, outputs)
        self._fit(extractor, features.double(), outputs, labels)
        self._extractor = extractor
        return self

    @torch.no_grad()
    def score(self, x: Any) -> torch.Tensor:
        """OOD scores of inputs x (tensor, array or DataLoader) -> [N]; higher is more OOD."""
        extractor = self._check_fitted()
        features, outputs = extractor.run(x, shaping=self._shaping())
        return self._score(features.double(), outputs).to(features.dtype)

    def _shaping(self) -> Shaping | None:
        """The activation shaping applied to φ at scoring time (None: the features as
        they are)."""
        return None

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Fit the detector's statistics on training features [N, d] (float64), outputs
        [N, C] and labels [N] (or ``None``); detectors without statistics keep none."""
        return None

    @abc.abstractmethod
    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Scores [N] (higher is more OOD) from features [N, d] and outputs [N, C]."""

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({state})"


def _class_labels(labels: torch.Tensor | None, outputs: torch.Tensor) -> torch.Tensor:
    """Training labels [N] (int64), or pseudo-labels from the model's outputs."""
    if labels is not None:
        return check_labels(labels, "train (y)")
    if outputs.dim() == 2 and outputs.shape[1] >= 2:
        return outputs.argmax(dim=1)
    return torch.zeros(outputs.shape[0], dtype=torch.long, device=outputs.device)


class _Gaussian:
    """A Gaussian's mean [d] and whitening factor L (Σ = L Lᵀ), float64."""

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, name: str):
        self.factor = psd_cholesky(covariance, name=name)
        self.mean = mean

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """L⁻¹ x for rows x [N, d] -> [N, d]."""
        return torch.linalg.solve_triangular(self.factor, x.T, upper=False).T

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances (x - μ)ᵀ Σ⁻¹ (x - μ) [N]."""
        return self.whiten(x - self.mean).pow(2).sum(-1)


def _class_means(features: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [K, d] of the K classes present, and each point's class position [N]."""
    classes, position = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(classes.shape[0], features.shape[1], dtype=features.dtype,
                       device=features.device).index_add_(0, position, features)
    counts = torch.bincount(position, minlength=classes.shape[0]).to(features.dtype)
    return sums / counts[:, None], position


class Mahalanobis(FeatureDetector):
    """Minimum Mahalanobis distance to the class means under a tied covariance
    (Lee et al. 2018), without input preprocessing.

    Fit: class means μ_c [C, d] and Σ = (1/N) Σ_i (φ_i - μ_{y_i})(φ_i - μ_{y_i})ᵀ.
    Score: min_c (φ - μ_c)ᵀ Σ⁻¹ (φ - μ_c) [N].
    """

    needs_labels = True

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        assert labels is not None
        means, position = _class_means(features, labels)
        centered = features - means[position]
        covariance = centered.T @ centered / features.shape[0]
        self._gaussian = _Gaussian(means.new_zeros(features.shape[1]), covariance,
                                   "tied feature covariance")
        self.class_means = means
        self._white_means = self._gaussian.whiten(means)  # [C, d]
        self._white_sq = self._white_means.pow(2).sum(-1)

    def _class_distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distances [N, C] to every class mean."""
        white = self._gaussian.whiten(features)
        cross = white @ self._white_means.T
        return (white.pow(2).sum(-1, keepdim=True) - 2 * cross + self._white_sq).clamp_min(0)

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return self._class_distances(features).min(dim=1).values


class RelativeMahalanobis(Mahalanobis):
    """Relative Mahalanobis distance (Ren et al. 2021): the class-conditional distance
    minus the distance under one background Gaussian fitted to all features,
    min_c MD_c(φ) - MD_0(φ) [N]; it discounts directions that are far for every input.
    """

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        super()._fit(extractor, features, outputs, labels)
        mean = features.mean(0)
        centered = features - mean
        self._background = _Gaussian(mean, centered.T @ centered / features.shape[0],
                                     "background feature covariance")

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return super()._score(features, outputs) - self._background.distance(features)


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class KNN(FeatureDetector):
    """Distance to the k-th nearest training feature after L2 normalization
    (Sun et al. 2022): ‖z - z_(k)‖ with z = φ / ‖φ‖ [N].

    Args:
        k: the neighbour whose distance is the score (50 by default); at most the
            number of training points.
        layer, head, batch_size: as for :class:`FeatureDetector`.
    """

    def __init__(self, k: int = 50, *, layer: str | None = None, head: str | None = None,
                 batch_size: int = 1024):
        super().__init__(layer=layer, head=head, batch_size=batch_size)
        self.k = check_positive_int(k, "k")

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        if self.k > features.shape[0]:
            raise InputError(f"`k` must be at most the number of training points "
                             f"({features.shape[0]}), got {self.k}")
        self._bank = _normalize(features)  # [M, d]
        self._bank_sq = self._bank.pow(2).sum(-1)

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        z = _normalize(features)
        rows = max(1, _KNN_BLOCK_ELEMENTS // self._bank.shape[0])
        scores = []
        for start in range(0, z.shape[0], rows):
            block = z[start:start + rows]
            squared = (block.pow(2).sum(-1, keepdim=True) - 2 * block @ self._bank.T
                       + self._bank_sq).clamp_min(0)
            kth = torch.topk(squared, self.k, dim=1, largest=False).values[:, -1]
            scores.append(kth.sqrt())
        return torch.cat(scores)


class ViM(FeatureDetector):
    """Virtual-logit matching (Wang et al. 2022): the norm of φ's residual outside the
    principal subspace, scaled to the logits, minus the energy.

    With the head's W [C, d] and b [C]: origin u = -W⁺ b; the residual space is spanned
    by the eigenvectors of the uncentered covariance of (φ - u) beyond the top ``dim``;
    score = α ‖P_res (φ - u)‖ - logsumexp(W φ + b), α = mean max-logit / mean residual
    norm on the training data.

    Args:
        dim: dimension of the principal subspace (default: d // 2, or 512 for d >= 768,
            1000 for d >= 2048, as in the paper); must be < d.
        head, batch_size: as for :class:`FeatureDetector` (ViM reads the head's input).
    """

    def __init__(self, dim: int | None = None, *, head: str | None = None,
                 batch_size: int = 1024):
        super().__init__(head=head, batch_size=batch_size)
        self.dim = None if dim is None else check_positive_int(dim, "dim")

    def _fit(self, extractor: FeatureExtractor, features: torch.Tensor,
             outputs: torch.Tensor, labels: torch.Tensor | None) -> None:
        assert extractor.head is not None
        d = features.shape[1]
        dim = self.dim
        if dim is None:
            dim = 1000 if d >= 2048 else 512 if d >= 768 else d // 2
        if not 0 < dim < d:
            raise InputError(f"`dim` must be between 1 and the feature size minus one "
                             f"({d - 1}), got {dim}")
        weight = extractor.head.weight.detach().double()
        bias = (extractor.head.bias.detach().double() if extractor.head.bias is not None
                else weight.new_zeros(weight.shape[0]))
        self._weight, self._bias = weight, bias
        self.origin = -torch.linalg.pinv(weight) @ bias
        centered = features - self.origin
        _, vectors = torch.linalg.eigh(centered.T @ centered / features.shape[0])
        self._residual = vectors[:, : d - dim]  # eigh sorts ascending: the smallest
        logits = features @ weight.T + bias
        residual = (centered @ self._residual).norm(dim=-1)
        self.scale = float(logits.max(dim=1).values.mean() / residual.mean().clamp_min(
            torch.finfo(torch.float64).tiny))
        if not math.isfinite(self.scale):
            raise InputError("ViM's scale is not finite: the training features lie in the "
                             "principal subspace; lower `dim`")

    def _score(self, features: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        logits = features @ self._weight.T + self._bias
        residual = ((features - self.origin) @ self._residual).norm(dim=-1)
        return self.scale * residual - torch.logsumexp(logits, dim=-1)
