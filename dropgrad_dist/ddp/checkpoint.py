"""Checkpoints and pickling of a :class:`~dropgrad_dist.DropGradHookState` (rules: :mod:`dropgrad_dist.core`).

A state dict holds progress (``step_index``, the schedule's position, the byte counters) and the
configuration (seed, communication, rates) as plain data; loading validates all of it before
anything changes. Pickling keeps the plan's arguments and the state dict but not the process
group or the model (like ``PowerSGDState``): ``state.register(ddp_model)`` binds it again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..core import checkpoint as _checkpoint
from ..core.checks import check_count
from ..dropgrad.plan_state import plan_state_dict, read_plan_state

__all__ = ["hook_config", "hook_state_dict", "plan_spec", "prepare_hook_state"]

_OWNER = "DropGradHookState"
_COUNTERS = ("bytes_communicated", "bytes_dense_equivalent")


def hook_config(state: Any) -> dict[str, Any]:
    """What a checkpoint must agree with: seed, communication and the plan's rates."""
    return {"seed": state.seed, "communication": state.communication, **state.plan.config()}


def hook_state_dict(state: Any) -> dict[str, Any]:
    """Step count, schedule position, byte counters and configuration, as plain data."""
    return plan_state_dict(state.plan, state.step_index, hook_config(state),
                           **{name: getattr(state, name) for name in _COUNTERS})


def prepare_hook_state(state: Any, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
    """Validate ``state_dict`` completely against ``state`` and return what applies it (nothing fails then)."""
    progress = read_plan_state(_OWNER, state_dict, state.plan, hook_config(state), strict)
    counters = [_checkpoint.read_field({"n": state_dict.get(name, 0)}, "n", check_count, f"{_OWNER} {name}")
                for name in _COUNTERS]

    def apply() -> None:
        progress.apply_schedule(state.plan)
        state.step_index = progress.step_index
        state.bytes_communicated, state.bytes_dense_equivalent = counters
        state.rounds.reset()

    return apply


def plan_spec(plan: Any) -> dict[str, Any]:
    """The plan's arguments (a pickled state rebuilds its plan from them on the model it is registered on)."""
    return {"drop_rate": plan.drop_rate,
            "params": {e.key: e.fixed_rate for e in plan.entries if e.fixed_rate is not None},
            "scheduler": plan.scheduler}
