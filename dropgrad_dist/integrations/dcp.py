"""The regularizers' state in ``torch.distributed.checkpoint`` (DCP), as one ``Stateful`` of the app state.

torchtitan's pattern, with the regularizers as one more entry::

    app_state = {"model": ..., "optim": ..., "regularizers": RegularizerState(optimizer)}
    dcp.save(app_state, checkpoint_id=path)      # or dcp.async_save
    dcp.load(app_state, checkpoint_id=path)      # on the same or another layout

DCP pickles every value that is not a tensor (and unpickles it with ``torch.load(weights_only=False)``),
so nothing of ours is a Python value there: the JSON state (:mod:`dropgrad_dist.core.checkpoint`'s
rules) travels as one uint8 tensor of fixed capacity, and restart sums as tensors shaped like their
parameters (DTensors under FSDP2/HSDP, so DCP reshards them). Loading validates everything, agrees
across ranks that every rank accepted its part, and only then applies it.

``get_state_dict``/``get_optimizer_state_dict`` keep only ``state`` and ``param_groups`` of an
optimizer state dict, so they cannot carry the wrappers' entries; building a ``RegularizerState``
over an optimizer chain marks the wrappers' state as carried here, so ``set_state_dict`` loads the
chain without them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..clipping.clipper import GradientClipper
from ..clipping.restarts import Restarter, RestartingOptimizer, _sum_dtype
from ..core import checkpoint as _checkpoint
from ..core.agreement import all_ranks_ok
from ..core.checks import ArgumentTypeError, check_bool, check_int_in
from ..core.wrapper import OptimizerWrapper
from ..ddp.hook import DropGradHookState
from ..layout.names import named_parameters
from ..layout.shards import _is_dtensor, local_tensor
from .accelerate import Regularizers

__all__ = ["DEFAULT_CAPACITY", "RegularizerState"]

DEFAULT_CAPACITY = 1 << 20  # bytes of JSON state: ~50,000 AutoClip norms without history_size
_OWNER = "RegularizerState"


@dataclass
class _Part:
    """One regularizer's state: its plain data, and (with restarts) the model whose parameters the sums follow."""

    name: str
    save: Callable[[], dict[str, Any]]
    prepare: Callable[[Mapping[str, Any], dict[str, torch.Tensor], bool], Callable[[], None]]
    restarter: Restarter | None = None
    model: nn.Module | None = None
    counters: Callable[[Mapping[str, Any]], Any] = lambda state: state  # where the restart counters sit


