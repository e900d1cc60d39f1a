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
* an *optimizer step*: a :class:`~dropgrad_dist.core.steps.StepWatch` (a global ``torch.optim`` step
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
holds a non-zero gradient, it raises instead of compounding masks. Those pre-hooks are installed
by the model's next forward only after such a round, e.g. right after a GradScaler skip (see
:mod:`.held_grads`); a step that follows every synchronized backward pays nothing per parameter.

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
``dropgrad_wrapper(other_hook)`` from :mod:`dropgrad_dist.ddp.compose` to combine). Every round
the ranks check, with one
asynchronous all-reduce of a dozen int64 fingerprints (:mod:`dropgrad_dist.core.agreement`), that
they agree on seed, communication, hook, rates, schedule, step ``t`` and the number of
``optimizer.step()`` calls since the previous round (``t`` advances once per round, so only this
count shows a rank that stepped twice); a disagreement raises on
every rank within the round, naming the field and the ranks (dense: at the last bucket, before
the optimizer can step; compact: at the first bucket, before sizes that depend on ``t`` are
sent). The check is the same collective every round, so one rank that loaded a checkpoint or
skipped an optimizer step is an error, not a hang. ``state_dict()`` holds the configuration,
step, schedule and byte counters (plain data, rules in :mod:`dropgrad_dist.core.checkpoint`);
pickling drops the process group and the model (like ``PowerSGDState``), and
``state.register(ddp_model)`` binds an unpickled state again. A ``DropGrad`` wrapper over the
same parameters would mask them twice: it raises instead. The state claims its parameters
(:mod:`dropgrad_dist.core.ownership`) in ``register`` and, since ``ddp_model.register_comm_hook(state,
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
from torch.nn.parallel import DistributedDataParallel

from .. import mask as _mask
from ..core.checks import check_seed
from ..core.collectives import then, without_backward_context
from ..core.ownership import claim_for_hook
from ..dropgrad.plan import DropPlan, PlannedRates, RateSpec
from ..dropgrad.schedules import DropRateScheduler
from ..layout.names import named_parameters
from .buckets import BucketTable, BucketTables, mask_table_
from .checkpoint import hook_state_dict, plan_spec, prepare_hook_state
from .held_grads import HeldGradientGuard
from .registration import check_registrable
from .registration import refuse_per_parameter_call as _refuse_per_parameter_call
from .rounds import Rounds

__all__ = ["DropGradHookState", "dropgrad_hook"]

Communication = Literal["dense", "compact"]
Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class DropGradHookState(PlannedRates):
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

    Public counters: ``step_index`` (optimizer steps that ran, the ``t`` of the masks),
    ``bytes_communicated`` and ``bytes_dense_equivalent`` (bytes all-reduced by :func:`dropgrad_hook`
    so far, and what dense all-reduces of the same buckets would have sent); ``rounds``
    (:class:`~dropgrad_dist.ddp.rounds.Rounds`: open round, agreement check, held send buffers).
    Register with ``state.register(ddp_model)``; ``state_dict()``/``load_state_dict()`` resume exactly.
    """

    # Pickling goes through __getstate__/__setstate__ (no process group, no model), as PowerSGDState's.
    __slots__ = ("seed", "communication", "process_group", "plan", "step_index", "bytes_communicated",
                 "bytes_dense_equivalent", "rounds", "_compact_via_index", "_model", "_known", "_tables", "_spec",
                 "_unbound_state", "_registered_on", "_hook_ran", "_suspended", "_guard", "__weakref__")

    def __init__(self, model: nn.Module, drop_rate: float | RateSpec | None = None, params: RateSpec | None = None,
                 *, drop_rate_scheduler: DropRateScheduler | None = None, seed: int = 0,
                 process_group: dist.ProcessGroup | None = None, communication: Communication = "dense") -> None:
        if communication not in ("dense", "compact"):
            raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        self._init_unbound(check_seed(seed), communication, process_group, 0, 0, 0)
        self._bind(model, drop_rate, params, drop_rate_scheduler)

    def _init_unbound(self, seed: int, communication: Communication, process_group: dist.ProcessGroup | None,
                step_index: int, sent: int, dense: int) -> None:
        self.seed, self.communication, self.process_group = seed, communication, process_group
        self.step_index, self.bytes_communicated, self.bytes_dense_equivalent = step_index, sent, dense
        self.plan: DropPlan | None = None
        self._spec = self._unbound_state = None  # the plan's arguments and state to load once bound (unpickled)
        self._model, self._known, self._tables = None, set(), BucketTables()
        self._guard: HeldGradientGuard | None = None
        self._registered_on: weakref.ref | None = None
        self._hook_ran = False  # a hook of this state has masked a whole round (claimed its parameters)
        self._suspended = False
        # Compact buckets through a bool mask and an index array (complex buckets always; benchmarks compare).
        self._compact_via_index = False
        self.rounds = Rounds("DropGradHookState", process_group)

    def _bind(self, model: nn.Module, drop_rate, params, drop_rate_scheduler) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a DistributedDataParallel model or a torch.nn.Module, "
                            f"got {type(model).__name__}")
        named = named_parameters(model, trainable_only=True)
        self.plan = DropPlan(named, drop_rate, params, drop_rate_scheduler, names_allowed=True)
        self._model, self._known, self._tables = model, {item.param for item in named}, BucketTables()
        self.rounds.watch(self._known, self.optimizer_stepped)
        self._guard = HeldGradientGuard(self, self.rounds, (entry.param for entry in self.plan.entries))
        self._guard.watch(model.module if isinstance(model, DistributedDataParallel) else model)

    def register(self, ddp_model: DistributedDataParallel | None = None, hook: Hook | None = None) -> None:
        """Register ``hook`` (default :func:`dropgrad_hook`) with this state on ``ddp_model``.

        ``ddp_model`` defaults to the DDP model the state was built from; an unpickled state is
        bound to ``ddp_model`` here. DDP accepts one communication hook per model.
        """
        target = check_registrable(ddp_model if ddp_model is not None else self._model,
                                   self._known if self.plan is not None else None)
        if self.plan is None:  # unpickled: rebuild the plan on this model, then load its state
            spec, state = self._spec, self._unbound_state
            self._bind(target, spec["drop_rate"], spec["params"], spec["scheduler"])
            self._spec = self._unbound_state = None
            self.load_state_dict(state)
        claim_for_hook((entry.param for entry in self.plan.entries), self)  # before DDP holds the hook
        self._guard.watch(target.module)  # what DDP's forward runs, if the state was built from another module
        target.register_comm_hook(self, hook if hook is not None else dropgrad_hook)
        self._registered_on = weakref.ref(target)

    def _registered_model(self) -> DistributedDataParallel | None:
        return self._registered_on and self._registered_on()

    def masks_in_ddp(self) -> bool:
        """Whether this state's hook masks gradients inside a DDP all-reduce (registered, or has run)."""
        return self._hook_ran or self._registered_model() is not None

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Backward passes inside average without masking (e.g. SAM's first pass); the same on every rank."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    @property
    def is_suspended(self) -> bool:
        """Whether backward passes now average without masking (inside :meth:`suspended`)."""
        return self._suspended

    def begin_bucket(self, bucket: dist.GradBucket, hook_name: str) -> None:
        """Every bucket; the first of a backward pass opens a round and starts the agreement check.

        The check is waited for by :meth:`settle_round` (compact, before its first all-reduce: what
        is sent depends on ``t``) or at the last bucket. A suspended round (see :meth:`suspended`)
        averages without masking.
        """
        if self.plan is None:
            raise RuntimeError("this DropGradHookState was unpickled and is not bound to a model: "
                               "call state.register(ddp_model) instead of ddp_model.register_comm_hook")
        if not self._hook_ran:  # ddp.register_comm_hook(state, hook) skips register: claim here
            claim_for_hook((p for p in bucket.parameters() if self.plan.entry(p) is not None), self)
            self._hook_ran = bucket.is_last()
        if not self.rounds.in_round:
            name = f"{hook_name} (suspended)" if self._suspended else hook_name
            self.rounds.open(self.agreement_fields(name), bucket.buffer().device, masking=not self._suspended)

    def settle_round(self) -> None:
        """Wait for the round's agreement check now (a disagreement raises on every rank); later calls return."""
        self.rounds.settle()

    def end_bucket(self, bucket: dist.GradBucket) -> None:
        """After every bucket: the last one closes the round (DDP reduces buckets in index order)."""
        if bucket.is_last():
            self.rounds.close()

    def abort_round(self) -> None:
        """A bucket raised: the round ends without its agreement check."""
        self.rounds.abort()

    def count_bytes(self, sent: int, dense: int) -> None:
        """Add to the traffic counters: ``sent`` bytes all-reduced, ``dense`` a dense all-reduce would send."""
        self.bytes_communicated += sent
        self.bytes_dense_equivalent += dense

    def optimizer_stepped(self) -> None:
        """The first optimizer step over this model's parameters after a round: ``t`` advances."""
        self.step_index += 1
        self.plan.advance()
        self.rounds.consumed()

    def agreement_fields(self, hook_name: str) -> dict[str, object]:
        """What every rank must hold equally (checked every round)."""
        scheduler = self.plan.scheduler
        return {"seed": self.seed, "communication": self.communication, "hook": hook_name,
                "rates": self.plan.config(), "step_index": self.step_index,
                "schedule position": scheduler.state_dict() if scheduler is not None else None,
                # Every optimizer.step() over the model since the last round, not just the one that
                # advanced t: a rank that steps twice diverges without changing t.
                "optimizer.step() calls since the last backward": self.rounds.steps_since_round()}

    def bucket_table(self, bucket: dist.GradBucket) -> BucketTable:
        """The bucket's segments and engine pieces, built once per bucket layout (see :mod:`.buckets`)."""
        return self._tables.table(bucket, self.plan, self._known)

    def bucket_engine(self, bucket: dist.GradBucket) -> _mask.SegmentTable | None:
        """The bucket's checked :class:`~dropgrad_dist.mask.SegmentTable` (None: it packs through an index)."""
        table = self.bucket_table(bucket)
        return None if self._compact_via_index or table.has_complex else table.engine(self.plan, bucket.buffer())

    def mask_bucket_(self, bucket: dist.GradBucket, world_size: int, keep: torch.Tensor | None) -> None:
        """In place: masked coordinates times ``keep / (1 - p) / world_size``, others ``/ world_size``.

        One engine call for the whole bucket; ``keep`` (bool, bucket-sized) receives the keep mask when given.
        """
        mask_table_(bucket.buffer(), self.bucket_table(bucket), self.plan, seed=self.seed, step=self.step_index,
                    scale=1.0 / world_size, keep=keep)

    @torch.no_grad()
    def mask_like_hook_(self, params: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        """``tensor <- keep(seed, t, key, p) * tensor / (1 - p)`` for whole gradients of ``params`` (no averaging)."""
        for param, tensor in zip(params, tensors):
            entry = self.plan.entry(param)
            rate = 0.0 if entry is None else self.plan.rate_of(entry)
            if rate > 0.0:  # drop_ masks a complex number as one coordinate, like a bucket's pairs
                _mask.drop_(tensor, seed=self.seed, step=self.step_index, key=entry.key, rate=rate)

    def state_dict(self) -> dict[str, Any]:
        """Step count, schedule position and byte counters (progress) and the configuration: plain data."""
        return dict(self._unbound_state) if self.plan is None else hook_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore progress; a different configuration raises unless ``strict=False``. Atomic."""
        self.prepare_state(state_dict, strict)()

    def prepare_state(self, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
        """Validate ``state_dict`` completely and return what applies it."""
        return prepare_hook_state(self, state_dict, strict)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state without the process group and the model (like ``PowerSGDState``)."""
        spec = self._spec if self.plan is None else plan_spec(self.plan)
        return {"seed": self.seed, "communication": self.communication, "spec": spec, "state": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore an unbound state; ``register(ddp_model)`` binds it (default process group)."""
        saved = state["state"]
        self._init_unbound(state["seed"], state["communication"], None, saved["step_index"],
                     saved.get("bytes_communicated", 0), saved.get("bytes_dense_equivalent", 0))
        self._spec, self._unbound_state = state["spec"], saved

    def __repr__(self) -> str:
        masked = len(self.plan.entries) if self.plan is not None else "unbound"
        return (f"DropGradHookState(seed={self.seed}, step_index={self.step_index}, "
                f"communication={self.communication!r}, masked_params={masked}, "
                f"bytes_communicated={self.bytes_communicated}, "
                f"bytes_dense_equivalent={self.bytes_dense_equivalent})")


def _group_size(state: DropGradHookState) -> int:
    return dist.get_world_size(state.process_group)


def dropgrad_hook(state: DropGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Mask the bucket with the state's seeded masks and average it across ranks.

    Dense: ``b <- all_reduce(b * keep / (1 - p) / n)``. Compact: all-reduce only the kept
    coordinates of that (plus one non-finite flag element) and scatter them back; dropped
    coordinates become zero. Per bucket:

    1. The first bucket of a backward pass opens a round: the agreement check starts.
    2. Dense (or suspended): mask and scale the bucket in place (suspended: only ``/ n``) and
       all-reduce it whole. Compact: pack the kept coordinates, wait for the agreement check
       (what is sent depends on ``t``; the pack overlaps the check's round trip), all-reduce
       them, unpack when done.
    3. Count the bytes sent and the dense equivalent.
    4. The last bucket closes the round: the agreement check is waited for, so a disagreement
       raises on every rank before any optimizer step.
    """
    _refuse_per_parameter_call(bucket)
    with without_backward_context():
        return _dropgrad_hook(state, bucket)


def _dropgrad_hook(state: DropGradHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    masking = not state.is_suspended
    compact = state.communication == "compact" and masking
    state.begin_bucket(bucket, "dropgrad_hook")  # 1.
    try:
        world_size = _group_size(state)
        buffer = bucket.buffer()
        if compact:  # 2.
            future, sent = _compact_all_reduce(state, bucket, world_size)
        else:
            if masking:
                state.mask_bucket_(bucket, world_size, keep=None)
            else:
                buffer.div_(world_size)  # a plain average (e.g. SAM's perturbation pass)
            future, sent = _all_reduce(buffer, state.process_group), buffer.numel() * buffer.element_size()
        state.count_bytes(sent, buffer.numel() * buffer.element_size())  # 3.
    except BaseException:
        state.abort_round()
        raise
    state.end_bucket(bucket)  # 4.
    return future


def _all_reduce(buffer: torch.Tensor, group: dist.ProcessGroup | None) -> torch.futures.Future[torch.Tensor]:
    work = dist.all_reduce(buffer, group=group, async_op=True)
    return then(work.get_future(), lambda fut: fut.value()[0])


def _kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the kept coordinates, ascending (the complex-bucket path).

    Indices rather than masked_select/masked_scatter_: the gather and the scatter then run
    branch-free. On CPU numpy's nonzero is branch-free too, ~10x faster than torch's on a random mask.
    """
    return _mask._kept_positions(keep)


def _compact_all_reduce(state: DropGradHookState, bucket: dist.GradBucket,
                        world_size: int) -> tuple[torch.futures.Future[torch.Tensor], int]:
    """All-reduce the kept coordinates of ``bucket * keep / (1 - p) / world_size`` and a non-finite flag.

    Returns the future of the bucket and the bytes sent.
    Real buckets: the engine packs (masks on the fly into a contiguous send buffer; no bool mask, no
    index array) and unpacks (recomputes the mask from the hash). Complex buckets: a mask and indices.
    """
    buffer, engine = bucket.buffer(), state.bucket_engine(bucket)
    if engine is None:
        return _compact_all_reduce_indexed(state, bucket, world_size)
    step = state.step_index  # the unpack must recompute the very masks the pack used
    # The kept count (so the send size) depends on no rank data: every rank sends the same size.
    send = engine.pack(buffer, seed=state.seed, step=step, extra_scale=1.0 / world_size)
    state.settle_round()  # the kept count depends on t: every rank agrees on it before any is sent
    state.rounds.sent.hold(send)

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        # Kept coordinates from the sum, dropped ones x * 0, + the summed flag on the first element.
        return engine.unpack_(buffer, fut.value()[0], seed=state.seed, step=step)

    work = dist.all_reduce(send, group=state.process_group, async_op=True)
    return then(work.get_future(), unpack), send.numel() * send.element_size()


def _compact_all_reduce_indexed(state: DropGradHookState, bucket: dist.GradBucket,
                                world_size: int) -> tuple[torch.futures.Future[torch.Tensor], int]:
    """The compact all-reduce through a bool mask and an index (buckets holding complex parameters)."""
    buffer = bucket.buffer()
    keep = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
    state.mask_bucket_(bucket, world_size, keep=keep)
    index = _kept_indices(keep)  # the same on every rank: masks depend on no rank data
    kept = index.numel()
    send = torch.empty(kept + 1, dtype=buffer.dtype, device=buffer.device)
    torch.index_select(buffer, 0, index, out=send[:kept])
    # Dropped coordinates are not sent, but a non-finite value there (NaN after masking) must
    # still make every rank's GradScaler skip. min * 0 + max * 0 is 0 unless one is inf or NaN;
    # unlike a sum it cannot overflow, and it stays in the bucket's dtype.
    low, high = torch.aminmax(buffer)
    send[kept:].copy_((low * 0 + high * 0).reshape(1))
    state.settle_round()
    state.rounds.sent.hold(send)

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        received = fut.value()[0]
        buffer.index_copy_(0, index, received[:kept])
        buffer[:1].add_(received[kept:])  # + 0, or + NaN when any rank saw a non-finite value
        return buffer

    work = dist.all_reduce(send, group=state.process_group, async_op=True)
    return then(work.get_future(), unpack), send.numel() * send.element_size()
