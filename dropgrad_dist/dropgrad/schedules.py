"""Drop-rate schedules: the drop rate ``p(t)`` as a function of the optimizer step count ``t``.

A schedule reports the rate for the current step with :meth:`get_drop_rate` and advances
with :meth:`step`; ``DropGrad`` and the DDP hook call :meth:`step` once per optimizer step
that actually ran. ``state_dict``/``load_state_dict`` make resume exact.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Mapping
from typing import Any

from ..core.checkpoint import read_field
from ..core.checks import ArgumentTypeError, check_count, check_int_in, check_rate

__all__ = [
    "CosineAnnealingDropRateScheduler",
    "DropRateScheduler",
    "LinearDropRateScheduler",
    "StepDropRateScheduler",
]


class DropRateScheduler(abc.ABC):
    """Base class: subclasses implement :meth:`rate_at` (the rate at step count ``t``)."""

    def __init__(self) -> None:
        self.step_count = 0

    @abc.abstractmethod
    def rate_at(self, t: int) -> float:
        """The drop rate at step count ``t``."""

    def get_drop_rate(self) -> float:
        """The drop rate for the current step count."""
        return self.rate_at(self.step_count)

    def step(self) -> None:
        """Advance the step count by one."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> int:
        """Validate a state dict of this schedule; returns its step count (nothing is assigned)."""
        return read_field(state_dict, "step_count", check_count, type(self).__name__)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.step_count = self.check_state_dict(state_dict)

    def config(self) -> tuple:
        """What defines the schedule (compared across ranks by the DDP hook)."""
        return (type(self).__name__,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.config()[1:]}(step_count={self.step_count})"


class _AnnealingScheduler(DropRateScheduler):
    """From ``initial_drop_rate`` at ``t = 0`` to ``final_drop_rate`` at ``t >= num_steps``."""

    def __init__(self, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> None:
        super().__init__()
        self.initial_drop_rate = check_rate(initial_drop_rate, "initial_drop_rate")
        self.final_drop_rate = check_rate(final_drop_rate, "final_drop_rate")
        self.num_steps = check_int_in(num_steps, "num_steps", 1)

    def rate_at(self, t: int) -> float:
        if t >= self.num_steps:
            return self.final_drop_rate
        return self._anneal(t / self.num_steps)

    @abc.abstractmethod
    def _anneal(self, progress: float) -> float:
        """The rate at ``progress = t / num_steps`` in [0, 1)."""

    def config(self) -> tuple:
        return (type(self).__name__, self.initial_drop_rate, self.final_drop_rate, self.num_steps)


class LinearDropRateScheduler(_AnnealingScheduler):
    """``p(t) = initial + (final - initial) * t / num_steps`` for ``t < num_steps``, then ``final``."""

    def _anneal(self, progress: float) -> float:
        return self.initial_drop_rate + (self.final_drop_rate - self.initial_drop_rate) * progress


class CosineAnnealingDropRateScheduler(_AnnealingScheduler):
    """``p(t) = final + (initial - final) * (1 + cos(pi * t / num_steps)) / 2`` for ``t < num_steps``,
    then ``final``."""

    def _anneal(self, progress: float) -> float:
        cosine = 1.0 + math.cos(math.pi * progress)
        return self.final_drop_rate + 0.5 * (self.initial_drop_rate - self.final_drop_rate) * cosine


class StepDropRateScheduler(DropRateScheduler):
    """``p(t)`` is the rate of the largest key ``<= t`` in ``drop_rate_schedule``, else ``initial``.

    ``drop_rate_schedule`` maps step counts to rates, e.g. ``{1000: 0.05, 5000: 0.0}``.
    """

    def __init__(self, initial_drop_rate: float, drop_rate_schedule: Mapping[int, float]) -> None:
        super().__init__()
        self.initial_drop_rate = check_rate(initial_drop_rate, "initial_drop_rate")
        if not isinstance(drop_rate_schedule, Mapping):
            raise ArgumentTypeError(
                f"drop_rate_schedule must be a mapping {{step: rate}}, got {type(drop_rate_schedule).__name__}"
            )
        schedule = {}
        for t, rate in drop_rate_schedule.items():
            step = check_int_in(t, "drop_rate_schedule keys (step counts)", 0)
            schedule[step] = check_rate(rate, f"drop_rate_schedule[{step}]")
        self.drop_rate_schedule = dict(sorted(schedule.items()))

    def rate_at(self, t: int) -> float:
        rate = self.initial_drop_rate
        for boundary, boundary_rate in self.drop_rate_schedule.items():
            if boundary > t:
                break
            rate = boundary_rate
        return rate

    def config(self) -> tuple:
        return (type(self).__name__, self.initial_drop_rate, tuple(self.drop_rate_schedule.items()))


def read_schedule_state(owner: str, state_dict: Mapping[str, Any], scheduler: Any, strict: bool) -> Mapping | None:
    """The checkpoint's schedule state for ``scheduler`` (validated, nothing assigned), or None.

    A checkpoint with schedule state loaded where no schedule is set, or the reverse, raises when
    ``strict``; otherwise it warns and the schedule (if any) keeps its position.
    """
    schedule_state = state_dict.get("scheduler")
    if (schedule_state is None) != (scheduler is None):
        detail = (f"checkpoint {'has' if schedule_state is not None else 'has no'} drop_rate_scheduler state, "
                  f"this run {'has' if scheduler is not None else 'has no'} drop_rate_scheduler")
        if strict:
            raise ValueError(f"{owner}: {detail}; build it like the run that saved it, or pass strict=False")
        warnings.warn(f"{owner}: {detail}; the schedule keeps its position (strict=False)",
                      RuntimeWarning, stacklevel=4)
        return None
    if schedule_state is not None and isinstance(scheduler, DropRateScheduler):
        scheduler.check_state_dict(schedule_state)
    return schedule_state
