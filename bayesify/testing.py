"""The conformance suite: :func:`check_method` holds every method to the same contract.

In the spirit of scikit-learn's ``check_estimator``: a method, built in or registered by
a third party with :func:`~bayesify.register_method`, passes when it wraps, fits and
predicts on tiny generated problems with the right Predictive types and shapes; keeps
every tensor on the model's dtype and device; has a posterior differentiable in x;
saves and loads bitwise; repeats bitwise under a seed; leaves the user's network alone
with ``copy_model=True``; raises the documented errors; gives finite outputs; fits
a BatchNorm network without touching its statistics at prediction; trains in a user's
own loop (``loss`` + ``finish_fit``); and stops a diverging fit with a clear error.

>>> from bayesify.testing import check_method
>>> check_method("vbll", "classification", dtype=torch.float64)

Each check is also available alone (``check_method(..., checks=["save_load"])``), so a
test suite can parametrize over :data:`CHECKS`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bayesify.core import BayesianModel, bayesify, get_method
from bayesify.errors import (
    ConvergenceWarning,
    InputError,
    NotFittedError,
    TrainingDivergedError,
)
from bayesify.fitting import GradientFit
from bayesify.posterior import GaussianPosterior, SampledPosterior
from bayesify.predictive import CategoricalPredictive, Predictive, RegressionPredictive

__all__ = ["CHECKS", "MethodSettings", "check_method", "conformance_settings"]

N_TRAIN, N_TEST, IN_FEATURES, NUM_CLASSES = 48, 7, 5, 3


@dataclass
class MethodSettings:
    """How the suite runs one method: options for ``bayesify(...)`` and ``fit(...)``
    that keep it fast on the tiny problems (the defaults suit real data)."""

    options: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=lambda: {"epochs": 2})
    #: fit options that make a gradient-trained method diverge
    diverge: dict[str, Any] = field(default_factory=dict)
    #: replaces ``fit`` for one task (a method fit in closed form for one task only)
    fit_for: dict[str, dict[str, Any]] = field(default_factory=dict)


_FAST: dict[str, MethodSettings] = {
    # A handful of draws: the checks are about the contract, not about convergence
    # (check_method silences the ConvergenceWarning such short chains rightly raise).
    "hmc": MethodSettings(options={"num_samples": 8, "warmup": 8, "max_tree_depth": 3},
                          fit={}),
    # At the default density 0.1 the suite's 16-wide MLP keeps about two active output
    # weights, often on dead ReLUs, so the output can be constant in x.
    "ssvi": MethodSettings(options={"density": 0.5}),
    # The exact GP (regression) is fit in closed form and refuses `epochs`.
    "gp": MethodSettings(options={"num_inducing": 8, "num_restarts": 1},
                         fit_for={"regression": {}}),
    "ensemble": MethodSettings(options={"members": 2}),
    "laplace": MethodSettings(fit={}),
    # Post hoc on LoRA adapters: a short search with few draws (the suite passes a
    # LoRA network through `network=`).
    "tfb": MethodSettings(options={"iterations": 4, "num_samples": 4}, fit={}),
}


def conformance_settings(method: str) -> MethodSettings:
    """The suite's settings for a built-in method (defaults for any other)."""
    return copy.deepcopy(_FAST.get(method, MethodSettings()))


# ----------------------------------------------------------------- problems


def _data(task: str, dtype: torch.dtype, device: torch.device, n: int, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g, dtype=torch.float64)
    if task == "classification":
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    else:
        y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g,
                                                                  dtype=torch.float64)
        y = y.to(dtype)
    return x.to(dtype=dtype, device=device), y.to(device)


def default_network(task: str, *, batchnorm: bool = False, seed: int = 0) -> nn.Module:
    """The suite's network: a 5-16-16-K MLP (C = 3 logits or one regression mean),
    with BatchNorm1d after the first layer when ``batchnorm``."""
    torch.manual_seed(seed)
    out = NUM_CLASSES if task == "classification" else 1
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out)]
    return nn.Sequential(*layers)


