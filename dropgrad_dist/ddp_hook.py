"""DropGrad as a DDP communication hook: every rank drops the same coordinates of every bucket.

For each parameter in a bucket, coordinate ``i`` of the gradient is multiplied by
``keep_i(seed, t, key, p) / (1 - p)`` (the engine's mask, ``key`` the canonical parameter name)
before or while the bucket is averaged, so a DDP run equals a single-process ``DropGrad`` run
on the global batch. ``communication="dense"`` folds ``1/(1-p)`` and ``1/world_size`` into one
multiply and all-reduces the whole bucket; ``"compact"`` all-reduces only the kept coordinates
(every rank knows the kept set without exchanging indices) and scatters them back.

Step semantics (the ``t`` of the masks)
----------------------------------------
``state.step_index`` counts optimizer steps that actually ran, exactly like
``DropGrad.step_index``. The hook cannot see the optimizer, so the state watches two events:

* a *round*: one backward pass that synchronizes gradients (the hook runs once per bucket;
  ``bucket.is_last()`` closes the round). Every round masks with the current ``t``.
* an *optimizer step*: a global ``torch.optim`` step post-hook fires after any optimizer whose
  parameters belong to the model has stepped. The first such step after a round advances
  ``t`` (and the drop-rate schedule, in lockstep); further optimizers stepping the same
  gradients (a wrapper and its inner optimizer, or two optimizers over parameter subsets) do
  not advance it again. A step skipped by ``GradScaler`` never calls ``optimizer.step()``, so
  ``t`` stays and the next round reuses it, as ``DropGrad`` does.

Gradient accumulation must go through ``model.no_sync()`` (what ``accelerator.accumulate()``
does): the hook then runs once per optimizer step, on the accumulated gradient. Synchronizing
every micro-batch without zeroing would mask the already-masked part again
(``m*s*(m*s*g1 + g2) != m*s*(g1 + g2)``). A per-parameter gradient pre-hook detects it: when a
backward starts after a round that no optimizer step consumed and a masked parameter still
holds a non-zero gradient, it raises instead of compounding masks. (That check costs a device
sync per parameter, and only in that rare situation, e.g. right after a GradScaler skip.)

The optimizer must be a ``torch.optim.Optimizer`` whose ``step()`` runs the global step hooks
(every subclass calling ``Optimizer.__init__`` does). Non-finite gradients on any rank make
every rank's GradScaler skip: masking multiplies (``inf * 0 = NaN``) and, in compact mode,
one extra element (``0`` or ``NaN``: the bucket sum minus itself) carries dropped non-finite
values to every rank, where it is added to the first element of the bucket.

Registration, agreement, checkpoints
------------------------------------
``state.register(ddp_model)`` registers the hook and, since DDP accepts one hook per model,
refuses a second one with a message naming the hook already there (use
``dropgrad_wrapper(other_hook)`` to combine). On the first round the ranks all-gather one
fingerprint per config field (seed, communication, hook, rates, schedule, step) and raise
naming the field and the ranks that differ. ``state_dict()`` holds seed, step, schedule and
byte counters; pickling drops the process group and the model (like ``PowerSGDState``), and
``state.register(ddp_model)`` binds an unpickled state again. Do not also wrap the optimizer
in ``DropGrad``: gradients would be masked twice.
"""

import hashlib
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.nn.parallel import DistributedDataParallel

from . import mask as _mask
from .params import DropPlan, ParamEntry, RateSpec, canonical_name
from .schedules import DropRateScheduler

__all__ = ["DropGradHookState", "dropgrad_hook", "dropgrad_wrapper"]

