"""AutoClip's history of past gradient norms: exact quantiles (as ``torch.quantile``) in ``O(sqrt n)``.

The norms are kept in sorted blocks, so appending, dropping the oldest (a bounded window) and
selecting the k-th smallest cost ``O(sqrt n)`` each, and the quantile is exact rather than the
biased percentile of a sample. ``digest`` fingerprints the sequence for the agreement check.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections import deque
from fractions import Fraction

__all__ = ["AutoClipHistories", "NormHistory"]

BLOCK_SIZE = 1024  # values per sorted block: O(sqrt n) insertion, removal and selection


class NormHistory:
    """The norms of past steps, in order, with exact quantiles in ``O(sqrt n)`` per step.

    Keeps the last ``size`` values (all when ``size`` is None) in insertion order and, for
    selection, in sorted blocks of at most ``2 * 1024`` values.
    """

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self._blocks: list[list[float]] = []
        self._maxes: list[float] = []
        self.digest = 0  # a running hash of every value appended: cheap to compare across ranks

    def __len__(self) -> int:
        return len(self.values)

    def append(self, value: float) -> None:
        self.values.append(value)
        self._insert(value)
        self.digest = _mix(self.digest, value)
        if self.size is not None and len(self.values) > self.size:
            self._remove(self.values.popleft())

    def _insert(self, value: float) -> None:
        if not self._blocks:
            self._blocks.append([value])
            self._maxes.append(value)
            return
        i = min(bisect.bisect_left(self._maxes, value), len(self._blocks) - 1)
        block = self._blocks[i]
        bisect.insort(block, value)
        self._maxes[i] = block[-1]
        if len(block) > 2 * BLOCK_SIZE:
            self._blocks[i:i + 1] = [block[:BLOCK_SIZE], block[BLOCK_SIZE:]]
            self._maxes[i:i + 1] = [block[BLOCK_SIZE - 1], block[-1]]

    def _remove(self, value: float) -> None:
        i = bisect.bisect_left(self._maxes, value)
        block = self._blocks[i]
        del block[bisect.bisect_left(block, value)]
        if block:
            self._maxes[i] = block[-1]
        else:
            del self._blocks[i], self._maxes[i]

    def _rank_of(self, value: float) -> int:
        """How many stored values are smaller than ``value``."""
        i = bisect.bisect_left(self._maxes, value)
        return sum(len(b) for b in self._blocks[:i]) + (bisect.bisect_left(self._blocks[i], value)
                                                        if i < len(self._blocks) else 0)

    def _kth(self, k: int) -> float:
        for block in self._blocks:
            if k < len(block):
                return block[k]
            k -= len(block)
        raise IndexError(k)

    def quantile_with(self, value: float, q: float) -> float:
        """``torch.quantile(tensor(history + [value], dtype=float64), q)`` without storing ``value``."""
        position = q * len(self.values)  # q * (n - 1) with n = len + 1
        below = math.floor(position)
        weight = position - below
        rank = self._rank_of(value)

        def kth(k: int) -> float:
            return self._kth(k) if k < rank else value if k == rank else self._kth(k - 1)

        return _lerp(kth(below), kth(math.ceil(position)), weight)


def history_of(values: list[float], size: int | None) -> NormHistory:
    """A history of ``size`` (None: unbounded) holding ``values`` in order."""
    history = NormHistory(size)
    for value in values:
        history.append(value)
    return history


class AutoClipHistories:
    """AutoClip's state: the norms of the steps that ran, one history over the global norm or
    (``per_group``) one per parameter group; a step's norms join when its optimizer step runs."""

    def __init__(self, size: int | None, per_group: bool, history: NormHistory | None = None,
                 group_histories: list[NormHistory] | None = None) -> None:
        self.size = size
        self.per_group = per_group
        self.history = NormHistory(size) if history is None else history
        self.group_histories = [] if group_histories is None else group_histories

    def for_groups(self, groups: int, grow: bool = False) -> list[NormHistory]:
        """The history each group's AutoClip level is read from (the same one under the global norm).

        ``grow``: groups beyond the known ones (added to the optimizer) start empty histories; else
        (AutoClip, whose level a new group's short history would decide) another count raises.
        """
        if not self.per_group:
            return [self.history] * groups
        if grow or not self.group_histories:
            self.group_histories += [NormHistory(self.size) for _ in range(groups - len(self.group_histories))]
        if len(self.group_histories) != groups:
            raise ValueError(f"GradientClipper(norm_scope='group') keeps one history per parameter group: "
                             f"it has {len(self.group_histories)}, this step passed {groups} groups")
        return self.group_histories

    def record(self, norms: list[float]) -> None:
        """A step ran: its finite norms (one, or one per group) join the histories."""
        for history, value in zip(self.group_histories if self.per_group else [self.history], norms):
            if math.isfinite(value):
                history.append(value)

    def digests(self) -> tuple:
        """Length and digest of every history: what ranks compare."""
        return tuple((len(h), h.digest) for h in [self.history, *self.group_histories])

    def restored(self, values: list[float], grouped: list[list[float]]) -> AutoClipHistories:
        """The same kind of histories holding ``values`` (global) and ``grouped`` (per group)."""
        return AutoClipHistories(self.size, self.per_group, history_of(values, self.size),
                                 [history_of(v, self.size) for v in grouped])


def _lerp(low: float, high: float, weight: float) -> float:
    """torch.lerp's formula with its fused multiply-add, rounded once: bitwise ``torch.quantile``."""
    step = high - low
    if weight < 0.5:
        return float(Fraction(low) + Fraction(weight) * Fraction(step))
    return float(Fraction(high) - Fraction(step) * Fraction(1 - weight))


def _mix(digest: int, value: float) -> int:
    bits = struct.unpack("<q", struct.pack("<d", value))[0] & 0xFFFFFFFFFFFFFFFF
    x = (digest ^ bits) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)
