"""The embedded data sets: shapes, splits, OOD classes, corruption, the gap."""

from __future__ import annotations

import pytest
import torch

import bayesify as bf
from bayesify import data


def test_digits_holds_out_the_ood_classes():
    d = data.load_digits()
    n_total = d.X_train.shape[0] + d.X_val.shape[0] + d.X_test.shape[0] + d.X_ood.shape[0]
    assert n_total == 1797
    assert d.num_classes == 8 and d.in_classes == tuple(range(8))
    assert int(d.y_train.max()) == 7 and int(d.y_train.min()) == 0
    assert d.X_train.shape[1] == 64 and d.X_train.dtype == torch.float32
    assert 0 <= float(d.X_train.min()) and float(d.X_train.max()) <= 1
    # Every class appears in training.
    assert torch.bincount(d.y_train, minlength=8).min() > 50


def test_digits_relabels_when_other_classes_are_held_out():
    d = data.load_digits(ood_classes=(0, 5))
    assert d.in_classes == (1, 2, 3, 4, 6, 7, 8, 9)
    assert int(d.y_test.max()) == 7


def test_corruption_changes_inputs_but_keeps_range_and_is_seeded():
    d = data.load_digits()
    assert d.X_corrupted.shape == d.X_test.shape
    assert float((d.X_corrupted - d.X_test).abs().mean()) > 0.1
    assert 0 <= float(d.X_corrupted.min()) and float(d.X_corrupted.max()) <= 1
    torch.testing.assert_close(data.corrupt(d.X_test, seed=3), data.corrupt(d.X_test, seed=3))


def test_gap_regression_has_no_training_inputs_in_the_gap():
    d = data.make_gap_regression(gap=0.5)
    assert d.X_train.shape == (400, 1)
    assert float(d.X_train.abs().min()) >= 0.5
    assert d.gap_mask.sum() > 0 and d.X_grid.shape[0] == d.gap_mask.shape[0]
    residual = d.y_train - data.gap_function(d.X_train[:, 0])
    # Noise grows from left to right as documented.
    left = residual[d.X_train[:, 0] < -0.5].std()
    right = residual[d.X_train[:, 0] > 0.5].std()
    assert right > 2 * left


def test_diabetes_is_standardized_on_training_statistics():
    d = data.load_diabetes()
    assert d.X_train.shape[1] == 10
    torch.testing.assert_close(d.y_train.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.y_train.std(unbiased=False), torch.tensor(1.0), atol=1e-4,
                               rtol=0)


def test_to_casts_floating_tensors_only():
    d = data.load_digits().to(torch.float64)
    assert d.X_train.dtype == torch.float64 and d.y_train.dtype == torch.int64


def test_load_by_name_and_bad_names():
    assert data.load("gap").name == "gap"
    with pytest.raises(bf.InputError, match="`name` must be one of"):
        data.load("mnist")
    with pytest.raises(bf.InputError, match="`ood_classes`"):
        data.load_digits(ood_classes=(11,))
    with pytest.raises(bf.InputError, match="`val_fraction` must lie in"):
        data.load_diabetes(val_fraction=1.5)
    with pytest.raises(bf.InputError, match="`gap` must lie in"):
        data.make_gap_regression(gap=2.0)