Communication = Literal["dense", "compact"]
Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class DropGradHookState:
    """State of :func:`dropgrad_hook`: which parameters are masked, the seed, and the step ``t``.

    Math: ``g_i <- mean_ranks(g_i) * keep_i(seed, t, key, p) / (1 - p)``, ``P(keep) = 1 - p``.

    Args:
        model: the ``DistributedDataParallel`` model (or the module inside it); its canonical
            parameter names are the mask keys, so masks equal ``DropGrad(..., model=model)``.
        drop_rate, params, drop_rate_scheduler: as in :class:`~dropgrad_dist.DropGrad`.
        seed: the mask seed.
        process_group: the group DDP all-reduces over (None: the default group).
        communication: ``"dense"`` (all-reduce the masked bucket) or ``"compact"``
            (all-reduce only the kept coordinates, plus one element for non-finite values).

    Register with ``state.register(ddp_model)`` (or ``ddp_model.register_comm_hook(state,
    dropgrad_hook)``). ``step_index`` (optimizer steps taken, the ``t`` of the masks),
    ``bytes_communicated`` and ``bytes_dense_equivalent`` (cumulative bytes all-reduced by
    :func:`dropgrad_hook`, and what a dense all-reduce of the same buckets would have sent) are
    public counters; ``state_dict()``/``load_state_dict()`` resume the masks exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        drop_rate: float | RateSpec | None = None,
        params: RateSpec | None = None,
        *,
        drop_rate_scheduler: DropRateScheduler | None = None,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        communication: Communication = "dense",
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if communication not in ("dense", "compact"):
            raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        self.seed = seed
        self.communication: Communication = communication
        self.process_group = process_group
        self.step_index = 0  # optimizer steps that ran: the ``t`` of the masks
        self.bytes_communicated = 0
        self.bytes_dense_equivalent = 0
        self._spec: dict[str, Any] | None = None  # the plan's arguments, while unbound (unpickled)
        self._reset_rounds()
        self._bind(model, drop_rate, params, drop_rate_scheduler)

    # -- binding to a model --------------------------------------------------------------------
    def _bind(self, model: nn.Module, drop_rate, params, drop_rate_scheduler) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a DistributedDataParallel model or a torch.nn.Module, "
                            f"got {type(model).__name__}")
        self._model = model
        named = [(canonical_name(name), p) for name, p in model.named_parameters() if p.requires_grad]
        self.plan = DropPlan(named, drop_rate, params, drop_rate_scheduler, names_are_canonical=True)
        self._known = {p for _, p in named}
        self._install_watchers()

    def _install_watchers(self) -> None:
        this = weakref.ref(self)
        handles = [register_optimizer_step_post_hook(
            lambda optimizer, args, kwargs: _on_optimizer_step(this, optimizer))]
        for entry in self.plan.entries:
            handles.append(entry.param.register_hook(_held_grad_check(this, weakref.ref(entry.param))))
        self._handles = handles
        # Hooks live in global/tensor registries; drop them when the state goes away.
        weakref.finalize(self, _remove_all, handles)

    def register(self, ddp_model: DistributedDataParallel | None = None, hook: Hook | None = None) -> None:
        """Register ``hook`` (default :func:`dropgrad_hook`) with this state on ``ddp_model``.

        ``ddp_model`` defaults to the DDP model the state was built from; an unpickled state is
        bound to ``ddp_model`` here. DDP accepts one communication hook per model.
        """
        target = ddp_model if ddp_model is not None else self._model
        if not isinstance(target, DistributedDataParallel):
            raise TypeError("DropGrad's communication hook needs a torch.nn.parallel.DistributedDataParallel "
                            f"model, got {type(target).__name__}; wrap the model in DDP first and pass it: "
                            "state.register(ddp_model)")
        if getattr(self, "plan", None) is None:  # unpickled: rebuild the plan on this model
            spec, self._spec = self._spec, None
            self._bind(target, spec["drop_rate"], spec["params"], spec["scheduler"])
        elif any(p not in self._known for p in target.parameters() if p.requires_grad):
            raise ValueError("ddp_model holds parameters this state was not built from; "
                             "build DropGradHookState from the same model")
        if getattr(target, "_comm_hooks", None):
            raise RuntimeError(
                "this DDP model already has a communication hook and DDP allows only one "
                f"({target._comm_hooks[0][0].__qualname__}); register DropGrad once, and to combine it "
                "with another hook register dropgrad_wrapper(other_hook) instead of both")
        target.register_comm_hook(self, hook if hook is not None else dropgrad_hook)

    # -- rounds and steps --------------------------------------------------------------------------
    def _reset_rounds(self) -> None:
        self._rounds_pending = 0  # synchronizing backward passes since the last optimizer step
        self._in_round = False
        self._agreed_on: str | None = None  # the hook name the ranks last agreed on

    def _enter(self, bucket: dist.GradBucket, hook_name: str) -> None:
        """Called for every bucket; the first bucket of a backward pass opens a round."""
        if self._in_round:
            return
        if self.plan is None:
            raise RuntimeError("this DropGradHookState was unpickled and is not bound to a model: "
                               "call state.register(ddp_model) instead of ddp_model.register_comm_hook")
        if self._agreed_on != hook_name:
            self._check_agreement(bucket.buffer().device, hook_name)
            self._agreed_on = hook_name
        self._rounds_pending += 1
        self._in_round = True

    def _end_call(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():  # DDP reduces buckets in index order; the last one closes the round
            self._in_round = False

    def _optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        if self._rounds_pending == 0 or self.plan is None:
            return  # no round since the last counted step: a second optimizer on the same grads
        if not any(p in self._known for group in optimizer.param_groups for p in group["params"]):
            return  # another model's optimizer
        self.step_index += 1
        self.plan.advance()
        self._rounds_pending = 0

    def _check_held_grad(self, param: torch.Tensor) -> None:
        unconsumed = self._rounds_pending - (1 if self._in_round else 0)
        if unconsumed > 0 and param.grad is not None and bool(param.grad.detach().ne(0).any()):
            raise RuntimeError(
                "DropGrad DDP hook: gradients were synchronized (and masked) and are still accumulated "
                "in .grad without an optimizer step in between. Accumulating gradients across "
                "synchronized micro-batches is not supported (masks would compound); accumulate "
                "inside model.no_sync() (or accelerator.accumulate()), or call optimizer.zero_grad() "
                "after a skipped step")

    # -- config agreement ---------------------------------------------------------------------------
    def _config(self, hook_name: str) -> dict[str, object]:
        scheduler = self.plan.scheduler
        return {
            "seed": self.seed,
            "communication": self.communication,
            "hook": hook_name,
            **self.plan.config(),
            "step_index": (self.step_index, scheduler.state_dict() if scheduler is not None else None),
        }

    def _check_agreement(self, device: torch.device, hook_name: str) -> None:
        config = self._config(hook_name)
        mine = torch.tensor([_fingerprint(v) for v in config.values()], dtype=torch.int64, device=device)
        group = self.process_group
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        table = torch.stack(gathered).cpu()
        for column, (field, value) in enumerate(config.items()):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                groups: dict[int, list[int]] = {}
                for rank, fingerprint in enumerate(values):
                    groups.setdefault(fingerprint, []).append(rank)
                split = " vs ".join(str(ranks) for ranks in groups.values())
                raise ValueError(f"DropGradHookState: ranks disagree on {field!r} (ranks {split}); "
                                 f"rank {dist.get_rank(group)} has {field}={value!r}. Build the state "
                                 "with the same arguments (and load the same state dict) on every rank")

    # -- masking a bucket ---------------------------------------------------------------------------
    def _segments(self, bucket: dist.GradBucket) -> list[tuple[int, int, ParamEntry | None]]:
        """``(offset, numel, entry)`` per parameter, in bucket order (views are laid out back to back)."""
        segments, offset = [], 0
        for param in bucket.parameters():
            if param not in self._known:
                raise ValueError("a DDP bucket holds a parameter this DropGradHookState was not built "
                                 "from: build the state from the DDP model it is registered on")
            segments.append((offset, param.numel(), self.plan.entry(param)))
            offset += param.numel()
        if offset != bucket.buffer().numel():
            raise RuntimeError(f"unexpected DDP bucket layout: parameters hold {offset} elements, "
                               f"the bucket {bucket.buffer().numel()}")
        return segments

    def _mask_bucket_(self, bucket: dist.GradBucket, world_size: int, keep: torch.Tensor | None) -> None:
        """In place: masked coordinates times ``keep / (1 - p) / world_size``, others ``/ world_size``."""
        buffer = bucket.buffer()
        for offset, numel, entry in self._segments(bucket):
            view = buffer[offset:offset + numel]
            keep_view = None if keep is None else keep[offset:offset + numel]
            if entry is None:
                if world_size != 1:
                    view.div_(world_size)
                if keep_view is not None:
                    keep_view.fill_(True)
            else:
                _mask.drop_(view, seed=self.seed, step=self.step_index, key=entry.key,
                            rate=self.plan.rate_of(entry), extra_scale=1.0 / world_size, mask_out=keep_view)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Seed, step count, schedule and byte counters: enough to resume the masks exactly."""
        scheduler = self.plan.scheduler if self.plan is not None else self._spec["scheduler"]
        return {
            "seed": self.seed,
            "step_index": self.step_index,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "bytes_communicated": self.bytes_communicated,
            "bytes_dense_equivalent": self.bytes_dense_equivalent,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.step_index = int(state_dict["step_index"])
        scheduler = self.plan.scheduler if self.plan is not None else self._spec["scheduler"]
        if state_dict.get("scheduler") is not None and scheduler is not None:
            scheduler.load_state_dict(state_dict["scheduler"])
        self.bytes_communicated = int(state_dict.get("bytes_communicated", 0))
        self.bytes_dense_equivalent = int(state_dict.get("bytes_dense_equivalent", 0))
        self._reset_rounds()  # re-check agreement: every rank must have loaded the same state

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state without the process group and the model (like ``PowerSGDState``)."""
        plan = self.plan
        spec = self._spec if plan is None else {
            "drop_rate": plan.drop_rate,
            "params": {e.key: e.fixed_rate for e in plan.entries if e.fixed_rate is not None},
            "scheduler": plan.scheduler,
        }
        return {"seed": self.seed, "communication": self.communication, "spec": spec,
                "state": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore an unbound state; ``register(ddp_model)`` binds it (default process group)."""
        self.seed = state["seed"]
        self.communication = state["communication"]
        self.process_group = None
        self.plan = None
        self._spec = state["spec"]
        self._known = set()
        self._model = None
        self.load_state_dict(state["state"])

    def __repr__(self) -> str:
        masked = len(self.plan.entries) if self.plan is not None else "unbound"
        return (f"DropGradHookState(seed={self.seed}, step_index={self.step_index}, "
                f"communication={self.communication!r}, masked_params={masked}, "
                f"bytes_communicated={self.bytes_communicated}, "
                f"bytes_dense_equivalent={self.bytes_dense_equivalent})")


def _on_optimizer_step(state_ref: "weakref.ref[DropGradHookState]", optimizer: torch.optim.Optimizer) -> None:
    state = state_ref()
    if state is not None:
        state._optimizer_stepped(optimizer)


def _held_grad_check(state_ref, param_ref) -> Callable[[torch.Tensor], None]:
    def check(grad: torch.Tensor) -> None:
        state, param = state_ref(), param_ref()
        if state is not None and param is not None:
            state._check_held_grad(param)
    return check


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _fingerprint(value: object) -> int:
    digest = hashlib.blake2b(repr(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _group_size(state: DropGradHookState) -> int:
    return dist.get_world_size(state.process_group)


def dropgrad_hook(state: DropGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Mask the bucket with the state's seeded masks and average it across ranks.

    Dense: ``b <- all_reduce(b * keep / (1 - p) / world_size)``. Compact: all-reduce only the
    kept coordinates (plus one non-finite flag element) and scatter them back; dropped
    coordinates become zero.
    """
    state._enter(bucket, "dropgrad_hook")
    try:
        world_size = _group_size(state)
        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        state.bytes_dense_equivalent += nbytes
        if state.communication == "dense":
            state._mask_bucket_(bucket, world_size, keep=None)
            state.bytes_communicated += nbytes
            work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        return _compact_all_reduce(state, bucket, world_size)
    finally:
        state._end_call(bucket)


def _kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the kept coordinates, ascending.

    Indices rather than masked_select/masked_scatter_: the gather and the scatter then run
    branch-free. On CPU numpy's nonzero is branch-free too, ~10x faster than torch's on a random mask.
    """
    if keep.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(keep.numpy()))
    return keep.nonzero().squeeze(1)


def _compact_all_reduce(state: DropGradHookState, bucket: dist.GradBucket,
                        world_size: int) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    keep = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
    state._mask_bucket_(bucket, world_size, keep=keep)
    index = _kept_indices(keep)  # the same on every rank: masks depend on no rank data
    kept = index.numel()
    send = torch.empty(kept + 1, dtype=buffer.dtype, device=buffer.device)
    torch.index_select(buffer, 0, index, out=send[:kept])
    # Dropped coordinates are not sent, but a non-finite value there (NaN after masking) must
    # still make every rank's GradScaler skip: s - s is 0 for a finite sum s, NaN otherwise.
    total = buffer.sum(dtype=torch.float32)
    send[kept:].copy_((total - total).reshape(1))
    state.bytes_communicated += send.numel() * send.element_size()

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        received = fut.value()[0]
        buffer.index_copy_(0, index, received[:kept])
        buffer[:1].add_(received[kept:])  # + 0, or + NaN when any rank saw a non-finite value
        return buffer

    work = dist.all_reduce(send, group=state.process_group, async_op=True)
    return work.get_future().then(unpack)


def dropgrad_wrapper(hook: Hook) -> Hook:
    """Mask first, then let ``hook`` (e.g. ``bf16_compress_hook``, ``allreduce_hook``) communicate.

    ``b <- hook(process_group, b * keep / (1 - p))``; ``hook`` receives ``state.process_group``
    as its state and averages the bucket. Register with
    ``state.register(ddp_model, dropgrad_wrapper(bf16_compress_hook))``; the state must use
    ``communication="dense"``. The traffic is the wrapped hook's: the byte counters do not move.
    """
    name = f"dropgrad_wrapper({getattr(hook, '__qualname__', type(hook).__name__)})"

    def dropgrad_wrapper_hook(state: DropGradHookState,
                              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if state.communication != "dense":
            raise ValueError("dropgrad_wrapper masks densely and lets the wrapped hook communicate: "
                             "build the state with communication='dense' (compact is dropgrad_hook's own)")
        state._enter(bucket, name)
        try:
            state._mask_bucket_(bucket, 1, keep=None)
        finally:
            state._end_call(bucket)
        return hook(state.process_group, bucket)

    dropgrad_wrapper_hook.__qualname__ = name
    return dropgrad_wrapper_hook
