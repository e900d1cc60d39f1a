"""The masking entry points: one tensor, many tensors, a flat buffer of segments.

Each groups its pieces by (device, dtype) into batches and masks a batch with one native kernel
call where the device has one (:mod:`.backends`), else piece by piece through the torch ops.
Their cost follows the number of elements, not of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..core.checks import check_int_in
from . import backends
from .arguments import (
    check_args,
    check_common,
    check_key,
    check_mask_out,
    check_rates,
    check_segment,
    check_sequence,
    check_tensor,
)
from .definition import MASK32, SALT_BLOCK, MaskStream, _key_hash, _rate_code, _salt, key_hash
from .pieces import Piece, piece_table

__all__ = ["Segment", "drop_", "drop_pairs_", "drop_segments_", "drop_tensors_", "keep_mask"]

_REAL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))


class Segment(NamedTuple):
    """``numel`` consecutive buffer elements: coordinates ``[start, start + numel)`` of ``key``.

    ``rate=None`` leaves the segment unmasked (scaled by ``extra_scale`` only; ``key`` unused).
    """

    numel: int
    key: str | None
    start: int
    rate: float | None


def mask_batch(batch: Sequence[Piece], mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
               extra_scale: float) -> None:
    """Mask a batch: one native kernel call, else piece by piece through the torch ops.

    The pieces may be plain tuples in :class:`Piece`'s field order (:func:`drop_tensors_` builds
    them so): the batch is read by columns here, and pieces are named only on the torch-op path.
    """
    tensors = [piece[0] for piece in batch]  # Piece.tensor
    first = tensors[0]
    kernel = backends._native_kernel(first) if backends.addressable(first) else None
    if kernel is not None:
        kernel.many(piece_table(batch, mask, seed, step, stream, extra_scale), first.device)
        # The kernel wrote through pointers: tell autograd, as an in-place torch op would.
        backends.bump_versions([first] if tensors[-1] is first else tensors)
        return
    with torch.no_grad():
        for piece in batch:
            backends.drop_piece_torch(Piece._make(piece), mask, seed, step, stream, extra_scale)


def _mask_tensor(tensor: torch.Tensor, word: int, start: int, rate: float, mask: torch.Tensor | None,
                 seed: int, step: int, stream: MaskStream, extra_scale: float) -> None:
    """:func:`drop_`'s core. On CPU one piece needs neither numpy nor a table: most of the fixed cost."""
    n = tensor.numel()
    kernel = backends._native_kernel(tensor) if backends.addressable(tensor) else None
    if kernel is None:
        with torch.no_grad():
            backends.drop_piece_torch(Piece(tensor, 0, n, word, start, rate, 0), mask, seed, step, stream,
                                      extra_scale)
        return
    within = start & (SALT_BLOCK - 1)
    if tensor.is_cpu and within + n <= SALT_BLOCK:
        threshold, scale = _rate_code(rate, extra_scale, tensor.dtype)
        base = (_salt(seed, step, word, stream, start >> 31) + within) & MASK32
        kernel.one(tensor.data_ptr(), 0 if mask is None else mask.data_ptr(), n, base, threshold, scale)
    else:
        batch = [Piece(tensor, 0, n, word, start, rate, tensor.data_ptr())]
        kernel.many(piece_table(batch, mask, seed, step, stream, extra_scale), tensor.device)
    backends.bump_versions((tensor,))


