"""Native multi-tensor kernels of the mask engine: one call masks every piece of a (device, dtype) group.

They evaluate :mod:`dropgrad_dist.mask`'s definition (its hash constants are formatted into the
sources) over a *piece table*, one int64 row per contiguous piece of coordinates::

    (data pointer, mask pointer or 0, n, base, threshold column, scale as float64 bits)

and do, for ``j < n``: ``keep = int32(hash32(uint32(base + j))) < threshold``;
``x[j] = x[j] * (keep ? scale : 0)`` in the dtype's compute type (float32, float64 for
float64) rounded back to the dtype; ``mask[j] = keep``. The threshold column ``2**31`` means
"every coordinate kept" (then ``scale == 1`` leaves the values alone). Pointers let one call
cover any number of separate tensors, like PyTorch's multi-tensor-apply kernels.

- CPU: a small C file compiled once with the system C compiler (the toolchain torch.compile
  also needs on CPU), cached on disk (``$DROPGRAD_CACHE_DIR``, default ``~/.cache/dropgrad_dist``),
  called through ctypes (which releases the GIL); OpenMP splits the coordinates evenly among up
  to ``torch.get_num_threads()`` threads with at least :data:`PARALLEL_GRAIN` coordinates each.
- CUDA: a Triton kernel (Triton ships with CUDA torch); a host-built block list maps each
  program to its piece.

Each kernel is checked bitwise against the eager definition on its first use per dtype
(:func:`dropgrad_dist.mask._native_kernel`), so a miscompiled kernel is refused, never trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Callable

import numpy as np
import torch

__all__ = ["KEEP_ALL", "PARALLEL_GRAIN", "cpu_kernel", "cuda_kernel"]

KEEP_ALL = 1 << 31  # threshold column for T = 2**32: every coordinate kept (does not fit int32)
# Coordinates per CPU thread below which fewer threads are used: a parallel region costs ~10 us
# on idle cores but milliseconds on shared ones, so a thread must have ~1 ms of work to pay off.
PARALLEL_GRAIN = 1 << 21
TABLE_COLUMNS = 6

# dtype -> (C name, storage type, compute type, load, store)
_C_DTYPES = {
    torch.float32: ("f32", "float", "float", "", ""),
    torch.float64: ("f64", "double", "double", "", ""),
    torch.bfloat16: ("bf16", "uint16_t", "float", "bf16_load", "bf16_store"),
    torch.float16: ("f16", "uint16_t", "float", "f16_load", "f16_store"),
}

_C_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define KEEP_ALL {keep_all}LL /* threshold column: every coordinate kept */
#define ROW 6       /* int64 columns of the piece table */

typedef void (*seg_fn)(const int64_t* row, int64_t a, int64_t b);

static inline uint32_t hash32(uint32_t x) {{
    x ^= x >> {s1}; x *= {c1}u; x ^= x >> {s2}; x *= {c2}u; x ^= x >> {s3};
    return x;
}}

static inline float from_bits(uint32_t u) {{ float f; memcpy(&f, &u, 4); return f; }}
static inline uint32_t to_bits(float f) {{ uint32_t u; memcpy(&u, &f, 4); return u; }}

/* bfloat16 as c10::BFloat16: widening is exact; narrowing rounds to nearest even, NaN -> 0x7FC0. */
static inline float bf16_load(uint16_t h) {{ return from_bits((uint32_t)h << 16); }}
static inline uint16_t bf16_store(float f) {{
    uint32_t u = to_bits(f);
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}}

/* float16 as c10::Half's portable path (the FP16 library): exact, round to nearest even. */
static inline float f16_load(uint16_t h) {{
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized)));
}}
static inline uint16_t f16_store(float f) {{
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}}

/* The first piece whose coordinates end after coordinate `at` of the concatenated pieces. */
static int64_t piece_at(const int64_t* ends, int64_t count, int64_t at) {{
    int64_t lo = 0, hi = count;
    while (lo < hi) {{
        const int64_t mid = lo + (hi - lo) / 2;
        if (ends[mid] <= at) lo = mid + 1; else hi = mid;
    }}
    return lo;
}}

/* Coordinates [lo, hi) of the concatenated pieces (cutting pieces where the range does). */
static void run_range(seg_fn fn, const int64_t* table, const int64_t* ends, int64_t count, int64_t lo, int64_t hi) {{
    for (int64_t s = piece_at(ends, count, lo); s < count && ends[s] - table[ROW * s + 2] < hi; ++s) {{
        const int64_t first = ends[s] - table[ROW * s + 2];
        const int64_t a = lo > first ? lo - first : 0, b = (hi < ends[s] ? hi : ends[s]) - first;
        if (a < b) fn(table + ROW * s, a, b);
    }}
}}

/* All pieces, their coordinates split evenly among up to `threads` threads of >= `grain` each. */
static void run(seg_fn fn, const int64_t* table, int64_t count, int threads, int64_t grain) {{
    int64_t* ends = (int64_t*)malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
    int64_t total = 0;
    if (!ends) {{ /* no memory for the index: one piece at a time, one thread */
        for (int64_t s = 0; s < count; ++s) fn(table + ROW * s, 0, table[ROW * s + 2]);
        return;
    }}
    for (int64_t s = 0; s < count; ++s) ends[s] = total += table[ROW * s + 2];
    if (threads > total / grain) threads = (int)(total / grain);
#ifdef _OPENMP
    if (threads > 1) {{
        #pragma omp parallel num_threads(threads)
        {{
            const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            /* floor(total * id / nt), without overflow */
            run_range(fn, table, ends, count, total / nt * id + total % nt * id / nt,
                      total / nt * (id + 1) + total % nt * (id + 1) / nt);
        }}
        free(ends);
        return;
    }}
#endif
    run_range(fn, table, ends, count, 0, total);
    free(ends);
}}
"""

