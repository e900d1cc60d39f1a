"""Gradient norm penalty (GNP) and SAM as its special case, correct under DDP, FSDP, AMP and accumulation.

Penalizing ``lambda * ||grad L(theta)||`` has the finite-difference gradient

    g = (1 - alpha) * grad L(theta) + alpha * grad L(theta + r * grad L(theta) / ||grad L(theta)||),

``alpha = lambda / r``; SAM is ``alpha = 1``, ``r = rho``. One step evaluates the closure at
``theta`` and at the perturbed point, restores ``theta`` bitwise (from a copy), combines the two
gradients in ``.grad`` and steps the wrapped optimizer, whose state sees only ``g``.

Distributed semantics. ``||grad L(theta)||`` is the global L2 norm over all parameters of the
optimizer: across FSDP2/FSDP1 shards (one collective) and, with ``perturbation="global"``, of
the rank-averaged gradient (the first backward is synchronized), so a DDP run equals a
one-process run on the global batch. ``perturbation="local"`` (DDP only) perturbs each replica
with its own gradient (the first backward runs under ``no_sync()``; SAM's per-device variant);
the ``(1 - alpha)`` term is then averaged across ranks so the replicas stay identical.
Composition: the combined ``g`` is what DropGrad masks and clipping clips (wrap them inside:
``GradientNormPenalty(DropGrad(ClippedOptimizer(opt, clipper)))``); the perturbation uses the
unmasked first gradient. Under the DropGrad DDP hook the first pass is averaged without masks
(``DropGradHookState.suspended``), the second is masked by the hook and the saved first gradient
is masked the same way before combining: ``m * ((1 - alpha) g1 + alpha g2)`` as in one process.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as _checkpoint
from .agreement import AgreementCheck
from .checks import check_count, check_int_in, check_number_in, check_positive
from .norms import grad_norms, stage_group
from .ownership import hook_state_masking
from .shards import _is_dtensor, flat_param_pieces, local_tensor
from .steps import StepWatch
from .wrapper import OptimizerWrapper

__all__ = ["PERTURBATIONS", "WARMUPS", "GradientNormPenalty", "SAM"]

WARMUPS = ("none", "lambda", "r", "zero")
PERTURBATIONS = ("global", "local")


def _check_choice(value: object, argument: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value  # type: ignore[return-value]


class GradientNormPenalty(OptimizerWrapper):
    """``g = (1 - alpha_t) grad L(theta) + alpha_t grad L(theta + r_t grad L / ||grad L||)``, then the wrapped step.

    Args:
        optimizer: the optimizer to step with the combined gradient (it may be a ``DropGrad``
            and/or ``ClippedOptimizer`` chain: they then mask and clip the combined gradient).
        alpha: the mixing weight ``alpha = lambda / r`` in [0, 1] (1: SAM).
        r: the perturbation radius, a positive finite number.
        model: the model (the DDP model for ``perturbation="local"``; needed for FSDP1).
        warmup: over ``warmup_steps`` optimizer steps ``t``: ``"lambda"``: ``alpha_t = alpha
            min(1, t / warmup_steps)``; ``"r"``: ``r_t = r min(1, t / warmup_steps)``; ``"zero"``:
            ``alpha_t = 0`` for ``t < warmup_steps`` (no second pass), then ``alpha``; ``"none"``.
        perturbation: ``"global"`` (rank-averaged first gradient) or ``"local"`` (per replica, DDP).
        process_group: the ranks that must agree on configuration and step (default: the world).
        pp_mesh: under pipeline parallelism, the pipeline dim (1-D ``DeviceMesh`` or ``ProcessGroup``):
            ``||grad L||`` then sums every stage's parameters.

    ``step(closure, scaler=None)``: ``closure`` zeroes nothing itself, computes the loss, calls
    ``backward()`` (``scaler.scale(loss).backward()`` under a GradScaler, or
    ``accelerator.backward(loss)``) and returns the loss; it may loop over micro-batches.
    """

    state_key = "gnp"

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.8, r: float = 0.1, *,
                 model: nn.Module | None = None, warmup: str = "none", warmup_steps: int = 0,
                 perturbation: str = "global", process_group: dist.ProcessGroup | None = None,
                 pp_mesh: Any = None) -> None:
        super().__init__(optimizer)
        self.alpha = check_number_in(alpha, "alpha", 0.0, 1.0)  # alpha = lambda / r; 1 is SAM
        self.r = check_positive(r, "r")
        self.warmup = _check_choice(warmup, "warmup", WARMUPS)
        self.warmup_steps = check_int_in(warmup_steps, "warmup_steps", 0)
        if self.warmup != "none" and self.warmup_steps == 0:
            raise ValueError(f"warmup={warmup!r} needs warmup_steps > 0 (tie it to the learning-rate warmup)")
        self.perturbation = _check_choice(perturbation, "perturbation", PERTURBATIONS)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        params = self._params()
        self._pieces = flat_param_pieces(params, model)
        if self.perturbation == "local" and (self._pieces or any(_is_dtensor(p) for p in params)):
            raise ValueError("perturbation='local' needs DDP (or one process): FSDP reduces gradients while "
                             "sharding them, so no rank holds its own whole gradient; use perturbation='global'")
        self.step_index = 0  # optimizer steps that ran: the t of the warmups
        self.last_second_pass = False
        self._watch = StepWatch(params, self._stepped)
        self._agreement = AgreementCheck("GradientNormPenalty", process_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def coefficients(self, step: int | None = None) -> tuple[float, float]:
        """``(alpha_t, r_t)`` at step ``step`` (default: the next one)."""
        t = self.step_index if step is None else step
        ramp = min(1.0, t / self.warmup_steps) if self.warmup_steps else 1.0
        if self.warmup == "lambda":
            return self.alpha * ramp, self.r
        if self.warmup == "r":
            return self.alpha, self.r * ramp
        if self.warmup == "zero":
            return (0.0 if t < self.warmup_steps else self.alpha), self.r
        return self.alpha, self.r

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

    def step(self, closure: Callable[[], Any] | None = None, *,  # type: ignore[override]
             scaler: torch.amp.GradScaler | None = None) -> Any:
        """Evaluate ``closure`` at ``theta`` and at the perturbed point, restore ``theta``, combine, step.

        Returns the first evaluation's loss. With ``scaler`` the wrapped optimizer is stepped by
        ``scaler.step``: a non-finite first or second gradient skips the whole step (``theta``
        restored, step count unchanged); call ``scaler.update()`` afterwards as usual.
        """
        if closure is None:
            if self._state_init_probe():  # torch.distributed.checkpoint initializing optimizer state
                return self.optimizer.step()
            raise ValueError("GradientNormPenalty.step needs a closure that computes the loss, calls backward() "
                             "and returns the loss: the gradient is evaluated at two points")
        params = self._params()
        pending = self._agreement.start({"config": tuple(self._config().items()), "step_index": self.step_index})
        alpha, r = self.coefficients()
        hook = hook_state_masking(params)
        self.optimizer.zero_grad(set_to_none=True)
        with self._first_pass_context(hook) if alpha > 0 else contextlib.nullcontext(), torch.enable_grad():
            loss = closure()
        if not any(p.grad is not None for p in params):
            raise ValueError("the closure computed no gradient: it must call backward() on the loss "
                             "(scaler.scale(loss).backward() or accelerator.backward(loss))")
        if pending is not None:
            pending.wait()
        self.last_second_pass = alpha > 0 and self._second_pass(closure, params, alpha, r, hook)
        self._watch.arm()
        if scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        self._watch.disarm()  # a step that scaler skipped does not count
        return loss

    @torch.no_grad()
    def _second_pass(self, closure: Callable[[], Any], params: list[torch.Tensor], alpha: float, r: float,
                     hook: Any) -> bool:
        """Perturb, evaluate again, restore, combine into ``.grad``; False if the first gradient is not finite."""
        with_grad = [p for p in params if p.grad is not None]
        first = [local_tensor(p.grad).clone() for p in with_grad]
        local_norm = self.perturbation == "local" and self._ddp() is not None
        # Every rank passes all parameters (an FSDP1 rank may hold no piece of some): one collective.
        norm = float(grad_norms(params, {} if local_norm else self._pieces, pp_group=self.pp_group).total)
        if not math.isfinite(norm):
            return False  # leave the non-finite gradient: a GradScaler skips the step, θ never moved
        averaging = self._average_first(first) if local_norm and alpha < 1.0 else None
        values = [local_tensor(p.detach()) for p in with_grad]
        theta = [v.clone() for v in values]
        if norm > 0.0:
            torch._foreach_add_(values, first, alpha=r / norm)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                closure()
        finally:
            torch._foreach_copy_(values, theta)  # bitwise: a copy, not a subtraction
        if averaging is not None:
            averaging.wait()
        if hook is not None:
            hook.mask_like_hook_(with_grad, first)  # the second pass was masked by the hook: mask g1 alike
        self._combine(with_grad, first, alpha)
        return True

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

    @staticmethod
    def _combine(params: list[torch.Tensor], first: list[torch.Tensor], alpha: float) -> None:
        """``.grad <- alpha * g2 + (1 - alpha) * g1`` in place (g1 alone where the second pass gave none)."""
        second, firsts = [], []
        for param, g1 in zip(params, first):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            second.append(local_tensor(param.grad))
            firsts.append(g1)
        torch._foreach_mul_(second, alpha)
        if alpha < 1.0:
            torch._foreach_add_(second, firsts, alpha=1.0 - alpha)

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "r": self.r, "warmup": self.warmup, "warmup_steps": self.warmup_steps,
                "perturbation": self.perturbation}

    def own_state_dict(self) -> dict[str, Any]:
        """Step count (the t of the warmups) and configuration: plain data."""
        return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": self.step_index,
                                  "config": self._config()})

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            raise ValueError("GradientNormPenalty.load_state_dict: the state dict has no 'gnp' entry "
                             "(saved from the bare optimizer?)")
        owner = type(self).__name__
        step_index = _checkpoint.read_field(state, "step_index", check_count, owner)
        _checkpoint.check_config(owner, state.get("config", {}), self._config(), strict)

        def apply() -> None:
            self.step_index = step_index

        return apply

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(alpha={self.alpha}, r={self.r}, warmup={self.warmup!r}, "
                f"warmup_steps={self.warmup_steps}, perturbation={self.perturbation!r}, step_index={self.step_index},"
                f"\n  optimizer={self.optimizer!r})")


class SAM(GradientNormPenalty):
    """Sharpness-aware minimization: ``g = grad L(theta + rho grad L / ||grad L||)`` (GNP with alpha = 1, r = rho)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05, *, model: nn.Module | None = None,
                 warmup: str = "none", warmup_steps: int = 0, perturbation: str = "global",
                 process_group: dist.ProcessGroup | None = None, pp_mesh: Any = None) -> None:
        super().__init__(optimizer, alpha=1.0, r=rho, model=model, warmup=warmup, warmup_steps=warmup_steps,
                         perturbation=perturbation, process_group=process_group, pp_mesh=pp_mesh)
