"""Building an ensemble's members: seeds, the base method and its options, and the
per-member re-initialization (the rule is documented in :mod:`bayesify.inference.ensemble`)."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

from bayesify.core import BayesianModel, resolve_method
from bayesify.errors import BayesifyWarning, InputError, UnsupportedModelError

__all__ = ["check_base_options", "member_seeds", "reinitialize", "reinitialize_adapters",
           "resolve_base"]


def member_seeds(seed: int, members: int) -> list[int]:
    """The initialization seeds of ``members`` members of an ensemble seeded ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    return [int(s) for s in torch.randint(0, 2**62, (members,), generator=generator)]


def resolve_base(base: Any) -> type[BayesianModel]:
    cls = resolve_method(base, "base")
    if cls.method_name == "ensemble":
        raise InputError("`base` cannot be 'ensemble': an ensemble of ensembles is one "
                         "ensemble with more members; raise `members=` instead")
    return cls


def check_base_options(cls: type[BayesianModel], options: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items()
             if n not in ("self", "model", "task") and p.kind is not p.VAR_POSITIONAL]
    for key in options:
        if key not in valid:
            raise InputError(f"unknown option {key!r} for the ensemble or its base method "
                             f"{cls.method_name!r}; the base's options are "
                             f"{', '.join(valid)}; the ensemble's are members, base, "
                             "reinitialize, training, seed")


def _head(net: nn.Module, name: str | None) -> nn.Module:
    if name is not None:
        try:
            module = net.get_submodule(name)
        except AttributeError:
            raise UnsupportedModelError(f"`head`={name!r} is not a submodule of the model") \
                from None
        if not callable(getattr(module, "reset_parameters", None)):
            raise UnsupportedModelError(f"the head {name!r} ({type(module).__name__}) has no "
                                        "reset_parameters(); pass reinitialize='all' or None")
        return module
    head = None
    for module in net.modules():
        own = next(module.parameters(recurse=False), None)
        if own is not None and callable(getattr(module, "reset_parameters", None)):
            head = module
    if head is None:
        raise UnsupportedModelError(
            "reinitialize='head' found no layer with parameters and reset_parameters() in "
            "the model; name it with head='...', or pass reinitialize=None")
    return head


def reinitialize(net: nn.Module, how: str | None, head: str | None) -> None:
    if how == "head":
        _head(net, head).reset_parameters()
        return
    if how == "all":
        kept = []
        for name, module in net.named_modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            elif next(module.parameters(recurse=False), None) is not None:
                kept.append(name or type(module).__name__)
        if kept:
            warnings.warn(f"reinitialize='all' kept the weights of {', '.join(kept[:5])}, "
                          "which have no reset_parameters()", BayesifyWarning, stacklevel=4)


@torch.no_grad()
def reinitialize_adapters(net: nn.Module) -> None:
    """Re-draw every active LoRA adapter of ``net`` as peft's default initialization
    does: A [r, in] Kaiming-uniform (a = √5), B [out, r] zero. Nothing else changes."""
    from bayesify.inference.laplace import lora_modules

    for name in lora_modules(net):
        layer = net.get_submodule(name)
        if ".lora_A." in f".{name}.":
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
