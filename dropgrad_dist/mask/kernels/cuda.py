"""The CUDA kernels' host side: piece tables to block lists, launches of :mod:`.triton`.

Triton ships with CUDA builds of torch; it is imported on first use only. Checked by compiling for
sm_90 and by running under Triton's CPU interpreter (tests), and by the bitwise self-check on
first use per dtype on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from ..definition import HASH_MULTIPLIERS, HASH_SHIFTS, KEEP_ALL
from .native import C_NAMES

__all__ = ["COORDINATES_PER_PROGRAM", "CudaKernel", "cuda_kernel"]

COORDINATES_PER_PROGRAM = 2048  # coordinates one Triton program masks (its BLOCK)


def _triton_kernel() -> Callable:
    """The masking kernel (one JIT function: Triton caches its specializations per dtype and mask)."""
    from . import triton as triton_kernels

    return triton_kernels.mask_kernel


def _triton_compaction_kernels() -> tuple[Callable, Callable, Callable]:
    """``(count, pack, unpack)``: the compaction kernels over the piece table."""
    from . import triton as triton_kernels

    return triton_kernels.count_kernel, triton_kernels.pack_kernel, triton_kernels.unpack_kernel


class CudaKernel:
    """The Triton kernels for one dtype: ``many(table, device)`` masks every row in one launch;
    ``pack``/``unpack`` as :class:`.native.CpuKernel`'s (a count launch first: the send size reaches the host)."""

    def __init__(self, dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> None:
        import triton.language as tl

        self._kernel = _triton_kernel()
        self._dtype = dtype
        storage = {torch.float32: tl.float32, torch.float64: tl.float64,
                   torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
        self._hash = dict(BLOCK=COORDINATES_PER_PROGRAM, C1=multipliers[0], C2=multipliers[1], S1=shifts[0],
                          S2=shifts[1], S3=shifts[2])
        self._types = dict(DTYPE=storage, COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32)
        self._constants = dict(**self._types, **self._hash, KEEP=KEEP_ALL)
        self._bits = tl.int64 if dtype == torch.float64 else tl.int32  # the compute type's bits (sign tests)

    def _blocks(self, table: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The table and its block list ``(piece, first coordinate)`` per program, on ``device``."""
        counts = -(-table[:, 2] // COORDINATES_PER_PROGRAM)
        pieces = np.repeat(np.arange(table.shape[0], dtype=np.int64), counts)
        firsts = ((np.arange(pieces.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts))
                  * COORDINATES_PER_PROGRAM)
        host = np.concatenate([table.reshape(-1), np.stack([pieces, firsts], axis=1).reshape(-1)])
        # From pageable memory the copy has read `host` when it returns; kernels run in stream order.
        blob = torch.from_numpy(host).to(device, non_blocking=True)
        return blob, blob[table.size:], int(pieces.size)

    def _launch(self, device: torch.device):
        # Triton launches on the current device: make it the tensors' one (CPU: the Triton interpreter, in tests).
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def many(self, table: np.ndarray, device: torch.device) -> None:
        blob, blocks, programs = self._blocks(table, device)
        if programs == 0:
            return
        with self._launch(device):
            self._kernel[(programs,)](blob, blocks, HAS_MASK=bool(table[:, 1].any()), enable_fp_fusion=False,
                                      **self._constants)

    def one(self, ptr: int, mptr: int, n: int, base: int, thr: int, scale: float) -> None:
        raise NotImplementedError  # CUDA pieces always go through many(): the table must reach the device

    def _offsets(self, blob: torch.Tensor, blocks: torch.Tensor, programs: int,
                 device: torch.device) -> tuple[torch.Tensor, int]:
        """Each program's first send position, and the kept count (a device-to-host copy: a sync)."""
        count, _, _ = _triton_compaction_kernels()
        counts = torch.zeros(max(programs, 1), dtype=torch.int32, device=device)
        if programs:
            with self._launch(device):
                count[(programs,)](blob, blocks, counts, **self._hash)
        ends = torch.cumsum(counts, 0)
        return ends - counts, int(ends[-1]) if programs else 0

    def pack(self, table: np.ndarray, buffer: torch.Tensor) -> torch.Tensor:
        """As :meth:`.native.CpuKernel.pack`; ``send`` is sized exactly (the count launch gives the size)."""
        _, pack, _ = _triton_compaction_kernels()
        device = buffer.device
        blob, blocks, programs = self._blocks(table, device)
        offsets, kept = self._offsets(blob, blocks, programs, device)
        out = torch.empty(kept + 1, dtype=self._dtype, device=device)
        flags = torch.zeros(2 * max(programs, 1), dtype=torch.int32, device=device)
        flags[1] = 1  # no program: every (no) value "negative", as the C kernel's empty AND
        if programs:
            with self._launch(device):
                pack[(programs,)](blob, blocks, offsets, out, flags, BITS=self._bits, enable_fp_fusion=False,
                                  **self._types, **self._hash)
        nan = torch.full((), float("nan"), dtype=self._dtype, device=device)
        signed = torch.where(flags[1::2].bool().all(), -0.0, 0.0).to(self._dtype)
        out[kept:].copy_(torch.where(flags[0::2].bool().any(), nan, signed).reshape(1))
        return out

    def unpack(self, table: np.ndarray, buffer: torch.Tensor, received: torch.Tensor) -> int:
        """As :meth:`.native.CpuKernel.unpack`; the size is checked before anything is written."""
        _, _, unpack = _triton_compaction_kernels()
        device = buffer.device
        blob, blocks, programs = self._blocks(table, device)
        offsets, kept = self._offsets(blob, blocks, programs, device)
        if kept + 1 != received.numel():
            return -1
        if programs:
            with self._launch(device):
                unpack[(programs,)](blob, blocks, offsets, received, enable_fp_fusion=False, **self._types,
                                    **self._hash)
        if buffer.numel():
            buffer.view(-1)[:1].add_(received[-1:])  # + the summed flag
        return kept


def cuda_kernel(dtype: torch.dtype) -> CudaKernel | None:
    """The Triton kernel for ``dtype`` (None for dtypes it does not cover); raises if Triton is unusable."""
    if dtype not in C_NAMES:
        return None
    return CudaKernel(dtype, HASH_MULTIPLIERS, HASH_SHIFTS)
