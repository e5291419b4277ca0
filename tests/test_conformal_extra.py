"""RAPS, randomized and class-conditional sets, group-conditional, weighted, joint and
adaptive intervals: exact arithmetic, and coverage over many random splits.

Coverage bounds use the standard error over splits (the method's own variability), so
they hold on any machine; a correct implementation fails one side with probability
about 0.1%.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from bayesify.calibration import (
    AdaptiveConformal,
    ConformalClassifier,
    DomainClassifierWeights,
    SplitConformalRegressor,
    conformal_quantile,
    set_coverage,
    weighted_conformal_quantile,
)
from bayesify.calibration.conformal import classification_scores
from bayesify.errors import BayesifyWarning, InputError, NotFittedError
from bayesify.predictive import CategoricalPredictive, GaussianPredictive


def _mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


# --------------------------------------------------------------------------------------
# Exact arithmetic
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 9, 19, 20, 49, 99, 100])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.42, 1 - 0.9])
def test_weighted_quantile_with_equal_weights_is_the_plain_quantile(n, alpha, dtype):
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(n, 3, generator=g, dtype=torch.float64).to(dtype)
    plain = conformal_quantile(scores, alpha)  # [3]
    weighted = weighted_conformal_quantile(scores, torch.ones(n), torch.ones(4), alpha)
    assert weighted.shape == (4, 3) and weighted.dtype == dtype
    assert torch.equal(weighted, plain.expand(4, 3))
    scaled = weighted_conformal_quantile(scores[:, 0], torch.full((n,), 3), torch.full((2,), 3),
                                         alpha)
    assert torch.equal(scaled, plain[0].expand(2))


def test_weighted_quantile_matches_its_definition_in_fractions():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(3, 30, (1,), generator=g))
        scores = torch.randn(n, generator=g, dtype=torch.float64)
        weights = torch.randint(0, 5, (n,), generator=g)
        weights[0] = 1
        test = torch.randint(0, 7, (3,), generator=g)
        alpha = Fraction(int(torch.randint(1, 20, (1,), generator=g)), 20)
        got = weighted_conformal_quantile(scores, weights, test, alpha)
        order = sorted(range(n), key=lambda i: float(scores[i]))
        for j, w in enumerate(test.tolist()):
            total = int(weights.sum()) + w
            cumulative, expected = 0, math.inf
            for i in order:
                cumulative += int(weights[i])
                if Fraction(cumulative, total) >= 1 - alpha:
                    expected = float(scores[i])
                    break
            assert float(got[j]) == expected, (trial, j)


def test_raps_scores_by_hand(dtype):
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], dtype=dtype)
    scores = classification_scores(probs, "raps", lam=0.1, k_reg=1)
    # Ranks (ties by index): row 0: 1, 2, 3; row 1: 2, 3, 1.
    expected = torch.tensor([[0.5, 0.9, 1.2], [0.9, 1.2, 0.6]], dtype=dtype)
    torch.testing.assert_close(scores, expected)
    u = torch.tensor([0.5, 0.25], dtype=dtype)
    randomized = classification_scores(probs, "raps", u, lam=0.1, k_reg=1)
    torch.testing.assert_close(randomized, expected - (1 - u[:, None]) * probs)
    torch.testing.assert_close(classification_scores(probs, "raps", lam=0.0),
                               classification_scores(probs, "aps"))


# --------------------------------------------------------------------------------------
# Classification: marginal and class-conditional coverage
# --------------------------------------------------------------------------------------


def _classification(n: int, seed: int, dtype: torch.dtype, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return CategoricalPredictive(torch.softmax(1.5 * logits, -1).to(dtype)), labels


@pytest.mark.parametrize(("score", "randomized"),
                         [("aps", True), ("raps", True), ("raps", False)])
def test_aps_and_raps_marginal_coverage_over_random_splits(score, randomized, dtype):
    alpha, n_cal, n_test, splits = 0.1, 199, 400, 200
    options = {"lam": 0.05, "k_reg": 2} if score == "raps" else {}
    coverages = []
    for split in range(splits):
        pred, labels = _classification(n_cal + n_test, 1000 + split, dtype)
        cc = ConformalClassifier(score=score, alpha=alpha, randomized=randomized,
                                 generator=torch.Generator().manual_seed(split), **options)
        sets = cc.fit(pred[:n_cal], labels[:n_cal]).predict_set(pred[n_cal:])
        coverages.append(set_coverage(sets, labels[n_cal:]))
    mean, se = _mean_se(coverages)
    assert mean >= 1 - alpha - 3 * se
    if randomized:  # exact in expectation: k / (n + 1) = 0.9 here
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se
    assert se < 0.01


def test_raps_penalty_shrinks_sets_and_randomization_repeats(dtype):
    pred, labels = _classification(3000, 7, dtype)
    sizes = {}
    for lam in (0.0, 0.2):
        cc = ConformalClassifier(score="raps", lam=lam, k_reg=1, randomized=False)
        sets = cc.fit(pred[:1500], labels[:1500]).predict_set(pred[1500:])
        sizes[lam] = float(sets.double().sum(1).max())
    assert sizes[0.2] < sizes[0.0]
    a, b = (ConformalClassifier(score="raps", generator=torch.Generator().manual_seed(3))
            .fit(pred[:1500], labels[:1500]) for _ in range(2))
    assert torch.equal(a.predict_set(pred[1500:]), b.predict_set(pred[1500:]))


def _hard_class(n: int, seed: int, dtype: torch.dtype, classes: int = 5):
    """Class 0 is hard: the model gives its true points much less confidence."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    boost = torch.where(labels == 0, 0.3, 3.0).double()
    logits[torch.arange(n), labels] += boost
    return CategoricalPredictive(torch.softmax(logits, -1).to(dtype)), labels


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_class_conditional_sets_cover_every_class(score, dtype):
    alpha, n_cal, n_test, splits, classes = 0.1, 500, 500, 100, 5
    per_class = {"marginal": [], "class": []}
    for split in range(splits):
        pred, labels = _hard_class(n_cal + n_test, split, dtype, classes)
        for conditional in per_class:
            cc = ConformalClassifier(score=score, alpha=alpha, conditional=conditional,
                                     generator=torch.Generator().manual_seed(split))
            sets = cc.fit(pred[:n_cal], labels[:n_cal]).predict_set(pred[n_cal:])
            hit = sets[torch.arange(n_test), labels[n_cal:]].double()
            per_class[conditional].append(
                [float(hit[labels[n_cal:] == c].mean()) for c in range(classes)])
    conditional = np.array(per_class["class"])
    for c in range(classes):
        mean, se = _mean_se(conditional[:, c])
        assert mean >= 1 - alpha - 3 * se, c
    mean, se = _mean_se(np.array(per_class["marginal"])[:, 0])
    assert mean < 1 - alpha - 3 * se  # marginal sets under-cover the hard class


