/* The per-dtype kernels of mask_kernels.c: included once per dtype, with these macros defined:

     NAME               suffix of the exported names (f32, f64, bf16, f16)
     STORAGE, COMPUTE   the stored type and the type the multiply runs in
     LOAD(x), STORE(x)  storage -> compute (exact) and compute -> storage (round to nearest even)
     BITS, TOP, NAN_BITS   the compute type's bits as an unsigned type, its sign bit, a quiet NaN
     UBITS, EXP, SIGN, WIDTH   the stored bits' unsigned type, exponent mask, sign bit and width
     FUSED_AVX2_F32     1 where the fused float32 AVX2 loops start pack and unpack (the staged loops finish)

   All of them are undefined at the end, ready for the next dtype. */

/* out[k...] = the kept val[j]; returns the new k. The fast path writes up to 8 elements past it
   (overwritten later by this thread), so it runs only where they stay below k_end. */
static inline int64_t CAT(compact_, NAME)(STORAGE* out, int64_t k, const STORAGE* val, const uint8_t* keep,
                                     uint32_t len, uint32_t cnt, int64_t k_end) {
    if (k + (int64_t)cnt + 8 <= k_end) return CAT(compact, WIDTH)((UBITS*)out, k, (const UBITS*)val, keep, len);
    for (uint32_t j = 0; j < len; ++j) if (keep[j]) out[k++] = val[j];
    return k;
}

/* Pack coordinates [a, b) of a piece: kept masked values to io[k...], in order. */
static void CAT(pack_, NAME)(const int64_t* row, int64_t a, int64_t b, scan_ctx* c) {
    const STORAGE* p = (const STORAGE*)(intptr_t)row[0];
    STORAGE* out = (STORAGE*)c->io;
    const int64_t thr = row[4];
    double scale_d;
    memcpy(&scale_d, &row[5], sizeof scale_d);
    const COMPUTE s = (COMPUTE)scale_d;
    UBITS nan_acc = 0, neg_acc = (UBITS)~(UBITS)0;
    int64_t k = c->k;
    if (thr >= KEEP_ALL) {
        STORAGE* q = out + k;
        const STORAGE* x = p + a;
        const int64_t n = b - a;
        if (scale_d == 1.0) {
            memcpy(q, x, (size_t)n * sizeof(STORAGE));  /* the bits themselves, as index_select */
            for (int64_t i = 0; i < n; ++i) ZACC(x[i]);
        } else {
            for (int64_t i = 0; i < n; ++i) { const STORAGE v = STORE(LOAD(x[i]) * s); q[i] = v; ZACC(v); }
        }
        k += b - a;
    } else {
        const int32_t t = (int32_t)thr;
        const uint32_t base = (uint32_t)row[3];
        uint8_t keep[SUB];
        STORAGE val[SUB];
        int64_t start = a;
#if FUSED_AVX2_F32 && defined(__AVX2__)
        start += pack8_f32(p + a, base + (uint32_t)a, (uint32_t)(b - a), t, s, out, &k, c->k_end, &nan_acc, &neg_acc);
#endif
        for (int64_t lo = start; lo < b; lo += SUB) {
            const uint32_t len = (uint32_t)(b - lo < SUB ? b - lo : SUB), first = base + (uint32_t)lo;
            const STORAGE* x = p + lo;
            uint32_t cnt = 0;
            for (uint32_t j = 0; j < len; ++j) {
                const int32_t h = (int32_t)hash32(first + j);
                const STORAGE v = STORE(LOAD(x[j]) * (h < t ? s : (COMPUTE)0));
                val[j] = v;
                keep[j] = (uint8_t)(h < t);
                cnt += (uint32_t)(h < t);
                ZACC(v);
            }
            k = CAT(compact_, NAME)(out, k, val, keep, len, cnt, c->k_end);
        }
    }
    c->k = k;
    c->nan |= nan_acc != 0;
    c->neg &= (int)(neg_acc >> SIGN);
}

/* Unpack coordinates [a, b) of a piece: kept ones from io[k...], dropped ones x * 0. Reads stay
   within io (a wrong io length is reported by scan, never read past). */
