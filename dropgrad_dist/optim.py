"""``DropGrad``: an optimizer wrapper that drops gradient coordinates before the step.

At optimizer step ``t`` each masked gradient becomes ``g <- m_t * g / (1 - p)`` with
``m_t`` the seeded mask of :mod:`dropgrad_dist.mask`, then the wrapped optimizer steps.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as _checkpoint
from . import mask as _mask
from . import ownership as _ownership
from .agreement import AgreementCheck, PendingCheck
from .checks import ArgumentTypeError, check_count, check_rate, check_seed
from .mask.grad_table import GradTable
from .ownership import refuse_dropgrad_inside, refuse_hook_masked
from .params import DropPlan, PlannedRates, RateSpec, named_params_of_optimizer
from .schedules import DropRateScheduler, read_schedule_state
from .shards import drop_locals_, flat_param_pieces, local_tensor
from .steps import GradientStamp
from .wrapper import OptimizerWrapper

__all__ = ["DropGrad"]


def _wait(pending: PendingCheck | None) -> None:
    if pending is not None:
        pending.wait()


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
        self.plan = DropPlan(named_params_of_optimizer(optimizer.param_groups, model), drop_rate, params,
                             drop_rate_scheduler, names_allowed=model is not None)
        # FSDP1 (use_orig_params=True): where each parameter's local flat piece starts.
        pieces = flat_param_pieces((entry.param for entry in self.plan.entries), model)
        self._starts = {param: piece.start for param, piece in pieces.items()}
        self.full_update_drop = bool(full_update_drop)
        self.step_skip_rate = check_rate(step_skip_rate, "step_skip_rate")
        self.step_index = 0  # optimizer steps taken: the ``t`` of the masks
        # id(param) -> the local gradient tensor masked this step (held until the step or zero_grad).
        self._masked_grads: dict[int, torch.Tensor] = {}
        self._table = GradTable()  # the piece table of the gradients, rebuilt when their layout changes
        self._columns: tuple | None = None  # ((entries, default rate), (params, keys, rates, starts, ids))
        self._accumulation_watched = False  # post-accumulate hooks installed (after an early mask)
        self._accumulated_after_mask: str | None = None  # key of a gradient a backward added to after masking
        self._stepped_on: GradientStamp | None = None  # the gradients the last step masked and stepped on
        for entry in self.plan.entries:
            refuse_hook_masked(entry.param, entry.key)
        self.last_step_skipped = False
        self._agreement = AgreementCheck("DropGrad", process_group)
        self._pending: PendingCheck | None = None  # the check launched by the last training forward
        if model is not None:
            handle = model.register_forward_pre_hook(_check_at_forward(weakref.ref(self)))
            weakref.finalize(self, handle.remove)

    @property
    def drop_rate_scheduler(self) -> DropRateScheduler | None:
        return self.plan.scheduler

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
            if entry.param.grad is None:
                continue
            rate = self.plan.rate_of(entry)
            if rate > 0.0:
                yield entry, (entry.param.grad if which == "grad" else entry.param), rate

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
        self._watch_accumulation()
        self._mask_now()

    def _watch_accumulation(self) -> None:
        """After an early mask, note any backward that accumulates into a masked gradient."""
        if self._accumulation_watched:
            return
        self._accumulation_watched = True
        this = weakref.ref(self)
        for entry in self.plan.entries:
            if entry.param.requires_grad:  # hooks outlive the wrapper otherwise
                handle = entry.param.register_post_accumulate_grad_hook(_accumulation_check(this, entry.key))
                weakref.finalize(self, handle.remove)

    def _accumulated(self, param: torch.Tensor, key: str) -> None:
        if id(param) in self._masked_grads and self._accumulated_after_mask is None:
            self._accumulated_after_mask = key

    def _refuse_leaked_accumulation(self) -> None:
        if self._accumulated_after_mask is not None:
            key, self._accumulated_after_mask = self._accumulated_after_mask, None
            self._masked_grads.clear()
            raise RuntimeError(
                f"DropGrad: a backward accumulated into the gradient of {key!r} after mask_gradients_() masked it "
                "in this step; the step would leak the later micro-batches into dropped coordinates. Call "
                "mask_gradients_() (or clip) only after the last micro-batch's backward")

    def _table_columns(self) -> tuple[list, list[str], list[float], list[int], list[int]]:
        """``(params, keys, rates, starts, ids)`` of the masked entries: the same objects while the plan
        and the default rate are unchanged (the piece table compares them by identity)."""
        entries, default = self.plan.entries, self.plan.default_rate()
        if self._columns is None or self._columns[0][0] is not entries or self._columns[0][1] != default:
            params = [entry.param for entry in entries]
            columns = (params, [entry.key for entry in entries], [self.plan.rate_of(entry) for entry in entries],
                       [self._starts.get(entry.param, 0) for entry in entries], [id(param) for param in params])
            self._columns = ((entries, default), columns)
        return self._columns[1]

    @torch.no_grad()
    def _mask_now(self) -> None:
        self._refuse_leaked_accumulation()
        if not self._masked_grads:  # nothing masked yet in this step: every gradient through the cached table
            params, keys, rates, starts, ids = self._table_columns()
            grads = [param.grad for param in params]
            if _ownership._MASKED_BY_HOOK:
                for param, key, grad, rate in zip(params, keys, grads, rates):
                    if grad is not None and rate > 0.0:
                        refuse_hook_masked(param, key)
            done = self._table.drop_(grads, keys, rates, starts, seed=self.seed, step=self.step_index)
            if done is not None:
                positions, locals_ = done
                self._masked_grads = {ids[k]: locals_[k] for k in positions}
                return
        todo = []
        for entry, grad, rate in self._masked_entries("grad"):
            local = local_tensor(grad)
            if self._masked_grads.get(id(entry.param)) is local:
                continue
            refuse_hook_masked(entry.param, entry.key)
            todo.append((grad, entry.key, rate, self._starts.get(entry.param, 0)))
            self._masked_grads[id(entry.param)] = local
        drop_locals_(todo, seed=self.seed, step=self.step_index)  # one engine call for every gradient

    def _step_and_drop_update(self, closure: Callable[[], Any] | None) -> Any:
        before = [(entry, param, rate, param.detach().clone())
                  for entry, param, rate in self._masked_entries("param")]
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        with torch.no_grad():
            updates = [param.detach() for _, param, _, _ in before]
            torch._foreach_sub_(updates, [old for *_, old in before])
            drop_locals_([(update, entry.key, rate, self._starts.get(entry.param, 0))
                          for update, (entry, _, rate, _) in zip(updates, before)],
                         seed=self.seed, step=self.step_index, stream=_mask.MaskStream.UPDATE)
            torch._foreach_add_(updates, [old for *_, old in before])
        return loss

    def _masked_step(self, closure: Callable[[], Any] | None, pending: PendingCheck | None) -> Any:
        if closure is None:
            self._mask_now()
            _wait(pending)  # the agreement all-reduce ran while masking
            return self.optimizer.step()
        _wait(pending)

        def masked_closure() -> Any:
            # Each evaluation (LBFGS evaluates several) gives fresh gradients: mask them all alike.
            with torch.enable_grad():
                loss = closure()
            self._masked_grads.clear()
            self._mask_now()
            return loss

        return self.optimizer.step(masked_closure)

    def _check_at_forward(self) -> None:
        """Launch this iteration's agreement check from the model's forward (every rank runs it).

        A rank that skips ``step()`` still issues this collective, so its stale step count meets
        the others' at the next check instead of pairing with FSDP's or DDP's own collectives (a
        hang). The check of a previous forward that no step waited for (a skipped step, an
        accumulation micro-batch) is waited first: it has completed on every rank.
        """
        if not self._agreement.active:
            return
        previous, self._pending = self._pending, None
        _wait(previous)
        self._pending = self._agreement.start(self.agreement_fields())

    def agreement_fields(self) -> dict[str, object]:
        """What every rank must hold equally (checked each step under ``torch.distributed``)."""
        scheduler = self.plan.scheduler
        return {"seed": self.seed, "rates": self.plan.config(),
                "options": (self.full_update_drop, self.step_skip_rate), "step_index": self.step_index,
                "schedule position": scheduler.state_dict() if scheduler is not None else None}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Mask (or skip), step the wrapped optimizer, then advance the step count and schedule.

        With a ``closure`` (required by e.g. LBFGS) the wrapped optimizer evaluates it and every
        evaluation's gradient gets this step's mask; a skipped step evaluates it once.
        """
        # Both refusals come before this step's own collectives (a forward's check may be in flight:
        # every rank launched it, and the next forward waits for it).
        self._refuse_leaked_accumulation()
        if closure is None:
            self._refuse_second_step_on_the_same_gradients()
        pending, self._pending = self._pending, None
        if pending is None:  # no training forward through model= since the last step: check here
            pending = self._agreement.start(self.agreement_fields())
        skipped = self.should_skip_step()
        try:
            if skipped:
                _wait(pending)
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
            elif self.full_update_drop:
                _wait(pending)
                loss = self._step_and_drop_update(closure)
            else:
                loss = self._masked_step(closure, pending)
        finally:
            self._masked_grads.clear()
            self._accumulated_after_mask = None
        self.last_step_skipped = skipped
        self._stepped_on = GradientStamp(self._masked_params()) if closure is None else None
        self.step_index += 1
        self.plan.advance()
        return loss

    def _masked_params(self) -> list[torch.Tensor]:
        return [entry.param for entry in self.plan.entries]

    def _refuse_second_step_on_the_same_gradients(self) -> None:
        """A step on the gradients the previous step already masked would mask them again (and, on one
        rank of a distributed run, send one collective more than the others: a hang, not an error)."""
        if self._stepped_on is not None and self._stepped_on.unchanged(self._masked_params()):
            raise RuntimeError(
                f"DropGrad.step() called again (step {self.step_index}) on the gradients that step "
                f"{self.step_index - 1} already masked and stepped on, with no backward in between: they would be "
                "masked twice. Compute new gradients (backward) before every step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._masked_grads.clear()
        self._accumulated_after_mask = None
        super().zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters are stepped but not masked."""
        super().add_param_group(param_group)

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.plan.config(), "full_update_drop": self.full_update_drop,
                "step_skip_rate": self.step_skip_rate}

    def own_state_dict(self) -> dict[str, Any]:
        """DropGrad's own state: step count and schedule position (progress), and its configuration."""
        scheduler = self.plan.scheduler
        return _checkpoint.plain({
            "format": _checkpoint.FORMAT,
            "step_index": self.step_index,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "config": self._config(),
        })

    def dropgrad_state_dict(self) -> dict[str, Any]:
        """Alias of :meth:`own_state_dict` (save it beside a sharded optimizer state dict)."""
        return self.own_state_dict()

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            if strict:
                raise ValueError("DropGrad.load_state_dict: the state dict has no 'dropgrad' entry (it was saved "
                                 "from the bare optimizer, so the mask step count is unknown). Load it into "
                                 "dropgrad.optimizer and restore DropGrad with load_dropgrad_state_dict(), or pass "
                                 "strict=False to restart the masks at step 0")
            warnings.warn("DropGrad.load_state_dict: no 'dropgrad' entry; masks restart at step 0 (strict=False)",
                          RuntimeWarning, stacklevel=3)
            return lambda: None
        owner = "DropGrad"
        step_index = _checkpoint.read_field(state, "step_index", check_count, owner)
        saved_config = state.get("config", {"seed": state.get("seed")})  # dropgrad-dist 0.1 kept only the seed
        _checkpoint.check_config(owner, saved_config, self._config(), strict)
        scheduler = self.plan.scheduler
        scheduler_state = read_schedule_state(owner, state, scheduler, strict)

        def apply() -> None:
            if scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)  # a duck-typed schedule validates here
            self.step_index = step_index
            self._masked_grads.clear()

        return apply

    def load_dropgrad_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore DropGrad's own state (from :meth:`dropgrad_state_dict`); validated before any change."""
        self.load_own_state_dict(state_dict, strict)

    def __repr__(self) -> str:
        return (f"DropGrad(drop_rate={self.plan.drop_rate}, scheduler={self.plan.scheduler!r}, "
                f"seed={self.seed}, step_index={self.step_index}, full_update_drop={self.full_update_drop}, "
                f"step_skip_rate={self.step_skip_rate}, masked_params={len(self.plan.entries)},\n"
                f"  optimizer={self.optimizer!r})")


def _accumulation_check(dropgrad_ref: weakref.ref[DropGrad], key: str) -> Callable[[torch.Tensor], None]:
    def check(param: torch.Tensor) -> None:
        dropgrad = dropgrad_ref()
        if dropgrad is not None:
            dropgrad._accumulated(param, key)
    return check


def _check_at_forward(dropgrad_ref: weakref.ref[DropGrad]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        dropgrad = dropgrad_ref()
        # Training forwards only: an evaluation forward may run on some ranks alone.
        if dropgrad is not None and module.training and torch.is_grad_enabled():
            dropgrad._check_at_forward()
    return hook
