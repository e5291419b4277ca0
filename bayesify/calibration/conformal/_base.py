"""Plumbing shared by the conformal regressors and classifiers: the model, alpha, groups."""

from __future__ import annotations

from typing import Any

import torch

from bayesify._validation import as_tensor, check_same_length
from bayesify.calibration.conformal._quantile import _exact_alpha, check_weights
from bayesify.errors import InputError, NotFittedError

__all__ = ["Groups"]


class _Conformal:
    def __init__(self, model: Any, alpha: Any, predict_kwargs: dict[str, Any] | None):
        if model is not None and not callable(getattr(model, "predict", None)):
            raise InputError(f"`model` must be a BayesianModel (anything with .predict(x) "
                             f"returning a Predictive) or None, got {type(model).__name__}")
        _exact_alpha(alpha)
        self.model = model
        self.alpha = alpha
        self.predict_kwargs = dict(predict_kwargs or {})
        self._scores: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self._scores is not None

    def _check_fitted(self, action: str) -> None:
        if self._scores is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call "
                                 f"`.fit(x_or_pred, y)` on held-out data before `.{action}`")

    def _predictive(self, x_or_pred: Any) -> Any:
        """The model's predictive at x, or ``x_or_pred`` itself without a model."""
        if self.model is not None:
            return self.model.predict(x_or_pred, **self.predict_kwargs)
        return x_or_pred

    def _alpha(self, alpha: Any) -> Any:
        if alpha is None:
            return self.alpha
        _exact_alpha(alpha)
        return alpha

    def _test_weights(self, weights: Any, n: int | None,
                      device: torch.device) -> torch.Tensor | None:
        """Validated test weights [N] when fitted with weights; ``None`` otherwise."""
        if self._weights is None:
            if weights is not None:
                raise InputError("`weights` were given at prediction but not to `fit`; pass "
                                 "the calibration points' likelihood ratios to fit(..., "
                                 "weights=...) too")
            return None
        if weights is None:
            raise InputError("this conformal predictor was fitted with `weights`; pass the "
                             "test points' likelihood ratios as `weights=` [N] too")
        w = check_weights(weights, "weights", device=device, positive_sum=False)
        if n is not None and w.shape[0] != n:
            raise InputError(f"`weights` must hold one weight per test point ({n}), got "
                             f"{w.shape[0]}")
        return w


class Groups:
    """Integer group labels of the calibration points, and the lookup of test groups.

    Args:
        groups: group labels [n] (integers, or floats with integer values).
        n: the number of calibration points.
        device: where the scores live.
    """

    def __init__(self, groups: Any, n: int, device: torch.device):
        labels = _group_labels(groups, "groups", device)
        check_same_length(x_or_pred=torch.empty(n, 0), groups=labels)
        self.values, self.index = torch.unique(labels, sorted=True, return_inverse=True)

    @property
    def num_groups(self) -> int:
        return int(self.values.shape[0])

    def members(self, g: int) -> torch.Tensor:
        """Boolean mask [n] of the calibration points in group number g."""
        return self.index == g

    def lookup(self, groups: Any, n: int | None = None) -> torch.Tensor:
        """Positions [N] in ``values`` of test groups (N = n when given); unseen groups
        raise."""
        labels = _group_labels(groups, "groups", self.values.device)
        if n is not None and labels.shape[0] != n:
            raise InputError(f"`groups` must hold one label per test point ({n}), got "
                             f"{labels.shape[0]}")
        position = torch.searchsorted(self.values, labels).clamp(max=self.num_groups - 1)
        unseen = self.values[position] != labels
        if bool(unseen.any()):
            missing = torch.unique(labels[unseen])[:10].tolist()
            raise InputError(f"`groups` holds labels with no calibration points: {missing}; "
                             "every test group needs calibration data of its own")
        return position


def _group_labels(groups: Any, name: str, device: torch.device) -> torch.Tensor:
    labels = as_tensor(groups, name, ndim=1, device=device)
    if labels.is_floating_point():
        if bool((labels != labels.round()).any()):
            raise InputError(f"`{name}` must be integer group labels, got non-integer values")
    elif labels.is_complex():
        raise InputError(f"`{name}` must be integer group labels, got dtype {labels.dtype}")
    return labels.long()
