"""Structured inputs and outputs with the methods that run whole networks: a network
taking keyword inputs (a mapping batch) or positional ones (a tuple) and returning a
dict gives exactly what the same network taking one tensor gives, for fit, predict,
forward and loss.

Each method is fit twice from the same seed on the same data, once through the plain
network ``f(x)`` and once through its twin ``g(num=x[:, :3], extra=x[:, 3:])`` that
holds the same weights; every number must agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf

pytestmark = pytest.mark.filterwarnings(
    "ignore::bayesify.inference.hmc_chains.ConvergenceWarning")

#: method -> (options of bayesify(...), options of fit).
METHODS: dict[str, tuple[dict, dict]] = {
    "vi": ({}, {"epochs": 2, "batch_size": 16}),
    # two subspace updates (steps 2 and 4 of 6): the dense gradient on structured inputs
    "ssvi": ({"update_interval": 2, "update_end": 1.0}, {"epochs": 2, "batch_size": 16}),
    "swag": ({"rank": 2, "collect_every": 1}, {"epochs": 2, "batch_size": 16}),
    "ensemble": ({"members": 2}, {"epochs": 2, "batch_size": 16}),
    "hmc": ({"num_samples": 6, "warmup": 6, "max_tree_depth": 3}, {}),
    "laplace": ({}, {}),
    "laplace-all-kron": ({"subset": "all", "hessian": "kron"}, {}),
    "laplace-all-full": ({"subset": "all", "hessian": "full"}, {}),
    "laplace-nn": ({"subset": "all", "hessian": "diag", "predictive": "nn"}, {}),
    "laplace-subnetwork": ({"subset": "subnetwork", "subnetwork_size": 20}, {}),
}


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class _Keywords(nn.Module):
    """The same network with inputs ``num`` [N, 3] and ``extra`` [N, 2], returning
    ``{"logits": [N, 3], "features": [N, 3]}``."""

    def __init__(self, plain: _Plain):
        super().__init__()
        self.body, self.head = plain.body, plain.head

    def forward(self, num, extra):
        x = torch.cat([num, extra], -1)
        return {"features": num, "logits": self.head(torch.tanh(self.body(x)))}


class _Positional(_Keywords):
    """Positional inputs (a tuple), returning a tuple whose first tensor is the logits."""

    def forward(self, num, extra):
        out = super().forward(num, extra)
        return out["logits"], out["features"]


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=generator)
    y = (x[:, 0] + x[:, 3] > 0).long() + (x[:, 1] > 1).long()
    return x, y


def _wrap(model: nn.Module, name: str) -> bf.BayesianModel:
    options, _ = METHODS[name]
    torch.manual_seed(0)
    return bf.bayesify(model, name.split("-")[0], task="classification", **options)


def _fit(bm: bf.BayesianModel, name: str, train) -> bf.BayesianModel:
    _, fit = METHODS[name]
    return bm.fit(train, progress=False, seed=0, **fit)


@pytest.mark.parametrize("kind", ["mapping", "tuple"])
@pytest.mark.parametrize("name", list(METHODS))
def test_structured_inputs_give_what_one_tensor_gives(name, kind):
    x, y = _data()
    torch.manual_seed(0)
    plain = _Plain()
    twin = (_Keywords if kind == "mapping" else _Positional)(plain_copy := _Plain())
    plain_copy.load_state_dict(plain.state_dict())
    structured = ({"num": x[:, :3], "extra": x[:, 3:]} if kind == "mapping"
                  else (x[:, :3], x[:, 3:]))
    reference = _fit(_wrap(plain, name), name, (x, y))
    bm = _fit(_wrap(twin, name), name,
              {**structured, "labels": y} if kind == "mapping" else (structured, y))
    expected = reference.predict(x, seed=1, batch_size=16)
    got = bm.predict(structured, seed=1, batch_size=16)
    torch.testing.assert_close(got.probs, expected.probs)
    if name == "ssvi":
        assert [step for step, _, _ in bm.update_log] == [2, 4]
    with torch.no_grad():
        torch.testing.assert_close(bm(structured), reference(x))
        losses = []
        for model, inputs in ((bm, structured), (reference, x)):
            torch.manual_seed(2)     # the same noise for sampling losses (vi's LRT)
            losses.append(model.loss(inputs, y))
        torch.testing.assert_close(*losses)