@dataclass
class _Context:
    method: str | type[BayesianModel]
    task: str
    dtype: torch.dtype
    device: torch.device
    settings: MethodSettings
    network: Callable[..., nn.Module]

    @property
    def cls(self) -> type[BayesianModel]:
        return get_method(self.method) if isinstance(self.method, str) else self.method

    @property
    def name(self) -> str:
        return self.method if isinstance(self.method, str) else self.cls.__name__

    def net(self, **kwargs: Any) -> nn.Module:
        return self.network(self.task, **kwargs).to(dtype=self.dtype, device=self.device)

    def data(self, n: int = N_TRAIN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return _data(self.task, self.dtype, self.device, n, seed)

    def wrap(self, net: nn.Module | None = None, **extra: Any) -> BayesianModel:
        options = {**self.settings.options, **extra}
        return bayesify(self.net() if net is None else net, self.method, task=self.task,
                        **options)

    def fit(self, bm: BayesianModel, seed: int = 0, **extra: Any) -> BayesianModel:
        return bm.fit(self.data(), progress=False, seed=seed,
                      **{**self.settings.fit, **extra})

    def fitted(self, seed: int = 0, **wrap: Any) -> BayesianModel:
        return self.fit(self.wrap(**wrap), seed=seed)

    def x_test(self) -> torch.Tensor:
        return self.data(N_TEST, seed=1)[0]


def _fail(ctx: _Context, check: str, message: str) -> None:
    raise AssertionError(f"{ctx.name} ({ctx.task}, {ctx.dtype}, {ctx.device}) failed "
                         f"check {check!r}: {message}")


def _tensors(pred: Predictive) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pred._fields().items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------- checks


def check_types_and_shapes(ctx: _Context) -> None:
    bm = ctx.fitted()
    pred = bm.predict(ctx.x_test(), seed=0)
    if ctx.task == "classification":
        if not isinstance(pred, CategoricalPredictive):
            _fail(ctx, "types_and_shapes", f"predict gave {type(pred).__name__}")
        if tuple(pred.probs.shape) != (N_TEST, NUM_CLASSES):
            _fail(ctx, "types_and_shapes", f"probs have shape {list(pred.probs.shape)}")
    else:
        if not isinstance(pred, RegressionPredictive):
            _fail(ctx, "types_and_shapes", f"predict gave {type(pred).__name__}")
        if tuple(pred.mean.shape) != (N_TEST,) or tuple(pred.variance.shape) != (N_TEST,):
            _fail(ctx, "types_and_shapes", f"mean {list(pred.mean.shape)}, variance "
                                           f"{list(pred.variance.shape)}; expected [{N_TEST}]")
    post = bm.posterior(ctx.x_test(), seed=0)
    if not isinstance(post, SampledPosterior | GaussianPosterior):
        _fail(ctx, "types_and_shapes", f"posterior gave {type(post).__name__}")
    if post.mean.shape[0] != N_TEST or post.mean.dim() != 2:
        _fail(ctx, "types_and_shapes", f"posterior mean has shape {list(post.mean.shape)}")
    point = bm(ctx.x_test())
    if point.shape[0] != N_TEST:
        _fail(ctx, "types_and_shapes", f"forward gave shape {list(point.shape)}")


def _check_tensors(ctx: _Context, bm: BayesianModel, when: str) -> None:
    for name, t in [*bm.named_parameters(), *bm.named_buffers()]:
        if t.is_floating_point() and (t.dtype != ctx.dtype or t.device.type != ctx.device.type):
            _fail(ctx, "dtype_device", f"{when}, `{name}` is {t.dtype} on {t.device}; the "
                                       f"model is {ctx.dtype} on {ctx.device}")


def check_dtype_device(ctx: _Context) -> None:
    bm = ctx.wrap()
    _check_tensors(ctx, bm, "after wrapping")
    ctx.fit(bm)
    _check_tensors(ctx, bm, "after fitting")
    post = bm.posterior(ctx.x_test(), seed=0)
    for key, t in {"posterior mean": post.mean, "posterior variance": post.variance}.items():
        if t.dtype != ctx.dtype or t.device.type != ctx.device.type:
            _fail(ctx, "dtype_device", f"the {key} is {t.dtype} on {t.device}")
    for key, t in _tensors(bm.predict(ctx.x_test(), seed=0)).items():
        if t.is_floating_point() and (t.dtype != ctx.dtype or t.device.type != ctx.device.type):
            _fail(ctx, "dtype_device", f"the predictive's {key} is {t.dtype} on {t.device}")


def check_posterior_differentiable(ctx: _Context) -> None:
    bm = ctx.fitted()
    x = ctx.x_test().clone().requires_grad_(True)
    post = bm.posterior(x, seed=0)
    value = post.mean.sum() + post.variance.sum()
    if not value.requires_grad:
        _fail(ctx, "posterior_differentiable", "posterior(x) is not connected to x")
    (grad,) = torch.autograd.grad(value, x)
    if not bool(torch.isfinite(grad).all()) or not bool((grad != 0).any()):
        _fail(ctx, "posterior_differentiable", "d posterior / dx is zero or not finite")


def check_save_load(ctx: _Context) -> None:
    bm = ctx.fitted()
    expected = bm.predict(ctx.x_test(), seed=3)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        bm.save(path)
        fresh = ctx.wrap(ctx.net(seed=1))
        fresh.load(path)
    got = fresh.predict(ctx.x_test(), seed=3)
    for key, value in _tensors(expected).items():
        if not torch.equal(value, _tensors(got)[key]):
            _fail(ctx, "save_load", f"the loaded model's {key} differs from the saved one's")


def check_determinism(ctx: _Context) -> None:
    first = ctx.fitted(seed=5).predict(ctx.x_test(), seed=2)
    second = ctx.fitted(seed=5).predict(ctx.x_test(), seed=2)
    for key, value in _tensors(first).items():
        if not torch.equal(value, _tensors(second)[key]):
            _fail(ctx, "determinism", f"two fits with seed=5 give different {key}")


def check_copy_model(ctx: _Context) -> None:
    net = ctx.net()
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    bm = ctx.fit(ctx.wrap(net, copy_model=True))
    bm.predict(ctx.x_test(), seed=0)
    after = net.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k])
                                            for k in before):
        _fail(ctx, "copy_model", "copy_model=True changed the user's network")
    if flags != [m.training for m in net.modules()]:
        _fail(ctx, "copy_model", "copy_model=True changed the user's train/eval flags")
    if any(p.requires_grad is False for p in net.parameters()):
        _fail(ctx, "copy_model", "copy_model=True froze the user's parameters")


