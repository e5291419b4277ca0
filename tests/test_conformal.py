"""Split conformal prediction: the exact rank, coverage rates, sets, and bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from bayesify.calibration.conformal import (
    ConformalClassifier,
    SplitConformalRegressor,
    conformal_quantile,
    conformal_rank,
    mean_set_size,
    set_coverage,
)
from bayesify.errors import BayesifyError, InputError, NotFittedError
from bayesify.predictive import CategoricalPredictive, GaussianPredictive, MixturePredictive

# --------------------------------------------------------------------------------------
# The rank k = ceil((n + 1)(1 - alpha))
# --------------------------------------------------------------------------------------

NS = [5, 7, 9, 10, 13, 19, 20, 39, 49, 99, 100, 199, 333, 499, 500]
ALPHAS_PERCENT = [1, 5, 10, 20, 25, 30, 50, 90]  # alpha = p / 100, so brute force is integer


def _brute_force_rank(n: int, percent: int) -> int:
    """Smallest k with k / (n + 1) >= 1 - p / 100, by counting in integers."""
    k = 1
    while k * 100 < (n + 1) * (100 - percent):
        k += 1
    return k


def test_conformal_rank_matches_brute_force_count():
    pairs = [(n, p) for n in NS for p in ALPHAS_PERCENT]
    assert len(pairs) >= 60
    beyond = 0
    for n, p in pairs:
        expected = _brute_force_rank(n, p)
        assert conformal_rank(n, p / 100) == expected, (n, p)
        beyond += expected > n
    assert beyond >= 3  # k > n (infinite quantile) cases are covered
    # The cases where (n + 1)(1 - alpha) is an integer, which float rounding gets wrong.
    assert conformal_rank(9, 0.1) == 9
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(99, 0.1) == 90
    assert conformal_rank(5, 0.1) == 6  # > n: infinite
    assert conformal_rank(9, Fraction(1, 10)) == 9
    assert conformal_rank(9, np.float32(0.1)) == 9
    assert conformal_rank(9, 1 - 0.9) == 9  # 0.09999999999999998 is meant as 0.1
    assert conformal_rank(19, 1 - 0.95) == 19


def test_float_formula_would_be_off_by_one_somewhere():
    # Documents why exact arithmetic matters: the naive float formula disagrees here.
    wrong = [(n, p) for n in range(5, 501) for p in range(1, 100)
             if math.ceil((n + 1) * (1 - p / 100)) != _brute_force_rank(n, p)]
    assert (19, 95) in wrong and (49, 42) in wrong  # e.g. 20 * (1 - 0.95) rounds above 1
    for n, p in wrong:
        assert conformal_rank(n, p / 100) == _brute_force_rank(n, p)


def test_conformal_quantile_is_kth_smallest_and_infinite_beyond_n(dtype):
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6], dtype=dtype)
    q = conformal_quantile(scores, 0.1)  # n = 9, k = 9: the largest
    assert q.dtype == dtype and float(q) == pytest.approx(0.9)
    assert float(conformal_quantile(scores, 0.5)) == pytest.approx(0.5)  # k = 5
    assert math.isinf(float(conformal_quantile(scores[:5], 0.1)))  # k = 6 > 5
    cols = torch.stack([scores, 2 * scores], dim=1)
    torch.testing.assert_close(conformal_quantile(cols, 0.5),
                               torch.tensor([0.5, 1.0], dtype=dtype))


# --------------------------------------------------------------------------------------
# Regression coverage
# --------------------------------------------------------------------------------------


def _heteroscedastic(num_splits: int, n: int, dtype: torch.dtype, seed: int = 0):
    """x ~ U(0, 1), y = sin(2 pi x) + (0.05 + x) eps; the predictive's std is off by 1.5x.

    Returns x, y and a predictive with one column per split: [n, num_splits].
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, num_splits, generator=g, dtype=torch.float64)
    noise = 0.05 + x
    y = torch.sin(2 * math.pi * x) + noise * torch.randn(n, num_splits, generator=g,
                                                          dtype=torch.float64)
    pred = GaussianPredictive(torch.sin(2 * math.pi * x), (1.5 * noise) ** 2)
    return x.to(dtype), y.to(dtype), pred.to(dtype=dtype)