def test_class_conditional_quantiles_and_a_class_without_calibration_points():
    probs = torch.softmax(torch.randn(60, 3, dtype=torch.float64), -1)
    labels = torch.tensor([0, 1] * 30)
    with pytest.warns(BayesifyWarning, match=r"classes \[2\] have no calibration points"):
        cc = ConformalClassifier(conditional="class", alpha=0.2).fit(probs, labels)
    q = cc.quantile()
    assert q.shape == (3,) and math.isinf(float(q[2]))
    for c in (0, 1):
        assert torch.equal(q[c], conformal_quantile(1 - probs[labels == c, c], 0.2))
    assert bool(cc.predict_set(probs)[:, 2].all())


# --------------------------------------------------------------------------------------
# Regression: groups, joint multi-output, covariate shift
# --------------------------------------------------------------------------------------


def test_group_conditional_intervals_cover_every_group(dtype):
    # Columns are 200 independent splits; group 1's noise is four times group 0's.
    alpha, n_cal, n_test, splits = 0.1, 400, 400, 200
    g = torch.Generator().manual_seed(5)
    groups = torch.randint(2, (n_cal + n_test,), generator=g)
    noise = torch.where(groups == 1, 2.0, 0.5).double()[:, None]
    y = (noise * torch.randn(n_cal + n_test, splits, generator=g, dtype=torch.float64))
    mean = torch.zeros_like(y).to(dtype)
    y = y.to(dtype)
    grouped = SplitConformalRegressor(alpha=alpha).fit(mean[:n_cal], y[:n_cal],
                                                       groups=groups[:n_cal])
    lower, upper = grouped.predict_interval(mean[n_cal:], groups=groups[n_cal:])
    marginal = SplitConformalRegressor(alpha=alpha).fit(mean[:n_cal], y[:n_cal])
    m_lower, m_upper = marginal.predict_interval(mean[n_cal:])
    test_y, test_groups = y[n_cal:], groups[n_cal:]
    for group in (0, 1):
        rows = test_groups == group
        n_group = int((groups[:n_cal] == group).sum())
        covered = ((lower <= test_y) & (test_y <= upper))[rows].double().mean(0)
        mean_cov, se = _mean_se(covered.numpy())
        assert 1 - alpha - 3 * se <= mean_cov <= 1 - alpha + 1 / (n_group + 1) + 3 * se
    noisy = test_groups == 1
    m_cov = ((m_lower <= test_y) & (test_y <= m_upper))[noisy].double().mean(0)
    mean_cov, se = _mean_se(m_cov.numpy())
    assert mean_cov < 1 - alpha - 3 * se
    assert grouped.quantile().shape == (2, splits)
    assert torch.equal(grouped.group_values, torch.tensor([0, 1]))


