"""The CPU kernels: ``csrc/mask_kernels.c`` compiled once with the system C compiler, called through ctypes.

The compiler is the one torch.compile also needs on CPU (``$CC``, else ``cc``, ``gcc``, ``clang``).
The definition's constants reach the C source as ``-D`` flags from :mod:`.definition`; the library
is cached on disk and verified before it is loaded (:mod:`.cache`). ctypes releases the GIL;
OpenMP splits the coordinates evenly among up to ``torch.get_num_threads()`` threads with at
least :data:`PARALLEL_GRAIN` coordinates each.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading

import numpy as np
import torch

from ..definition import HASH_MULTIPLIERS, HASH_SHIFTS, KEEP_ALL
from ..pieces import TABLE_COLUMNS
from . import cache

__all__ = ["PARALLEL_GRAIN", "CpuKernel", "cpu_kernel"]

# Coordinates per CPU thread below which fewer threads are used: a parallel region costs ~10 us
# on idle cores but milliseconds on shared ones, so a thread must have ~1 ms of work to pay off.
PARALLEL_GRAIN = 1 << 21

SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCE = os.path.join(SOURCE_DIR, "mask_kernels.c")
_SOURCES = (SOURCE, os.path.join(SOURCE_DIR, "mask_kernels_dtype.h"))

# dtype -> the suffix of its exported C functions
C_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

# Tried in order. No fast-math (NaN/inf must survive; the fp16 conversion relies on IEEE
# rounding) and no contraction into FMAs (bitwise agreement with torch's separate multiply).
# -fno-trapping-math changes no value (FP exception flags are never read): it lets GCC turn the
# float16 conversions' selects into vector blends (4-20x faster fp16 loops); self-checks compare bits.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_COMMON_FLAGS = ["-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math", "-fno-strict-aliasing"]


def definition_flags() -> list[str]:
    """The ``-D`` flags that give the C source the definition's constants."""
    (c1, c2), (s1, s2, s3) = HASH_MULTIPLIERS, HASH_SHIFTS
    return [f"-DHASH_C1={c1}u", f"-DHASH_C2={c2}u", f"-DHASH_S1={s1}", f"-DHASH_S2={s2}", f"-DHASH_S3={s3}",
            f"-DKEEP_ALL={KEEP_ALL}LL", f"-DTABLE_COLUMNS={TABLE_COLUMNS}"]


def _cpu_identity() -> str:
    # -march=native code must not be reused on a CPU with other instruction sets (shared home dirs).
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _library_name(cc: str, flags: list[str]) -> str:
    """One file name per build input: sources, compiler, flags, platform and CPU."""
    digest = hashlib.sha256()
    for path in _SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    digest.update("\0".join([cc, *flags, sys.platform, _cpu_identity()]).encode())
    return f"mask_kernels_{digest.hexdigest()[:20]}.so"


def _compile(cc: str, flags: list[str], out: str) -> None:
    done = subprocess.run([cc, *flags, SOURCE, "-o", out], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise _CompileError(f"{' '.join(flags)}: {done.stderr.strip()[-2000:]}")


class _CompileError(RuntimeError):
    pass


def _load() -> ctypes.CDLL:
    """The compiled library (verified from the cache, else built): the first flag set that compiles."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    errors = []
    for flag_set in _FLAG_SETS:
        flags = [*flag_set, *_COMMON_FLAGS, *definition_flags()]
        try:
            return cache.load_library(_library_name(cc, flags), lambda out: _compile(cc, flags, out))
        except _CompileError as err:
            errors.append(str(err))
    raise RuntimeError("compiling the CPU mask kernels failed:\n" + "\n".join(errors))


_library: ctypes.CDLL | None = None
_lock = threading.Lock()


def _cpu_library() -> ctypes.CDLL:
    global _library
    with _lock:
        if _library is None:
            library = _load()
            for name in C_NAMES.values():
                many = getattr(library, f"dg_mask_{name}")
                many.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
                many.restype = None
                one = getattr(library, f"dg_mask1_{name}")
                one.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_double, ctypes.c_int, ctypes.c_int64]
                one.restype = None
                pack = getattr(library, f"dg_pack_{name}")
                pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int64]
                pack.restype = ctypes.c_int64
                unpack = getattr(library, f"dg_unpack_{name}")
                unpack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_int64]
                unpack.restype = ctypes.c_int64
            _library = library
        return _library


class CpuKernel:
    """``many(table)`` masks every row of an int64 piece table; ``one(ptr, mptr, n, base, thr, scale)`` one piece;
    ``pack``/``unpack`` move a table's kept values to and from a contiguous buffer (see :meth:`pack`)."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype) -> None:
        name = C_NAMES[dtype]
        self._many = getattr(library, f"dg_mask_{name}")
        self._one = getattr(library, f"dg_mask1_{name}")
        self._pack = getattr(library, f"dg_pack_{name}")
        self._unpack = getattr(library, f"dg_unpack_{name}")

    def many(self, table: np.ndarray, device: torch.device) -> None:
        self._many(table.ctypes.data, table.shape[0], torch.get_num_threads(), PARALLEL_GRAIN)

    def one(self, ptr: int, mptr: int, n: int, base: int, thr: int, scale: float) -> None:
        self._one(ptr, mptr, n, base, thr, scale, torch.get_num_threads(), PARALLEL_GRAIN)

    def pack(self, table: np.ndarray, buffer: torch.Tensor) -> torch.Tensor:
        """``send[:k]`` = the rows' kept masked values in order, ``send[k]`` = the non-finite flag.

        Reads the rows' values without changing them. ``send`` is a view of room for every
        coordinate plus one: sizing it exactly would cost a counting pass over the hash. (Room
        above glibc's 32 MiB mmap ceiling is mapped afresh per call, page faults included: DDP's
        default 25 MB buckets stay below it.)
        """
        out = torch.empty(buffer.numel() + 1, dtype=buffer.dtype)
        kept = self._pack(table.ctypes.data, table.shape[0], torch.get_num_threads(), PARALLEL_GRAIN,
                          out.data_ptr(), out.numel())
        if kept < 0:
            raise MemoryError("the CPU pack kernel could not allocate its piece index")
        return out[:kept + 1]

    def unpack(self, table: np.ndarray, buffer: torch.Tensor, received: torch.Tensor) -> int:
        """Row values: kept ones from ``received[:k]`` in order, dropped ones ``x * 0``; ``buffer[0] += received[k]``.

        Returns ``k``, or -1 when ``received`` does not hold exactly ``k + 1`` elements (values then
        unspecified; reads stay within ``received``).
        """
        kept = self._unpack(table.ctypes.data, table.shape[0], torch.get_num_threads(), PARALLEL_GRAIN,
                            received.data_ptr(), received.numel(), buffer.data_ptr() if buffer.numel() else 0)
        if kept == -2:
            raise MemoryError("the CPU unpack kernel could not allocate its piece index")
        return kept


def cpu_kernel(dtype: torch.dtype) -> CpuKernel | None:
    """The CPU kernel for ``dtype`` (None for dtypes it does not cover); raises if it cannot be built."""
    if dtype not in C_NAMES:
        return None
    return CpuKernel(_cpu_library(), dtype)
