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
    if strict:
        _refuse_other_parameters(owner, saved_config, config)
    _checkpoint.check_config(owner, saved_config, config, strict)
    return PlanProgress(step_index, read_schedule_state(owner, state, plan.scheduler, strict))


def _keys(config: object) -> set[str] | None:
    """The mask keys a configuration's ``params`` field lists (None: not a readable list)."""
    entries = config.get("params") if isinstance(config, Mapping) else None
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, (list, tuple)) and e for e in entries):
        return None
    return {str(entry[0]) for entry in entries}


def _refuse_other_parameters(owner: str, saved_config: object, config: Mapping[str, Any]) -> None:
    """A checkpoint that masks a subset or a superset of this run's parameters was saved before or after
    a parameter group was added (``add_param_group``): say so, and how to load it."""
    saved, current = _keys(saved_config), _keys(config)
    if saved is None or current is None or saved == current:
        return
    if saved < current:
        added = sorted(current - saved)
        raise ValueError(f"{owner}: the checkpoint was saved before the parameters {added[:4]}"
                         f"{' ...' if len(added) > 4 else ''} were masked (a group added by add_param_group "
                         "after it was saved?). Load it before adding that group, then add the group; or load "
                         "with strict=False to keep this run's plan and take only the checkpoint's progress")
    if saved > current:
        missing = sorted(saved - current)
        raise ValueError(f"{owner}: the checkpoint also masks {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         "which this run does not (a group added by add_param_group before it was saved?). Add "
                         "the same group (add_param_group) before loading")
