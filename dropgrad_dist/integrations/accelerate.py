"""Accelerate integration: one call after ``accelerator.prepare`` applies every regularizer where it belongs.

``prepare_regularizers(accelerator, model, optimizer, dropgrad={...}, clipping={...}, restarts={...}, gnp={...})``:

- DropGrad: under DDP (``MULTI_GPU``, ``MULTI_CPU``) the DDP communication hook masks the
  all-reduced buckets; under FSDP (1 and 2) and in one process (CPU, one GPU, MPS) the
  :class:`~dropgrad_dist.DropGrad` wrapper masks the (sharded) gradients;
- clipping (:class:`~dropgrad_dist.GradientClipper`) and restarts (:class:`~dropgrad_dist.Restarter`)
  become part of the optimizer step;
- the gradient norm penalty / SAM (:class:`~dropgrad_dist.GradientNormPenalty`) wraps the gradient
  computation: step with ``regularizers.step(closure)``.

The gradient the optimizer steps on is built the same way in every layout: **DropGrad mask,
then clipping (on unscaled gradients under a GradScaler), then the step**, then the restart
average. The wrappers sit inside Accelerate's ``AcceleratedOptimizer``, so ``optimizer.step()``,
``accelerator.accumulate()``, GradScaler skips (nothing advances) and LR schedulers work as
usual. ``save_state``/``load_state`` resume exactly: the regularizers' state is plain data written
as JSON (``dropgrad_dist_state_<i>.json``, plus ``..._rank<r>.safetensors`` for restart sums)
through Accelerate's save/load state hooks, never pickled, so a tampered checkpoint cannot run code.
``prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)`` is the DropGrad-only form.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..clipping.clipper import ClippedOptimizer, GradientClipper
from ..clipping.restarts import Restarter, RestartingOptimizer
from ..core import checkpoint as _checkpoint
from ..core.checks import ArgumentTypeError
from ..dropgrad.optimizer import DropGrad
from ..dropgrad.plan import RateSpec
from ..dropgrad.schedules import DropRateScheduler
from ..gnp.penalty import GradientNormPenalty
from ..layout.norms import grad_norms
from ..layout.shards import flat_param_pieces
from ..mask import keep_probability
from .accelerate_checkpoints import attach_to_checkpoints

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["DropGradHandle", "Regularizers", "check_launch", "enable_fsdp_on_cpu", "prepare_dropgrad",
           "prepare_regularizers"]

Mode = Literal["ddp_hook", "fsdp_wrapper", "wrapper", "deepspeed_zero"]
_DROPGRAD_KEYS = frozenset({"drop_rate", "params", "drop_rate_scheduler", "seed", "communication", "compress",
                            "full_update_drop", "step_skip_rate"})


class Regularizers:
    """What :func:`prepare_regularizers` applied; saved and loaded with ``accelerator.save_state``/``load_state``.

    Attributes: ``mode`` (how DropGrad runs: ``"ddp_hook"``, ``"fsdp_wrapper"``, ``"wrapper"``),
    ``dropgrad`` (a ``DropGradHookState`` or ``DropGrad``, or None), ``clipper``, ``restarter``.
    ``strict_load`` (default True) is the ``strict`` of loads through ``accelerator.load_state``.
    """

    def __init__(self, mode: Mode, model: nn.Module, dropgrad: Any = None, clipper: GradientClipper | None = None,
                 restarter: Restarter | None = None, gnp: GradientNormPenalty | None = None,
                 accelerator: Accelerator | None = None, optimizer: Any = None, *,
                 penalty_step: Callable[..., Any] | None = None, restart_model: nn.Module | None = None) -> None:
        self.mode = mode
        self.model = model
        # The module whose parameters the restarter averages and saves (DeepSpeed: the fp32 master fragments).
        self._restart_model = restart_model if restart_model is not None else model
        self.dropgrad = dropgrad
        self.clipper = clipper
        self.restarter = restarter
        self.gnp = gnp
        self._accelerator = accelerator
        self._optimizer = optimizer  # the AcceleratedOptimizer
        # What runs one GNP/SAM step: the wrapper's own step, or (DeepSpeed) the two passes around its ZeRO step.
        self._penalty_step = penalty_step if penalty_step is not None else (gnp.step if gnp is not None else None)
        # accelerator.load_state takes no options: set False to resume with a changed configuration.
        self.strict_load = True

    # -- DropGrad-only conveniences (the handle prepare_dropgrad used to return) -------------------
    @property
    def target(self) -> Any:
        """The DropGrad object: a ``DropGradHookState`` (DDP) or a ``DropGrad`` wrapper."""
        return self.dropgrad

    @property
    def step_index(self) -> int:
        """Optimizer steps DropGrad has taken (the ``t`` of the masks)."""
        return self.dropgrad.step_index

    @property
    def drop_rate(self) -> float | None:
        """The default drop rate at the current step; assignable (validated; masks from the next step)."""
        return self.dropgrad.plan.default_rate() if self.dropgrad is not None else None

    @drop_rate.setter
    def drop_rate(self, rate: float) -> None:
        if self.dropgrad is None:
            raise ValueError("drop_rate: prepare_regularizers was called without dropgrad=")
        self.dropgrad.drop_rate = rate

    def step(self, closure: Callable[[], Any]) -> Any:
        """One optimizer step with gradient norm penalty / SAM: ``closure`` runs twice (see ``GradientNormPenalty``).

        The closure computes the loss, calls ``accelerator.backward(loss)`` and returns the loss; to
        accumulate, it loops over micro-batches itself (``accelerator.no_sync(model)`` on all but the
        last), with the Accelerator's ``gradient_accumulation_steps`` left at 1. Under fp16 the
        accelerator's GradScaler steps (a non-finite pass skips the step); the LR scheduler sees the skip.
        Under DeepSpeed ZeRO each pass is one ``accelerator.backward`` (docs/deepspeed.md).
        """
        if self.gnp is None:
            raise ValueError("Regularizers.step(closure) runs the gradient norm penalty; without gnp= call "
                             "optimizer.step() as usual")
        if not self._accelerator.sync_gradients:
            raise ValueError("GNP/SAM accumulates inside its closure: create the Accelerator with "
                             "gradient_accumulation_steps=1 and loop over micro-batches in the closure")
        before = self.gnp.step_index
        loss = self._penalty_step(closure, scaler=self._accelerator.scaler)
        # AcceleratedOptimizer.step_was_skipped: what its schedulers read to skip their step too.
        self._optimizer._is_overflow = self.gnp.step_index == before
        return loss

    def gradient_norm(self) -> float:
        """The global L2 norm of the gradient as clipping would see it now: masked, unscaled, all shards.

        Call it after ``accelerator.backward`` and before ``optimizer.step()`` (e.g. to log the norm
        of a run without clipping). In wrapper modes it masks first (the step will not mask again);
        under a GradScaler it unscales first (``accelerator.unscale_gradients``, as ``clip_grad_norm_`` does).
        """
        if self.mode == "deepspeed_zero":
            raise ValueError("gradient_norm: under DeepSpeed accelerator.backward already stepped (the gradient lives "
                             "in DeepSpeed's partitions only inside its step); with clipping=, read "
                             "metrics()['grad_norm']")
        if isinstance(self.dropgrad, DropGrad) and not self.dropgrad.full_update_drop and self._final_micro_batch():
            self.dropgrad.mask_gradients_()
        if self._accelerator is not None and self._accelerator.scaler is not None:
            self._accelerator.unscale_gradients()
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        return float(grad_norms(params, flat_param_pieces(params, self.model)).total)

    def _final_micro_batch(self) -> bool:
        """Whether gradients are complete (Accelerate synchronizes): only then may the wrapper mask.

        Masking an intermediate micro-batch would let the next ones accumulate into dropped
        coordinates; the DDP hook, too, masks only the synchronized (final) gradient.
        """
        return self._accelerator is None or bool(self._accelerator.sync_gradients)

    def describe(self) -> str:
        """One line: what runs, and how."""
        parts = []
        if self.dropgrad is not None:
            parts.append(f"DropGrad p={self.drop_rate} as {self.mode}")
        if self.clipper is not None:
            parts.append(f"clipping {self.clipper.method}")
        if self.restarter is not None:
            parts.append(f"restarts from {self.restarter.first_restart_steps} steps x{self.restarter.restart_coeff}")
        if self.gnp is not None:
            parts.append(f"gradient norm penalty alpha={self.gnp.alpha} r={self.gnp.r} ({self.gnp.perturbation}, "
                         f"warmup {self.gnp.warmup})")
        return "; ".join(parts) or "none"

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging per step: drop rate, kept fraction, bytes (DDP hook), gradient norm, clipping."""
        out: dict[str, float] = {}
        if self.dropgrad is not None:
            rate = self.drop_rate or 0.0
            out.update(drop_rate=rate, kept_fraction=keep_probability(rate))
            if self.mode == "ddp_hook":
                out["bytes_communicated"] = float(self.dropgrad.bytes_communicated)
                out["bytes_dense_equivalent"] = float(self.dropgrad.bytes_dense_equivalent)
        stats = self.clipper.last_stats if self.clipper is not None else None
        if stats is not None:
            out.update(grad_norm=stats["norm"], grad_norm_clipped=stats["norm_after"], clipped=float(stats["clipped"]),
                       clip_level=stats["level"])
            if stats["coefficient"] is not None:
                out["clip_coefficient"] = stats["coefficient"]
        if self.restarter is not None:
            out["restarts"] = float(self.restarter.restarts)
        if self.gnp is not None:
            out["gnp_alpha"], out["gnp_r"] = self.gnp.coefficients(self.gnp.step_index - 1)
        return out

    # -- checkpointing (rules: dropgrad_dist.core.checkpoint) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: DropGrad's mode and state, the clipper's and the restarter's counters."""
        state: dict[str, Any] = {"mode": self.mode}
        if self.dropgrad is not None:
            is_hook = self.mode == "ddp_hook"
            state["dropgrad"] = self.dropgrad.state_dict() if is_hook else self.dropgrad.own_state_dict()
        if self.clipper is not None:
            state["clipping"] = self.clipper.state_dict()
        if self.restarter is not None:
            state["restarts"] = {k: v for k, v in self.restarter.state_dict().items() if k != "sums"}
        if self.gnp is not None:
            state["gnp"] = self.gnp.own_state_dict()
        return state

    def restart_sums(self) -> dict[str, torch.Tensor]:
        """This rank's restart sums (local shards), by canonical parameter name."""
        return self.restarter.state_dict(self._restart_model)["sums"] if self.restarter is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool | None = None,
                        restart_sums: Mapping[str, torch.Tensor] | None = None) -> None:
        """Restore every regularizer's state; validated completely before anything changes."""
        self.prepare_state(state_dict, strict, restart_sums)()

    def prepare_state(self, state_dict: Mapping[str, Any], strict: bool | None = None,
                      restart_sums: Mapping[str, torch.Tensor] | None = None) -> Callable[[], None]:
        """Validate every regularizer's state completely and return what applies it."""
        strict = self.strict_load if strict is None else strict
        owner = "Regularizers"
        mode = _checkpoint.read_field(state_dict, "mode", lambda value, _: value, owner)
        if mode != self.mode:
            raise ValueError(f"checkpoint was saved with DropGrad as {mode!r}, this run applies it as {self.mode!r}")
        sections = {}
        for name, present in (("dropgrad", self.dropgrad), ("clipping", self.clipper), ("restarts", self.restarter),
                              ("gnp", self.gnp)):
            if (name in state_dict) != (present is not None):
                raise ValueError(f"checkpoint {'has' if name in state_dict else 'has no'} {name} state, this run "
                                 f"{'uses' if present is not None else 'does not use'} {name}")
            if present is not None:
                sections[name] = _checkpoint.read_field(state_dict, name, _section, owner)
        applies = []
        if self.dropgrad is not None:
            prepare = self.dropgrad.prepare_state if self.mode == "ddp_hook" else self.dropgrad.prepare_own_state
            applies.append(prepare(sections["dropgrad"], strict))
        if self.clipper is not None:
            applies.append(self.clipper.prepare_state(sections["clipping"], strict))
        if self.restarter is not None:
            full = {**sections["restarts"], "sums": dict(restart_sums or {})}
            applies.append(self.restarter.prepare_state(full, self._restart_model, strict))
        if self.gnp is not None:
            applies.append(self.gnp.prepare_own_state(sections["gnp"], strict))

        def apply() -> None:
            for apply_one in applies:
                apply_one()

        return apply

    def prepare_checkpoint(self, input_dir: str) -> Callable[[], None]:
        """Read and validate this handle's files in ``input_dir`` (JSON, this rank's restart sums).

        Returns the function that applies them."""
        state = _checkpoint.read_json(os.path.join(input_dir, f"{self._stem}.json"), "dropgrad_dist")
        sums = None
        if self.restarter is not None:
            sums = _checkpoint.read_tensors(os.path.join(input_dir, f"{self._stem}_rank{self._rank}.safetensors"),
                                            "dropgrad_dist")
        return self.prepare_state(state, restart_sums=sums)


