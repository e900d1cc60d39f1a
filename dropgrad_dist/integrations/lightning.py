"""PyTorch Lightning: the DropGrad DDP communication hook on every device, and the checks Lightning lacks.

``Trainer(strategy=DropGradDDPStrategy(drop_rate=0.1, seed=0, communication="compact"))`` masks
the all-reduced gradient buckets with the seeded masks (``g <- mean_ranks(g) * m_t / (1 - p)``),
on CPU (gloo) as on CUDA. Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` registers a hook
only when the root device is CUDA, so on CPU such a hook silently never runs.

Clipping and the gradient norm penalty / SAM are optimizer wrappers returned by
``configure_optimizers`` (``ClippedOptimizer``, ``GradientNormPenalty``); the strategy checks
at setup that Lightning can honour them and raises otherwise:

- ``GradientNormPenalty`` with ``accumulate_grad_batches > 1`` under automatic optimization:
  its closure recomputes the gradient from the last micro-batch only, discarding the rest;
- ``ClippedOptimizer`` with Lightning's ``gradient_clip_val``: gradients would be clipped twice;
- a ``DropGrad`` wrapper: the hook already masks, the wrapper would mask a second time.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

from ..clipping.clipper import ClippedOptimizer
from ..core.wrapper import OptimizerWrapper
from ..ddp.hook import DropGradHookState
from ..dropgrad.optimizer import DropGrad
from ..dropgrad.plan import RateSpec
from ..dropgrad.schedules import DropRateScheduler
from ..gnp.penalty import GradientNormPenalty

__all__ = ["DropGradDDPStrategy"]

_HOOK_OPTIONS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class DropGradDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy with DropGrad's communication hook registered on every device type.

    Math: ``g_i <- mean_ranks(g_i) * keep_i(seed, t, name, p) / (1 - p)``: the masks of
    ``DropGrad(optimizer, drop_rate, seed=seed, model=lightning_module)`` in one process.

    Args:
        drop_rate, params, drop_rate_scheduler, seed, communication: as for
            :class:`~dropgrad_dist.DropGradHookState` (mask keys are the LightningModule's
            parameter names).
        **kwargs: ``DDPStrategy``'s other arguments (``process_group_backend``, ``timeout``,
            ``find_unused_parameters``, ...); its communication-hook arguments are refused.

    ``dropgrad_state`` is the :class:`~dropgrad_dist.DropGradHookState` once fitting began
    (``step_index``, ``bytes_communicated``, ``state_dict()``).
    """

    def __init__(self, drop_rate: float | RateSpec | None = None, params: RateSpec | None = None, *,
                 drop_rate_scheduler: DropRateScheduler | None = None, seed: int = 0,
                 communication: str = "dense", **kwargs: Any) -> None:
        given = [key for key in _HOOK_OPTIONS if kwargs.get(key) is not None]
        if given:
            raise ValueError(f"DropGradDDPStrategy registers its own communication hook; remove {given} (to "
                             "combine DropGrad with another hook, wrap it with dropgrad_wrapper in a plain DDP loop)")
        if communication not in ("dense", "compact"):
            raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
        super().__init__(**kwargs)
        self._dropgrad_options = dict(drop_rate=drop_rate, params=params, drop_rate_scheduler=drop_rate_scheduler,
                                      seed=seed, communication=communication)
        self.dropgrad_state: DropGradHookState | None = None

    def _register_ddp_hooks(self) -> None:
        # Lightning's DDPStrategy registers hooks on CUDA only; DDP runs comm hooks with gloo too.
        if self.dropgrad_state is not None and self.dropgrad_state._registered_model() is self.model:
            return
        state = DropGradHookState(self.model, **self._dropgrad_options)
        state.register(self.model)
        self.dropgrad_state = state

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.dropgrad_state is not None:
            for optimizer in self.optimizers:
                refuse_unhonoured(optimizer, trainer)


def _chain(optimizer: Any) -> list[Any]:
    chain = [optimizer]
    while isinstance(chain[-1], OptimizerWrapper):
        chain.append(chain[-1].optimizer)
    return chain


def refuse_unhonoured(optimizer: Any, trainer: pl.Trainer) -> None:
    """Raise ``ValueError`` for optimizer wrappers that ``trainer``'s settings would silently defeat."""
    chain = _chain(optimizer)
    automatic = trainer.lightning_module.automatic_optimization
    if automatic and trainer.accumulate_grad_batches > 1 and any(isinstance(o, GradientNormPenalty) for o in chain):
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} with GradientNormPenalty/SAM under automatic "
            "optimization: the penalty's closure recomputes the gradient of the last micro-batch only, discarding "
            "the accumulated ones; set accumulate_grad_batches=1 and use a larger batch, or accumulate inside a "
            "closure with manual optimization")
    if trainer.gradient_clip_val and any(isinstance(o, ClippedOptimizer) for o in chain):
        raise ValueError(f"gradient_clip_val={trainer.gradient_clip_val} with a ClippedOptimizer would clip twice; "
                         "remove one of them")
    if any(isinstance(o, DropGrad) for o in chain):
        raise ValueError("the optimizer is wrapped in DropGrad and DropGradDDPStrategy's hook masks too: gradients "
                         "would be masked twice; remove the DropGrad wrapper")