static void CAT(unpack_, NAME)(const int64_t* row, int64_t a, int64_t b, scan_ctx* c) {
    STORAGE* p = (STORAGE*)(intptr_t)row[0];
    const STORAGE* in = (const STORAGE*)c->io;
    const int64_t last = c->k_end - 1, thr = row[4];
    int64_t k = c->k;
    if (thr >= KEEP_ALL) {
        const int64_t fit = last - k < b - a ? (last - k > 0 ? last - k : 0) : b - a;
        memcpy(p + a, in + k, (size_t)fit * sizeof(STORAGE));
        c->k = k + (b - a);
        return;
    }
    const int32_t t = (int32_t)thr;
    const uint32_t base = (uint32_t)row[3];
    uint8_t keep[SUB];
    STORAGE got[SUB];
    int64_t start = a;
#if FUSED_AVX2_F32 && defined(__AVX2__)
    start += unpack8_f32(p + a, base + (uint32_t)a, (uint32_t)(b - a), t, in, &k, c->k_end);
#endif
    for (int64_t lo = start; lo < b; lo += SUB) {
        const uint32_t len = (uint32_t)(b - lo < SUB ? b - lo : SUB), first = base + (uint32_t)lo;
        STORAGE* x = p + lo;
        for (uint32_t j = 0; j < len; ++j) keep[j] = (uint8_t)((int32_t)hash32(first + j) < t);
        /* got[j] = the next received value, read branch-free (consumed only where kept) */
        if (k + (int64_t)len + 8 <= last) {  /* the fast path reads up to 8 elements ahead */
            k = CAT(expand, WIDTH)((UBITS*)got, (const UBITS*)in, k, keep, len);
        } else {
            for (uint32_t j = 0; j < len; ++j) { got[j] = in[k < last ? k : last]; k += keep[j]; }
        }
        /* dropped: x * 0, what masking leaves there (a signed zero, NaN where x is not finite) */
        for (uint32_t j = 0; j < len; ++j) {  /* a bitwise select: GCC vectorizes it, not a float ?: */
            const STORAGE zero = STORE(LOAD(x[j]) * (COMPUTE)0);
            UBITS z, g;
            memcpy(&z, &zero, sizeof z);
            memcpy(&g, &got[j], sizeof g);
            const UBITS m = (UBITS)((UBITS)0 - (UBITS)keep[j]);
            z = (g & m) | (z & (UBITS)~m);
            memcpy(&x[j], &z, sizeof z);
        }
    }
    c->k = k;
}

int64_t CAT(dg_pack_, NAME)(const int64_t* table, int64_t count, int threads, int64_t grain, int64_t out, int64_t cap) {
    int flags[2];
    const int64_t kept = scan(CAT(pack_, NAME), table, count, threads, grain, (char*)(intptr_t)out, cap, 0, flags);
    if (kept >= 0) {  /* the flag: NaN if a value was not finite, else -0 if every sign was set, else +0 */
        const BITS bits = flags[0] ? NAN_BITS : flags[1] ? (BITS)1 << TOP : 0;
        COMPUTE flag;
        memcpy(&flag, &bits, sizeof flag);
        ((STORAGE*)(intptr_t)out)[kept] = STORE(flag);
    }
    return kept;
}

int64_t CAT(dg_unpack_, NAME)(const int64_t* table, int64_t count, int threads, int64_t grain, int64_t in,
                         int64_t in_len, int64_t first) {
    int flags[2];
    const int64_t kept = scan(CAT(unpack_, NAME), table, count, threads, grain, (char*)(intptr_t)in, in_len, 1, flags);
    if (kept >= 0 && first) {  /* + the summed flag: 0, or NaN when any rank saw a non-finite value */
        STORAGE* x = (STORAGE*)(intptr_t)first;
        *x = STORE(LOAD(*x) + LOAD(((STORAGE*)(intptr_t)in)[kept]));
    }
    return kept;
}

static void CAT(seg_, NAME)(const int64_t* row, int64_t a, int64_t b) {
    STORAGE* p = (STORAGE*)(intptr_t)row[0];
    uint8_t* m = (uint8_t*)(intptr_t)row[1];
    const uint32_t base = (uint32_t)row[3];
    const int64_t thr = row[4];
    double scale_d;
    memcpy(&scale_d, &row[5], sizeof scale_d);
    const COMPUTE s = (COMPUTE)scale_d;
    if (thr >= KEEP_ALL) {
        if (scale_d != 1.0)
            for (int64_t i = a; i < b; ++i) p[i] = STORE(LOAD(p[i]) * s);
        if (m) memset(m + a, 1, (size_t)(b - a));
        return;
    }
    /* A 32-bit counter: with the 64-bit index GCC builds each index vector with shuffles. */
    const int32_t t = (int32_t)thr;
    const uint32_t first = base + (uint32_t)a, len = (uint32_t)(b - a);  /* len <= 2**31: one salt block */
    STORAGE* q = p + a;
    if (m) {
        uint8_t* k = m + a;
        for (uint32_t j = 0; j < len; ++j) {
            const int32_t h = (int32_t)hash32(first + j);
            q[j] = STORE(LOAD(q[j]) * (h < t ? s : (COMPUTE)0));
            k[j] = (uint8_t)(h < t);
        }
    } else {
        for (uint32_t j = 0; j < len; ++j) {
            const int32_t h = (int32_t)hash32(first + j);
            q[j] = STORE(LOAD(q[j]) * (h < t ? s : (COMPUTE)0));
        }
    }
}
void CAT(dg_mask_, NAME)(const int64_t* table, int64_t count, int threads, int64_t grain) {
    run(CAT(seg_, NAME), table, count, threads, grain);
}
void CAT(dg_mask1_, NAME)(int64_t ptr, int64_t mptr, int64_t n, int64_t base, int64_t thr, double scale, int threads,
                     int64_t grain) {
    int64_t row[6] = {ptr, mptr, n, base, thr, 0};
    memcpy(&row[5], &scale, sizeof scale);
    run(CAT(seg_, NAME), row, 1, threads, grain);
}

#undef NAME
#undef STORAGE
#undef COMPUTE
#undef LOAD
#undef STORE
#undef BITS
#undef TOP
#undef NAN_BITS
#undef UBITS
#undef EXP
#undef SIGN
#undef WIDTH
#undef FUSED_AVX2_F32
