"""Where the locally held part of a gradient (or parameter) lies in the full, unsharded tensor.

Masks are defined on global row-major coordinates, so every local tensor is masked through
its *segments*: contiguous local pieces, each with the global flat index of its first element.

Supported layouts:

- dense tensors (one segment, start 0), or a flat piece of a parameter with a known start
  (FSDP1 with ``use_orig_params=True``: ``start`` from :func:`flat_param_pieces`);
- ``DTensor`` (FSDP2 ``fully_shard``, HSDP, tensor parallel and their 2-D/3-D compositions)
  with any mix of ``Shard(d)``, ``_StridedShard(d, sf)``, ``Replicate()`` and ``Partial()``
  placements on any mesh, even or uneven (empty local tensors included). Per tensor dim the
  locally held indices are a list of *runs* (intervals of global indices), found by applying
  the placements left to right as torch defines them: ``Shard`` on a mesh dim of size ``n``
  keeps chunk ``c`` of ``torch.chunk(indices, n)``; ``_StridedShard(d, sf)`` keeps chunk ``c``
  of each of the ``sf`` chunks of the indices, concatenated (torch's right-to-left sharding:
  FSDP2 + TP chunks the TP shard over the data-parallel ranks). The local tensor is the
  Cartesian product of its dims' indices; each run of the last dim not held whole, under each
  index of the dims before it, is one segment. ``Partial`` (a sum or average of the ranks'
  values) is masked like ``Replicate``: the mask is a per-coordinate factor, so masking each
  partial value masks their reduction.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["FlatPiece", "dense_local", "dtensor_segments", "flat_param_pieces", "local_segments", "local_tensor",
           "segments_over"]


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


_PLAIN_OR_NONE = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))
_GRAD = operator.attrgetter("grad")


def local_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's gradient as :func:`local_tensor` (None where it has none).

    One pass over the list when no gradient is a DTensor (the common case): no per-tensor checks.
    """
    grads = list(map(_GRAD, params))  # a C-level map: no Python frame per parameter
    if set(map(type, grads)) <= _PLAIN_OR_NONE:
        return grads
    return [None if grad is None else local_tensor(grad) for grad in grads]


Runs = tuple[tuple[int, int], ...]  # ascending, disjoint intervals [start, stop) of global indices
_LINEAR_PARTIALS = ("sum", "avg")  # reductions that commute with a per-coordinate factor


def placement_kind(placement: Any) -> str:
    """``"shard"``, ``"strided"``, ``"replicate"`` or ``"partial"``; ``ValueError`` for any other placement.

    Exact types: ``_StridedShard`` is not a ``Shard`` in torch's type tree, and a ``Partial``
    subclass (a norm, a masked lookup) reduces by something other than a sum.
    """
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    kind = {Shard: "shard", _StridedShard: "strided", Replicate: "replicate"}.get(type(placement))
    if kind is None and type(placement) is Partial and placement.reduce_op in _LINEAR_PARTIALS:
        kind = "partial"
    if kind is None:
        raise ValueError(f"DropGrad cannot locate the shards of a DTensor with placement {placement!r}; "
                         "supported: Shard(d), _StridedShard(d, sf), Replicate(), Partial('sum' or 'avg')")
    return kind


def _merged(runs: Iterable[tuple[int, int]]) -> Runs:
    """``runs`` without empty intervals, touching neighbours joined."""
    out: list[tuple[int, int]] = []
    for low, high in runs:
        if low == high:
            continue
        if out and out[-1][1] == low:
            out[-1] = (out[-1][0], high)
        else:
            out.append((low, high))
    return tuple(out)


def _slice_runs(runs: Runs, low: int, high: int) -> Runs:
    """The indices at positions ``[low, high)`` of the concatenation of ``runs``."""
    out, position = [], 0
    for start, stop in runs:
        begin, end = max(low - position, 0), min(high - position, stop - start)
        if begin < end:
            out.append((start + begin, start + end))
        position += stop - start
    return _merged(out)


