"""Embedded data sets: scikit-learn's bundled sets and generated problems, never downloaded.

* :func:`load_digits`: 8x8 digit images (1,797, pixels scaled to [0, 1]) with an OOD
  split: classes ``ood_classes`` (default 8 and 9) are held out of training and form
  ``X_ood``; ``X_corrupted`` is the in-distribution test set with Gaussian pixel noise
  and random pixel dropout (labels ``y_test``).
* :func:`make_gap_regression`: 1-D heteroscedastic regression with a gap in the inputs
  between the two training clusters, to see in-between uncertainty.
* :func:`load_diabetes`: scikit-learn's diabetes regression (442 x 10), standardized.

Splits are drawn with ``seed``; every array comes as a float32 tensor (labels int64).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from bayesify._validation import check_fraction, check_positive_int
from bayesify.errors import InputError

__all__ = [
    "ClassificationData",
    "RegressionData",
    "corrupt",
    "load",
    "load_diabetes",
    "load_digits",
    "make_gap_regression",
]

DATASETS = ("digits", "gap", "diabetes")


@dataclass
class ClassificationData:
    """Train/validation/test splits plus OOD and corrupted test inputs.

    Shapes: X_* [N, 64] float32, y_* [N] int64 with labels in [0, num_classes).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_ood: torch.Tensor
    X_corrupted: torch.Tensor
    num_classes: int
    in_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]

    task = "classification"

    def to(self, dtype: torch.dtype) -> ClassificationData:
        """A copy with the floating tensors in ``dtype``."""
        return _cast(self, dtype)


@dataclass
class RegressionData:
    """Train/validation/test splits of a regression problem (targets standardized).

    Shapes: X_* [N, F] float32, y_* [N] float32. For the gap problem, ``X_grid`` [G, 1]
    spans the input range and ``gap_mask`` [G] marks grid points inside the gap.
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_grid: torch.Tensor | None = None
    gap_mask: torch.Tensor | None = None

    task = "regression"

    def to(self, dtype: torch.dtype) -> RegressionData:
        """A copy with the floating tensors in ``dtype``."""
        return _cast(self, dtype)


def _cast(data, dtype):
    values = {}
    for f in fields(data):
        value = getattr(data, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        values[f.name] = value
    return type(data)(**values)


def _split(n: int, fractions: tuple[float, float], rng: np.random.Generator):
    order = rng.permutation(n)
    n_val = int(round(fractions[0] * n))
    n_test = int(round(fractions[1] * n))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def corrupt(x: torch.Tensor, *, noise_std: float = 0.3, drop_prob: float = 0.25,
            seed: int = 0) -> torch.Tensor:
    """Gaussian pixel noise plus random pixel dropout, clipped to [0, 1].

    Args:
        x: images with pixels in [0, 1], [N, P].
        noise_std: standard deviation of the additive Gaussian noise.
        drop_prob: probability that a pixel is set to zero.
        seed: seed of the corruption.

    Returns:
        The corrupted images [N, P].
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_std
    keep = torch.rand(x.shape, generator=generator) >= drop_prob
    return ((x + noise) * keep).clamp(0, 1)


