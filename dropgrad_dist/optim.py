"""``DropGrad``: an optimizer wrapper that drops gradient coordinates before the step.

At optimizer step ``t`` each masked gradient becomes ``g <- m_t * g / (1 - p)`` with
``m_t`` the seeded mask of :mod:`dropgrad_dist.mask`, then the wrapped optimizer steps.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import mask as _mask
from .params import DropPlan, RateSpec, named_params_of_optimizer
from .checks import check_rate
from .schedules import DropRateScheduler
from .shards import drop_local_, flat_param_starts, local_tensor

__all__ = ["DropGrad"]

_STATE_KEY = "dropgrad"


class DropGrad(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every ``step()`` first applies DropGrad to the gradients.

    Math: ``g_i <- g_i * keep_i(seed, t, key, p) / (1 - p)`` for each coordinate ``i``, where
    ``P(keep) = 1 - p`` exactly (to 2**-32) and ``t`` counts the optimizer steps taken.

    Args:
        optimizer: the optimizer to wrap; ``param_groups`` and ``state`` are shared with it.
        drop_rate: default drop rate ``p`` in [0, 1] for parameters not listed in ``params``
            (None: those are left untouched). A dict here is accepted as ``params``.
        params: per-parameter rates keyed by ``Parameter``, name, module name or glob
            (names need ``model=``); the first matching entry wins.
        drop_rate_scheduler: a schedule giving the default rate per step (instead of ``drop_rate``).
        full_update_drop: step on the full gradient, then drop coordinates of the *update*
            (``w <- w_old + m * (w_new - w_old) / (1 - p)``) with an independent mask stream.
        step_skip_rate: probability ``q`` that a whole step is skipped, decided by ``(seed, t)``.
        seed: the mask seed; masks depend only on (seed, step, parameter name, coordinate, rate).
        model: the model the optimizer's parameters belong to; gives canonical names as mask
            keys (needed to match the DDP hook and FSDP runs, and for name/glob ``params``).
            Without it the key of a parameter is ``"param_groups[g][i]"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        drop_rate: float | RateSpec | None = None,
        params: RateSpec | None = None,
        *,
        drop_rate_scheduler: DropRateScheduler | None = None,
        full_update_drop: bool = False,
        step_skip_rate: float = 0.0,
        seed: int = 0,
        model: nn.Module | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DropGrad):
            raise ValueError("optimizer is already wrapped in DropGrad; wrap the base optimizer once")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.plan = DropPlan(
            named_params_of_optimizer(optimizer.param_groups, model),
            drop_rate,
            params,
            drop_rate_scheduler,
            names_are_canonical=model is not None,
        )
        # FSDP1 (use_orig_params=True): where each parameter's local flat piece starts.
        self._starts = flat_param_starts((entry.param for entry in self.plan.entries), model)
        self.full_update_drop = bool(full_update_drop)
        self.step_skip_rate = check_rate(step_skip_rate, "step_skip_rate")
        self.seed = seed
        self.step_index = 0  # optimizer steps taken: the ``t`` of the masks
        self._masked_grads: dict[int, weakref.ref] = {}  # id(param) -> its gradient masked this step
        self.last_step_skipped = False
        # torch.optim.Optimizer.__init__ would rebind param_groups/state; set up its hooks only.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # -- shared optimizer state: always the wrapped optimizer's current objects --------------
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
    def drop_rate_scheduler(self) -> DropRateScheduler | None:
        return self.plan.scheduler

    @property
    def drop_rate(self) -> float | None:
        """The default drop rate at the current step (from the schedule if there is one)."""
        return self.plan.default_rate()

    # -- the step ------------------------------------------------------------------------------
    def should_skip_step(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) is skipped: ``u(seed, step) < q``."""
        if self.step_skip_rate == 0.0:
            return False
        t = self.step_index if step is None else step
        draw = _mask.uniform_u32(self.seed, t, _mask.MaskStream.SKIP)
        return draw < _mask.keep_threshold(1.0 - self.step_skip_rate)

    def _masked_entries(self, which: str):
        for entry in self.plan.entries:
            tensor = entry.param.grad if which == "grad" else entry.param
            if entry.param.grad is None:
                continue
            rate = self.plan.rate_of(entry)
            if rate > 0.0:
                yield entry, tensor, rate

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Apply this step's gradient masks in place now, e.g. before gradient clipping.

        ``step()`` calls it too; a gradient tensor already masked in this step (then clipped in
        place, say) is not masked again, so calling it first makes clipping see the masked
        gradient, as under the DDP hook. ``zero_grad()`` and ``step()`` forget what was masked.
        """
        for entry, grad, rate in self._masked_entries("grad"):
            local = local_tensor(grad)
            masked = self._masked_grads.get(id(entry.param))
            if masked is not None and masked() is local:
                continue
            drop_local_(grad, key=entry.key, rate=rate, seed=self.seed, step=self.step_index,
                        start=self._starts.get(entry.param, 0))
            self._masked_grads[id(entry.param)] = weakref.ref(local)

    def _step_and_drop_update(self) -> None:
        before = [(entry, param, rate, param.detach().clone())
                  for entry, param, rate in self._masked_entries("param")]
        self.optimizer.step()
        for entry, param, rate, old in before:
            update = param.detach()
            update.sub_(old)
            drop_local_(update, key=entry.key, rate=rate, seed=self.seed, step=self.step_index,
                        stream=_mask.MaskStream.UPDATE, start=self._starts.get(entry.param, 0))
            update.add_(old)

    @torch.no_grad()
    def _masked_step(self) -> None:
        if self.full_update_drop:
            self._step_and_drop_update()
        else:
            self.mask_gradients_()
            self.optimizer.step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Mask (or skip), step the wrapped optimizer, then advance the step count and schedule.

        A ``closure`` is evaluated once, before masking; the wrapped optimizer steps without it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_skipped = self.should_skip_step()
        if not self.last_step_skipped:
            self._masked_step()
        self._masked_grads.clear()
        self.step_index += 1
        self.plan.advance()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._masked_grads.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters are stepped but not masked."""
        self.optimizer.add_param_group(param_group)

    # -- checkpointing ---------------------------------------------------------------------------
    def dropgrad_state_dict(self) -> dict[str, Any]:
        """DropGrad's own state: seed, step count and schedule (enough to resume masks exactly)."""
        scheduler = self.plan.scheduler
        return {
            "seed": self.seed,
            "step_index": self.step_index,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }

    def load_dropgrad_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.step_index = int(state_dict["step_index"])
        if state_dict.get("scheduler") is not None and self.plan.scheduler is not None:
            self.plan.scheduler.load_state_dict(state_dict["scheduler"])

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus DropGrad's own state under ``"dropgrad"``."""
        state_dict = self.optimizer.state_dict()
        state_dict[_STATE_KEY] = self.dropgrad_state_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if own is not None:
            self.load_dropgrad_state_dict(own)

    def __repr__(self) -> str:
        return (f"DropGrad(drop_rate={self.plan.drop_rate}, scheduler={self.plan.scheduler!r}, "
                f"seed={self.seed}, step_index={self.step_index}, full_update_drop={self.full_update_drop}, "
                f"step_skip_rate={self.step_skip_rate}, masked_params={len(self.plan.entries)},\n"
                f"  optimizer={self.optimizer!r})")
