"""SAM and ASAM: the gradient norm penalty with ``alpha = 1``, in our form and in davda54/sam's.

``g = grad L(theta + e)`` with ``e = rho g1 / ||g1||`` (SAM, Foret et al. 2021) or, per group with
``adaptive=True``, ``e = rho T^2 g1 / ||T g1||``, ``T = |theta|`` element-wise (ASAM, Kwon et al.
2021); the norm is global over every group and shard. Two constructor forms:

- ``SAM(optimizer, rho=0.05, *, model=..., ...)``: wraps an optimizer instance (a ``DropGrad`` /
  ``ClippedOptimizer`` chain included); ``step(closure)`` runs the closure for both passes;
- ``SAM(params, base_optimizer_cls, rho=0.05, adaptive=False, **base_kwargs)`` (davda54/sam's): builds
  the base optimizer from ``params`` and ``base_kwargs``; ``step(closure)`` takes the first pass
  from the gradient already in ``.grad`` and runs the closure once, at the perturbed point.

Both offer ``first_step(zero_grad)`` / ``second_step(zero_grad)`` (and ``restore()`` to abandon a step
whose second pass failed), ``base_optimizer`` (the
optimizer that updates the parameters: LR schedulers may be built on it) and ``param_groups[i]
['rho']`` / ``['adaptive']``, read at every step (set them like ``lr``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.checks import check_bool
from .penalty import GradientNormPenalty, check_radius

__all__ = ["SAM"]


def _build_base(params: Iterable[Any], base_optimizer: Callable[..., torch.optim.Optimizer], rho: float,
                adaptive: bool, base_kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
    """davda54/sam's construction: the base optimizer over ``params`` (groups carry ``rho``, ``adaptive``)."""
    if not callable(base_optimizer):
        raise TypeError("SAM(params, base_optimizer, ...): base_optimizer must be an optimizer class such as "
                        f"torch.optim.SGD, got {type(base_optimizer).__name__}")
    params = list(params)
    if not params:
        raise ValueError("SAM got an empty parameter list")
    groups = [dict(group) for group in params] if isinstance(params[0], Mapping) else [{"params": params}]
    for group in groups:
        group.setdefault("rho", rho)
        group.setdefault("adaptive", adaptive)
    optimizer = base_optimizer(groups, **base_kwargs)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer(...) must build a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class SAM(GradientNormPenalty):
    """Sharpness-aware minimization: ``g = grad L(theta + rho T^2 g / ||T g||)``, ``T = |theta|`` (ASAM) or 1.

    GNP with ``alpha = 1``, ``r = rho`` (see :class:`GradientNormPenalty` for the keywords). The
    first argument is an optimizer instance (our form) or the parameters (davda54/sam's form,
    then ``base_optimizer`` is the optimizer class and ``base_kwargs`` its keywords). ``first_pass``
    defaults to ``"closure"`` in our form and ``"given"`` in davda54's.
    """

    def __init__(self, params: Any, base_optimizer: Any = None, rho: float = 0.05, adaptive: bool = False, *,
                 model: nn.Module | None = None, warmup: str = "none", warmup_steps: int = 0,
                 perturbation: str = "global", every: int = 1, probability: float = 1.0, seed: int = 0,
                 replay_rng: bool = True, bn_stats_from_first_pass: bool = True, first_pass: str | None = None,
                 process_group: dist.ProcessGroup | None = None, pp_mesh: Any = None, **base_kwargs: Any) -> None:
        if isinstance(params, torch.optim.Optimizer):
            if isinstance(base_optimizer, (int, float)) and not isinstance(base_optimizer, bool):
                rho = base_optimizer  # SAM(optimizer, 0.05): rho given positionally
            elif base_optimizer is not None:
                raise TypeError("SAM(optimizer, ...) wraps an optimizer instance; base_optimizer= is for "
                                "SAM(params, base_optimizer_cls, ...)")
            if base_kwargs:
                raise TypeError(f"SAM(optimizer, ...) got unknown keyword(s) {sorted(base_kwargs)}; keywords for "
                                "the base optimizer belong to SAM(params, base_optimizer_cls, ...)")
            optimizer, default_first_pass = params, "closure"
        else:
            rho, adaptive = check_radius(rho, "rho"), check_bool(adaptive, "adaptive")
            optimizer, default_first_pass = _build_base(params, base_optimizer, rho, adaptive, base_kwargs), "given"
        rho, adaptive = check_radius(rho, "rho"), check_bool(adaptive, "adaptive")
        for group in optimizer.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        optimizer.defaults.setdefault("rho", rho)  # add_param_group fills new groups from the defaults
        optimizer.defaults.setdefault("adaptive", adaptive)
        super().__init__(optimizer, alpha=1.0, r=rho, model=model, warmup=warmup, warmup_steps=warmup_steps,
                         perturbation=perturbation, adaptive=adaptive, every=every, probability=probability,
                         seed=seed, replay_rng=replay_rng, bn_stats_from_first_pass=bn_stats_from_first_pass,
                         first_pass=default_first_pass if first_pass is None else first_pass,
                         process_group=process_group, pp_mesh=pp_mesh)

    def _group_rho(self, group: Mapping[str, Any]) -> float:
        return check_radius(group.get("rho", self.r), "param_groups[i]['rho']")

    def _group_adaptive(self, group: Mapping[str, Any]) -> bool:
        return check_bool(group.get("adaptive", self.adaptive), "param_groups[i]['adaptive']")
