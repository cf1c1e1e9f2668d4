"""Validation of hyper-parameters (optimisers and schedules): a ValueError naming the bad one."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def real(name: str, value: Any, lo: float | None = None, lo_open: bool = False,
         hi: float | None = None, hi_open: bool = False) -> float:
    """`value` as a finite float within the bounds given (open or closed)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


MAX_INTEGER = 2**53  # counts beyond it have no float of their own (schedules divide by them)


def integer(name: str, value: Any, lo: int) -> int:
    """`value` as an int from lo to MAX_INTEGER (a bool is not an integer here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r:.40}")
    if value > MAX_INTEGER:
        raise ValueError(f"{name} must be at most 2**53, got {value!r:.40}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """`value` as a bool (True or False only)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def named(spec: Any, kinds: Mapping[str, Any], what: str,
          fields_of: Callable[[Any], tuple[Sequence[str], Sequence[str]]]) -> tuple[str, Any, dict[str, Any]]:
    """(name, class, other fields) of a spec `{"name": <a key of kinds>, field: value, ...}`
    (an optimiser's or a schedule's, `what`); `fields_of(class)` gives (its fields, the required
    ones). A ValueError names what is wrong: not a dict, an unknown name, unknown or missing fields."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a{'n' if what[0] in 'aeiou' else ''} {what} spec must be a dict with a 'name', got {spec!r}")
    values = dict(spec)
    name = values.pop("name", None)
    if not isinstance(name, str) or name not in kinds:
        raise ValueError(f"{what} spec name must be one of {sorted(kinds)}, got {name!r}")
    cls = kinds[name]
    known, required = fields_of(cls)
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"unknown field(s) for {name}: {', '.join(unknown)} (known: {', '.join(known)})")
    missing = [f for f in required if f not in values]
    if missing:
        raise ValueError(f"{name} spec needs field(s): {', '.join(missing)}")
    return name, cls, values
