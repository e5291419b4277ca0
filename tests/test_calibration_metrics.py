"""Classification calibration metrics against plain-Python float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayesify import CategoricalPredictive, GaussianPredictive, InputError
from bayesify import calibration as cal

# The autouse seeding fixture is function-scoped; hypothesis examples do not need it reset.
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------
# Independent references: plain Python loops over Python floats (float64).
# --------------------------------------------------------------------------------------


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    conf, correct = [], []
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        best = max(row)
        conf.append(best)
        correct.append(1.0 if row.index(best) == label else 0.0)
    return conf, correct


def reference_bins(conf: list[float], correct: list[float], n_bins: int):
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]
    for c, k in zip(conf, correct, strict=True):
        b = min(math.floor(c * n_bins), n_bins - 1)
        sums[b][0] += 1
        sums[b][1] += c
        sums[b][2] += k
    return sums


def reference_errors(conf, correct, n_bins):
    total = len(conf)
    ece, mce = 0.0, 0.0
    for count, c_sum, k_sum in reference_bins(conf, correct, n_bins):
        if count:
            gap = abs(k_sum / count - c_sum / count)
            ece += count / total * gap
            mce = max(mce, gap)
    return ece, mce


def reference_ace(conf, correct, n_bins):
    pairs = sorted(zip(conf, correct, strict=True))
    total = len(pairs)
    base, extra = divmod(total, n_bins)
    ace, start = 0.0, 0
    for b in range(n_bins):
        size = base + (1 if b < extra else 0)
        group = pairs[start:start + size]
        start += size
        if group:
            c = sum(p[0] for p in group) / size
            k = sum(p[1] for p in group) / size
            ace += size / total * abs(k - c)
    return ace


def edge_case_probs(dtype: torch.dtype, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class rows whose top confidence hits bin edges, 1.0, 0.5 ties and random values."""
    edges = [b / n_bins for b in range(n_bins + 1) if b / n_bins >= 0.5]
    gen = torch.Generator().manual_seed(1)
    rand = 0.5 + 0.5 * torch.rand(200, generator=gen, dtype=torch.float64)
    top = torch.cat([torch.tensor(edges * 3, dtype=torch.float64), rand, torch.ones(5)])
    top = top.to(dtype)
    probs = torch.stack([top, 1 - top], dim=1)  # exact: 1 - top is exact for top >= 1/2
    labels = torch.randint(0, 2, (probs.shape[0],), generator=gen)
    return probs, labels


# --------------------------------------------------------------------------------------
# ECE / MCE / ACE against the references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [1, 4, 10, 15])
def test_ece_mce_match_reference_on_edges(dtype, n_bins):
    probs, labels = edge_case_probs(dtype, n_bins)
    conf, correct = top_label(probs, labels)
    ece, mce = reference_errors(conf, correct, n_bins)
    assert cal.expected_calibration_error(probs, labels, n_bins) == pytest.approx(ece, abs=1e-6)
    assert cal.maximum_calibration_error(probs, labels, n_bins) == pytest.approx(mce, abs=1e-6)


@pytest.mark.parametrize("n_bins", [3, 15, 500])
def test_ece_mce_ace_match_reference_on_random_multiclass(dtype, n_bins):
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(3 * torch.randn(400, 6, generator=gen, dtype=torch.float64), -1)
    probs = probs.to(dtype)
    labels = torch.randint(0, 6, (400,), generator=gen)
    conf, correct = top_label(probs, labels)
    ece, mce = reference_errors(conf, correct, n_bins)
    pred = CategoricalPredictive(probs)
    for given_probs in (probs, pred, probs.numpy()):
        assert cal.expected_calibration_error(given_probs, labels, n_bins) == \
            pytest.approx(ece, abs=1e-6)
        assert cal.maximum_calibration_error(given_probs, labels, n_bins) == \
            pytest.approx(mce, abs=1e-6)
        assert cal.adaptive_calibration_error(given_probs, labels, n_bins) == \
            pytest.approx(reference_ace(conf, correct, n_bins), abs=1e-6)


def test_calibration_bins_reference_with_zero_one_and_edges(dtype):
    n_bins = 4
    conf = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.1, 0.3, 0.99], dtype=dtype)
    correct = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    bins = cal.calibration_bins(conf, correct, n_bins)
    ref = reference_bins(conf.tolist(), correct.double().tolist(), n_bins)
    assert bins.counts.tolist() == [r[0] for r in ref] == [3, 2, 1, 4]
    for b, (count, c_sum, k_sum) in enumerate(ref):
        assert float(bins.confidence[b]) == pytest.approx(c_sum / count, abs=1e-12)
        assert float(bins.accuracy[b]) == pytest.approx(k_sum / count, abs=1e-12)
    assert bins.edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins.confidence.dtype == torch.float64


