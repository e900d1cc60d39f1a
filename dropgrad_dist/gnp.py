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
BatchNorm running statistics as the first pass left them (:mod:`dropgrad_dist.second_pass`).

Distributed semantics. ``||g1||`` (and ``||T g1||``) is the global L2 norm over all parameters
of the optimizer: across FSDP2/FSDP1 shards (one collective, :func:`dropgrad_dist.norms.grad_norms`;
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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as _checkpoint
from . import mask as _mask
from .agreement import AgreementCheck
from .checks import (
    ArgumentTypeError,
    check_count,
    check_int_in,
    check_number_in,
    check_positive,
    check_rate,
    check_seed,
    real_scalar,
)
from .norms import grad_norms, stage_group
from .ownership import hook_state_masking
from .second_pass import BatchNormSnapshot, RngState, replaying
from .shards import _is_dtensor, flat_param_pieces, local_tensor
from .steps import StepWatch
from .wrapper import OptimizerWrapper

__all__ = ["FIRST_PASSES", "MIXES", "PERTURBATIONS", "WARMUPS", "GradientNormPenalty"]

WARMUPS = ("none", "lambda", "r", "zero")
PERTURBATIONS = ("global", "local")
MIXES = ("raw", "normalized")
FIRST_PASSES = ("closure", "given")
_PERIODIC_KEY = _mask.key_hash("gradient_norm_penalty.every")  # its own stream of per-step draws


def _check_choice(value: object, argument: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_radius(value: object, argument: str) -> float:
    """A perturbation radius: a finite number >= 0 (0: plain training)."""
    if real_scalar(value) == 0.0:
        return 0.0
    try:
        return check_positive(value, argument)
    except ValueError as error:  # keeps the kind: ArgumentTypeError for a wrong type
        raise type(error)(f"{argument} must be a finite number >= 0 (0: plain training), got {value!r}") from None


def _check_bool(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {value!r} ({type(value).__name__})")
    return value


@dataclass
class _Perturbed:
    """What the first step leaves for the second: where theta was, the first gradient, its norm."""

    params: list[torch.Tensor]  # the parameters with a first gradient
    first: list[torch.Tensor]  # their first gradients (local tensors; g1 / ||g1|| for mix="normalized")
    theta: list[torch.Tensor] = field(default_factory=list)  # copies of their values (empty: not moved)
    finite: bool = True  # False: ||g1|| is not finite, theta never moved, the step must not apply
    penalized: bool = True  # False: a plain step of the periodic variant (g = g1)
    averaging: Any = None  # the running rank-average of g1 (local perturbation)
    batch_norm: BatchNormSnapshot | None = None
    hook: Any = None


class GradientNormPenalty(OptimizerWrapper):
    """``g = (1 - alpha_t) g1 + alpha_t grad L(theta + r_t g1 / ||g1||)``, ``g1 = grad L(theta)``; then step.

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
            (default True; needs ``model``); False lets the second pass update them too.
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
    caller runs itself.
    """

    state_key = "gnp"

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.8, r: float = 0.1, *,
                 model: nn.Module | None = None, warmup: str = "none", warmup_steps: int = 0,
                 perturbation: str = "global", adaptive: bool = False, mix: str = "raw", every: int = 1,
                 probability: float = 1.0, seed: int = 0, replay_rng: bool = True,
                 bn_stats_from_first_pass: bool = True, first_pass: str = "closure",
                 process_group: dist.ProcessGroup | None = None, pp_mesh: Any = None) -> None:
        super().__init__(optimizer)
        self.alpha = check_number_in(alpha, "alpha", 0.0, 1.0)  # alpha = lambda / r; 1 is SAM
        self.r = check_radius(r, "r")
        self.warmup = _check_choice(warmup, "warmup", WARMUPS)
        self.warmup_steps = check_int_in(warmup_steps, "warmup_steps", 0)
        self.perturbation = _check_choice(perturbation, "perturbation", PERTURBATIONS)
        self.adaptive = _check_bool(adaptive, "adaptive")
        self.mix = _check_choice(mix, "mix", MIXES)
        self.every = check_int_in(every, "every", 1)
        self.probability = check_rate(probability, "probability")
        if self.every > 1 and self.probability < 1.0:
            raise ValueError("give every= (a GNP step every k steps) or probability= (a GNP step with "
                             f"probability q), not both; got every={every!r}, probability={probability!r}")
        self.seed = check_seed(seed)
        self.replay_rng = _check_bool(replay_rng, "replay_rng")
        self.bn_stats_from_first_pass = _check_bool(bn_stats_from_first_pass, "bn_stats_from_first_pass")
        self.first_pass = _check_choice(first_pass, "first_pass", FIRST_PASSES)
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        params = self._params()
        self._pieces = flat_param_pieces(params, model)
        if self.perturbation == "local" and (self._pieces or any(_is_dtensor(p) for p in params)):
            raise ValueError("perturbation='local' needs DDP (or one process): FSDP reduces gradients while "
                             "sharding them, so no rank holds its own whole gradient; use perturbation='global'")
        self.step_index = 0  # optimizer steps that ran: the t of the warmups and of the periodic draws
        self.penalty_steps = 0  # of which ran the two-pass step
        self.last_second_pass = False
        self._pending: _Perturbed | None = None  # between first_step and second_step
        self._watch = StepWatch(params, self._stepped)
        self._agreement = AgreementCheck("GradientNormPenalty", process_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # -- the schedule -------------------------------------------------------------------------------
    def _ramp(self, t: int) -> float:
        return min(1.0, t / self.warmup_steps) if self.warmup_steps else 1.0

    def coefficients(self, step: int | None = None) -> tuple[float, float]:
        """``(alpha_t, r_t)`` at step ``step`` (default: the next one)."""
        t = self.step_index if step is None else step
        if self.warmup == "lambda":
            return self.alpha * self._ramp(t), self.r
        if self.warmup == "r":
            return self.alpha, self.r * self._ramp(t)
        if self.warmup == "zero":
            return (0.0 if t < self.warmup_steps else self.alpha), self.r
        return self.alpha, self.r

    def penalizes(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next) runs two passes: ``alpha_t > 0``, some radius > 0, and
        the periodic choice ``t % every == 0 and u(seed, t) < probability``."""
        t = self.step_index if step is None else step
        alpha, _ = self.coefficients(t)
        if alpha == 0.0 or not any(radius > 0.0 for radius in self._group_radii(t)):
            return False
        if t % self.every:
            return False
        if self.probability == 1.0:
            return True
        draw = _mask.uniform_u32(self.seed, t, _mask.MaskStream.SKIP, key=_PERIODIC_KEY)
        return draw < _mask.keep_threshold(1.0 - self.probability)

    def _group_rho(self, group: Mapping[str, Any]) -> float:
        return self.r

    def _group_adaptive(self, group: Mapping[str, Any]) -> bool:
        return self.adaptive

    def _group_radii(self, t: int) -> list[float]:
        """The radius of each parameter group at step ``t`` (the ``"r"`` warmup ramps each)."""
        ramp = self._ramp(t) if self.warmup == "r" else 1.0
        return [self._group_rho(group) * ramp for group in self.param_groups]

    def _stepped(self) -> None:
        self.step_index += 1

    def _ddp(self) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        return self.model if isinstance(self.model, DistributedDataParallel) else None

    def _state_init_probe(self) -> bool:
        """True for ``torch.distributed.checkpoint``'s state initialization: step() at lr 0 on zero gradients."""
        lrs = [group.get("lr", 0.0) for group in self.param_groups]
        grads = [p.grad for p in self._params()]
        return all(float(lr) == 0.0 for lr in lrs) and all(g is not None and not bool(local_tensor(g).any())
                                                            for g in grads)

    def _first_pass_context(self, hook: Any) -> Any:
        if self.perturbation == "local":
            ddp = self._ddp()
            if ddp is None and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError("perturbation='local' needs model= (the DistributedDataParallel model) to run "
                                 "the first backward under no_sync()")
            return ddp.no_sync() if ddp is not None else contextlib.nullcontext()
        return hook.suspended() if hook is not None else contextlib.nullcontext()

    def _agree(self, penalized: bool) -> Any:
        return self._agreement.start({"config": tuple(self._config().items()), "step_index": self.step_index,
                                      "penalized": penalized})

    @staticmethod
    def _require_gradient(params: list[torch.Tensor], where: str) -> None:
        if not any(p.grad is not None for p in params):
            raise ValueError(f"{where} found no gradient: the first pass must call backward() on the loss "
                             "(scaler.scale(loss).backward() or accelerator.backward(loss))")

    def _refuse_given_under_hook(self, hook: Any) -> None:
        if hook is not None:
            raise ValueError("the DropGrad DDP hook masked the backward you ran before first_step/step: the "
                             "perturbation needs the unmasked gradient. Use step(closure) with "
                             "first_pass='closure' (it runs the first backward with the hook suspended)")

    # -- the step -------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, *,  # type: ignore[override]
             scaler: torch.amp.GradScaler | None = None) -> Any:
        """Evaluate ``closure`` at ``theta`` (unless ``first_pass="given"``) and at the perturbed point,
        restore ``theta``, combine, step.

        Returns the first evaluation's loss (None with ``first_pass="given"``). With ``scaler`` the
        wrapped optimizer is stepped by ``scaler.step``: a non-finite first or second gradient skips
        the whole step (``theta`` restored, step count unchanged); call ``scaler.update()`` afterwards.
        """
        if closure is None:
            if self._state_init_probe():  # torch.distributed.checkpoint initializing optimizer state
                return self.optimizer.step()
            raise ValueError("GradientNormPenalty.step needs a closure that computes the loss, calls backward() "
                             "and returns the loss: the gradient is evaluated at two points")
        params = self._params()
        penalized = self.penalizes()
        pending = self._agree(penalized)
        hook = hook_state_masking(params)
        loss, before = None, None
        if self.first_pass == "closure":
            self.optimizer.zero_grad(set_to_none=True)
            before = RngState() if penalized and self.replay_rng else None
            with self._first_pass_context(hook) if penalized else contextlib.nullcontext(), torch.enable_grad():
                loss = closure()
        elif penalized:
            self._refuse_given_under_hook(hook)
        self._require_gradient(params, "the closure" if self.first_pass == "closure" else "step(closure)")
        if pending is not None:
            pending.wait()
        self.last_second_pass = False
        if penalized:
            perturbed = self._perturb(params, hook)
            if perturbed.finite:  # else leave the non-finite g1: a GradScaler skips the step, θ never moved
                self.optimizer.zero_grad(set_to_none=True)
                try:
                    with replaying(before), torch.enable_grad():
                        closure()
                finally:
                    self._restore(perturbed)
                self._combine(perturbed, scaler)
                self.last_second_pass = True
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
            raise ValueError("first_step was called twice without second_step in between")
        params = self._params()
        penalized = self.penalizes()
        pending = self._agree(penalized)
        hook = hook_state_masking(params)
        if penalized:
            self._refuse_given_under_hook(hook)
        self._require_gradient(params, "first_step")
        if pending is not None:
            pending.wait()
        if penalized:
            self._pending = self._perturb(params, hook)
        else:  # a plain step of the periodic variant: keep g1, ignore the second pass's gradient
            with_grad = [p for p in params if p.grad is not None]
            self._pending = _Perturbed(with_grad, [local_tensor(p.grad).clone() for p in with_grad], penalized=False)
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Back to ``theta`` (bitwise), combine the gradients, step the wrapped optimizer (``scaler.step``
        with ``scaler``; a non-finite pass skips the step)."""
        perturbed, self._pending = self._pending, None
        if perturbed is None:
            raise ValueError("second_step needs a first_step before it (after the first forward/backward)")
        self._restore(perturbed)
        self.last_second_pass = perturbed.penalized and perturbed.finite
        if self.last_second_pass:
            self._combine(perturbed, scaler)
        else:  # the step uses g1: a plain step, or a non-finite g1 that a GradScaler skips
            self.optimizer.zero_grad(set_to_none=True)
            for param, g1 in zip(perturbed.params, perturbed.first):
                param.grad = _like_param(param, g1)
        self._step_inner(scaler)
        if zero_grad:
            self.zero_grad()

    def _step_inner(self, scaler: torch.amp.GradScaler | None) -> None:
        self._watch.arm()
        if scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if not self._watch.armed and self.last_second_pass:
            self.penalty_steps += 1
        self._watch.disarm()  # a step that scaler skipped does not count

    # -- the perturbation, the restore and the combination -----------------------------------------
    @torch.no_grad()
    def _perturb(self, params: list[torch.Tensor], hook: Any) -> _Perturbed:
        """Save theta and g1, move theta by ``e`` (per group: ``r_g T^2 g1 / ||T g1||``, T = |theta| or 1)."""
        groups = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        with_grad = [p for _, p in groups]
        grads = [local_tensor(p.grad) for p in with_grad]
        first = [g.clone() for g in grads]
        values = [local_tensor(p.detach()) for p in with_grad]
        adaptive = [i for i, (group, _) in enumerate(groups) if self._group_adaptive(group)]
        if adaptive:  # ||T g1||: scale .grad in place for the norm, then put g1 back
            torch._foreach_mul_([grads[i] for i in adaptive], [values[i].abs() for i in adaptive])
        # Every rank passes all parameters (an FSDP1 rank may hold no piece of some): one collective.
        norm = float(grad_norms(params, self._pieces, pp_group=self.pp_group).total)
        if adaptive:
            torch._foreach_copy_([grads[i] for i in adaptive], [first[i] for i in adaptive])
        if not math.isfinite(norm):
            return _Perturbed(with_grad, first, finite=False)
        perturbed = _Perturbed(with_grad, first, theta=[v.clone() for v in values], hook=hook)
        if norm > 0.0:
            radii = dict(zip(map(id, self.param_groups), self._group_radii(self.step_index)))
            for index, (group, _) in enumerate(groups):
                step = first[index] * values[index].square() if index in adaptive else first[index]
                values[index].add_(step, alpha=radii[id(group)] / norm)
        if self.mix == "normalized":  # g1 / ||g1|| (the plain norm, also under ASAM)
            plain = norm if not adaptive else float(grad_norms(params, self._pieces, pp_group=self.pp_group).total)
            torch._foreach_mul_(first, 1.0 / plain if plain > 0.0 else 0.0)
        if self.perturbation == "local" and self._ddp() is not None and self.alpha < 1.0:
            perturbed.averaging = self._average_first(first)
        if self.bn_stats_from_first_pass:
            perturbed.batch_norm = BatchNormSnapshot(self.model)
        return perturbed

    @staticmethod
    def _restore(perturbed: _Perturbed) -> None:
        if perturbed.theta:
            with torch.no_grad():
                torch._foreach_copy_([local_tensor(p.detach()) for p in perturbed.params], perturbed.theta)
        if perturbed.batch_norm is not None:
            perturbed.batch_norm.restore()

    def _average_first(self, first: list[torch.Tensor]) -> Any:
        """Start averaging the per-replica first gradients across DDP ranks (local perturbation)."""
        flat = torch.cat([g.reshape(-1) for g in first])
        ddp = self._ddp()
        work = dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=ddp.process_group, async_op=True)

        class _Averaging:
            def wait(self) -> None:
                work.wait()
                offset = 0
                for g in first:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

        return _Averaging()

    @torch.no_grad()
    def _combine(self, perturbed: _Perturbed, scaler: torch.amp.GradScaler | None) -> None:
        """``.grad <- alpha * g2 + (1 - alpha) * c * g1`` over the union of both passes' gradients (a
        missing one is zero); ``c`` is 1, or the loss scale for the unit ``g1`` of ``mix="normalized"``."""
        if perturbed.averaging is not None:
            perturbed.averaging.wait()
        if perturbed.hook is not None:  # the second pass was masked by the hook: mask g1 alike
            perturbed.hook.mask_like_hook_(perturbed.params, perturbed.first)
        alpha, _ = self.coefficients()
        for param in perturbed.params:
            if param.grad is None:  # no gradient at the perturbed point: g2 = 0
                param.grad = torch.zeros_like(param)
        second = [local_tensor(p.grad) for p in self._params() if p.grad is not None]
        torch._foreach_mul_(second, alpha)
        if alpha < 1.0:
            scale = 1.0
            if self.mix == "normalized" and scaler is not None and scaler.is_enabled():
                scale = float(scaler.get_scale())  # g2 is scaled, the unit g1 is not
            torch._foreach_add_([local_tensor(p.grad) for p in perturbed.params], perturbed.first,
                                alpha=(1.0 - alpha) * scale)

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "r": self.r, "warmup": self.warmup, "warmup_steps": self.warmup_steps,
                "perturbation": self.perturbation, "adaptive": self.adaptive, "mix": self.mix,
                "every": self.every, "probability": self.probability, "seed": self.seed,
                "replay_rng": self.replay_rng, "bn_stats_from_first_pass": self.bn_stats_from_first_pass}

    def own_state_dict(self) -> dict[str, Any]:
        """Step counts (the t of the warmups and periodic draws; two-pass steps) and configuration: plain data."""
        return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": self.step_index,
                                  "penalty_steps": self.penalty_steps, "config": self._config()})

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            raise ValueError("GradientNormPenalty.load_state_dict: the state dict has no 'gnp' entry "
                             "(saved from the bare optimizer?)")
        owner = type(self).__name__
        step_index = _checkpoint.read_field(state, "step_index", check_count, owner)
        penalty_steps = (_checkpoint.read_field(state, "penalty_steps", check_count, owner)
                         if "penalty_steps" in state else 0)
        if penalty_steps > step_index:
            raise ValueError(f"{owner} checkpoint field 'penalty_steps' ({penalty_steps}) exceeds 'step_index' "
                             f"({step_index})")
        _checkpoint.check_config(owner, state.get("config", {}), self._config(), strict)

        def apply() -> None:
            self.step_index = step_index
            self.penalty_steps = penalty_steps

        return apply

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(alpha={self.alpha}, r={self.r}, warmup={self.warmup!r}, "
                f"warmup_steps={self.warmup_steps}, perturbation={self.perturbation!r}, adaptive={self.adaptive}, "
                f"mix={self.mix!r}, every={self.every}, probability={self.probability}, "
                f"step_index={self.step_index},\n  optimizer={self.optimizer!r})")


def _like_param(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (a local gradient tensor) as a gradient of ``param`` (a DTensor with ``param``'s layout)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)
    return local


