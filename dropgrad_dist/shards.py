"""Where the locally held part of a gradient (or parameter) lies in the full, unsharded tensor.

Masks are defined on global row-major coordinates, so every local tensor is masked through
its *segments*: contiguous local pieces, each with the global flat index of its first element.

Supported layouts:

- dense tensors (one segment, start 0), or a flat piece of a parameter with a known start
  (FSDP1 with ``use_orig_params=True``: ``start`` from :func:`flat_param_pieces`);
- ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel) whose local tensor is one rectangular
  block of the global tensor: any mix of ``Shard(d)``, ``Replicate()`` and ``Partial()``
  placements on any mesh, even or uneven (empty local tensors included). ``Shard(0)`` on a
  1-D mesh (FSDP2's default) is one segment; ``Shard(d > 0)`` gives one segment per index of
  the leading ``d`` dimensions. A ``Partial`` tensor is masked like a replicated one: the mask
  is a per-coordinate factor, so masking each partial sum masks their reduction.
  ``_StridedShard`` (FSDP2 + TP on the same dim) is not a block and is rejected.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from . import mask as _mask

__all__ = ["FlatPiece", "drop_local_", "drop_locals_", "flat_param_pieces", "local_segments", "local_tensor"]


def _dtensor_class() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor is imported; avoid importing it (0.3 s).
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The locally stored tensor: a DTensor's local shard, else ``tensor`` itself."""
    return tensor._local_tensor if _is_dtensor(tensor) else tensor


def _dtensor_block(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The local tensor of a DTensor and the global offset (per dim) of its first element."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    for placement in tensor.placements:
        # Exact types: _StridedShard interleaves rows of several ranks, so it is not one block.
        if type(placement) not in (Shard, Replicate, Partial):
            raise ValueError(
                f"DropGrad cannot locate the shards of a DTensor with placement {placement!r} "
                f"(placements {tuple(tensor.placements)}); supported: Shard(d), Replicate(), Partial() "
                "(e.g. FSDP2 fully_shard without tensor parallelism on the same dim)")
    # The tensor FSDP2's optimizer steps on: the unpadded local view of the padded shard storage.
    local = tensor._local_tensor
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"DTensor local shape {tuple(local.shape)} differs from the layout its placements "
                           f"{tuple(tensor.placements)} imply ({tuple(shape)}); cannot locate its coordinates")
    if not offset:  # this rank is outside the mesh: it holds nothing
        offset = (0,) * local.dim()
    return local, tuple(offset)


def _block_segments(local: torch.Tensor, offset: tuple[int, ...],
                    global_shape: tuple[int, ...]) -> list[tuple[torch.Tensor, int]]:
    """Segments of a contiguous rectangular block ``local`` at ``offset`` of a ``global_shape`` tensor."""
    if local.numel() == 0:
        return []
    ndim = local.dim()
    # Dims after `split` are whole, so each index of dims [0, split) is one contiguous run.
    split = max([d for d in range(ndim) if local.shape[d] != global_shape[d]], default=0)
    global_strides = [math.prod(global_shape[d + 1:]) for d in range(ndim)]
    run = math.prod(local.shape[split:])
    flat = local.view(-1)
    segments = []
    for i, index in enumerate(itertools.product(*(range(n) for n in local.shape[:split]))):
        start = sum((o + j) * s for o, j, s in zip(offset, index, global_strides))
        start += offset[split] * global_strides[split] if ndim else 0
        segments.append((flat[i * run:(i + 1) * run], start))
    return segments


def local_segments(tensor: torch.Tensor, start: int = 0) -> list[tuple[torch.Tensor, int]]:
    """``[(flat local view, global start), ...]`` covering the locally held elements of ``tensor``.

    ``start`` is the global flat index of the first element of a plain tensor that is a flat
    piece of its parameter (FSDP1); it must be 0 for a ``DTensor``, which carries its layout.
    The local tensor must be contiguous (the views alias it).
    """
    return _segments_over(tensor, local_tensor(tensor), start)


def _dense(local: torch.Tensor) -> torch.Tensor:
    if local.layout != torch.strided:
        raise ValueError("DropGrad does not support sparse gradients (an embedding with sparse=True?); "
                         "use a dense embedding (sparse=False)")
    return local