_C_DTYPE_TEMPLATE = r"""
static void seg_{name}(const int64_t* row, int64_t a, int64_t b) {{
    {storage}* p = ({storage}*)(intptr_t)row[0];
    uint8_t* m = (uint8_t*)(intptr_t)row[1];
    const uint32_t base = (uint32_t)row[3];
    const int64_t thr = row[4];
    double scale_d;
    memcpy(&scale_d, &row[5], sizeof scale_d);
    const {compute} s = ({compute})scale_d;
    if (thr >= KEEP_ALL) {{
        if (scale_d != 1.0)
            for (int64_t i = a; i < b; ++i) p[i] = {store}({load}(p[i]) * s);
        if (m) memset(m + a, 1, (size_t)(b - a));
        return;
    }}
    /* A 32-bit counter: with the 64-bit index GCC builds each index vector with shuffles. */
    const int32_t t = (int32_t)thr;
    const uint32_t first = base + (uint32_t)a, len = (uint32_t)(b - a);  /* len <= 2**31: one salt block */
    {storage}* q = p + a;
    if (m) {{
        uint8_t* k = m + a;
        for (uint32_t j = 0; j < len; ++j) {{
            const int32_t h = (int32_t)hash32(first + j);
            q[j] = {store}({load}(q[j]) * (h < t ? s : ({compute})0));
            k[j] = (uint8_t)(h < t);
        }}
    }} else {{
        for (uint32_t j = 0; j < len; ++j) {{
            const int32_t h = (int32_t)hash32(first + j);
            q[j] = {store}({load}(q[j]) * (h < t ? s : ({compute})0));
        }}
    }}
}}
void dg_mask_{name}(const int64_t* table, int64_t count, int threads, int64_t grain) {{
    run(seg_{name}, table, count, threads, grain);
}}
void dg_mask1_{name}(int64_t ptr, int64_t mptr, int64_t n, int64_t base, int64_t thr, double scale, int threads,
                     int64_t grain) {{
    int64_t row[6] = {{ptr, mptr, n, base, thr, 0}};
    memcpy(&row[5], &scale, sizeof scale);
    run(seg_{name}, row, 1, threads, grain);
}}
"""


