"""The base of the optimizer step wrappers (DropGrad, clipping, gradient norm penalty).

A wrapper is a real ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
``defaults`` *are* the wrapped optimizer's (properties, not copies), so ``GradScaler``, LR
schedulers, ``accelerator.prepare`` and torch's optimizer hooks work on it. Wrappers nest;
each adds its own state to ``state_dict()`` under :attr:`OptimizerWrapper.state_key`, and
``load_state_dict`` validates its own part before the inner optimizer loads, then applies it,
so an error anywhere leaves every wrapper unchanged.

``torch.distributed.checkpoint.state_dict`` creates a fresh optimizer's state by calling
``step()`` at learning rate 0 on zero gradients; :func:`state_init_step` recognizes that call so
that wrappers step only the base optimizer then, and count nothing (a mask step, a clipping step,
a restart snapshot taken there would shift every later mask).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..layout.shards import local_grads
from .checks import ArgumentTypeError

__all__ = ["OptimizerWrapper", "added_params", "missing_state_hint", "state_init_step"]


def state_init_step(param_groups: list[dict[str, Any]], closure: Callable[[], Any] | None) -> bool:
    """True for torch's optimizer-state initialization: ``step()`` without closure, every learning
    rate 0 and every gradient present and all zero (``torch.distributed.checkpoint.state_dict``).

    The learning rates are read first: a training step at a nonzero rate costs no gradient pass.
    """
    if closure is not None or any(float(group.get("lr", 0.0)) != 0.0 for group in param_groups):
        return False
    grads = local_grads([p for group in param_groups for p in group["params"]])
    return all(g is not None and not bool(g.any()) for g in grads)


def missing_state_hint(key: str) -> str:
    """What to do when a state dict lacks a wrapper's entry ``key`` (e.g. it came through DCP)."""
    return (f"torch.distributed.checkpoint's get_state_dict/get_optimizer_state_dict keep only 'state' and "
            f"'param_groups', so its optimizer state dicts never carry {key!r}: put "
            "dropgrad_dist.integrations.dcp.RegularizerState(optimizer) into the DCP app_state (it carries the "
            "regularizers' state and lets this optimizer load without the entry)")


class OptimizerWrapper(torch.optim.Optimizer):
    """Shares ``param_groups``/``state``/``defaults`` with ``optimizer`` and adds a step of its own.

    Subclasses set :attr:`state_key` and implement :meth:`own_state_dict`,
    :meth:`prepare_own_state` (validate, return a callable that applies) and ``step``.
    """

    state_key: ClassVar[str]

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        # False when the state is checkpointed elsewhere (the Accelerate integration's JSON file).
        self.include_state_in_state_dict = True
        # torch.optim.Optimizer.__init__ would rebind param_groups/state; set up its hooks only.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # -- shared optimizer state: always the wrapped optimizer's current objects -------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The innermost optimizer (the one that updates the parameters; an LR scheduler may be built on it)."""
        inner = self.optimizer
        while isinstance(inner, OptimizerWrapper):
            inner = inner.optimizer
        return inner

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (a wrapper that acts on parameters overrides this to take it in)."""
        self.optimizer.add_param_group(param_group)

    # -- checkpointing ------------------------------------------------------------------------------
    def own_state_dict(self) -> dict[str, Any]:
        """This wrapper's state (plain data)."""
        raise NotImplementedError

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        """Validate ``state`` (None: absent from the checkpoint) and return what applies it."""
        raise NotImplementedError

    def load_own_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load this wrapper's own state (validated first; nothing changes on error)."""
        self.prepare_own_state(state, strict)()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus this wrapper's own state under :attr:`state_key`."""
        state_dict = self.optimizer.state_dict()
        if self.include_state_in_state_dict:
            state_dict[self.state_key] = self.own_state_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Load the wrapped optimizer's state and this wrapper's own (``strict``: see :mod:`.checkpoint`)."""
        state_dict = dict(state_dict)
        own = state_dict.pop(self.state_key, None)
        apply = self.prepare_own_state(own, strict) if self.include_state_in_state_dict else (lambda: None)
        if isinstance(self.optimizer, OptimizerWrapper):
            self.optimizer.load_state_dict(state_dict, strict=strict)
        else:
            self.optimizer.load_state_dict(state_dict)
        apply()


def added_params(param_group: object) -> list[torch.Tensor]:
    """The parameters of a group given to ``add_param_group`` as a list (torch accepts one tensor or an iterable)."""
    if not isinstance(param_group, Mapping) or "params" not in param_group:
        raise ArgumentTypeError(f"add_param_group takes a dict with a 'params' entry, got {type(param_group).__name__}")
    params = param_group["params"]
    return [params] if isinstance(params, torch.Tensor) else list(params)