def _segments_over(tensor: torch.Tensor, local: torch.Tensor, start: int) -> list[tuple[torch.Tensor, int]]:
    """Segments of ``tensor`` laid over ``local``: its local tensor, or a contiguous copy of it."""
    _dense(local)
    if _is_dtensor(tensor):
        if start:
            raise ValueError(f"start must be 0 for a DTensor (its placements give its offset), got {start}")
        _, offset = _dtensor_block(tensor)
        return _block_segments(local, offset, tuple(tensor.shape))
    return [(local.view(-1), start)] if local.numel() else []


def drop_local_(tensor: torch.Tensor, *, key: str, rate: float, seed: int, step: int,
                stream: _mask.MaskStream = _mask.MaskStream.GRAD, start: int = 0) -> None:
    """Apply the ``(seed, step, key, rate, stream)`` mask in place to the locally held part of ``tensor``.

    ``local[j] *= keep(g(j)) / (1 - rate)`` where ``g(j)`` is the global row-major index of local
    element ``j`` (see :func:`local_segments` for ``start``).
    """
    drop_locals_([(tensor, key, rate, start)], seed=seed, step=step, stream=stream)


def drop_locals_(items: Iterable[tuple[torch.Tensor, str, float, int]], *, seed: int, step: int,
                 stream: _mask.MaskStream = _mask.MaskStream.GRAD) -> None:
    """:func:`drop_local_` for many ``(tensor, key, rate, start)`` at once: one engine call per dtype.

    The cost follows the number of elements, not of tensors (:func:`dropgrad_dist.mask.drop_tensors_`).
    """
    pieces, keys, rates, starts, copies = [], [], [], [], []
    for tensor, key, rate, start in items:
        # A DTensor is masked through its local tensor: the storage the optimizer steps on.
        local = _dense(local_tensor(tensor))
        # Coordinates are row-major indices, not memory order (e.g. channels_last grads).
        dense = local if local.is_contiguous() else local.contiguous()
        if dense is not local:
            copies.append((local, dense))
        for piece, piece_start in _segments_over(tensor, dense, start):
            pieces.append(piece)
            keys.append(key)
            rates.append(rate)
            starts.append(piece_start)
    if pieces:
        _mask.drop_tensors_(pieces, keys=keys, rates=rates, starts=starts, seed=seed, step=step, stream=stream)
    for local, dense in copies:
        local.copy_(dense)


@dataclass(frozen=True)
class FlatPiece:
    """Where an FSDP1 parameter's local piece lies: its global flat start, and the ranks sharing it."""

    start: int
    group: Any  # the FSDP shard group (torch.distributed.ProcessGroup)


def flat_param_pieces(params: Iterable[torch.Tensor], model: nn.Module | None) -> dict[torch.Tensor, FlatPiece]:
    """For FSDP1 (``use_orig_params=True``) parameters: the piece each rank holds, and its shard group.

    With ``use_orig_params=True`` each original parameter (and its ``.grad``) on a rank is the
    1-D piece ``param.flatten()[start : start + numel]`` lying in that rank's flat shard. Other
    parameters are absent from the result (their start is 0). Raises for FSDP1 ``FlatParameter``
    s (``use_orig_params=False``) and for FSDP1 parameters without ``model``.
    """
    params = list(params)
    if not any(getattr(p, "_fsdp_flattened", False) for p in params):
        return {}
    from torch.distributed.fsdp import FlatParameter

    if any(isinstance(p, FlatParameter) for p in params):
        raise ValueError("the optimizer holds FSDP1 FlatParameters: wrap the model with "
                         "FullyShardedDataParallel(..., use_orig_params=True) so that DropGrad sees the "
                         "original parameters (or use FSDP2 fully_shard)")
    if model is None:
        raise ValueError("the optimizer holds FSDP1-sharded parameters: pass model= (the FSDP-wrapped "
                         "model) so that DropGrad can find where each parameter's local piece starts")
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    pieces: dict[torch.Tensor, FlatPiece] = {}
    for handle in _get_fsdp_handles(model):
        flat = handle.flat_param
        for param, info in zip(flat._params, flat._shard_param_infos):
            # Parameters outside this rank's shard hold nothing here but still sum over the group.
            start = info.intra_param_start_idx if info.in_shard else 0
            pieces[param] = FlatPiece(start, handle.process_group)
    return pieces
