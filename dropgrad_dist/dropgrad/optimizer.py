"""``DropGrad``: an optimizer wrapper that drops gradient coordinates before the step.

At optimizer step ``t`` each masked gradient becomes ``g <- m_t * g / (1 - p)`` with
``m_t`` the seeded mask of :mod:`dropgrad_dist.mask`, then the wrapped optimizer steps. The class
keeps the state; :mod:`.step` holds the masking, :mod:`.mask_once` the refusals that keep
each gradient masked once, :mod:`dropgrad_dist.core.forward_check` the agreement check's timing and
:mod:`.plan_state` the checkpoint of the step count and schedule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.agreement import AgreementCheck, PendingCheck
from ..core.checks import ArgumentTypeError, check_rate, check_seed
from ..core.forward_check import ForwardLaunchedCheck, wait
from ..core.ownership import refuse_dropgrad_inside, refuse_hook_masked
from ..core.wrapper import OptimizerWrapper, added_params, missing_state_hint, state_init_step
from ..layout.shards import flat_param_pieces
from ..mask.grad_table import GradTable
from .mask_once import MaskedThisStep
from .plan import DropPlan, PlannedRates, RateSpec, named_params_of_optimizer
from .plan_state import plan_state_dict, read_plan_state
from .schedules import DropRateScheduler
from .step import MaskColumns, mask_columns, mask_grads_, step_and_drop_update, step_skipped

__all__ = ["DropGrad"]


class DropGrad(PlannedRates, OptimizerWrapper):
    """Wrap ``optimizer`` so that every ``step()`` first applies DropGrad to the gradients.

    Math: ``g_i <- g_i * keep_i(seed, t, key, p) / (1 - p)`` for each coordinate ``i``, where
    ``P(keep) = 1 - p`` exactly (to 2**-32) and ``t`` counts the optimizer steps taken.

    Args:
        optimizer: the optimizer to wrap; ``param_groups`` and ``state`` are shared with it.
        drop_rate: default drop rate ``p`` in [0, 1] for parameters not listed in ``params``
            (None: those are left untouched). A dict here is accepted as ``params``. Assignable
            between steps (``optimizer.drop_rate = 0.5``) when no schedule is set.
        params: per-parameter rates keyed by ``Parameter``, name, module name or glob
            (names need ``model=``); the first matching entry wins.
        drop_rate_scheduler: a schedule giving the default rate per step (instead of ``drop_rate``).
        full_update_drop: step on the full gradient, then drop coordinates of the *update*
            (``w <- w_old + m * (w_new - w_old) / (1 - p)``) with an independent mask stream.
        step_skip_rate: probability ``q`` that a whole step is skipped, decided by ``(seed, t)``.
        seed: the mask seed, an int in ``[0, 2**64)``; masks depend only on (seed, step,
            parameter name, coordinate, rate).
        model: the model the optimizer's parameters belong to; gives canonical names as mask
            keys (needed to match the DDP hook and FSDP runs, and for name/glob ``params``).
            Without it the key of a parameter is ``"param_groups[g][i]"``.
        process_group: the ranks that must agree on seed, rates, schedule and step count
            (default: the world). Checked every step when ``torch.distributed`` is initialized;
            with ``model`` the check is launched by each training forward (so that a rank that
            skips a step is named instead of hanging) and waited in ``step()``.

    Parameters of a group added later (:meth:`add_param_group`, e.g. a LoRA adapter) are masked
    like those given at construction: the same default rate and ``params`` entries, applied to
    their keys, so a run that adds a group equals a run that had it from the start.
    """

    state_key = "dropgrad"

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
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        refuse_dropgrad_inside(optimizer, DropGrad)  # through clipping, GNP, restarts, Accelerate
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(optimizer)
        self.seed = check_seed(seed)
        self.model = model
        self.plan = DropPlan(named_params_of_optimizer(optimizer.param_groups, model), drop_rate, params,
                             drop_rate_scheduler, names_allowed=model is not None)
        # FSDP1 (use_orig_params=True): where each parameter's local flat piece starts.
        self._starts = self._flat_starts()
        self.full_update_drop = bool(full_update_drop)
        self.step_skip_rate = check_rate(step_skip_rate, "step_skip_rate")
        self.step_index = 0  # optimizer steps taken: the ``t`` of the masks
        self.last_step_skipped = False
        self._masked = MaskedThisStep()  # what this step masked; the gradients the last step stepped on
        self._table = GradTable()  # the piece table of the gradients, rebuilt when their layout changes
        self._columns: tuple | None = None  # the plan as the table's columns (step.mask_columns)
        for entry in self.plan.entries:
            refuse_hook_masked(entry.param, entry.key)
        self._agreement = AgreementCheck("DropGrad", process_group)
        self._check = ForwardLaunchedCheck(self._agreement, self.agreement_fields, model)

    def _flat_starts(self) -> dict[torch.Tensor, int]:
        pieces = flat_param_pieces((entry.param for entry in self.plan.entries), self.model)
        return {param: piece.start for param, piece in pieces.items()}

    @property
    def drop_rate_scheduler(self) -> DropRateScheduler | None:
        return self.plan.scheduler

    def should_skip_step(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) is skipped: ``u(seed, step) < q``."""
        return step_skipped(self.seed, self.step_index if step is None else step, self.step_skip_rate)

    def agreement_fields(self) -> dict[str, object]:
        """What every rank must hold equally (checked each step under ``torch.distributed``)."""
        scheduler = self.plan.scheduler
        return {"seed": self.seed, "rates": self.plan.config(),
                "options": (self.full_update_drop, self.step_skip_rate), "step_index": self.step_index,
                "schedule position": scheduler.state_dict() if scheduler is not None else None}

    # -- the step ------------------------------------------------------------------------------
    def mask_gradients_(self) -> None:
        """Apply this step's gradient masks in place now, e.g. before gradient clipping.

        ``step()`` calls it too; a gradient tensor already masked in this step (then clipped in
        place, say) is not masked again, so calling it first makes clipping see the masked
        gradient, as under the DDP hook. ``zero_grad()`` and ``step()`` forget what was masked.
        Call it after the last micro-batch's backward: a backward that accumulates into a masked
        gradient would leak into dropped coordinates (``m*s*g1 + g2 != m*s*(g1 + g2)``), so
        ``step()`` then raises instead (detected on parameters that autograd accumulates into:
        one process, DDP; FSDP2 writes sharded gradients itself).
        """
        self._masked.watch_accumulation(self.plan.entries)
        self._mask_now()

    def _mask_columns(self) -> MaskColumns:
        self._columns = mask_columns(self.plan, self._starts, self._columns)
        return self._columns[1]

    def _mask_now(self) -> None:
        mask_grads_(self.plan, self._starts, self._mask_columns(), self._table, self._masked,
                    seed=self.seed, step=self.step_index)

    def _masked_step(self, closure: Callable[[], Any] | None, pending: PendingCheck | None) -> Any:
        if closure is None:
            self._mask_now()
            wait(pending)  # the agreement all-reduce ran while masking
            return self.optimizer.step()
        wait(pending)

        def masked_closure() -> Any:
            # Each evaluation (LBFGS evaluates several) gives fresh gradients: mask them all alike.
            with torch.enable_grad():
                loss = closure()
            self._masked.forget()
            self._mask_now()
            return loss

        return self.optimizer.step(masked_closure)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Mask (or skip), step the wrapped optimizer, then advance the step count and schedule.

        With a ``closure`` (required by e.g. LBFGS) the wrapped optimizer evaluates it and every
        evaluation's gradient gets this step's mask; a skipped step evaluates it once.
        """
        if state_init_step(self.param_groups, closure):  # torch creating the optimizer state: not a step
            return self.optimizer.step()
        # Both refusals come before this step's own collectives (a forward's check may be in flight:
        # every rank launched it, and the next forward waits for it).
        self._masked.refuse_leaked_accumulation()
        if closure is None:
            self._masked.refuse_second_step(self.plan.entries, self.step_index)
        pending = self._check.take()
        skipped = self.should_skip_step()
        try:
            if skipped:
                wait(pending)
                with torch.enable_grad():
                    loss = closure() if closure is not None else None
            elif self.full_update_drop:
                wait(pending)
                loss = step_and_drop_update(self.optimizer, closure, self.plan, self._starts, seed=self.seed,
                                            step=self.step_index)
            else:
                loss = self._masked_step(closure, pending)
        finally:
            self._masked.forget()
        self.last_step_skipped = skipped
        self._masked.stamp_step(self.plan.entries if closure is None else None)
        self.step_index += 1
        self.plan.advance()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._masked.forget()
        super().zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and mask its parameters from the next step on.

        Their keys are their canonical names with ``model=`` (they must be the model's parameters),
        else ``"param_groups[g][i]"`` with ``g`` the new group's index; the default rate and the
        ``params`` entries given at construction apply to them. The plan's configuration changes, so
        every rank must add the same group, and a checkpoint saved before the addition is refused
        (strict) with a message saying how to load it.
        """
        params = added_params(param_group)
        named = named_params_of_optimizer([{"params": params}], self.model, first_group=len(self.param_groups))
        for item in named:
            refuse_hook_masked(item.param, item.key)
        super().add_param_group({**param_group, "params": params})  # torch refuses a parameter given twice
        self.plan.add(named)
        self._starts = self._flat_starts()

    # -- checkpointing (rules: dropgrad_dist.core.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.plan.config(), "full_update_drop": self.full_update_drop,
                "step_skip_rate": self.step_skip_rate}

    def own_state_dict(self) -> dict[str, Any]:
        """DropGrad's own state: step count and schedule position (progress), and its configuration."""
        return plan_state_dict(self.plan, self.step_index, self._config())

    def dropgrad_state_dict(self) -> dict[str, Any]:
        """Alias of :meth:`own_state_dict` (save it beside a sharded optimizer state dict)."""
        return self.own_state_dict()

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            if strict:
                raise ValueError("DropGrad.load_state_dict: the state dict has no 'dropgrad' entry (it was saved "
                                 "from the bare optimizer, so the mask step count is unknown). Load it into "
                                 "dropgrad.optimizer and restore DropGrad with load_dropgrad_state_dict(), or pass "
                                 "strict=False to restart the masks at step 0. " + missing_state_hint("dropgrad"))
            warnings.warn("DropGrad.load_state_dict: no 'dropgrad' entry; masks restart at step 0 (strict=False)",
                          RuntimeWarning, stacklevel=3)
            return lambda: None
        progress = read_plan_state("DropGrad", state, self.plan, self._config(), strict)

        def apply() -> None:
            progress.apply_schedule(self.plan)
            self.step_index = progress.step_index
            self._masked.forget()

        return apply

    def load_dropgrad_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore DropGrad's own state (from :meth:`dropgrad_state_dict`); validated before any change."""
        self.load_own_state_dict(state_dict, strict)

    def __repr__(self) -> str:
        return (f"DropGrad(drop_rate={self.plan.drop_rate}, scheduler={self.plan.scheduler!r}, "
                f"seed={self.seed}, step_index={self.step_index}, full_update_drop={self.full_update_drop}, "
                f"step_skip_rate={self.step_skip_rate}, masked_params={len(self.plan.entries)},\n"
                f"  optimizer={self.optimizer!r})")
