"""Post-hoc recalibration: fit a small map on held-out data, apply it to any predictive.

Every recalibrator has ``fit(pred, y)`` (returns ``self``) and ``transform(pred)``
(returns a new Predictive of the same task), and works for every method because it
only sees Predictives:

* :class:`TemperatureScaling` (Guo et al., 2017): logits / T with one T fitted by NLL;
  argmax is unchanged.
* :class:`VectorScaling`: logits * w + b with per-class w, b [C] fitted by NLL.
* :class:`~bayesify.calibration.IsotonicRecalibration` (in :mod:`.isotonic`): isotonic
  regression for classifiers and regressors.
* :class:`VarianceScaling`: one factor s on the predictive standard deviation, fitted by
  NLL (closed form for Gaussians), for Gaussian and mixture predictives; shared by the
  outputs of a [N, D] predictive, or one per output with ``per_output=True``.

Raw inputs: the scaling classes read a raw classification tensor as **logits** ([N, C],
[S, N, C] per-sample, or [N] binary logits of class 1); regression recalibrators take a
``(mean, variance)`` pair as Gaussians. Fitting runs in float64;
outputs keep the input's dtype and device.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from bayesify._validation import as_tensor, check_labels
from bayesify.errors import InputError, NotFittedError
from bayesify.predictive import (
    CategoricalPredictive,
    GaussianPredictive,
    GeneralizedGaussianPredictive,
    MixturePredictive,
    Predictive,
    RegressionPredictive,
)

__all__ = ["TemperatureScaling", "VarianceScaling", "VectorScaling", "scale_logits",
           "scale_predictive"]

_LBFGS_ITERATIONS = 100


# ---- Input handling


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_floating_point() else tensor.to(torch.get_default_dtype())


def _log_probs(value: Any, name: str, *, per_sample: bool = False) -> torch.Tensor:
    """Normalized log-probabilities from a predictive or logits.

    Returns [N, C] for the pooled predictive, or [S, N, C] per sample when ``per_sample``
    and the input has samples.
    """
    if isinstance(value, CategoricalPredictive):
        probs = value.sample_probs if per_sample and value.sample_probs is not None \
            else value.probs
        return torch.log_softmax(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), dim=-1)
    if isinstance(value, Predictive):
        raise InputError(f"`{name}` must be a CategoricalPredictive or logits, "
                         f"got a {type(value).__name__}")
    logits = _float(as_tensor(value, name, ndim=(1, 2, 3)))
    if logits.dim() == 1:  # binary: the logit of class 1 against a zero logit for class 0
        logits = torch.stack([torch.zeros_like(logits), logits], dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    if log_probs.dim() == 3 and not per_sample:
        pooled = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
        return torch.log_softmax(pooled, dim=-1)
    return log_probs


def _regression(value: Any, name: str) -> RegressionPredictive:
    """A regression predictive from a predictive or a ``(mean, variance)`` pair."""
    if isinstance(value, RegressionPredictive):
        return value
    if isinstance(value, Predictive):
        raise InputError(f"`{name}` must be a regression predictive or a (mean, variance) "
                         f"pair, got a {type(value).__name__}")
    if isinstance(value, tuple | list) and len(value) == 2:
        mean = _float(as_tensor(value[0], f"{name}[0] (mean)", ndim=(1, 2)))
        return GaussianPredictive(mean, as_tensor(value[1], f"{name}[1] (variance)",
                                                  dtype=mean.dtype, device=mean.device))
    raise InputError(f"`{name}` must be a GaussianPredictive, a MixturePredictive or a "
                     f"(mean, variance) pair, got {type(value).__name__}")


def _labels(y: Any, num_points: int, num_classes: int, device: torch.device) -> torch.Tensor:
    labels = as_tensor(y, "y", device=device)
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise InputError(f"`y` must have shape [N] (one class index per row), "
                         f"got {list(labels.shape)}")
    if labels.shape[0] != num_points:
        raise InputError(f"inputs must have the same number of rows: `pred` has {num_points}, "
                         f"`y` has {labels.shape[0]}")
    return check_labels(labels, "y", num_classes)


# ---- Math (pure functions)


def scale_logits(log_probs: torch.Tensor, weight: torch.Tensor | float,
                 bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Log-softmax of ``log_probs * weight + bias`` over the class axis (last).

    Temperature scaling is ``weight = 1 / T``; vector scaling uses ``weight``, ``bias`` [C].
    """
    return torch.log_softmax(log_probs * weight + bias, dim=-1)


