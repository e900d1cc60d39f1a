"""Launching collectives from hooks without tripping gloo at interpreter exit.

A gloo work keeps its tensors and the launching thread's thread-local state, and a gloo worker
thread drops it after running it. When either holds a Python object (a tensor created in Python,
the ``contextvars.Context`` that backward stashes in thread-local state), that drop takes the GIL;
if it falls into interpreter finalization, after a script's last collective, taking the GIL aborts
the process ("terminate called without an active exception", about one run in fifty of a short
script on a loaded machine). The same holds for a Python callback chained on a collective's future:
the worker that completes the future runs it, wakes the threads waiting for the result, and only
then drops the callback, taking the GIL (torch's ``PythonFunctionGuard``); a script that ends right
after its last backward can reach finalization in between. Three rules keep the library's own
collectives out of it: launch them without backward's Context (:func:`without_backward_context`),
keep a reference to every CPU tensor handed to gloo until the owner's next launch
(:class:`SentTensors`), so that the last reference is dropped by the owner's thread, or never for
owners that live to the end, and chain callbacks through :func:`then`, which waits at exit (before
finalization) until the workers have released every callback whose collective completed.
Collectives the library does not launch (Accelerate's gathers, FSDP's reduce-scatters, the
callbacks of torch's own communication hooks) stay exposed; a distributed script that has written
everything can end with :func:`exit_skipping_finalization`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch

__all__ = ["SentTensors", "exit_skipping_finalization", "then", "without_backward_context"]

# The key under which torch's backward stashes a contextvars.Context in C++ thread-local state.
_BACKWARD_CONTEXT_KEY = "context"
# At exit, how long to wait for workers to release the callbacks of completed collectives.
_EXIT_WAIT_S = 10.0


@contextlib.contextmanager
def without_backward_context() -> Iterator[None]:
    """Set backward's Python Context aside while collectives are launched; put it back after.

    Nothing a gradient hook launches needs it (it carries compiler configuration to autograd's
    device threads), and every work launched with it would hold it.
    """
    held = hasattr(torch._C, "_is_key_in_tls") and torch._C._is_key_in_tls(_BACKWARD_CONTEXT_KEY)
    if not held:
        yield
        return
    context = torch._C._get_obj_in_tls(_BACKWARD_CONTEXT_KEY)
    torch._C._remove_obj_from_tls(_BACKWARD_CONTEXT_KEY)
    try:
        yield
    finally:
        torch._C._stash_obj_in_tls(_BACKWARD_CONTEXT_KEY, context)


class SentTensors:
    """References to the CPU tensors an owner handed to asynchronous collectives, until its next launch.

    A view holds a C++ reference to its base, so the gloo worker never drops the last one. CUDA
    tensors are not held (no device memory is kept; NCCL works are not released this way).
    """

    def __init__(self) -> None:
        self._views: list[torch.Tensor] = []

    def hold(self, *tensors: torch.Tensor) -> None:
        """Keep ``tensors`` referenced until :meth:`release`."""
        self._views.extend(t.view_as(t) for t in tensors if t.device.type == "cpu")

    def release(self) -> None:
        """Drop the references: call when the previous collectives have completed."""
        self._views.clear()


class _Callback:
    """A fresh object per chained callback: its death tells that the worker thread has released it."""

    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn: Callable[[torch.futures.Future], Any]) -> None:
        self.fn = fn

    def __call__(self, future: torch.futures.Future) -> Any:
        return self.fn(future)


class _Chains:
    """Callbacks chained by :func:`then`, with their futures, until a worker has released them.

    The returned futures are held too: their value is a Python object, so their last reference
    must not be dropped by a worker thread either.
    """

    def __init__(self) -> None:
        self._live: list[tuple[weakref.ref[_Callback], torch.futures.Future, torch.futures.Future]] = []
        self._at_exit = False

    def add(self, future: torch.futures.Future, fn: Callable[[torch.futures.Future], Any]) -> torch.futures.Future:
        if not self._at_exit:
            atexit.register(self.wait_for_workers)
            self._at_exit = True
        # Released callbacks: their futures are dropped here, by the launching thread.
        self._live = [entry for entry in self._live if entry[0]() is not None]
        callback = _Callback(fn)
        chained = future.then(callback)
        self._live.append((weakref.ref(callback), future, chained))
        return chained

    def pending(self) -> int:
        """Callbacks of completed futures that a worker has not released yet."""
        return sum(1 for ref, future, _ in self._live if ref() is not None and future.done())

    def wait_for_workers(self, timeout: float = _EXIT_WAIT_S) -> None:
        """Sleep (GIL released) until no completed future's callback is held by a worker thread.

        Callbacks of futures that have not completed (a run stopped by an error) are not waited for.
        """
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.001)


_CHAINS = _Chains()


def then(future: torch.futures.Future, fn: Callable[[torch.futures.Future], Any]) -> torch.futures.Future:
    """``future.then(fn)`` for a collective's future: ``fn`` is released by its worker before the interpreter exits.

    An ``atexit`` handler (registered at the first call) waits until every callback whose future
    has completed has been dropped by the thread that ran it; finalization starts only after that.
    """
    return _CHAINS.add(future, fn)


def exit_skipping_finalization(code: int = 0) -> NoReturn:
    """Flush stdout and stderr, then end the process with ``code`` without interpreter finalization.

    For the very end of a distributed script, once every file is written and closed and the process
    group destroyed: no gloo worker thread can then abort the exit. ``atexit`` handlers do not run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
