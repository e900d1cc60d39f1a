"""The checkpoint of a masking plan's progress: the step count ``t`` and the schedule's position.

What masks by a :class:`~dropgrad_dist.dropgrad.plan.DropPlan` saves ``step_index`` (the ``t`` of its
masks), the schedule's state and its configuration (rules: :mod:`dropgrad_dist.core.checkpoint`).
:func:`read_plan_state` validates all of it before anything changes and returns the progress
to apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ..core import checkpoint as _checkpoint
from ..core.checks import check_count
from .plan import DropPlan
from .schedules import read_schedule_state

__all__ = ["PlanProgress", "plan_state_dict", "read_plan_state"]


class PlanProgress(NamedTuple):
    """Validated progress read from a checkpoint."""

    step_index: int
    scheduler_state: Mapping[str, Any] | None  # None: the schedule (if any) keeps its position

    def apply_schedule(self, plan: DropPlan) -> None:
        """Move the plan's schedule to the saved position (a duck-typed schedule validates here)."""
        if self.scheduler_state is not None:
            plan.scheduler.load_state_dict(self.scheduler_state)


def plan_state_dict(plan: DropPlan, step_index: int, config: Mapping[str, Any],
                    **counters: int) -> dict[str, Any]:
    """``{"format", "step_index", "scheduler", **counters, "config"}`` as plain data."""
    scheduler = plan.scheduler
    return _checkpoint.plain({
        "format": _checkpoint.FORMAT,
        "step_index": step_index,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **counters,
        "config": dict(config),
    })


def read_plan_state(owner: str, state: Mapping[str, Any], plan: DropPlan, config: Mapping[str, Any],
                    strict: bool) -> PlanProgress:
    """Validate ``state`` against the plan and ``config`` (the object's configuration); nothing changes.

    Raises:
        ValueError: a malformed field, or (``strict``) a configuration or schedule that differs.
    """
    step_index = _checkpoint.read_field(state, "step_index", check_count, owner)
    # A state without "config" is compared as one holding only its seed: refused when strict.
    saved_config = state.get("config", {"seed": state.get("seed")})
    _checkpoint.check_config(owner, saved_config, config, strict)
    return PlanProgress(step_index, read_schedule_state(owner, state, plan.scheduler, strict))
