"""Checkpoints and pickling of a :class:`~dropgrad_dist.DropGradHookState` (rules: :mod:`.checkpoint`).

A state dict holds progress (``step_index``, the schedule's position, the byte counters) and the
configuration (seed, communication, rates) as plain data; loading validates all of it before
anything changes. Pickling keeps the plan's arguments and the state dict but not the process
group or the model (like ``PowerSGDState``): ``state.register(ddp_model)`` binds it again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import checkpoint as _checkpoint
from .checks import check_count
from .schedules import read_schedule_state

__all__ = ["hook_config", "hook_state_dict", "plan_spec", "prepare_hook_state"]

_OWNER = "DropGradHookState"
_COUNTERS = ("bytes_communicated", "bytes_dense_equivalent")


def hook_config(state: Any) -> dict[str, Any]:
    """What a checkpoint must agree with: seed, communication and the plan's rates."""
    return {"seed": state.seed, "communication": state.communication, **state.plan.config()}


def hook_state_dict(state: Any) -> dict[str, Any]:
    """Step count, schedule position, byte counters and configuration, as plain data."""
    scheduler = state.plan.scheduler
    return _checkpoint.plain({
        "format": _checkpoint.FORMAT,
        "step_index": state.step_index,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "bytes_communicated": state.bytes_communicated,
        "bytes_dense_equivalent": state.bytes_dense_equivalent,
        "config": hook_config(state),
    })


def prepare_hook_state(state: Any, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
    """Validate ``state_dict`` completely against ``state`` and return what applies it (nothing fails then)."""
    step_index = _checkpoint.read_field(state_dict, "step_index", check_count, _OWNER)
    counters = [_checkpoint.read_field({"n": state_dict.get(name, 0)}, "n", check_count, f"{_OWNER} {name}")
                for name in _COUNTERS]
    saved_config = state_dict.get("config", {"seed": state_dict.get("seed")})
    _checkpoint.check_config(_OWNER, saved_config, hook_config(state), strict)
    scheduler = state.plan.scheduler
    scheduler_state = read_schedule_state(_OWNER, state_dict, scheduler, strict)

    def apply() -> None:
        if scheduler_state is not None:
            scheduler.load_state_dict(scheduler_state)  # a duck-typed schedule validates here
        state.step_index = step_index
        state.bytes_communicated, state.bytes_dense_equivalent = counters
        state.rounds.reset()

    return apply


def plan_spec(plan: Any) -> dict[str, Any]:
    """The plan's arguments (a pickled state rebuilds its plan from them on the model it is registered on)."""
    return {"drop_rate": plan.drop_rate,
            "params": {e.key: e.fixed_rate for e in plan.entries if e.fixed_rate is not None},
            "scheduler": plan.scheduler}