@pytest.mark.parametrize("joint", [None, "bonferroni", "max"])
def test_joint_multi_output_coverage(joint, dtype):
    alpha, n_cal, n_test, splits, outputs = 0.1, 199, 300, 150, 3
    joint_coverage = []
    for split in range(splits):
        g = torch.Generator().manual_seed(split)
        scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        y = (scale * torch.randn(n_cal + n_test, outputs, generator=g,
                                 dtype=torch.float64)).to(dtype)
        pred = GaussianPredictive(torch.zeros_like(y), (scale ** 2).expand_as(y).to(dtype))
        cp = SplitConformalRegressor(score="normalized", alpha=alpha, joint=joint)
        lower, upper = cp.fit(pred[:n_cal], y[:n_cal]).predict_interval(pred[n_cal:])
        inside = ((lower <= y[n_cal:]) & (y[n_cal:] <= upper)).all(dim=1)
        joint_coverage.append(float(inside.double().mean()))
    mean, se = _mean_se(joint_coverage)
    if joint is None:  # each output covers at 0.9, all three together far less
        assert mean < 1 - alpha - 3 * se
    else:
        assert mean >= 1 - alpha - 3 * se
    if joint == "max":  # one continuous score: exact in expectation
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se


def test_joint_quantiles_use_exact_levels():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(99, 3, generator=g, dtype=torch.float64)
    zero = torch.zeros_like(y)
    bonferroni = SplitConformalRegressor(alpha=0.3, joint="bonferroni").fit(zero, y)
    assert torch.equal(bonferroni.quantile(), conformal_quantile(y.abs(), Fraction(1, 10)))
    worst = SplitConformalRegressor(alpha=0.3, joint="max").fit(zero, y)
    assert torch.equal(worst.quantile(), conformal_quantile(y.abs().max(1).values, 0.3))
    lower, upper = worst.predict_interval(zero[:4])
    assert torch.equal(upper, worst.quantile().expand(4, 3))