def _expect_error(ctx: _Context, call: Callable[[], Any], error: type[Exception],
                  mention: str, what: str) -> None:
    """``call()`` must raise ``error`` with a message that mentions ``mention``."""
    try:
        call()
    except error as exc:
        if mention not in str(exc):
            _fail(ctx, "errors", f"{what}: the error does not mention {mention!r}: {exc}")
    else:
        _fail(ctx, "errors", f"{what} did not raise {error.__name__}")


def check_errors(ctx: _Context) -> None:
    bm = ctx.wrap()
    if not bm.is_fitted:
        _expect_error(ctx, lambda: bm.predict(ctx.x_test()), NotFittedError, "fit",
                      "predict before fit")
        _expect_error(ctx, lambda: bm.posterior(ctx.x_test()), NotFittedError, "fit",
                      "posterior before fit")
    _expect_error(ctx, lambda: ctx.wrap(no_such_option=1), InputError, "no_such_option",
                  "an unknown option")
    _expect_error(ctx, lambda: ctx.fit(ctx.wrap(), epochs=-1), InputError, "epochs",
                  "fit(epochs=-1)")


def check_finite(ctx: _Context) -> None:
    pred = ctx.fitted().predict(ctx.x_test(), seed=0)
    for key, value in _tensors(pred).items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            _fail(ctx, "finite", f"the predictive's {key} holds NaN or inf")