def test_calibration_bins_empty_bins_are_zero_and_quantile_bins_are_equal_mass():
    bins = cal.calibration_bins(torch.tensor([0.95, 0.97]), torch.tensor([1, 0]), 10)
    assert bins.counts.tolist() == [0] * 9 + [2]
    assert bins.confidence[:9].abs().sum() == 0 and bins.accuracy[:9].abs().sum() == 0
    conf = torch.linspace(0, 1, 11)
    quant = cal.calibration_bins(conf, torch.ones(11), 3, strategy="quantile")
    assert quant.counts.tolist() == [4, 4, 3]  # numpy.array_split's sizes
    assert quant.confidence.tolist() == pytest.approx([0.15, 0.55, 0.9])
    assert quant.edges.tolist() == pytest.approx([0.0, 0.4, 0.8, 1.0])


def test_ace_independent_of_order_among_tied_confidences():
    conf = torch.tensor([0.6] * 6 + [0.9] * 4, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    base = cal.adaptive_calibration_error(probs, labels, 4)
    conf_list, correct = top_label(probs, labels)
    assert base == pytest.approx(reference_ace(conf_list, correct, 4), abs=1e-12)
    for seed in range(5):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
        assert cal.adaptive_calibration_error(probs[perm], labels[perm], 4) == \
            pytest.approx(base, abs=1e-12)


# --------------------------------------------------------------------------------------
# Accuracy, Brier, NLL
# --------------------------------------------------------------------------------------


def test_accuracy_brier_nll_match_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(300, 4, generator=gen, dtype=torch.float64), -1).to(dtype)
    labels = torch.randint(0, 4, (300,), generator=gen)
    rows, ys = probs.tolist(), labels.tolist()
    brier = sum(sum((p - (c == y)) ** 2 for c, p in enumerate(r)) for r, y in
                zip(rows, ys, strict=True)) / 300
    nll = -sum(math.log(r[y]) for r, y in zip(rows, ys, strict=True)) / 300
    acc = sum(r.index(max(r)) == y for r, y in zip(rows, ys, strict=True)) / 300
    assert cal.brier_score(probs, labels) == pytest.approx(brier, abs=1e-9)
    assert cal.negative_log_likelihood(probs, labels) == pytest.approx(nll, abs=1e-9)
    assert cal.accuracy(CategoricalPredictive(probs), labels[:, None]) == acc


