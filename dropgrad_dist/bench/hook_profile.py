"""Where a DDP step's hook time goes: seconds inside the hook and its parts, per thread that runs them.

:func:`timed_parts` wraps, for the duration of a ``with`` block, the pieces of
:func:`~dropgrad_dist.dropgrad_hook` that are not the wire: the round's opening (launching the
agreement check), the wait for that check (compact, after packing the first bucket), the pack
of the kept coordinates and the mask, all on the backward thread, and the unpack, which runs in
gloo's completion callback. A benchmark reads :attr:`Parts.seconds` around the steps it times;
``hook`` is the whole hook call on the backward thread (the parts it contains plus launching the
all-reduce).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..ddp import hook as ddp_hook
from ..mask import SegmentTable

__all__ = ["Parts", "timed_parts"]

# (owner, attribute, part name): what is timed
_TARGETS = (
    (ddp_hook.DropGradHookState, "begin_bucket", "open round"),
    (ddp_hook.DropGradHookState, "settle_round", "agreement wait (compact)"),
    (SegmentTable, "pack", "pack"),
    (SegmentTable, "drop_", "mask (dense)"),
    (SegmentTable, "unpack_", "unpack (callback)"),
)


class Parts:
    """Seconds spent per part since the last :meth:`reset` (thread-safe: the unpack runs on gloo's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        with self._lock:
            self.seconds = {}

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)
        return wrapper


@contextlib.contextmanager
def timed_parts() -> Iterator[Parts]:
    """Time the hook's parts (and, through :meth:`Parts.timed`, a hook itself) inside the block."""
    parts = Parts()
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in _TARGETS]
    try:
        for (owner, attr, name), (_, _, fn) in zip(_TARGETS, originals):
            setattr(owner, attr, parts.timed(name, fn))
        yield parts
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
