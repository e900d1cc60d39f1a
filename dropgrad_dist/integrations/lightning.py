"""PyTorch Lightning: DropGrad, clipping and GNP/SAM under DDP and FSDP2, resumable from Lightning's checkpoints.

``Trainer(strategy=DropGradDDPStrategy(drop_rate=0.1, seed=0, communication="compact"))`` masks
the all-reduced gradient buckets with the seeded masks (``g <- mean_ranks(g) * m_t / (1 - p)``),
on CPU (gloo) as on CUDA. Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` registers a hook
only when the root device is CUDA, so on CPU such a hook silently never runs.

``Trainer(strategy=DropGradFSDPStrategy(drop_rate=0.1, seed=0))`` is Lightning's
``ModelParallelStrategy`` (FSDP2: ``configure_model`` applies ``fully_shard``) with the
:class:`~dropgrad_dist.DropGrad` wrapper placed in the optimizer chain: the same masks on the
sharded gradients.

Clipping and the gradient norm penalty / SAM are optimizer wrappers returned by
``configure_optimizers`` (``ClippedOptimizer``, ``GradientNormPenalty``). Both strategies

- save every regularizer's state (the hook state or the DropGrad wrapper, the clippers, GNP/SAM)
  as plain data under ``checkpoint["dropgrad_dist"]`` of every checkpoint Lightning writes
  (``ModelCheckpoint``, ``trainer.save_checkpoint``), and restore it on ``trainer.fit(ckpt_path=...)``;
- run GNP/SAM through its engine passes (:meth:`GradientNormPenalty.begin_passes`): the first pass
  is Lightning's accumulation of ``accumulate_grad_batches = k`` micro-batches (``g1 = sum_j grad
  L_j(theta) / k``), the second pass replays them at ``theta + e``, each from its random state;
  Lightning's gradient clipping and ``on_before_optimizer_step`` then see the combined gradient;
- refuse at setup what Lightning would silently defeat: a ``ClippedOptimizer`` with Lightning's
  ``gradient_clip_val`` (clipped twice), a ``DropGrad`` wrapper next to the strategy's own
  (masked twice), GNP/SAM with ``first_pass="given"`` (Lightning's backward is the first pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from ..clipping.clipper import ClippedOptimizer
from ..clipping.restarts import RestartingOptimizer
from ..core.wrapper import OptimizerWrapper
from ..ddp.hook import DropGradHookState
from ..dropgrad.optimizer import DropGrad
from ..dropgrad.plan import RateSpec
from ..dropgrad.schedules import DropRateScheduler
from ..gnp.penalty import GradientNormPenalty
from .accelerate import Mode, Regularizers

__all__ = ["DropGradDDPStrategy", "DropGradFSDPStrategy"]

CHECKPOINT_KEY = "dropgrad_dist"  # the entry of Lightning's checkpoint dict that holds the regularizers' state
_HOOK_OPTIONS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class _RegularizedStrategy:
    """What both strategies add to Lightning's: the regularizers in its checkpoints, GNP/SAM over accumulation.

    A mixin before a Lightning strategy class in the bases; ``_mode`` and ``_dropgrad_target`` say how
    DropGrad runs (the DDP hook or the wrapper).
    """

    _mode: Mode
    strict_load: bool  # the ``strict`` of the regularizers' load (False: keep this run's configuration, warn)

    def _init_regularized(self) -> None:
        self.strict_load = True
        self._passes_open = False  # GNP/SAM: from the first micro-batch of an optimizer step to its step
        self._replaying = False  # in GNP/SAM's second pass: training_step records nothing

    def _dropgrad_target(self, index: int, chain: list[Any]) -> Any:
        raise NotImplementedError

    # -- the regularizers of each optimizer ------------------------------------------------------
    def regularizers(self) -> list[Regularizers]:
        """One :class:`~dropgrad_dist.integrations.accelerate.Regularizers` per optimizer: what the checkpoint holds."""
        handles = []
        for index, optimizer in enumerate(self.optimizers):
            chain = _chain(optimizer)
            clipped = _find(chain, ClippedOptimizer)
            handles.append(Regularizers(self._mode, self.lightning_module, self._dropgrad_target(index, chain),
                                        clipped.clipper if clipped is not None else None, None,
                                        _find(chain, GradientNormPenalty)))
        return handles

    def _setup_regularized(self, trainer: pl.Trainer) -> None:
        self._passes_open = False
        for optimizer in self.optimizers:
            refuse_unhonoured(optimizer, trainer)
            penalty = _find(_chain(optimizer), GradientNormPenalty)
            if penalty is not None and self.lightning_module.automatic_optimization:
                penalty.check_engine_passes()
            for wrapper in _chain(optimizer)[:-1]:
                if isinstance(wrapper, (DropGrad, ClippedOptimizer, GradientNormPenalty)):
                    wrapper.include_state_in_state_dict = False  # checkpoint["dropgrad_dist"] holds it

    # -- checkpoints -----------------------------------------------------------------------------
    def _add_regularizer_state(self, checkpoint: dict[str, Any]) -> None:
        if "optimizer_states" in checkpoint:  # a weights-only checkpoint resumes nothing
            checkpoint[CHECKPOINT_KEY] = {"regularizers": [handle.state_dict() for handle in self.regularizers()]}

    def _prepare_regularizer_state(self, checkpoint: Mapping[str, Any]) -> Callable[[], None]:
        """Validate ``checkpoint[CHECKPOINT_KEY]`` against this run's regularizers; return what applies it."""
        name = type(self).__name__
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(f"{name}: the checkpoint has no {CHECKPOINT_KEY!r} entry (saved without {name}, or "
                             "weights only), so the masks, clipping and GNP/SAM would restart from step 0 while the "
                             "model continues; resume from a checkpoint this strategy wrote")
        entry = checkpoint[CHECKPOINT_KEY]
        saved = entry.get("regularizers") if isinstance(entry, Mapping) else None
        handles = self.regularizers()
        if not isinstance(saved, list) or len(saved) != len(handles):
            count = len(saved) if isinstance(saved, list) else "no"
            raise ValueError(f"{name}: checkpoint entry {CHECKPOINT_KEY!r} must hold a list 'regularizers' with one "
                             f"state per optimizer ({len(handles)}), found {count}")
        applies = [handle.prepare_state(state, self.strict_load) for handle, state in zip(handles, saved)]

        def apply() -> None:
            for apply_one in applies:
                apply_one()

        return apply

    # -- GNP/SAM: both passes over the optimizer step's micro-batches (GradientNormPenalty.begin_passes) --
    def _penalty(self) -> GradientNormPenalty | None:
        """The GNP/SAM wrapper whose passes this strategy runs (automatic optimization: one optimizer)."""
        if self._replaying or not self.lightning_module.automatic_optimization or len(self.optimizers) != 1:
            return None
        return _find(_chain(self.optimizers[0]), GradientNormPenalty)

    def _open_passes(self, penalty: GradientNormPenalty) -> None:
        if not self._passes_open:
            penalty.begin_passes()
            self._passes_open = True

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        penalty = self._penalty()
        if penalty is not None:  # a micro-batch of the first pass
            self._open_passes(penalty)
            penalty.record_micro_batch((args, kwargs))
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model: Any = None, **kwargs: Any) -> Any:
        penalty = self._penalty()
        if penalty is None or _find(_chain(optimizer), GradientNormPenalty) is not penalty:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        self._open_passes(penalty)  # one micro-batch per step: its training_step runs in the closure
        try:
            return super().optimizer_step(optimizer, self._both_passes(penalty, optimizer, closure), model, **kwargs)
        finally:
            self._passes_open = False  # the next micro-batch opens the next step

    def _both_passes(self, penalty: GradientNormPenalty, optimizer: torch.optim.Optimizer,
                     closure: Callable[[], Any]) -> Callable[[], Any]:
        """Lightning's closure (the step's last micro-batch) as the end of the first pass, then the second pass;
        the optimizer's ``step`` (or ``scaler.step``) then steps on the combined gradient."""
        def run() -> Any:
            with penalty.first_pass_context():
                loss = closure()
            penalty.finish_passes(micro_batch=lambda recorded, last: self._run_again(optimizer, recorded, last),
                                  scaler=getattr(self.precision_plugin, "scaler", None))
            return loss

        return run

    def _run_again(self, optimizer: torch.optim.Optimizer, recorded: tuple[tuple[Any, ...], dict[str, Any]],
                   last: bool) -> None:
        """One micro-batch of the second pass as Lightning runs it: training_step, the loss divided by
        ``accumulate_grad_batches``, backward, synchronized at the last micro-batch only."""
        from lightning.pytorch.loops.optimization.automatic import ClosureResult

        args, kwargs = recorded
        accumulate = self.lightning_module.trainer.accumulate_grad_batches
        self._replaying = True
        try:
            with contextlib.nullcontext() if last else self.block_backward_sync(), torch.enable_grad():
                output = self.training_step(*args, **kwargs)
                loss = ClosureResult.from_training_step_output(output, accumulate).closure_loss
                if loss is not None:
                    self.backward(loss, optimizer)
        finally:
            self._replaying = False


