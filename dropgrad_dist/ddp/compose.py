"""DropGrad's mask composed with another DDP communication hook: mask first, then that hook communicates.

``dropgrad_wrapper(hook, state=...)`` masks each bucket with the :class:`DropGradHookState`'s
seeded masks and lets ``hook`` (torch's fp16/bf16 compression, PowerSGD, any hook) average it;
``compressed_hook("bf16" | "fp16" | "powersgd" | PowerSGDState)`` builds the common ones. The round
bookkeeping, agreement check and step counting are the state's, exactly as for
:func:`~dropgrad_dist.dropgrad_hook`.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from ..core.collectives import then, without_backward_context
from .hook import DropGradHookState, Hook, _refuse_per_parameter_call

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["accelerate_compression", "compressed_hook", "dropgrad_wrapper"]

# Hooks that map each coordinate to itself (a zero stays a zero): no second mask needed after them.
_ELEMENTWISE_HOOKS = (default_hooks.allreduce_hook, default_hooks.fp16_compress_hook,
                      default_hooks.bf16_compress_hook)


def dropgrad_wrapper(hook: Hook, state: Any = None) -> Hook:
    """Mask first, then let ``hook`` (e.g. ``bf16_compress_hook``, ``powerSGD_hook``) communicate.

    ``b <- hook(inner_state, b * keep / (1 - p))``, and for a hook that is not elementwise (anything
    but torch's ``allreduce_hook``/``fp16_compress_hook``/``bf16_compress_hook``, e.g. PowerSGD,
    whose low-rank approximation spreads values into dropped coordinates) ``b <- keep * b`` after
    it, so dropped coordinates are zero on every rank. ``inner_state`` is ``state`` when given
    (PowerSGD needs its ``PowerSGDState``), else the DropGrad state's process group. ``hook``
    averages the bucket. Register with ``state.register(ddp_model, dropgrad_wrapper(hook, ...))``;
    the DropGrad state must use ``communication="dense"``. The traffic is the wrapped hook's: the
    byte counters do not move. Per bucket:

    1. The first bucket of a backward pass opens a round (agreement check started).
    2. Mask in place: ``b * keep / (1 - p)`` (suspended: untouched), keeping ``keep`` if needed.
    3. ``hook`` averages (and compresses) the bucket.
    4. Not elementwise: ``keep * result`` once it completes.
    5. The last bucket closes the round (agreement check waited for).
    """
    if not callable(hook):
        raise TypeError(f"hook must be a DDP communication hook (a callable), got {type(hook).__name__}")
    name = f"dropgrad_wrapper({getattr(hook, '__qualname__', type(hook).__name__)})"
    remask = hook not in _ELEMENTWISE_HOOKS
    inner_state = state

    def dropgrad_wrapper_hook(state: DropGradHookState,
                              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        _refuse_per_parameter_call(bucket)
        if state.communication != "dense":
            raise ValueError("dropgrad_wrapper masks densely and lets the wrapped hook communicate: "
                             "build the state with communication='dense' (compact is dropgrad_hook's own)")
        with without_backward_context():
            state.begin_bucket(bucket, name)  # 1. open the round at the first bucket
            try:
                keep = None
                if not state.is_suspended:  # 2. mask (keeping the mask when the hook is not elementwise)
                    buffer = bucket.buffer()
                    if remask:
                        keep = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
                    state.mask_bucket_(bucket, 1, keep=keep)
                # 3. the wrapped hook averages (and compresses); 4. dropped coordinates zero again after it
                future = hook(state.process_group if inner_state is None else inner_state, bucket)
                if keep is not None:
                    future = then(future, _times_keep(keep))
            except BaseException:
                state.abort_round()
                raise
            state.end_bucket(bucket)  # 5. the last bucket closes the round
        return future

    dropgrad_wrapper_hook.__qualname__ = name
    return dropgrad_wrapper_hook


def _times_keep(keep: torch.Tensor) -> Callable[[torch.futures.Future], torch.Tensor]:
    def remask(fut: torch.futures.Future) -> torch.Tensor:
        value = fut.value()
        tensor = value[0] if isinstance(value, (list, tuple)) else value
        return tensor.mul_(keep)
    return remask


Compress = Literal["bf16", "fp16", "powersgd"]


def compressed_hook(compress: "Compress | powerSGD_hook.PowerSGDState",
                    process_group: dist.ProcessGroup | None = None) -> Hook:
    """DropGrad's mask composed with one of torch's compression hooks: mask, then compress.

    ``compress``: ``"bf16"``/``"fp16"`` (``b <- all_reduce(half(b * keep / (1 - p)) / n)``),
    ``"powersgd"`` (rank-1 PowerSGD with torch's defaults on ``process_group``) or a
    ``PowerSGDState`` (PowerSGD with those settings); PowerSGD's result is masked again, so
    dropped coordinates are zero.
    """
    if isinstance(compress, powerSGD_hook.PowerSGDState):
        return dropgrad_wrapper(powerSGD_hook.powerSGD_hook, state=compress)
    if not isinstance(compress, str):
        raise TypeError("compress must be 'bf16', 'fp16', 'powersgd' or a PowerSGDState, "
                        f"got {type(compress).__name__}")
    if compress == "bf16":
        return dropgrad_wrapper(default_hooks.bf16_compress_hook)
    if compress == "fp16":
        return dropgrad_wrapper(default_hooks.fp16_compress_hook)
    if compress == "powersgd":
        return dropgrad_wrapper(powerSGD_hook.powerSGD_hook,
                                state=powerSGD_hook.PowerSGDState(process_group=process_group))
    raise ValueError(f"compress must be 'bf16', 'fp16', 'powersgd' or a PowerSGDState, got {compress!r}")


# Accelerate's DDPCommunicationHookType names -> the compress option that composes the same hook.
_ACCELERATE_HOOKS = {"FP16": "fp16", "BF16": "bf16", "POWER_SGD": "powersgd"}


def accelerate_compression(accelerator: "Accelerator", model: nn.Module, compress: Any, communication: str) -> Any:
    """The compression to compose with the mask: ``compress``, or what Accelerate's comm_hook set.

    Accelerate registered its hook in ``prepare`` and DDP keeps the first one: the model is then
    given a fresh reducer (the same buckets and parameters) so the composed hook replaces it.
    """
    handler = getattr(accelerator, "ddp_handler", None)
    accel_hook = getattr(getattr(handler, "comm_hook", None), "name", "NO")
    accel_wrapper = getattr(getattr(handler, "comm_wrapper", None), "name", "NO")
    if accel_hook != "NO" or accel_wrapper != "NO":
        if accel_hook not in _ACCELERATE_HOOKS or accel_wrapper != "NO":
            raise ValueError(f"Accelerate's DistributedDataParallelKwargs(comm_hook={accel_hook}, "
                             f"comm_wrapper={accel_wrapper}) cannot be composed with DropGrad's mask; set "
                             "comm_hook to FP16, BF16 or POWER_SGD without comm_wrapper, or leave it unset "
                             "and pass dropgrad=dict(compress='fp16'|'bf16'|'powersgd')")
        wanted = _ACCELERATE_HOOKS[accel_hook]
        if wanted == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
            wanted = PowerSGDState(None, **handler.comm_state_option)
        if compress is not None and compress != wanted:
            raise ValueError(f"dropgrad compress={compress!r} disagrees with Accelerate's comm_hook={accel_hook}; "
                             "set one of them")
        compress = wanted if compress is None else compress
        _drop_registered_hook(model)
    if compress is not None and communication != "dense":
        raise ValueError("dropgrad compress= composes the dense mask with a compressing all-reduce; "
                         "it needs communication='dense' (compact sends only kept coordinates itself)")
    return compress


def _drop_registered_hook(model: nn.Module) -> None:
    """Give the DDP model a fresh reducer without a hook, built as DDP's own unpickling builds it.

    Called right after ``accelerator.prepare`` (no backward has run), so nothing is lost.
    """
    parameters, expect_sparse_gradient = model._build_params_for_reducer()
    names = model._build_debug_param_to_name_mapping(parameters)
    model._ddp_init_helper(parameters, expect_sparse_gradient, names, model.static_graph)
    if model.static_graph:
        model.reducer._set_static_graph()
        model.logger._set_static_graph()
    model._comm_hooks = []