def _c_source(multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> str:
    c1, c2 = multipliers
    s1, s2, s3 = shifts
    parts = [_C_HEADER.format(keep_all=KEEP_ALL, c1=c1, c2=c2, s1=s1, s2=s2, s3=s3)]
    for name, storage, compute, load, store in _C_DTYPES.values():
        parts.append(_C_DTYPE_TEMPLATE.format(name=name, storage=storage, compute=compute, load=load, store=store))
    return "".join(parts)


# --------------------------------------------------------------------------------------
# CPU: compile once, cache on disk, load with ctypes.

# Tried in order. No fast-math (NaN/inf must survive; the fp16 conversion relies on IEEE
# rounding) and no contraction into FMAs (bitwise agreement with torch's separate multiply).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_COMMON_FLAGS = ["-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing"]


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


def _cache_dir() -> str:
    root = os.environ.get("DROPGRAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dropgrad_dist")
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="dropgrad_dist_")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(source: str) -> str:
    """Path of the shared library built from ``source`` (from the cache when built before)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    errors, directory = [], _cache_dir()
    for flags in _FLAG_SETS:
        digest = hashlib.sha256("\0".join([source, cc, *flags, *_COMMON_FLAGS, sys.platform,
                                           _cpu_identity()]).encode()).hexdigest()[:20]
        target = os.path.join(directory, f"mask_kernels_{digest}.so")
        if os.path.exists(target):
            return target
        fd, tmp_src = tempfile.mkstemp(suffix=".c", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(source)
        tmp_lib = tmp_src[:-2] + ".so"
        try:
            done = subprocess.run([cc, *flags, *_COMMON_FLAGS, tmp_src, "-o", tmp_lib],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp_lib, target)  # atomic: concurrent ranks never load a half-written file
                return target
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-500:]}")
        finally:
            for path in (tmp_src, tmp_lib):
                if os.path.exists(path):
                    os.remove(path)
    raise RuntimeError("compiling the CPU mask kernels failed:\n" + "\n".join(errors))


_library: ctypes.CDLL | None = None
_lock = threading.Lock()


def _cpu_library(multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> ctypes.CDLL:
    global _library
    with _lock:
        if _library is None:
            library = ctypes.CDLL(_compile(_c_source(multipliers, shifts)))
            for name, *_ in _C_DTYPES.values():
                many = getattr(library, f"dg_mask_{name}")
                many.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
                many.restype = None
                one = getattr(library, f"dg_mask1_{name}")
                one.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_double, ctypes.c_int, ctypes.c_int64]
                one.restype = None
            _library = library
        return _library


class CpuKernel:
    """``many(table)`` masks every row of an int64 piece table; ``one(ptr, mptr, n, base, thr, scale)`` one piece."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype) -> None:
        name = _C_DTYPES[dtype][0]
        self._many = getattr(library, f"dg_mask_{name}")
        self._one = getattr(library, f"dg_mask1_{name}")

    def many(self, table: np.ndarray, device: torch.device) -> None:
        self._many(table.ctypes.data, table.shape[0], torch.get_num_threads(), PARALLEL_GRAIN)

    def one(self, ptr: int, mptr: int, n: int, base: int, thr: int, scale: float) -> None:
        self._one(ptr, mptr, n, base, thr, scale, torch.get_num_threads(), PARALLEL_GRAIN)