def categorical_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of labels [N] under log-probs [N, C], or under the average of samples [S, N, C]."""
    if log_probs.dim() == 2:
        return -log_probs.gather(1, labels[:, None]).mean()
    picked = log_probs.gather(2, labels.expand(log_probs.shape[0], -1)[..., None])[..., 0]
    log_num = torch.log(torch.tensor(float(log_probs.shape[0]), dtype=log_probs.dtype))
    return -(torch.logsumexp(picked, dim=0) - log_num).mean()


def gaussian_std_scale(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor, *,
                       per_output: bool = False) -> float | torch.Tensor:
    """Maximum-likelihood factor s on the std of N(mean, variance): sqrt(mean(r^2 / var)).

    Args:
        mean, variance, y: [N] or [N, D].
        per_output: one factor per output, a float64 tensor [D] (mean over the N
            points of each column), instead of one float over all entries.
    """
    var = variance.clamp_min(torch.finfo(variance.dtype).tiny)
    ratio = (y - mean) ** 2 / var
    if per_output:
        columns = ratio if ratio.dim() == 2 else ratio[:, None]
        return columns.mean(0).sqrt().double().cpu()
    return float(ratio.mean().sqrt())


def scale_predictive(pred: RegressionPredictive,
                     scale: float | torch.Tensor) -> RegressionPredictive:
    """The predictive of mean + scale * (Y - mean): same type, std times ``scale``.

    A mixture's component means spread out about the mixture mean by ``scale`` and its
    component variances grow by ``scale**2``, so the shape of the mixture is kept and
    its aleatoric/epistemic split scales by ``scale**2`` alike. ``scale`` is one number,
    or one per output [D] for a [N, D] predictive.
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.to(dtype=pred.mean.dtype, device=pred.mean.device)
    if isinstance(pred, GaussianPredictive):
        aleatoric = pred._aleatoric_variance
        return GaussianPredictive(pred.mean, pred.variance * scale ** 2,
                                  None if aleatoric is None else aleatoric * scale ** 2)
    if isinstance(pred, MixturePredictive):
        center = pred.mean
        return MixturePredictive(center + scale * (pred.means - center),
                                 pred.variances * scale ** 2, pred.weights)
    if isinstance(pred, GeneralizedGaussianPredictive):
        return pred.rescaled(scale)
    raise InputError(f"`pred` must be a GaussianPredictive, MixturePredictive or "
                     f"GeneralizedGaussianPredictive, got {type(pred).__name__}")


def _scaled_nll(pred: RegressionPredictive, y: torch.Tensor,
                log_scale: torch.Tensor) -> torch.Tensor:
    """Mean NLL of y under mean + s (Y - mean), s = exp(log_scale), by change of variables."""
    center = pred.mean
    unscaled = center + (y - center) * torch.exp(-log_scale)
    log_jacobian = log_scale.sum() if log_scale.dim() else pred.num_outputs * log_scale
    return -(pred.log_prob(unscaled).mean() - log_jacobian)


def _minimize(params: list[torch.Tensor], objective: Any) -> None:
    """Minimize ``objective()`` over ``params`` with strong-Wolfe L-BFGS."""
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=_LBFGS_ITERATIONS,
                                  tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)


# ---- Recalibrators


class _Recalibrator:
    """Shared fit-state handling."""

    _fitted = False

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return self._fitted

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call "
                                 "`.fit(pred, y)` on held-out data before `.transform(pred)`")


