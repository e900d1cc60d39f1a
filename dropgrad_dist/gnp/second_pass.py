"""What the second (perturbed) pass of GNP/SAM must leave as the first pass left it: RNG and BatchNorm statistics.

GNP/SAM evaluates the same batch twice. The two evaluations must differ only in ``theta``:

- **random state**: the second pass replays the first pass's CPU and CUDA generator states, so
  dropout (and any other sampling) sees the same sub-network; afterwards the generators are where
  the first pass left them, so the user's random stream continues as after one plain forward. An
  engine that runs a step's micro-batches itself records each with the state it started from
  (:class:`MicroBatches`): the second pass replays each from its own state, whatever the engine
  drew between them;
- **BatchNorm running statistics** (``running_mean``, ``running_var``, ``num_batches_tracked`` of
  every ``_BatchNorm``, ``SyncBatchNorm`` included): restored after the second pass, so they are
  updated once per step, from the unperturbed parameters, as in a plain step. This needs the
  model: parameters do not know their modules, and a BatchNorm without ``affine`` has none.
  Without ``model=``, :class:`BatchNormProbe` watches the first two-pass step's second pass and
  warns once if a BatchNorm module updated its statistics there, naming the fix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ["BatchNormProbe", "BatchNormSnapshot", "MicroBatches", "RngState", "replaying"]


class RngState:
    """The CPU generator's state and, where CUDA is initialized, every CUDA device's."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if cuda else []

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in enumerate(self.cuda):
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def replaying(before: RngState | None) -> Iterator[None]:
    """Run the block from the random state ``before``; afterwards the state is what it was on entry."""
    if before is None:
        yield
        return
    after = RngState()
    before.restore()
    try:
        yield
    finally:
        after.restore()


class MicroBatches:
    """A step's micro-batches in the order the first pass ran them, each with the random state it started from."""

    def __init__(self, replay_rng: bool) -> None:
        self._replay_rng = replay_rng
        self._items: list[tuple[Any, RngState | None]] = []

    def record(self, micro_batch: Any) -> None:
        """Keep ``micro_batch`` (what runs it again) and the random state now, as it starts."""
        self._items.append((micro_batch, RngState() if self._replay_rng else None))

    def replay(self, run: Callable[[Any, bool], Any]) -> None:
        """``run(micro_batch, last)`` for each in order, each from its recorded random state; afterwards
        the state is what it was on entry."""
        for index, (micro_batch, before) in enumerate(self._items):
            with replaying(before):
                run(micro_batch, index == len(self._items) - 1)


def _running_buffers(model: nn.Module | None) -> list[torch.Tensor]:
    if model is None:
        return []
    buffers = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            buffers += [b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                        if b is not None]
    return buffers


class BatchNormSnapshot:
    """A copy of ``model``'s BatchNorm running statistics; :meth:`restore` writes it back (bitwise)."""

    def __init__(self, model: nn.Module | None) -> None:
        self._buffers = _running_buffers(model)
        self._saved = [b.detach().clone() for b in self._buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in zip(self._buffers, self._saved):
            buffer.copy_(value)


def _updates_statistics(module: nn.Module) -> bool:
    """Whether a forward of ``module`` now moves BatchNorm running statistics (momentum 0, davda54/sam's
    ``disable_running_stats``, leaves them)."""
    return (isinstance(module, _BatchNorm) and module.training and module.track_running_stats
            and module.momentum != 0)


class BatchNormProbe:
    """Without the model: notes the BatchNorm modules that update their running statistics between its
    creation and :meth:`restore` (the second pass), through a global module forward pre-hook held only
    that long; :meth:`restore` removes the hook and warns if there were any (the statistics stay updated)."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._seen: dict[str, None] = {}
        self._handle = register_module_forward_pre_hook(self._see)

    def _see(self, module: nn.Module, args: object) -> None:
        if _updates_statistics(module):
            self._seen[type(module).__name__] = None

    def restore(self) -> None:
        self._handle.remove()
        if self._seen:
            warnings.warn(f"{self._owner}(bn_stats_from_first_pass=True) cannot keep the BatchNorm running "
                          f"statistics without model=: the second (perturbed) pass updated those of "
                          f"{', '.join(self._seen)} too (num_batches_tracked advances by 2 per step). Pass "
                          "model=your_model, or bn_stats_from_first_pass=False to let both passes update them",
                          UserWarning, stacklevel=2)
