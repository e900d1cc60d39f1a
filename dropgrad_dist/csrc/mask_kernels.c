/* Native multi-tensor kernels of the mask engine (CPU): one call masks every piece of a dtype group.

   They evaluate the mask definition of dropgrad_dist/mask/definition.py over a piece table, one row
   of TABLE_COLUMNS int64 per contiguous piece of coordinates:

       (data pointer, mask pointer or 0, n, base, threshold column, scale as float64 bits)

   and do, for j < n: keep = int32(hash32(uint32(base + j))) < threshold;
   x[j] = x[j] * (keep ? scale : 0) in the dtype's compute type (float32; float64 for float64)
   rounded back to the dtype; mask[j] = keep. The threshold column KEEP_ALL (2**31) means "every
   coordinate kept" (then scale == 1 leaves the values alone).

   Exported per dtype NAME in {f32, f64, bf16, f16}:
     dg_mask_NAME(table, rows, threads, grain)               mask every row
     dg_mask1_NAME(ptr, mptr, n, base, thr, scale, threads, grain)   mask one piece (no table)
     dg_pack_NAME / dg_unpack_NAME                           compaction (see scan() below)

   One templating mechanism: C macros. The per-dtype functions live in mask_kernels_dtype.h,
   included once per dtype below with its types and conversions defined; compiler messages point at
   that file's real lines. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The definition's constants come from the build (-D flags set by dropgrad_dist/mask/native.py from
   dropgrad_dist/mask/definition.py, the single source of truth): the hash's multipliers and shifts and
   the threshold column meaning "every coordinate kept". */
#if !defined(HASH_C1) || !defined(HASH_C2) || !defined(HASH_S1) || !defined(HASH_S2) || !defined(HASH_S3) \
    || !defined(KEEP_ALL) || !defined(TABLE_COLUMNS)
#error "build with -DHASH_C1=.. -DHASH_C2=.. -DHASH_S1=.. -DHASH_S2=.. -DHASH_S3=.. -DKEEP_ALL=.. -DTABLE_COLUMNS=.."
#endif
#define ROW TABLE_COLUMNS /* int64 columns of the piece table */

typedef void (*seg_fn)(const int64_t* row, int64_t a, int64_t b);

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> HASH_S1; x *= HASH_C1; x ^= x >> HASH_S2; x *= HASH_C2; x ^= x >> HASH_S3;
    return x;
}

static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bfloat16 as c10::BFloat16: widening is exact; narrowing rounds to nearest even, NaN -> 0x7FC0. */
static inline float bf16_load(uint16_t h) { return from_bits((uint32_t)h << 16); }
static inline uint16_t bf16_store(float f) {
    uint32_t u = to_bits(f);
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float16 as c10::Half's portable path (the FP16 library): exact, round to nearest even. */
static inline float f16_load(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized)));
}
static inline uint16_t f16_store(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* The first piece whose coordinates end after coordinate `at` of the concatenated pieces. */
static int64_t piece_at(const int64_t* ends, int64_t count, int64_t at) {
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (ends[mid] <= at) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Coordinates [lo, hi) of the concatenated pieces (cutting pieces where the range does). */
static void run_range(seg_fn fn, const int64_t* table, const int64_t* ends, int64_t count, int64_t lo, int64_t hi) {
    for (int64_t s = piece_at(ends, count, lo); s < count && ends[s] - table[ROW * s + 2] < hi; ++s) {
        const int64_t first = ends[s] - table[ROW * s + 2];
        const int64_t a = lo > first ? lo - first : 0, b = (hi < ends[s] ? hi : ends[s]) - first;
        if (a < b) fn(table + ROW * s, a, b);
    }
}

/* All pieces, their coordinates split evenly among up to `threads` threads of >= `grain` each. */
static void run(seg_fn fn, const int64_t* table, int64_t count, int threads, int64_t grain) {
    int64_t* ends = (int64_t*)malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
    int64_t total = 0;
    if (!ends) { /* no memory for the index: one piece at a time, one thread */
        for (int64_t s = 0; s < count; ++s) fn(table + ROW * s, 0, table[ROW * s + 2]);
        return;
    }
    for (int64_t s = 0; s < count; ++s) ends[s] = total += table[ROW * s + 2];
    if (threads > total / grain) threads = (int)(total / grain);
#ifdef _OPENMP
    if (threads > 1) {
        #pragma omp parallel num_threads(threads)
        {
            const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            /* floor(total * id / nt), without overflow */
            run_range(fn, table, ends, count, total / nt * id + total % nt * id / nt,
                      total / nt * (id + 1) + total % nt * (id + 1) / nt);
        }
        free(ends);
        return;
    }
#endif
    run_range(fn, table, ends, count, 0, total);
    free(ends);
}

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

/* The flag's two facts from a stored value's bits: not finite (exponent all ones: v * 0 is NaN), and
   its sign (that of v * 0 otherwise). Integer accumulators vectorize; a float sum would not. Uses the
   current dtype's UBITS and EXP (see mask_kernels_dtype.h) and the caller's nan_acc and neg_acc. */
#define ZACC(v) do { UBITS b_; memcpy(&b_, &(v), sizeof b_); \
    nan_acc |= (b_ & EXP) == EXP; neg_acc &= b_; } while (0)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b) /* CAT(seg_, NAME) -> seg_f32: NAME expanded first */
#define IDENTITY(x) (x)

/* ---- The per-dtype kernels. ---- */

#define NAME f32
#define STORAGE float
#define COMPUTE float
#define LOAD IDENTITY
#define STORE IDENTITY
#define BITS uint32_t
#define TOP 31
#define NAN_BITS 0x7FC00000u
#define UBITS uint32_t
#define EXP 0x7F800000u
#define SIGN 31
#define WIDTH 32
#define FUSED_AVX2_F32 1
#include "mask_kernels_dtype.h"

#define NAME f64
#define STORAGE double
#define COMPUTE double
#define LOAD IDENTITY
#define STORE IDENTITY
#define BITS uint64_t
#define TOP 63
#define NAN_BITS 0x7FF8000000000000ull
#define UBITS uint64_t
#define EXP 0x7FF0000000000000ull
#define SIGN 63
#define WIDTH 64
#define FUSED_AVX2_F32 0
#include "mask_kernels_dtype.h"

#define NAME bf16
#define STORAGE uint16_t
#define COMPUTE float
#define LOAD bf16_load
#define STORE bf16_store
#define BITS uint32_t
#define TOP 31
#define NAN_BITS 0x7FC00000u
#define UBITS uint16_t
#define EXP (uint16_t)0x7F80u
#define SIGN 15
#define WIDTH 16
#define FUSED_AVX2_F32 0
#include "mask_kernels_dtype.h"

#define NAME f16
#define STORAGE uint16_t
#define COMPUTE float
#define LOAD f16_load
#define STORE f16_store
#define BITS uint32_t
#define TOP 31
#define NAN_BITS 0x7FC00000u
#define UBITS uint16_t
#define EXP (uint16_t)0x7C00u
#define SIGN 15
#define WIDTH 16
#define FUSED_AVX2_F32 0
#include "mask_kernels_dtype.h"