def _chunk_runs(runs: Runs, chunks: int, index: int) -> Runs:
    """Piece ``index`` of ``torch.chunk(indices, chunks)`` (empty past the last piece torch returns)."""
    total = sum(stop - start for start, stop in runs)
    size = -(-total // chunks)  # torch.chunk's piece size: ceil(total / chunks)
    return _slice_runs(runs, min(index * size, total), min((index + 1) * size, total))


def _strided_runs(runs: Runs, split_factor: int, chunks: int, index: int) -> Runs:
    """``_StridedShard``: piece ``index`` of each of the ``split_factor`` pieces of ``runs``, concatenated."""
    return _merged(run for k in range(split_factor)
                   for run in _chunk_runs(_chunk_runs(runs, split_factor, k), chunks, index))


def _apply(runs: Runs, kind: str, placement: Any, chunks: int, index: int) -> Runs:
    if kind == "shard":
        return _chunk_runs(runs, chunks, index)
    return _strided_runs(runs, int(placement.split_factor), chunks, index)


@functools.lru_cache(maxsize=4096)
def held_runs(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
              placements: tuple[Any, ...]) -> tuple[Runs, ...]:
    """Per tensor dim, the global indices held at mesh ``coordinate`` (placements applied left to right)."""
    runs = [_merged([(0, size)]) for size in shape]
    for chunks, index, placement in zip(mesh_shape, coordinate, placements):
        kind = placement_kind(placement)
        if kind in ("shard", "strided"):
            dim = placement.dim % len(shape)
            runs[dim] = _apply(runs[dim], kind, placement, chunks, index)
    return tuple(runs)


def _nested_runs(size: int, mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
                 sharding: list[tuple[int, str, Any]]) -> Runs:
    """FSDP2 + TP's own layout of one dim: each ``_StridedShard`` mesh dim chunks what the later dims
    sharding this dim hold (``torch.chunk`` of the TP shard over the data-parallel ranks)."""
    strided = [m for m, kind, _ in sharding if kind == "strided"]
    order = [m for m, _, _ in sharding if m not in strided] + strided[::-1]
    runs = _merged([(0, size)])
    for mesh_dim in order:
        runs = _chunk_runs(runs, mesh_shape[mesh_dim], coordinate[mesh_dim])
    return runs


@functools.lru_cache(maxsize=1024)
def check_strided_layout(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Any, ...]) -> None:
    """Raise where torch's ``_StridedShard`` layout differs from the nested chunks FSDP2 + TP store.

    FSDP2 chunks each rank's TP shard over the data-parallel ranks; torch describes that with
    ``_StridedShard(d, sf=tp)``, which is the same layout unless dim ``d`` is not divisible by
    the TP degree (then even ``full_tensor()`` is wrong). Checked over every mesh coordinate,
    so every rank raises alike.
    """
    for dim, size in enumerate(shape):
        sharding = [(m, placement_kind(p), p) for m, p in enumerate(placements)
                    if placement_kind(p) in ("shard", "strided") and p.dim % len(shape) == dim]
        strided = [m for m, kind, _ in sharding if kind == "strided"]
        if len(strided) != 1:
            continue
        later = [mesh_shape[m] for m, _, _ in sharding if m > strided[0]]
        if not later or math.prod(later) != int(placements[strided[0]].split_factor):
            continue  # not FSDP2 + TP's structure: torch's definition is the only one
        dims = [m for m, _, _ in sharding]
        for values in itertools.product(*(range(mesh_shape[m]) for m in dims)):
            coordinate = [0] * len(mesh_shape)
            for m, value in zip(dims, values):
                coordinate[m] = value
            coordinate = tuple(coordinate)
            if held_runs(shape, mesh_shape, coordinate, placements)[dim] != _nested_runs(
                    size, mesh_shape, coordinate, sharding):
                raise ValueError(
                    f"a DTensor of shape {shape} with placements {placements} on a mesh of shape {mesh_shape}: "
                    f"dim {dim} (size {size}) is not divisible by the tensor-parallel degree "
                    f"{placements[strided[0]].split_factor}, and there FSDP2's nested chunks differ from torch's "
                    "_StridedShard layout (DTensor.full_tensor() is wrong too); make that dim divisible by it")


