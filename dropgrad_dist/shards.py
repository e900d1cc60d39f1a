"""Where the locally held part of a gradient (or parameter) lies in the full, unsharded tensor.

Masks are defined on global row-major coordinates, so every local tensor is masked through
its *segments*: contiguous local pieces, each with the global flat index of its first element.
"""

from __future__ import annotations

import torch

from . import mask as _mask

__all__ = ["drop_local_", "local_segments"]


def local_segments(tensor: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """``[(flat local view, global start), ...]`` covering the locally held elements of ``tensor``."""
    if tensor.is_sparse:
        raise ValueError("sparse gradients are not supported by DropGrad; use a dense embedding (sparse=False)")
    return [(tensor.view(-1), 0)]


def drop_local_(tensor: torch.Tensor, *, key: str, rate: float, seed: int, step: int,
                stream: _mask.MaskStream = _mask.MaskStream.GRAD) -> None:
    """Apply the ``(seed, step, key, rate, stream)`` mask in place to the locally held part of ``tensor``."""
    if not tensor.is_contiguous():
        # Coordinates are row-major indices, not memory order (e.g. channels_last grads).
        dense = tensor.contiguous()
        drop_local_(dense, key=key, rate=rate, seed=seed, step=step, stream=stream)
        tensor.copy_(dense)
        return
    for local, start in local_segments(tensor):
        _mask.drop_(local, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream)
