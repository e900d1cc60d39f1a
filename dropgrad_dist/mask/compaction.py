"""Compaction: the kept coordinates of a masked buffer, contiguous (DDP's compact all-reduce).

:func:`pack_segments` gathers them (plus one non-finite flag element) into a send buffer;
:func:`unpack_segments_` scatters a summed one back. The mask is recomputed from the hash on
both sides, never stored or sent. One native kernel call each where the device has one (checked
against the torch ops on first use), else torch ops that give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import backends
from .arguments import check_common, check_tensor
from .definition import MaskStream
from .dispatch import Segment, drop_segments_, segment_batch
from .pieces import EMPTY_TABLE, Piece, piece_table

__all__ = ["pack_segments", "unpack_segments_"]


def pack_segments(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
) -> torch.Tensor:
    """The kept coordinates of the masked ``buffer``, contiguous, then a non-finite flag; ``buffer`` is unchanged.

    With ``v = drop_segments_(buffer.clone(), segments, ...)`` and ``K`` its kept positions ascending:
    ``send[:-1] = v[K]``, ``send[-1] = sum(v * 0)`` (IEEE, from ``-0``): NaN if any ``v`` is inf or
    NaN, else ``-0`` if every ``v`` has its sign bit set, else ``+0``; it never overflows. ``len(K)``
    depends on the segments, seed, step and stream alone, so every rank sends the same size.

    One native kernel call computes the mask on the fly (no bool mask, no index array); elsewhere
    the torch ops give the same bits. ``buffer``: a real floating, dense, contiguous tensor (complex
    buffers: :func:`drop_segments_` with ``mask_out``); other arguments as :func:`drop_segments_`.
    """
    batch = _compaction_args(buffer, segments, seed, step, extra_scale)
    kernel = native_packer(buffer)
    if kernel is None:
        return _pack_torch(buffer, segments, seed, step, stream, extra_scale)
    return kernel.pack(piece_table(batch, None, seed, step, stream, extra_scale) if batch else EMPTY_TABLE, buffer)


def unpack_segments_(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    received: torch.Tensor,
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
) -> torch.Tensor:
    """In place, :func:`pack_segments` undone on a (summed) ``received``: kept from it, dropped ``x * 0``.

    ``buffer[K] = received[:-1]``; ``buffer[j] = buffer[j] * 0`` at dropped ``j`` (what masking
    leaves there: a signed zero, NaN where the value is not finite); then ``buffer[0] += received[-1]``
    (the summed flag). The mask is recomputed from the hash, never stored. ``received`` must hold
    ``len(K) + 1`` elements of ``buffer``'s dtype on its device, else ``ValueError`` (``buffer`` then
    holds unspecified values). Returns ``buffer``.
    """
    batch = _compaction_args(buffer, segments, seed, step, 1.0)
    check_received(received, buffer)
    kernel = native_packer(buffer) if backends.addressable(received) else None
    if kernel is None:
        _unpack_torch(buffer, segments, received, seed, step, stream)
        return buffer
    return unpack_native_(kernel, piece_table(batch, None, seed, step, stream, 1.0) if batch else EMPTY_TABLE,
                          buffer, received)


def check_received(received: object, buffer: torch.Tensor) -> None:
    """``received`` must be a contiguous tensor of ``buffer``'s dtype and device."""
    if (not isinstance(received, torch.Tensor) or received.dtype != buffer.dtype or received.device != buffer.device
            or not received.is_contiguous()):
        raise ValueError(f"received must be a contiguous tensor of the buffer's dtype ({buffer.dtype}) and device "
                         f"({buffer.device})")


