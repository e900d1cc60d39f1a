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

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.agreement import AgreementCheck
from ..core.checks import ArgumentTypeError, check_bool, check_int_in, check_positive, check_seed
from ..core.forward_check import ForwardLaunchedCheck
from ..core.steps import GradientStamp, StepWatch
from ..core.wrapper import OptimizerWrapper, missing_state_hint, state_init_step
from ..layout.norms import planned_norms, stage_group
from ..layout.shards import flat_param_pieces, local_grads
from ..mask import MaskStream, uniform_u32
from .history import AutoClipHistories, NormHistory
from .layout_cache import ClipLayout
from .methods import (
    AUTO_METHODS,
    CLIPPING_METHODS,
    NORM_SCOPES,
    RANDOM_POWERS,
    ClipOptions,
    check_beta,
    check_method,
    check_norm_scope,
    check_p_autoclip,
    clip_by_method_,
    clip_level,
    clip_stats,
    group_options,
)
from .state import clipper_state, read_clipper_state

__all__ = ["CLIPPING_METHODS", "NORM_SCOPES", "ClippedOptimizer", "ClippedSGD", "GradientClipper", "NormHistory"]


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
        self.method = check_method(method)
        self.clipping_level = check_positive(clipping_level, "clipping_level")
        if method in RANDOM_POWERS:
            beta = check_beta(beta, method)
        elif beta is not None:
            raise ValueError(f"beta applies to the random methods ({', '.join(RANDOM_POWERS)}), not {method!r}")
        self.beta = beta
        self.p_autoclip = check_p_autoclip(p_autoclip)
        self.history_size = None if history_size is None else check_int_in(history_size, "history_size", 1)
        self.seed = check_seed(seed)
        self.norm_scope = check_norm_scope(norm_scope)
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.pp_group = stage_group(pp_mesh)
        self.step_index = 0
        self.histories = AutoClipHistories(self.history_size, per_group=norm_scope == "group")
        self.last_stats: dict[str, Any] | None = None
        self._pending_norms: list[float] | None = None
        self._pieces: dict | None = None  # FSDP1 (or DeepSpeed partition) pieces of the parameters seen
        self._layout: ClipLayout | None = None
        self._watch = StepWatch((), self._committed)
        self._clipped: GradientStamp | None = None  # the gradients the last clip_ left
        self._agreement = AgreementCheck("GradientClipper", process_group)
        # With a model, each training forward launches the check (_forward_fields) and clip_ sends none
        # of its own: a rank clipping once more sends nothing the others do not. _clips: clips since that forward.
        self._clips, self._last_norm = 0, None
        self._forward_check = ForwardLaunchedCheck(self._agreement, self._forward_fields, model)

    history = property(lambda self: self.histories.history, doc="AutoClip's norms (global norm scope).")
    group_histories = property(lambda self: self.histories.group_histories,
                               doc="AutoClip's norms per parameter group (``norm_scope='group'``).")

    def _options(self, group: Mapping[str, Any], index: int) -> ClipOptions:
        return group_options(self.method, group, index, ClipOptions(self.clipping_level, self.beta, self.p_autoclip))

    def check_added_group(self, group: Mapping[str, Any], index: int) -> None:
        """Validate the clipping options of a group added to the optimizer as ``param_groups[index]``; refuse
        it under AutoClip with ``norm_scope="group"`` once the histories exist (a new group has no history)."""
        self._options(group, index)
        if self.norm_scope == "group" and self.method in AUTO_METHODS and self.histories.group_histories:
            raise ValueError(f"GradientClipper({self.method!r}, norm_scope='group') keeps one AutoClip history per "
                             f"parameter group since the first clip ({len(self.histories.group_histories)} groups); "
                             "a group added now would have none. Use norm_scope='global' (one history over all "
                             "groups) or a new clipper")

    def draw(self, step: int | None = None) -> float:
        """The uniform draw in [0, 1) of step ``step`` (default: this step): ``u(seed, t)``."""
        return uniform_u32(self.seed, self.step_index if step is None else step, MaskStream.CLIP) / 4294967296.0

    def agreement_fields(self, norm: float, options: tuple = ()) -> dict[str, object]:
        """What every rank must hold equally (checked at every clip)."""
        return {"config": tuple(self._config().items()), "step_index": self.step_index,
                "history": self.histories.digests(), "norm": norm, "options": tuple(options)}

    def _forward_fields(self) -> dict[str, object]:
        """What a training forward of ``model`` checks: the clips since the previous forward and the last
        norm, so one rank's extra ``clip_`` is named at the next forward instead of unpairing collectives."""
        fields = {  # the cause first: errors name the first differing field
            "config": tuple(self._config().items()), "step_index": self.step_index,
            "clip_() calls since the last forward": self._clips, "last clip's norm": self._last_norm,
            "history": self.histories.digests()}
        self._clips = 0  # counted from this forward on
        return fields

    def clip_(self, parameters: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Clip the gradients of ``parameters`` in place.

        Returns ``{"norm", "clipped", "coefficient", "level", "norm_after"}``.

        Call it after ``GradScaler.unscale_`` (on unscaled gradients), after DropGrad has masked,
        before the optimizer step. Every rank must pass the same parameters in the same order.
        A repeated call on the very gradients the previous call left (no backward, no in-place
        change, no optimizer step in between) with the same options (the clipper's method,
        ``clipping_level``, ``beta``, ``p_autoclip``, ...; each group's; the grouping) returns the
        previous result: no work, no collective. Changed options clip the gradients again.
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
        options = [self._options(group, i) for i, group in enumerate(groups)]
        sizes = [len(member) for member in members]
        # What decides the result besides the gradients (the step's draw and the histories do not move
        # while the watch is armed): the clipper's configuration, each group's options, the grouping.
        inputs = (tuple(self._config().items()), tuple(options), tuple(sizes))
        if self._watch.armed and self._clipped is not None and self._clipped.unchanged(params, inputs):
            # The very gradients clip_ left, with the same options, not yet stepped on: clipping is idempotent,
            # so return the same result without a collective (one rank clipping twice sends nothing the others do not).
            return dict(self.last_stats)
        local = self._local_grads(params)
        above = ([o.level for o, size in zip(options, sizes) for _ in range(size)]
                 if self.method == "coordinate_wise" else None)  # the threshold per parameter
        norms = planned_norms(self._layout.plan, local, above, self.pp_group)
        norm = float(norms.total)
        group_squares = [chunk.sum() for chunk in torch.split(norms.squares, sizes)]
        scope_norms = [float(s.sqrt()) for s in group_squares] if self.norm_scope == "group" else [norm] * len(groups)
        self._clips, self._last_norm = self._clips + 1, norm
        if self.model is None:
            pending = self._agreement.start(self.agreement_fields(norm, tuple(options)))
        else:  # launched by the forward; none when this iteration's check was waited by an earlier clip
            pending = self._forward_check.take(launch_if_none=False)
        histories = self.histories.for_groups(len(groups), grow=self.method not in AUTO_METHODS)
        levels = [clip_level(self.method, n, o, h) for n, o, h in zip(scope_norms, options, histories)]
        per_group = [{"norm": n, "level": level, "clipped": False, "coefficient": None}
                     for n, level in zip(scope_norms, levels)]
        norm_after = clip_by_method_(self.method, self._layout, local, norms, sizes, group_squares, options,
                                     per_group, self.draw, self.pp_group)
        if pending is not None:
            pending.wait()
        self._pending_norms = scope_norms if self.norm_scope == "group" else [norm]
        self._watch.arm()
        self.last_stats = clip_stats(norm, norm_after, per_group, self.clipping_level)
        self._clipped = GradientStamp(params, inputs)
        return self.last_stats

    def _local_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """This step's local gradients; the layout (norm pieces, FSDP1 pieces, watched parameters) is
        found again only when it changed."""
        local = None if self._layout is None else self._layout.local(params)
        if local is None:
            known = self._pieces or {}  # DeepSpeed's partitions may be given before the first clip
            self._pieces = {**known, **flat_param_pieces([p for p in params if p not in known], self.model)}
            self._watch.watch(params)
            self._layout = ClipLayout(params, self._pieces)
            local = local_grads(params)
        return local

    def _committed(self) -> None:
        """An optimizer step over the clipped parameters ran: count it, remember its finite norms."""
        norms, self._pending_norms = self._pending_norms, None
        if norms is not None:
            self.histories.record(norms)
        self.step_index += 1

    def step(self) -> None:
        """Count a step by hand, for an optimizer that does not run ``torch.optim``'s step hooks."""
        if self._watch.armed:
            self._watch.disarm()
            self._committed()

    def _config(self) -> dict[str, Any]:
        return {"method": self.method, "clipping_level": self.clipping_level, "beta": self.beta,
                "p_autoclip": self.p_autoclip, "history_size": self.history_size, "seed": self.seed,
                "norm_scope": self.norm_scope}

    def state_dict(self) -> dict[str, Any]:
        """Step count and norm histories (progress) and the configuration: plain data."""
        return clipper_state(self.step_index, self.histories, self._config())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore step count and history; a different configuration raises unless ``strict=False``. Atomic."""
        self.prepare_state(state_dict, strict)()

    def prepare_state(self, state_dict: Mapping[str, Any], strict: bool) -> Callable[[], None]:
        """Validate ``state_dict`` and return what applies it (used by wrappers for atomic loads)."""
        step_index, histories = read_clipper_state(state_dict, self._config(), strict, self.histories)

        def apply() -> None:
            self.step_index, self.histories = step_index, histories
            self._pending_norms = None
            self._clipped = None
            self._watch.disarm()

        return apply

    def __repr__(self) -> str:
        return (f"GradientClipper({self.method!r}, clipping_level={self.clipping_level}, beta={self.beta}, "
                f"p_autoclip={self.p_autoclip}, history_size={self.history_size}, seed={self.seed}, "
                f"norm_scope={self.norm_scope!r}, step_index={self.step_index}, history={len(self.history)})")


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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; the next steps clip it with the others (its own
        ``clipping_level``, ``beta``, ``p_autoclip`` if it holds them, validated before it is added)."""
        self.clipper.check_added_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip, then step; with a ``closure`` every evaluation's gradient is clipped (e.g. LBFGS)."""
        if state_init_step(self.param_groups, closure):  # torch creating the optimizer state: not a step
            return self.optimizer.step()
        return self.optimizer.step(*_clipping_closure(self.clipper, self.param_groups, closure))

    def own_state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def prepare_own_state(self, state: Mapping[str, Any] | None, strict: bool) -> Callable[[], None]:
        if state is None:
            raise ValueError("ClippedOptimizer.load_state_dict: the state dict has no 'clipping' entry "
                             "(saved from the bare optimizer?). " + missing_state_hint("clipping"))
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
        method = check_method(clipping_type)
        if method not in RANDOM_POWERS and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
            raise TypeError(f"beta must be a number (ignored by {method!r}), got {type(beta).__name__}")
        if check_bool(do_restarts, "do_restarts"):
            warnings.warn("ClippedSGD(do_restarts=True) only records the flag in param_groups, as torch-clip's "
                          "does; restart with dropgrad_dist.Restarter (or compat.torch_clip.Restarter)",
                          UserWarning, stacklevel=2)
        self.clipper = GradientClipper(method, clipping_level, beta=beta if method in RANDOM_POWERS else None,
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
            self.clipper.check_added_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Clip (with each group's current options), then take the SGD step."""
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)
        if state_init_step(self.param_groups, closure):  # torch creating the optimizer state: not a step
            return super().step()
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
