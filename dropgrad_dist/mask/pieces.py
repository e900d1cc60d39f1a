"""Pieces and piece tables: what one native kernel call masks.

A *piece* is a run of global coordinates of one parameter stored contiguously in a tensor; a
*batch* is a list of pieces of one device and dtype, masked by one call. The native kernels read
a batch as an int64 *piece table*, one row of :data:`TABLE_COLUMNS` per piece::

    (data pointer, mask pointer or 0, n, base, threshold column, scale as float64 bits)

where ``base`` is the piece's salt plus its first index within the salt block (mod 2**32): the
kernel keeps coordinate ``j < n`` iff ``int32(hash32(uint32(base + j))) < threshold``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .definition import MASK32, MASK64, SALT_BLOCK, MaskStream, _rate_code, _salts

__all__ = ["BlockPart", "Piece", "PieceColumns", "TABLE_COLUMNS", "block_parts", "fill_table", "piece_columns",
           "piece_table"]

TABLE_COLUMNS = 6


class Piece(NamedTuple):
    """Global coordinates ``[start, start + count)`` of the key hashed to ``word``.

    Stored contiguously from element ``offset`` of ``tensor``, whose byte address is ``pointer``
    (0 where the torch ops mask it).
    """

    tensor: torch.Tensor
    offset: int
    count: int
    word: int
    start: int
    rate: float
    pointer: int


class BlockPart(NamedTuple):
    """Elements ``[offset, offset + length)`` of a piece: coordinates ``within...`` of salt block ``block``."""

    offset: int
    length: int
    block: int
    within: int


EMPTY_TABLE = np.zeros((0, TABLE_COLUMNS), dtype=np.int64)


class PieceColumns(NamedTuple):
    """The columns of a batch's piece table that do not depend on ``(seed, step)``, split at salt blocks.

    ``pointers`` (bytes) and ``masks`` (mask elements) are relative to the bases :func:`fill_table`
    adds, so a batch laid over a buffer at fixed offsets serves any buffer of that layout.
    """

    pointers: np.ndarray  # int64
    masks: np.ndarray  # int64: the row's first element in the batch's mask
    counts: np.ndarray  # int64
    words: np.ndarray  # uint64: key hashes
    blocks: np.ndarray  # uint64: salt blocks
    within: np.ndarray  # int64: first coordinate within the salt block
    thresholds: np.ndarray  # int64
    scales: np.ndarray  # float64


def piece_columns(batch: Sequence[Piece], extra_scale: float) -> PieceColumns:
    """The fixed columns of ``batch`` (pieces or plain tuples in :class:`Piece`'s field order)."""
    tensors, offsets, counts, words, starts, rates, ptrs = zip(*batch)
    ptrs = np.array(ptrs, dtype=np.int64)
    counts = np.array(counts, dtype=np.int64)
    words = np.array(words, dtype=np.uint64)
    masks = np.array(offsets, dtype=np.int64)
    try:
        start_array = np.array(starts, dtype=np.int64)
        blocks, within = (start_array >> 31).astype(np.uint64), start_array & (SALT_BLOCK - 1)
    except OverflowError:  # a start beyond 2**63: legal, if useless
        blocks = np.array([(s >> 31) & MASK64 for s in starts], dtype=np.uint64)
        within = np.array([s & (SALT_BLOCK - 1) for s in starts], dtype=np.int64)
    codes = {rate: _rate_code(rate, extra_scale, tensors[0].dtype) for rate in set(rates)}
    thresholds = np.array([codes[rate][0] for rate in rates], dtype=np.int64)
    scales = np.array([codes[rate][1] for rate in rates], dtype=np.float64)
    if (within + counts).max() > SALT_BLOCK:  # rare: split the pieces at salt-block boundaries
        return PieceColumns(*_split_at_blocks(tensors[0].element_size(), ptrs, masks, counts, words, blocks, within,
                                              thresholds, scales))
    return PieceColumns(ptrs, masks, counts, words, blocks, within, thresholds, scales)


def fill_table(table: np.ndarray, columns: PieceColumns, base: int, mask: int | None, seed: int, step: int,
               stream: MaskStream) -> np.ndarray:
    """Write the piece table of ``columns`` at ``(seed, step)`` into ``table`` (``len(columns.counts)`` rows).

    ``base`` is added to the pointers, ``mask`` (a uint8 mask's address, None: no mask) to the mask offsets;
    the salts of every row come from one numpy pass.
    """
    table[:, 0] = columns.pointers + base
    table[:, 1] = 0 if mask is None else columns.masks + mask
    table[:, 2] = columns.counts
    table[:, 3] = ((_salts(seed, step, stream, columns.words, columns.blocks) + columns.within.astype(np.uint64))
                   & np.uint64(MASK32))
    table[:, 4] = columns.thresholds
    table[:, 5] = columns.scales.view(np.int64)
    return table


def piece_table(batch: Sequence[Piece], mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
                extra_scale: float) -> np.ndarray:
    """The native kernels' int64 piece table: pieces split at salt blocks, all salted in one numpy pass.

    ``mask`` (flat uint8) belongs to the batch's one tensor (a bucket, or a single tensor): the
    piece at element ``o`` writes ``mask[o:o + count]``. Pieces may be plain tuples in
    :class:`Piece`'s field order: the table is built from the batch's columns.
    """
    columns = piece_columns(batch, extra_scale)
    table = np.empty((columns.counts.size, TABLE_COLUMNS), dtype=np.int64)
    return fill_table(table, columns, 0, None if mask is None else mask.data_ptr(), seed, step, stream)


def _split_at_blocks(size: int, ptrs: np.ndarray, masks: np.ndarray, counts: np.ndarray, *columns):
    """Columns of the pieces cut where they cross a salt block: ``[start, start + n)`` at multiples of 2**31."""
    words, blocks, within, thresholds, scales = columns
    parts = np.where(counts > 0, (within + counts - 1) // SALT_BLOCK + 1, 0)
    rows = np.repeat(np.arange(counts.size), parts)
    k = np.arange(rows.size) - np.repeat(np.cumsum(parts) - parts, parts)  # part number within its piece
    first = np.where(k == 0, 0, k * SALT_BLOCK - within[rows])  # the part's first coordinate in its piece
    part_within = np.where(k == 0, within[rows], 0)
    return (ptrs[rows] + first * size, masks[rows] + first,
            np.minimum(counts[rows] - first, SALT_BLOCK - part_within), words[rows],
            blocks[rows] + k.astype(np.uint64), part_within, thresholds[rows], scales[rows])


def block_parts(start: int, numel: int) -> Iterator[BlockPart]:
    """Split global coordinates ``[start, start + numel)`` at salt-block boundaries."""
    offset = 0
    while offset < numel:
        block, within = divmod(start + offset, SALT_BLOCK)
        length = min(numel - offset, SALT_BLOCK - within)
        yield BlockPart(offset, length, block, within)
        offset += length
