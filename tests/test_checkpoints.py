"""One checkpoint mechanism: atomic saves, and loads that check everything first, so a
failed load raises CheckpointError naming the file and leaves the model bitwise as it
was."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

import bayesify as bf


def _net(width: int = 8, out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, out))


def _fitted(task: str = "regression", width: int = 8, dtype=torch.float32):
    x = torch.randn(32, 4, dtype=dtype)
    y = x.sum(1) if task == "regression" else (x[:, 0] > 0).long()
    out = 1 if task == "regression" else 3
    return bf.bayesify(_net(width, out).to(dtype), "deterministic", task=task).fit(
        (x, y), epochs=2, progress=False)


def _snapshot(bm: bf.BayesianModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bm.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(bm: bf.BayesianModel, before: dict[str, torch.Tensor]) -> bool:
    after = bm.state_dict()
    return all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.pt"
    _fitted().save(path)
    return path


def _rewrite(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


CASES = {
    "another method": (lambda p: _rewrite(p, lambda c: c.update(method="vbll")),
                       "checkpoint of method 'vbll'"),
    "another task": (lambda p: _rewrite(p, lambda c: c.update(task="classification")),
                     "checkpoint of task 'classification'"),
    "a newer format": (lambda p: _rewrite(p, lambda c: c.update(format_version=99)),
                       "format version 99"),
    "a plain tensor": (lambda p: torch.save(torch.ones(3), p), "a plain tensor of shape"),
    "a dict without keys": (lambda p: torch.save({"weights": torch.ones(2)}, p),
                            "not a bayesify checkpoint"),
    "a missing key": (lambda p: _rewrite(p, lambda c: c["state_dict"].pop("model.0.bias")),
                      "missing 'model.0.bias'"),
    "an unexpected key": (lambda p: _rewrite(p, lambda c: c["state_dict"].update(
        extra=torch.ones(1))), "unexpected 'extra'"),
    "a truncated file": (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated"),
    "no file": (lambda p: os.remove(p), "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_checkpoint_is_refused_and_the_model_kept(saved, case):
    damage, message = CASES[case]
    damage(saved)
    bm = _fitted()
    before = _snapshot(bm)
    with pytest.raises(bf.CheckpointError, match=message):
        bm.load(saved)
    assert _unchanged(bm, before)


def test_other_layer_widths_are_named_and_nothing_is_overwritten(tmp_path):
    path = tmp_path / "wide.pt"
    _fitted(width=16).save(path)
    bm = _fitted(width=8)
    before = _snapshot(bm)
    with pytest.raises(bf.CheckpointError, match=r"'model.0.weight' with shape \[16, 4\]"):
        bm.load(path)
    # model.2.bias has the same shape in both and comes later: still untouched.
    assert _unchanged(bm, before)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_malicious_pickle_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "bayesify", "code": _Payload()}, f, protocol=2)
    with pytest.raises(bf.CheckpointError, match="could run code"):
        _fitted().load(path)


def test_save_is_atomic_and_loads_bitwise(tmp_path, dtype):
    bm = _fitted(dtype=dtype)
    path = tmp_path / "m.pt"
    bm.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "bayesify" and payload["format_version"] == 1
    other = bf.bayesify(_net(8, 1).to(dtype), "deterministic", task="regression").load(path)
    x = torch.randn(5, 4, dtype=dtype)
    assert torch.equal(other.predict(x).mean, bm.predict(x).mean)
    assert other.is_fitted and other.n_data == 32


def test_saving_before_fit_names_what_to_call(tmp_path):
    bm = bf.bayesify(_net(8, 1), "deterministic", task="regression")
    with pytest.raises(bf.NotFittedError, match=r"call \.fit\(train\) before \.save\(\)"):
        bm.save(tmp_path / "x.pt")