DropGradHandle = Regularizers  # the name prepare_dropgrad's handle had


def _section(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict, got {type(value).__name__}")
    return value


def _install_step_chain(accelerated: Any, chain: torch.optim.Optimizer) -> None:
    """Put ``chain`` (wrappers around the user's optimizer) inside Accelerate's AcceleratedOptimizer."""
    accelerated.optimizer = chain
    if getattr(accelerated, "scaler", None) is not None:
        # AcceleratedOptimizer swaps in a patched step (to detect GradScaler skips) around
        # scaler.step; point both saved methods at the chain's step, not at the inner optimizer's.
        from accelerate.optimizer import patch_optimizer_step

        accelerated._optimizer_original_step_method = chain.step
        accelerated._optimizer_patched_step_method = patch_optimizer_step(accelerated, chain.step)


_FORWARDING: dict[type, type] = {}  # AcceleratedOptimizer class -> its subclass with ``drop_rate``


def _forward_drop_rate(accelerated: Any, dropgrad: Any) -> None:
    """``accelerated.drop_rate`` reads and assigns the rate of ``dropgrad`` (the wrapper or the hook state).

    ``AcceleratedOptimizer`` forwards no attributes to what it wraps, so without this an assignment
    would set an attribute nobody reads. Properties live on the class: give this instance a subclass.
    """
    base = type(accelerated)
    if base not in _FORWARDING:
        def get(self: Any) -> float | None:
            return self._dropgrad_dist_target.drop_rate

        def set_(self: Any, rate: float) -> None:
            self._dropgrad_dist_target.drop_rate = rate  # validated there; masks from the next step

        _FORWARDING[base] = type(base.__name__, (base,), {
            "drop_rate": property(get, set_, doc="DropGrad's default drop rate (assignable between steps)"),
            "__module__": base.__module__})
    accelerated._dropgrad_dist_target = dropgrad
    accelerated.__class__ = _FORWARDING[base]


def _guard_accelerator_clipping(accelerator: Accelerator, dropgrad: DropGrad | None, clipping: bool) -> None:
    """``accelerator.clip_grad_norm_``/``clip_grad_value_``: mask first (order), or refuse (double clipping).

    The DDP hook masks inside backward, before any clipping; masking here first gives the step
    wrapper the same order, so DDP, FSDP and one process compute the same update.
    """
    for name in ("clip_grad_norm_", "clip_grad_value_"):
        clip = getattr(accelerator, name)

        def guarded(*args: Any, _clip=clip, _name=name, **kwargs: Any) -> Any:
            if clipping:
                raise RuntimeError(f"accelerator.{_name} would clip a second time: prepare_regularizers(clipping=...) "
                                   "already clips inside optimizer.step(); remove the accelerator call")
            # Between micro-batches the gradient is partial: mask only the final one (as the DDP hook does).
            if dropgrad is not None and not dropgrad.full_update_drop and accelerator.sync_gradients:
                dropgrad.mask_gradients_()
            return _clip(*args, **kwargs)

        setattr(accelerator, name, guarded)


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin: Any = None) -> None:
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


