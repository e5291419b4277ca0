"""Sparse subspace VI ("ssvi"): removal scores, the subspace update, masked state, exports."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.data import load_digits
from bayesify.errors import InputError
from bayesify.inference.ssvi_compact import compact_nbytes
from bayesify.inference.ssvi_update import (
    folded_normal_moments,
    removal_fraction,
    removal_scores,
    select_subspace,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _mlp(width: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 8))


# ------------------------------------------------------------------ removal scores

def test_folded_normal_moments_match_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, -1.0, 2.0, -0.05, 40.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.5, 0.7, 0.1, 2.0, 1e-3], dtype=torch.float64)
    n = 200_000
    theta = mu + sigma * torch.randn(n, len(mu), generator=generator, dtype=torch.float64)
    mean, var = folded_normal_moments(mu, sigma)
    mc_mean, mc_var = theta.abs().mean(0), theta.abs().var(0)
    # 5 Monte Carlo standard errors (of a mean and of a variance, kurtosis-safe bound).
    assert ((mean - mc_mean).abs() <= 5 * (mc_var / n).sqrt() + 1e-12).all()
    fourth = ((theta.abs() - mc_mean) ** 4).mean(0)
    assert ((var - mc_var).abs() <= 5 * ((fourth - mc_var**2) / n).sqrt() + 1e-12).all()


def test_folded_normal_moments_match_the_textbook_formula(dtype):
    mu = torch.linspace(-3, 3, 13, dtype=dtype)
    sigma = torch.full_like(mu, 0.8)
    textbook = (sigma * math.sqrt(2 / math.pi) * torch.exp(-mu**2 / (2 * sigma**2))
                + mu * torch.erf(mu / (math.sqrt(2) * sigma)))
    mean, var = folded_normal_moments(mu, sigma)
    torch.testing.assert_close(mean, textbook)
    torch.testing.assert_close(var, mu**2 + sigma**2 - textbook**2, atol=1e-5, rtol=1e-4)
    # |mu| >> sigma: no cancellation, the variance tends to sigma^2
    far_mean, far_var = folded_normal_moments(torch.tensor([1e3], dtype=dtype),
                                              torch.tensor([1e-2], dtype=dtype))
    torch.testing.assert_close(far_var, torch.tensor([1e-4], dtype=dtype))
    assert far_mean.item() == pytest.approx(1e3)


def test_removal_score_kinds():
    mu = torch.tensor([0.0, 0.5, -2.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.1, 3.0], dtype=torch.float64)
    mean, var = folded_normal_moments(mu, sigma)
    torch.testing.assert_close(removal_scores(mu, sigma, "snr"), mean / var.sqrt())
    torch.testing.assert_close(removal_scores(mu, sigma, "abs_mean"), mu.abs())
    torch.testing.assert_close(removal_scores(mu, sigma, "mean_over_std"), mu.abs() / sigma)
    torch.testing.assert_close(removal_scores(mu, sigma, "expected_abs"), mean)
    # a zero-mean weight has the half-normal SNR sqrt(2/pi) / sqrt(1 - 2/pi)
    assert removal_scores(mu, sigma)[0].item() == pytest.approx(
        math.sqrt(2 / math.pi) / math.sqrt(1 - 2 / math.pi))
    with pytest.raises(InputError, match="`removal_score` must be one of"):
        removal_scores(mu, sigma, "magnitude")


def test_removal_fraction_is_cosine_annealed():
    assert removal_fraction(0, 1000) == pytest.approx(0.3)
    assert removal_fraction(500, 1000) == pytest.approx(0.15)
    assert removal_fraction(1000, 1000) == pytest.approx(0.0, abs=1e-12)
    assert removal_fraction(250, 1000, rate=0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))


def test_select_subspace_removes_lowest_and_adds_largest_gradients():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    keep = torch.tensor([5.0, 1.0, 3.0, 0.5, 99.0, 99.0, 99.0, 99.0])  # inactive ignored
    grow = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 7.0, 0.2, 3.0])
    new = select_subspace(mask, keep, grow, 2)
    assert new.tolist() == [True, False, True, False, False, True, False, True]
    assert torch.equal(select_subspace(mask, keep, grow, 0), mask)
    # a just-removed weight with the largest gradient comes straight back
    grow_back = torch.tensor([0.0, 9.0, 0.0, 0.0, 0.1, 7.0, 0.2, 3.0])
    assert select_subspace(mask, keep, grow_back, 2).tolist() == [True, True, True, False,
                                                                  False, True, False, False]
    with pytest.raises(InputError, match=r"`num_remove` must lie in \[0, 4\]"):
        select_subspace(mask, keep, grow, 5)


# ------------------------------------------------------------------ the method

def test_initial_subspace_sizes_and_dense_first_layer():
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, seed=0)
    layers = bm.bayesian_layers
    assert layers["0"].num_active == layers["0"].num_weights  # first layer dense
    assert list(bm.sparse_layers) == ["2", "4"]
    assert layers["2"].num_active == round(0.1 * 32 * 32)
    assert layers["4"].num_active == round(0.1 * 32 * 8)
    for layer in bm.sparse_layers.values():
        assert (layer.weight_mu[~layer.mask] == 0).all()
    other = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, seed=0)
    assert torch.equal(other.model[2].mask, bm.model[2].mask)  # the seed fixes the mask
    all_sparse = bf.bayesify(_mlp(), "ssvi", task="classification", dense_layers=())
    assert list(all_sparse.sparse_layers) == ["0", "2", "4"]


def test_initial_means_rescaled_or_kept_by_magnitude():
    torch.manual_seed(0)
    net = _mlp()
    weight = net[2].weight.detach().clone()
    bm = bf.bayesify(net, "ssvi", task="classification", density=0.25, seed=0)
    mask = bm.model[2].mask
    # variance preserving: the kept means grow by sqrt(weights / active) = 2
    torch.testing.assert_close(bm.model[2].weight_mu[mask], 2 * weight[mask])
    torch.manual_seed(0)
    net = _mlp()
    weight = net[2].weight.detach().clone()
    bm = bf.bayesify(net, "ssvi", task="classification", density=0.25,
                     initial_mask="magnitude")
    mask = bm.model[2].mask
    torch.testing.assert_close(bm.model[2].weight_mu[mask], weight[mask])  # not rescaled
    assert weight[mask].abs().min() >= weight[~mask].abs().max()


@pytest.mark.parametrize("optimizer", ["default", "adam"])
def test_updates_keep_counts_reset_added_weights_and_mask_optimizer_state(
        digits, monkeypatch, optimizer):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.2, update_interval=5,
                     seed=0)
    counts = {n: m.num_active for n, m in bm.sparse_layers.items()}
    original = bm.update_subspace
    checks = []

    def checked_update(fraction, opt=None):
        before = {n: (m.mask.clone(), m.weight_rho.detach().clone())
                  for n, m in bm.sparse_layers.items()}
        added = original(fraction, opt)
        for name, layer in bm.sparse_layers.items():
            old_mask, old_rho = before[name]
            assert layer.num_active == counts[name]
            stay, new = layer.mask & old_mask, layer.mask & ~old_mask
            assert (layer.weight_mu[new] == 0).all()
            torch.testing.assert_close(layer.weight_rho[new],
                                       old_rho[stay].mean().expand(int(new.sum())))
            for param in (layer.weight_mu, layer.weight_rho):
                for value in opt.state[param].values():
                    if value.shape == param.shape:
                        assert (value[~stay] == 0).all()
        checks.append(added)
        return added

    monkeypatch.setattr(bm, "update_subspace", checked_update)
    opt = None
    if optimizer == "adam":
        opt = torch.optim.Adam(bm.parameters(), lr=1e-3)
    bm.fit((digits.X_train[:256], digits.y_train[:256]), epochs=20, batch_size=64,
           optimizer=opt, progress=False, seed=0)
    assert len(checks) == len(bm.update_log) >= 10 and sum(checks) > 0
    fractions = [f for _, f, _ in bm.update_log]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 0.3
    assert max(step for step, _, _ in bm.update_log) < 0.75 * 20 * 4
    optimizer_used = opt
    for name, layer in bm.sparse_layers.items():
        assert layer.num_active == counts[name]
        assert (layer.weight_mu[~layer.mask] == 0).all()
        assert (layer.weight_rho[~layer.mask] == 0).all()
        if optimizer_used is not None:
            for value in optimizer_used.state[layer.weight_mu].values():
                if value.shape == layer.mask.shape:
                    assert (value[~layer.mask] == 0).all()


def test_default_optimizer_state_stays_masked(digits):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, update_interval=3)
    captured = {}
    original = bm.configure_optimizer

    def capture(lr, weight_decay):
        captured["opt"] = original(lr, weight_decay)
        return captured["opt"]

    bm.configure_optimizer = capture
    bm.fit((digits.X_train[:128], digits.y_train[:128]), epochs=6, batch_size=32,
           weight_decay=5e-4, progress=False, seed=0)
    opt = captured["opt"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0
    for layer in bm.sparse_layers.values():
        for param in (layer.weight_mu, layer.weight_rho):
            buffer = opt.state[param]["momentum_buffer"]
            assert (buffer[~layer.mask] == 0).all() and (param[~layer.mask] == 0).all()


def test_ssvi_learns_digits(digits):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(64), "ssvi", task="classification", density=0.2, seed=0,
                     update_interval=20)
    bm.fit((digits.X_train, digits.y_train), epochs=40, lr=0.1, progress=False, seed=0)
    pred = bm.predict(digits.X_test, num_samples=8, seed=0)
    assert (pred.labels == digits.y_test).float().mean() > 0.85
    assert pred.sample_probs.shape[0] == 8
    report = bm.sparsity_report()
    assert report.flops_ratio < 0.6 and report.training_flops > 0


def test_sparsity_report_counts(digits):
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, dense_layers=())
    report = bm.sparsity_report(digits.X_test[:2])
    assert [r.active for r in report.layers] == [round(0.1 * n) for n in (2048, 1024, 256)]
    assert report.forward_flops == sum(4 * r.active for r in report.layers) + 2 * (32 + 32 + 8)
    assert report.dense_forward_flops == 4 * (2048 + 1024 + 256) + 2 * (32 + 32 + 8)
    assert report.flops_ratio <= 0.15
    assert "forward FLOPs sparse/dense" in str(report)
    kept = bf.bayesify(_mlp(), "ssvi", task="classification", keep_deterministic="first")
    rows = kept.sparsity_report(digits.X_test[:2]).layers
    assert rows[0].kind == "deterministic" and rows[0].flops == 2 * 2048 + 32


def test_cnn_with_groups_and_its_report():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    bm = bf.bayesify(model, "ssvi", task="classification", density=0.25, update_interval=2)
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 4
    bm.fit((x, y), epochs=4, batch_size=4, progress=False, seed=0)
    report = bm.sparsity_report()
    conv = report.layers[1]
    assert conv.weights == 8 * 4 * 9 and conv.active == round(0.25 * 288)
    assert conv.flops == 16 * (4 * conv.active + 2 * 8)  # 4x4 output positions
    assert len(bm.update_log) > 0


def test_export_compact_round_trip(digits):
    torch.manual_seed(0)
    bm = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, seed=0)
    bm.fit((digits.X_train[:128], digits.y_train[:128]), epochs=2, progress=False)
    compact = bm.export_compact()
    buffer = io.BytesIO()
    torch.save(compact, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    dense_bytes = sum(t.numel() * t.element_size() for t in bm.state_dict().values())
    # each sparse layer: float32 mu, rho and an int32 index per active weight (plus its
    # shape) instead of dense mu, rho and a bool mask
    saved = sum(m.num_weights * 9 - m.num_active * 12 - 16 for m in bm.sparse_layers.values())
    assert compact_nbytes(loaded) == dense_bytes - saved
    assert loaded["sparse"]["model.2."]["indices"].numel() == bm.model[2].num_active
    other = bf.bayesify(_mlp(), "ssvi", task="classification", density=0.1, seed=1)
    other.load_compact(loaded)
    for key, value in bm.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    x = digits.X_test[:20]
    torch.testing.assert_close(other.predict(x, seed=4).probs, bm.predict(x, seed=4).probs)
    with pytest.raises(InputError, match="`compact` holds a 'vi' model"):
        other.load_compact({**loaded, "method": "vi"})
    wider = bf.bayesify(_mlp(width=48), "ssvi", task="classification", density=0.1)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(InputError, match="`compact` does not fit this model.*'model.0.mask'"):
        wider.load_compact(loaded)
    assert all(torch.equal(v, wider.state_dict()[k]) for k, v in before.items())


def test_float64_model(digits):
    bm = bf.bayesify(_mlp().double(), "ssvi", task="classification", update_interval=2)
    bm.fit((digits.X_train[:64], digits.y_train[:64]), epochs=3, batch_size=16,
           progress=False)
    assert bm.predict(digits.X_test[:5]).probs.dtype == torch.float64
    assert bm.model[2].weight_mu.dtype == torch.float64


def test_bad_inputs(digits):
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(InputError, match=r"`density` must lie in \(0, 1\]"):
            bf.bayesify(_mlp(), "ssvi", task="classification", density=density)
    with pytest.raises(InputError, match="`update_interval` must be an int >= 1"):
        bf.bayesify(_mlp(), "ssvi", task="classification", update_interval=0)
    with pytest.raises(InputError, match="`removal_score` must be one of"):
        bf.bayesify(_mlp(), "ssvi", task="classification", removal_score="fisher")
    with pytest.raises(InputError, match="`initial_mask` must be one of"):
        bf.bayesify(_mlp(), "ssvi", task="classification", initial_mask="ones")
    with pytest.raises(InputError, match="`dense_layers` names 'x'"):
        bf.bayesify(_mlp(), "ssvi", task="classification", dense_layers=["x"])
    with pytest.raises(bf.UnsupportedModelError, match=r"'0' \(LSTM\)"):
        bf.bayesify(nn.Sequential(nn.LSTM(2, 2)), "ssvi", task="regression", num_outputs=2)
    with pytest.raises(bf.UnsupportedModelError, match="found nothing to make Bayesian"):
        bf.bayesify(nn.Sequential(nn.Tanh()), "ssvi", task="regression", num_outputs=1)
    bm = bf.bayesify(_mlp(), "ssvi", task="classification")
    with pytest.raises(bf.NotFittedError, match="call .fit"):
        bm.export_compact()
    with pytest.raises(InputError, match="no recorded dense gradient"):
        bm.update_subspace(0.1)
    x = digits.X_train[:8].clone()
    x[0, 0] = float("inf")
    with pytest.raises(InputError, match="`X` contains 1 NaN or infinite"):
        bm.fit((x, digits.y_train[:8]), epochs=1, progress=False)
    bm.fit((digits.X_train[:8], digits.y_train[:8]), epochs=1, progress=False)
    with pytest.raises(InputError, match="`num_samples` must be an int >= 1"):
        bm.predict(digits.X_test[:2], num_samples=-1)


def test_regression_gives_a_mixture_with_learned_noise():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 128)[:, None]
    y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(128)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    bm = bf.bayesify(net, "ssvi", task="regression", density=0.5, update_interval=10,
                     sgd_momentum=None, init_std=0.01, seed=0)
    bm.fit((x, y), epochs=150, lr=0.03, batch_size=128, progress=False, seed=0)
    pred = bm.predict(x, num_samples=16, seed=0)
    assert isinstance(pred, bf.MixturePredictive) and pred.means.shape == (16, 128)
    # RMSE 0.02-0.04 over 8 seeds. The learned noise (true 0.1) also absorbs the
    # posterior's spread at the training inputs, E_q[(y - f)^2]: 0.10-0.13 over 8 seeds.
    assert ((pred.mean - torch.sin(3 * x[:, 0])) ** 2).mean().sqrt() < 0.1
    assert 0.07 < float(bm.noise.log_std.detach().exp()) < 0.2
    assert len(bm.update_log) > 0