def test_perfect_one_hot_predictions_score_zero_and_zero_prob_nll_is_finite():
    labels = torch.tensor([0, 2, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    assert cal.expected_calibration_error(probs, labels) == 0.0
    assert cal.brier_score(probs, labels) == 0.0
    assert cal.accuracy(probs, labels) == 1.0
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    assert cal.brier_score(wrong, labels) == 2.0
    assert cal.expected_calibration_error(wrong, labels) == 1.0
    assert cal.negative_log_likelihood(wrong, labels) == pytest.approx(708.3964, abs=1e-3)


def test_evaluate_classification_report(dtype):
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(2 * torch.randn(500, 5, generator=gen, dtype=dtype), -1)
    labels = torch.randint(0, 5, (500,), generator=gen)
    pred = CategoricalPredictive(probs)
    report = cal.evaluate(pred, labels, n_bins=10)
    assert list(report) == ["accuracy", "nll", "ece", "mce", "ace", "brier"]
    assert report["ece"] == pytest.approx(cal.expected_calibration_error(pred, labels, 10))
    assert report["mce"] == pytest.approx(cal.maximum_calibration_error(pred, labels, 10))
    assert report["ace"] == pytest.approx(cal.adaptive_calibration_error(pred, labels, 10))
    assert report["brier"] == pytest.approx(cal.brier_score(pred, labels))
    assert report["nll"] == pytest.approx(cal.negative_log_likelihood(pred, labels))
    assert report.to_dict() == dict(report) and len(report) == 6
    text = str(report)
    assert "10 equal-width bins" in text and "500 points" in text
    assert all(key in text for key in report)
    with pytest.raises(KeyError, match="no metric 'rmse'"):
        report["rmse"]


# --------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------


@st.composite
def classification_batches(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 5))
    logits = draw(st.lists(st.floats(-8, 8), min_size=n * c, max_size=n * c))
    labels = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    return torch.softmax(torch.tensor(logits, dtype=torch.float64).reshape(n, c), -1), \
        torch.tensor(labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@PROPERTY
@given(batch=classification_batches(), n_bins=st.integers(1, 20), seed=st.integers(0, 99))
def test_metric_bounds_and_permutation_invariance(dtype, batch, n_bins, seed):
    probs, labels = batch
    probs = probs.to(dtype)
    ece = cal.expected_calibration_error(probs, labels, n_bins)
    mce = cal.maximum_calibration_error(probs, labels, n_bins)
    ace = cal.adaptive_calibration_error(probs, labels, n_bins)
    brier = cal.brier_score(probs, labels)
    assert 0 <= ece <= mce + 1e-12 <= 1 + 1e-12
    assert 0 <= ace <= 1 and 0 <= brier <= 2 and cal.negative_log_likelihood(probs, labels) >= 0
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for metric, value in ((cal.expected_calibration_error, ece),
                          (cal.maximum_calibration_error, mce),
                          (cal.adaptive_calibration_error, ace)):
        assert metric(probs[perm], labels[perm], n_bins) == pytest.approx(value, abs=1e-12)
    assert cal.brier_score(probs[perm], labels[perm]) == pytest.approx(brier, abs=1e-12)


@PROPERTY
@given(groups=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=1,
                       max_size=6),
       n_bins=st.integers(1, 20))
def test_perfect_calibration_gives_zero_ece(groups, n_bins):
    # Each group: m points with confidence k/m of which exactly k are right, so the
    # accuracy of every bin equals its mean confidence. Binary rows keep conf >= 1/2.
    conf, correct = [], []
    for m, k in groups:
        k = max(min(k, m), (m + 1) // 2)
        conf += [k / m] * m
        correct += [1.0] * k + [0.0] * (m - k)
    bins = cal.calibration_bins(conf, correct, n_bins)
    gap = (bins.accuracy - bins.confidence).abs().max()
    assert float(gap) < 1e-12
    probs = torch.tensor([[c, 1 - c] for c in conf], dtype=torch.float64)
    labels = torch.tensor([0 if k else 1 for k in correct])
    assert cal.expected_calibration_error(probs, labels, n_bins) < 1e-12
    assert cal.adaptive_calibration_error(probs, labels, 1) < 1e-12


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
LABELS = torch.tensor([0, 1])


@pytest.mark.parametrize("n_bins, match", [(0, "`n_bins` must be an int >= 1, got 0"),
                                           (2.5, "`n_bins` must be an int"),
                                           (True, "`n_bins` must be an int")])
def test_bad_n_bins(n_bins, match):
    with pytest.raises(InputError, match=match):
        cal.expected_calibration_error(PROBS, LABELS, n_bins)


@pytest.mark.parametrize("probs, labels, match", [
    (torch.tensor([[float("nan"), 1.0], [0.2, 0.8]]), LABELS, "`probs` contains 1 NaN"),
    (torch.tensor([[0.7, 0.7], [0.2, 0.8]]), LABELS, "`probs` rows must sum to one"),
    (torch.tensor([[1.2, -0.2], [0.2, 0.8]]), LABELS, r"`probs` must lie in \[0, 1\]"),
    (torch.tensor([0.7, 0.3]), LABELS, "`probs` must have 2 dimension"),
    (torch.zeros(0, 3), torch.zeros(0), "`probs` is empty"),
    (torch.tensor([[1, 0], [0, 1]]), LABELS, "`probs` must be floating point"),
    (PROBS, torch.tensor([0, 2]), r"`labels` must be < 2 \(the number of classes\)"),
    (PROBS, torch.tensor([0, -1]), "`labels` must be >= 0"),
    (PROBS, torch.tensor([0.0, 0.5]), "`labels` must be integer class labels"),
    (PROBS, torch.tensor([0, 1, 1]), "`probs` has 2, `labels` has 3"),
    (PROBS, torch.zeros(2, 2), r"`labels` must have shape \[N\]"),
    (GaussianPredictive(torch.zeros(2), torch.ones(2)), LABELS,
     "`probs` must be a CategoricalPredictive"),
])
def test_bad_classification_inputs(probs, labels, match):
    with pytest.raises(InputError, match=match):
        cal.expected_calibration_error(probs, labels)


def test_bad_calibration_bins_inputs():
    with pytest.raises(InputError, match=r"`confidence` must lie in \[0, 1\]"):
        cal.calibration_bins(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(InputError, match=r"`correct` must lie in \[0, 1\]"):
        cal.calibration_bins(torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(InputError, match="`strategy` must be one of 'uniform', 'quantile'"):
        cal.calibration_bins(torch.tensor([0.5]), torch.tensor([1]), strategy="kmeans")


def test_bad_evaluate_inputs():
    with pytest.raises(InputError, match="`pred` must be a CategoricalPredictive, "
                                         "GaussianPredictive or MixturePredictive"):
        cal.evaluate(np.asarray(PROBS), LABELS)
    with pytest.raises(InputError, match=r"`level` must lie in \(0, 1\), got 1.5"):
        cal.evaluate(CategoricalPredictive(PROBS), LABELS, level=1.5)
    with pytest.raises(InputError, match="`n_bins` must be an int >= 1, got -3"):
        cal.evaluate(CategoricalPredictive(PROBS), LABELS, n_bins=-3)
