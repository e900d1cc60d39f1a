"""The clipping methods as functions: options, the clip decision and the in-place scaling per method.

:class:`dropgrad_dist.clipping.clipper.GradientClipper` holds the state (step count, AutoClip histories,
the cached layout) and calls :func:`clip_by_method_`, which dispatches on the method:

- ``"norm"`` and the random methods: ``g <- a * g`` with ``a = eta / ||g||`` when ``a < 1`` (and,
  for a random method, the step's draw ``u < beta ** (a ** power)``);
- ``"layer_wise"``: ``g_l <- g_l * min(1, eta_l / ||g_l||)``;
- ``"coordinate_wise"``: ``g_i <- clamp(g_i, -eta, eta)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..core.checks import ArgumentTypeError, check_choice, check_number_in, check_positive, real_scalar
from ..layout.norms import GradNorms, planned_norms
from .history import NormHistory
from .layout_cache import ClipLayout

__all__ = ["AUTO_METHODS", "CLIPPING_METHODS", "NORM_SCOPES", "RANDOM_POWERS", "ClipOptions", "check_beta",
           "check_method", "check_norm_scope", "check_p_autoclip", "clip_by_method_", "clip_level", "clip_stats",
           "decide", "group_options"]

CLIPPING_METHODS = ("no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
                    "quadratic_rand_norm", "linear_rand_autoclip", "quadratic_rand_autoclip")
RANDOM_POWERS = {"linear_rand_norm": 1, "quadratic_rand_norm": 2, "linear_rand_autoclip": 1,
                 "quadratic_rand_autoclip": 2}
AUTO_METHODS = ("auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip")
NORM_SCOPES = ("global", "group")


def check_method(method: object) -> str:
    return check_choice(method, "method (clipping_type)", CLIPPING_METHODS)


def check_norm_scope(norm_scope: object) -> str:
    return check_choice(norm_scope, "norm_scope", NORM_SCOPES)


def check_beta(beta: object, method: str, argument: str = "beta") -> float:
    """The clip probability base of a random method: a number in (0, 1)."""
    number = real_scalar(beta)
    if number is None or not 0.0 < number < 1.0:
        never = " (beta=0 would never clip: the probability beta ** a is 0)" if number == 0 else ""
        error = ArgumentTypeError if number is None else ValueError
        raise error(f"{argument} must be a number in (0, 1) for method {method!r}{never}, got {beta!r}")
    return number


def check_p_autoclip(value: object, argument: str = "p_autoclip") -> float:
    return check_number_in(value, argument, 0.0, 1.0, low_open=True)


class ClipOptions(NamedTuple):
    """The clipping options of one parameter group."""

    level: float
    beta: float | None
    p_autoclip: float


def group_options(method: str, group: Mapping[str, Any], index: int, defaults: ClipOptions) -> ClipOptions:
    """A group's ``clipping_level``, ``beta`` and ``p_autoclip``: its own keys, else ``defaults``."""
    where = f"param_groups[{index}]"
    level = (check_positive(group["clipping_level"], f"{where}['clipping_level']")
             if "clipping_level" in group else defaults.level)
    beta = defaults.beta
    if method in RANDOM_POWERS and "beta" in group:
        beta = check_beta(group["beta"], method, f"{where}['beta']")
    p_autoclip = (check_p_autoclip(group["p_autoclip"], f"{where}['p_autoclip']")
                  if "p_autoclip" in group else defaults.p_autoclip)
    return ClipOptions(level, beta, p_autoclip)


def clip_level(method: str, norm: float, options: ClipOptions, history: NormHistory) -> float:
    """``eta``, or for AutoClip ``eta_t``: the ``p_autoclip`` quantile of the history and this step's norm."""
    if method not in AUTO_METHODS:
        return options.level
    return history.quantile_with(norm, options.p_autoclip) if math.isfinite(norm) else math.nan


def decide(method: str, norm: float, level: float, beta: float | None, draw: Callable[[], float]) -> tuple[bool, float]:
    """Whether to scale a whole gradient, and by ``a = level / norm``, for the norm-based methods."""
    if not math.isfinite(norm) or not math.isfinite(level) or norm <= level:
        return False, 1.0  # non-finite: leave it to GradScaler to skip the step
    alpha = level / norm
    power = RANDOM_POWERS.get(method)
    if power is not None and not draw() < beta ** (alpha ** power):  # type: ignore[operator]
        return False, 1.0
    return True, alpha


