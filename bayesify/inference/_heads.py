"""Locating the final linear layer that last-layer methods (VBLL, GP heads) act on."""

from __future__ import annotations

from torch import nn

from bayesify.errors import InputError, UnsupportedModelError

__all__ = ["find_head"]


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