@pytest.mark.parametrize("score", ["absolute", "normalized"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_split_conformal_coverage_over_200_random_splits(score, alpha, dtype):
    # Each of the D = 200 output columns is an independent calibration/test split; the
    # regressor calibrates one quantile per column, so all splits run at once.
    n_cal, n_test, splits = 99, 400, 200
    x, y, pred = _heteroscedastic(splits, n_cal + n_test, dtype, seed=int(alpha * 100))
    cp = SplitConformalRegressor(score=score, alpha=alpha).fit(pred[:n_cal], y[:n_cal])
    lower, upper = cp.predict_interval(pred[n_cal:])
    covered = ((lower <= y[n_cal:]) & (y[n_cal:] <= upper)).double().mean(0)  # [splits]
    mean, se = float(covered.mean()), float(covered.std() / math.sqrt(splits))
    assert 1 - alpha - 3 * se <= mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se
    assert se < 0.01


def test_normalized_intervals_are_narrower_where_noise_is_low(dtype):
    n_cal, n_test, splits = 99, 400, 50
    x, y, pred = _heteroscedastic(splits, n_cal + n_test, dtype, seed=3)
    widths = {}
    for score in ("absolute", "normalized"):
        cp = SplitConformalRegressor(score=score, alpha=0.1).fit(pred[:n_cal], y[:n_cal])
        lower, upper = cp.predict_interval(pred[n_cal:])
        low_noise = x[n_cal:] < 0.3
        widths[score] = float((upper - lower)[low_noise].mean())
    assert widths["normalized"] < 0.7 * widths["absolute"]


def test_cqr_covers_with_a_mixture_predictive(dtype):
    g = torch.Generator().manual_seed(4)
    n = 600
    x = torch.rand(n, generator=g, dtype=torch.float64)
    y = x + (0.1 + x) * torch.randn(n, generator=g, dtype=torch.float64)
    means = x + 0.05 * torch.randn(8, n, generator=g, dtype=torch.float64)
    pred = MixturePredictive(means, (0.3 * (0.1 + x)).expand(8, n) ** 2).to(dtype=dtype)
    y = y.to(dtype)
    cp = SplitConformalRegressor(score="cqr", alpha=0.2).fit(pred[:300], y[:300])
    lower, upper = cp.predict_interval(pred[300:])
    raw_lower, raw_upper = pred[300:].interval(0.8)
    assert bool((upper - lower >= raw_upper - raw_lower - 1e-5).all())  # raw is too narrow
    coverage = float(((lower <= y[300:]) & (y[300:] <= upper)).double().mean())
    assert 0.74 <= coverage <= 0.88
    # alpha at predict time: recomputes the CQR scores at the new quantile levels.
    lo90, hi90 = cp.predict_interval(pred[300:], alpha=0.1)
    assert bool((hi90 - lo90 > upper - lower).all())


def test_regressor_with_a_model_and_point_predictions(dtype):
    class _Model:
        def __init__(self):
            self.calls = []

        def predict(self, x, **kwargs):
            self.calls.append(kwargs)
            return GaussianPredictive(2 * x, torch.ones_like(x))

    model = _Model()
    x = torch.linspace(0, 1, 20, dtype=dtype)
    y = 2 * x + torch.linspace(-1, 1, 20, dtype=dtype)
    cp = SplitConformalRegressor(model, alpha=0.1, predict_kwargs={"seed": 3}).fit(x, y)
    lower, upper = cp.predict_interval(x)
    # n = 20, k = ceil(21 * 0.9) = 19: the 19th smallest |residual| of linspace(-1, 1, 20).
    q = torch.linspace(-1, 1, 20, dtype=dtype).abs().sort().values[18]
    torch.testing.assert_close(upper - 2 * x, q.expand(20))
    assert model.calls == [{"seed": 3}, {"seed": 3}]
    point = SplitConformalRegressor(alpha=0.1).fit(2 * x, y)  # raw point predictions
    torch.testing.assert_close(point.predict_interval(2 * x)[1], upper)


def test_infinite_quantile_gives_unbounded_intervals_even_with_zero_std():
    pred = GaussianPredictive(torch.zeros(5), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    cp = SplitConformalRegressor(score="normalized", alpha=0.1).fit(pred[:4], torch.ones(4))
    lower, upper = cp.predict_interval(pred)
    assert bool(torch.isinf(lower).all() and torch.isinf(upper).all())
    assert not bool(torch.isnan(lower).any())


# --------------------------------------------------------------------------------------
# Classification sets
# --------------------------------------------------------------------------------------


def _classification(n: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    labels = torch.multinomial(probs, 1, generator=g)[:, 0]
    overconfident = torch.softmax(2 * logits, -1)  # sets must still cover
    return CategoricalPredictive(overconfident.to(dtype)), labels


@pytest.mark.parametrize(("score", "randomized"),
                         [("lac", True), ("aps", True), ("aps", False)])
def test_conformal_sets_cover(score, randomized, dtype):
    alpha, n_cal, splits = 0.1, 150, 30
    coverages, sizes = [], []
    for split in range(splits):
        pred, labels = _classification(n_cal + 300, split, dtype)
        cc = ConformalClassifier(score=score, alpha=alpha, randomized=randomized,
                                 generator=torch.Generator().manual_seed(split))
        sets = cc.fit(pred[:n_cal], labels[:n_cal]).predict_set(pred[n_cal:])
        assert sets.dtype == torch.bool and sets.shape == (300, 6)
        coverages.append(set_coverage(sets, labels[n_cal:]))
        sizes.append(mean_set_size(sets))
    mean, se = np.mean(coverages), np.std(coverages) / math.sqrt(splits)
    upper = 1 - alpha + 1 / (n_cal + 1) + 3 * se
    assert mean >= 1 - alpha - 3 * se
    if randomized:  # non-randomized APS is conservative: only the lower bound holds
        assert mean <= upper
    assert 1 <= np.mean(sizes) < 6


def test_lac_sets_are_smaller_than_aps_and_randomization_repeats(dtype):
    pred, labels = _classification(2000, 11, dtype)
    lac = ConformalClassifier(score="lac", alpha=0.1).fit(pred[:1000], labels[:1000])
    aps = ConformalClassifier(score="aps", alpha=0.1, generator=torch.Generator().manual_seed(0))
    aps.fit(pred[:1000], labels[:1000])
    assert mean_set_size(lac.predict_set(pred[1000:])) < mean_set_size(
        aps.predict_set(pred[1000:]))
    again = ConformalClassifier(score="aps", alpha=0.1,
                                generator=torch.Generator().manual_seed(0))
    again.fit(pred[:1000], labels[:1000])
    assert torch.equal(aps.quantile(), again.quantile())
    # LAC's set is {c : p_c >= 1 - q}.
    q = lac.quantile()
    assert torch.equal(lac.predict_set(pred[1000:]), pred[1000:].probs >= 1 - q)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(InputError, match="`alpha` must lie in"):
        SplitConformalRegressor(alpha=alpha)
    with pytest.raises(InputError, match="`alpha` must lie in"):
        ConformalClassifier(alpha=alpha)
    with pytest.raises(InputError, match="`alpha` must lie in"):
        conformal_rank(10, alpha)


def test_bad_input_raises_bayesify_errors():
    pred = GaussianPredictive(torch.zeros(4), torch.ones(4))
    with pytest.raises(BayesifyError, match="at least 1 point"):
        conformal_rank(0, 0.1)
    with pytest.raises(BayesifyError, match="`scores` is empty"):
        conformal_quantile(torch.empty(0), 0.1)
    with pytest.raises(BayesifyError, match="`x_or_pred` is empty"):
        SplitConformalRegressor().fit(torch.empty(0), torch.empty(0))
    with pytest.raises(BayesifyError, match="same number of rows.*`y` has 3"):
        SplitConformalRegressor().fit(pred, torch.zeros(3))
    with pytest.raises(BayesifyError, match="same number of rows"):
        ConformalClassifier().fit(torch.full((4, 2), 0.5), torch.zeros(3))
    with pytest.raises(BayesifyError, match="`scores` contains 1 NaN"):
        conformal_quantile(torch.tensor([0.1, float("nan")]), 0.1)
    zero_std = GaussianPredictive(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(BayesifyError, match="`scores` contains 1 NaN"):  # 0 / 0
        SplitConformalRegressor(score="normalized").fit(zero_std, torch.zeros(3))
    with pytest.raises(BayesifyError, match="`y` contains"):
        SplitConformalRegressor().fit(pred, torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(BayesifyError, match="`score` must be one of"):
        SplitConformalRegressor(score="cdf")
    with pytest.raises(BayesifyError, match="`score` must be one of"):
        ConformalClassifier(score="rank")
    with pytest.raises(BayesifyError, match="`model` must be a BayesianModel"):
        SplitConformalRegressor(model=object())
    with pytest.raises(BayesifyError, match="regression predictive for the 'normalized'"):
        SplitConformalRegressor(score="normalized").fit(torch.zeros(4), torch.zeros(4))
    with pytest.raises(BayesifyError, match="`y` must be < 2"):
        ConformalClassifier().fit(torch.full((2, 2), 0.5), torch.tensor([0, 2]))


def test_predict_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError, match=r"call `.fit\(x_or_pred, y\)`"):
        SplitConformalRegressor().predict_interval(torch.zeros(3))
    with pytest.raises(NotFittedError, match=r"call `.fit\(x_or_pred, y\)`"):
        ConformalClassifier().predict_set(torch.full((3, 2), 0.5))


def test_conformal_follows_the_device(device):
    pred, labels = _classification(200, 12, torch.float64)
    pred, labels = pred.to(device=device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    cc = ConformalClassifier(score="aps", generator=generator).fit(pred[:100], labels[:100])
    assert cc.predict_set(pred[100:]).device.type == device.type
    reg = GaussianPredictive(torch.zeros(50, device=device), torch.ones(50, device=device))
    cp = SplitConformalRegressor(score="cqr").fit(reg, torch.zeros(50, device=device))
    assert cp.predict_interval(reg)[0].device.type == device.type
