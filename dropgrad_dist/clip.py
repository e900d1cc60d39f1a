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

With ``norm_scope="group"`` (torch-clip's ``ClippedSGD``) ``||g||`` is each parameter group's norm,
each group is clipped by its own and AutoClip keeps one history per group; the default is the
global norm, which bounds the whole update whatever the grouping. Either way the squared norms
cross the ranks in one all-reduce per step.

Random decisions use one uniform draw per step from ``(seed, step)`` alone (the mask engine's
per-step draw), so every rank decides alike; the global RNG is never touched. The AutoClip
quantile is exact (``torch.quantile``'s linear interpolation) over the whole history or its last
``history_size`` norms, in ``O(sqrt(n))`` per step. The history holds the finite norms of the
steps that ran (a step skipped by ``GradScaler`` adds nothing), is identical on every rank
(checked) and is part of the state dict.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as _checkpoint
from .agreement import AgreementCheck
from .checks import (
    ArgumentTypeError,
    check_count,
    check_int_in,
    check_number_in,
    check_positive,
    check_seed,
    real_scalar,
)
from .mask import MaskStream, uniform_u32
from .norm_history import NormHistory
from .norms import grad_norms, stage_group
from .shards import flat_param_pieces, local_grads, local_tensor
from .steps import GradientStamp, StepWatch
from .wrapper import OptimizerWrapper

__all__ = ["CLIPPING_METHODS", "ClippedOptimizer", "ClippedSGD", "GradientClipper"]

CLIPPING_METHODS = ("no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
                    "quadratic_rand_norm", "linear_rand_autoclip", "quadratic_rand_autoclip")
_RANDOM = {"linear_rand_norm": 1, "quadratic_rand_norm": 2, "linear_rand_autoclip": 1, "quadratic_rand_autoclip": 2}
_AUTO = ("auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip")


def _check_method(method: object) -> str:
    if method not in CLIPPING_METHODS:
        raise ValueError(f"method (clipping_type) must be one of {', '.join(CLIPPING_METHODS)}; got {method!r}")
    return method  # type: ignore[return-value]


def _check_beta(beta: object, method: str, argument: str = "beta") -> float:
    """The clip probability base of a random method: a number in (0, 1)."""
    number = real_scalar(beta)
    if number is None or not 0.0 < number < 1.0:
        never = " (beta=0 would never clip: the probability beta ** a is 0)" if number == 0 else ""
        error = ArgumentTypeError if number is None else ValueError
        raise error(f"{argument} must be a number in (0, 1) for method {method!r}{never}, got {beta!r}")
    return number


def _check_p_autoclip(value: object, argument: str = "p_autoclip") -> float:
    return check_number_in(value, argument, 0.0, 1.0, low_open=True)


NORM_SCOPES = ("global", "group")


class _Options(NamedTuple):
    """The clipping options of one parameter group."""

    level: float
    beta: float | None
    p_autoclip: float


class GradientClipper:
    """Clip gradients in place by one of torch-clip's methods, the same in every parallel layout.

    Math (``eta`` = ``clipping_level``): ``"norm"``: ``g <- g * min(1, eta / ||g||)``; the other
    methods are in the module docstring. With ``norm_scope="group"``, ``||g||`` is the norm of
    each parameter group's gradient and each group is clipped by its own (torch-clip's ``ClippedSGD``).

    Args:
        method: one of :data:`CLIPPING_METHODS` (torch-clip's ``clipping_type``).
        clipping_level: ``eta``, a positive finite number (AutoClip methods ignore it).
        beta: for the random methods, in (0, 1): the clip probability is ``beta ** a`` or ``beta ** a**2``.
        p_autoclip: the AutoClip quantile, in (0, 1].
        history_size: AutoClip over the last ``history_size`` norms (None: all of them).
        seed: the seed of the per-step random draw, an int in ``[0, 2**64)``.
        norm_scope: ``"global"`` (default): one norm over all the clipped parameters, so clipping
            bounds the whole update whatever the grouping; ``"group"``: one norm, one decision and
            (AutoClip) one history per parameter group of :meth:`clip_groups_`.
        model: the model; needed for FSDP1 (``use_orig_params=True``) to find each shard's group.
        process_group: the ranks that must agree on seed, step and history (default: the world).
        pp_mesh: under pipeline parallelism, the pipeline dim (a 1-D ``DeviceMesh`` such as
            ``world_mesh["pp"]``, or its ``ProcessGroup``): ``||g||`` then sums every stage's
            parameters, as torchtitan's ``clip_grad_norm_(..., pp_mesh=...)``; each stage clips its own.

    ``clip_(params)`` returns ``{"norm", "clipped", "coefficient", "level", "norm_after"}``;
    :meth:`clip_groups_` clips parameter groups, each with its own ``clipping_level``, ``beta``,
    ``p_autoclip`` if it holds those keys. The step count ``t`` advances after each optimizer step
    over the clipped parameters that ran; the norm of that step then joins the history (when finite).
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
        norm_scope: str = "global",
        model: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        pp_mesh: Any = None,
    ) -> None:
        self.method = _check_method(method)
        self.clipping_level = check_positive(clipping_level, "clipping_level")
        if method in _RANDOM:
            beta = _check_beta(beta, method)
        elif beta is not None:
            raise ValueError(f"beta applies to the random methods ({', '.join(_RANDOM)}), not {method!r}")
        self.beta = beta
        self.p_autoclip = _check_p_autoclip(p_autoclip)
        self.history_size = None if history_size is None else check_int_in(history_size, "history_size", 1)
        self.seed = check_seed(seed)
        if norm_scope not in NORM_SCOPES:
            raise ValueError(f"norm_scope must be one of {', '.join(NORM_SCOPES)}; got {norm_scope!r}")
        self.norm_scope = norm_scope
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        self.step_index = 0
        self.history = NormHistory(self.history_size)
        self.group_histories: list[NormHistory] = []  # norm_scope="group": one per parameter group
        self.last_stats: dict[str, Any] | None = None
        self._pending_norms: list[float] | None = None
        self._pieces: dict | None = None
        self._watch = StepWatch((), self._committed)
        self._clipped: GradientStamp | None = None  # the gradients the last clip_ left
        self._agreement = AgreementCheck("GradientClipper", process_group)
        # With a model, each training forward launches the check (see _check_at_forward) and clip_
        # sends none of its own: a rank clipping once more sends nothing the others do not.
        self._pending = None
        self._clips = 0  # clips that did work since the last training forward
        self._last_norm: float | None = None
        if model is not None:
            handle = model.register_forward_pre_hook(_check_at_forward(weakref.ref(self)))
            weakref.finalize(self, handle.remove)

    # -- the clip ---------------------------------------------------------------------------------
    def _options(self, group: Mapping[str, Any], index: int) -> _Options:
        """A group's ``clipping_level``, ``beta`` and ``p_autoclip``: its own keys, else the clipper's."""
        where = f"param_groups[{index}]"
        level = (check_positive(group["clipping_level"], f"{where}['clipping_level']")
                 if "clipping_level" in group else self.clipping_level)
        beta = self.beta
        if self.method in _RANDOM and "beta" in group:
            beta = _check_beta(group["beta"], self.method, f"{where}['beta']")
        p_autoclip = (_check_p_autoclip(group["p_autoclip"], f"{where}['p_autoclip']")
                      if "p_autoclip" in group else self.p_autoclip)
        return _Options(level, beta, p_autoclip)

    def _level(self, norm: float, options: _Options, history: NormHistory) -> float:
        if self.method not in _AUTO:
            return options.level
        return history.quantile_with(norm, options.p_autoclip) if math.isfinite(norm) else math.nan

    def draw(self, step: int | None = None) -> float:
        """The uniform draw in [0, 1) of step ``step`` (default: this step): ``u(seed, t)``."""
        return uniform_u32(self.seed, self.step_index if step is None else step, MaskStream.CLIP) / 4294967296.0

    def _decide(self, norm: float, level: float, beta: float | None) -> tuple[bool, float]:
        """Whether to scale a whole gradient, and by what, for the norm-based methods."""
        if not math.isfinite(norm) or not math.isfinite(level) or norm <= level:
            return False, 1.0  # non-finite: leave it to GradScaler to skip the step
        alpha = level / norm
        power = _RANDOM.get(self.method)
        if power is not None and not self.draw() < beta ** (alpha ** power):  # type: ignore[operator]
            return False, 1.0
        return True, alpha

    def _check_at_forward(self) -> None:
        """Launch the check from a training forward of ``model`` (every rank runs it, in the same order).

        It compares the clips since the previous forward and the last clip's norm, so one rank's
        extra ``clip_`` is named here, at the next forward, instead of unpairing the collectives.
        """
        if not self._agreement.active:
            return
        previous, self._pending = self._pending, None
        if previous is not None:
            previous.wait()
        self._pending = self._agreement.start({  # the cause first: errors name the first differing field
            "config": tuple(self._config().items()), "step_index": self.step_index,
            "clip_() calls since the last forward": self._clips, "last clip's norm": self._last_norm,
            "history": self._history_digests()})
        self._clips = 0

    def _histories(self, groups: int) -> list[NormHistory]:
        """The history each group's AutoClip level is read from (the same one under the global norm)."""
        if self.norm_scope == "global":
            return [self.history] * groups
        if not self.group_histories:
            self.group_histories = [NormHistory(self.history_size) for _ in range(groups)]
        if len(self.group_histories) != groups:
            raise ValueError(f"GradientClipper(norm_scope='group') keeps one history per parameter group: "
                             f"it has {len(self.group_histories)}, this step passed {groups} groups")
        return self.group_histories

    def agreement_fields(self, norm: float, options: tuple = ()) -> dict[str, object]:
        """What every rank must hold equally (checked at every clip)."""
        return {"config": tuple(self._config().items()), "step_index": self.step_index,
                "history": self._history_digests(), "norm": norm, "options": tuple(options)}

    def _history_digests(self) -> tuple:
        return tuple((len(h), h.digest) for h in [self.history, *self.group_histories])

    def clip_(self, parameters: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Clip the gradients of ``parameters`` in place.

        Returns ``{"norm", "clipped", "coefficient", "level", "norm_after"}``.

        Call it after ``GradScaler.unscale_`` (on unscaled gradients), after DropGrad has masked,
        before the optimizer step. Every rank must pass the same parameters in the same order.
        A repeated call on the very gradients the previous call left (no backward, no in-place
        change, no optimizer step in between) returns the previous result: no work, no collective.
        """
        return self.clip_groups_([{"params": list(parameters)}])

    @torch.no_grad()
    def clip_groups_(self, groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Clip the gradients of parameter groups (``{"params": [...], "clipping_level": ...}``) in place.

        Each group may hold its own ``clipping_level``, ``beta``, ``p_autoclip`` (as an optimizer's
        ``param_groups`` do); the norm is the global one or each group's (``norm_scope``); one
        collective either way. Returns the stats of :meth:`clip_`, where ``level`` and
        ``coefficient`` are the smallest over the groups, plus ``"groups"``: per group
        ``{"norm", "level", "clipped", "coefficient"}``.
        """
        members = [list(group["params"]) for group in groups]
        params = [p for member in members for p in member]
        if self._watch.armed and self._clipped is not None and self._clipped.unchanged(params):
            # The very gradients clip_ left, not yet stepped on: clipping is idempotent, so return the same
            # result without a collective (one rank clipping twice then sends nothing the others do not).
            return dict(self.last_stats)
        options = [self._options(group, i) for i, group in enumerate(groups)]
        if self._pieces is None:
            self._pieces = flat_param_pieces(params, self.model)
            self._watch.watch(params)
        sizes = [len(member) for member in members]
        param_levels = [o.level for o, size in zip(options, sizes) for _ in range(size)]
        norms = grad_norms(params, self._pieces, above=param_levels if self.method == "coordinate_wise" else None,
                           pp_group=self.pp_group)
        norm = float(norms.total)
        group_squares = [chunk.sum() for chunk in torch.split(norms.squares, sizes)]
        scope_norms = ([float(s.sqrt()) for s in group_squares] if self.norm_scope == "group"
                       else [norm] * len(groups))
        self._clips += 1
        self._last_norm = norm
        if self.model is None:
            pending = self._agreement.start(self.agreement_fields(norm, tuple(options)))
        else:  # launched by the forward; none when this iteration's check was waited by an earlier clip
            pending, self._pending = self._pending, None
        histories = self._histories(len(groups))
        levels = [self._level(n, o, h) for n, o, h in zip(scope_norms, options, histories)]
        per_group = [{"norm": n, "level": level, "clipped": False, "coefficient": None}
                     for n, level in zip(scope_norms, levels)]
        norm_after = norm
        if self.method == "layer_wise":
            factors, norm_after = self._clip_layers(params, norms.per_param, param_levels)
            for stats, chunk in zip(per_group, torch.split(factors, sizes)):
                stats["clipped"] = bool((chunk < 1.0).any())
        elif self.method == "coordinate_wise":
            for stats, member, o, above in zip(per_group, members, options, torch.split(norms.above, sizes)):
                stats["clipped"] = bool((above > 0).any())
                for grad in [local_tensor(p.grad) for p in member if p.grad is not None]:
                    grad.clamp_(-o.level, o.level)  # one pass each; the foreach pair of clamps makes two
            if any(stats["clipped"] for stats in per_group):  # the clamped norm needs a pass (and collective)
                norm_after = float(grad_norms(params, self._pieces, pp_group=self.pp_group).total)
        elif self.method != "no_clip":
            after = []
            for stats, member, o, square in zip(per_group, members, options, group_squares):
                clipped, coefficient = self._decide(stats["norm"], stats["level"], o.beta)
                stats.update(clipped=clipped, coefficient=coefficient)
                if clipped:
                    torch._foreach_mul_([g for g in local_grads(member) if g is not None], coefficient)
                after.append(float(square) * coefficient ** 2)
            norm_after = norm * per_group[0]["coefficient"] if len(groups) == 1 else math.sqrt(math.fsum(after))
        if pending is not None:
            pending.wait()
        self._pending_norms = scope_norms if self.norm_scope == "group" else [norm]
        self._watch.arm()
        coefficients = [s["coefficient"] for s in per_group if s["coefficient"] is not None]
        stats = {"norm": norm, "clipped": any(s["clipped"] for s in per_group),
                 "coefficient": min(coefficients) if coefficients else None,
                 "level": min(levels) if levels else self.clipping_level, "norm_after": norm_after,
                 "groups": per_group}
        self.last_stats = stats
        self._clipped = GradientStamp(params)
        return stats

    def _clip_layers(self, params: list[torch.Tensor], per_param: torch.Tensor,
                     levels: list[float]) -> tuple[torch.Tensor, float]:
        """Scale each gradient by ``min(1, eta_l / ||g_l||)``; returns (the factors, the global norm after)."""
        level = torch.tensor(levels, dtype=per_param.dtype, device=per_param.device)
        # A zero norm gives inf, clamped to 1; a non-finite norm is left alone.
        factors = torch.where(torch.isfinite(per_param), (level / per_param).clamp(max=1.0), 1.0)
        grads = local_grads(params)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, grad in enumerate(grads):
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(index)
        for dtype, indices in by_dtype.items():  # each factor rounded to its gradient's dtype, in one op
            picked = factors if len(indices) == len(grads) else factors.index_select(
                0, torch.tensor(indices, device=factors.device))
            torch._foreach_mul_([grads[i] for i in indices], list(picked.to(dtype).unbind()))
        after = (per_param * factors).square().sum().reshape(1)
        if self.pp_group is not None:  # the other stages' layers count too
            dist.all_reduce(after, group=self.pp_group)
        return factors, float(after.sqrt())

    def _committed(self) -> None:
        """An optimizer step over the clipped parameters ran: count it, remember its finite norms."""
        norms, self._pending_norms = self._pending_norms, None
        if norms is not None:
            targets = self.group_histories if self.norm_scope == "group" else [self.history]
            for history, value in zip(targets, norms):
                if math.isfinite(value):
                    history.append(value)
        self.step_index += 1

    def step(self) -> None:
        """Count a step by hand, for an optimizer that does not run ``torch.optim``'s step hooks."""
        if self._watch.armed:
            self._watch.disarm()
            self._committed()

    # -- checkpointing (rules: dropgrad_dist.checkpoint) ------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"method": self.method, "clipping_level": self.clipping_level, "beta": self.beta,
                "p_autoclip": self.p_autoclip, "history_size": self.history_size, "seed": self.seed,
                "norm_scope": self.norm_scope}

    def state_dict(self) -> dict[str, Any]:
        """Step count and norm histories (progress) and the configuration: plain data."""
        return _checkpoint.plain({"format": _checkpoint.FORMAT, "step_index": self.step_index,
                                  "history": list(self.history.values),
                                  "group_histories": [list(h.values) for h in self.group_histories],
                                  "config": self._config()})

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
        grouped = (_checkpoint.read_field(state_dict, "group_histories", _check_histories, owner)
                   if "group_histories" in state_dict else [])
        history, group_histories = self._rebuilt(values), [self._rebuilt(v) for v in grouped]

        def apply() -> None:
            self.step_index, self.history, self.group_histories = step_index, history, group_histories
            self._pending_norms = None
            self._clipped = None
            self._watch.disarm()

        return apply

    def _rebuilt(self, values: list[float]) -> NormHistory:
        history = NormHistory(self.history_size)
        for value in values:
            history.append(value)
        return history

    def __repr__(self) -> str:
        return (f"GradientClipper({self.method!r}, clipping_level={self.clipping_level}, beta={self.beta}, "
                f"p_autoclip={self.p_autoclip}, history_size={self.history_size}, seed={self.seed}, "
                f"norm_scope={self.norm_scope!r}, step_index={self.step_index}, history={len(self.history)})")


def _check_history(value: object, argument: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v >= 0 for v in value):
        raise ValueError(f"{argument} must be a list of finite non-negative norms")
    return [float(v) for v in value]


def _check_histories(value: object, argument: str) -> list[list[float]]:
    if not isinstance(value, list):
        raise ArgumentTypeError(f"{argument} must be a list of per-group norm lists")
    return [_check_history(item, f"{argument}[{i}]") for i, item in enumerate(value)]


def _check_dict(value: object, argument: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict, got {type(value).__name__}")
    return value


def _clipping_closure(clipper: GradientClipper, param_groups: list[dict[str, Any]],
                      closure: Callable[[], Any] | None) -> tuple[Callable[[], Any], ...]:
    """Clip now and pass no closure, or pass one that clips after every evaluation of ``closure``."""
    if closure is None:
        clipper.clip_groups_(param_groups)
        return ()

    def clipped() -> Any:
        with torch.enable_grad():
            loss = closure()
        clipper.clip_groups_(param_groups)
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
            raise ArgumentTypeError(f"clipper must be a GradientClipper, got {type(clipper).__name__}")
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

    torch-clip's signature, positional order included: ``ClippedSGD(params, lr, momentum,
    clipping_type, clipping_level, beta, do_restarts, p_autoclip=...)``; torch's SGD options and
    ours (``history_size``, ``seed``, ``norm_scope``, ...) are keywords. The gradient itself is
    clipped, as torch-clip's README formulas state (torch-clip's code scales the momentum step by a
    coefficient of the raw gradient instead). ``clipping_level``, ``beta`` and ``p_autoclip`` live
    in ``param_groups`` like ``lr``: set them per group and the next step uses them (validated
    then); ``clipping_type`` and ``do_restarts`` are readable there. ``beta`` is ignored by the
    non-random methods; ``do_restarts`` is recorded only, as in torch-clip (use :class:`Restarter`).
    ``state_dict`` carries the clipper's state (step, history) under ``"clipping"``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0,
                 clipping_type: str = "no_clip", clipping_level: float = 1.0, beta: float = 0.0,
                 do_restarts: bool = False, *, p_autoclip: float = 0.75, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, history_size: int | None = None,
                 seed: int = 0, norm_scope: str = "global", model: nn.Module | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        method = _check_method(clipping_type)
        if method not in _RANDOM and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
            raise TypeError(f"beta must be a number (ignored by {method!r}), got {type(beta).__name__}")
        if not isinstance(do_restarts, bool):
            raise TypeError(f"do_restarts must be a bool, got {type(do_restarts).__name__}")
        if do_restarts:
            warnings.warn("ClippedSGD(do_restarts=True) only records the flag in param_groups, as torch-clip's "
                          "does; restart with dropgrad_dist.Restarter (or compat.torch_clip.Restarter)",
                          UserWarning, stacklevel=2)
        self.clipper = GradientClipper(method, clipping_level, beta=beta if method in _RANDOM else None,
                                       p_autoclip=p_autoclip, history_size=history_size, seed=seed,
                                       norm_scope=norm_scope, model=model, process_group=process_group)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)
        options = {"clipping_type": method, "clipping_level": self.clipper.clipping_level, "beta": beta,
                   "p_autoclip": self.clipper.p_autoclip, "do_restarts": do_restarts}
        self.defaults.update(options)
        for index, group in enumerate(self.param_groups):
            for key, value in options.items():
                group.setdefault(key, value)
            self._check_group(group, index)

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        """Validate a group's clipping options (filled from the defaults where missing)."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if group["clipping_type"] != self.clipper.method:
            raise ValueError(f"param_groups[{index}]['clipping_type'] is {group['clipping_type']!r}; the method is "
                             f"fixed at construction ({self.clipper.method!r}): build a new ClippedSGD to change it")
        self.clipper._options(group, index)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing clipping options come from the defaults (validated before it is added)."""
        if "clipping_type" in self.defaults:  # torch's __init__ adds the first groups before the options exist
            self._check_group({**self.defaults, **param_group}, len(self.param_groups))
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip (with each group's current options), then take the SGD step."""
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)
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


def _check_at_forward(clipper_ref: weakref.ref[GradientClipper]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        clipper = clipper_ref()
        # Training forwards only: an evaluation forward may run on some ranks alone.
        if clipper is not None and module.training and torch.is_grad_enabled():
            clipper._check_at_forward()
    return hook
