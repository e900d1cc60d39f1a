"""Accelerate integration: one call that applies DropGrad where it belongs for the setup.

``prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)`` after ``accelerator.prepare``:

- DDP (``MULTI_GPU``, ``MULTI_CPU``): registers the DropGrad DDP communication hook, so the
  all-reduced buckets are masked identically on every rank;
- FSDP (versions 1 and 2) and one process (CPU, one CUDA device, MPS): wraps the prepared
  optimizer's inner optimizer in :class:`~dropgrad_dist.DropGrad` (sharded gradients are masked
  in global coordinates).

Either way the mask of coordinate ``i`` of parameter ``name`` at optimizer step ``t`` is the
same, and so is the order: gradients are masked before ``accelerator.clip_grad_norm_`` clips
them (the DDP hook masks inside backward; for the wrapper the clip methods mask first).
``save_state``/``load_state`` resume the masks exactly: DropGrad's state is plain data written
as JSON (``dropgrad_dist_state_<i>.json``) through Accelerate's save/load state hooks, never
pickled, so a tampered checkpoint cannot run code. Works with ``accelerator.accumulate()``,
``accelerator.clip_grad_norm_`` and mixed precision (fp16 GradScaler, bf16).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch
from torch import nn

from . import checkpoint as _checkpoint
from .mask import keep_probability
from .optim import DropGrad
from .params import RateSpec
from .schedules import DropRateScheduler

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["DropGradHandle", "enable_fsdp_on_cpu", "prepare_dropgrad"]

Mode = Literal["ddp_hook", "fsdp_wrapper", "wrapper"]


class DropGradHandle:
    """What :func:`prepare_dropgrad` applied; saved and loaded with ``accelerator.save_state``/``load_state``."""

    def __init__(self, mode: Mode, target: Any) -> None:
        self.mode = mode
        self.target = target  # a DropGradHookState (ddp_hook) or a DropGrad (the wrappers)
        # accelerator.load_state takes no options: set False to resume with a changed configuration.
        self.strict_load = True

    @property
    def step_index(self) -> int:
        """Optimizer steps DropGrad has taken (the ``t`` of the masks)."""
        return self.target.step_index

    @property
    def drop_rate(self) -> float | None:
        """The default drop rate at the current step."""
        return self.target.plan.default_rate()

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging per step: rate, exact keep probability, bytes (DDP hook)."""
        rate = self.drop_rate or 0.0
        out = {"drop_rate": rate, "kept_fraction": keep_probability(rate)}
        if self.mode == "ddp_hook":
            out["bytes_communicated"] = float(self.target.bytes_communicated)
            out["bytes_dense_equivalent"] = float(self.target.bytes_dense_equivalent)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the mode and DropGrad's state (configuration and progress)."""
        if self.mode == "ddp_hook":
            return {"mode": self.mode, "state": self.target.state_dict()}
        return {"mode": self.mode, "state": self.target.own_state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool | None = None) -> None:
        """Restore DropGrad's state; ``strict`` (default :attr:`strict_load`) as in :mod:`.checkpoint`."""
        strict = self.strict_load if strict is None else strict
        mode = _checkpoint.read_field(state_dict, "mode", lambda value, _: value, "DropGradHandle")
        if mode != self.mode:
            raise ValueError(f"checkpoint was saved with DropGrad as {mode!r}, this run applies it as {self.mode!r}")
        state = _checkpoint.read_field(state_dict, "state", lambda value, _: value, "DropGradHandle")
        if self.mode == "ddp_hook":
            self.target.load_state_dict(state, strict=strict)
        else:
            self.target.load_own_state_dict(state, strict=strict)

    def _attach_to_checkpoints(self, accelerator: "Accelerator") -> None:
        """Save and load this handle's state as JSON with ``accelerator.save_state``/``load_state``."""
        handles = accelerator.__dict__.setdefault("_dropgrad_dist_handles", [])
        filename = f"dropgrad_dist_state_{len(handles)}.json"
        handles.append(self)

        def save(models: Any, weights: Any, output_dir: str) -> None:
            if accelerator.is_main_process or (accelerator.is_local_main_process
                                               and accelerator.project_configuration.save_on_each_node):
                os.makedirs(output_dir, exist_ok=True)
                _checkpoint.write_json(os.path.join(output_dir, filename), self.state_dict())

        def load(models: Any, input_dir: str) -> None:
            self.load_state_dict(_checkpoint.read_json(os.path.join(input_dir, filename), "DropGrad"))

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)


def _wrap_accelerated_optimizer(accelerated: Any, **kwargs: Any) -> DropGrad:
    """Put DropGrad between Accelerate's AcceleratedOptimizer and the user's optimizer."""
    dropgrad = DropGrad(accelerated.optimizer, **kwargs)
    dropgrad.include_state_in_state_dict = False  # the handle's JSON file holds it (FSDP drops extra keys)
    accelerated.optimizer = dropgrad
    if getattr(accelerated, "scaler", None) is not None:
        # AcceleratedOptimizer swaps in a patched step (to detect GradScaler skips) around
        # scaler.step; point both saved methods at DropGrad.step, not at the inner optimizer's.
        from accelerate.optimizer import patch_optimizer_step

        accelerated._optimizer_original_step_method = dropgrad.step
        accelerated._optimizer_patched_step_method = patch_optimizer_step(accelerated, dropgrad.step)
    return dropgrad


