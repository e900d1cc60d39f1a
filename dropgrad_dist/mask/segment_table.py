"""A flat buffer's segments checked once: per call only the buffer's address and the salts change.

:func:`.dispatch.drop_segments_`, :func:`.compaction.pack_segments` and
:func:`.compaction.unpack_segments_` check every segment and build the piece table on each call,
a few microseconds of Python per segment. A DDP bucket holds the same segments round after round,
so :class:`SegmentTable` checks them and builds the table's fixed columns once
(:func:`.pieces.piece_columns`); a call then writes the buffer's address and the salts of
``(seed, step)`` in one numpy pass (:func:`.pieces.fill_table`) and calls the native kernel.
Where the buffer's device has no native kernel (or the backend is eager, or torch.compile
traces), a call goes to those per-call entry points with the same segments: the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.checks import check_rate
from . import backends
from .arguments import check_common, check_tensor
from .compaction import check_received, native_packer, pack_segments, unpack_native_, unpack_segments_
from .definition import MaskStream
from .dispatch import Segment, drop_segments_, segment_batch
from .pieces import EMPTY_TABLE, TABLE_COLUMNS, PieceColumns, fill_table, piece_columns

__all__ = ["SegmentTable"]

# Extra scales whose columns are kept at once: a DDP hook uses two (1 / world size to pack, 1 to unpack).
_MAX_SCALES = 8


class SegmentTable:
    """``segments`` ``(numel, key, start, rate)`` laid back to back over buffers like ``buffer``, checked once.

    Math: as :func:`~dropgrad_dist.mask.drop_segments_`,
    ``buffer[o + j] *= keep(start + j) * extra_scale / (1 - rate)`` per segment; :meth:`pack` and
    :meth:`unpack_` as :func:`~dropgrad_dist.mask.pack_segments` and
    :func:`~dropgrad_dist.mask.unpack_segments_`, bitwise. The table holds no buffer: any real,
    dense, contiguous buffer of the same dtype and size may be passed to each call.

    Args:
        buffer: a buffer of the layout (its dtype and size are the table's; its values are not read).
        segments: ``(numel, key, start, rate)`` covering ``buffer`` exactly; ``rate=None``: only scaled.

    Raises:
        ValueError: a complex or non-floating buffer, or a segment as :func:`drop_segments_` refuses it.
    """

    __slots__ = ("segments", "dtype", "numel", "_batch", "_columns", "_table")

    def __init__(self, buffer: torch.Tensor,
                 segments: Sequence[Segment | tuple[int, str | None, int, float | None]]) -> None:
        check_tensor(buffer, "buffer")
        if buffer.is_complex():
            raise ValueError("buffer must be real floating point for a SegmentTable (a complex buffer: "
                             "drop_segments_ per call)")
        self._batch = segment_batch(buffer, segments, pointer=0)  # pointers: byte offsets from element 0
        self.segments = list(segments)
        self.dtype = buffer.dtype
        self.numel = buffer.numel()
        self._columns: dict[float, PieceColumns] = {}
        self._table: np.ndarray | None = None

    def rerate(self, rates: Sequence[float | None]) -> None:
        """Give the segments new rates, keeping their checked layout (a drop-rate schedule's next step).

        ``rates[k]`` replaces ``segments[k]``'s rate: O(segments) without the per-segment checks.

        Raises:
            ValueError: not one rate per segment, a rate outside [0, 1], or None where the segment had
                a rate (or a rate where it had None: an unmasked segment has no key).
        """
        if len(rates) != len(self.segments):
            raise ValueError(f"rates must hold one rate per segment ({len(self.segments)}), got {len(rates)}")
        checked = {rate: None if rate is None else check_rate(rate, "rates[k]") for rate in set(rates)}
        if any((old[3] is None) is not (rate is None) for old, rate in zip(self.segments, rates)):
            raise ValueError("rates must be None exactly where the segments were unmasked (rate None)")
        self.segments = [(numel, key, start, rate) for (numel, key, start, _), rate in zip(self.segments, rates)]
        self._batch = [piece._replace(rate=0.0 if rate is None else checked[rate])
                       for piece, rate in zip(self._batch, rates)]
        self._columns.clear()

    def drop_(self, buffer: torch.Tensor, *, seed: int, step: int, stream: MaskStream = MaskStream.GRAD,
              extra_scale: float = 1.0) -> torch.Tensor:
        """In place, :func:`drop_segments_` of this table's segments (no ``mask_out``). Returns ``buffer``."""
        check_common(seed, step, extra_scale)
        kernel = backends._native_kernel(buffer) if self._fits(buffer) else None
        if kernel is None:
            return drop_segments_(buffer, self.segments, seed=seed, step=step, stream=stream, extra_scale=extra_scale)
        if self._batch:
            kernel.many(self._fill(buffer, seed, step, stream, extra_scale), buffer.device)
            backends.bump_versions((buffer,))  # the kernel wrote through a pointer: tell autograd
        return buffer

    def pack(self, buffer: torch.Tensor, *, seed: int, step: int, stream: MaskStream = MaskStream.GRAD,
             extra_scale: float = 1.0) -> torch.Tensor:
        """:func:`pack_segments` of this table's segments: the kept masked values, then the non-finite flag."""
        check_common(seed, step, extra_scale)
        packer = native_packer(buffer) if self._fits(buffer) else None
        if packer is None:
            return pack_segments(buffer, self.segments, seed=seed, step=step, stream=stream, extra_scale=extra_scale)
        return packer.pack(self._fill(buffer, seed, step, stream, extra_scale) if self._batch else EMPTY_TABLE,
                           buffer)

    def unpack_(self, buffer: torch.Tensor, received: torch.Tensor, *, seed: int, step: int,
                stream: MaskStream = MaskStream.GRAD) -> torch.Tensor:
        """In place, :func:`unpack_segments_` of this table's segments. Returns ``buffer``."""
        check_common(seed, step, 1.0)
        packer = native_packer(buffer) if self._fits(buffer) and backends.addressable(received) else None
        if packer is None:
            return unpack_segments_(buffer, self.segments, received, seed=seed, step=step, stream=stream)
        check_received(received, buffer)
        table = self._fill(buffer, seed, step, stream, 1.0) if self._batch else EMPTY_TABLE
        return unpack_native_(packer, table, buffer, received)

    def _fits(self, buffer: torch.Tensor) -> bool:
        """Whether the native kernels may take ``buffer`` through this table (else the checked entry points)."""
        return (backends.addressable(buffer) and buffer.dtype == self.dtype and buffer.numel() == self.numel
                and buffer.layout is torch.strided and buffer.is_contiguous())

    def _fill(self, buffer: torch.Tensor, seed: int, step: int, stream: MaskStream, extra_scale: float) -> np.ndarray:
        columns = self._columns.get(extra_scale)
        if columns is None:  # thresholds and scales depend on extra_scale: built once per value
            if len(self._columns) >= _MAX_SCALES:
                self._columns.clear()
            columns = self._columns[extra_scale] = piece_columns(self._batch, extra_scale)
        rows = columns.counts.size
        if self._table is None or self._table.shape[0] != rows:
            self._table = np.empty((rows, TABLE_COLUMNS), dtype=np.int64)
        # The kernels read the table before returning (CUDA copies it to the device first): one serves every call.
        return fill_table(self._table, columns, buffer.data_ptr(), None, seed, step, stream)
