"""What last-layer methods (VBLL, GP heads) share: locating the final linear layer and
reading its input with a forward hook.

* :func:`find_head` names the ``nn.Linear`` a method acts on;
* :func:`run_to_head` runs the network once and returns the head's input φ [N, d]
  (a frozen backbone runs in eval mode, so dropout is off and BatchNorm uses, and
  keeps, its running statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bayesify._network import OutputFn, call_network
from bayesify.core import preserve_training_flags
from bayesify.errors import InputError, UnsupportedModelError

__all__ = ["HeadOutput", "find_head", "run_to_head"]


def find_head(model: nn.Module, head: str | None) -> tuple[str, nn.Linear]:
    """The name and module of a model's head: the module named ``head``, or the last
    ``nn.Linear`` in ``model.named_modules()`` order.

    Raises:
        UnsupportedModelError: the model has no ``nn.Linear``, or ``head`` names a module
            that is missing or not an ``nn.Linear`` (the message lists the candidates).
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if head is None:
        if not linears:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no nn.Linear layer to use as the head; pass "
                "`head=` naming the final linear module (as in model.named_modules())")
        head = linears[-1]
    elif not isinstance(head, str):
        raise InputError("`head` must be a submodule's name as in model.named_modules(), "
                         f"e.g. head='classifier.3'; got {type(head).__name__}")
    try:
        module = model.get_submodule(head)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        what = "names no submodule" if module is None else f"is a {type(module).__name__}"
        found = ", ".join(map(repr, linears)) or "none"
        raise UnsupportedModelError(f"`head`={head!r} {what}, not an nn.Linear; the model's "
                                    f"linear layers are: {found}")
    return head, module


class HeadOutput:
    """One forward pass read at the head.

    Attributes:
        features: φ, the head's input ([N, d] for a final nn.Linear on rows).
        head_output: the head's own output [N, m].
        output: the model's output (whatever its forward returns).
    """

    def __init__(self, features: torch.Tensor, head_output: Any, output: Any):
        self.features = features
        self.head_output = head_output
        self.output = output

    @property
    def output_is_head_output(self) -> bool:
        """Whether the model returns its head's output unchanged."""
        out, head = self.output, self.head_output
        return (isinstance(out, torch.Tensor) and isinstance(head, torch.Tensor)
                and out.shape == head.shape and torch.equal(out, head))


def run_to_head(model: nn.Module, head_name: str, x: Any, *, frozen: bool,
                output: OutputFn | None = None) -> HeadOutput:
    """Run the network on ``x`` and capture the input of its submodule ``head_name``.

    Args:
        model: the wrapped network.
        head_name: the head's name in ``model.named_modules()``.
        x: inputs [N, ...], or a mapping/tuple of them (differentiable through the
            capture); the network runs through :func:`bayesify._network.call_network`,
            so its output is reduced to a tensor by ``output`` or the default rule.
        frozen: run the network in eval mode (its flags are restored afterwards), so a
            frozen backbone's BatchNorm statistics are used, never updated.

    Raises:
        UnsupportedModelError: the forward never called the head with a tensor.
    """
    head = model.get_submodule(head_name)
    captured: list[tuple[Any, Any]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured.append((args[0] if args else None, output))

    handle = head.register_forward_hook(hook)
    try:
        if frozen:
            with preserve_training_flags(model):
                model.eval()
                result = call_network(model, x, output=output)
        else:
            result = call_network(model, x, output=output)
    finally:
        handle.remove()
    if not captured or not isinstance(captured[-1][0], torch.Tensor):
        raise UnsupportedModelError(
            f"the model's forward never called its head {head_name!r} with a tensor; pass "
            "`head=` naming the final linear layer the forward uses")
    phi, head_output = captured[-1]
    return HeadOutput(phi, head_output, result)
