"""The clipper's checkpoint: step count, AutoClip histories and configuration as plain data.

Rules (:mod:`dropgrad_dist.core.checkpoint`): plain data, no pickle; a state is read and validated
whole before anything changes; a different configuration raises unless ``strict=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..core import checkpoint as _checkpoint
from ..core.checks import ArgumentTypeError, check_count
from .history import AutoClipHistories

__all__ = ["clipper_state", "read_clipper_state"]

OWNER = "GradientClipper"


def clipper_state(step_index: int, histories: AutoClipHistories, config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"format", "step_index", "history", "group_histories", "config"}`` as plain data."""
    return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": step_index,
                              "history": list(histories.history.values),
                              "group_histories": [list(h.values) for h in histories.group_histories],
                              "config": dict(config)})


def read_clipper_state(state_dict: Mapping[str, Any], config: Mapping[str, Any], strict: bool,
                       histories: AutoClipHistories) -> tuple[int, AutoClipHistories]:
    """The step count and the histories ``state_dict`` holds, validated against ``config``; changes nothing."""
    step_index = _checkpoint.read_field(state_dict, "step_index", check_count, OWNER)
    values = _checkpoint.read_field(state_dict, "history", _check_history, OWNER)
    _checkpoint.check_config(OWNER, _checkpoint.read_field(state_dict, "config", _check_dict, OWNER),
                             dict(config), strict)
    grouped = (_checkpoint.read_field(state_dict, "group_histories", _check_histories, OWNER)
               if "group_histories" in state_dict else [])
    return step_index, histories.restored(values, grouped)


def _check_history(value: object, argument: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v >= 0 for v in value):
        raise ValueError(f"{argument} must be a list of finite non-negative norms")
    return [float(v) for v in value]


def _check_histories(value: object, argument: str) -> list[list[float]]:
    if not isinstance(value, list):
        raise ArgumentTypeError(f"{argument} must be a list of per-group norm lists")
    return [_check_history(item, f"{argument}[{i}]") for i, item in enumerate(value)]


def _check_dict(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict, got {type(value).__name__}")
    return value