class _LogitScaling(_Recalibrator, abc.ABC):
    """logits -> logits * weight + bias, fitted by NLL; subclasses choose the parameters.

    Args:
        per_sample: for predictives with per-sample probabilities, scale each sample and
            average again (keeps the epistemic/aleatoric split) instead of scaling the
            pooled predictive. Off by default: fitted per sample, a temperature can run
            to zero, turning the samples into hard votes that look best on the
            calibration split and assign ~0 probability to labels no sample voted for on
            new data. Scaling the pooled predictive ("pool, then calibrate", Rahaman &
            Thiery 2021) has no such optimum; it returns a predictive without samples.
    """

    def __init__(self, *, per_sample: bool = False):
        self.per_sample = bool(per_sample)

    @abc.abstractmethod
    def _initial(self, num_classes: int) -> list[torch.Tensor]:
        """Initial float64 parameters (the identity map)."""

    @abc.abstractmethod
    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the logit map from the parameters."""

    def fit(self, pred: Any, y: Any) -> _LogitScaling:
        """Fit on held-out predictions.

        Args:
            pred: a CategoricalPredictive, or logits [N, C] / [S, N, C] / binary [N].
            y: true class indices [N].

        Returns:
            ``self``.
        """
        log_probs = _log_probs(pred, "pred", per_sample=self.per_sample).detach().double()
        labels = _labels(y, log_probs.shape[-2], log_probs.shape[-1], log_probs.device)
        params = [p.to(log_probs.device).requires_grad_() for p in
                  self._initial(log_probs.shape[-1])]

        def objective() -> torch.Tensor:
            weight, bias = self._affine(params)
            return categorical_nll(scale_logits(log_probs, weight, bias), labels)

        _minimize(params, objective)
        self._params = [p.detach() for p in params]
        self._num_classes = log_probs.shape[-1]
        self._fitted = True
        return self

    def transform(self, pred: Any) -> CategoricalPredictive:
        """Rescale the logits of ``pred`` (of the pooled predictive, or each sample's).

        Args:
            pred: a CategoricalPredictive, or logits [N, C] / [S, N, C] / binary [N].

        Returns:
            A CategoricalPredictive in the input's dtype; with ``per_sample=True`` it keeps
            per-sample probabilities (each sample rescaled) when the input had them.
        """
        self._check_fitted()
        log_probs = _log_probs(pred, "pred", per_sample=self.per_sample)
        if log_probs.shape[-1] != self._num_classes:
            raise InputError(f"`pred` has {log_probs.shape[-1]} classes but the scaling was "
                             f"fitted on {self._num_classes}")
        weight, bias = (p.to(log_probs) for p in self._affine(self._params))
        scaled = scale_logits(log_probs, weight, bias)
        if scaled.dim() == 3:
            return CategoricalPredictive.from_logits(sample_logits=scaled)
        return CategoricalPredictive.from_logits(logits=scaled)


class TemperatureScaling(_LogitScaling):
    """Temperature scaling (Guo et al., 2017): probabilities softmax(logits / T).

    One temperature T > 0 is fitted by minimizing the NLL of held-out labels with L-BFGS
    on log T. Dividing all logits by one positive number keeps their order, so the
    predicted class never changes. For a predictive with per-sample probabilities
    (MC dropout, IVON, VI) the pooled log-probabilities are scaled by default; with
    ``per_sample=True`` each sample's are, and the samples are averaged again, which
    keeps the epistemic/aleatoric split but can move the argmax (rarely) and can
    overfit (see :class:`_LogitScaling`).

    Example:
        >>> ts = TemperatureScaling().fit(model.predict(x_val), y_val)
        >>> calibrated = ts.transform(model.predict(x_test))
    """

    def _initial(self, num_classes: int) -> list[torch.Tensor]:
        return [torch.zeros((), dtype=torch.float64)]

    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(-params[0]), torch.zeros_like(params[0])

    @property
    def temperature(self) -> float:
        """The fitted temperature T (> 1 softens overconfident predictions)."""
        self._check_fitted()
        return float(torch.exp(self._params[0]))


class VectorScaling(_LogitScaling):
    """Vector scaling (Guo et al., 2017): softmax(logits * w + b) with w, b [C] by NLL.

    More flexible than one temperature, so it can also fix class-dependent bias, but it
    may change the predicted class and needs more held-out data (2C parameters).
    """

    def _initial(self, num_classes: int) -> list[torch.Tensor]:
        return [torch.ones(num_classes, dtype=torch.float64),
                torch.zeros(num_classes, dtype=torch.float64)]

    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return params[0], params[1]

    @property
    def weight(self) -> torch.Tensor:
        """Per-class logit multipliers w [C] (float64)."""
        self._check_fitted()
        return self._params[0]

    @property
    def bias(self) -> torch.Tensor:
        """Per-class logit offsets b [C] (float64)."""
        self._check_fitted()
        return self._params[1]


class VarianceScaling(_Recalibrator):
    """A factor s on the predictive standard deviation, fitted by NLL.

    For a GaussianPredictive s has the closed form sqrt(mean((y - mean)^2 / variance));
    for a MixturePredictive or GeneralizedGaussianPredictive the whole distribution is
    stretched about its mean (mean + s (Y - mean)) and s is fitted by L-BFGS on log s,
    starting from the Gaussian value. The mean never changes.

    Args:
        per_output: for multi-output predictives [N, D], fit one factor per output
            (s [D]; outputs over- and under-dispersed in different ways are each fixed)
            instead of one factor shared by all outputs (the default).
    """

    def __init__(self, *, per_output: bool = False):
        self.per_output = bool(per_output)

    def fit(self, pred: Any, y: Any) -> VarianceScaling:
        """Fit on held-out predictions.

        Args:
            pred: a GaussianPredictive, MixturePredictive or (mean, variance) pair, [N] or
                [N, D].
            y: targets, shape of the mean.

        Returns:
            ``self``.
        """
        pred = _regression(pred, "pred")
        if not isinstance(pred, GaussianPredictive | MixturePredictive
                          | GeneralizedGaussianPredictive):
            raise InputError("`pred` must be a GaussianPredictive, MixturePredictive or "
                             f"GeneralizedGaussianPredictive, got {type(pred).__name__}")
        pred = pred.to(dtype=torch.float64)
        target = pred._target(y).detach()
        scale = gaussian_std_scale(pred.mean, pred.variance, target,
                                   per_output=self.per_output)
        if not bool(torch.all(torch.as_tensor(scale) > 0)):
            which = "" if not self.per_output else \
                f" of output {int(torch.as_tensor(scale).argmin())}"
            raise InputError(
                f"`y` equals the predictive mean at every point{which} (all residuals are "
                "exactly zero), so the maximum-likelihood variance scale is 0 and would "
                "collapse the predictive; fit VarianceScaling on held-out data the model "
                "did not fit exactly")
        if not isinstance(pred, GaussianPredictive):  # no closed form: L-BFGS on log s
            start = torch.as_tensor(scale, dtype=torch.float64).clamp_min(1e-12).log()
            log_scale = start.to(target.device).clone().requires_grad_()
            _minimize([log_scale], lambda: _scaled_nll(pred, target, log_scale))
            fitted = log_scale.detach().exp().cpu()
            scale = fitted if self.per_output else float(fitted)
        self._scale = scale
        self._fitted = True
        return self

    @property
    def scale(self) -> float | torch.Tensor:
        """The fitted factor s on the standard deviation (> 1 widens the predictive):
        a float, or float64 [D] with ``per_output``."""
        self._check_fitted()
        return self._scale

    def transform(self, pred: Any) -> RegressionPredictive:
        """The predictive with its spread about the mean multiplied by ``scale``.

        Args:
            pred: a GaussianPredictive, MixturePredictive or (mean, variance) pair.

        Returns:
            The same predictive type, in the input's dtype.
        """
        self._check_fitted()
        pred = _regression(pred, "pred")
        if self.per_output and pred.num_outputs != self._scale.shape[0]:
            raise InputError(f"`pred` has {pred.num_outputs} output(s) but the scaling was "
                             f"fitted per output on {self._scale.shape[0]}")
        return scale_predictive(pred, self._scale)
