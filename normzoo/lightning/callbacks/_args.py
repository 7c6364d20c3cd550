"""Constructor checks shared by the callbacks: a wrong argument fails where it is written, not mid-fit.

Every message reads ``<Callback>: expected <what>, got <value>``.

Example:
    >>> positive_int("Monitor", "max_samples", 4)
    4
    >>> positive_int("Monitor", "max_samples", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: Monitor: expected max_samples to be a positive int, got 2.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["finite_number", "non_negative_int", "positive_floats", "positive_int"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(owner: str, name: str, value: object) -> int:
    """``value`` if it is an int >= 1, else a ValueError naming ``owner`` and ``name``."""
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{owner}: expected {name} to be a positive int, got {value!r}")
    return value  # type: ignore[return-value]


def non_negative_int(owner: str, name: str, value: object) -> int:
    """``value`` if it is an int >= 0, else a ValueError naming ``owner`` and ``name``."""
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{owner}: expected {name} to be an int >= 0, got {value!r}")
    return value  # type: ignore[return-value]


def finite_number(owner: str, name: str, value: object, *, low: float | None = None) -> float:
    """``float(value)`` if it is a finite real number (``> low`` when given), else a ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value <= low):  # type: ignore[operator]
        bound = f" > {low:g}" if low is not None else ""
        raise ValueError(f"{owner}: expected {name} to be a finite number{bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive_floats(owner: str, name: str, values: Sequence[float]) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of finite positive floats, else a ValueError."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{owner}: expected {name} to be finite positive numbers, got {values!r}")
    return out
