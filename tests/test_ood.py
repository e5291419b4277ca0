"""OOD scores and detection metrics, checked against scikit-learn with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bayesify import CategoricalPredictive, GaussianPredictive, InputError, MixturePredictive, ood
from bayesify.ood import metrics as ood_metrics

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def sklearn_reference(s_in: np.ndarray, s_out: np.ndarray, tpr_target: float = 0.95):
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(1 - y, -s),
        "aupr_out": average_precision_score(y, s),
        "fpr95": fpr[np.argmax(tpr >= tpr_target)],
    }


@pytest.mark.parametrize("decimals, n_in, n_out", [(0, 300, 120), (1, 500, 700), (6, 80, 1000)])
def test_detection_metrics_match_sklearn_with_ties(dtype, decimals, n_in, n_out):
    rng = np.random.default_rng(decimals)
    # Scores far outside [0, 1] and rounded so that many in/out scores tie.
    s_in = np.round(rng.normal(0, 30, n_in), decimals)
    s_out = np.round(rng.normal(20, 30, n_out), decimals)
    t_in, t_out = torch.tensor(s_in, dtype=dtype), torch.tensor(s_out, dtype=dtype)
    ref = sklearn_reference(t_in.double().numpy(), t_out.double().numpy())
    got = ood.evaluate(t_in, t_out)
    assert set(got) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert ood.auroc(s_in, s_out) == pytest.approx(ref["auroc"], abs=1e-12)
    assert ood.aupr(s_in, s_out, positive="in") == pytest.approx(ref["aupr_in"], abs=1e-12)
    assert ood.aupr(s_in, s_out) == pytest.approx(ref["aupr_out"], abs=1e-12)
    assert ood.fpr_at_tpr(s_in, s_out, 0.5) == \
        pytest.approx(sklearn_reference(s_in, s_out, 0.5)["fpr95"], abs=1e-12)


def test_fpr95_takes_the_first_threshold_without_interpolation():
    # 20 OOD scores 20..1: TPR first reaches 0.95 at threshold 2, where the in-scores
    # 15.5, 10.5 and the tied 2.0 count as false positives (scores >= threshold).
    s_out = np.arange(20, 0, -1, dtype=float)
    s_in = np.array([15.5, 10.5, 2.0, 1.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0])
    assert ood.fpr_at_tpr(s_in, s_out) == pytest.approx(0.3)
    assert ood.fpr_at_tpr(s_in, s_out, tpr=1.0) == pytest.approx(0.4)
    assert sklearn_reference(s_in, s_out)["fpr95"] == pytest.approx(0.3)
    assert ood.fpr_at_tpr(s_in, s_out, tpr=0.05) == 0.0


def test_extreme_cases():
    same = torch.zeros(7)
    result = ood.evaluate(same, torch.zeros(3))
    assert result["auroc"] == 0.5 and result["fpr95"] == 1.0
    assert result["aupr_out"] == pytest.approx(0.3) and result["aupr_in"] == pytest.approx(0.7)
    perfect = ood.evaluate(torch.tensor([-1e9, 0.0]), torch.tensor([1e9, 1.0, 5.0]))
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_torch_sort_path_equals_numpy_sort_path(monkeypatch):
    rng = np.random.default_rng(3)
    s_in = torch.tensor(np.round(rng.normal(0, 1, 400), 1), requires_grad=True)
    s_out = torch.tensor(np.round(rng.normal(1, 1, 250), 1))
    fast = ood.evaluate(s_in, s_out)  # numpy sorts on CPU
    monkeypatch.setattr(ood_metrics, "_CPU_SORT_WITH_NUMPY", False)
    assert ood.evaluate(s_in, s_out) == fast
    assert fast == pytest.approx(sklearn_reference(s_in.detach().numpy(), s_out.numpy()),
                                 abs=1e-12)


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def test_classification_scores(dtype):
    gen = torch.Generator().manual_seed(0)
    sample_logits = 2 * torch.randn(6, 40, 4, generator=gen, dtype=dtype)
    pred = CategoricalPredictive.from_logits(sample_logits=sample_logits)
    probs = pred.probs
    assert torch.allclose(ood.score(pred), 1 - probs.max(-1).values)
    assert torch.allclose(ood.score(probs, "max_prob"), 1 - probs.max(-1).values)
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(ood.score(pred, "entropy"), entropy, atol=1e-5)
    sample_probs = pred.sample_probs
    expected_entropy = -(sample_probs * sample_probs.log()).sum(-1).mean(0)
    assert torch.allclose(ood.score(pred, "mutual_information"), entropy - expected_entropy,
                          atol=1e-5)
    assert float(ood.score(CategoricalPredictive(probs), "mutual_information").abs().max()) == 0
    logits = sample_logits[0]
    assert torch.allclose(ood.score(logits, "energy"), -torch.logsumexp(logits, -1))
    with_energy = pred.with_scores(energy=ood.energy_score(logits))
    assert torch.equal(ood.score(with_energy, "energy"), ood.energy_score(logits))


def test_regression_scores_and_method_specific_lookup(dtype):
    means = torch.randn(8, 30, 2, dtype=dtype)
    variances = torch.rand(8, 30, 2, dtype=dtype)
    mix = MixturePredictive(means, variances)
    total = variances.mean(0) + means.var(0, unbiased=False)
    assert torch.allclose(ood.score(mix, "variance"), total.sum(-1), atol=1e-5)
    assert torch.allclose(ood.score(mix, "epistemic_variance"),
                          means.var(0, unbiased=False).sum(-1), atol=1e-5)
    gauss = GaussianPredictive(torch.zeros(30, dtype=dtype), total[:, 0]).with_scores(
        density=torch.arange(30, dtype=dtype))
    assert torch.equal(ood.score(gauss, "variance"), total[:, 0])
    assert torch.equal(ood.score(gauss, "density"), torch.arange(30, dtype=dtype))


def test_evaluate_scores_predictives_by_kind():
    gen = torch.Generator().manual_seed(1)
    sharp = CategoricalPredictive(torch.softmax(5 * torch.randn(50, 3, generator=gen), -1))
    flat = CategoricalPredictive(torch.softmax(0.3 * torch.randn(40, 3, generator=gen), -1))
    for kind in ("max_prob", "entropy"):
        direct = ood.evaluate(ood.score(sharp, kind), ood.score(flat, kind))
        assert ood.evaluate(sharp, flat, kind=kind) == direct
        assert direct["auroc"] > 0.9  # flat predictions look out-of-distribution


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------

score_lists = st.lists(st.integers(-5, 5).map(float) | st.floats(-1e6, 1e6), min_size=1,
                       max_size=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@PROPERTY
@given(s_in=score_lists, s_out=score_lists, seed=st.integers(0, 99))
def test_detection_properties(dtype, s_in, s_out, seed):
    t_in, t_out = torch.tensor(s_in, dtype=dtype), torch.tensor(s_out, dtype=dtype)
    result = ood.evaluate(t_in, t_out)
    assert all(0 <= v <= 1 for v in result.values())
    swapped = ood.evaluate(t_out, t_in)
    assert swapped["auroc"] == pytest.approx(1 - result["auroc"], abs=1e-12)
    # AUPR-in ranks the in-set by negated scores: the mirror image of AUPR-out.
    assert ood.aupr(-t_out, -t_in) == pytest.approx(result["aupr_in"], abs=1e-12)
    gen = torch.Generator().manual_seed(seed)
    shuffled = ood.evaluate(t_in[torch.randperm(len(s_in), generator=gen)],
                            t_out[torch.randperm(len(s_out), generator=gen)])
    assert shuffled == pytest.approx(result, abs=1e-12)
    # Raising OOD scores can only help the detector.
    assert ood.auroc(t_in, t_out + 1) >= result["auroc"] - 1e-12


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------

CAT = CategoricalPredictive(torch.tensor([[0.6, 0.4], [0.1, 0.9]]))
GAUSS = GaussianPredictive(torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("call, match", [
    (lambda: ood.evaluate(torch.zeros(0), torch.ones(3)), "`in_scores` is empty"),
    (lambda: ood.evaluate(torch.ones(3), []), "`out_scores` is empty"),
    (lambda: ood.auroc([0.1, float("nan")], [0.2]), "`in_scores` contains 1 NaN"),
    (lambda: ood.auroc(torch.zeros(3, 2), torch.zeros(3)), "`in_scores` must have 1 dim"),
    (lambda: ood.fpr_at_tpr([0.0], [1.0], tpr=0.0), r"`tpr` must lie in \(0, 1\]"),
    (lambda: ood.aupr([0.0], [1.0], positive="both"), "`positive` must be one of 'in', 'out'"),
    (lambda: ood.score(CAT, "mahalanobis"), "unknown `kind` 'mahalanobis'.*'max_prob'"),
    (lambda: ood.score(CAT, 3), "`kind` must be a string"),
    (lambda: ood.score(CAT, "energy"), "`kind` 'energy' needs logits"),
    (lambda: ood.score(CAT, "variance"), "`kind` 'variance' does not apply to a Categorical"),
    (lambda: ood.score(GAUSS, "max_prob"), "`kind` 'max_prob' does not apply to a Gaussian"),
    (lambda: ood.score(torch.zeros(2, 3), "variance"), "`kind` 'variance' needs a Predictive"),
    (lambda: ood.score(torch.ones(2, 3), "entropy"), "`probs` rows must sum to one"),
    (lambda: ood.score(torch.zeros(3), "energy"), r"`pred \(logits\)` must have 2 dim"),
])
def test_bad_ood_inputs(call, match):
    with pytest.raises(InputError, match=match):
        call()
