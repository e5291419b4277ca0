"""Likelihood-ratio weights for weighted conformal under covariate shift.

Under covariate shift the test inputs come from P_test(x) while calibration inputs come
from P_cal(x), with p(y | x) unchanged. Weighted split conformal (Tibshirani et al.
2019) needs w(x) = dP_test(x) / dP_cal(x). When neither density is known, a
probabilistic classifier trained to tell calibration inputs (label 0) from test inputs
(label 1) estimates it: w(x) = P(1 | x) / P(0 | x) * n_cal / n_test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bayesify._validation import as_tensor, check_fraction
from bayesify.errors import InputError, NotFittedError

__all__ = ["DomainClassifierWeights"]


def _features(x: Any, name: str) -> np.ndarray:
    tensor = as_tensor(x, name, ndim=(1, 2))
    if tensor.dim() == 1:
        tensor = tensor[:, None]
    return tensor.detach().cpu().to(torch.float64).numpy()


class DomainClassifierWeights:
    """Estimated likelihood ratios dP_test/dP_cal from a probabilistic domain classifier.

    Args:
        classifier: a scikit-learn style classifier with ``fit(X, y)`` and
            ``predict_proba(X)``; by default a standardized logistic regression.
        clip: the classifier's probabilities are clipped to [clip, 1 - clip] so that
            no weight is 0 or infinite.

    Example:
        >>> ratio = DomainClassifierWeights().fit(x_cal, x_test)
        >>> cp = SplitConformalRegressor().fit(pred_cal, y_cal, weights=ratio(x_cal))
        >>> lower, upper = cp.predict_interval(pred_test, weights=ratio(x_test))
    """

    def __init__(self, classifier: Any = None, *, clip: float = 1e-6):
        if classifier is not None and not (callable(getattr(classifier, "fit", None))
                                           and callable(getattr(classifier, "predict_proba",
                                                                None))):
            raise InputError("`classifier` must have fit(X, y) and predict_proba(X) (a "
                             f"scikit-learn classifier), got {type(classifier).__name__}")
        self.classifier = classifier
        self.clip = check_fraction(clip, "clip")
        if self.clip >= 0.5:
            raise InputError(f"`clip` must be < 0.5, got {clip!r}")
        self._fitted: Any = None

    def fit(self, cal_features: Any, test_features: Any) -> DomainClassifierWeights:
        """Train the classifier to tell calibration [n, F] from test [m, F] features."""
        cal = _features(cal_features, "cal_features")
        test = _features(test_features, "test_features")
        if cal.shape[1] != test.shape[1]:
            raise InputError(f"`cal_features` and `test_features` must have the same number "
                             f"of columns, got {cal.shape[1]} and {test.shape[1]}")
        classifier = self.classifier
        if classifier is None:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        x = np.concatenate([cal, test])
        y = np.concatenate([np.zeros(len(cal), dtype=np.int64),
                            np.ones(len(test), dtype=np.int64)])
        classifier.fit(x, y)
        self._fitted = classifier
        self._prior_ratio = len(cal) / len(test)
        self._num_features = cal.shape[1]
        return self

    def __call__(self, features: Any) -> torch.Tensor:
        """Weights w(x) [N] (float64, > 0) for features [N, F]."""
        if self._fitted is None:
            raise NotFittedError("DomainClassifierWeights is not fitted; call "
                                 "`.fit(cal_features, test_features)` first")
        x = _features(features, "features")
        if x.shape[1] != self._num_features:
            raise InputError(f"`features` must have {self._num_features} columns as in fit, "
                             f"got {x.shape[1]}")
        column = list(self._fitted.classes_).index(1)
        p = np.clip(self._fitted.predict_proba(x)[:, column], self.clip, 1 - self.clip)
        return torch.from_numpy(p / (1 - p) * self._prior_ratio)
