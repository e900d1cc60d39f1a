"""Canonical parameter names: a parameter's identity whatever wraps the model.

A parameter's *canonical name* is its name in the model with wrappers peeled off, so a plain, a
DDP, an FSDP, a compiled and an activation-checkpointed model give the same names.
:func:`canonical_names` unwraps ``DistributedDataParallel``/``DataParallel`` (``.module``) and
``torch.compile`` (``._orig_mod``) by type, then drops the wrapper segments
``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module`` and ``_orig_mod`` inside the name. Names
are unique per model: two parameters that would share one raise. Masks, clipping histories and
restart sums are keyed by them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["NamedParam", "canonical_name", "canonical_names", "named_parameters"]

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """Strip wrapper segments from a name: ``"module._orig_mod.blocks.0._fsdp_wrapped_module.w"`` -> ``"blocks.0.w"``.

    The leading ``module.`` is taken as DDP's; :func:`canonical_names` decides that by the model's
    type instead, and is what masks are keyed by.
    """
    kept: list[str] = []
    for part in name.split("."):
        if part in _WRAPPER_SEGMENTS or (part == "module" and not kept):
            continue
        kept.append(part)
    return ".".join(kept)


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Peel DDP/DataParallel and torch.compile wrappers; returns the inner model and the peeled prefix."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    prefix = ""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model, prefix = model.module, prefix + "module."
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


@dataclass(frozen=True, eq=False)
class NamedParam:
    """A parameter with its canonical name (the mask key) and its name in the given model."""

    key: str
    raw: str
    param: torch.Tensor


def named_parameters(model: nn.Module, *, trainable_only: bool = False) -> list[NamedParam]:
    """Every parameter of ``model`` with its unique canonical name; raises if two would share one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner, prefix = _unwrap(model)
    named, seen = [], {}
    for name, param in inner.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        key = ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)
        if key in seen:
            raise ValueError(f"parameters {seen[key]!r} and {prefix + name!r} would share the mask key {key!r}; "
                             "rename one (mask keys must be unique per model)")
        seen[key] = prefix + name
        named.append(NamedParam(key, prefix + name, param))
    return named


def canonical_names(model: nn.Module) -> dict[torch.Tensor, str]:
    """Map each parameter of ``model`` to its canonical name (its mask key)."""
    return {entry.param: entry.key for entry in named_parameters(model)}
