"""Restarts from the averaged iterate (torch-clip's ``Restarter``), shard-local and checkpointable.

After every optimizer step the current parameters are added to a running sum (one buffer per
parameter: the local shard under FSDP, so no communication) and counted. When the current
period ends (``period`` steps since the last restart) the parameters become the exact mean of
the snapshots, ``theta <- sum / count``, the optimizer's state is reset, and the period grows
by ``restart_coeff``. Once the period exceeds ``max_steps`` no more restarts happen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import checkpoint as _checkpoint
from ..core.agreement import AgreementCheck
from ..core.checks import SEED_LIMIT, check_count, check_int_in, check_number_in, real_scalar, shown
from ..core.wrapper import OptimizerWrapper, state_init_step
from ..layout.names import named_parameters
from ..layout.shards import local_tensor

__all__ = ["Restarter", "RestartingOptimizer"]


def _check_coeff(value: object) -> float:
    number = real_scalar(value)
    if number is None or not 1.0 <= number < math.inf:
        raise ValueError(f"restart_coeff must be a finite number >= 1, got {shown(value)}")
    return number


def _sum_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a parameter's running sum: float64 for float64 parameters, else float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class Restarter:
    """Restart the parameters from the mean of the iterates since the last restart.

    Math: ``theta <- (1 / n) * sum_{k=1..n} theta_k`` over the ``n`` steps of the period, then
    ``period <- period * restart_coeff``; none once ``period > max_steps``.

    Use: after each optimizer step, ``restarter.step(model, optimizer)`` (True on the step it
    restarted). torch-clip's ``add_coords(params)`` + ``make_restart(model, optimizer)`` are the
    two halves of ``step``. ``state_dict()`` holds the counters and the sums (tensors: save with
    ``torch.save``, load with ``torch.load(..., weights_only=True)``).
    """

    def __init__(self, first_restart_steps: int = 50, restart_coeff: float = 1.25, max_steps: int = 2000, *,
                 process_group: dist.ProcessGroup | None = None) -> None:
        self.first_restart_steps = check_int_in(first_restart_steps, "first_restart_steps", 1, SEED_LIMIT)
        self.restart_coeff = _check_coeff(restart_coeff)
        self.max_steps = check_int_in(max_steps, "max_steps", 1, SEED_LIMIT)
        # The last period reached is below max_steps * restart_coeff: it must stay a finite float,
        # or restarts would stop on an infinite period that no checkpoint can hold.
        if not math.isfinite(float(max(self.max_steps, self.first_restart_steps)) * self.restart_coeff):
            raise ValueError(f"restart_coeff={restart_coeff!r} with max_steps={self.max_steps} would grow the "
                             "period past the float range; use a smaller restart_coeff")
        self.period = float(self.first_restart_steps)
        self.count = 0
        self.restarts = 0
        self._sums: list[torch.Tensor] | None = None
        self._agreement = AgreementCheck("Restarter", process_group)

    @property
    def active(self) -> bool:
        """Whether restarts still happen (the period has not exceeded ``max_steps``)."""
        return self.period <= self.max_steps

    @torch.no_grad()
    def add_coords(self, params: Iterable[torch.Tensor]) -> None:
        """Add the current parameters to the running sum (torch-clip's name)."""
        if not self.active:
            return
        locals_ = [local_tensor(p.detach()) for p in params]
        if self._sums is None:
            self._sums = [torch.zeros_like(p, dtype=_sum_dtype(p.dtype)) for p in locals_]
        if len(locals_) != len(self._sums):
            raise ValueError(f"add_coords got {len(locals_)} parameters, earlier calls {len(self._sums)}")
        torch._foreach_add_(self._sums, [p.to(s.dtype) for p, s in zip(locals_, self._sums)])
        self.count += 1

    @torch.no_grad()
    def make_restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Restart if the period has ended (torch-clip's name); returns ``optimizer`` (reset in place)."""
        self.restart_if_due(model, optimizer)
        return optimizer

    @torch.no_grad()
    def restart_if_due(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Set the parameters to the mean and reset ``optimizer`` if the period has ended."""
        self._agreement.check({"config": tuple(self._config().items()), "count": self.count,
                               "period": self.period, "restarts": self.restarts})
        if not self.active or not self.due() or self._sums is None:
            return False
        params = [local_tensor(p.detach()) for p in model.parameters()]
        if len(params) != len(self._sums):
            raise ValueError("the model's parameters are not the ones add_coords summed")
        for param, total in zip(params, self._sums):
            param.copy_(total / self.count)
        optimizer.state.clear()  # moments, momentum buffers and step counts restart with the iterate
        self._sums = None
        self.count = 0
        self.restarts += 1
        self.period = self.next_period()
        return True

    def due(self) -> bool:
        """Whether the period has ended: ``count >= period``."""
        return self.count >= self.period

    def next_period(self) -> float:
        """The period after a restart: ``period * restart_coeff``."""
        return self.period * self.restart_coeff

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """After an optimizer step: add the iterate, restart if the period ended. True if it restarted."""
        self.add_coords(model.parameters())
        return self.restart_if_due(model, optimizer)

    # -- checkpointing (rules: dropgrad_dist.core.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"first_restart_steps": self.first_restart_steps, "restart_coeff": self.restart_coeff,
                "max_steps": self.max_steps, "schedule": "period"}

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Counters (plain data) and ``"sums"``: the running sums, keyed by canonical names via ``model``."""
        names = [item.key for item in named_parameters(model)] if model is not None else None
        sums = {} if self._sums is None else {
            (names[i] if names else str(i)): total.clone() for i, total in enumerate(self._sums)}
        plain = _checkpoint.plain({"format": _checkpoint.FORMAT, "count": self.count, "period": self.period,
                                   "restarts": self.restarts, "config": self._config()})
        return {**plain, "sums": sums}

    def load_state_dict(self, state_dict: Mapping[str, Any], model: nn.Module | None = None,
                        strict: bool = True) -> None:
        """Restore counters and sums (validated first; nothing changes on error)."""
        self.prepare_state(state_dict, model, strict)()

    def prepare_state(self, state_dict: Mapping[str, Any], model: nn.Module | None,
                      strict: bool) -> Callable[[], None]:
        """Validate ``state_dict`` completely and return what applies it.

        The sums must be one per parameter of ``model``, each finite, of the parameter's local
        (shard) shape and of its sum dtype (float64 for float64 parameters, else float32); they
        are moved to the parameter's device. Without ``model`` only dtype and finiteness are checked.
        """
        owner = "Restarter"
        count = _checkpoint.read_field(state_dict, "count", check_count, owner)
        restarts = _checkpoint.read_field(state_dict, "restarts", check_count, owner)
        period = _checkpoint.read_field(state_dict, "period", _check_period, owner)
        _checkpoint.check_config(owner, _checkpoint.read_field(state_dict, "config", _check_config_dict, owner),
                                 self._config(), strict)
        sums = _checkpoint.read_tensor_field(state_dict, "sums", _check_sums, owner)
        if sums and count == 0:
            raise ValueError(f"{owner} checkpoint field 'sums' holds {len(sums)} sums but field 'count' is 0 "
                             "(sums exist only while snapshots are counted)")
        if count and not sums:
            raise ValueError(f"{owner} checkpoint field 'count' counts {count} snapshots but field 'sums' is empty")
        ordered = _ordered_sums(sums, model, owner) if sums else None

        def apply() -> None:
            self.count, self.restarts, self.period, self._sums = count, restarts, period, ordered

        return apply

    def __repr__(self) -> str:
        return (f"Restarter(first_restart_steps={self.first_restart_steps}, restart_coeff={self.restart_coeff}, "
                f"max_steps={self.max_steps}, period={self.period}, count={self.count}, restarts={self.restarts})")


def _check_period(value: object, argument: str) -> float:
    # Finite and >= 1: an infinite period would stop restarts silently and make every later save fail.
    return check_number_in(value, argument, 1.0, math.inf, high_open=True)


def _check_config_dict(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{argument} must be a dict, got {type(value).__name__}")
    return value


def _check_sums(value: object, argument: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        raise ValueError(f"{argument} must be a dict of parameter name -> tensor")
    for name, total in value.items():
        if total.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{argument}[{name!r}] has dtype {total.dtype}; restart sums are float32 "
                             "(float64 for float64 parameters)")
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"{argument}[{name!r}] holds non-finite values (NaN or inf)")
    return dict(value)


def _ordered_sums(sums: Mapping[str, torch.Tensor], model: nn.Module | None, owner: str) -> list[torch.Tensor]:
    """The sums in the model's parameter order, checked against each parameter and on its device (copies)."""
    params = [(item.key, local_tensor(item.param.detach())) for item in named_parameters(model)] \
        if model is not None else [(str(i), None) for i in range(len(sums))]
    keys = [key for key, _ in params]
    missing = [k for k in keys if k not in sums]
    if missing or len(keys) != len(sums):
        raise ValueError(f"{owner} checkpoint sums do not match the model's parameters "
                         f"(missing {missing[:3]}, {len(sums)} saved, {len(keys)} here)")
    ordered = []
    for key, param in params:
        total = sums[key]
        if param is not None:
            where = f"{owner} checkpoint field 'sums'[{key!r}]"
            if total.shape != param.shape:
                raise ValueError(f"{where} has shape {tuple(total.shape)}, the parameter (this rank's shard) "
                                 f"{tuple(param.shape)}")
            if total.dtype != _sum_dtype(param.dtype):
                raise ValueError(f"{where} has dtype {total.dtype}, expected {_sum_dtype(param.dtype)} for a "
                                 f"{param.dtype} parameter")
            total = total.to(param.device)
        ordered.append(total.clone())
    return ordered


class RestartingOptimizer(OptimizerWrapper):
    """``step()`` steps ``optimizer``, then lets ``restarter`` add the iterate and restart when due."""

    state_key = "restarts"

    def __init__(self, optimizer: torch.optim.Optimizer, restarter: Restarter, model: nn.Module) -> None:
        if not isinstance(restarter, Restarter):
            raise ValueError(f"restarter must be a Restarter, got {type(restarter).__name__}")
        super().__init__(optimizer)
        self.restarter = restarter
        self.model = model
        self.include_state_in_state_dict = False  # sums are tensors: checkpoint them with the restarter

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if state_init_step(self.param_groups, closure):  # torch creating the optimizer state: no snapshot
            return self.optimizer.step()
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.restarter.step(self.model, self.optimizer)
        return loss
