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
* an *optimizer step*: a :class:`~dropgrad_dist.steps.StepWatch` (a global ``torch.optim`` step
  post-hook) sees any optimizer whose parameters belong to the model step. The first such step after a round advances
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
one extra element (``sum(v * 0)`` over the masked bucket ``v``: ``0``, or ``NaN`` when any value
is not finite; it cannot overflow) carries dropped non-finite values to every rank, where it is
added to the first element of the bucket. Real buckets are packed and unpacked by the mask engine
(:func:`~dropgrad_dist.mask.pack_segments`: no bool mask, no index array); buckets holding complex
parameters go through a mask and an index.

Registration, agreement, checkpoints
------------------------------------
``state.register(ddp_model)`` registers the hook and, since DDP accepts one hook per model,
refuses a second one with a message naming the hook already there (use
``dropgrad_wrapper(other_hook)`` to combine). Every round the ranks check, with one
asynchronous all-reduce of a dozen int64 fingerprints (:mod:`dropgrad_dist.agreement`), that
they agree on seed, communication, hook, rates, schedule, step ``t`` and the number of
``optimizer.step()`` calls since the previous round (``t`` advances once per round, so only this
count shows a rank that stepped twice); a disagreement raises on
every rank within the round, naming the field and the ranks (dense: at the last bucket, before
the optimizer can step; compact: at the first bucket, before sizes that depend on ``t`` are
sent). The check is the same collective every round, so one rank that loaded a checkpoint or
skipped an optimizer step is an error, not a hang. ``state_dict()`` holds the configuration,
step, schedule and byte counters (plain data, rules in :mod:`dropgrad_dist.checkpoint`);
pickling drops the process group and the model (like ``PowerSGDState``), and
``state.register(ddp_model)`` binds an unpickled state again. A ``DropGrad`` wrapper over the
same parameters would mask them twice: it raises instead. The state claims its parameters
(:mod:`dropgrad_dist.ownership`) in ``register`` and, since ``ddp_model.register_comm_hook(state,
dropgrad_hook)`` bypasses ``register``, again when its hook first sees a bucket.

Complex parameters (DDP all-reduces them as pairs of reals) are masked per complex
coordinate, like the wrapper does; sparse gradients are refused.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as _checkpoint
from . import mask as _mask
from .agreement import AgreementCheck, PendingCheck
from .checks import check_count, check_seed
from .collectives import SentTensors, without_backward_context
from .ddp_buckets import BucketTable, BucketTables
from .ownership import claim_for_hook
from .params import DropPlan, RateSpec, named_parameters
from .schedules import DropRateScheduler, read_schedule_state
from .steps import StepWatch

__all__ = ["DropGradHookState", "compressed_hook", "dropgrad_hook", "dropgrad_wrapper"]

Communication = Literal["dense", "compact"]
Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]

