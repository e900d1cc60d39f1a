"""Gradient clipping: torch-clip's eight methods, identical in one process, under DDP and under FSDP.

With ``g`` the gradient the optimizer will step on, ``||g||`` the global L2 norm over all clipped
parameters (whole parameters: all shards, all ranks) and ``eta`` the clipping level:

=============================  =========================================================================
``"no_clip"``                   ``g`` unchanged
``"norm"``                      ``g <- g * min(1, eta / ||g||)``
``"layer_wise"``                per parameter ``l``: ``g_l <- g_l * min(1, eta / ||g_l||)``
``"coordinate_wise"``           ``g_i <- clamp(g_i, -eta, eta)``
``"auto_clip"``                 ``eta_t`` = the ``p_autoclip`` quantile of the norms seen so far (this
                                step included), then as ``"norm"``
``"linear_rand_norm"``          ``a = eta / ||g||``; if ``a < 1`` clip (``g <- a * g``) with
                                probability ``beta ** a``
``"quadratic_rand_norm"``       the same with probability ``beta ** (a ** 2)``
``"linear_rand_autoclip"``,     the same with ``eta_t``
``"quadratic_rand_autoclip"``
=============================  =========================================================================

Random decisions use one uniform draw per step from ``(seed, step)`` alone (the mask engine's
per-step draw), so every rank decides alike; the global RNG is never touched. The AutoClip
quantile is exact (``torch.quantile``'s linear interpolation) over the whole history or its last
``history_size`` norms, in ``O(sqrt(n))`` per step. The history holds the finite norms of the
steps that ran (a step skipped by ``GradScaler`` adds nothing), is identical on every rank
(checked) and is part of the state dict.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections import deque
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as _checkpoint
from .agreement import AgreementCheck
from .checks import check_count, check_int_in, check_positive, check_seed
from .mask import MaskStream, uniform_u32
from .norms import grad_norms, stage_group
from .shards import flat_param_pieces, local_tensor
from .steps import StepWatch
from .wrapper import OptimizerWrapper

__all__ = ["CLIPPING_METHODS", "ClippedOptimizer", "ClippedSGD", "GradientClipper"]

CLIPPING_METHODS = ("no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
                    "quadratic_rand_norm", "linear_rand_autoclip", "quadratic_rand_autoclip")
_RANDOM = {"linear_rand_norm": 1, "quadratic_rand_norm": 2, "linear_rand_autoclip": 1, "quadratic_rand_autoclip": 2}
_AUTO = ("auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip")
_BLOCK = 1024  # values per sorted block of the history: O(sqrt n) insertion, removal and selection


class NormHistory:
    """The norms of past steps, in order, with exact quantiles in ``O(sqrt n)`` per step.

    Keeps the last ``size`` values (all when ``size`` is None) in insertion order and, for
    selection, in sorted blocks of at most ``2 * 1024`` values.
    """

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self._blocks: list[list[float]] = []
        self._maxes: list[float] = []
        self.digest = 0  # a running hash of every value appended: cheap to compare across ranks

    def __len__(self) -> int:
        return len(self.values)

    def append(self, value: float) -> None:
        self.values.append(value)
        self._insert(value)
        self.digest = _mix(self.digest, value)
        if self.size is not None and len(self.values) > self.size:
            self._remove(self.values.popleft())

    def _insert(self, value: float) -> None:
        if not self._blocks:
            self._blocks.append([value])
            self._maxes.append(value)
            return
        i = min(bisect.bisect_left(self._maxes, value), len(self._blocks) - 1)
        block = self._blocks[i]
        bisect.insort(block, value)
        self._maxes[i] = block[-1]
        if len(block) > 2 * _BLOCK:
            self._blocks[i:i + 1] = [block[:_BLOCK], block[_BLOCK:]]
            self._maxes[i:i + 1] = [block[_BLOCK - 1], block[-1]]

    def _remove(self, value: float) -> None:
        i = bisect.bisect_left(self._maxes, value)
        block = self._blocks[i]
        del block[bisect.bisect_left(block, value)]
        if block:
            self._maxes[i] = block[-1]
        else:
            del self._blocks[i], self._maxes[i]

    def _rank_of(self, value: float) -> int:
        """How many stored values are smaller than ``value``."""
        i = bisect.bisect_left(self._maxes, value)
        return sum(len(b) for b in self._blocks[:i]) + (bisect.bisect_left(self._blocks[i], value)
                                                        if i < len(self._blocks) else 0)

    def _kth(self, k: int) -> float:
        for block in self._blocks:
            if k < len(block):
                return block[k]
            k -= len(block)
        raise IndexError(k)

    def quantile_with(self, value: float, q: float) -> float:
        """``torch.quantile(tensor(history + [value], dtype=float64), q)`` without storing ``value``."""
        position = q * len(self.values)  # q * (n - 1) with n = len + 1
        below = math.floor(position)
        weight = position - below
        rank = self._rank_of(value)

        def kth(k: int) -> float:
            return self._kth(k) if k < rank else value if k == rank else self._kth(k - 1)

        return _lerp(kth(below), kth(math.ceil(position)), weight)


def _lerp(low: float, high: float, weight: float) -> float:
    """torch.lerp's formula with its fused multiply-add, rounded once: bitwise ``torch.quantile``."""
    step = high - low
    if weight < 0.5:
        return float(Fraction(low) + Fraction(weight) * Fraction(step))
    return float(Fraction(high) - Fraction(step) * Fraction(1 - weight))


