"""Progress bars: one switch for the whole library, and respect for ``TQDM_DISABLE``.

Long work (fitting, MCMC, the report) shows a tqdm bar. ``progress=None`` (the default
everywhere) shows it unless bars are switched off globally with
:func:`set_progress_bars` or the environment variable ``TQDM_DISABLE`` (or
``BAYESIFY_PROGRESS=0``); ``progress=True``/``False`` decides for one call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "progress_enabled", "set_progress_bars"]

_ENABLED: bool | None = None  # None: follow the environment


def set_progress_bars(enabled: bool | None) -> None:
    """Show (``True``) or hide (``False``) every bayesify progress bar; ``None`` goes
    back to the environment (``TQDM_DISABLE``, ``BAYESIFY_PROGRESS``)."""
    global _ENABLED
    _ENABLED = None if enabled is None else bool(enabled)


def _env_off(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether a bar shows for a call that passed ``progress``."""
    if progress is not None:
        return bool(progress)
    if _ENABLED is not None:
        return _ENABLED
    if _env_off("TQDM_DISABLE"):
        return False
    return os.environ.get("BAYESIFY_PROGRESS", "1").strip().lower() not in ("0", "false", "no")


def progress_bar(iterable: Iterable[Any], *, desc: str, progress: bool | None = None,
                 **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` that follows :func:`progress_enabled`."""
    return tqdm(iterable, desc=desc, disable=not progress_enabled(progress), leave=False,
                **kwargs)
