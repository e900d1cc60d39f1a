"""Who masks each gradient: one DropGrad per parameter, so no gradient is masked twice.

Two masks of the same gradient scale kept coordinates by ``1/(1-p)**2`` and drop
``1 - (1-p)**2`` of them, silently. A gradient can be reached twice by two routes:

* a :class:`~dropgrad_dist.DropGradHookState` masking it inside DDP's all-reduce, and a
  :class:`~dropgrad_dist.DropGrad` wrapper masking it again before the step. The hook state
  claims its parameters here when it is registered (``state.register``) and, since
  ``ddp.register_comm_hook(state, dropgrad_hook)`` bypasses that, again the first time its hook
  sees a bucket; the wrapper asks here before masking.
* two ``DropGrad`` wrappers in one chain of optimizer wrappers (``DropGrad(ClippedOptimizer(DropGrad(opt)))``,
  through gradient norm penalty, restarts, Accelerate's ``AcceleratedOptimizer``...):
  :func:`refuse_dropgrad_inside` walks the chain through every ``.optimizer`` attribute.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["claim_for_hook", "hook_state_masking", "refuse_dropgrad_inside", "refuse_hook_masked", "wrapped_chain"]

# Parameter -> weak reference to the DropGradHookState whose hook masks its gradient.
_MASKED_BY_HOOK: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _live_owner(param: torch.Tensor) -> Any:
    ref = _MASKED_BY_HOOK.get(param)
    state = ref() if ref is not None else None
    return state if state is not None and state.masks_in_ddp() else None


def claim_for_hook(params: Iterable[torch.Tensor], state: Any) -> None:
    """Record that ``state``'s DDP hook masks ``params``; another live hook state there raises."""
    params = list(params)
    for param in params:
        owner = _live_owner(param)
        if owner is not None and owner is not state:
            raise RuntimeError("a parameter is already masked by another DropGradHookState registered on its DDP "
                               "model: two hooks would mask its gradient twice. Build one DropGradHookState per "
                               "model (prepare_regularizers once per model and optimizer)")
    for param in params:
        _MASKED_BY_HOOK[param] = weakref.ref(state)


def hook_state_masking(params: Iterable[torch.Tensor]) -> Any:
    """The DropGradHookState whose hook masks any of ``params`` inside DDP's all-reduce, or None."""
    if not _MASKED_BY_HOOK:
        return None
    for param in params:
        owner = _live_owner(param)
        if owner is not None:
            return owner
    return None


def refuse_hook_masked(param: torch.Tensor, key: str) -> None:
    """Raise if a DropGrad DDP hook already masks ``param`` (a wrapper would mask it again)."""
    if _MASKED_BY_HOOK and _live_owner(param) is not None:
        raise RuntimeError(
            f"parameter {key!r} is masked by a DropGradHookState registered on its DDP model and again by a "
            "DropGrad wrapper: kept gradients would be scaled by 1/(1-p)**2. Use one of them: the DDP hook "
            "under DDP, the DropGrad wrapper for one process or FSDP")


def wrapped_chain(optimizer: Any) -> Iterator[Any]:
    """``optimizer`` and every optimizer it wraps, outermost first (through ``.optimizer`` attributes)."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else None


def refuse_dropgrad_inside(optimizer: Any, wrapper_type: type) -> None:
    """Raise if ``optimizer`` or any optimizer it wraps is already a ``wrapper_type`` (DropGrad)."""
    for inner in wrapped_chain(optimizer):
        if isinstance(inner, wrapper_type):
            where = "optimizer is" if inner is optimizer else f"optimizer ({type(optimizer).__name__}) wraps"
            raise ValueError(f"{where} already a DropGrad: its gradients would be masked twice (kept "
                             "gradients scaled by 1/(1-p)**2). Wrap the base optimizer in DropGrad once")