def check_launch(accelerator: Accelerator) -> None:
    """Refuse an Accelerator that runs alone (``DistributedType.NO``) among several ranks of a process group.

    ``accelerate launch --multi_gpu`` on a machine without a usable GPU (a CUDA build of torch,
    no driver) starts the ranks and their process group, but Accelerate then falls back to one
    process per rank: every rank would train as a separate run, on the same data, and save over
    the others' checkpoints. Raises ``ValueError`` saying how to launch instead.
    """
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.NO:
        return
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    world = dist.get_world_size()
    raise ValueError(
        f"Accelerate runs this process alone (DistributedType.NO, {accelerator.num_processes} process, device "
        f"{accelerator.device}) while torch.distributed has a process group of {world} ranks (backend "
        f"{dist.get_backend()!r}): the {world} ranks would train as separate runs. This happens when "
        f"`accelerate launch --multi_gpu` finds no usable GPU (torch.cuda.is_available() is "
        f"{torch.cuda.is_available()}). To train on CPU processes, create the Accelerator with cpu=True "
        "(examples/vit/train.py: add --cpu, or use launch/cpu_ddp.sh), which runs MULTI_CPU over gloo")


def _unsupported(distributed_type: Any) -> ValueError:
    return ValueError(f"prepare_regularizers does not support Accelerate's {distributed_type} setup; supported: "
                      "NO (CPU, one GPU, MPS), MULTI_GPU, MULTI_CPU (DDP comm hook), FSDP (versions 1, 2) and "
                      "DEEPSPEED (ZeRO stage 1, 2, 3)")