def _mix(digest: int, value: float) -> int:
    bits = struct.unpack("<q", struct.pack("<d", value))[0] & 0xFFFFFFFFFFFFFFFF
    x = (digest ^ bits) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _check_method(method: object) -> str:
    if method not in CLIPPING_METHODS:
        raise ValueError(f"method (clipping_type) must be one of {', '.join(CLIPPING_METHODS)}; got {method!r}")
    return method  # type: ignore[return-value]


class GradientClipper:
    """Clip gradients in place by one of torch-clip's methods, the same in every parallel layout.

    Math (``eta`` = ``clipping_level``): ``"norm"``: ``g <- g * min(1, eta / ||g||)``; the other
    methods are in the module docstring.

    Args:
        method: one of :data:`CLIPPING_METHODS` (torch-clip's ``clipping_type``).
        clipping_level: ``eta``, a positive finite number (AutoClip methods ignore it).
        beta: for the random methods, in (0, 1): the clip probability is ``beta ** a`` or ``beta ** a**2``.
        p_autoclip: the AutoClip quantile, in (0, 1].
        history_size: AutoClip over the last ``history_size`` norms (None: all of them).
        seed: the seed of the per-step random draw, an int in ``[0, 2**64)``.
        model: the model; needed for FSDP1 (``use_orig_params=True``) to find each shard's group.
        process_group: the ranks that must agree on seed, step and history (default: the world).
        pp_mesh: under pipeline parallelism, the pipeline dim (a 1-D ``DeviceMesh`` such as
            ``world_mesh["pp"]``, or its ``ProcessGroup``): ``||g||`` then sums every stage's
            parameters, as torchtitan's ``clip_grad_norm_(..., pp_mesh=...)``; each stage clips its own.

    ``clip_(params)`` returns ``{"norm", "clipped", "coefficient", "level", "norm_after"}``. The step count ``t``
    advances after each optimizer step over the clipped parameters that ran; the norm of that
    step then joins the history (when finite).
    """

    def __init__(
        self,
        method: str = "norm",
        clipping_level: float = 1.0,
        *,
        beta: float | None = None,
        p_autoclip: float = 0.75,
        history_size: int | None = None,
        seed: int = 0,
        model: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        pp_mesh: Any = None,
    ) -> None:
        self.method = _check_method(method)
        self.clipping_level = check_positive(clipping_level, "clipping_level")
        if method in _RANDOM:
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
                raise ValueError(f"beta must be a number in (0, 1) for method {method!r} (beta=0 would never "
                                 f"clip), got {beta!r}")
            beta = float(beta)
        elif beta is not None:
            raise ValueError(f"beta applies to the random methods ({', '.join(_RANDOM)}), not {method!r}")
        self.beta = beta
        if isinstance(p_autoclip, bool) or not isinstance(p_autoclip, (int, float)) or not 0.0 < p_autoclip <= 1.0:
            raise ValueError(f"p_autoclip must be a number in (0, 1], got {p_autoclip!r}")
        self.p_autoclip = float(p_autoclip)
        self.history_size = None if history_size is None else check_int_in(history_size, "history_size", 1)
        self.seed = check_seed(seed)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        self.step_index = 0
        self.history = NormHistory(self.history_size)
        self.last_stats: dict[str, Any] | None = None
        self._pending_norm: float | None = None
        self._pieces: dict | None = None
        self._watch = StepWatch((), self._committed)
        self._agreement = AgreementCheck("GradientClipper", process_group)

    # -- the clip ---------------------------------------------------------------------------------
    def _level(self, norm: float) -> float:
        if self.method not in _AUTO:
            return self.clipping_level
        return self.history.quantile_with(norm, self.p_autoclip) if math.isfinite(norm) else math.nan

    def draw(self, step: int | None = None) -> float:
        """The uniform draw in [0, 1) of step ``step`` (default: this step): ``u(seed, t)``."""
        return uniform_u32(self.seed, self.step_index if step is None else step, MaskStream.CLIP) / 4294967296.0

    def _decide(self, norm: float, level: float) -> tuple[bool, float]:
        """Whether to scale the whole gradient, and by what, for the norm-based methods."""
        if not math.isfinite(norm) or not math.isfinite(level) or norm <= level:
            return False, 1.0  # non-finite: leave it to GradScaler to skip the step
        alpha = level / norm
        power = _RANDOM.get(self.method)
        if power is not None and not self.draw() < self.beta ** (alpha ** power):
            return False, 1.0
        return True, alpha

    def agreement_fields(self, norm: float) -> dict[str, object]:
        """What every rank must hold equally (checked at every clip)."""
        return {"config": tuple(self._config().items()), "step_index": self.step_index,
                "history": (len(self.history), self.history.digest), "norm": norm}

    @torch.no_grad()
    def clip_(self, parameters: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Clip the gradients of ``parameters`` in place; returns ``{"norm", "clipped", "coefficient", "level", "norm_after"}``.

        Call it after ``GradScaler.unscale_`` (on unscaled gradients), after DropGrad has masked,
        before the optimizer step. Every rank must pass the same parameters in the same order.
        """
        params = list(parameters)
        if self._pieces is None:
            self._pieces = flat_param_pieces(params, self.model)
            self._watch.watch(params)
        threshold = self.clipping_level if self.method == "coordinate_wise" else None
        norms = grad_norms(params, self._pieces, above=threshold, pp_group=self.pp_group)
        norm = float(norms.total)
        pending = self._agreement.start(self.agreement_fields(norm))
        level = self._level(norm)
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        stats = {"norm": norm, "clipped": False, "coefficient": None, "level": level, "norm_after": norm}
        if self.method == "layer_wise":
            stats["clipped"], stats["norm_after"] = self._clip_layers(params, norms.per_param)
        elif self.method == "coordinate_wise":
            stats["clipped"] = bool(norms.above is not None and bool((norms.above > 0).any()))
            for grad in grads:  # one pass each; the foreach pair of clamps makes two
                grad.clamp_(-self.clipping_level, self.clipping_level)
            if stats["clipped"]:  # the clamped norm needs a pass of its own (and, sharded, a collective)
                stats["norm_after"] = float(grad_norms(params, self._pieces, pp_group=self.pp_group).total)
        elif self.method != "no_clip":
            clipped, coefficient = self._decide(norm, level)
            stats.update(clipped=clipped, coefficient=coefficient, norm_after=norm * coefficient)
            if clipped:
                torch._foreach_mul_(grads, coefficient)
        if pending is not None:
            pending.wait()
        self._pending_norm = norm
        self._watch.arm()
        self.last_stats = stats
        return stats

    def _clip_layers(self, params: list[torch.Tensor], per_param: torch.Tensor) -> tuple[bool, float]:
        """Scale each gradient by ``min(1, eta / ||g_l||)``; returns (any clipped, the global norm after)."""
        level = torch.tensor(self.clipping_level, dtype=per_param.dtype, device=per_param.device)
        # A zero norm gives inf, clamped to 1; a non-finite norm is left alone.
        factors = torch.where(torch.isfinite(per_param), (level / per_param).clamp(max=1.0), 1.0)
        scaled = [(local_tensor(p.grad), f) for p, f in zip(params, factors.unbind()) if p.grad is not None]
        if scaled:
            torch._foreach_mul_([g for g, _ in scaled], [f.to(g.dtype) for g, f in scaled])
        after = (per_param * factors).square().sum().reshape(1)
        if self.pp_group is not None:  # the other stages' layers count too
            dist.all_reduce(after, group=self.pp_group)
        return bool((factors < 1.0).any()), float(after.sqrt())

    def _committed(self) -> None:
        """An optimizer step over the clipped parameters ran: count it, remember its finite norm."""
        norm, self._pending_norm = self._pending_norm, None
        if norm is not None and math.isfinite(norm):
            self.history.append(norm)
        self.step_index += 1

    def step(self) -> None:
        """Count a step by hand, for an optimizer that does not run ``torch.optim``'s step hooks."""
        if self._watch.armed:
            self._watch.disarm()
            self._committed()

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"method": self.method, "clipping_level": self.clipping_level, "beta": self.beta,
                "p_autoclip": self.p_autoclip, "history_size": self.history_size, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """Step count and norm history (progress) and the configuration: plain data."""
        return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": self.step_index,
                                  "history": list(self.history.values), "config": self._config()})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore step count and history; a different configuration raises unless ``strict=False``. Atomic."""
        self.prepare_state(state_dict, strict)()

    def prepare_state(self, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
        """Validate ``state_dict`` and return what applies it (used by wrappers for atomic loads)."""
        owner = "GradientClipper"
        step_index = _checkpoint.read_field(state_dict, "step_index", check_count, owner)
        values = _checkpoint.read_field(state_dict, "history", _check_history, owner)
        _checkpoint.check_config(owner, _checkpoint.read_field(state_dict, "config", _check_dict, owner),
                                 self._config(), strict)
        history = NormHistory(self.history_size)
        for value in values:
            history.append(value)

        def apply() -> None:
            self.step_index, self.history = step_index, history
            self._pending_norm = None
            self._watch.disarm()

        return apply

    def __repr__(self) -> str:
        return (f"GradientClipper({self.method!r}, clipping_level={self.clipping_level}, beta={self.beta}, "
                f"p_autoclip={self.p_autoclip}, history_size={self.history_size}, seed={self.seed}, "
                f"step_index={self.step_index}, history={len(self.history)})")


def _check_history(value: object, argument: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v >= 0 for v in value):
        raise ValueError(f"{argument} must be a list of finite non-negative norms")
    return [float(v) for v in value]


def _check_dict(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{argument} must be a dict, got {type(value).__name__}")
    return value


def _clipping_closure(clipper: GradientClipper, param_groups: list[dict[str, Any]],
                      closure: Callable[[], Any] | None) -> tuple[Callable[[], Any], ...]:
    """Clip now and pass no closure, or pass one that clips after every evaluation of ``closure``."""
    params = [p for group in param_groups for p in group["params"]]
    if closure is None:
        clipper.clip_(params)
        return ()

    def clipped() -> Any:
        with torch.enable_grad():
            loss = closure()
        clipper.clip_(params)
        return loss

    return (clipped,)


class ClippedOptimizer(OptimizerWrapper):
    """``step()`` clips the gradients of all the optimizer's parameters, then steps ``optimizer``.

    Math: ``g <- clip(g)`` (see :class:`GradientClipper`), then the wrapped update. Under
    ``DropGrad`` (``DropGrad(ClippedOptimizer(opt, clipper))``) the clipper sees masked gradients;
    under a ``GradScaler`` it sees unscaled ones (``scaler.step`` unscales before calling ``step``).
    """

    state_key = "clipping"

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: GradientClipper) -> None:
        if not isinstance(clipper, GradientClipper):
            raise ValueError(f"clipper must be a GradientClipper, got {type(clipper).__name__}")
        super().__init__(optimizer)
        self.clipper = clipper

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip, then step; with a ``closure`` every evaluation's gradient is clipped (e.g. LBFGS)."""
        return self.optimizer.step(*_clipping_closure(self.clipper, self.param_groups, closure))

    def own_state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            raise ValueError("ClippedOptimizer.load_state_dict: the state dict has no 'clipping' entry "
                             "(saved from the bare optimizer?)")
        return self.clipper.prepare_state(state, strict)