def check_batchnorm(ctx: _Context) -> None:
    bm = ctx.fitted(net=ctx.net(batchnorm=True))
    norms = [m for m in bm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    pred = bm.predict(ctx.x_test(), seed=0)
    if any(not (torch.equal(m.running_mean, s[0]) and torch.equal(m.running_var, s[1]))
           for m, s in zip(norms, stats, strict=True)):
        _fail(ctx, "batchnorm", "predict changed BatchNorm running statistics")
    for key, value in _tensors(pred).items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            _fail(ctx, "batchnorm", f"the predictive's {key} holds NaN or inf")


def check_own_loop(ctx: _Context) -> None:
    bm = ctx.wrap(n_data=N_TRAIN) if "n_data" in _init_names(ctx.cls) else ctx.wrap()
    if not isinstance(bm.fit_strategy(), GradientFit):
        return  # closed-form and MCMC fits have no minibatch loop to reproduce
    x, y = ctx.data()
    optimizer = bm.configure_optimizer(1e-3, 0.0)
    sampled = getattr(optimizer, "sampled_params", None)
    bm.train()
    for start in range(0, N_TRAIN, 16):
        optimizer.zero_grad()
        context = sampled(train=True) if sampled else contextlib.nullcontext()
        with context:
            loss = bm.loss(x[start:start + 16], y[start:start + 16])
            loss.backward()
        optimizer.step()
    bm.finish_fit()
    pred = bm.predict(ctx.x_test(), seed=0)
    for key, value in _tensors(pred).items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            _fail(ctx, "own_loop", f"after an own loop + finish_fit, {key} is not finite")


def _init_names(cls: type[BayesianModel]) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def check_divergence(ctx: _Context) -> None:
    bm = ctx.wrap()
    if not isinstance(bm.fit_strategy(), GradientFit):
        return
    huge = 1e30 if ctx.dtype != torch.float64 else 1e300
    options = {"epochs": 3, "lr": huge, **ctx.settings.diverge}
    try:
        ctx.fit(bm, **options)
    except TrainingDivergedError as exc:
        if "epoch" not in str(exc) or "lr" not in str(exc):
            _fail(ctx, "divergence", f"the error does not name the epoch and the fix: {exc}")
        finite = all(bool(torch.isfinite(p).all()) for p in bm.parameters()
                     if p.is_floating_point())
        if not finite and bm.is_fitted:
            _fail(ctx, "divergence", "non-finite weights were left marked as fitted")
    else:
        _fail(ctx, "divergence", f"fit with lr={huge:g} did not raise TrainingDivergedError")


CHECKS: dict[str, Callable[[_Context], None]] = {
    "types_and_shapes": check_types_and_shapes,
    "dtype_device": check_dtype_device,
    "posterior_differentiable": check_posterior_differentiable,
    "save_load": check_save_load,
    "determinism": check_determinism,
    "copy_model": check_copy_model,
    "errors": check_errors,
    "finite": check_finite,
    "batchnorm": check_batchnorm,
    "own_loop": check_own_loop,
    "divergence": check_divergence,
}


def check_method(
    method: str | type[BayesianModel],
    task: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    options: dict[str, Any] | None = None,
    fit_options: dict[str, Any] | None = None,
    network: Callable[..., nn.Module] | None = None,
    checks: Sequence[str] | None = None,
) -> list[str]:
    """Run the conformance checks on a method.

    Args:
        method: a registered name or a BayesianModel subclass.
        task: ``"classification"`` or ``"regression"``.
        dtype, device: of the network the checks wrap.
        options, fit_options: replace the suite's settings for the method (keep them
            small: the suite fits a few dozen times).
        network: ``network(task, batchnorm=False, seed=0) -> nn.Module`` to use
            instead of the default MLP (5 inputs; 3 logits or 1 regression output).
        checks: names from :data:`CHECKS` (all when ``None``).

    Returns:
        The names of the checks that ran.

    Raises:
        AssertionError: the first failing check, named in the message.
    """
    name = method if isinstance(method, str) else getattr(method, "method_name", "")
    settings = conformance_settings(name)
    if options is not None:
        settings.options = dict(options)
    settings.fit = dict(settings.fit_for.get(task, settings.fit))
    if fit_options is not None:
        settings.fit = dict(fit_options)
    ctx = _Context(method, task, dtype, torch.device(device), settings,
                   network or default_network)
    if task not in ctx.cls.supported_tasks:
        raise InputError(f"method {ctx.name!r} does not support task={task!r}")
    selected = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        raise InputError(f"`checks` names unknown checks {unknown}; known: {list(CHECKS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for check in selected:
            CHECKS[check](ctx)
    return selected