def _options(value: Mapping[str, Any] | None, argument: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict of keyword arguments, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed) if allowed is not None else []
    if unknown:
        raise ValueError(f"{argument}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    return dict(value)


def prepare_regularizers(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    dropgrad: Mapping[str, Any] | None = None,
    clipping: Mapping[str, Any] | None = None,
    restarts: Mapping[str, Any] | None = None,
    gnp: Mapping[str, Any] | None = None,
) -> Regularizers:
    """Apply gradient regularizers to a prepared model and optimizer: mask, then clip, then step.

    Math: ``g <- clip(m_t * g / (1 - p))``, then the optimizer's update, then (restarts) the
    iterate average at the end of each period; with ``gnp``, ``g`` is first the penalized
    gradient ``(1 - alpha) grad L(theta) + alpha grad L(theta + r grad L / ||grad L||)``.

    Args:
        accelerator, model, optimizer: what ``accelerator.prepare`` returned.
        dropgrad: :class:`~dropgrad_dist.DropGrad` options (``drop_rate``, ``params``,
            ``drop_rate_scheduler``, ``seed``, ``full_update_drop``, ``step_skip_rate``),
            ``communication`` (``"dense"``/``"compact"``, the DDP hook's) and ``compress``
            (DDP only: ``"bf16"``/``"fp16"``/``"powersgd"`` or a ``PowerSGDState``: mask, then
            compress; see :func:`~dropgrad_dist.compressed_hook`). Accelerate's own
            ``DistributedDataParallelKwargs(comm_hook=...)`` is read and composed the same way.
        clipping: :class:`~dropgrad_dist.GradientClipper` options (``method``, ``clipping_level``,
            ``beta``, ``p_autoclip``, ``history_size``, ``seed``).
        restarts: :class:`~dropgrad_dist.Restarter` options.
        gnp: :class:`~dropgrad_dist.GradientNormPenalty` options (``alpha``, ``r``, ``warmup``,
            ``warmup_steps``, ``perturbation``, ``adaptive``, ``mix``, ``every``, ``probability``,
            ``seed``, ``replay_rng``, ``bn_stats_from_first_pass``); SAM is ``alpha=1, r=rho``. Step with
            ``regularizers.step(closure)``.
    """
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType

    if not isinstance(optimizer, AcceleratedOptimizer):
        raise ArgumentTypeError("optimizer must be the optimizer returned by accelerator.prepare "
                         f"(an AcceleratedOptimizer), got {type(optimizer).__name__}")
    for earlier in accelerator.__dict__.get("_dropgrad_dist_handles", []):
        if earlier._optimizer is optimizer or earlier.model is model:
            raise ValueError("prepare_regularizers was already applied to this "
                             f"{'optimizer' if earlier._optimizer is optimizer else 'model'}: a second call would "
                             "mask, clip or penalize the same gradients twice. Call it once with every regularizer")
    drop_options = _options(dropgrad, "dropgrad", _DROPGRAD_KEYS)
    communication = drop_options.pop("communication", "dense")
    if communication not in ("dense", "compact"):
        raise ValueError(f"communication must be 'dense' or 'compact', got {communication!r}")
    compress = drop_options.pop("compress", None)
    clip_options, restart_options = _options(clipping, "clipping"), _options(restarts, "restarts")
    gnp_options = _options(gnp, "gnp")
    check_launch(accelerator)
    kind = accelerator.distributed_type
    if kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        mode: Mode = "ddp_hook"
    elif kind in (DistributedType.FSDP, DistributedType.NO):
        mode = "fsdp_wrapper" if kind == DistributedType.FSDP else "wrapper"
    elif kind == DistributedType.DEEPSPEED:
        if compress is not None:  # DeepSpeed reduces its partitions itself: there is no hook to compose with
            raise ValueError("dropgrad compress= composes with DDP's communication hook; DeepSpeed reduces "
                             "gradients itself (use its own communication_data_type instead)")
        return _prepare_deepspeed(accelerator, model, optimizer, drop_options if dropgrad is not None else None,
                                  clip_options if clipping is not None else None,
                                  restart_options if restarts is not None else None,
                                  gnp_options if gnp is not None else None)
    else:
        raise _unsupported(kind)

    chain = optimizer.optimizer
    restarter = Restarter(**restart_options) if restarts is not None else None
    if restarter is not None:
        chain = RestartingOptimizer(chain, restarter, model)
    clipper = GradientClipper(**clip_options, model=model) if clipping is not None else None
    if clipper is not None:
        chain = ClippedOptimizer(chain, clipper)
    drop = None
    if dropgrad is not None and mode == "ddp_hook":
        if drop_options.get("full_update_drop") or drop_options.get("step_skip_rate"):
            raise ValueError("full_update_drop and step_skip_rate need the step wrapper; under DDP DropGrad "
                             "masks gradients in the all-reduce hook (use FSDP or one process for them)")
        from ..ddp.compose import accelerate_compression, compressed_hook
        from ..ddp.hook import DropGradHookState

        # The hook counts optimizer steps through torch's global step hooks (fired by the inner
        # optimizer, not by AcceleratedOptimizer), so nothing here may advance it.
        compress = accelerate_compression(accelerator, model, compress, communication)
        drop = DropGradHookState(model, **drop_options, communication=communication)
        drop.register(model, compressed_hook(compress, drop.process_group) if compress is not None else None)
    elif dropgrad is not None:
        if compress is not None:
            raise ValueError(f"dropgrad compress={compress!r} composes with DDP's communication hook; "
                             f"Accelerate's {kind} setup has none (use it with MULTI_GPU or MULTI_CPU)")
        drop = chain = DropGrad(chain, **drop_options, model=model)
    penalty = GradientNormPenalty(chain, **gnp_options, model=model) if gnp is not None else None
    if penalty is not None:
        chain = penalty  # outermost: it computes the gradient that the rest masks, clips and steps on
    for wrapper in _wrappers(chain):
        wrapper.include_state_in_state_dict = False  # the JSON file holds it (FSDP drops extra keys)
    if chain is not optimizer.optimizer:
        _install_step_chain(optimizer, chain)
    _guard_accelerator_clipping(accelerator, drop if isinstance(drop, DropGrad) else None, clipper is not None)
    if drop is not None:
        _forward_drop_rate(optimizer, drop)
    handle = Regularizers(mode, model, drop, clipper, restarter, penalty, accelerator, optimizer)
    attach_to_checkpoints(accelerator, handle)
    return handle


def _prepare_deepspeed(accelerator: Accelerator, model: nn.Module, optimizer: Any, drop_options: dict[str, Any] | None,
                       clip_options: dict[str, Any] | None, restarts: Any,
                       gnp_options: dict[str, Any] | None) -> Regularizers:
    """DeepSpeed ZeRO: the regularizers act inside the ZeRO step (see :mod:`dropgrad_dist.integrations.deepspeed`)."""
    from .deepspeed import prepare_deepspeed

    hooked = prepare_deepspeed(accelerator, model, optimizer, dropgrad=drop_options, clipping=clip_options,
                               restarts=restarts, gnp=gnp_options)
    if hooked.dropgrad is not None:
        _forward_drop_rate(optimizer, hooked.dropgrad)
    handle = Regularizers("deepspeed_zero", model, hooked.dropgrad, hooked.clipper, hooked.restarter, hooked.penalty,
                          accelerator, optimizer, penalty_step=hooked.penalty_step, restart_model=hooked.masters)
    attach_to_checkpoints(accelerator, handle)
    return handle


def _wrappers(chain: torch.optim.Optimizer):
    from ..core.wrapper import OptimizerWrapper

    while isinstance(chain, OptimizerWrapper):
        yield chain
        chain = chain.optimizer


def prepare_dropgrad(
    accelerator: Accelerator,
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
) -> Regularizers:
    """DropGrad only: ``prepare_regularizers(..., dropgrad=dict(drop_rate=..., ...))``.

    Math: ``g <- m_t * g / (1 - p)`` before each optimizer step. Arguments as for
    :class:`~dropgrad_dist.DropGrad`; ``communication`` applies to the DDP hook.
    """
    return prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(
        drop_rate=drop_rate, params=params, drop_rate_scheduler=drop_rate_scheduler, seed=seed,
        communication=communication, full_update_drop=full_update_drop, step_skip_rate=step_skip_rate))
