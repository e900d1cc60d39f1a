"""Launching collectives from hooks without tripping gloo at interpreter exit.

A gloo work keeps its tensors and the launching thread's thread-local state, and a gloo worker
thread drops it after running it. When either holds a Python object (a tensor created in Python,
the ``contextvars.Context`` that backward stashes in thread-local state), that drop takes the GIL;
if it falls into interpreter finalization, after a script's last collective, taking the GIL aborts
the process ("terminate called without an active exception", about one run in fifty of a short
script on a loaded machine). Two rules keep the library's own collectives out of it: launch them
without backward's Context (:func:`without_backward_context`), and keep a reference to every CPU
tensor handed to gloo until the owner's next launch (:class:`SentTensors`), so that the last
reference is dropped by the owner's thread, or never for owners that live to the end.
Collectives the library does not launch (Accelerate's gathers, FSDP's reduce-scatters) stay exposed;
a distributed script that has written everything can end with :func:`exit_skipping_finalization`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import torch

__all__ = ["SentTensors", "exit_skipping_finalization", "without_backward_context"]

# The key under which torch's backward stashes a contextvars.Context in C++ thread-local state.
_BACKWARD_CONTEXT_KEY = "context"


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


def exit_skipping_finalization(code: int = 0) -> NoReturn:
    """Flush stdout and stderr, then end the process with ``code`` without interpreter finalization.

    For the very end of a distributed script, once every file is written and closed and the process
    group destroyed: no gloo worker thread can then abort the exit. ``atexit`` handlers do not run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
