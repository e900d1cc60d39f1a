"""The mask definition: the single source of truth for which gradient coordinates are dropped.

Coordinate ``i`` (row-major index into the flattened parameter) of the parameter with
canonical name ``key`` is kept at step ``t`` under seed ``s`` and drop rate ``p`` iff

    hash32(salt(s, t, key, stream, i // 2**31) + i % 2**31)  <  round((1 - p) * 2**32) - 2**31

where ``hash32`` is a bijective 32-bit integer mixer (Wellons' lowbias32) evaluated in
signed int32 arithmetic with wrap-around, and ``salt`` is a 64-bit SplitMix-style mix of
the arguments computed in Python. Kept values are multiplied by ``1 / (1 - p)``.

Every backend (the C and Triton kernels, torch.compile, eager torch ops) evaluates this module's
constants: the C kernels receive them as ``-D`` flags, the Triton kernels as ``constexpr``
arguments, the torch ops import them.
"""

from __future__ import annotations

import functools
import hashlib
from enum import IntEnum

import numpy as np
import torch

__all__ = [
    "HASH_MULTIPLIERS",
    "HASH_SHIFTS",
    "KEEP_ALL",
    "SALT_BLOCK",
    "MaskStream",
    "keep_probability",
    "keep_threshold",
    "key_hash",
    "uniform_u32",
]

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
SALT_BLOCK = 1 << 31  # coordinates per salt block: keeps every int32 index non-negative
HASH_SHIFTS = (16, 15, 16)  # lowbias32: x ^= x >> 16; x *= C1; x ^= x >> 15; x *= C2; x ^= x >> 16
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
# The kernel table's threshold column for T = 2**32: every coordinate kept (it does not fit int32).
KEEP_ALL = 1 << 31


class MaskStream(IntEnum):
    """Independent random streams drawn from the same (seed, step, key)."""

    GRAD = 1  # which gradient coordinates are dropped
    UPDATE = 2  # which update coordinates are dropped (full_update_drop)
    SKIP = 3  # whether the whole step is skipped (step_skip_rate)
    CLIP = 4  # whether a random clipping method clips at this step


def signed32(value: int) -> int:
    """``value`` modulo 2**32 as a signed int32."""
    value &= MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


# The multipliers as the int32 constants of the torch-op hash (torch has no uint32 multiply).
_C1 = signed32(HASH_MULTIPLIERS[0])
_C2 = signed32(HASH_MULTIPLIERS[1])


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


_SPLITMIX_NP = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31))


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    # The same mix on a uint64 array, in place (numpy wraps modulo 2**64): one pass salts every piece.
    add, s1, m1, s2, m2, s3 = _SPLITMIX_NP
    x += add
    x ^= x >> s1
    x *= m1
    x ^= x >> s2
    x *= m2
    x ^= x >> s3
    return x


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a parameter key (BLAKE2b; never Python's salted ``hash()``)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (a canonical parameter name), got {type(key).__name__}")
    return _key_hash(key)


@functools.lru_cache(maxsize=65536)  # keys repeat every step; hashing them once is enough
def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=64)  # (seed, step) lead the chain: one mix of them serves every key of a step
def _step_word(seed: int, step: int) -> int:
    return _splitmix64(_splitmix64(seed & MASK64) ^ (step & MASK64))


def _salt(seed: int, step: int, key: int, stream: MaskStream, block: int) -> int:
    """``h = 0; h = splitmix64(h ^ w)`` for ``w`` in ``(seed, step, key, stream, block)`` (64-bit words)."""
    h = _splitmix64(_step_word(seed, step) ^ (key & MASK64))
    h = _splitmix64(h ^ (int(stream) & MASK64))
    return _splitmix64(h ^ (block & MASK64))


def _salts(seed: int, step: int, stream: MaskStream, keys: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """:func:`_salt` of many (key, block) pairs at once (uint64 arrays)."""
    if keys.size <= 8:  # a numpy call costs ~1 us, a Python salt ~2 us: few pieces are faster one by one
        return np.array([_salt(seed, step, key, stream, block) for key, block in zip(keys.tolist(), blocks.tolist())],
                        dtype=np.uint64)
    h = _splitmix64_np(keys ^ np.uint64(_step_word(seed, step)))
    h ^= np.uint64(int(stream))
    h = _splitmix64_np(h)
    h ^= blocks
    return _splitmix64_np(h)


def uniform_u32(seed: int, step: int, stream: MaskStream, key: int = 0) -> int:
    """A uniform 32-bit integer decided by ``(seed, step, stream, key)`` alone (for per-step draws)."""
    return _salt(seed, step, key, stream, block=-1) & MASK32


def keep_threshold(rate: float) -> int:
    """``T = round((1 - p) * 2**32)``: a coordinate is kept with probability exactly ``T / 2**32``."""
    return int(round((1.0 - float(rate)) * 4294967296.0))


def keep_probability(rate: float) -> float:
    """The exact probability that a coordinate is kept at drop rate ``rate``."""
    return keep_threshold(rate) / 4294967296.0


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the kept coordinates' factor: float64 for float64 values, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=4096)
def _rate_code(rate: float, extra_scale: float, dtype: torch.dtype = torch.float32) -> tuple[int, float]:
    """``(threshold column, scale)`` of a kernel table row for ``rate`` (see :mod:`.pieces`).

    Masked: ``T - 2**31`` and ``extra_scale / (1 - p)`` rounded to :func:`_scale_dtype` (as the torch
    ops round it); all kept: :data:`KEEP_ALL` and the float64 factor; none kept: ``-2**31`` and 0.
    """
    threshold = keep_threshold(rate)
    if threshold >= 1 << 32:
        return KEEP_ALL, extra_scale / (1.0 - rate)
    if threshold == 0:
        return -(1 << 31), 0.0
    return threshold - (1 << 31), torch.tensor(extra_scale / (1.0 - rate), dtype=_scale_dtype(dtype)).item()


# The hash as torch ops on int32 tensors, shared verbatim by the torch.compile and the eager path.


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    # int32 ">>" is arithmetic; masking off the sign copies makes it a logical shift.
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    s1, s2, s3 = HASH_SHIFTS
    x = x ^ _srl(x, s1)
    x = x * _C1
    x = x ^ _srl(x, s2)
    x = x * _C2
    return x ^ _srl(x, s3)
