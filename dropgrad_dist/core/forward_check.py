"""An agreement check launched by each training forward of a model and waited by the step.

Every rank runs the model's forward, including a rank that will skip ``step()``, so a check
launched there keeps the collectives paired: a stale step count meets the others' at the next
check (and is named) instead of pairing with FSDP's or DDP's own collectives (a hang). The step
waits for the check its iteration's forward launched, overlapping it with the masking; without
a forward since the last step it launches its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .agreement import AgreementCheck, PendingCheck

__all__ = ["ForwardLaunchedCheck", "wait"]


def wait(pending: PendingCheck | None) -> None:
    """Wait for ``pending`` (None: no check in flight); raises if the ranks disagree."""
    if pending is not None:
        pending.wait()


class ForwardLaunchedCheck:
    """Runs ``check`` over ``fields()`` from each training forward of ``model`` (if given) and at the step.

    Attributes:
        check: the agreement check (who checks, over which process group).
        pending: the check launched by the last training forward and not yet taken by a step.
    """

    def __init__(self, check: AgreementCheck, fields: Callable[[], Mapping[str, object]],
                 model: nn.Module | None) -> None:
        self.check = check
        # Weakly: the owner holds this object, and a strong reference back would keep it alive in a cycle.
        self._fields = weakref.WeakMethod(fields) if hasattr(fields, "__self__") else (lambda: fields)
        self.pending: PendingCheck | None = None
        if model is not None:
            handle = model.register_forward_pre_hook(_launch_at_forward(weakref.ref(self)))
            weakref.finalize(self, handle.remove)

    def launch(self) -> None:
        """Launch this iteration's check (from the forward; every rank runs it).

        The check of a previous forward that no step took (a skipped step, an accumulation
        micro-batch) is waited first: it has completed on every rank.
        """
        if not self.check.active:
            return
        previous, self.pending = self.pending, None
        wait(previous)
        self.pending = self.check.start(self._fields()())

    def take(self, launch_if_none: bool = True) -> PendingCheck | None:
        """The check for this step: the one the forward launched, else (``launch_if_none``) one launched now.

        None: the check is inactive, or nothing is in flight and ``launch_if_none`` is False.
        """
        pending, self.pending = self.pending, None
        if pending is None and launch_if_none:  # no training forward through the model since the last step
            pending = self.check.start(self._fields()())
        return pending


def _launch_at_forward(check_ref: weakref.ref[ForwardLaunchedCheck]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        forward_check = check_ref()
        # Training forwards only: an evaluation forward may run on some ranks alone.
        if forward_check is not None and module.training and torch.is_grad_enabled():
            forward_check.launch()
    return hook