def _mask_before_clipping(accelerator: "Accelerator", dropgrad: DropGrad) -> None:
    """Make ``accelerator.clip_grad_norm_``/``clip_grad_value_`` see masked gradients.

    The DDP hook masks inside backward, before any clipping; masking here first gives the
    step wrapper the same order, so DDP, FSDP and one process compute the same update.
    """
    for name in ("clip_grad_norm_", "clip_grad_value_"):
        clip = getattr(accelerator, name)

        def masked_then_clip(*args: Any, _clip=clip, **kwargs: Any) -> Any:
            if not dropgrad.full_update_drop:
                dropgrad.mask_gradients_()
            return _clip(*args, **kwargs)

        setattr(accelerator, name, masked_then_clip)


def enable_fsdp_on_cpu(accelerator: "Accelerator", plugin: Any = None) -> None:
    """Make ``accelerator.prepare`` shard with FSDP on CPU processes (gloo), e.g. to test FSDP setups in CI.

    Accelerate (1.6 to 1.15 at least) enables FSDP only for GPU-like devices and silently falls
    back to DDP on CPU. Call this right after creating the ``Accelerator`` of a CPU multi-process
    run; ``plugin`` defaults to a ``FullyShardedDataParallelPlugin`` read from the environment
    that ``accelerate launch`` sets for an FSDP config (``FSDP_VERSION``, ...).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.device.type != "cpu" or accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError("enable_fsdp_on_cpu needs a multi-process CPU Accelerator (MULTI_CPU), "
                         f"got {accelerator.distributed_type} on {accelerator.device}")
    # FSDP1 rejects Accelerate's "cpu:0" device id; FSDP needs the plain CPU device.
    PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
    AcceleratorState().fsdp_plugin = plugin if plugin is not None else FullyShardedDataParallelPlugin()


def _unsupported(distributed_type: Any) -> ValueError:
    return ValueError(f"prepare_dropgrad does not support Accelerate's {distributed_type} setup; supported: "
                      "NO (CPU, one GPU, MPS), MULTI_GPU, MULTI_CPU (DDP comm hook) and FSDP (versions 1, 2)")


def prepare_dropgrad(
    accelerator: "Accelerator",
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    drop_rate: float | RateSpec | None = None,
    params: RateSpec | None = None,
    *,
    drop_rate_scheduler: DropRateScheduler | None = None,
    seed: int = 0,
    communication: str = "dense",
    full_update_drop: bool = False,
    step_skip_rate: float = 0.0,
) -> DropGradHandle:
    """Apply DropGrad (``g <- m_t * g / (1 - p)`` before each optimizer step) to a prepared model.

    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned. Rates, ``params``
    and schedules mean what they mean for :class:`~dropgrad_dist.DropGrad`; ``communication``
    ("dense" or "compact") applies to the DDP hook, ``full_update_drop`` and ``step_skip_rate``
    to the step wrapper (they raise under DDP, where gradients are masked inside the all-reduce).
    """
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType

    if not isinstance(optimizer, AcceleratedOptimizer):
        raise ValueError("optimizer must be the optimizer returned by accelerator.prepare "
                         f"(an AcceleratedOptimizer), got {type(optimizer).__name__}")
    if communication not in ("dense", "compact"):
        raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
    kind = accelerator.distributed_type
    rates = dict(drop_rate=drop_rate, params=params, drop_rate_scheduler=drop_rate_scheduler, seed=seed)
    if kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        if full_update_drop or step_skip_rate:
            raise ValueError("full_update_drop and step_skip_rate need the step wrapper; under DDP DropGrad "
                             "masks gradients in the all-reduce hook (use FSDP or one process for them)")
        from .ddp_hook import DropGradHookState

        # The hook counts optimizer steps through torch's global step hooks (fired by the inner
        # optimizer, not by AcceleratedOptimizer), so nothing here may advance it.
        state = DropGradHookState(model, **rates, communication=communication)
        state.register(model)
        handle = DropGradHandle("ddp_hook", state)
    elif kind in (DistributedType.FSDP, DistributedType.NO):
        dropgrad = _wrap_accelerated_optimizer(optimizer, **rates, model=model,
                                               full_update_drop=full_update_drop, step_skip_rate=step_skip_rate)
        _mask_before_clipping(accelerator, dropgrad)
        handle = DropGradHandle("fsdp_wrapper" if kind == DistributedType.FSDP else "wrapper", dropgrad)
    else:
        raise _unsupported(kind)
    handle._attach_to_checkpoints(accelerator)
    return handle