@functools.lru_cache(maxsize=4096)
def segment_layout(shape: tuple[int, ...], runs: tuple[Runs, ...]) -> tuple[tuple[int, int, int], ...]:
    """``((local flat offset, global flat start, length), ...)`` of a contiguous local tensor holding
    the Cartesian product of ``runs`` of a row-major tensor of ``shape``; fewest segments."""
    if not shape:
        return ((0, 0, 1),)
    if any(not r for r in runs):
        return ()
    partial = [d for d in range(len(shape)) if runs[d] != ((0, shape[d]),)]
    split = max(partial, default=0)  # dims after it are held whole: each of its runs is contiguous
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    leading = [[i for start, stop in runs[d] for i in range(start, stop)] for d in range(split)]
    segments: list[tuple[int, int, int]] = []
    offset = 0
    for index in itertools.product(*leading):
        base = sum(i * s for i, s in zip(index, strides))
        for start, stop in runs[split]:
            length = (stop - start) * strides[split]
            begin = base + start * strides[split]
            last = segments[-1] if segments else None
            if last is not None and last[1] + last[2] == begin:
                segments[-1] = (last[0], last[1], last[2] + length)
            else:
                segments.append((offset, begin, length))
            offset += length
    return tuple(segments)


def dtensor_segments(tensor: torch.Tensor, local: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Segments of a DTensor laid over ``local`` (its local tensor, or a contiguous copy of it)."""
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the mesh: it holds nothing
        return []
    shape, mesh_shape, placements = tuple(tensor.shape), tuple(mesh.shape), tuple(tensor.placements)
    check_strided_layout(shape, mesh_shape, placements)
    runs = held_runs(shape, mesh_shape, tuple(coordinate), placements)
    held = tuple(sum(stop - start for start, stop in r) for r in runs)
    if tuple(local.shape) != held:
        raise RuntimeError(f"DTensor local shape {tuple(local.shape)} differs from the layout its placements "
                           f"{placements} imply ({held}); cannot locate its coordinates")
    flat = local.view(-1)
    return [(flat[offset:offset + length], start) for offset, start, length in segment_layout(shape, runs)]


def local_segments(tensor: torch.Tensor, start: int = 0) -> list[tuple[torch.Tensor, int]]:
    """``[(flat local view, global start), ...]`` covering the locally held elements of ``tensor``.

    ``start`` is the global flat index of the first element of a plain tensor that is a flat
    piece of its parameter (FSDP1); it must be 0 for a ``DTensor``, which carries its layout.
    The local tensor must be contiguous (the views alias it).
    """
    return segments_over(tensor, local_tensor(tensor), start)


def dense_local(local: torch.Tensor) -> torch.Tensor:
    """``local`` itself; raises for a sparse tensor (masks are defined on dense coordinates)."""
    if local.layout != torch.strided:
        raise ValueError("DropGrad does not support sparse gradients (an embedding with sparse=True?); "
                         "use a dense embedding (sparse=False)")
    return local


def segments_over(tensor: torch.Tensor, local: torch.Tensor, start: int) -> list[tuple[torch.Tensor, int]]:
    """Segments of ``tensor`` laid over ``local``: its local tensor, or a contiguous copy of it."""
    dense_local(local)
    if _is_dtensor(tensor):
        if start:
            raise ValueError(f"start must be 0 for a DTensor (its placements give its offset), got {start}")
        return dtensor_segments(tensor, local)
    return [(local.view(-1), start)] if local.numel() else []


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
