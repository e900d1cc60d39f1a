"""The DDP hook's guard against compounding masks: a backward onto gradients a round already masked.

A round masks the synchronized gradient ``m*s*g``. Another backward before any optimizer step
consumed it would mask the sum again (``m*s*(m*s*g1 + g2) != m*s*(g1 + g2)``). A gradient pre-hook
on every masked parameter raises when a backward starts while a closed round is unconsumed and the
parameter still holds a non-zero gradient.

Those pre-hooks exist only while it can happen. A round can be left unconsumed only at its end
(``Rounds.held``), and every backward that DDP synchronizes follows a forward of the model, so a
forward pre-hook on the model installs the parameters' pre-hooks when it finds a round held, and
removes them at the first forward after an optimizer step consumed it. A training step that steps
after every synchronized backward runs no Python per parameter (a thousand pre-hooks cost about
2.5 ms of CPU a step); the non-zero test (a device sync) runs only in the held case, e.g. right
after a GradScaler skip.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .rounds import Rounds

__all__ = ["HeldGradientGuard"]

_HELD = ("DropGrad DDP hook: gradients were synchronized (and masked) and are still accumulated "
         "in .grad without an optimizer step in between. Accumulating gradients across "
         "synchronized micro-batches is not supported (masks would compound); accumulate "
         "inside model.no_sync() (or accelerator.accumulate()), or call optimizer.zero_grad() "
         "after a skipped step")


class HeldGradientGuard:
    """Forward pre-hooks on the watched modules; per-parameter gradient pre-hooks while ``rounds.held``.

    Public counter: ``installs`` (times the per-parameter pre-hooks were installed).
    """

    def __init__(self, owner: object, rounds: Rounds, params: Iterable[torch.Tensor]) -> None:
        self.installs = 0
        self._rounds = rounds
        self._params = [weakref.ref(param) for param in params]
        self._modules: set[int] = set()
        # Shared with the finalizer: every handle goes when the owner does (tensor hooks outlive it otherwise).
        self._module_handles: list[Any] = []
        self._param_handles: list[Any] = []
        weakref.finalize(owner, _remove_all, self._module_handles, self._param_handles)

    def watch(self, module: nn.Module) -> None:
        """Check ``rounds.held`` before every forward of ``module`` (once per module)."""
        if id(module) in self._modules:
            return
        self._modules.add(id(module))
        this = weakref.ref(self)
        self._module_handles.append(module.register_forward_pre_hook(lambda _module, _args: _before(this)))

    def before_forward(self) -> None:
        """Install the per-parameter pre-hooks if a round is held, remove them once none is."""
        if self._rounds.held and not self._param_handles:
            self.installs += 1
            for ref in self._params:
                param = ref()
                if param is not None:
                    self._param_handles.append(param.register_hook(_check(self._rounds, ref)))
        elif self._param_handles and not self._rounds.held:
            _remove_all(self._param_handles)


def _before(guard_ref: weakref.ref[HeldGradientGuard]) -> None:
    guard = guard_ref()
    if guard is not None:
        guard.before_forward()


def _check(rounds: Rounds, param_ref: weakref.ref) -> Callable[[torch.Tensor], None]:
    def check(grad: torch.Tensor) -> None:
        if rounds.held:  # a closed round no optimizer step consumed yet
            param = param_ref()
            if param is not None and param.grad is not None and bool(param.grad.detach().ne(0).any()):
                raise RuntimeError(_HELD)
    return check


def _remove_all(*handle_lists: list) -> None:
    for handles in handle_lists:
        while handles:
            handles.pop().remove()
