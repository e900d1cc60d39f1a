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

# compute type -> (unsigned type of its bits, sign bit, a quiet NaN's bits)
_C_BITS = {
    "float": ("uint32_t", 31, "0x7FC00000u"),
    "double": ("uint64_t", 63, "0x7FF8000000000000ull"),
}
# C name -> the fused AVX2 loops that start its pack and unpack of a masked piece (the staged loops finish)
_C_FAST = {
    "f32": ("""#ifdef __AVX2__
        start += pack8_f32(p + a, base + (uint32_t)a, (uint32_t)(b - a), t, s, out, &k, c->k_end, &nan_acc, &neg_acc);
#endif""", """#ifdef __AVX2__
    start += unpack8_f32(p + a, base + (uint32_t)a, (uint32_t)(b - a), t, in, &k, c->k_end);
#endif"""),
}
# C name -> (unsigned type of the stored bits, exponent mask, sign bit)
_C_STORED_BITS = {
    "f32": ("uint32_t", "0x7F800000u", 31),
    "f64": ("uint64_t", "0x7FF0000000000000ull", 63),
    "bf16": ("uint16_t", "(uint16_t)0x7F80u", 15),
    "f16": ("uint16_t", "(uint16_t)0x7C00u", 15),
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
#define HASH_C1 {c1}u
#define HASH_C2 {c2}u
#define HASH_S1 {s1}
#define HASH_S2 {s2}
#define HASH_S3 {s3}

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

# Plain C (not formatted): the compaction driver shared by every dtype.
_C_SCAN = r"""
/* ---- Compaction: pack the kept values of a piece table into one buffer, unpack them back. ---- */

#define SUB 256  /* coordinates per sub-block: keep bytes and values staged on the stack */

typedef struct {
    char* io;         /* pack: the send buffer; unpack: the received buffer */
    int64_t k;        /* next position in io */
    int64_t k_end;    /* pack: first position this thread must not write; unpack: elements in io */
    int nan, neg;     /* a masked value was not finite; every masked value had its sign bit set */
} scan_ctx;

typedef void (*scan_fn)(const int64_t* row, int64_t a, int64_t b, scan_ctx* c);

/* Sub-block compaction and expansion by element width. With AVX2 (the -march=native build), groups of
   lanes move through one permute, its pattern looked up by the group's keep bits; the scalar loops
   are branch-free. Both may touch up to 8 elements past the moved ones (see the callers). */
#ifdef __AVX2__
#include <immintrin.h>
static int32_t PACK32[256][8] __attribute__((aligned(32))), EXPAND32[256][8] __attribute__((aligned(32)));
static int32_t PACK64[16][8] __attribute__((aligned(32))), EXPAND64[16][8] __attribute__((aligned(32)));
static uint8_t PACK16[256][16] __attribute__((aligned(16))), EXPAND16[256][16] __attribute__((aligned(16)));

__attribute__((constructor)) static void init_permutes(void) {
    for (int m = 0; m < 256; ++m) {
        int kept = 0;
        for (int i = 0; i < 8; ++i) {
            EXPAND32[m][i] = kept;  /* lane i takes the next unread value (dropped lanes ignore it) */
            EXPAND16[m][2 * i] = (uint8_t)(2 * kept); EXPAND16[m][2 * i + 1] = (uint8_t)(2 * kept + 1);
            if (m >> i & 1) {
                PACK32[m][kept] = i;
                PACK16[m][2 * kept] = (uint8_t)(2 * i); PACK16[m][2 * kept + 1] = (uint8_t)(2 * i + 1);
                ++kept;
            }
        }
        if (m < 16) {
            int k64 = 0;
            for (int i = 0; i < 4; ++i) {
                EXPAND64[m][2 * i] = 2 * k64; EXPAND64[m][2 * i + 1] = 2 * k64 + 1;
                if (m >> i & 1) { PACK64[m][2 * k64] = 2 * i; PACK64[m][2 * k64 + 1] = 2 * i + 1; ++k64; }
            }
        }
    }
}

/* Bit i: keep[i] (keep bytes are 0 or 1: shifted into each byte's sign bit). */
static inline uint32_t keep_bits32(const uint8_t* keep) {
    return (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(_mm256_loadu_si256((const __m256i*)keep), 7));
}
#endif

#define DEFINE_MOVES(W, T)                                                                                   \
static inline int64_t compact##W(T* out, int64_t k, const T* val, const uint8_t* keep, uint32_t len) {       \
    uint32_t j = 0;                                                                                          \
    SIMD_COMPACT##W                                                                                          \
    for (; j < len; ++j) { out[k] = val[j]; k += keep[j]; }                                                  \
    return k;                                                                                                \
}                                                                                                            \
static inline int64_t expand##W(T* got, const T* in, int64_t k, const uint8_t* keep, uint32_t len) {       \
    uint32_t j = 0;                                                                                          \
    SIMD_EXPAND##W                                                                                           \
    for (; j < len; ++j) { got[j] = in[k]; k += keep[j]; }                                                   \
    return k;                                                                                                \
}

#ifdef __AVX2__
#define SIMD_COMPACT32 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);               \
    for (int g = 0; g < 4; ++g, bits >>= 8) { const uint32_t m = bits & 0xFF;                                \
        _mm256_storeu_si256((__m256i*)(out + k), _mm256_permutevar8x32_epi32(                                \
            _mm256_loadu_si256((const __m256i*)(val + j + 8 * g)), _mm256_load_si256((const __m256i*)PACK32[m]))); \
        k += __builtin_popcount(m); } }
#define SIMD_EXPAND32 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);                \
    for (int g = 0; g < 4; ++g, bits >>= 8) { const uint32_t m = bits & 0xFF;                                \
        _mm256_storeu_si256((__m256i*)(got + j + 8 * g), _mm256_permutevar8x32_epi32(                        \
            _mm256_loadu_si256((const __m256i*)(in + k)), _mm256_load_si256((const __m256i*)EXPAND32[m])));  \
        k += __builtin_popcount(m); } }
#define SIMD_COMPACT64 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);               \
    for (int g = 0; g < 8; ++g, bits >>= 4) { const uint32_t m = bits & 0xF;                                 \
        _mm256_storeu_si256((__m256i*)(out + k), _mm256_permutevar8x32_epi32(                                \
            _mm256_loadu_si256((const __m256i*)(val + j + 4 * g)), _mm256_load_si256((const __m256i*)PACK64[m]))); \
        k += __builtin_popcount(m); } }
#define SIMD_EXPAND64 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);                \
    for (int g = 0; g < 8; ++g, bits >>= 4) { const uint32_t m = bits & 0xF;                                 \
        _mm256_storeu_si256((__m256i*)(got + j + 4 * g), _mm256_permutevar8x32_epi32(                        \
            _mm256_loadu_si256((const __m256i*)(in + k)), _mm256_load_si256((const __m256i*)EXPAND64[m])));  \
        k += __builtin_popcount(m); } }
#define SIMD_COMPACT16 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);               \
    for (int g = 0; g < 4; ++g, bits >>= 8) { const uint32_t m = bits & 0xFF;                                \
        _mm_storeu_si128((__m128i*)(out + k), _mm_shuffle_epi8(                                              \
            _mm_loadu_si128((const __m128i*)(val + j + 8 * g)), _mm_load_si128((const __m128i*)PACK16[m])));  \
        k += __builtin_popcount(m); } }
#define SIMD_EXPAND16 for (; j + 32 <= len; j += 32) { uint32_t bits = keep_bits32(keep + j);                \
    for (int g = 0; g < 4; ++g, bits >>= 8) { const uint32_t m = bits & 0xFF;                                \
        _mm_storeu_si128((__m128i*)(got + j + 8 * g), _mm_shuffle_epi8(                                      \
            _mm_loadu_si128((const __m128i*)(in + k)), _mm_load_si128((const __m128i*)EXPAND16[m])));         \
        k += __builtin_popcount(m); } }
#else
#define SIMD_COMPACT32
#define SIMD_EXPAND32
#define SIMD_COMPACT64
#define SIMD_EXPAND64
#define SIMD_COMPACT16
#define SIMD_EXPAND16
#endif
DEFINE_MOVES(16, uint16_t)
DEFINE_MOVES(32, uint32_t)
DEFINE_MOVES(64, uint64_t)

#ifdef __AVX2__
/* float32, the common gradient dtype, fused in registers: hash, mask, flag and move per 8 lanes,
   nothing staged. The same operations as the scalar path (one multiply by s or 0), so the same bits. */
static inline __m256i hash8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, HASH_S1));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int32_t)HASH_C1));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, HASH_S2));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int32_t)HASH_C2));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, HASH_S3));
}

/* Lanes' keep decisions (all ones where int32(hash32(first + lane)) < t). */
static inline __m256i keep8(uint32_t first, int32_t t) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(t), hash8(_mm256_add_epi32(_mm256_set1_epi32((int32_t)first), lane)));
}

/* Packs whole groups of 8 while their 8-lane stores stay below k_end; returns the coordinates done. */
static uint32_t pack8_f32(const float* x, uint32_t first, uint32_t len, int32_t t, float s, float* out, int64_t* kp,
                          int64_t k_end, uint32_t* nan_acc, uint32_t* neg_acc) {
    const __m256 scale = _mm256_set1_ps(s);
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    __m256i nan = _mm256_setzero_si256(), neg = _mm256_set1_epi32(-1);
    int64_t k = *kp;
    uint32_t j = 0;
    for (; j + 8 <= len && k + 8 <= k_end; j += 8) {
        const __m256i keep = keep8(first + j, t);
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_and_ps(scale, _mm256_castsi256_ps(keep)));
        const __m256i bits = _mm256_castps_si256(v);
        nan = _mm256_or_si256(nan, _mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent));
        neg = _mm256_and_si256(neg, bits);
        const int m = _mm256_movemask_ps(_mm256_castsi256_ps(keep));
        _mm256_storeu_ps(out + k, _mm256_permutevar8x32_ps(v, _mm256_load_si256((const __m256i*)PACK32[m])));
        k += __builtin_popcount((unsigned)m);
    }
    *kp = k;
    if (_mm256_movemask_ps(_mm256_castsi256_ps(nan))) *nan_acc |= 1u;
    if (_mm256_movemask_ps(_mm256_castsi256_ps(neg)) != 0xFF) *neg_acc = 0;
    return j;
}

/* Unpacks whole groups of 8 while their 8-lane reads stay below in_len; returns the coordinates done. */
static uint32_t unpack8_f32(float* x, uint32_t first, uint32_t len, int32_t t, const float* in, int64_t* kp,
                            int64_t in_len) {
    int64_t k = *kp;
    uint32_t j = 0;
    for (; j + 8 <= len && k + 8 <= in_len; j += 8) {
        const __m256i keep = keep8(first + j, t);
        const int m = _mm256_movemask_ps(_mm256_castsi256_ps(keep));
        const __m256 got = _mm256_permutevar8x32_ps(_mm256_loadu_ps(in + k),
                                                    _mm256_load_si256((const __m256i*)EXPAND32[m]));
        const __m256 zero = _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_setzero_ps());  /* x * 0 */
        _mm256_storeu_ps(x + j, _mm256_blendv_ps(zero, got, _mm256_castsi256_ps(keep)));
        k += __builtin_popcount((unsigned)m);
    }
    *kp = k;
    return j;
}
#endif

/* Kept coordinates [a, b) of a piece: the hash only (the counting pass of parallel scans). */
static void count_piece(const int64_t* row, int64_t a, int64_t b, scan_ctx* c) {
    if (row[4] >= KEEP_ALL) { c->k += b - a; return; }
    const int32_t t = (int32_t)row[4];
    const uint32_t first = (uint32_t)row[3] + (uint32_t)a, len = (uint32_t)(b - a);
    uint32_t kept = 0;
    for (uint32_t j = 0; j < len; ++j) kept += (uint32_t)((int32_t)hash32(first + j) < t);
    c->k += kept;
}

/* Coordinates [lo, hi) of the concatenated pieces, in order, through `fn`. */
static void each_piece(scan_fn fn, scan_ctx* c, const int64_t* table, const int64_t* ends, int64_t count,
                       int64_t lo, int64_t hi) {
    for (int64_t s = piece_at(ends, count, lo); s < count && ends[s] - table[ROW * s + 2] < hi; ++s) {
        const int64_t first = ends[s] - table[ROW * s + 2];
        const int64_t a = lo > first ? lo - first : 0, b = (hi < ends[s] ? hi : ends[s]) - first;
        if (a < b) fn(table + ROW * s, a, b, c);
    }
}

/* Runs `fn` (a pack or an unpack) over every piece in coordinate order, keeping io positions in
   step; returns the kept count (unpack: -1 unless io holds exactly kept + 1 elements).
   Threads need their first io position: a counting pass (hash only), a prefix sum, then `fn`. */
static int64_t scan(scan_fn fn, const int64_t* table, int64_t count, int threads, int64_t grain, char* io,
                    int64_t io_len, int unpack, int* flags) {
    int64_t* ends = (int64_t*)malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
    if (!ends) return -2;
    int64_t total = 0, kept = 0;
    for (int64_t s = 0; s < count; ++s) ends[s] = total += table[ROW * s + 2];
    if (threads > total / grain) threads = (int)(total / grain);
    flags[0] = 0; flags[1] = 1;
#ifdef _OPENMP
    int64_t* part = threads > 1 ? (int64_t*)calloc((size_t)threads + 1, sizeof(int64_t)) : NULL;
    int* thread_flags = part ? (int*)calloc(2 * (size_t)threads, sizeof(int)) : NULL;
    if (thread_flags) {
        int bad = 0, used = 1;
        #pragma omp parallel num_threads(threads)
        {
            const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t lo = total / nt * id + total % nt * id / nt;
            const int64_t hi = total / nt * (id + 1) + total % nt * (id + 1) / nt;
            scan_ctx c = {io, 0, 0, 0, 1};
            each_piece(count_piece, &c, table, ends, count, lo, hi);
            part[id + 1] = c.k;
            #pragma omp barrier
            #pragma omp single
            {
                for (int64_t i = 0; i < nt; ++i) part[i + 1] += part[i];
                used = (int)nt;
                kept = part[nt];
                bad = unpack && kept + 1 != io_len;  /* checked before anything is written */
            }
            if (!bad) {
                c.k = part[id];
                c.k_end = unpack ? io_len : part[id + 1];
                each_piece(fn, &c, table, ends, count, lo, hi);
            }
            thread_flags[2 * id] = c.nan;
            thread_flags[2 * id + 1] = c.neg;
        }
        for (int i = 0; i < used; ++i) { flags[0] |= thread_flags[2 * i]; flags[1] &= thread_flags[2 * i + 1]; }
        free(thread_flags); free(part); free(ends);
        return bad ? -1 : kept;
    }
    free(part);
#endif
    scan_ctx c = {io, 0, io_len, 0, 1};
    each_piece(fn, &c, table, ends, count, 0, total);
    free(ends);
    flags[0] = c.nan; flags[1] = c.neg;
    return unpack && c.k + 1 != io_len ? -1 : c.k;
}
"""

# Per dtype: pack/unpack pieces and their entry points. {bits}: the compute type's bits, {top}: its sign bit.
_C_SCAN_TEMPLATE = r"""
/* The flag's two facts from a stored value's bits: not finite (exponent all ones: v * 0 is NaN), and
   its sign (that of v * 0 otherwise). Integer accumulators vectorize; a float sum would not. */
#define ZACC_{name}(v) do {{ {ubits} b_; memcpy(&b_, &(v), sizeof b_); \
    nan_acc |= (b_ & {exp}) == {exp}; neg_acc &= b_; }} while (0)

/* out[k...] = the kept val[j]; returns the new k. The fast path writes up to 8 elements past it
   (overwritten later by this thread), so it runs only where they stay below k_end. */
static inline int64_t compact_{name}({storage}* out, int64_t k, const {storage}* val, const uint8_t* keep,
                                     uint32_t len, uint32_t cnt, int64_t k_end) {{
    if (k + (int64_t)cnt + 8 <= k_end) return compact{width}(({ubits}*)out, k, (const {ubits}*)val, keep, len);
    for (uint32_t j = 0; j < len; ++j) if (keep[j]) out[k++] = val[j];
    return k;
}}

/* Pack coordinates [a, b) of a piece: kept masked values to io[k...], in order. */
static void pack_{name}(const int64_t* row, int64_t a, int64_t b, scan_ctx* c) {{
    const {storage}* p = (const {storage}*)(intptr_t)row[0];
    {storage}* out = ({storage}*)c->io;
    const int64_t thr = row[4];
    double scale_d;
    memcpy(&scale_d, &row[5], sizeof scale_d);
    const {compute} s = ({compute})scale_d;
    {ubits} nan_acc = 0, neg_acc = ({ubits})~({ubits})0;
    int64_t k = c->k;
    if (thr >= KEEP_ALL) {{
        {storage}* q = out + k;
        const {storage}* x = p + a;
        const int64_t n = b - a;
        if (scale_d == 1.0) {{
            memcpy(q, x, (size_t)n * sizeof({storage}));  /* the bits themselves, as index_select */
            for (int64_t i = 0; i < n; ++i) ZACC_{name}(x[i]);
        }} else {{
            for (int64_t i = 0; i < n; ++i) {{ const {storage} v = {store}({load}(x[i]) * s); q[i] = v; ZACC_{name}(v); }}
        }}
        k += b - a;
    }} else {{
        const int32_t t = (int32_t)thr;
        const uint32_t base = (uint32_t)row[3];
        uint8_t keep[SUB];
        {storage} val[SUB];
        int64_t start = a;
        {fast_pack}
        for (int64_t lo = start; lo < b; lo += SUB) {{
            const uint32_t len = (uint32_t)(b - lo < SUB ? b - lo : SUB), first = base + (uint32_t)lo;
            const {storage}* x = p + lo;
            uint32_t cnt = 0;
            for (uint32_t j = 0; j < len; ++j) {{
                const int32_t h = (int32_t)hash32(first + j);
                const {storage} v = {store}({load}(x[j]) * (h < t ? s : ({compute})0));
                val[j] = v;
                keep[j] = (uint8_t)(h < t);
                cnt += (uint32_t)(h < t);
                ZACC_{name}(v);
            }}
            k = compact_{name}(out, k, val, keep, len, cnt, c->k_end);
        }}
    }}
    c->k = k;
    c->nan |= nan_acc != 0;
    c->neg &= (int)(neg_acc >> {sign});
}}

/* Unpack coordinates [a, b) of a piece: kept ones from io[k...], dropped ones x * 0. Reads stay
   within io (a wrong io length is reported by scan, never read past). */
static void unpack_{name}(const int64_t* row, int64_t a, int64_t b, scan_ctx* c) {{
    {storage}* p = ({storage}*)(intptr_t)row[0];
    const {storage}* in = (const {storage}*)c->io;
    const int64_t last = c->k_end - 1, thr = row[4];
    int64_t k = c->k;
    if (thr >= KEEP_ALL) {{
        const int64_t fit = last - k < b - a ? (last - k > 0 ? last - k : 0) : b - a;
        memcpy(p + a, in + k, (size_t)fit * sizeof({storage}));
        c->k = k + (b - a);
        return;
    }}
    const int32_t t = (int32_t)thr;
    const uint32_t base = (uint32_t)row[3];
    uint8_t keep[SUB];
    {storage} got[SUB];
    int64_t start = a;
    {fast_unpack}
    for (int64_t lo = start; lo < b; lo += SUB) {{
        const uint32_t len = (uint32_t)(b - lo < SUB ? b - lo : SUB), first = base + (uint32_t)lo;
        {storage}* x = p + lo;
        for (uint32_t j = 0; j < len; ++j) keep[j] = (uint8_t)((int32_t)hash32(first + j) < t);
        /* got[j] = the next received value, read branch-free (consumed only where kept) */
        if (k + (int64_t)len + 8 <= last) {{  /* the fast path reads up to 8 elements ahead */
            k = expand{width}(({ubits}*)got, (const {ubits}*)in, k, keep, len);
        }} else {{
            for (uint32_t j = 0; j < len; ++j) {{ got[j] = in[k < last ? k : last]; k += keep[j]; }}
        }}
        /* dropped: x * 0, what masking leaves there (a signed zero, NaN where x is not finite) */
        for (uint32_t j = 0; j < len; ++j) {{  /* a bitwise select: GCC vectorizes it, not a float ?: */
            const {storage} zero = {store}({load}(x[j]) * ({compute})0);
            {ubits} z, g;
            memcpy(&z, &zero, sizeof z);
            memcpy(&g, &got[j], sizeof g);
            const {ubits} m = ({ubits})(({ubits})0 - ({ubits})keep[j]);
            z = (g & m) | (z & ({ubits})~m);
            memcpy(&x[j], &z, sizeof z);
        }}
    }}
    c->k = k;
}}

int64_t dg_pack_{name}(const int64_t* table, int64_t count, int threads, int64_t grain, int64_t out, int64_t cap) {{
    int flags[2];
    const int64_t kept = scan(pack_{name}, table, count, threads, grain, (char*)(intptr_t)out, cap, 0, flags);
    if (kept >= 0) {{  /* the flag: NaN if a value was not finite, else -0 if every sign was set, else +0 */
        const {bits} bits = flags[0] ? {nan_bits} : flags[1] ? ({bits})1 << {top} : 0;
        {compute} flag;
        memcpy(&flag, &bits, sizeof flag);
        (({storage}*)(intptr_t)out)[kept] = {store}(flag);
    }}
    return kept;
}}

int64_t dg_unpack_{name}(const int64_t* table, int64_t count, int threads, int64_t grain, int64_t in,
                         int64_t in_len, int64_t first) {{
    int flags[2];
    const int64_t kept = scan(unpack_{name}, table, count, threads, grain, (char*)(intptr_t)in, in_len, 1, flags);
    if (kept >= 0 && first) {{  /* + the summed flag: 0, or NaN when any rank saw a non-finite value */
        {storage}* x = ({storage}*)(intptr_t)first;
        *x = {store}({load}(*x) + {load}((({storage}*)(intptr_t)in)[kept]));
    }}
    return kept;
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
    parts = [_C_HEADER.format(keep_all=KEEP_ALL, c1=c1, c2=c2, s1=s1, s2=s2, s3=s3), _C_SCAN]
    for name, storage, compute, load, store in _C_DTYPES.values():
        parts.append(_C_DTYPE_TEMPLATE.format(name=name, storage=storage, compute=compute, load=load, store=store))
        bits, top, nan_bits = _C_BITS[compute]
        ubits, exp, sign = _C_STORED_BITS[name]
        fast = _C_FAST.get(name, ("", ""))
        parts.append(_C_SCAN_TEMPLATE.format(name=name, storage=storage, compute=compute, load=load, store=store,
                                             bits=bits, top=top, nan_bits=nan_bits, ubits=ubits, exp=exp, sign=sign,
                                             width=sign + 1, fast_pack=fast[0], fast_unpack=fast[1]))
    return "".join(parts)


# --------------------------------------------------------------------------------------
# CPU: compile once, cache on disk, load with ctypes.

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
        name = _C_DTYPES[dtype][0]
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


_triton_block_keep: Callable | None = None  # set with the kernels below


@functools.lru_cache(maxsize=None)
def _triton_compaction_kernels() -> tuple[Callable, Callable, Callable]:
    """``(count, pack, unpack)``: Triton kernels over the piece table, one program per block of a piece.

    Programs run in coordinate order, so an exclusive prefix sum of the per-block kept counts gives
    each block its first send position; within a block, a cumulative sum of the keep bits.
    """
    import triton
    import triton.language as tl

    global _triton_block_keep  # Triton resolves helpers among module globals, not closures

    @triton.jit
    def block_keep(table, blocks, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                   S2: tl.constexpr, S3: tl.constexpr):
        pid = tl.program_id(0)
        row = table + 6 * tl.load(blocks + 2 * pid)
        idx = tl.load(blocks + 2 * pid + 1) + tl.arange(0, BLOCK)
        valid = idx < tl.load(row + 2)
        x = (tl.load(row + 3) + idx).to(tl.uint32)
        x = x ^ (x >> S1)
        x = x * C1
        x = x ^ (x >> S2)
        x = x * C2
        x = x ^ (x >> S3)
        keep = (x.to(tl.int32, bitcast=True).to(tl.int64) < tl.load(row + 4)) & valid
        return row, idx, valid, keep

    _triton_block_keep = block_keep

    @triton.jit
    def count_kernel(table, blocks, counts, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                     S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr):
        _, _, _, keep = _triton_block_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
        tl.store(counts + tl.program_id(0), tl.sum(keep.to(tl.int32), axis=0))

    @triton.jit
    def pack_kernel(table, blocks, offsets, out, flags, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                    BITS: tl.constexpr, BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
                    S2: tl.constexpr, S3: tl.constexpr):
        pid = tl.program_id(0)
        row, idx, valid, keep = _triton_block_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
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
        row, idx, valid, keep = _triton_block_keep(table, blocks, BLOCK, C1, C2, S1, S2, S3)
        values = tl.load(row).to(tl.pointer_type(DTYPE)) + idx
        x = tl.load(values, mask=valid)
        kept = keep.to(tl.int32)
        got = tl.load(received + tl.load(offsets + tl.program_id(0)) + tl.cumsum(kept, axis=0) - kept, mask=keep)
        zero = (x.to(COMPUTE) * 0.0).to(DTYPE, fp_downcast_rounding="rtne")  # what masking leaves there
        tl.store(values, tl.where(keep, got, zero), mask=valid)

    return count_kernel, pack_kernel, unpack_kernel


class CudaKernel:
    """The Triton kernels for one dtype: ``many(table, device)`` masks every row in one launch;
    ``pack``/``unpack`` as :class:`CpuKernel`'s (a count launch first: the send size reaches the host)."""

    def __init__(self, dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> None:
        import triton.language as tl

        self._kernel = _triton_kernel()
        self._dtype = dtype
        storage = {torch.float32: tl.float32, torch.float64: tl.float64,
                   torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
        self._constants = dict(DTYPE=storage, COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                               BLOCK=_BLOCK, C1=multipliers[0], C2=multipliers[1], S1=shifts[0],
                               S2=shifts[1], S3=shifts[2], KEEP=KEEP_ALL)
        self._hash = dict(BLOCK=_BLOCK, C1=multipliers[0], C2=multipliers[1], S1=shifts[0], S2=shifts[1],
                          S3=shifts[2])
        self._types = dict(DTYPE=storage, COMPUTE=self._constants["COMPUTE"])
        self._bits = tl.int64 if dtype == torch.float64 else tl.int32  # the compute type's bits (sign tests)

    def _blocks(self, table: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The table and its block list ``(piece, first coordinate)`` per program, on ``device``."""
        counts = -(-table[:, 2] // _BLOCK)
        pieces = np.repeat(np.arange(table.shape[0], dtype=np.int64), counts)
        firsts = (np.arange(pieces.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)) * _BLOCK
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
        """As :meth:`CpuKernel.pack`; ``send`` is sized exactly (the count launch gives the size)."""
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
        """As :meth:`CpuKernel.unpack`; the size is checked before anything is written."""
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


def cuda_kernel(dtype: torch.dtype, multipliers: tuple[int, int], shifts: tuple[int, int, int]) -> CudaKernel | None:
    """The Triton kernel for ``dtype`` (None for dtypes it does not cover); raises if Triton is unusable."""
    if dtype not in _C_DTYPES:
        return None
    return CudaKernel(dtype, multipliers, shifts)
