"""The memory guard: a method estimates the size of what it is about to build (a dense
VBLL covariance, a Laplace curvature) and refuses over ``max_memory`` before allocating,
naming the cheaper option, instead of trying a multi-GB allocation and dying."""

from __future__ import annotations

import math
import re
from typing import Any

from bayesify.errors import InputError

__all__ = ["DEFAULT_MAX_MEMORY", "MemoryLimitError", "check_memory", "format_bytes",
           "parse_memory"]

#: The default ``max_memory`` of whatever a method builds: 2 GiB.
DEFAULT_MAX_MEMORY = 2 * 1024**3

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class MemoryLimitError(InputError, MemoryError):
    """What a method is about to allocate exceeds ``max_memory`` (the message names a
    cheaper option); nothing was allocated."""


def parse_memory(value: Any, name: str = "max_memory") -> int:
    """Bytes from an int/float or a string such as ``"2GB"``, ``"512 MiB"``."""
    if isinstance(value, bool):
        raise InputError(f"`{name}` must be a number of bytes or a size such as '2GB', "
                         f"got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InputError(f"`{name}` must be a number of bytes or a size such as '2GB' "
                             f"or '512MiB', got {value!r}")
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise InputError(f"`{name}` must be a number of bytes or a size such as '2GB', "
                         f"got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"`{name}` must be a positive size, got {value!r}")
    return int(number)


def format_bytes(n: float) -> str:
    """``1.5 GB`` style (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_memory(nbytes: float, what: str, limit: int, alternatives: str) -> None:
    """Refuse (before allocating) when ``nbytes`` is over ``limit``.

    Raises:
        MemoryLimitError: naming what was to be built, its size, and ``alternatives``.
    """
    if nbytes > limit:
        raise MemoryLimitError(
            f"{what} needs about {format_bytes(nbytes)}, over max_memory="
            f"{format_bytes(limit)}; {alternatives}, or raise `max_memory=` if the "
            "machine has the memory")
