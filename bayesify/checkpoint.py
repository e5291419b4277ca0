"""The one checkpoint format of every method: save atomically, check before loading.

A checkpoint is a dict of tensors and plain containers, loadable with
``torch.load(..., weights_only=True)``::

    {"format": "bayesify", "format_version": 1, "method": ..., "task": ...,
     "n_data": ..., "state_dict": model.state_dict()}

Methods keep everything in their ``state_dict``: parameters, buffers, and
``get_extra_state`` for non-tensor state (IVON's optimizer). Two hooks cover state whose
shape is only known after ``fit``:

* :func:`mark_dynamic` flags a buffer (an exact GP's training inputs, HMC's draws)
  whose saved shape replaces the current one on load;
* ``BayesianModel._modules_for_state(state_dict)`` builds submodules that exist only
  after ``fit`` (a GP head sized from the data); they are attached only once the
  whole file has been checked.

:func:`load_checkpoint` checks format, version, method, task, keys, shapes and dtypes
before it changes anything, so a failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bayesify.errors import CheckpointError

if TYPE_CHECKING:
    from bayesify.core import BayesianModel

__all__ = ["FORMAT", "FORMAT_VERSION", "load_checkpoint", "mark_dynamic", "save_checkpoint"]

FORMAT = "bayesify"
FORMAT_VERSION = 1
_EXTRA = "_extra_state"


def mark_dynamic(module: nn.Module, *names: str) -> None:
    """Flag buffers of ``module`` whose shape is set by ``fit`` (taken from the file on
    load)."""
    dynamic = set(getattr(module, "_bayesify_dynamic", ()))
    module._bayesify_dynamic = frozenset(dynamic | set(names))


def _dynamic_keys(root: nn.Module) -> set[str]:
    keys = set()
    for prefix, module in root.named_modules():
        for name in getattr(module, "_bayesify_dynamic", ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def save_checkpoint(model: BayesianModel, path: str | os.PathLike) -> None:
    """Write ``model``'s checkpoint to ``path`` atomically (a crash mid-write leaves any
    older file at ``path`` intact)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "method": model.method_name, "task": model.task, "n_data": model.n_data,
               "state_dict": model.state_dict()}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(prefix=".bayesify-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: str, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path!r}: the file does not exist") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path!r}: it holds pickled Python objects other than tensors "
            "and plain containers, which could run code when loaded, so bayesify loads "
            f"with weights_only=True. It is not a bayesify checkpoint ({exc})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read {path!r} as a checkpoint: the file is truncated "
                              f"or not a torch.save file ({exc})") from None


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a plain tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        return f"a dict with keys {keys}" + (", ..." if len(obj) > 6 else "")
    return f"a {type(obj).__name__}"


def _check_header(path: str, payload: Any, model: BayesianModel) -> None:
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT \
            or not isinstance(payload.get("state_dict"), Mapping):
        raise CheckpointError(f"{path!r} is not a bayesify checkpoint: it holds "
                              f"{_describe(payload)}, where BayesianModel.save writes a dict "
                              "with 'format', 'method', 'task' and 'state_dict'")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {version!r}; this "
                              f"bayesify reads versions up to {FORMAT_VERSION}: upgrade it")
    for field, want in (("method", model.method_name), ("task", model.task)):
        if payload.get(field) != want:
            raise CheckpointError(f"{path!r} holds a checkpoint of {field} "
                                  f"{payload.get(field)!r}, but this model's {field} is "
                                  f"{want!r}; load it into bayesify(..., "
                                  f"{'method=' if field == 'method' else 'task='}"
                                  f"{payload.get(field)!r})")


def _expected_state(model: BayesianModel, new_modules: Mapping[str, nn.Module]
                    ) -> dict[str, Any]:
    """The state_dict the model will have once ``new_modules`` are attached."""
    state = {k: v for k, v in model.state_dict().items()
             if not any(k == n or k.startswith(n + ".") for n in new_modules)}
    for name, module in new_modules.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def _check_state(path: str, saved: Mapping[str, Any], expected: Mapping[str, Any],
                 dynamic: set[str]) -> None:
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing[:5]))}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(map(repr, unexpected[:5]))}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{path!r} does not match this model's structure: "
                              f"{'; '.join(parts)}. Wrap the same network with the same "
                              "method options as the model that was saved")
    for key, want in expected.items():
        got = saved[key]
        if key.endswith(_EXTRA) or not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{path!r} holds {type(got).__name__} at {key!r}, where "
                                  "this model has a tensor")
        if key not in dynamic and got.shape != want.shape:
            raise CheckpointError(
                f"{path!r} holds {key!r} with shape {list(got.shape)}, but this model's is "
                f"{list(want.shape)}: the checkpoint is for other layer sizes")
        if got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{path!r} holds {key!r} as {got.dtype}, but this model's "
                                  f"is {want.dtype}")


def load_checkpoint(model: BayesianModel, path: str | os.PathLike) -> None:
    """Load ``path`` into ``model`` after checking all of it (see the module docstring).

    Raises:
        CheckpointError: the file is missing, unreadable, refused, or of another
            method, task, version or structure; the model is unchanged.
    """
    path = os.fspath(path)
    payload = _read(path, model.device)
    _check_header(path, payload, model)
    saved = payload["state_dict"]
    new_modules = model._modules_for_state(saved)
    dynamic = _dynamic_keys(model)
    for name, module in new_modules.items():
        dynamic |= {f"{name}.{k}" for k in _dynamic_keys(module)}
    _check_state(path, saved, _expected_state(model, new_modules), dynamic)
    model._check_extra_state(saved)
    # Everything is checked: from here on nothing can fail on the file's account.
    for name, module in new_modules.items():
        setattr(model, name, module)
    for key in dynamic:
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, leaf)
        setattr(owner, leaf, torch.empty_like(saved[key], dtype=current.dtype,
                                              device=current.device))
    model.n_data = payload.get("n_data")
    model.load_state_dict(saved)
    model.eval()
