"""Every registered method × task × dtype passes the conformance suite, on the `device`
fixture (CUDA with BAYESIFY_TEST_DEVICE=cuda); a third-party method can run it too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.core import _BUILTIN_MODULES
from bayesify.posterior import GaussianPosterior
from bayesify.testing import CHECKS, check_method

CASES = [(name, task) for name in _BUILTIN_MODULES for task in bf.TASKS
         if task in bf.get_method(name).supported_tasks]


def _network(method):
    """The suite's MLP, or for tfb (which Bayesianizes LoRA adapters) the same MLP with
    peft LoRA adapters on every Linear layer."""
    if method != "tfb":
        return None
    pytest.importorskip("peft")
    from _models import lora_network

    return lora_network


@pytest.mark.parametrize(("method", "task"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_builtin_method_conforms(method, task, dtype, device):
    assert check_method(method, task, dtype=dtype, device=device,
                        network=_network(method)) == list(CHECKS)


class ScaledLinearModel(bf.BayesianModel):
    """A tiny third-party method: a point network with a learned output scale whose
    posterior is Gaussian with variance scale² (no meaning, but a real contract)."""

    default_epochs = 2

    def __init__(self, model: nn.Module, task: str, *, n_data: int | None = None):
        super().__init__(model, task, n_data=n_data)
        self.log_scale = nn.Parameter(torch.zeros((), dtype=self.dtype, device=self.device))
        if task == "regression":
            self.likelihood = bf.likelihoods.GaussianLikelihood(
                lambda f: (f, torch.full_like(f, 0.1)))

    def forward(self, x):
        return self.model(x)

    def loss(self, x, y):
        f = self.model(x) * self.log_scale.exp()
        if self.task == "classification":
            return nn.functional.cross_entropy(f, y)
        return (f[:, 0] - y).pow(2).mean()

    def _posterior(self, x, num_samples, generator):
        f = self.model(x)
        return GaussianPosterior(f, torch.full_like(f, 1e-2) * self.log_scale.exp())


def test_third_party_method_runs_the_same_checks(dtype):
    cls = bf.register_method("test_scaled_linear")(ScaledLinearModel)
    try:
        for task in bf.TASKS:
            assert check_method(cls, task, dtype=dtype) == list(CHECKS)
            assert check_method("test_scaled_linear", task, checks=["save_load"]) == [
                "save_load"]
    finally:
        from bayesify.core import _REGISTRY

        _REGISTRY.pop("test_scaled_linear")


def test_a_broken_method_fails_with_the_check_named(dtype):
    class Leaky(ScaledLinearModel):
        def _posterior(self, x, num_samples, generator):
            # builds its covariance on the default dtype, not the model's
            f = self.model(x)
            return GaussianPosterior(f, torch.ones(f.shape, dtype=torch.float16))

    with pytest.raises(AssertionError, match="check 'dtype_device'"):
        check_method(Leaky, "classification", dtype=dtype, checks=["dtype_device"])


def test_unknown_check_is_named():
    with pytest.raises(bf.InputError, match="unknown checks"):
        check_method("deterministic", "regression", checks=["nope"])


def test_the_readme_example_of_adding_a_method_runs():
    import pathlib

    from bayesify.core import _REGISTRY

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Adding a method"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    try:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
        assert "my_method" in _REGISTRY
    finally:
        _REGISTRY.pop("my_method", None)