class DropGradHookState:
    """State of :func:`dropgrad_hook`: which parameters are masked, the seed, and the step ``t``.

    Math: ``g_i <- mean_ranks(g_i) * keep_i(seed, t, key, p) / (1 - p)``, ``P(keep) = 1 - p``.

    Args:
        model: the ``DistributedDataParallel`` model (or the module inside it); its canonical
            parameter names are the mask keys, so masks equal ``DropGrad(..., model=model)``.
        drop_rate, params, drop_rate_scheduler: as in :class:`~dropgrad_dist.DropGrad`.
        seed: the mask seed, an int in ``[0, 2**64)``.
        process_group: the group DDP all-reduces over (None: the default group).
        communication: ``"dense"`` (all-reduce the masked bucket) or ``"compact"``
            (all-reduce only the kept coordinates, plus one element for non-finite values).

    Register with ``state.register(ddp_model)`` (or ``ddp_model.register_comm_hook(state,
    dropgrad_hook)``). ``step_index`` (optimizer steps taken, the ``t`` of the masks),
    ``bytes_communicated`` and ``bytes_dense_equivalent`` (cumulative bytes all-reduced by
    :func:`dropgrad_hook`, and what a dense all-reduce of the same buckets would have sent) are
    public counters; ``state_dict()``/``load_state_dict()`` resume the masks exactly.
    """

    # Compact all-reduce through a bool mask and an index array for every bucket, as before the pack
    # kernels (the same results; for before/after benchmarks). Complex buckets always take it.
    _compact_via_index = False

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
        if communication not in ("dense", "compact"):
            raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        self.seed = check_seed(seed)
        self.communication: Communication = communication
        self.process_group = process_group
        self.step_index = 0  # optimizer steps that ran: the ``t`` of the masks
        self.bytes_communicated = 0
        self.bytes_dense_equivalent = 0
        self._spec: dict[str, Any] | None = None  # the plan's arguments, while unbound (unpickled)
        self._unbound_state: dict[str, Any] | None = None  # state to load once bound (unpickled)
        self._registered_on: weakref.ref | None = None
        self._hook_ran = False  # a hook of this state has masked a whole round (claimed its parameters)
        self._suspended = False
        self._agreement = AgreementCheck("DropGradHookState", process_group)
        self._sent = SentTensors()  # the last round's send buffers (see collectives.py)
        self._reset_rounds()
        self._bind(model, drop_rate, params, drop_rate_scheduler)

    # -- binding to a model --------------------------------------------------------------------
    def _bind(self, model: nn.Module, drop_rate, params, drop_rate_scheduler) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a DistributedDataParallel model or a torch.nn.Module, "
                            f"got {type(model).__name__}")
        self._model = model
        named = named_parameters(model, trainable_only=True)
        self.plan = DropPlan(named, drop_rate, params, drop_rate_scheduler, names_allowed=True)
        self._known = {item.param for item in named}
        self._tables = BucketTables()
        self._install_watchers()

    def _install_watchers(self) -> None:
        this = weakref.ref(self)
        self._step_watch = StepWatch(self._known, self._optimizer_stepped, count_all=True)
        self._steps_at_round = 0  # the watch's step count when the last round opened
        handles = [entry.param.register_hook(_held_grad_check(this, weakref.ref(entry.param)))
                   for entry in self.plan.entries]
        # Tensor hooks outlive the state otherwise: drop them when it goes away.
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
        if getattr(self, "plan", None) is None:  # unpickled: rebuild the plan on this model, then its state
            spec, self._spec = self._spec, None
            self._bind(target, spec["drop_rate"], spec["params"], spec["scheduler"])
            state, self._unbound_state = self._unbound_state, None
            self.load_state_dict(state)
        elif any(p not in self._known for p in target.parameters() if p.requires_grad):
            raise ValueError("ddp_model holds parameters this state was not built from; "
                             "build DropGradHookState from the same model")
        if getattr(target, "_use_python_reducer", False):
            raise ValueError(_PYTHON_REDUCER)
        if getattr(target, "_comm_hooks", None):
            raise RuntimeError(
                "this DDP model already has a communication hook and DDP allows only one "
                f"({target._comm_hooks[0][0].__qualname__}); register DropGrad once, and to combine it "
                "with another hook register dropgrad_wrapper(other_hook) instead of both")
        claim_for_hook((entry.param for entry in self.plan.entries), self)  # before DDP holds the hook
        target.register_comm_hook(self, hook if hook is not None else dropgrad_hook)
        self._registered_on = weakref.ref(target)

    def _registered_model(self) -> DistributedDataParallel | None:
        return self._registered_on() if self._registered_on is not None else None

    def masks_in_ddp(self) -> bool:
        """Whether this state's hook masks gradients inside a DDP all-reduce (registered, or has run)."""
        return self._hook_ran or self._registered_model() is not None

    def _claim_bucket(self, bucket: dist.GradBucket) -> None:
        """``ddp.register_comm_hook(state, dropgrad_hook)`` skips ``register``: claim at the first bucket."""
        claim_for_hook((p for p in bucket.parameters() if self.plan.entry(p) is not None), self)
        if bucket.is_last():
            self._hook_ran = True

    @property
    def drop_rate(self) -> float | None:
        """The default drop rate at the current step (from the schedule if there is one)."""
        return self.plan.default_rate()

    @drop_rate.setter
    def drop_rate(self, rate: float) -> None:
        # Validated (ValueError); masks of the next round use it, and it is part of the agreement check.
        self.plan.set_drop_rate(rate)

    # -- rounds and steps --------------------------------------------------------------------------
    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Backward passes inside average gradients without masking them (e.g. SAM's first pass).

        Every rank must suspend the same passes (it is part of the agreement check).
        """
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    @torch.no_grad()
    def mask_like_hook_(self, params: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        """Multiply ``tensors`` (whole gradients of ``params``, e.g. saved copies) by this step's masks.

        ``tensor <- keep(seed, t, key, p) * tensor / (1 - p)``: what a round masks now, without averaging.
        """
        for param, tensor in zip(params, tensors):
            entry = self.plan.entry(param)
            if entry is None:
                continue
            rate = self.plan.rate_of(entry)
            if rate > 0.0:  # drop_ masks a complex number as one coordinate, like a bucket's pairs
                _mask.drop_(tensor, seed=self.seed, step=self.step_index, key=entry.key, rate=rate)

    def _reset_rounds(self) -> None:
        self._rounds_pending = 0  # synchronizing backward passes since the last optimizer step
        self._in_round = False
        self._pending_check: PendingCheck | None = None
        if getattr(self, "_step_watch", None) is not None:
            self._step_watch.disarm()

    def _enter(self, bucket: dist.GradBucket, hook_name: str, wait_now: bool) -> None:
        """Called for every bucket; the first bucket of a backward pass opens a round.

        Opening a round launches the agreement check; ``wait_now`` waits for it here (compact:
        what is sent depends on ``t``), otherwise the last bucket waits (dense: same sizes).
        A suspended round (see :meth:`suspended`) averages without masking and consumes nothing.
        """
        if self.plan is None:
            raise RuntimeError("this DropGradHookState was unpickled and is not bound to a model: "
                               "call state.register(ddp_model) instead of ddp_model.register_comm_hook")
        if not self._hook_ran:
            self._claim_bucket(bucket)
        if self._in_round:
            return
        name = f"{hook_name} (suspended)" if self._suspended else hook_name
        self._sent.release()  # the previous round's collectives completed before its optimizer step
        pending = self._agreement.start(self.agreement_fields(name), bucket.buffer().device)
        self._steps_at_round = self._step_watch.steps
        self._in_round = True
        if not self._suspended:
            self._rounds_pending += 1
            self._step_watch.arm()
        if wait_now and pending is not None:
            try:
                pending.wait()
            except BaseException:
                self._in_round = False
                raise
        else:
            self._pending_check = pending

    def _abort_round(self) -> None:
        self._in_round = False
        self._pending_check = None

    def _end_call(self, bucket: dist.GradBucket) -> None:
        if not bucket.is_last():  # DDP reduces buckets in index order; the last one closes the round
            return
        self._in_round = False
        pending, self._pending_check = self._pending_check, None
        if pending is not None:
            pending.wait()  # raises on every rank before any optimizer steps on these gradients

    def _optimizer_stepped(self) -> None:
        """The first optimizer step over this model's parameters after a round: ``t`` advances."""
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

    def agreement_fields(self, hook_name: str) -> dict[str, object]:
        """What every rank must hold equally (checked every round)."""
        scheduler = self.plan.scheduler
        return {"seed": self.seed, "communication": self.communication, "hook": hook_name,
                "rates": self.plan.config(), "step_index": self.step_index,
                "schedule position": scheduler.state_dict() if scheduler is not None else None,
                # Every optimizer.step() over the model since the last round, not just the one that
                # advanced t: a rank that steps twice diverges without changing t.
                "optimizer.step() calls since the last backward": self._step_watch.steps - self._steps_at_round}

    # -- masking a bucket ---------------------------------------------------------------------------
    def bucket_table(self, bucket: dist.GradBucket) -> BucketTable:
        """The bucket's segments and engine pieces, built once per bucket layout (see ddp_buckets.py)."""
        return self._tables.table(bucket, self.plan, self._known)

    def _mask_bucket_(self, bucket: dist.GradBucket, world_size: int, keep: torch.Tensor | None) -> None:
        """In place: masked coordinates times ``keep / (1 - p) / world_size``, others ``/ world_size``.

        One engine call for the whole bucket, whatever the number of parameters in it.
        """
        buffer, table = bucket.buffer(), self.bucket_table(bucket)
        if not table.has_complex:
            _mask.drop_segments_(buffer, table.pieces(self.plan), seed=self.seed, step=self.step_index,
                                 extra_scale=1.0 / world_size, mask_out=keep)
            return
        for offset, length, entry, is_complex in table.segments:  # rare: complex numbers are one coordinate
            view = buffer[offset:offset + length]
            keep_view = None if keep is None else keep[offset:offset + length]
            if entry is None:
                view.mul_(1.0 / world_size)
                if keep_view is not None:
                    keep_view.fill_(True)
                continue
            args = dict(seed=self.seed, step=self.step_index, key=entry.key, rate=self.plan.rate_of(entry),
                        extra_scale=1.0 / world_size)
            if not is_complex:
                _mask.drop_(view, mask_out=keep_view, **args)
                continue
            pair_keep = None if keep_view is None else torch.empty(length // 2, dtype=torch.bool, device=view.device)
            _mask.drop_pairs_(view.view(-1, 2), mask_out=pair_keep, **args)
            if keep_view is not None:
                keep_view.view(-1, 2).copy_(pair_keep[:, None])

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "communication": self.communication, **self.plan.config()}

    def state_dict(self) -> dict[str, Any]:
        """Step count, schedule position and byte counters (progress) and the configuration: plain data."""
        if self.plan is None:
            return dict(self._unbound_state)
        scheduler = self.plan.scheduler
        return _checkpoint.plain({
            "format": _checkpoint.FORMAT,
            "step_index": self.step_index,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "bytes_communicated": self.bytes_communicated,
            "bytes_dense_equivalent": self.bytes_dense_equivalent,
            "config": self._config(),
        })

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore progress; a different configuration raises unless ``strict=False``. Atomic."""
        self.prepare_state(state_dict, strict)()

    def prepare_state(self, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
        """Validate ``state_dict`` completely and return what applies it."""
        owner = "DropGradHookState"
        step_index = _checkpoint.read_field(state_dict, "step_index", check_count, owner)
        counters = [_checkpoint.read_field({"n": state_dict.get(name, 0)}, "n", check_count, f"{owner} {name}")
                    for name in ("bytes_communicated", "bytes_dense_equivalent")]
        saved_config = state_dict.get("config", {"seed": state_dict.get("seed")})
        _checkpoint.check_config(owner, saved_config, self._config(), strict)
        scheduler = self.plan.scheduler
        scheduler_state = read_schedule_state(owner, state_dict, scheduler, strict)

        def apply() -> None:
            if scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)  # a duck-typed schedule validates here
            self.step_index = step_index
            self.bytes_communicated, self.bytes_dense_equivalent = counters
            self._reset_rounds()

        return apply

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
        self._unbound_state = state["state"]
        self.step_index = state["state"]["step_index"]
        self.bytes_communicated = state["state"].get("bytes_communicated", 0)
        self.bytes_dense_equivalent = state["state"].get("bytes_dense_equivalent", 0)
        self._known = set()
        self._tables = BucketTables()
        self._model = None
        self._registered_on = None
        self._hook_ran = False
        self._suspended = False
        self._agreement = AgreementCheck("DropGradHookState", None)
        self._sent = SentTensors()
        self._reset_rounds()

    def __repr__(self) -> str:
        masked = len(self.plan.entries) if self.plan is not None else "unbound"
        return (f"DropGradHookState(seed={self.seed}, step_index={self.step_index}, "
                f"communication={self.communication!r}, masked_params={masked}, "
                f"bytes_communicated={self.bytes_communicated}, "
                f"bytes_dense_equivalent={self.bytes_dense_equivalent})")


def _held_grad_check(state_ref, param_ref) -> Callable[[torch.Tensor], None]:
    def check(grad: torch.Tensor) -> None:
        state, param = state_ref(), param_ref()
        if state is not None and param is not None:
            state._check_held_grad(param)
    return check


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _group_size(state: DropGradHookState) -> int:
    return dist.get_world_size(state.process_group)


def dropgrad_hook(state: DropGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Mask the bucket with the state's seeded masks and average it across ranks.

    Dense: ``b <- all_reduce(b * keep / (1 - p) / world_size)``. Compact: all-reduce only the
    kept coordinates (plus one non-finite flag element) and scatter them back; dropped
    coordinates become zero.
    """
    _refuse_per_parameter_call(bucket)
    with without_backward_context():
        return _dropgrad_hook(state, bucket)


def _dropgrad_hook(state: DropGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state._enter(bucket, "dropgrad_hook", wait_now=state.communication == "compact" and not state._suspended)
    try:
        world_size = _group_size(state)
        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        state.bytes_dense_equivalent += nbytes
        if state.communication == "compact" and not state._suspended:
            future = _compact_all_reduce(state, bucket, world_size)
        else:
            if state._suspended:
                buffer.div_(world_size)  # a plain average (e.g. SAM's perturbation pass)
            else:
                state._mask_bucket_(bucket, world_size, keep=None)
            state.bytes_communicated += nbytes
            work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
            future = work.get_future().then(lambda fut: fut.value()[0])
    except BaseException:
        state._abort_round()
        raise
    state._end_call(bucket)
    return future


def _kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the kept coordinates, ascending (the complex-bucket path).

    Indices rather than masked_select/masked_scatter_: the gather and the scatter then run
    branch-free. On CPU numpy's nonzero is branch-free too, ~10x faster than torch's on a random mask.
    """
    return _mask._kept_positions(keep)


def _compact_all_reduce(state: DropGradHookState, bucket: dist.GradBucket,
                        world_size: int) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the kept coordinates of ``bucket * keep / (1 - p) / world_size`` and a non-finite flag.

    Real buckets: the engine packs (masks on the fly into a contiguous send buffer; no bool mask, no
    index array) and unpacks (recomputes the mask from the hash). Complex buckets: a mask and indices.
    """
    buffer, table = bucket.buffer(), state.bucket_table(bucket)
    if state._compact_via_index or table.has_complex:
        return _compact_all_reduce_indexed(state, bucket, world_size)
    pieces = table.pieces(state.plan)
    step = state.step_index  # the unpack must recompute the very masks the pack used
    # The kept count (so the send size) depends on no rank data: every rank sends the same size.
    send = _mask.pack_segments(buffer, pieces, seed=state.seed, step=step, extra_scale=1.0 / world_size)
    state.bytes_communicated += send.numel() * send.element_size()
    state._sent.hold(send)

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        # Kept coordinates from the sum, dropped ones x * 0, + the summed flag on the first element.
        return _mask.unpack_segments_(buffer, pieces, fut.value()[0], seed=state.seed, step=step)

    work = dist.all_reduce(send, group=state.process_group, async_op=True)
    return work.get_future().then(unpack)


def _compact_all_reduce_indexed(state: DropGradHookState, bucket: dist.GradBucket,
                                world_size: int) -> torch.futures.Future[torch.Tensor]:
    """The compact all-reduce through a bool mask and an index (buckets holding complex parameters)."""
    buffer = bucket.buffer()
    keep = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
    state._mask_bucket_(bucket, world_size, keep=keep)
    index = _kept_indices(keep)  # the same on every rank: masks depend on no rank data
    kept = index.numel()
    send = torch.empty(kept + 1, dtype=buffer.dtype, device=buffer.device)
    torch.index_select(buffer, 0, index, out=send[:kept])
    # Dropped coordinates are not sent, but a non-finite value there (NaN after masking) must
    # still make every rank's GradScaler skip. min * 0 + max * 0 is 0 unless one is inf or NaN;
    # unlike a sum it cannot overflow, and it stays in the bucket's dtype.
    low, high = torch.aminmax(buffer)
    send[kept:].copy_((low * 0 + high * 0).reshape(1))
    state.bytes_communicated += send.numel() * send.element_size()
    state._sent.hold(send)

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        received = fut.value()[0]
        buffer.index_copy_(0, index, received[:kept])
        buffer[:1].add_(received[kept:])  # + 0, or + NaN when any rank saw a non-finite value
        return buffer

    work = dist.all_reduce(send, group=state.process_group, async_op=True)
    return work.get_future().then(unpack)


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
    byte counters do not move.
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
            state._enter(bucket, name, wait_now=False)
            try:
                keep = None
                if not state._suspended:
                    buffer = bucket.buffer()
                    if remask:
                        keep = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
                    state._mask_bucket_(bucket, 1, keep=keep)
                future = hook(state.process_group if inner_state is None else inner_state, bucket)
                if keep is not None:
                    future = future.then(_times_keep(keep))
            except BaseException:
                state._abort_round()
                raise
            state._end_call(bucket)
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


_PYTHON_REDUCER = (
    "DropGrad's DDP hook masks whole buckets; compiled DDP's python reducer "
    "(torch._dynamo.config.optimize_ddp = 'python_reducer') calls communication hooks once per "
    "parameter with (grad, param) inside compiled autograd, which it does not support. Use the "
    "default optimize_ddp (DDPOptimizer: torch.compile on the DDP model works with the hook), or "
    "the DropGrad optimizer wrapper on an uncompiled backward")


def _refuse_per_parameter_call(bucket: Any) -> None:
    if isinstance(bucket, tuple):
        raise RuntimeError(_PYTHON_REDUCER)
