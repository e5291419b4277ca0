"""Laplace: every bad input gets a clear error that names the argument and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.errors import (
    CheckpointError,
    InputError,
    NotFittedError,
    NotPSDError,
    UnsupportedModelError,
)
from bayesify.layers.laplace_layout import MemoryLimitError, parse_memory


def _net(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


def _data(n=40, task="classification"):
    x = torch.randn(n, 4)
    return x, (torch.randint(0, 3, (n,)) if task == "classification" else torch.randn(n))


def _wrap(task="classification", net=None, **options):
    return bf.bayesify(net or _net(3 if task == "classification" else 1), "laplace", task=task,
                       **options)


WRAP_ERRORS = [
    ({"prior_precision": -1.0}, InputError, r"`prior_precision` must be > 0"),
    ({"prior_precision": 0.0}, InputError, r"`prior_precision` must be > 0"),
    ({"prior_precision": float("nan")}, InputError, r"`prior_precision` contains 1 NaN"),
    ({"prior_precision": [1.0, 2.0, 3.0]}, InputError, r"one value per layer \(1"),
    ({"hessian": "exact"}, InputError, r"`hessian` must be one of 'full', 'kron'"),
    ({"curvature": "hessian"}, InputError, r"`curvature` must be one of 'ggn', 'ef'"),
    ({"approximation": "sigmoid"}, InputError, r"`approximation` must be one of 'probit'"),
    ({"predictive": "sampled"}, InputError, r"`predictive` must be one of 'glm', 'nn'"),
    ({"tune": "cv"}, InputError, r"`tune` must be one of 'marglik', None"),
    ({"subset": "everything"}, InputError, r"`subset` must be one of 'last_layer'"),
    ({"subset": ["1"]}, InputError, r"names '1', a ReLU with no parameters"),
    ({"subset": ["encoder"]}, UnsupportedModelError, r"names 'encoder', which is not a module"),
    ({"subset": []}, InputError, r"non-empty list of module names"),
    ({"head": "1"}, UnsupportedModelError, r"`head`='1' is a ReLU, not an nn.Linear"),
    ({"subset": "all", "head": "2"}, InputError, r"`head` applies to subset='last_layer'"),
    ({"subset": "subnetwork", "hessian": "kron"}, InputError, r"hessian must be 'full'"),
    ({"subset": "subnetwork", "subnetwork_size": 10**6}, InputError, r"has 67 trainable"),
    ({"hessian": "lowrank", "rank": 0}, InputError, r"`rank` must be an int >= 1"),
    ({"hessian": "lowrank", "rank": 100}, InputError, r"`rank` must be <= the 27 covered"),
    ({"subset": "all", "prior_precision": torch.ones(67)}, InputError,
     r"hessian='kron' takes a scalar or per-layer `prior_precision`"),
    ({"sigma_noise": 0.5}, InputError, r"`sigma_noise` is the observation noise of regr"),
    ({"max_memory": "lots"}, InputError, r"`max_memory` must be a number of bytes or a size"),
    ({"max_memory": -5}, InputError, r"`max_memory` must be a positive size"),
]


@pytest.mark.parametrize(("options", "error", "match"), WRAP_ERRORS,
                         ids=[str(i) for i in range(len(WRAP_ERRORS))])
def test_bad_options_at_wrap_time(options, error, match):
    with pytest.raises(error, match=match):
        _wrap(**options)


def test_regression_specific_options():
    with pytest.raises(InputError, match=r"`sigma_noise` must be > 0 everywhere"):
        _wrap("regression", sigma_noise=-0.1)
    with pytest.raises(InputError, match=r"`approximation` is the classification link"):
        _wrap("regression", approximation="bridge")
    fitted = _wrap("regression").fit(_data(task="regression"))
    with pytest.raises(InputError, match=r"`sigma_noise` must be a scalar or one value per "
                                         r"output \(1\), got 3 values"):
        fitted.log_marginal_likelihood(sigma_noise=[0.1, 0.2, 0.3])
    bm = _wrap("regression", sigma_noise=[0.1, 0.2])
    with pytest.raises(InputError, match=r"`sigma_noise` must be a scalar or one value per "
                                         r"output \(1\), got 2"):
        bm.fit(_data(task="regression"))


def test_use_before_fit():
    bm = _wrap()
    x, _ = _data()
    with pytest.raises(NotFittedError, match=r"call \.fit\(train\) before \.predict"):
        bm.predict(x)
    with pytest.raises(NotFittedError, match=r"before \.posterior"):
        bm.posterior(x)
    with pytest.raises(NotFittedError, match=r"before \.log_marginal_likelihood"):
        bm.log_marginal_likelihood()
    with pytest.raises(NotFittedError, match=r"before \.save"):
        bm.save("never.pt")
    with pytest.raises(NotFittedError, match=r"computed post hoc from data"):
        bm.finish_fit()


def test_bad_fit_calls():
    bm = _wrap()
    x, y = _data()
    with pytest.raises(InputError, match=r"`lr` does not apply to method 'laplace'"):
        bm.fit((x, y), lr=0.1)
    with pytest.raises(InputError, match=r"`y` must be < 3 \(the number of classes\), got 7"):
        bm.fit((x, torch.full((40,), 7)))
    with pytest.raises(InputError, match=r"`X` contains 1 NaN"):
        bm.fit((x.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))),
                y))
    with pytest.raises(InputError, match=r"`y` must have shape \[N\] or \[N, 1\]"):
        _wrap("regression").fit((x, torch.randn(40, 3)))
    with pytest.raises(UnsupportedModelError, match=r"needs at least 2 logits"):
        bf.bayesify(_net(1), "laplace", task="classification").fit((x, torch.zeros(40)))


def test_bad_calls_after_fit():
    x, y = _data()
    bm = _wrap(subset="all").fit((x, y))
    with pytest.raises(InputError, match=r"`prior_precision` must be > 0 everywhere"):
        bm.log_marginal_likelihood(torch.tensor([-1.0]))
    with pytest.raises(InputError, match=r"`sigma_noise` applies to regression only"):
        bm.log_marginal_likelihood(sigma_noise=0.3)
    with pytest.raises(InputError, match=r"`method` must be one of 'marglik', 'grid'"):
        bm.optimize_prior_precision("bayes")
    with pytest.raises(InputError, match=r"needs validation data: val=\(X_val, y_val\)"):
        bm.optimize_prior_precision("grid")
    with pytest.raises(InputError, match=r"`grid` must be a non-empty list of positive"):
        bm.optimize_prior_precision("grid", val=(x, y), grid=[-1.0])
    with pytest.raises(InputError, match=r"hessian='kron' takes a scalar or per-layer prior"):
        bm.optimize_prior_precision(structure="parameter")
    with pytest.raises(InputError, match=r"`structure` must be one of 'scalar', 'layer'"):
        bm.optimize_prior_precision(structure="global")


def test_memory_limit_refuses_before_allocating():
    big = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 1000))
    x, y = torch.randn(8, 4), torch.randint(0, 1000, (8,))
    bm = bf.bayesify(big, "laplace", task="classification", hessian="full", max_memory="1GB")
    with pytest.raises(MemoryLimitError, match=r"hessian='full' over 513,000 weights .* needs "
                                               r"about .* TB, over max_memory=1\.0 GB; use "
                                               r"hessian='kron' or 'diag'"):
        bm.fit((x, y))
    assert isinstance(MemoryLimitError("x"), MemoryError)
    with pytest.raises(MemoryLimitError, match=r"hessian='kron' over 513,000 weights .* "
                                               r"use hessian='diag', or raise `max_memory=`"):
        bf.bayesify(big, "laplace", task="classification", max_memory="10MB").fit((x, y))
    kron = bf.bayesify(big, "laplace", task="classification", approximation="mc",
                       max_memory="100MB", tune=None).fit((x, y))
    with pytest.raises(MemoryLimitError, match=r"covariance over 1000 classes of 64 inputs .* "
                                               r"use approximation='probit'"):
        kron.predict(torch.randn(64, 4))
    kron.likelihood.approximation = "probit"
    assert kron.predict(torch.randn(64, 4)).probs.shape == (64, 1000)
    assert parse_memory("512 MiB") == 512 * 1024**2


def test_head_transformed_after_last_layer():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return 2 * self.head(torch.relu(self.body(x)))

    with pytest.raises(UnsupportedModelError, match=r"its output is transformed afterwards; "
                                                     r"pass subset=\['head'\]"):
        bf.bayesify(Scaled(), "laplace", task="classification").fit(_data())
    bm = bf.bayesify(Scaled(), "laplace", task="classification", subset=["head"]).fit(_data())
    assert bm.predict(torch.randn(2, 4)).probs.shape == (2, 3)


def test_singular_precision_is_a_clear_error():
    from bayesify.layers.laplace_posterior import FullLaplace

    s = FullLaplace(2, [], torch.float64, torch.device("cpu"))
    s.curvature = torch.tensor([[[1.0, 0.0], [0.0, float("nan")]]], dtype=torch.float64)
    with pytest.raises(NotPSDError, match=r"posterior precision H \+ P contains NaN"):
        s.logdet(torch.tensor([1.0, 1.0], dtype=torch.float64), None,
                 torch.ones(1, dtype=torch.float64))


def test_checkpoint_of_another_structure(tmp_path):
    x, y = _data()
    _wrap(hessian="full").fit((x, y)).save(tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match=r"does not match this model's structure"):
        _wrap(hessian="kron").load(tmp_path / "full.pt")