def _shifted(n: int, seed: int, shift: float):
    """x ~ N(shift, 1), y = x + 0.5 exp(x / 2) eps: noise grows where the shift goes."""
    g = torch.Generator().manual_seed(seed)
    x = shift + torch.randn(n, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.exp(x / 2) * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("weights", ["true ratio", "domain classifier"])
def test_weighted_conformal_restores_coverage_under_covariate_shift(weights):
    # Fitting the domain classifier dominates the time: fewer splits there.
    alpha, n, splits = 0.1, 300, 200 if weights == "true ratio" else 50
    plain, weighted = [], []
    for split in range(splits):
        x_cal, y_cal = _shifted(n, 2 * split, 0.0)
        x_test, y_test = _shifted(n, 2 * split + 1, 1.0)
        if weights == "true ratio":  # N(x; 1, 1) / N(x; 0, 1)
            w_cal, w_test = torch.exp(x_cal - 0.5), torch.exp(x_test - 0.5)
        else:
            ratio = DomainClassifierWeights().fit(x_cal[:, None], x_test[:, None])
            w_cal, w_test = ratio(x_cal[:, None]), ratio(x_test[:, None])
        for sink, kwargs in ((plain, {}), (weighted, {"weights": w_cal})):
            cp = SplitConformalRegressor(alpha=alpha).fit(x_cal, y_cal, **kwargs)
            test_kwargs = {"weights": w_test} if kwargs else {}
            lower, upper = cp.predict_interval(x_test, **test_kwargs)
            sink.append(float(((lower <= y_test) & (y_test <= upper)).double().mean()))
    mean, se = _mean_se(plain)
    assert mean + 3 * se < 1 - alpha  # plain split conformal loses coverage
    mean, se = _mean_se(weighted)
    assert mean >= 1 - alpha - 3 * se


def test_weighted_classifier_sets_take_one_quantile_per_point():
    pred, labels = _classification(400, 3, torch.float64)
    w = torch.ones(200)
    weighted = ConformalClassifier(alpha=0.1).fit(pred[:200], labels[:200], weights=w)
    plain = ConformalClassifier(alpha=0.1).fit(pred[:200], labels[:200])
    assert weighted.quantile(weights=torch.ones(5)).shape == (5,)
    assert torch.equal(weighted.predict_set(pred[200:], weights=torch.ones(200)),
                       plain.predict_set(pred[200:]))


# --------------------------------------------------------------------------------------
# Adaptive conformal inference on a drifting stream
# --------------------------------------------------------------------------------------


def test_aci_tracks_the_target_on_a_drifting_stream_where_split_conformal_drifts(dtype):
    alpha, gamma, steps = 0.1, 0.05, 2000
    g = torch.Generator().manual_seed(0)
    cal = torch.randn(200, generator=g, dtype=torch.float64).to(dtype)
    sigma = torch.linspace(1.0, 4.0, steps, dtype=torch.float64)  # the noise drifts up
    stream = (sigma * torch.randn(steps, generator=g, dtype=torch.float64)).to(dtype)
    zero = torch.zeros(1, dtype=dtype)
    aci = AdaptiveConformal(alpha=alpha, gamma=gamma, window=200).fit(torch.zeros_like(cal),
                                                                     cal)
    split = SplitConformalRegressor(alpha=alpha).fit(torch.zeros_like(cal), cal)
    split_hits = 0
    for t in range(steps):
        lower, upper = aci.predict_interval(zero)
        aci.update(stream[t:t + 1])
        s_lower, s_upper = split.predict_interval(zero)
        split_hits += int(s_lower <= stream[t] <= s_upper)
    miss = aci.miss_rate
    # Gibbs & Candès (2021), Prop. 4.1: a deterministic bound, whatever the data.
    assert abs(miss - alpha) <= (max(alpha, 1 - alpha) + gamma) / (gamma * steps)
    assert abs((1 - miss) - (1 - alpha)) <= 0.02
    assert abs(split_hits / steps - (1 - alpha)) > 0.1
    assert len(aci.alpha_history) == steps and aci.alpha_history[0] == alpha


def test_aci_levels_outside_the_unit_interval():
    aci = AdaptiveConformal(alpha=0.1, gamma=0.5)
    lower, upper = aci.predict_interval(torch.zeros(2))  # no scores yet: unbounded
    assert bool(torch.isinf(upper).all())
    aci.update(torch.zeros(2))
    aci.alpha_t = 1.2
    lower, upper = aci.predict_interval(torch.zeros(1))
    assert bool(lower > upper)  # empty: the next target is missed
    aci.update(torch.zeros(1))
    assert aci.errors[-1] == 1.0 and aci.alpha_t == pytest.approx(1.2 + 0.5 * (0.1 - 1))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    pred = GaussianPredictive(torch.zeros(4), torch.ones(4))
    y = torch.zeros(4)
    with pytest.raises(InputError, match="`lam` and `k_reg` are options of score='raps'"):
        ConformalClassifier(score="lac", lam=0.1)
    with pytest.raises(InputError, match="`lam` must be >= 0"):
        ConformalClassifier(score="raps", lam=-1)
    with pytest.raises(InputError, match="`k_reg` must be an int >= 0"):
        ConformalClassifier(score="raps", k_reg=-1)
    with pytest.raises(InputError, match="`conditional` must be one of"):
        ConformalClassifier(conditional="group")
    with pytest.raises(InputError, match="`joint` must be one of"):
        SplitConformalRegressor(joint="sum")
    with pytest.raises(InputError, match="`weights` must be >= 0"):
        SplitConformalRegressor().fit(pred, y, weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="`weights` must have a positive sum"):
        SplitConformalRegressor().fit(pred, y, weights=torch.zeros(4))
    with pytest.raises(InputError, match="either `groups`"):
        SplitConformalRegressor().fit(pred, y, groups=torch.zeros(4), weights=torch.ones(4))
    weighted = SplitConformalRegressor().fit(pred, y, weights=torch.ones(4))
    with pytest.raises(InputError, match="pass the test points' likelihood ratios"):
        weighted.predict_interval(pred)
    with pytest.raises(InputError, match="`weights` must hold one weight per test point"):
        weighted.predict_interval(pred, weights=torch.ones(3))
    with pytest.raises(InputError, match="`weights` were given at prediction but not"):
        SplitConformalRegressor().fit(pred, y).predict_interval(pred, weights=torch.ones(4))
    grouped = SplitConformalRegressor().fit(pred, y, groups=[0, 0, 1, 1])
    with pytest.raises(InputError, match="pass the test points' group labels"):
        grouped.predict_interval(pred)
    with pytest.raises(InputError, match=r"`groups` holds labels with no calibration.*\[7\]"):
        grouped.predict_interval(pred, groups=[0, 7, 1, 1])
    with pytest.raises(InputError, match="`groups` must hold one label per test point"):
        grouped.predict_interval(pred, groups=[0, 1])
    with pytest.raises(InputError, match="`groups` must be integer group labels"):
        SplitConformalRegressor().fit(pred, y, groups=[0.5, 0, 1, 1])
    with pytest.raises(InputError, match="`groups` were given but not to `fit`"):
        SplitConformalRegressor().fit(pred, y).predict_interval(pred, groups=[0, 0, 1, 1])
    with pytest.raises(InputError, match="`weights` .* work with conditional='marginal'"):
        ConformalClassifier(conditional="class").fit(torch.full((2, 2), 0.5),
                                                     torch.tensor([0, 1]), weights=[1, 1])
    with pytest.raises(InputError, match="`x_or_pred` must have 2 classes as in fit"):
        ConformalClassifier().fit(torch.full((2, 2), 0.5), torch.tensor([0, 1])).predict_set(
            torch.full((2, 3), 1 / 3))
    with pytest.raises(InputError, match="`gamma` must be > 0"):
        AdaptiveConformal(gamma=0)
    with pytest.raises(InputError, match="single-output targets"):
        AdaptiveConformal().predict_interval(torch.zeros(3, 2))
    with pytest.raises(InputError, match="AdaptiveConformal sets its own level"):
        AdaptiveConformal().predict_interval(torch.zeros(3), alpha=0.2)
    with pytest.raises(NotFittedError, match=r"call `.predict_interval\(x_or_pred\)`"):
        AdaptiveConformal().update(torch.zeros(1))
    with pytest.raises(NotFittedError, match=r"call `.fit\(cal_features, test_features\)`"):
        DomainClassifierWeights()(torch.zeros(3, 1))
    with pytest.raises(InputError, match="`classifier` must have fit"):
        DomainClassifierWeights(classifier=object())


def test_new_conformal_variants_follow_the_device(device):
    pred, labels = _classification(400, 5, torch.float64)
    pred, labels = pred.to(device=device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for options in ({"score": "raps", "generator": generator}, {"conditional": "class"}):
        cc = ConformalClassifier(**options).fit(pred[:200], labels[:200])
        assert cc.predict_set(pred[200:]).device.type == device.type
    w = torch.ones(200, device=device)
    weighted = ConformalClassifier().fit(pred[:200], labels[:200], weights=w)
    assert weighted.predict_set(pred[200:], weights=w).device.type == device.type
    y = torch.randn(300, 2, device=device, dtype=torch.float64)
    zero = torch.zeros_like(y)
    groups = torch.arange(300, device=device) % 3
    for kwargs in ({"groups": groups[:200]}, {"weights": w}):
        cp = SplitConformalRegressor(joint="max").fit(zero[:200], y[:200], **kwargs)
        test = {"groups": groups[200:]} if "groups" in kwargs else {"weights": w[:100]}
        lower, upper = cp.predict_interval(zero[200:], **test)
        assert lower.device.type == device.type and upper.shape == (100, 2)
    aci = AdaptiveConformal().fit(zero[:200, 0], y[:200, 0])
    lower, _ = aci.predict_interval(zero[200:201, 0])
    aci.update(y[200:201, 0])
    assert lower.device.type == device.type