def unpack_native_(kernel, table: np.ndarray, buffer: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_segments_` through ``kernel`` on an already-built piece table (at ``extra_scale`` 1)."""
    kept = kernel.unpack(table, buffer, received.view(-1))
    if kept < 0:
        raise ValueError(f"received must hold the kept coordinates plus one flag element, got {received.numel()} "
                         "elements (pack_segments with the same segments, seed, step and stream gives the size)")
    backends.bump_versions((buffer,))
    return buffer


def _compaction_args(buffer: torch.Tensor, segments: object, seed: int, step: int,
                     extra_scale: float) -> list[Piece]:
    check_common(seed, step, extra_scale)
    check_tensor(buffer, "buffer")
    if buffer.is_complex():
        raise ValueError("buffer must be real floating point for pack_segments/unpack_segments_ (a complex "
                         "buffer: drop_segments_ with mask_out)")
    return segment_batch(buffer, segments)


def _kept_positions(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a flat bool mask, ascending (int64).

    On CPU numpy's nonzero is branch-free, ~10x faster than torch's on a random mask.
    """
    if keep.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(keep.numpy()))
    return keep.nonzero().squeeze(1)


def _nonfinite_flag(values: torch.Tensor) -> torch.Tensor:
    """``sum(values * 0)`` from ``-0`` as one element: NaN if any value is not finite, else -0 iff all signs are set."""
    nan = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
    signed = torch.where(torch.signbit(values).all(), -0.0, 0.0).to(values.dtype).reshape(1)
    return torch.where((values * 0).isnan().any(), nan, signed)


@torch.no_grad()
def _pack_torch(buffer: torch.Tensor, segments, seed: int, step: int, stream: MaskStream,
                extra_scale: float) -> torch.Tensor:
    """:func:`pack_segments` through torch ops: mask a copy, gather the kept positions."""
    values = buffer.detach().reshape(-1).clone()
    keep = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
    drop_segments_(values, segments, seed=seed, step=step, stream=stream, extra_scale=extra_scale, mask_out=keep)
    index = _kept_positions(keep)
    send = torch.empty(index.numel() + 1, dtype=values.dtype, device=values.device)
    torch.index_select(values, 0, index, out=send[:-1])
    send[-1:].copy_(_nonfinite_flag(values))
    return send


@torch.no_grad()
def _unpack_torch(buffer: torch.Tensor, segments, received: torch.Tensor, seed: int, step: int,
                  stream: MaskStream) -> None:
    """:func:`unpack_segments_` through torch ops: masking leaves ``x * 0`` where dropped; kept ones are replaced."""
    flat = buffer.view(-1)
    keep = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    drop_segments_(flat, segments, seed=seed, step=step, stream=stream, mask_out=keep)
    index = _kept_positions(keep)
    if index.numel() + 1 != received.numel():
        raise ValueError(f"received must hold the kept coordinates plus one flag element ({index.numel() + 1}), "
                         f"got {received.numel()} elements")
    received = received.view(-1)
    flat.index_copy_(0, index, received[:-1])
    flat[:1].add_(received[-1:])  # + 0, or + NaN when a value was not finite (on any rank, once summed)


_packers: dict[tuple, object] = {}  # (device type, dtype) -> native kernel whose pack/unpack passed the check, or None


def native_packer(tensor: torch.Tensor):
    """The native kernel for ``tensor`` if it packs (checked against the torch ops on first use); or None."""
    kernel = backends._native_kernel(tensor) if backends.addressable(tensor) else None
    if kernel is None or not hasattr(kernel, "pack"):
        return None
    key = ("cpu" if tensor.is_cpu else tensor.device.type, tensor.dtype)
    packer = _packers.get(key, backends.MISSING)
    if packer is backends.MISSING:
        with backends.lock:
            try:
                _check_packer(kernel, tensor.device, tensor.dtype)
                packer = kernel
            except Exception as err:
                if backends.mask_backend() == "compiled":
                    raise
                backends.warn_fallback("the native pack/unpack kernel", key[0], err, f"for {tensor.dtype} from now on")
                packer = None
            _packers[key] = packer
    return packer


def _check_packer(kernel, device: torch.device, dtype: torch.dtype) -> None:
    """Raise unless ``kernel``'s pack and unpack give the torch ops' bits on probes (finite, then with inf/NaN)."""
    gen = torch.Generator().manual_seed(1)
    segments = [(3000, "probe.a", 5, 0.3), (2500, "probe.b", (1 << 31) - 1000, 0.7), (700, None, 0, None),
                (1000, "probe.c", 0, 0.0), (500, "probe.d", 0, 1.0)]
    values = (torch.randn(7700, generator=gen) * 100).to(device=device, dtype=dtype)
    poisoned = values.clone()
    poisoned[[17, 4000]] = torch.tensor([float("inf"), float("nan")], dtype=dtype, device=device)
    for probe in (values, poisoned):
        table = piece_table(segment_batch(probe, segments), None, 3, 4, MaskStream.GRAD, 0.5)
        send = kernel.pack(table, probe)
        want = _pack_torch(probe, segments, 3, 4, MaskStream.GRAD, 0.5)
        received = (want * 2).to(dtype)
        got_back, want_back = probe.clone(), probe.clone()
        kernel.unpack(piece_table(segment_batch(got_back, segments), None, 3, 4, MaskStream.GRAD, 1.0), got_back,
                      received)
        _unpack_torch(want_back, segments, received, 3, 4, MaskStream.GRAD)
        if not (backends.same_bits(send, want) and backends.same_bits(got_back, want_back)):
            raise RuntimeError(f"the native {device.type} pack/unpack kernel for {dtype} disagrees with the torch "
                               "ops; refusing it")
