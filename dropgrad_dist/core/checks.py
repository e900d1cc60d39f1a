"""Argument checks shared by every regularizer: one wording, one rule per kind of argument.

Each check returns the value in its canonical type (``float`` or ``int``) or raises naming the
argument and what is allowed: ``ArgumentTypeError`` (a ``TypeError``) for a value of the wrong
type, ``ValueError`` for a value out of range. A number is any real scalar: a Python
``int``/``float``, a NumPy scalar (``np.float32``, ``np.int64``, ...) or a 0-d real tensor.
Booleans are never accepted as numbers (``True`` is not a rate or a seed), and an integer
argument takes only integer types (``3.0`` is not a seed).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["SEED_LIMIT", "ArgumentTypeError", "check_count", "check_int_in", "check_number_in", "check_positive",
           "check_rate", "check_seed", "check_choice", "check_bool", "real_scalar", "shown"]

SEED_LIMIT = 1 << 64  # seeds and step counts enter the mask salt as 64-bit words: larger ones would alias


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a str or a bool for a number, a float for an int, ...).

    A ``TypeError``; also a ``ValueError`` so that callers who catch ``ValueError`` for any bad
    argument keep working.
    """


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 400-digit int would drown the message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe(value: object) -> str:
    return f"{shown(value)} ({type(value).__name__})"


def check_choice(value: object, argument: str, allowed: Sequence[str]) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        error = ValueError if isinstance(value, str) else ArgumentTypeError
        raise error(f"{argument} must be one of {', '.join(map(repr, allowed))}, got {_describe(value)}")
    return value


def check_bool(value: object, argument: str) -> bool:
    """``True`` or ``False`` (not 0, 1 or a NumPy bool: a flag is not a number)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{argument} must be True or False, got {_describe(value)}")
    return value


def real_scalar(value: object) -> float | None:
    """``value`` as a float if it is a real scalar (not a bool, a complex, or a tensor of several
    elements); None otherwise. Integers too large for a float give ``inf`` (refused by range checks)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # np.bool_ is no numbers.Real
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf if value > 0 else -math.inf


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer scalar (Python, NumPy or a 0-d integer tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_number_in(value: object, argument: str, low: float, high: float, *, low_open: bool = False,
                    high_open: bool = False) -> float:
    """``value`` as a float if it is a real number in the interval from ``low`` to ``high``."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    number = real_scalar(value)
    if number is None:
        raise ArgumentTypeError(f"{argument} must be a number in {interval}, got {_describe(value)}")
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):  # also rejects NaN
        raise ValueError(f"{argument} must be a number in {interval}, got {shown(value)}")
    return number


def check_rate(value: object, argument: str) -> float:
    """``value`` as a float if it is a number in [0, 1]; raises naming ``argument`` otherwise."""
    return check_number_in(value, argument, 0.0, 1.0)


def check_int_in(value: object, argument: str, low: int, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float) with ``low <= value`` (``< high``)."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    number = _integer(value)
    if number is None:
        raise ArgumentTypeError(f"{argument} must be {allowed}, got {_describe(value)}")
    if number < low or (high is not None and number >= high):
        raise ValueError(f"{argument} must be {allowed}, got {shown(value)}")
    return number


def check_seed(value: object, argument: str = "seed") -> int:
    """A seed: an int in ``[0, 2**64)``, so that distinct accepted seeds give distinct masks."""
    return check_int_in(value, argument, 0, SEED_LIMIT)


def check_count(value: object, argument: str) -> int:
    """A step count: an int in ``[0, 2**64)``."""
    return check_int_in(value, argument, 0, SEED_LIMIT)


def check_positive(value: object, argument: str) -> float:
    """A positive finite number (an integer is accepted as that number)."""
    number = real_scalar(value)
    if number is None:
        raise ArgumentTypeError(f"{argument} must be a positive finite number, got {_describe(value)}")
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{argument} must be a positive finite number, got {_describe(value)}")
    return number
