"""Which parameters DropGrad masks, under which key, at which rate.

A parameter's mask key is its *canonical name*: the name from ``model.named_parameters()``
with wrapper segments removed (leading ``module.`` from DDP, and ``_orig_mod.``,
``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` anywhere), so a plain, a DDP,
an FSDP and a compiled model give the same keys. Without a model, the documented fallback
key is the position in the optimizer, ``"param_groups[g][i]"``.

Per-parameter rates (``params=``) map a ``Parameter``, a parameter name, a module name
(``"encoder"`` covers ``encoder.*``) or a glob (``"*.bias"``) to a rate. The first entry
that matches a parameter, in the mapping's order, gives its rate; parameters no entry
matches get the default rate (``drop_rate`` or the schedule), or are left untouched when
there is none.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .checks import check_rate
from .schedules import DropRateScheduler

__all__ = ["DropPlan", "ParamEntry", "RateSpec", "canonical_name", "canonical_names"]

RateSpec = Mapping[Union[nn.Parameter, torch.Tensor, str], float]

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """Strip wrapper segments: ``"module._orig_mod.blocks.0._fsdp_wrapped_module.w"`` -> ``"blocks.0.w"``."""
    kept: list[str] = []
    for part in name.split("."):
        if part in _WRAPPER_SEGMENTS or (part == "module" and not kept):
            continue
        kept.append(part)
    return ".".join(kept)


def canonical_names(model: nn.Module) -> dict[torch.Tensor, str]:
    """Map each parameter of ``model`` to its canonical name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {param: canonical_name(name) for name, param in model.named_parameters()}


@dataclass(frozen=True, eq=False)
class ParamEntry:
    """One masked parameter: its tensor, its mask key and its fixed rate (None: the default rate)."""

    param: torch.Tensor
    key: str
    fixed_rate: float | None


def _is_scheduler(obj: object) -> bool:
    return isinstance(obj, DropRateScheduler) or (
        callable(getattr(obj, "get_drop_rate", None)) and callable(getattr(obj, "step", None))
    )


def _pattern_matches(pattern: str, name: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


class DropPlan:
    """The resolved per-parameter masking plan shared by ``DropGrad`` and the DDP hook."""

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        drop_rate: float | RateSpec | None = None,
        params: RateSpec | None = None,
        drop_rate_scheduler: DropRateScheduler | None = None,
        *,
        names_are_canonical: bool,
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
        if drop_rate_scheduler is not None and not _is_scheduler(drop_rate_scheduler):
            raise ValueError("drop_rate_scheduler must have get_drop_rate() and step() "
                             f"(e.g. LinearDropRateScheduler), got {type(drop_rate_scheduler).__name__}")
        self.drop_rate = None if drop_rate is None else check_rate(drop_rate, "drop_rate")
        self.scheduler = drop_rate_scheduler
        if self.scheduler is not None:
            check_rate(self.scheduler.get_drop_rate(), "drop_rate_scheduler.get_drop_rate()")
        self.entries = self._resolve(named_params, params, names_are_canonical)
        self._by_param = {entry.param: entry for entry in self.entries}

    def _resolve(self, named_params, params, names_are_canonical) -> list[ParamEntry]:
        specs = self._check_spec(params or {}, names_are_canonical)
        used = [False] * len(specs)
        known = {param for _, param in named_params}
        for target, _ in specs:
            if not isinstance(target, str) and target not in known:
                raise ValueError("params contains a Parameter that the optimizer/model does not hold")
        entries = []
        for name, param in named_params:
            fixed = None
            for index, (target, rate) in enumerate(specs):
                if (param is target) if not isinstance(target, str) else _pattern_matches(target, name):
                    fixed, used[index] = rate, True
                    break
            if fixed is None and self.drop_rate is None and self.scheduler is None:
                continue
            entries.append(ParamEntry(param, name, fixed))
        unmatched = [t for (t, _), u in zip(specs, used) if isinstance(t, str) and not u]
        if unmatched:
            names = [name for name, _ in named_params]
            raise ValueError(f"params: {unmatched[0]!r} matches no parameter; names look like "
                             f"{names[:4]}{' ...' if len(names) > 4 else ''}")
        return entries

    @staticmethod
    def _check_spec(params: object, names_are_canonical: bool) -> list[tuple[Any, float]]:
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict {{Parameter | name | glob: rate}}, got {type(params).__name__}")
        specs = []
        for target, rate in params.items():
            if isinstance(target, str):
                if not names_are_canonical:
                    raise ValueError(f"params: names such as {target!r} need model= to resolve them")
                target = canonical_name(target)
            elif not isinstance(target, torch.Tensor):
                raise ValueError(f"params keys must be Parameters, names or globs, got {type(target).__name__}")
            specs.append((target, check_rate(rate, f"params[{target!r}]")))
        return specs

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
        """The fields that must agree across ranks."""
        schedule = getattr(self.scheduler, "config", None)
        return {
            "drop_rate": self.drop_rate,
            "drop_rate_scheduler": schedule() if callable(schedule) else type(self.scheduler).__name__,
            "params": tuple((entry.key, entry.fixed_rate) for entry in self.entries),
        }


def named_params_of_optimizer(
    param_groups: Iterable[Mapping[str, Any]], model: nn.Module | None
) -> list[tuple[str, torch.Tensor]]:
    """Keys for the optimizer's parameters: canonical names via ``model``, else ``param_groups[g][i]``."""
    names = canonical_names(model) if model is not None else None
    named = []
    for g, group in enumerate(param_groups):
        for i, param in enumerate(group["params"]):
            if names is None:
                named.append((f"param_groups[{g}][{i}]", param))
            elif param in names:
                named.append((names[param], param))
            else:
                raise ValueError(f"model= does not hold the optimizer's parameter param_groups[{g}][{i}] "
                                 f"(shape {tuple(param.shape)}); pass the model the optimizer was built from")
    return named
