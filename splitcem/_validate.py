"""Hyperparameter checks shared by defenses, CEM and attacks: one message style, one place.

Each check returns the value converted (``int`` / ``float`` / ``str``) or raises a
:class:`~splitcem.errors.ConfigError` that names the parameter, the valid range and the value.
Booleans are refused where a number is expected (``True`` is an ``int`` to Python).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from splitcem.errors import ConfigError

__all__ = ["check_choice", "check_float", "check_int"]


def check_int(name: str, v: Any, *, lo: int = 0) -> int:
    """An integer >= ``lo``."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{name} must be {what}, got {v!r}")
    return int(v)


def check_float(name: str, v: Any, *, positive: bool = False) -> float:
    """A finite number >= 0 (> 0 with ``positive``)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(f) or f < 0 or (positive and f == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {v!r}")
    return f


def check_choice(name: str, v: Any, options: Sequence[str]) -> str:
    """One of ``options``."""
    if v not in options:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}; got {v!r}")
    return str(v)
