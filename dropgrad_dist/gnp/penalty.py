"""Gradient norm penalty (GNP) and SAM as its special case, correct under DDP, FSDP, AMP and accumulation.

Penalizing ``lambda * ||grad L(theta)||`` has the finite-difference gradient

    g = (1 - alpha) * g1 + alpha * grad L(theta + e),   g1 = grad L(theta),   e = r * g1 / ||g1||,

``alpha = lambda / r``; SAM is ``alpha = 1``, ``r = rho``. ``adaptive=True`` (ASAM, Kwon et al.
2021) perturbs by ``e = r * T^2 g1 / ||T g1||`` with ``T = |theta|`` element-wise. ``mix="normalized"``
mixes the unit first gradient, ``(1 - alpha) g1 / ||g1|| + alpha g2`` (the GNP reference's
default). One step evaluates the closure at ``theta`` and at ``theta + e``, restores ``theta``
bitwise (from a copy), combines the two gradients in ``.grad`` (over the parameters with a
gradient in either pass, a missing one taken as zero) and steps the wrapped optimizer, whose
state sees only ``g``. The second pass replays the first pass's random state and leaves the
BatchNorm running statistics as the first pass left them (:mod:`dropgrad_dist.gnp.second_pass`).

Distributed semantics. ``||g1||`` (and ``||T g1||``) is the global L2 norm over all parameters
of the optimizer: across FSDP2/FSDP1 shards (one collective, :func:`dropgrad_dist.layout.norms.grad_norms`;
``T`` is applied element-wise to the local shard) and, with ``perturbation="global"``, of the
rank-averaged gradient (the first backward is synchronized), so a DDP run equals a one-process
run on the global batch. ``perturbation="local"`` (DDP only) perturbs each replica with its own
gradient (the first backward runs under ``no_sync()``; SAM's per-device variant); the
``(1 - alpha)`` term is then averaged across ranks so the replicas stay identical.
Composition: the combined ``g`` is what DropGrad masks and clipping clips (wrap them inside:
``GradientNormPenalty(DropGrad(ClippedOptimizer(opt, clipper)))``); the perturbation uses the
unmasked first gradient. Under the DropGrad DDP hook the first pass is averaged without masks
(``DropGradHookState.suspended``), the second is masked by the hook and the saved first gradient
is masked the same way before combining: ``m * ((1 - alpha) g1 + alpha g2)`` as in one process.
Periodic GNP (``every=k``) or probabilistic GNP (``probability=q``) runs the two-pass step only
on the steps ``t`` with ``t % k == 0`` and ``u(seed, t) < q``: a draw of ``(seed, t)`` alone,
identical on every rank, never the global RNG; other steps are plain one-pass steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import checkpoint as _checkpoint
from ..core.agreement import AgreementCheck
from ..core.checks import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_count,
    check_int_in,
    check_number_in,
    check_positive,
    check_rate,
    check_seed,
    real_scalar,
)
from ..core.ownership import hook_state_masking
from ..core.steps import StepWatch
from ..core.wrapper import OptimizerWrapper, added_params, missing_state_hint, state_init_step
from ..layout.norms import grad_norms, stage_group
from ..layout.shards import _is_dtensor, flat_param_pieces
from .perturbation import FirstPass, PassBuffers, average_first, mix_gradients_, perturb_, restore_
from .schedule import WARMUPS, coefficients, periodic_step, radius_scale
from .second_pass import BatchNormProbe, BatchNormSnapshot, MicroBatches, RngState, replaying

__all__ = ["FIRST_PASSES", "MIXES", "PERTURBATIONS", "WARMUPS", "GradientNormPenalty"]

PERTURBATIONS = ("global", "local")
MIXES = ("raw", "normalized")
FIRST_PASSES = ("closure", "given")
_CONFIG_FIELDS = ("alpha", "r", "warmup", "warmup_steps", "perturbation", "adaptive", "mix", "every", "probability",
                  "seed", "replay_rng", "bn_stats_from_first_pass")  # what the ranks agree on, a checkpoint records


def check_radius(value: object, argument: str) -> float:
    """A perturbation radius: a finite number >= 0 (0: plain training)."""
    if real_scalar(value) == 0.0:
        return 0.0
    try:
        return check_positive(value, argument)
    except ValueError as error:  # keeps the kind: ArgumentTypeError for a wrong type
        raise type(error)(f"{argument} must be a finite number >= 0 (0: plain training), got {value!r}") from None


def _checked_config(alpha: float, r: float, warmup: str, warmup_steps: int, perturbation: str, adaptive: bool,
                    mix: str, every: int, probability: float, seed: int, replay_rng: bool,
                    bn_stats_from_first_pass: bool) -> dict[str, Any]:
    """The configuration (what the ranks agree on and a checkpoint records), every argument checked."""
    config = {"alpha": check_number_in(alpha, "alpha", 0.0, 1.0), "r": check_radius(r, "r"),
              "warmup": check_choice(warmup, "warmup", WARMUPS),
              "warmup_steps": check_int_in(warmup_steps, "warmup_steps", 0),
              "perturbation": check_choice(perturbation, "perturbation", PERTURBATIONS),
              "adaptive": check_bool(adaptive, "adaptive"), "mix": check_choice(mix, "mix", MIXES),
              "every": check_int_in(every, "every", 1), "probability": check_rate(probability, "probability"),
              "seed": check_seed(seed), "replay_rng": check_bool(replay_rng, "replay_rng"),
              "bn_stats_from_first_pass": check_bool(bn_stats_from_first_pass, "bn_stats_from_first_pass")}
    if config["every"] > 1 and config["probability"] < 1.0:
        raise ValueError("give every= (a GNP step every k steps) or probability= (a GNP step with "
                         f"probability q), not both; got every={every!r}, probability={probability!r}")
    return config


class GradientNormPenalty(OptimizerWrapper):
    # The docstring (arguments and the step contract) is set below the class, as torch.optim.SGD does.

    state_key = "gnp"

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.8, r: float = 0.1, *,
                 model: nn.Module | None = None, warmup: str = "none", warmup_steps: int = 0,
                 perturbation: str = "global", adaptive: bool = False, mix: str = "raw", every: int = 1,
                 probability: float = 1.0, seed: int = 0, replay_rng: bool = True,
                 bn_stats_from_first_pass: bool = True, first_pass: str = "closure",
                 process_group: dist.ProcessGroup | None = None, pp_mesh: Any = None) -> None:
        super().__init__(optimizer)
        config = _checked_config(alpha, r, warmup, warmup_steps, perturbation, adaptive, mix, every, probability,
                                 seed, replay_rng, bn_stats_from_first_pass)
        self.alpha, self.r, self.warmup, self.warmup_steps = (config[k] for k in _CONFIG_FIELDS[:4])
        self.perturbation, self.adaptive, self.mix, self.every = (config[k] for k in _CONFIG_FIELDS[4:8])
        self.probability, self.seed, self.replay_rng, self.bn_stats_from_first_pass = (config[k]
                                                                                       for k in _CONFIG_FIELDS[8:])
        self.first_pass = check_choice(first_pass, "first_pass", FIRST_PASSES)
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        params = self._params()
        self._pieces = _checked_pieces(params, model, self.perturbation)
        self.step_index = 0  # optimizer steps that ran: the t of the warmups and of the periodic draws
        self.penalty_steps = 0  # of which ran the two-pass step
        self.last_second_pass = False
        self._pending: FirstPass | None = None  # between first_step and second_step
        self._bn_probed = False  # without model=: whether a second pass was watched for BatchNorm updates
        self._engine: _EnginePasses | None = None  # between begin_passes and the step()
        self._buffers = PassBuffers()
        self._watch = StepWatch(params, self._stepped)
        self._agreement = AgreementCheck("GradientNormPenalty", process_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; the next steps perturb its parameters with the others (the
        norm ``||g1||`` spans them; SAM's ``rho``/``adaptive`` come from the defaults unless the group sets them).
        Refused between :meth:`first_step` and :meth:`second_step`: the first pass did not see the group."""
        if self._pending is not None:
            raise ValueError("add_param_group between first_step() and second_step(): the first pass did not see "
                             "the new parameters; add the group before first_step() (or after second_step())")
        added = added_params(param_group)
        params = self._params() + added
        pieces = _checked_pieces(params, self.model, self.perturbation)  # checked before anything changes
        super().add_param_group({**param_group, "params": added})
        self._pieces = pieces
        self._watch.watch(params)

    # -- the schedule (dropgrad_dist.gnp.schedule) --------------------------------------------------
    def coefficients(self, step: int | None = None) -> tuple[float, float]:
        """``(alpha_t, r_t)`` at step ``step`` (default: the next one)."""
        t = self.step_index if step is None else step
        return coefficients(self.alpha, self.r, self.warmup, self.warmup_steps, t)

    def penalizes(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next) runs two passes: ``alpha_t > 0``, some radius > 0, and
        the periodic choice ``t % every == 0 and u(seed, t) < probability``."""
        t = self.step_index if step is None else step
        if self.coefficients(t)[0] == 0.0 or not any(radius > 0.0 for radius in self._group_radii(t)):
            return False
        return periodic_step(self.seed, self.every, self.probability, t)

    def _group_rho(self, group: Mapping[str, Any]) -> float:
        return self.r

    def _group_adaptive(self, group: Mapping[str, Any]) -> bool:
        return self.adaptive

    def _group_radii(self, t: int) -> list[float]:
        """The radius of each parameter group at step ``t`` (the ``"r"`` warmup ramps each)."""
        scale = radius_scale(self.warmup, self.warmup_steps, t)
        return [self._group_rho(group) * scale for group in self.param_groups]

    def _stepped(self) -> None:
        self.step_index += 1

    def _begin(self) -> tuple[list[torch.Tensor], bool, Any, Any]:
        """The parameters, whether this step penalizes, the started agreement check, the DDP hook state masking."""
        params, penalized = self._params(), self.penalizes()
        pending = self._agreement.start({"config": tuple(self._config().items()), "step_index": self.step_index,
                                         "penalized": penalized})
        return params, penalized, pending, hook_state_masking(params)

    # -- the step -------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, *,  # type: ignore[override]
             scaler: torch.amp.GradScaler | None = None) -> Any:
        """Evaluate ``closure`` at ``theta`` (unless ``first_pass="given"``) and at the perturbed point,
        restore ``theta``, combine, step.

        Returns the first evaluation's loss (None with ``first_pass="given"``). With ``scaler`` the
        wrapped optimizer is stepped by ``scaler.step``: a non-finite first or second gradient skips
        the whole step (``theta`` restored, step count unchanged); call ``scaler.update()`` afterwards.
        After :meth:`begin_passes`, ``closure`` (if any) runs once, ending with :meth:`finish_passes`
        (an engine whose optimizer step calls its closure, as Lightning's does), then the step.
        """
        if self._engine is not None:
            with torch.enable_grad():
                loss = closure() if closure is not None else None
            self._engine_step()
            return loss
        if closure is None:
            return _step_without_closure(self.optimizer)
        params, penalized, pending, hook = self._begin()
        loss, before = None, None
        if self.first_pass == "closure":
            context = _first_pass_context(self.perturbation, self.model, hook) if penalized else None
            loss, before = _first_evaluation(closure, self.optimizer, penalized and self.replay_rng, context)
        elif penalized:
            _refuse_given_under_hook(hook)
        _require_gradient(params, "the closure" if self.first_pass == "closure" else "step(closure)")
        self._second_pass(penalized, pending, hook, lambda: _replayed(closure, before), scaler)
        self._step_inner(scaler)
        return loss

    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``theta + e`` using the gradient in ``.grad`` (the first pass, already run by the caller).

        Then run the second forward/backward yourself and call :meth:`second_step`. Under DDP the
        first backward synchronizes (a global perturbation, equal to one process); run it under
        ``model.no_sync()`` for the per-replica perturbation (with ``perturbation="local"`` and
        ``model=`` the DDP model, so that GNP averages the ``(1 - alpha)`` term).
        """
        if self._pending is not None:
            raise ValueError("first_step was called twice without second_step in between (theta is still "
                             "perturbed; call restore() to abandon the first step)")
        params, penalized, pending, hook = self._begin()
        _refuse_given_under_hook(hook if penalized else None)
        _require_gradient(params, "first_step")
        if pending is not None:
            pending.wait()
        # A plain step of the periodic variant keeps g1 and ignores the second pass's gradient.
        self._pending = self._perturb(hook) if penalized else FirstPass.plain(params)
        if zero_grad:
            self.zero_grad()

    def restore(self) -> bool:
        """Abandon a step begun by :meth:`first_step`: ``theta`` back (bitwise, from its copy), the BatchNorm
        statistics as the first pass left them, the gradients cleared; the next call may be ``first_step()``.

        For code that fails between the two steps (an exception in the second forward, a skipped batch):
        call it in a ``finally`` after :meth:`second_step`, where it does nothing. The step count does not
        advance. Returns whether a first step was abandoned.
        """
        first_pass, self._pending = self._pending, None
        if first_pass is None:
            return False
        restore_(first_pass)
        self.optimizer.zero_grad(set_to_none=True)  # g1 or a partial g2: neither belongs to the next step
        return True

    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Back to ``theta`` (bitwise), combine the gradients, step the wrapped optimizer (``scaler.step``
        with ``scaler``; a non-finite pass skips the step)."""
        first_pass, self._pending = self._pending, None
        if first_pass is None:
            raise ValueError("second_step needs a first_step before it (after the first forward/backward)")
        restore_(first_pass)
        self.last_second_pass = first_pass.penalized and first_pass.finite
        if self.last_second_pass:
            self._combine(first_pass, scaler)
        else:  # the step uses g1: a plain step, or a non-finite g1 that a GradScaler skips
            self.optimizer.zero_grad(set_to_none=True)
            first_pass.set_first_as_grad()
        self._step_inner(scaler)
        if zero_grad:
            self.zero_grad()

    # -- a step whose passes an engine runs (Trainer's training_step, Lightning's strategy) ------------
    def begin_passes(self) -> None:
        """Open a step whose forward/backward passes the caller runs, each backward of the first pass (every
        micro-batch) inside :meth:`first_pass_context`; then :meth:`finish_passes`, then ``step()``
        (e.g. by Accelerate's ``AcceleratedOptimizer``, under its GradScaler).

        The gradients must be cleared before the first pass; its random state is replayed in the second
        (each micro-batch's own with :meth:`record_micro_batch`). Refused with ``first_pass="given"``.
        """
        self.check_engine_passes()
        _params, penalized, pending, hook = self._begin()
        replay = penalized and self.replay_rng
        self._engine = _EnginePasses(penalized, pending, hook, RngState() if replay else None, MicroBatches(replay))

    def check_engine_passes(self) -> None:
        """Raise ``ValueError`` where an engine cannot run this wrapper's passes: with ``first_pass="given"``
        the first pass is the gradient before ``step``, while the engine's backward is the first pass."""
        if self.first_pass == "given":
            raise ValueError(f"first_pass='given' does not fit an engine that runs both passes itself (Lightning's "
                             f"strategies, Trainer, {type(self).__name__}.begin_passes): its backward is the first "
                             "pass; use first_pass='closure' (the default of GradientNormPenalty and of "
                             "SAM(optimizer, rho=...); SAM(params, base_optimizer, first_pass='closure'))")

    def record_micro_batch(self, micro_batch: Any) -> None:
        """As a micro-batch of the open step's first pass starts: keep ``micro_batch`` (what runs it again) and
        the random state it starts from, for ``finish_passes(micro_batch=run)``."""
        self._open_engine("record_micro_batch").micro_batches.record(micro_batch)

    def first_pass_context(self) -> contextlib.AbstractContextManager:
        """Where a backward of the open step's first pass runs: with the DDP hook suspended (global
        perturbation) or under ``no_sync()`` (local); no change on a plain step. A new context per backward."""
        engine = self._open_engine("first_pass_context")
        if not engine.penalized:
            return contextlib.nullcontext()
        return _first_pass_context(self.perturbation, self.model, engine.hook)

    def finish_passes(self, second_pass: Callable[[], Any] | None = None, *,
                      micro_batch: Callable[[Any, bool], Any] | None = None,
                      scaler: torch.amp.GradScaler | None = None) -> None:
        """With the first pass's (accumulated) gradient ``g1`` in ``.grad``: move to ``theta + e``, run the
        second pass from cleared gradients, restore ``theta`` bitwise and leave ``g`` in ``.grad``. A plain
        step leaves ``g1``.

        The second pass is ``second_pass()`` (forward and backward of every micro-batch, from the random
        state of :meth:`begin_passes`) or ``micro_batch(recorded, last)`` for each micro-batch that
        :meth:`record_micro_batch` kept, each from its own random state. ``scaler``: the GradScaler both
        passes' losses were scaled by (``mix="normalized"`` needs its scale).
        """
        engine = self._open_engine("finish_passes")
        if (second_pass is None) == (micro_batch is None):
            raise ValueError("finish_passes needs second_pass= (the whole second pass) or micro_batch= (one "
                             "recorded micro-batch), exactly one of them")
        _require_gradient(self._params(), "the first pass")
        if micro_batch is not None:
            self._second_pass(engine.penalized, engine.pending, engine.hook,
                              lambda: engine.micro_batches.replay(micro_batch), scaler)
        else:
            self._second_pass(engine.penalized, engine.pending, engine.hook,
                              lambda: _replayed(second_pass, engine.before), scaler)
        engine.finished = True

    def _second_pass(self, penalized: bool, pending: Any, hook: Any, run: Callable[[], Any],
                     scaler: torch.amp.GradScaler | None) -> None:
        """With ``g1`` in ``.grad``: wait for the agreement check; on a two-pass step move to ``theta + e``, ``run``
        the second pass from cleared gradients, restore ``theta`` and combine."""
        if pending is not None:
            pending.wait()
        self.last_second_pass = False
        if penalized:
            first_pass = self._perturb(hook)
            if first_pass.finite:  # else leave the non-finite g1: a GradScaler skips the step, theta never moved
                _second_evaluation(run, self.optimizer, first_pass)
                self._combine(first_pass, scaler)
                self.last_second_pass = True

    def _open_engine(self, where: str) -> _EnginePasses:
        if self._engine is None or self._engine.finished:
            raise ValueError(f"{where} needs begin_passes() before it (once per optimizer step)")
        return self._engine

    def _engine_step(self) -> None:
        engine, self._engine = self._engine, None
        if not engine.finished:
            raise ValueError("step() after begin_passes() needs finish_passes() first: the gradient is g1 alone")
        self._step_inner(None)  # under a GradScaler, scaler.step(this wrapper) called this step

    def _step_inner(self, scaler: torch.amp.GradScaler | None) -> None:
        self._watch.arm()
        scaler.step(self.optimizer) if scaler is not None else self.optimizer.step()
        if not self._watch.armed and self.last_second_pass:
            self.penalty_steps += 1
        self._watch.disarm()  # a step that scaler skipped does not count

    def _perturb(self, hook: Any) -> FirstPass:
        """Save theta and g1 (in the buffers of this layout), move theta by ``e`` (:func:`.perturbation.perturb_`)."""
        layout, grads = self._buffers.layout(self.param_groups)
        adaptive = [self._group_adaptive(group) for group in self.param_groups]
        norm = perturb_(layout, grads, self._group_radii(self.step_index), adaptive, self._global_norm,
                        normalize=self.mix == "normalized")
        if not math.isfinite(norm):
            return FirstPass(layout.params, layout.first, layout, finite=False)
        first_pass = FirstPass(layout.params, layout.first, layout, moved=True, hook=hook)
        ddp = _ddp(self.model)
        if self.perturbation == "local" and ddp is not None and self.alpha < 1.0:
            first_pass.averaging = average_first(layout, ddp.process_group)
        if self.bn_stats_from_first_pass and self.model is not None:
            first_pass.batch_norm = BatchNormSnapshot(self.model)
        elif self.bn_stats_from_first_pass and not self._bn_probed:  # the first two-pass step without model=
            self._bn_probed = True
            first_pass.batch_norm = BatchNormProbe(type(self).__name__)
        return first_pass

    def _global_norm(self) -> float:
        # Every rank passes all parameters (an FSDP1 rank may hold no piece of some): one collective.
        return float(grad_norms(self._params(), self._pieces, pp_group=self.pp_group).total)

    def _combine(self, first_pass: FirstPass, scaler: torch.amp.GradScaler | None) -> None:
        normalized = self.mix == "normalized" and scaler is not None and scaler.is_enabled()
        scale = float(scaler.get_scale()) if normalized else 1.0  # g2 is scaled, the unit g1 is not
        mix_gradients_(self._params(), first_pass, self.coefficients()[0], scale)

    # -- checkpointing (rules: dropgrad_dist.core.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG_FIELDS}

    def own_state_dict(self) -> dict[str, Any]:
        """Step counts (the t of the warmups and periodic draws; two-pass steps) and configuration: plain data."""
        return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": self.step_index,
                                  "penalty_steps": self.penalty_steps, "config": self._config()})

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        step_index, penalty_steps = _read_state(state, type(self).__name__, self._config(), strict)

        def apply() -> None:
            self.step_index = step_index
            self.penalty_steps = penalty_steps

        return apply

    def __repr__(self) -> str:
        fields = "".join(f"{name}={getattr(self, name)!r}, " for name in _CONFIG_FIELDS[:9])  # alpha ... probability
        return f"{type(self).__name__}({fields}step_index={self.step_index},\n  optimizer={self.optimizer!r})"


GradientNormPenalty.__doc__ = """\
``g = (1 - alpha_t) g1 + alpha_t grad L(theta + r_t g1 / ||g1||)``, ``g1 = grad L(theta)``; then step.

Args:
    optimizer: the optimizer to step with the combined gradient (it may be a ``DropGrad``
        and/or ``ClippedOptimizer`` chain: they then mask and clip the combined gradient).
    alpha: the mixing weight ``alpha = lambda / r`` in [0, 1] (1: SAM; 0: plain training).
    r: the perturbation radius, a finite number >= 0 (0: plain training, one pass).
    model: the model (the DDP model for ``perturbation="local"``; needed for FSDP1 and for
        the BatchNorm statistics).
    warmup: over ``warmup_steps`` optimizer steps ``t``: ``"lambda"``: ``alpha_t = alpha
        min(1, t / warmup_steps)``; ``"r"``: ``r_t = r min(1, t / warmup_steps)``; ``"zero"``:
        ``alpha_t = 0`` for ``t < warmup_steps`` (no second pass), then ``alpha``; ``"none"``.
        ``warmup_steps=0`` means no ramp.
    perturbation: ``"global"`` (rank-averaged first gradient) or ``"local"`` (per replica, DDP).
    adaptive: ASAM: ``e = r T^2 g1 / ||T g1||``, ``T = |theta|`` element-wise.
    mix: ``"raw"`` (the paper's ``(1 - alpha) g1 + alpha g2``, default) or ``"normalized"``
        (the GNP reference's ``(1 - alpha) g1 / ||g1|| + alpha g2``).
    every, probability, seed: the two-pass step runs on steps ``t`` with ``t % every == 0`` and
        ``u(seed, t) < probability``; other steps are plain (one pass).
    replay_rng: the second pass replays the first pass's CPU/CUDA random state (default True).
    bn_stats_from_first_pass: BatchNorm running statistics keep the first pass's update only
        (default True; needs ``model``: without it the first two-pass step warns once if a BatchNorm
        module updated its statistics in the second pass); False lets the second pass update them too.
    first_pass: ``"closure"``: ``step(closure)`` runs the closure for both passes;
        ``"given"``: the gradient in ``.grad`` when ``step(closure)`` is called is the first
        pass's (davda54/sam's form), the closure runs once, at the perturbed point.
    process_group: the ranks that must agree on configuration and step (default: the world).
    pp_mesh: under pipeline parallelism, the pipeline dim (1-D ``DeviceMesh`` or ``ProcessGroup``):
        ``||grad L||`` then sums every stage's parameters.

``step(closure, scaler=None)``: ``closure`` zeroes nothing itself, computes the loss, calls
``backward()`` (``scaler.scale(loss).backward()`` under a GradScaler, or
``accelerator.backward(loss)``) and returns the loss; it may loop over micro-batches.
``first_step()`` / ``second_step()`` split the step around a second forward/backward the
caller runs itself; ``restore()`` (in a ``finally``) abandons a step whose second pass failed.
``begin_passes()``, ``first_pass_context()``, ``finish_passes(second_pass)`` and ``step()`` are the
step of an engine that runs both passes itself (Hugging Face ``Trainer``).
The copies of ``g1`` and ``theta`` are buffers kept between steps and
reused while the layout of the gradients is unchanged (:mod:`dropgrad_dist.gnp.perturbation`).
"""


@dataclass
class _EnginePasses:
    """An open step of :meth:`GradientNormPenalty.begin_passes`: whether it penalizes, the started agreement
    check, the DDP hook state that masks, the random state the first pass started from, its micro-batches."""

    penalized: bool
    pending: Any
    hook: Any
    before: RngState | None
    micro_batches: MicroBatches
    finished: bool = False


def _read_state(state: Mapping[str, Any] | None, owner: str, config: dict[str, Any], strict: bool) -> tuple[int, int]:
    """``(step_index, penalty_steps)`` of a saved GNP state, validated against ``config`` (nothing applied)."""
    if state is None:
        raise ValueError("GradientNormPenalty.load_state_dict: the state dict has no 'gnp' entry "
                         "(saved from the bare optimizer?). " + missing_state_hint("gnp"))
    step_index = _checkpoint.read_field(state, "step_index", check_count, owner)
    penalty_steps = (_checkpoint.read_field(state, "penalty_steps", check_count, owner)
                     if "penalty_steps" in state else 0)
    if penalty_steps > step_index:
        raise ValueError(f"{owner} checkpoint field 'penalty_steps' ({penalty_steps}) exceeds 'step_index' "
                         f"({step_index})")
    _checkpoint.check_config(owner, state.get("config", {}), config, strict)
    return step_index, penalty_steps


def _checked_pieces(params: list[torch.Tensor], model: Any, perturbation: str) -> dict:
    """The FSDP1 flat pieces of ``params`` (:func:`.shards.flat_param_pieces`); ``model``, ``perturbation`` checked."""
    if model is not None and not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pieces = flat_param_pieces(params, model)
    if perturbation == "local" and (pieces or any(_is_dtensor(p) for p in params)):
        raise ValueError("perturbation='local' needs DDP (or one process): FSDP reduces gradients while "
                         "sharding them, so no rank holds its own whole gradient; use perturbation='global'")
    return pieces


def _step_without_closure(optimizer: torch.optim.Optimizer) -> Any:
    """``torch.distributed.checkpoint``'s state initialization (a step at lr 0 on zero gradients) passes; else raise."""
    if not state_init_step(optimizer.param_groups, None):
        raise ValueError("GradientNormPenalty.step needs a closure that computes the loss, calls backward() "
                         "and returns the loss: the gradient is evaluated at two points. Call "
                         "optimizer.step(closure), or regularizers.step(closure) where prepare_regularizers(..., "
                         "gnp=...) set it up")
    return optimizer.step()


def _first_evaluation(closure: Callable[[], Any], optimizer: torch.optim.Optimizer, replay_rng: bool,
                      context: Any) -> tuple[Any, RngState | None]:
    """The first pass from cleared gradients: its loss and the random state it started from (None: not replayed)."""
    optimizer.zero_grad(set_to_none=True)
    before = RngState() if replay_rng else None
    with context or contextlib.nullcontext(), torch.enable_grad():
        return closure(), before


def _second_evaluation(run: Callable[[], Any], optimizer: torch.optim.Optimizer, first_pass: FirstPass) -> None:
    """The second pass at ``theta + e`` from cleared gradients; ``theta`` restored after."""
    optimizer.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            run()
    finally:
        restore_(first_pass)


def _replayed(closure: Callable[[], Any], before: RngState | None) -> Any:
    """``closure()`` from the random state ``before`` (None: as it is)."""
    with replaying(before):
        return closure()


def _ddp(model: nn.Module | None) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model if isinstance(model, DistributedDataParallel) else None


def _first_pass_context(perturbation: str, model: nn.Module | None, hook: Any) -> Any:
    """Where the first backward runs: under ``no_sync()`` (local perturbation) or with the DDP hook suspended."""
    if perturbation == "local":
        ddp = _ddp(model)
        if ddp is None and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("perturbation='local' needs model= (the DistributedDataParallel model) to run "
                             "the first backward under no_sync()")
        return ddp.no_sync() if ddp is not None else contextlib.nullcontext()
    return hook.suspended() if hook is not None else contextlib.nullcontext()


def _require_gradient(params: list[torch.Tensor], where: str) -> None:
    if not any(p.grad is not None for p in params):
        raise ValueError(f"{where} found no gradient: the first pass must call backward() on the loss "
                         "(scaler.scale(loss).backward() or accelerator.backward(loss))")


def _refuse_given_under_hook(hook: Any) -> None:
    if hook is not None:
        raise ValueError("the DropGrad DDP hook masked the backward you ran before first_step/step: the "
                         "perturbation needs the unmasked gradient. Use step(closure) with "
                         "first_pass='closure' (it runs the first backward with the hook suspended)")