class ClippedSGD(torch.optim.SGD):
    """SGD (with momentum) on clipped stochastic gradients: ``g <- clip(g)``, then ``torch.optim.SGD``.

    torch-clip's argument names. Unlike torch-clip's code, which scales the momentum buffer by a
    coefficient computed from the raw gradient, the gradient itself is clipped, as torch-clip's
    README formulas state. ``state_dict`` carries the clipper's state (step, history) under ``"clipping"``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, clipping_type: str = "no_clip",
                 clipping_level: float = 1.0, beta: float | None = None, p_autoclip: float = 0.75,
                 history_size: int | None = None, seed: int = 0, model: nn.Module | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)
        self.clipper = GradientClipper(clipping_type, clipping_level, beta=beta, p_autoclip=p_autoclip,
                                       history_size=history_size, seed=seed, model=model,
                                       process_group=process_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip, then take the SGD step."""
        return super().step(*_clipping_closure(self.clipper, self.param_groups, closure))

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        state["clipping"] = self.clipper.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        if "clipping" not in state_dict:
            raise ValueError("ClippedSGD.load_state_dict: the state dict has no 'clipping' entry")
        apply = self.clipper.prepare_state(state_dict.pop("clipping"), strict)
        super().load_state_dict(state_dict)
        apply()
