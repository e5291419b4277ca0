"""Errors a user sees name their own arguments, not internal tensors (issue 16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf


def _classifier(final_softmax: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    if final_softmax:
        layers.append(nn.Softmax(dim=-1))
    return bf.bayesify(nn.Sequential(*layers), "deterministic", task="classification")


@pytest.mark.parametrize(("x", "match"), [
    (torch.randn(5, 7), r"`x` has shape \[5, 7\] and dtype torch.float32, but the model's "
                        r"first layer '0' expects 4 input features"),
    (torch.randn(5, 4, dtype=torch.float64), None),  # a float64 input is converted, fine
])
def test_predict_with_the_wrong_width_names_x_and_the_expected_width(x, match):
    bm = _classifier()
    if match is None:
        assert bm.predict(x).probs.shape == (5, 3)
        return
    with pytest.raises(bf.InputError, match=match):
        bm.predict(x)
    with pytest.raises(bf.InputError, match=match):
        bm.posterior(x)


def test_fit_with_the_wrong_width_names_x():
    bm = _classifier()
    with pytest.raises(bf.InputError, match=r"`x` has shape \[16, 6\].*expects 4 input"):
        bm.fit((torch.randn(40, 6), torch.zeros(40, dtype=torch.long)), epochs=1,
               batch_size=16, progress=False)


def test_a_conv_network_names_the_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 6, 6))
    bm = bf.bayesify(net, "deterministic", task="classification")
    with pytest.raises(bf.InputError, match=r"expects 3 input channels in dimension 1"):
        bm.predict(torch.randn(2, 1, 6, 6))


def test_nan_weights_are_reported_in_terms_of_x_not_internal_tensors():
    bm = _classifier()
    with torch.no_grad():
        bm.model[2].bias[0] = float("nan")
    with pytest.raises(bf.NumericalError, match=r"outputs for `x` hold NaN or inf at 3 "
                                                r"input\(s\) \(rows 0, 1, 2\); `x` is finite"):
        bm.predict(torch.randn(3, 4))


def test_rows_are_counted_across_internal_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    bm = bf.bayesify(net, "deterministic", task="classification")
    x = torch.randn(10, 4)
    x[7] = 1e30  # finite input whose logits overflow in float32
    with torch.no_grad():
        net[0].weight.fill_(1e10)
    with pytest.raises(bf.NumericalError, match=r"rows 7\)"):
        bm.predict(x, batch_size=4)


def test_a_final_softmax_is_detected_and_explained():
    bm = _classifier(final_softmax=True)
    with pytest.warns(bf.BayesifyWarning, match="outputs look like probabilities"):
        bm.predict(torch.randn(6, 4))


def test_log_softmax_outputs_are_fine():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=-1))
    x = torch.randn(6, 4)
    pred = bf.bayesify(net, "deterministic", task="classification").predict(x)
    assert torch.allclose(pred.probs, torch.softmax(net[0](x), -1).detach(), atol=1e-6)


def test_variance_scaling_on_zero_residuals_says_so():
    mean = torch.randn(20)
    pred = bf.GaussianPredictive(mean, torch.ones(20))
    with pytest.raises(bf.InputError, match="all residuals are exactly zero"):
        bf.calibration.VarianceScaling().fit(pred, mean)


def test_energy_score_refuses_nan_logits_like_score_does():
    logits = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(bf.InputError, match="`logits` contains 1 NaN"):
        bf.ood.energy_score(logits)
    with pytest.raises(bf.InputError, match="contains 1 NaN"):
        bf.ood.score(logits, "energy")
