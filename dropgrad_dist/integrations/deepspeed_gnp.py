"""GNP/SAM under DeepSpeed ZeRO-1/2/3 (through Accelerate): two passes, the first one's DeepSpeed step perturbs.

Under ZeRO the gradient exists only as this rank's flat fp32 partition inside DeepSpeed's optimizer
step, and the model parameters are copies of the fp32 master partitions, refreshed (all-gathered)
at the end of that step. So one ``regularizers.step(closure)`` is:

1. the closure at ``theta``, its ``engine.step()`` standing for DeepSpeed's optimizer step alone
   (no ``global_steps``, LR scheduler or sample count): DeepSpeed forms ``g1`` in the partitions and
   calls the client step, which runs :meth:`GradientNormPenalty.first_step` instead of an update:
   ``||g1||`` summed over the ranks' partitions, ``theta <- theta + e`` on the fp32 master
   (``e = r g1 / ||g1||``, ASAM ``r T^2 g1 / ||T g1||``); DeepSpeed copies it into the model
   (ZeRO-1/2: all-gathered; ZeRO-3: into the parameter partitions gathered at the next forward);
2. the closure again at ``theta + e`` (the first pass's random state replayed), through the
   ordinary ``engine.step()``: the client step runs :meth:`GradientNormPenalty.second_step`:
   ``theta`` restored bitwise, ``g = (1 - alpha) g1 + alpha g2``, then DropGrad's mask, clipping
   and the client update; DeepSpeed copies the updated master into the model.

DeepSpeed's step counters and LR scheduler advance once per step. A step DeepSpeed skips (a
non-finite gradient, an fp16 overflow) is skipped whole: after the first pass nothing moved; after
the second the master is restored and copied back, and no count of ours advances. With
``gradient_accumulation_steps`` > 1 each pass is that many micro-batches, the last one stepping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..gnp.penalty import GradientNormPenalty
from ..gnp.second_pass import RngState, replaying

__all__ = ["ZeroPenaltyPasses", "refresh_model_parameters"]

_FIRST, _SECOND, _PLAIN, _PERTURBED, _DONE = "first", "second", "plain", "perturbed", "done"


class _SkippedStep:
    """A scaler whose ``step`` does not step: :meth:`GradientNormPenalty.second_step` then restores theta
    and counts nothing (DeepSpeed already skipped this step)."""

    @staticmethod
    def step(optimizer: torch.optim.Optimizer) -> None:
        return None

    @staticmethod
    def is_enabled() -> bool:
        return False


class ZeroPenaltyPasses:
    """``g = (1 - alpha) g1 + alpha grad L(theta + e)`` on this rank's ZeRO partitions, then mask, clip, update.

    ``penalty``: the :class:`GradientNormPenalty` over the partitions (its inner step masks, clips
    and updates); ``zero_step``: DeepSpeed's optimizer step (not guarded). :meth:`client_step`
    replaces the client optimizer's ``step``; :meth:`guard` wraps what ``engine.step()`` calls.
    """

    def __init__(self, engine: Any, zero_step: Callable[[], Any], penalty: GradientNormPenalty) -> None:
        self.engine = engine
        self.penalty = penalty
        self._zero_step = zero_step
        self._phase: str | None = None  # where regularizers.step is; None: outside it
        self._engine_stepped = False  # whether this pass's backward reached engine.step()

    def step(self, closure: Callable[[], Any], scaler: Any = None) -> Any:
        """One optimizer step: the closure (forward, ``accelerator.backward(loss)``, return the loss) runs at
        ``theta`` and, when this step penalizes, at ``theta + e``. Returns the first pass's loss."""
        if not self.penalty.penalizes():
            return self._pass(closure, _PLAIN)
        before = RngState() if self.penalty.replay_rng else None
        loss = self._first_pass(closure)
        if self._phase != _PERTURBED:  # DeepSpeed skipped its step (non-finite g1): theta never moved
            self._phase = None
            return loss
        with replaying(before):
            self._pass(closure, _SECOND)
        return loss

    def _first_pass(self, closure: Callable[[], Any]) -> Any:
        own_step = vars(self.engine).get("step")
        self.engine.step = self._perturbing_engine_step
        try:
            loss = self._run(closure, _FIRST)
        except BaseException:
            self._abandon()
            self._phase = None
            raise
        finally:
            if own_step is not None:
                self.engine.step = own_step
            else:
                del self.engine.step
        return loss

    def _pass(self, closure: Callable[[], Any], phase: str) -> Any:
        try:
            return self._run(closure, phase)
        finally:
            if self._phase != _DONE:  # DeepSpeed skipped its step, or the closure raised: the step is skipped
                self._abandon()
            self._phase = None

    def _run(self, closure: Callable[[], Any], phase: str) -> Any:
        self._phase, self._engine_stepped = phase, False
        with torch.enable_grad():
            loss = closure()
        if not self._engine_stepped:
            raise RuntimeError(_NO_BACKWARD)
        return loss

    def _perturbing_engine_step(self, lr_kwargs: Any = None) -> None:
        """``engine.step()`` of the first pass: DeepSpeed's optimizer step (its client step perturbs), then
        what the engine does after it, but no count or schedule advances."""
        if self._phase != _FIRST:
            raise RuntimeError(_ONE_BACKWARD)
        self._engine_stepped = True
        self._zero_step()
        self.engine.optimizer.zero_grad()

    def guard(self, zero_step: Callable[..., Any]) -> Callable[..., Any]:
        """``zero_step`` (what ``engine.step()`` calls), refused outside ``regularizers.step(closure)``."""

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._phase not in (_SECOND, _PLAIN) or self._engine_stepped:
                raise RuntimeError(_ONE_BACKWARD if self._phase is not None else _OUTSIDE)
            self._engine_stepped = True
            return zero_step(*args, **kwargs)

        return step

    def client_step(self, *args: Any, **kwargs: Any) -> None:
        """The client optimizer's step inside DeepSpeed's: perturb (first pass) or combine and update."""
        if self._phase == _FIRST:
            self.penalty.first_step()
            self._phase = _PERTURBED
            return
        if self._phase == _PLAIN:  # a step of periodic GNP (or warmup) without penalty: g = g1
            self.penalty.first_step()
        self._phase = _DONE
        self.penalty.second_step()

    def _abandon(self) -> None:
        """A step that does not apply (DeepSpeed skipped it, or the closure raised) after the perturbation:
        restore theta in the master partitions, count nothing, copy the master back into the model."""
        if self._phase in (_PERTURBED, _SECOND):
            # A partition's .grad may still view DeepSpeed's gradient buffer (BF16_Optimizer), which the next
            # backward accumulates into: the discarded combination must not be written there.
            self.penalty.optimizer.zero_grad()
            self.penalty.second_step(scaler=_SkippedStep())
            self.penalty.optimizer.zero_grad()
            refresh_model_parameters(self.engine.optimizer)


def refresh_model_parameters(zero_optimizer: Any) -> None:
    """Copy the fp32 master partitions into the model's parameters, as the end of DeepSpeed's step does."""
    if hasattr(zero_optimizer, "update_lp_params"):  # ZeRO-1/2, BF16_Optimizer: copy, all-gather
        zero_optimizer.update_lp_params()
        return
    # ZeRO-3: into this rank's parameter partitions (gathered at the next forward), then gather the
    # persistent (small) parameters, which stay whole between steps.
    for sub_group in range(len(zero_optimizer.fp16_groups)):
        zero_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    zero_optimizer._post_step(set())


_ONE_BACKWARD = ("GNP/SAM under DeepSpeed: each pass of the closure must reach DeepSpeed's step once: one "
                 "accelerator.backward(loss), or with gradient_accumulation_steps > 1 one per micro-batch, each inside "
                 "accelerator.accumulate(model) (the last one steps)")
_NO_BACKWARD = "GNP/SAM under DeepSpeed: the closure must call accelerator.backward(loss)"
_OUTSIDE = ("GNP/SAM under DeepSpeed: step with regularizers.step(closure); accelerator.backward outside it would "
            "update without the penalty")