class DropGradDDPStrategy(_RegularizedStrategy, DDPStrategy):
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
    (``step_index``, ``bytes_communicated``, ``state_dict()``). Checkpoints carry it, the clippers'
    and GNP/SAM's state under ``checkpoint["dropgrad_dist"]``; ``strict_load = False`` resumes with a
    changed configuration (warning).
    """

    _mode: Mode = "ddp_hook"

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
        self._init_regularized()
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

    def _dropgrad_target(self, index: int, chain: list[Any]) -> Any:
        return self.dropgrad_state if index == 0 else None  # one hook for the model, saved once

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.dropgrad_state is not None:
            self._setup_regularized(trainer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.dropgrad_state is not None:
            self._add_regularizer_state(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # trainer.fit(ckpt_path=...) calls it after setup (the weights loaded before): ours is validated
        # before the optimizer state loads, and applied after it.
        apply = self._prepare_regularizer_state(checkpoint) if self.dropgrad_state is not None else None
        super().load_optimizer_state_dict(checkpoint)
        if apply is not None:
            apply()


class DropGradFSDPStrategy(_RegularizedStrategy, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) with a :class:`~dropgrad_dist.DropGrad` wrapper in the chain.

    Math: ``g_i <- g_i * keep_i(seed, t, name, p) / (1 - p)`` on each rank's shard in global
    coordinates, ``g`` the reduce-scattered (rank-averaged) gradient: the masks of
    ``DropGrad(optimizer, drop_rate, seed=seed, model=lightning_module)`` in one process.

    ``configure_model`` applies ``fully_shard`` (the strategy's ``device_mesh["data_parallel"]``);
    ``configure_optimizers`` returns the optimizer, optionally wrapped in ``ClippedOptimizer`` and
    ``GradientNormPenalty``/``SAM``. The strategy puts ``DropGrad`` inside GNP/SAM and outside
    clipping (``GNP(DropGrad(ClippedOptimizer(opt)))``: penalize, mask, clip, step).

    Args:
        drop_rate, params, drop_rate_scheduler, seed, full_update_drop, step_skip_rate: as for
            :class:`~dropgrad_dist.DropGrad` (all None: no DropGrad; clipping and GNP/SAM still
            checkpointed and accumulated).
        **kwargs: ``ModelParallelStrategy``'s arguments. With ``data_parallel_size`` and
            ``tensor_parallel_size`` both ``"auto"`` (the default) every process is one data-parallel
            shard (FSDP over the world; Lightning's own default puts the processes of a node into
            tensor parallelism).

    ``dropgrad`` is the ``DropGrad`` wrapper once fitting began (``step_index``, ``state_dict()``).
    """

    _mode: Mode = "fsdp_wrapper"

    def __init__(self, drop_rate: float | RateSpec | None = None, params: RateSpec | None = None, *,
                 drop_rate_scheduler: DropRateScheduler | None = None, seed: int = 0,
                 full_update_drop: bool = False, step_skip_rate: float = 0.0, **kwargs: Any) -> None:
        self._fsdp_over_world = kwargs.get("data_parallel_size", "auto") == "auto" and kwargs.get(
            "tensor_parallel_size", "auto") == "auto"
        super().__init__(**kwargs)
        self._init_regularized()
        self._dropgrad_options = dict(drop_rate=drop_rate, params=params, drop_rate_scheduler=drop_rate_scheduler,
                                      seed=seed, full_update_drop=full_update_drop, step_skip_rate=step_skip_rate)
        self._uses_dropgrad = drop_rate is not None or params is not None or drop_rate_scheduler is not None
        self.dropgrad: DropGrad | None = None

    def setup_environment(self) -> None:
        if self._fsdp_over_world:  # resolved before ModelParallelStrategy reads "auto"
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if self._uses_dropgrad:
            self.optimizers = [self._with_dropgrad(optimizer) for optimizer in self.optimizers]
            self.dropgrad = _find(_chain(self.optimizers[0]), DropGrad)

    def _with_dropgrad(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` with DropGrad inside GNP/SAM (which computes the gradient it masks) and outside the rest."""
        chain = _chain(optimizer)
        if _find(chain, DropGrad) is not None:
            raise ValueError("the optimizer is wrapped in DropGrad and DropGradFSDPStrategy adds its own: gradients "
                             "would be masked twice; remove the DropGrad wrapper or the strategy's drop_rate")
        outer = chain[0] if isinstance(chain[0], GradientNormPenalty) else None
        inner = outer.optimizer if outer is not None else optimizer
        masked = DropGrad(inner, **self._dropgrad_options, model=self.lightning_module)
        if outer is None:
            return masked
        outer.optimizer = masked  # wrappers share param_groups and state: GNP sees the same parameters
        return outer

    def _dropgrad_target(self, index: int, chain: list[Any]) -> Any:
        return _find(chain, DropGrad)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == "fit":
            self._setup_regularized(trainer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self._add_regularizer_state(checkpoint)  # rank 0 writes it with Lightning's metadata
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # ModelParallelStrategy loads after setup, model and optimizer in place, then returns the metadata.
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.lightning_module.trainer.state.fn == "fit":
            self._prepare_regularizer_state(checkpoint)()
        return checkpoint


def _chain(optimizer: Any) -> list[Any]:
    chain = [optimizer]
    while isinstance(chain[-1], OptimizerWrapper):
        chain.append(chain[-1].optimizer)
    return chain


def _find(chain: list[Any], kind: type) -> Any:
    return next((wrapper for wrapper in chain if isinstance(wrapper, kind)), None)


def refuse_unhonoured(optimizer: Any, trainer: pl.Trainer) -> None:
    """Raise ``ValueError`` for optimizer wrappers that ``trainer``'s settings would silently defeat."""
    chain = _chain(optimizer)
    if trainer.gradient_clip_val and any(isinstance(o, ClippedOptimizer) for o in chain):
        raise ValueError(f"gradient_clip_val={trainer.gradient_clip_val} with a ClippedOptimizer would clip twice; "
                         "remove one of them")
    if any(isinstance(o, RestartingOptimizer) for o in chain):
        # The restart sums are per-rank tensors that Lightning's checkpoint entry does not carry: a resume
        # would silently restart the averages from zero.
        raise ValueError("RestartingOptimizer under the Lightning strategies: its restart sums would not be in "
                         "Lightning's checkpoints (a resume would silently lose them); use restarts through "
                         "Accelerate's prepare_regularizers or Trainer's add_regularizers")
    if isinstance(trainer.strategy, DDPStrategy) and any(isinstance(o, DropGrad) for o in chain):
        raise ValueError("the optimizer is wrapped in DropGrad and DropGradDDPStrategy's hook masks too: gradients "
                         "would be masked twice; remove the DropGrad wrapper")
