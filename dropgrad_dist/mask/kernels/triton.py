"""The CUDA kernels of the mask engine, in Triton: module-level ``@triton.jit`` functions.

Imported only when a CUDA tensor is masked (by :mod:`.cuda`): Triton may be absent elsewhere.
Every kernel reads the piece table of :mod:`.pieces` (one int64 row per piece) and a block list,
two int64 per program: ``(piece, first coordinate)``; a program covers ``BLOCK`` coordinates of
one piece. The hash constants arrive as ``constexpr`` arguments from :mod:`.definition`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..pieces import TABLE_COLUMNS

ROW: tl.constexpr = tl.constexpr(TABLE_COLUMNS)  # int64 columns of a piece-table row


@triton.jit
def program_piece(table, blocks, BLOCK: tl.constexpr):
    """``(row, idx, valid)`` of this program: its table row, its coordinates in the piece, which exist."""
    pid = tl.program_id(0)
    row = table + ROW * tl.load(blocks + 2 * pid)
    idx = tl.load(blocks + 2 * pid + 1) + tl.arange(0, BLOCK)
    return row, idx, idx < tl.load(row + 2)


@triton.jit
def signed_hash(row, idx, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                S3: tl.constexpr):
    """``int32(hash32(uint32(base + idx)))`` as int64: the definition's lowbias32, compared with the threshold.

    uint32 lanes make the shifts logical and the products wrap modulo 2**32.
    """
    x = (tl.load(row + 3) + idx).to(tl.uint32)  # truncation: the index wraps modulo 2**32
    x = x ^ (x >> S1)
    x = x * C1
    x = x ^ (x >> S2)
    x = x * C2
    x = x ^ (x >> S3)
    return x.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def mask_kernel(table, blocks, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                S2: tl.constexpr, S3: tl.constexpr, KEEP: tl.constexpr):
    """In place: ``x[j] = x[j] * (keep ? scale : 0)`` in ``COMPUTE``, rounded to ``DTYPE``; ``mask[j] = keep``."""
    row, idx, valid = program_piece(table, blocks, BLOCK)
    thr = tl.load(row + 4)
    scale = tl.load(row + 5).to(tl.float64, bitcast=True)
    keep = signed_hash(row, idx, C1, C2, S1, S2, S3) < thr
    if (thr < KEEP) | (scale != 1.0):  # all kept at scale 1: leave the values alone
        factor = tl.where(keep, scale.to(COMPUTE), 0.0).to(COMPUTE)
        values = tl.load(row).to(tl.pointer_type(DTYPE)) + idx
        product = tl.load(values, mask=valid).to(COMPUTE) * factor
        tl.store(values, product.to(DTYPE, fp_downcast_rounding="rtne"), mask=valid)
    if HAS_MASK:
        mask_ptr = tl.load(row + 1)
        if mask_ptr != 0:
            tl.store(mask_ptr.to(tl.pointer_type(tl.int8)) + idx, keep.to(tl.int8), mask=valid)


# Compaction. Programs run in coordinate order, so an exclusive prefix sum of the per-program kept
# counts gives each program its first send position; within a program, a cumulative sum of the keep bits.


@triton.jit
def program_keep(table, blocks, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                 S2: tl.constexpr, S3: tl.constexpr):
    """``(row, idx, valid, keep)`` of this program; ``keep`` is False past the piece's end."""
    row, idx, valid = program_piece(table, blocks, BLOCK)
    keep = (signed_hash(row, idx, C1, C2, S1, S2, S3) < tl.load(row + 4)) & valid
    return row, idx, valid, keep


@triton.jit
def count_kernel(table, blocks, counts, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                 S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr):
    """``counts[program]`` = its kept coordinates (the hash only)."""
    _, _, _, keep = program_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
    tl.store(counts + tl.program_id(0), tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def pack_kernel(table, blocks, offsets, out, flags, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                BITS: tl.constexpr, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                S2: tl.constexpr, S3: tl.constexpr):
    """Kept masked values to ``out[offsets[program]...]``, in order; ``flags[2p], flags[2p+1]``: any not finite,
    all sign bits set."""
    pid = tl.program_id(0)
    row, idx, valid, keep = program_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
    factor = tl.where(keep, tl.load(row + 5).to(tl.float64, bitcast=True).to(COMPUTE), 0.0).to(COMPUTE)
    values = tl.load(row).to(tl.pointer_type(DTYPE)) + idx
    v = (tl.load(values, mask=valid).to(COMPUTE) * factor).to(DTYPE, fp_downcast_rounding="rtne")
    kept = keep.to(tl.int32)
    tl.store(out + tl.load(offsets + pid) + tl.cumsum(kept, axis=0) - kept, v, mask=keep)
    c = v.to(COMPUTE)  # the flag's facts on the stored value: not finite, sign bit
    bad = (~(tl.abs(c) < float("inf"))) & valid
    neg = (c.to(BITS, bitcast=True) < 0) | ~valid
    tl.store(flags + 2 * pid, tl.max(bad.to(tl.int32), axis=0))
    tl.store(flags + 2 * pid + 1, tl.min(neg.to(tl.int32), axis=0))


@triton.jit
def unpack_kernel(table, blocks, offsets, received, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                  S2: tl.constexpr, S3: tl.constexpr):
    """Kept coordinates from ``received[offsets[program]...]`` in order; dropped ones ``x * 0``."""
    row, idx, valid, keep = program_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
    values = tl.load(row).to(tl.pointer_type(DTYPE)) + idx
    x = tl.load(values, mask=valid)
    kept = keep.to(tl.int32)
    got = tl.load(received + tl.load(offsets + tl.program_id(0)) + tl.cumsum(kept, axis=0) - kept, mask=keep)
    zero = (x.to(COMPUTE) * 0.0).to(DTYPE, fp_downcast_rounding="rtne")  # what masking leaves there
    tl.store(values, tl.where(keep, got, zero), mask=valid)