def drop_(
    tensor: torch.Tensor,
    *,
    seed: int,
    step: int,
    key: str,
    rate: float,
    start: int = 0,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
    mask_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: ``tensor[j] *= keep(start + j) * extra_scale / (1 - rate)``.

    ``tensor`` holds the global coordinates ``[start, start + numel)`` of parameter ``key``
    (a contiguous slice of the flattened parameter, e.g. a DDP bucket view or an FSDP shard).
    ``rate == 0`` scales by ``extra_scale`` only; ``rate == 1`` multiplies by zero (zeros, never
    NaN, for finite input). Non-finite values stay non-finite. If ``mask_out`` (bool, same
    numel) is given it receives the keep mask. Returns ``tensor``.

    ``tensor`` must be dense, contiguous, floating point or complex (a complex number is one
    coordinate); ``seed`` and ``step`` are ints in ``[0, 2**64)``; anything else raises ``ValueError``.
    """
    rate = check_args(seed, step, rate, start, extra_scale)
    check_tensor(tensor)
    flat_mask = check_mask_out(mask_out, tensor, "tensor")
    word = key_hash(key)
    if tensor.is_complex():
        _drop_complex_(tensor, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream,
                       extra_scale=extra_scale, mask_out=mask_out)
        return tensor
    _mask_tensor(tensor, word, start, rate, flat_mask, seed, step, stream, extra_scale)
    return tensor


def _drop_complex_(tensor: torch.Tensor, **mask_args) -> None:
    drop_pairs_(torch.view_as_real(tensor.view(-1)), **mask_args)


def drop_pairs_(pairs: torch.Tensor, *, mask_out: torch.Tensor | None = None, **mask_args) -> torch.Tensor:
    """Mask ``n`` coordinates stored as ``[n, 2]`` reals (complex numbers): both parts share one decision.

    ``pairs[j] *= keep(start + j) * extra_scale / (1 - rate)``; other arguments as :func:`drop_`;
    ``mask_out`` (bool, ``n`` elements) receives one decision per coordinate. Needs no alignment,
    so it also serves complex gradients viewed as reals inside a DDP bucket.
    """
    if pairs.dim() != 2 or pairs.shape[1] != 2 or not pairs.is_floating_point():
        raise ValueError(f"pairs must be a floating [n, 2] tensor, got {pairs.dtype} of shape {tuple(pairs.shape)}")
    factor = torch.ones(pairs.shape[0], dtype=pairs.dtype, device=pairs.device)
    drop_(factor, mask_out=mask_out, **mask_args)
    with torch.no_grad():
        pairs.mul_(factor[:, None])
    return pairs


def drop_tensors_(
    tensors: Sequence[torch.Tensor],
    *,
    keys: Sequence[str],
    rates: Sequence[float] | float,
    starts: Sequence[int] | None = None,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
) -> None:
    """In place, for every ``k``: ``drop_(tensors[k], key=keys[k], rate=rates[k], start=starts[k], ...)``.

    Bitwise the same as those calls, in one kernel call per (device, dtype): the cost follows the
    number of elements, not of tensors. ``rates`` is one rate per tensor or one for all;
    ``starts`` (default 0) is each tensor's first global coordinate (e.g. an FSDP piece). The
    tensors must not overlap in memory. Complex tensors are masked one by one.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(f"tensors must be a sequence of tensors, got {type(tensors).__name__}")
    count = len(tensors)
    check_common(seed, step, extra_scale)
    keys = check_sequence(keys, count, "keys")
    rate_list = check_rates(rates, count)
    start_list = [0] * count if starts is None else check_sequence(starts, count, "starts")
    raw = not torch.compiler.is_compiling()  # traced by torch.compile: the torch ops only
    batches: dict[object, list[tuple]] = {}
    complex_ = []
    for k, tensor in enumerate(tensors):
        try:  # the common case in one expression; anything else gets check_tensor's messages
            plain = (type(tensor) in backends._PLAIN and tensor.layout is torch.strided
                     and tensor.dtype in _REAL_DTYPES and tensor.is_contiguous())
        except RuntimeError:  # a sparse layout without is_contiguous
            plain = False
        if not plain:
            check_tensor(tensor, f"tensors[{k}]")
            if tensor.is_complex():  # a complex number is one coordinate: masked through a real factor
                complex_.append(k)
                continue
        key, start = keys[k], start_list[k]
        if type(key) is not str:
            check_key(key, f"keys[{k}]")
        if type(start) is not int or start < 0:
            check_int_in(start, f"starts[{k}]", 0)
        plain = plain and raw
        group = (plain, tensor.dtype) if plain and tensor.is_cpu else (plain, tensor.device, tensor.dtype)
        batch = batches.get(group)
        if batch is None:
            batch = batches[group] = []
        # A plain tuple in Piece's field order: a NamedTuple's constructor would cost ~0.5 us per
        # tensor, 0.2x the cost of masking 1000 small tensors (bench mask).
        batch.append((tensor, 0, tensor.numel(), _key_hash(key), start, rate_list[k],
                      tensor.data_ptr() if plain else 0))
    _check_disjoint([batch for group, batch in batches.items() if group[0]])
    for batch in batches.values():
        mask_batch(batch, None, seed, step, stream, extra_scale)
    for k in complex_:
        _drop_complex_(tensors[k], seed=seed, step=step, key=keys[k], rate=rate_list[k], start=start_list[k],
                       stream=stream, extra_scale=extra_scale, mask_out=None)


def _check_disjoint(batches: list[list[tuple]]) -> None:
    if sum(map(len, batches)) < 2:
        return
    spans: dict[torch.device, list[np.ndarray]] = {}
    for batch in batches:
        tensors, _, counts, _, _, _, pointers = zip(*batch)  # Piece's columns
        begins = np.array(pointers, dtype=np.int64)
        ends = begins + np.array(counts, dtype=np.int64) * tensors[0].element_size()
        first = tensors[0]
        spans.setdefault(first.device, []).append(np.stack([begins, ends], axis=1)[ends > begins])
    refuse_overlap(spans)


def refuse_overlap(spans: dict[torch.device, list[np.ndarray]]) -> None:
    """Raise if byte spans ``[begin, end)`` (rows) of one device overlap.

    Overlapping tensors would be masked twice, concurrently by a multi-threaded kernel.
    """
    for device_spans in spans.values():
        both = np.concatenate(device_spans)
        if len(both) < 2:
            continue
        order = np.argsort(both[:, 0], kind="stable")
        if np.any(both[order[1:], 0] < both[order[:-1], 1]):
            raise ValueError("tensors overlap in memory (the same storage listed twice, or views of one "
                             "another); mask each element once")


def drop_segments_(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
    mask_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place, segment by segment: ``drop_(buffer.view(-1)[o:o + numel], key=key, rate=rate, start=start, ...)``.

    ``segments`` are ``(numel, key, start, rate)`` laid back to back from offset 0 and covering the
    whole buffer (a DDP gradient bucket, ``extra_scale = 1 / world_size``); ``rate=None``: not
    masked, only scaled by ``extra_scale``. ``mask_out`` (bool, buffer-sized) receives the keep
    mask (True on unmasked segments). One kernel call per buffer. Returns ``buffer``.
    """
    check_common(seed, step, extra_scale)
    check_tensor(buffer, "buffer")
    flat_mask = check_mask_out(mask_out, buffer, "buffer")
    batch = segment_batch(buffer, segments)
    if buffer.is_complex():
        flat = buffer.view(-1)
        for k, piece in enumerate(batch):
            at, n = piece.offset, piece.count
            piece_mask = None if mask_out is None else mask_out.view(-1)[at:at + n]
            _drop_complex_(flat[at:at + n], seed=seed, step=step, key=segments[k][1] or "", rate=piece.rate,
                           start=piece.start, stream=stream, extra_scale=extra_scale, mask_out=piece_mask)
    elif batch:
        mask_batch(batch, flat_mask, seed, step, stream, extra_scale)
    return buffer


def segment_batch(buffer: torch.Tensor, segments: object, pointer: int | None = None) -> list[Piece]:
    """The pieces of ``segments`` laid back to back over ``buffer``, checked to cover it exactly.

    ``pointer``: the address the pieces' pointers count from (default: the buffer's where the native
    kernels may write it, else 0 with no pointers).
    """
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise ValueError(f"segments must be a sequence of (numel, key, start, rate), got {type(segments).__name__}")
    batch: list[Piece] = []
    offset = 0
    if pointer is not None:
        ptr, size = pointer, buffer.element_size()
    else:
        ptr, size = (buffer.data_ptr(), buffer.element_size()) if backends.addressable(buffer) else (0, 0)
    for k, segment in enumerate(segments):
        numel, word, start, rate = check_segment(segment, k)
        batch.append(Piece(buffer, offset, numel, word, start, rate, ptr + offset * size))
        offset += numel
    if offset != buffer.numel():
        raise ValueError(f"segments must cover the buffer exactly: they hold {offset} elements, "
                         f"the buffer {buffer.numel()}")
    return batch


def keep_mask(
    numel: int,
    *,
    seed: int,
    step: int,
    key: str,
    rate: float,
    start: int = 0,
    stream: MaskStream = MaskStream.GRAD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask of global coordinates ``[start, start + numel)``: True where the coordinate is kept."""
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    out = torch.empty(numel, dtype=torch.bool, device=device)
    scratch = torch.ones(numel, dtype=torch.float32, device=device)
    drop_(scratch, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream, mask_out=out)
    return out
