"""The DDP hook's guard against compounding masks: a backward onto gradients a round already masked.

A round masks the synchronized gradient ``m*s*g``. Another synchronizing backward before any
optimizer step consumed it would mask the sum again (``m*s*(m*s*g1 + g2) != m*s*(g1 + g2)``). A
gradient pre-hook on every masked parameter raises when a backward starts while a closed round
is unconsumed and the parameter still holds a non-zero gradient. The common case (no unconsumed
round) costs one attribute test per parameter (``rounds.held``); the non-zero test (a device sync) runs only in the
rare case, e.g. right after a GradScaler skip.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch

from .rounds import Rounds

__all__ = ["guard_held_gradients"]

_HELD = ("DropGrad DDP hook: gradients were synchronized (and masked) and are still accumulated "
         "in .grad without an optimizer step in between. Accumulating gradients across "
         "synchronized micro-batches is not supported (masks would compound); accumulate "
         "inside model.no_sync() (or accelerator.accumulate()), or call optimizer.zero_grad() "
         "after a skipped step")


def guard_held_gradients(owner: object, rounds: Rounds, params: Iterable[torch.Tensor]) -> None:
    """Install the pre-hook on every parameter; the hooks are removed when ``owner`` is collected."""
    handles = [param.register_hook(_check(rounds, weakref.ref(param))) for param in params]
    # Tensor hooks outlive the state otherwise: drop them when it goes away.
    weakref.finalize(owner, _remove_all, handles)


def _check(rounds: Rounds, param_ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def check(grad: torch.Tensor) -> None:
        if rounds.held:  # a closed round no optimizer step consumed yet
            param = param_ref()
            if param is not None and param.grad is not None and bool(param.grad.detach().ne(0).any()):
                raise RuntimeError(_HELD)
    return check


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()
