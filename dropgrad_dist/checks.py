"""Argument checks shared by every regularizer: one wording, one rule per kind of argument.

Each check returns the value in its canonical type or raises ``ValueError`` naming the argument
and what is allowed. Booleans are never accepted as numbers (``True`` is not a rate or a seed).
"""

from __future__ import annotations

import math

__all__ = ["SEED_LIMIT", "check_count", "check_int_in", "check_positive", "check_rate", "check_seed"]

SEED_LIMIT = 1 << 64  # seeds and step counts enter the mask salt as 64-bit words: larger ones would alias


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rate(value: object, argument: str) -> float:
    """``value`` as a float if it is a number in [0, 1], else ``ValueError`` naming ``argument``."""
    if not _is_number(value):
        raise ValueError(f"{argument} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    rate = float(value)  # type: ignore[arg-type]
    if not (0.0 <= rate <= 1.0):  # also rejects NaN
        raise ValueError(f"{argument} must be a number in [0, 1], got {value!r}")
    return rate


def check_int_in(value: object, argument: str, low: int, high: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a bool, not a float) with ``low <= value`` (``< high``)."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{argument} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{argument} must be {allowed}, got {value!r}")
    return value


def check_seed(value: object, argument: str = "seed") -> int:
    """A seed: an int in ``[0, 2**64)``, so that distinct accepted seeds give distinct masks."""
    return check_int_in(value, argument, 0, SEED_LIMIT)


def check_count(value: object, argument: str) -> int:
    """A step count: an int in ``[0, 2**64)``."""
    return check_int_in(value, argument, 0, SEED_LIMIT)


def check_positive(value: object, argument: str) -> float:
    """A positive finite number (an ``int`` is accepted as that number)."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0.0:  # type: ignore[arg-type]
        raise ValueError(f"{argument} must be a positive finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]