class RegularizerState:
    """``objects``' state as a DCP ``Stateful``: ``state_dict()`` gives tensors only, ``load_state_dict`` restores.

    Args:
        objects: any of an optimizer chain (``DropGrad``, ``ClippedOptimizer``, ``GradientNormPenalty``/``SAM``,
            ``RestartingOptimizer``, nested), a ``DropGradHookState``, a ``GradientClipper``, a ``Restarter``
            (needs ``model``) or a ``Regularizers`` handle; at most one of each kind.
        model: the model a standalone ``Restarter`` sums (its sums are keyed by canonical names).
        strict: a checkpoint of another configuration raises (False: keep this run's, take the progress, warn).
        capacity: bytes of the JSON state's tensor, the same on save and load (DCP loads a tensor
            only into one of its saved size). Saving refuses a state that does not fit.
        process_group: the ranks that agree that every rank accepted the checkpoint (default: the world).

    Saved: ``{"state": uint8[capacity], "sums": {part: {parameter: tensor}}}``; sums only with restarts,
    zeros while no snapshot is counted (DCP needs the same keys at every save and load).
    """

    def __init__(self, *objects: Any, model: nn.Module | None = None, strict: bool = True,
                 capacity: int = DEFAULT_CAPACITY, process_group: dist.ProcessGroup | None = None) -> None:
        if not objects:
            raise ArgumentTypeError("RegularizerState needs at least one object: an optimizer chain, a "
                                    "DropGradHookState, a GradientClipper, a Restarter or a Regularizers handle")
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.strict = check_bool(strict, "strict")
        self.capacity = check_int_in(capacity, "capacity", _checkpoint.STATE_TENSOR_HEADER + 2,
                                     _checkpoint.MAX_JSON_BYTES + _checkpoint.STATE_TENSOR_HEADER)
        self.process_group = process_group
        self._warned_full = False
        self._parts: dict[str, _Part] = {}
        for index, obj in enumerate(objects):
            for part in _parts_of(obj, model, f"objects[{index}]"):
                if part.name in self._parts:
                    raise ValueError(f"RegularizerState: two objects hold {part.name!r} state; pass each once")
                self._parts[part.name] = part

    @property
    def names(self) -> list[str]:
        """The parts carried, e.g. ``["dropgrad", "clipping"]``."""
        return list(self._parts)

    # -- Stateful -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors only: the JSON state (``uint8[capacity]``) and the restart sums (DCP also calls it to load into)."""
        plain = {"format": _checkpoint.FORMAT, "parts": {name: part.save() for name, part in self._parts.items()}}
        tensor = _checkpoint.state_tensor(plain, self.capacity)
        self._warn_if_nearly_full(tensor)
        return {"state": tensor, "sums": {name: _sum_buffers(part) for name, part in self._parts.items()
                                          if part.restarter is not None}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Validate every part on every rank, agree that all ranks accepted, then apply (nothing changes on error)."""
        error, applies = None, []
        try:
            applies = self._prepare(state_dict)
        except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below, then it re-raises
            error = err
        all_ok = all_ranks_ok(error is None, self.process_group)
        if error is not None:
            raise error
        if not all_ok:
            raise ValueError(f"{_OWNER}: another rank refused its part of the regularizer checkpoint (see that "
                             "rank's error); nothing was applied")
        for apply in applies:
            apply()

    def _prepare(self, state_dict: Mapping[str, Any]) -> list[Callable[[], None]]:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise ValueError(f"{_OWNER}: the checkpoint entry has no 'state' tensor")
        state = _checkpoint.read_state_tensor(state_dict["state"], _OWNER, "the checkpoint's 'state' tensor")
        _checkpoint.read_field(state, "format", _check_format, _OWNER)
        parts = _checkpoint.read_field(state, "parts", _check_dict, _OWNER)
        if sorted(parts) != sorted(self._parts):
            raise ValueError(f"{_OWNER}: the checkpoint holds the state of {sorted(parts)}, this run has "
                             f"{sorted(self._parts)}")
        sums = state_dict.get("sums", {})
        applies = []
        for name, part in self._parts.items():
            section = _checkpoint.read_field(parts, name, _check_dict, f"{_OWNER} part")
            restart_sums = {}
            if part.restarter is not None:
                restart_sums = _counted_sums(part.counters(section), sums.get(name) if isinstance(sums, Mapping)
                                             else None, name)
            applies.append(part.prepare(section, restart_sums, self.strict))
        return applies

    def _warn_if_nearly_full(self, tensor: torch.Tensor) -> None:
        used = int.from_bytes(bytes(tensor[:_checkpoint.STATE_TENSOR_HEADER].tolist()), "little")
        if not self._warned_full and used > self.capacity // 2:
            self._warned_full = True
            warnings.warn(f"{_OWNER}: the regularizer state uses {used} of its {self.capacity} bytes; saving will "
                          "refuse it once full. Set history_size on AutoClip, or pass a larger capacity= (the same "
                          "on save and load)", RuntimeWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"RegularizerState({', '.join(self._parts)}, capacity={self.capacity}, strict={self.strict})"


def _parts_of(obj: Any, model: nn.Module | None, argument: str) -> list[_Part]:
    """The parts ``obj`` holds (a chain holds one per wrapper)."""
    if isinstance(obj, Regularizers):
        return [_Part("regularizers", obj.state_dict,
                      lambda state, sums, strict: obj.prepare_state(state, strict, restart_sums=sums),
                      obj.restarter, obj.model, counters=lambda state: state.get("restarts"))]
    if isinstance(obj, DropGradHookState):
        return [_Part("ddp_hook", obj.state_dict, lambda state, sums, strict: obj.prepare_state(state, strict))]
    if isinstance(obj, GradientClipper):
        return [_Part("clipping", obj.state_dict, lambda state, sums, strict: obj.prepare_state(state, strict))]
    if isinstance(obj, Restarter):
        if model is None:
            raise ArgumentTypeError(f"{argument} is a Restarter: pass model= (the model whose parameters it sums)")
        return [_restart_part(obj, model)]
    if isinstance(obj, OptimizerWrapper):
        parts, inner = [], obj
        while isinstance(inner, OptimizerWrapper):
            inner.include_state_in_state_dict = False  # this state travels in RegularizerState
            parts.append(_restart_part(inner.restarter, inner.model) if isinstance(inner, RestartingOptimizer)
                         else _wrapper_part(inner))
            inner = inner.optimizer
        return parts
    raise ArgumentTypeError(f"{argument} must be an optimizer chain of dropgrad_dist wrappers, a DropGradHookState, "
                            f"a GradientClipper, a Restarter or a Regularizers handle, got {type(obj).__name__}")


def _wrapper_part(wrapper: OptimizerWrapper) -> _Part:
    return _Part(wrapper.state_key, wrapper.own_state_dict,
                 lambda state, sums, strict: wrapper.prepare_own_state(state, strict))


def _restart_part(restarter: Restarter, model: nn.Module) -> _Part:
    def save() -> dict[str, Any]:
        return {k: v for k, v in restarter.state_dict().items() if k != "sums"}

    return _Part("restarts", save, lambda state, sums, strict: restarter.prepare_state({**state, "sums": sums},
                                                                                       model, strict),
                 restarter, model)


def _sum_buffers(part: _Part) -> dict[str, torch.Tensor]:
    """Each parameter's restart sum (zeros while none is counted), as a DTensor where the parameter is one."""
    saved = part.restarter.state_dict(part.model)["sums"]
    buffers = {}
    for entry in named_parameters(part.model):
        local = local_tensor(entry.param.detach())
        total = saved.get(entry.key)
        if total is None:
            total = torch.zeros_like(local, dtype=_sum_dtype(local.dtype))
        if _is_dtensor(entry.param):
            from torch.distributed.tensor import DTensor

            total = DTensor.from_local(total, entry.param.device_mesh, entry.param.placements, run_check=False,
                                       shape=entry.param.shape, stride=entry.param.stride())
        buffers[entry.key] = total
    return buffers


def _counted_sums(counters: Any, sums: Any, name: str) -> dict[str, torch.Tensor]:
    """The loaded sums as local tensors if the counters count snapshots, else none (zeros were saved)."""
    count = counters.get("count") if isinstance(counters, Mapping) else None
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return {}  # no snapshot counted (or a malformed count, which the part's own check names)
    if not isinstance(sums, Mapping):
        raise ValueError(f"{_OWNER}: the checkpoint's part {name!r} counts {count} restart snapshots but holds "
                         "no 'sums'")
    return {key: local_tensor(value) if torch.is_tensor(value) else value for key, value in sums.items()}


def _check_format(value: object, argument: str) -> int:
    if value != _checkpoint.FORMAT:
        raise ValueError(f"{argument} is {value!r}; this version reads format {_checkpoint.FORMAT}")
    return _checkpoint.FORMAT


def _check_dict(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{argument} must be a dict, got {type(value).__name__}")
    return value