def cpu_kernel(dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> CpuKernel | None:
    """The CPU kernel for ``dtype`` (None for dtypes it does not cover); raises if it cannot be built."""
    if dtype not in _C_DTYPES:
        return None
    return CpuKernel(_cpu_library(multipliers, shifts), dtype)


# --------------------------------------------------------------------------------------
# CUDA: a Triton kernel over the same table. Checked by compiling it for sm_90 and by running it
# under Triton's CPU interpreter (tests); not yet run on a GPU.

_BLOCK = 2048  # coordinates per Triton program


@functools.lru_cache(maxsize=None)  # one JIT function: Triton caches its specializations (dtype, mask)
def _triton_kernel() -> Callable:
    import triton
    import triton.language as tl

    @triton.jit
    def mask_kernel(table, blocks, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                    S2: tl.constexpr, S3: tl.constexpr, KEEP: tl.constexpr):
        pid = tl.program_id(0)
        row = table + 6 * tl.load(blocks + 2 * pid)  # blocks: (piece, first coordinate) per program
        idx = tl.load(blocks + 2 * pid + 1) + tl.arange(0, BLOCK)
        valid = idx < tl.load(row + 2)
        thr = tl.load(row + 4)
        scale = tl.load(row + 5).to(tl.float64, bitcast=True)
        x = (tl.load(row + 3) + idx).to(tl.uint32)  # truncation: the index wraps modulo 2**32
        x = x ^ (x >> S1)
        x = x * C1
        x = x ^ (x >> S2)
        x = x * C2
        x = x ^ (x >> S3)
        keep = x.to(tl.int32, bitcast=True).to(tl.int64) < thr
        if (thr < KEEP) | (scale != 1.0):  # all kept at scale 1: leave the values alone
            factor = tl.where(keep, scale.to(COMPUTE), 0.0).to(COMPUTE)
            values = tl.load(row).to(tl.pointer_type(DTYPE)) + idx
            product = tl.load(values, mask=valid).to(COMPUTE) * factor
            tl.store(values, product.to(DTYPE, fp_downcast_rounding="rtne"), mask=valid)
        if HAS_MASK:
            mask_ptr = tl.load(row + 1)
            if mask_ptr != 0:
                tl.store(mask_ptr.to(tl.pointer_type(tl.int8)) + idx, keep.to(tl.int8), mask=valid)

    return mask_kernel


class CudaKernel:
    """The Triton kernel for one dtype; ``many(table, device)`` launches it once for all rows."""

    def __init__(self, dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> None:
        import triton.language as tl

        self._kernel = _triton_kernel()
        storage = {torch.float32: tl.float32, torch.float64: tl.float64,
                   torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
        self._constants = dict(DTYPE=storage, COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                               BLOCK=_BLOCK, C1=multipliers[0], C2=multipliers[1], S1=shifts[0],
                               S2=shifts[1], S3=shifts[2], KEEP=KEEP_ALL)

    def many(self, table: np.ndarray, device: torch.device) -> None:
        counts = -(-table[:, 2] // _BLOCK)
        pieces = np.repeat(np.arange(table.shape[0], dtype=np.int64), counts)
        if pieces.size == 0:
            return
        firsts = (np.arange(pieces.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)) * _BLOCK
        host = np.concatenate([table.reshape(-1), np.stack([pieces, firsts], axis=1).reshape(-1)])
        # From pageable memory the copy has read `host` when it returns; the kernel runs in stream order.
        blob = torch.from_numpy(host).to(device, non_blocking=True)
        # Triton launches on the current device: make it the tensors' one (CPU: the Triton interpreter, in tests).
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self._kernel[(pieces.size,)](blob, blob[table.size:], HAS_MASK=bool(table[:, 1].any()),
                                         enable_fp_fusion=False, **self._constants)

    def one(self, ptr: int, mptr: int, n: int, base: int, thr: int, scale: float) -> None:
        raise NotImplementedError  # CUDA pieces always go through many(): the table must reach the device


def cuda_kernel(dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> CudaKernel | None:
    """The Triton kernel for ``dtype`` (None for dtypes it does not cover); raises if Triton is unusable."""
    if dtype not in _C_DTYPES:
        return None
    return CudaKernel(dtype, multipliers, shifts)
