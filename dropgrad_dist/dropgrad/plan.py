"""Which parameters DropGrad masks, under which key, at which rate.

A parameter's mask key is its canonical name (:mod:`dropgrad_dist.layout.names`); without a
model, the documented fallback key is the position in the optimizer, ``"param_groups[g][i]"``.

Per-parameter rates (``params=``) map a ``Parameter``, a parameter name (canonical, or as the
wrapped model names it), a module name (``"encoder"`` covers ``encoder.*``) or a glob
(``"*.bias"``) to a rate. The first entry that matches a parameter, in the mapping's order,
gives its rate; parameters no entry matches get the default rate (``drop_rate`` or the
schedule), or are left untouched when there is none.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.checks import check_rate
from ..layout.names import NamedParam, named_parameters
from .schedules import DropRateScheduler

__all__ = ["DropPlan", "PlannedRates", "ParamEntry", "RateSpec", "named_params_of_optimizer"]

RateSpec = Mapping[nn.Parameter | torch.Tensor | str, float]

@dataclass(frozen=True, eq=False)
class ParamEntry:
    """One masked parameter: its tensor, its mask key and its fixed rate (None: the default rate)."""

    param: torch.Tensor
    key: str
    fixed_rate: float | None


_SCHEDULER_METHODS = ("get_drop_rate", "step", "state_dict", "load_state_dict")


def _check_scheduler(obj: object) -> None:
    if isinstance(obj, DropRateScheduler):
        return
    missing = [name for name in _SCHEDULER_METHODS if not callable(getattr(obj, name, None))]
    if missing:
        raise ValueError(f"drop_rate_scheduler must have {', '.join(f'{m}()' for m in _SCHEDULER_METHODS)} "
                         f"(e.g. LinearDropRateScheduler); {type(obj).__name__} lacks {', '.join(missing)}")


def _pattern_matches(pattern: str, name: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _spec_matches(target: Any, named: NamedParam) -> bool:
    if not isinstance(target, str):
        return named.param is target
    return _pattern_matches(target, named.key) or (named.raw != named.key and _pattern_matches(target, named.raw))


class DropPlan:
    """The resolved per-parameter masking plan shared by ``DropGrad`` and the DDP hook.

    ``names_allowed``: whether ``params`` may name parameters (needs the model's names).
    """

    def __init__(
        self,
        named: Sequence[NamedParam],
        drop_rate: float | RateSpec | None = None,
        params: RateSpec | None = None,
        drop_rate_scheduler: DropRateScheduler | None = None,
        *,
        names_allowed: bool,
    ) -> None:
        if isinstance(drop_rate, Mapping):  # DropGrad 0.1 documents the dict in drop_rate=
            if params is not None:
                raise ValueError("give the per-parameter dict once: as params= (or as drop_rate=), not both")
            drop_rate, params = None, drop_rate
        if drop_rate is not None and drop_rate_scheduler is not None:
            raise ValueError("give either drop_rate or drop_rate_scheduler, not both")
        if drop_rate is None and drop_rate_scheduler is None and not params:
            raise ValueError("no drop rate given: pass drop_rate (a number in [0, 1]), params (a dict) "
                             "or drop_rate_scheduler")
        if drop_rate_scheduler is not None:
            _check_scheduler(drop_rate_scheduler)
            check_rate(drop_rate_scheduler.get_drop_rate(), "drop_rate_scheduler.get_drop_rate()")
        self.drop_rate = None if drop_rate is None else check_rate(drop_rate, "drop_rate")
        self.scheduler = drop_rate_scheduler
        self._named = list(named)
        self._specs = self._check_spec(params or {}, names_allowed)
        self._resolve()

    def _resolve(self) -> None:
        specs, named = self._specs, self._named
        known = {entry.param for entry in named}
        for target, _ in specs:
            if not isinstance(target, str) and target not in known:
                raise ValueError("params contains a Parameter that the optimizer/model does not hold")
        first_for: dict[int, str] = {}  # spec index -> a parameter it gives the rate of
        covered_by: dict[int, tuple[int, str]] = {}  # spec index -> (earlier spec, parameter) shadowing it
        entries = []
        for item in named:
            matching = [index for index, (target, _) in enumerate(specs) if _spec_matches(target, item)]
            for index in matching[1:]:
                covered_by.setdefault(index, (matching[0], item.raw))
            fixed = specs[matching[0]][1] if matching else None
            if matching:
                first_for.setdefault(matching[0], item.raw)
            if fixed is None and self.drop_rate is None and self.scheduler is None:
                continue
            entries.append(ParamEntry(item.param, item.key, fixed))
        for index, (target, _) in enumerate(specs):
            if index in first_for:
                continue
            shown = target if isinstance(target, str) else "a Parameter"
            if index in covered_by:
                earlier, name = covered_by[index]
                earlier_shown = specs[earlier][0] if isinstance(specs[earlier][0], str) else "a Parameter"
                raise ValueError(f"params: {shown!r} is shadowed by the earlier entry {earlier_shown!r}, which "
                                 f"already gives the rate of {name!r} (the first matching entry wins); list "
                                 "the more specific entry first")
            names = [item.key for item in named]
            raise ValueError(f"params: {shown!r} matches no parameter; names look like "
                             f"{names[:4]}{' ...' if len(names) > 4 else ''}")
        self.entries = entries
        self._by_param = {entry.param: entry for entry in entries}
        schedule = getattr(self.scheduler, "config", None)
        self._config = {
            "drop_rate": self.drop_rate,
            "drop_rate_scheduler": None if self.scheduler is None else
            (schedule() if callable(schedule) else type(self.scheduler).__name__),
            "params": tuple((entry.key, entry.fixed_rate) for entry in entries),
        }

    @staticmethod
    def _check_spec(params: object, names_allowed: bool) -> list[tuple[Any, float]]:
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict {{Parameter | name | glob: rate}}, got {type(params).__name__}")
        specs = []
        for target, rate in params.items():
            if isinstance(target, str):
                if not names_allowed:
                    raise ValueError(f"params: names such as {target!r} need model= to resolve them")
            elif not isinstance(target, torch.Tensor):
                raise ValueError(f"params keys must be Parameters, names or globs, got {type(target).__name__}")
            specs.append((target, check_rate(rate, f"params[{target!r}]")))
        return specs

    def add(self, named: Sequence[NamedParam]) -> None:
        """Plan parameters added to the optimizer (``add_param_group``): the default rate and the ``params``
        entries apply to their keys as if they had been there from the start; the entries (and the
        configuration that ranks and checkpoints compare) are rebuilt."""
        planned = {item.key for item in self._named}
        taken = [item.key for item in named if item.key in planned]
        if taken:
            raise ValueError(f"the added parameters' keys {taken[:4]} are already planned (a parameter given twice?)")
        before = self._named
        self._named = [*before, *named]
        try:
            self._resolve()
        except ValueError:
            self._named = before
            raise

    def set_drop_rate(self, rate: float) -> None:
        """Change the default rate (from the next masking on); not allowed with a schedule."""
        if self.scheduler is not None:
            raise ValueError("drop_rate cannot be assigned while a drop_rate_scheduler sets it; "
                             "the schedule gives the rate of every step")
        self.drop_rate = check_rate(rate, "drop_rate")
        self._resolve()

    def default_rate(self) -> float | None:
        """The rate of parameters without a fixed rate at the current step (None: untouched)."""
        if self.scheduler is not None:
            return check_rate(self.scheduler.get_drop_rate(), "drop_rate_scheduler.get_drop_rate()")
        return self.drop_rate

    def rate_of(self, entry: ParamEntry) -> float:
        """The rate applied to ``entry`` at the current step."""
        if entry.fixed_rate is not None:
            return entry.fixed_rate
        return self.default_rate()  # type: ignore[return-value]  # entries exist only with a default

    def entry(self, param: torch.Tensor) -> ParamEntry | None:
        """The entry of ``param``, or None if DropGrad leaves it untouched."""
        return self._by_param.get(param)

    def advance(self) -> None:
        """Advance the schedule by one optimizer step."""
        if self.scheduler is not None:
            self.scheduler.step()

    def config(self) -> dict[str, object]:
        """What defines the plan (the same object until the plan changes): compared across ranks and checkpoints."""
        return self._config


def named_params_of_optimizer(param_groups: Iterable[Mapping[str, Any]], model: nn.Module | None,
                              first_group: int = 0) -> list[NamedParam]:
    """Keys for the optimizer's parameters: canonical names via ``model``, else ``param_groups[g][i]``
    (``g`` counted from ``first_group``: the index the first of ``param_groups`` has in the optimizer)."""
    by_param = {item.param: item for item in named_parameters(model)} if model is not None else None
    named = []
    for g, group in enumerate(param_groups, start=first_group):
        for i, param in enumerate(group["params"]):
            if by_param is None:
                named.append(NamedParam(f"param_groups[{g}][{i}]", f"param_groups[{g}][{i}]", param))
            elif param in by_param:
                named.append(by_param[param])
            else:
                raise ValueError(f"model= does not hold the optimizer's parameter param_groups[{g}][{i}] "
                                 f"(shape {tuple(param.shape)}); pass the model the optimizer was built from")
    return named


class PlannedRates:
    """``drop_rate`` of an object that masks by a :class:`DropPlan` held as ``self.plan``.

    Reading gives the default rate at the current step (from the schedule if there is one);
    assigning validates it and applies it from the next step's masks (the rate is part of the
    agreement check, so every rank must assign the same value).
    """

    __slots__ = ()  # subclasses may use __slots__ (DropGradHookState does)
    plan: DropPlan

    @property
    def drop_rate(self) -> float | None:
        return self.plan.default_rate()

    @drop_rate.setter
    def drop_rate(self, rate: float) -> None:
        self.plan.set_drop_rate(rate)