def _clip_layers_(layout: ClipLayout, local: Sequence[torch.Tensor | None], per_param: torch.Tensor,
                  levels: Sequence[float], pp_group: Any) -> tuple[torch.Tensor, float]:
    """Scale each gradient by ``min(1, eta_l / ||g_l||)``; returns (the factors, the global norm after)."""
    level = torch.tensor(levels, dtype=per_param.dtype, device=per_param.device)
    # A zero norm gives inf, clamped to 1; a non-finite norm is left alone.
    factors = torch.where(torch.isfinite(per_param), (level / per_param).clamp(max=1.0), 1.0)
    layout.scale_each_(local, factors)
    after = (per_param * factors).square().sum().reshape(1)
    if pp_group is not None:  # the other stages' layers count too
        dist.all_reduce(after, group=pp_group)
    return factors, float(after.sqrt())


def _clip_coordinates_(layout: ClipLayout, local: Sequence[torch.Tensor | None], norms: GradNorms,
                       sizes: list[int], options: Sequence[ClipOptions], per_group: list[dict[str, Any]],
                       pp_group: Any) -> float:
    """Clamp each coordinate to ``[-eta, eta]``; returns the global norm after (a pass and collective if clamped)."""
    start = 0
    for stats, size, o, above in zip(per_group, sizes, options, torch.split(norms.above, sizes)):
        stats["clipped"] = bool((above > 0).any())
        for grad in [g for g in local[start:start + size] if g is not None]:
            grad.clamp_(-o.level, o.level)  # one pass each; the foreach pair of clamps makes two
        start += size
    if not any(stats["clipped"] for stats in per_group):
        return float(norms.total)
    return float(planned_norms(layout.plan, local, pp_group=pp_group).total)


def _clip_norms_(method: str, layout: ClipLayout, local: Sequence[torch.Tensor | None], norm: float,
                 group_squares: list[torch.Tensor], sizes: list[int], options: Sequence[ClipOptions],
                 per_group: list[dict[str, Any]], draw: Callable[[], float]) -> float:
    """Scale each group by its coefficient ``a`` when :func:`decide` says so; returns the global norm after."""
    after, start = [], 0
    for stats, size, o, square in zip(per_group, sizes, options, group_squares):
        clipped, coefficient = decide(method, stats["norm"], stats["level"], o.beta, draw)
        stats.update(clipped=clipped, coefficient=coefficient)
        if clipped and len(sizes) == 1:
            layout.scale_(local, coefficient)
        elif clipped:
            held = [g for g in local[start:start + size] if g is not None]
            if held:  # a group without any gradient (frozen, unused) has nothing to scale
                torch._foreach_mul_(held, coefficient)
        after.append(float(square) * coefficient ** 2)
        start += size
    return norm * per_group[0]["coefficient"] if len(sizes) == 1 else math.sqrt(math.fsum(after))


def clip_by_method_(method: str, layout: ClipLayout, local: Sequence[torch.Tensor | None], norms: GradNorms,
                    sizes: list[int], group_squares: list[torch.Tensor], options: Sequence[ClipOptions],
                    per_group: list[dict[str, Any]], draw: Callable[[], float], pp_group: Any) -> float:
    """Clip the local gradients ``local`` (parameter groups of ``sizes``) in place by ``method``.

    Group ``k`` holds ``sizes[k]`` parameters, ``group_squares[k] = ||g||^2`` over them; ``per_group[k]`` its
    ``norm`` and ``level``; its ``clipped`` and ``coefficient`` are filled here. Returns the global norm after.
    """
    norm = float(norms.total)
    if method == "layer_wise":
        levels = [o.level for o, size in zip(options, sizes) for _ in range(size)]
        factors, norm_after = _clip_layers_(layout, local, norms.per_param, levels, pp_group)
        for stats, chunk in zip(per_group, torch.split(factors, sizes)):
            stats["clipped"] = bool((chunk < 1.0).any())
        return norm_after
    if method == "coordinate_wise":
        return _clip_coordinates_(layout, local, norms, sizes, options, per_group, pp_group)
    if method == "no_clip":
        return norm
    return _clip_norms_(method, layout, local, norm, group_squares, sizes, options, per_group, draw)


def clip_stats(norm: float, norm_after: float, per_group: list[dict[str, Any]], level: float) -> dict[str, Any]:
    """A clip's result: the smallest level and coefficient over the groups, ``level`` when there is none."""
    coefficients = [s["coefficient"] for s in per_group if s["coefficient"] is not None]
    return {"norm": norm, "clipped": any(s["clipped"] for s in per_group),
            "coefficient": min(coefficients) if coefficients else None,
            "level": min(s["level"] for s in per_group) if per_group else level, "norm_after": norm_after,
            "groups": per_group}
