"""Counting the optimizer steps that ran, for state that is not itself the optimizer.

The DDP hook and a standalone ``GradientClipper`` act before the step but must advance their
step count ``t`` only when the step really runs: a step that ``GradScaler`` skips never calls
``optimizer.step()``. A :class:`StepWatch` is *armed* by the event that precedes a step (a
synchronizing backward, a clip) and fires its callback once, after the first optimizer step
over the watched parameters that follows (a global ``torch.optim`` step post-hook sees every
``Optimizer.step()``); a wrapper and its inner optimizer, or two optimizers over parts of the
model, stepping the same gradients fire it once. With ``count_all`` it also counts every such
step, so ranks can compare how many ``step()`` calls they made.

A :class:`GradientStamp` tells whether gradients changed since a moment, and whether the
other inputs of what was computed from them (a clip's options) are still the same: a repeated
clip or step on the very same gradients with the same inputs is then recognized without any
communication.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Hashable, Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..layout.shards import local_grads

__all__ = ["GradientStamp", "StepWatch"]


class StepWatch:
    """Calls ``on_step()`` once per :meth:`arm`, after the next optimizer step over ``params``."""

    def __init__(self, params: Iterable[torch.Tensor], on_step: Callable[[], None], *, count_all: bool = False) -> None:
        self.armed = False
        # With count_all: every optimizer step over the watched parameters, armed or not (a wrapper
        # and its inner optimizer count two), so ranks can compare how many steps they took.
        self.steps = 0
        self._count_all = count_all
        self._ids = {id(p) for p in params}
        self._on_step = weakref.WeakMethod(on_step) if hasattr(on_step, "__self__") else (lambda: on_step)
        this = weakref.ref(self)
        _remove_dead_hooks()
        handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: _stepped(this, optimizer))
        # The hook registry is global: remove the hook once the watch is gone. Not from the finalizer itself:
        # a garbage collection inside an optimizer step would mutate the registry torch is iterating over.
        weakref.finalize(self, _dead_hooks.append, handle)

    def watch(self, params: Iterable[torch.Tensor]) -> None:
        """Replace the watched parameters."""
        self._ids = {id(p) for p in params}

    def arm(self) -> None:
        """The next optimizer step over the watched parameters fires ``on_step``."""
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def _holds_watched(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._ids for group in optimizer.param_groups for p in group["params"])

    def _fire(self, optimizer: torch.optim.Optimizer) -> None:
        if not (self.armed or self._count_all) or not self._holds_watched(optimizer):
            return
        self.steps += 1
        if not self.armed:
            return
        self.armed = False
        callback = self._on_step()
        if callback is not None:
            callback()


_dead_hooks: list = []  # handles of the step hooks of collected watches (their hooks do nothing)


def _remove_dead_hooks() -> None:
    while _dead_hooks:
        _dead_hooks.pop().remove()


def _stepped(watch_ref: weakref.ref[StepWatch], optimizer: torch.optim.Optimizer) -> None:
    watch = watch_ref()
    if watch is not None:
        watch._fire(optimizer)


class GradientStamp:
    """Which gradient tensors some parameters hold and their in-place version counters, at one moment,
    and the other ``inputs`` that decided what was computed from them.

    Equal gradients (no backward, zeroing or in-place change touched them in between) and equal
    ``inputs`` mean that what was computed from them (a mask applied, a clip) is still current.
    ``inputs`` is whatever besides the gradients the result depends on (a clip's method, levels,
    ``beta``, ``p_autoclip``, grouping), compared with ``==``: the caller lists all of it, or a
    changed option would return a stale result. Tensors are held weakly, so a new gradient that
    reuses a freed one's memory never compares equal.
    """

    def __init__(self, params: Iterable[torch.Tensor], inputs: Hashable = None) -> None:
        self._refs, self._versions, self._holes = _refs_and_versions(local_grads(params))
        self._inputs = inputs

    def unchanged(self, params: Iterable[torch.Tensor], inputs: Hashable = None) -> bool:
        """Whether ``params`` hold the very gradients of this stamp, unmodified (and at least one), and
        ``inputs`` equals the stamp's."""
        if inputs != self._inputs:
            return False
        locals_ = local_grads(params)
        if len(locals_) != len(self._refs) or self._versions.count(None) == len(self._versions):  # none held
            return False
        _, versions, _ = _refs_and_versions(locals_, weak=False)
        if versions != self._versions:  # also differs where a gradient appeared or vanished
            return False
        held = [None if ref is None else ref() for ref in self._refs] if self._holes else map(operator.call, self._refs)
        return all(map(operator.is_, held, locals_))


_get_version = operator.attrgetter("_version")


def _refs_and_versions(locals_: list[torch.Tensor | None], weak: bool = True) -> tuple[list, list, bool]:
    """Weak references (if ``weak``) and version counters of ``locals_``, and whether any is None.

    Without a None, one ``map`` over C callables each: no Python frame per tensor (every step stamps
    every gradient).
    """
    if type(None) not in set(map(type, locals_)):
        return (list(map(weakref.ref, locals_)) if weak else []), list(map(_get_version, locals_)), False
    refs = [None if t is None else weakref.ref(t) for t in locals_] if weak else []
    return refs, [None if t is None else t._version for t in locals_], True
