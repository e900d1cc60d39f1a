"""The mask applied to the locally held part of a sharded tensor, in the full tensor's coordinates.

A local shard (DTensor, FSDP1 flat piece, or a plain tensor) is masked through its segments
(:func:`dropgrad_dist.layout.shards.local_segments`), so a coordinate's fate is the same whichever
rank holds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..layout.shards import dense_local, local_tensor, segments_over
from .definition import MaskStream
from .dispatch import drop_tensors_

__all__ = ["drop_local_", "drop_locals_"]


def drop_local_(tensor: torch.Tensor, *, key: str, rate: float, seed: int, step: int,
                stream: MaskStream = MaskStream.GRAD, start: int = 0) -> None:
    """Apply the ``(seed, step, key, rate, stream)`` mask in place to the locally held part of ``tensor``.

    ``local[j] *= keep(g(j)) / (1 - rate)`` where ``g(j)`` is the global row-major index of local
    element ``j`` (see :func:`~dropgrad_dist.layout.shards.local_segments` for ``start``).
    """
    drop_locals_([(tensor, key, rate, start)], seed=seed, step=step, stream=stream)


def drop_locals_(items: Iterable[tuple[torch.Tensor, str, float, int]], *, seed: int, step: int,
                 stream: MaskStream = MaskStream.GRAD) -> None:
    """:func:`drop_local_` for many ``(tensor, key, rate, start)`` at once: one engine call per dtype.

    The cost follows the number of elements, not of tensors (:func:`dropgrad_dist.mask.drop_tensors_`).
    """
    pieces, keys, rates, starts, copies = [], [], [], [], []
    for tensor, key, rate, start in items:
        # A DTensor is masked through its local tensor: the storage the optimizer steps on.
        local = dense_local(local_tensor(tensor))
        # Coordinates are row-major indices, not memory order (e.g. channels_last grads).
        dense = local if local.is_contiguous() else local.contiguous()
        if dense is not local:
            copies.append((local, dense))
        for piece, piece_start in segments_over(tensor, dense, start):
            pieces.append(piece)
            keys.append(key)
            rates.append(rate)
            starts.append(piece_start)
    if pieces:
        drop_tensors_(pieces, keys=keys, rates=rates, starts=starts, seed=seed, step=step, stream=stream)
    for local, dense in copies:
        local.copy_(dense)