def load_digits(
    *,
    ood_classes: tuple[int, ...] = (8, 9),
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> ClassificationData:
    """scikit-learn's digits with held-out OOD classes and a corrupted test set."""
    check_fraction(val_fraction, "val_fraction")
    check_fraction(test_fraction, "test_fraction")
    from sklearn.datasets import load_digits as sklearn_digits  # heavy; only when asked

    bunch = sklearn_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    if not set(ood_classes) <= set(range(10)) or len(set(ood_classes)) >= 9:
        raise InputError(f"`ood_classes` must be a few digits in 0..9, got {ood_classes}")
    in_classes = tuple(c for c in range(10) if c not in ood_classes)
    is_ood = np.isin(y, ood_classes)
    x_in, y_in = x[~is_ood], y[~is_ood]
    relabel = np.full(10, -1)
    relabel[list(in_classes)] = np.arange(len(in_classes))
    y_in = relabel[y_in]
    rng = np.random.default_rng(seed)
    train, val, test = _split(len(y_in), (val_fraction, test_fraction), rng)
    x_test = torch.from_numpy(x_in[test])
    return ClassificationData(
        name="digits",
        X_train=torch.from_numpy(x_in[train]), y_train=torch.from_numpy(y_in[train]),
        X_val=torch.from_numpy(x_in[val]), y_val=torch.from_numpy(y_in[val]),
        X_test=x_test, y_test=torch.from_numpy(y_in[test]),
        X_ood=torch.from_numpy(x[is_ood]),
        X_corrupted=corrupt(x_test, seed=seed),
        num_classes=len(in_classes), in_classes=in_classes, ood_classes=tuple(ood_classes),
    )


def gap_function(x: torch.Tensor) -> torch.Tensor:
    """The noise-free mean of the gap problem, f(x) = sin(3x) + 0.3x."""
    return torch.sin(3 * x) + 0.3 * x


def gap_noise_std(x: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic noise std of the gap problem, growing from 0.05 to 0.35 on [-1.5, 1.5]."""
    return 0.05 + 0.1 * (x + 1.5)


def make_gap_regression(n_train: int = 400, n_test: int = 400, *, gap: float = 0.5,
                        seed: int = 0) -> RegressionData:
    """1-D heteroscedastic regression with no training inputs in (-gap, gap).

    Inputs are uniform on [-1.5, -gap] ∪ [gap, 1.5]; targets are
    ``gap_function(x) + gap_noise_std(x) * ε`` (not standardized: the scale is known).
    ``X_grid`` covers [-2, 2] and ``gap_mask`` marks its points inside the gap.
    """
    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    if not 0 <= gap < 1.5:
        raise InputError(f"`gap` must lie in [0, 1.5), got {gap}")
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        side = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        magnitude = gap + (1.5 - gap) * torch.rand(n, generator=generator)
        x = (side * magnitude).float()[:, None]
        eps = torch.randn(n, generator=generator)
        y = gap_function(x[:, 0]) + gap_noise_std(x[:, 0]) * eps
        return x, y

    x_train, y_train = draw(n_train)
    x_val, y_val = draw(max(n_train // 4, 1))
    x_test, y_test = draw(n_test)
    grid = torch.linspace(-2, 2, 401)[:, None]
    return RegressionData(
        name="gap", X_train=x_train, y_train=y_train, X_val=x_val, y_val=y_val,
        X_test=x_test, y_test=y_test, X_grid=grid, gap_mask=grid[:, 0].abs() < gap,
    )


def load_diabetes(*, val_fraction: float = 0.15, test_fraction: float = 0.25,
                  seed: int = 0) -> RegressionData:
    """scikit-learn's diabetes, inputs and targets standardized with training statistics."""
    check_fraction(val_fraction, "val_fraction")
    check_fraction(test_fraction, "test_fraction")
    from sklearn.datasets import load_diabetes as sklearn_diabetes  # heavy; only when asked

    bunch = sklearn_diabetes()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.float64)
    train, val, test = _split(len(y), (val_fraction, test_fraction), np.random.default_rng(seed))
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()

    def scaled(idx):
        return (torch.from_numpy(((x[idx] - x_mean) / x_std).astype(np.float32)),
                torch.from_numpy(((y[idx] - y_mean) / y_std).astype(np.float32)))

    (xtr, ytr), (xva, yva), (xte, yte) = scaled(train), scaled(val), scaled(test)
    return RegressionData(name="diabetes", X_train=xtr, y_train=ytr, X_val=xva, y_val=yva,
                          X_test=xte, y_test=yte)


def load(name: str, *, seed: int = 0) -> ClassificationData | RegressionData:
    """An embedded data set by name: ``"digits"``, ``"gap"`` or ``"diabetes"``."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "gap":
        return make_gap_regression(seed=seed)
    if name == "diabetes":
        return load_diabetes(seed=seed)
    raise InputError(f"`name` must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")

