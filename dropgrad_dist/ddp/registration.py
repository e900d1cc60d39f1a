"""Registering DropGrad's communication hook on a DDP model: what is refused, and why.

DDP accepts one communication hook per model, calls it once per bucket with whole buckets (not
under compiled DDP's python reducer), and masks the parameters of the model the hook state was
built from. These checks run before DDP holds the hook, so a refused registration changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["PYTHON_REDUCER", "check_registrable", "refuse_per_parameter_call"]

PYTHON_REDUCER = (
    "DropGrad's DDP hook masks whole buckets; compiled DDP's python reducer "
    "(torch._dynamo.config.optimize_ddp = 'python_reducer') calls communication hooks once per "
    "parameter with (grad, param) inside compiled autograd, which it does not support. Use the "
    "default optimize_ddp (DDPOptimizer: torch.compile on the DDP model works with the hook), or "
    "the DropGrad optimizer wrapper on an uncompiled backward")


def check_registrable(target: object, known: Iterable[torch.Tensor] | None) -> DistributedDataParallel:
    """``target`` if a DropGrad hook may be registered on it, else raise naming the cause.

    ``known``: the parameters the state was built from (None: an unpickled state, bound to ``target`` next).
    """
    if not isinstance(target, DistributedDataParallel):
        raise TypeError("DropGrad's communication hook needs a torch.nn.parallel.DistributedDataParallel "
                        f"model, got {type(target).__name__}; wrap the model in DDP first and pass it: "
                        "state.register(ddp_model)")
    if known is not None:
        known = set(known)
        if any(p not in known for p in target.parameters() if p.requires_grad):
            raise ValueError("ddp_model holds parameters this state was not built from; "
                             "build DropGradHookState from the same model")
    if getattr(target, "_use_python_reducer", False):
        raise ValueError(PYTHON_REDUCER)
    if getattr(target, "_comm_hooks", None):
        raise RuntimeError(
            "this DDP model already has a communication hook and DDP allows only one "
            f"({target._comm_hooks[0][0].__qualname__}); register DropGrad once, and to combine it "
            "with another hook register dropgrad_wrapper(other_hook) instead of both")
    return target


def refuse_per_parameter_call(bucket: Any) -> None:
    """The python reducer passes ``(grad, param)`` instead of a bucket: refuse it with the way out."""
    if isinstance(bucket, tuple):
        raise RuntimeError(PYTHON_REDUCER)
