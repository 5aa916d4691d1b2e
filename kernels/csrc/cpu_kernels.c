/* dynserve native CPU kernels, loaded with ctypes by kernels/cpu_native.py.
 *
 * Plain C99 + OpenMP; built on first use with the machine's C compiler (-O3 -march=native), so the
 * loops vectorise for whatever SIMD the host has. Each kernel has a plain-torch reference in
 * kernels/attention_ref.py or kernels/moe_ref.py and is compared against it in tests/test_cpu_native.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x in [-87, 88] (clamped outside): 2^n * p(r), r in [-ln2/2, ln2/2]; rel. err ~1e-7.
 * Branch-free so `omp simd` loops vectorise it. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float n = x * log2e;
    n = n >= 0.0f ? (float)(int)(n + 0.5f) : (float)(int)(n - 0.5f);
    float r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Grow-only per-thread scratch: sized once for the largest call, so steps do not page-fault. */
static float *scratch(size_t n) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (n > cap) {
        free(buf);
        buf = (float *)malloc(n * sizeof(float));
        cap = buf ? n : 0;
    }
    return buf; /* NULL when out of memory: callers report it */
}

/* A second grow-only buffer for the calling thread (the GEMM's converted input rows), so a kernel
 * can hold it while calling code that uses `scratch`. */
static float *scratch_in(size_t n) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (n > cap) {
        free(buf);
        buf = (float *)malloc(n * sizeof(float));
        cap = buf ? n : 0;
    }
    return buf;
}

/* ------------------------------------------------------------------------------------------------
 * bfloat16: the top 16 bits of a float32. Widening is exact (a shift); narrowing rounds to nearest,
 * ties to even, and keeps NaN a (quiet) NaN, as torch's float -> bfloat16 conversion does.
 * ---------------------------------------------------------------------------------------------- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> the nearest bfloat16 value, kept in a float32 (the rounding torch applies when a
 * bfloat16 op stores its result) */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static void bf16_row_to_f32(const uint16_t *src, float *dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        dst[i] = f;
    }
}

/* x rows for gemm_nt_bf16, which reads each full block of 16 k as k 0-3, 8-11, 4-7, 12-15 under AVX2
 * (see tile_nt_bf16) and in natural order otherwise: bf16_row_to_f32_k widens a bfloat16 row into
 * that order, k_order_row puts a float32 row in natural order into it (in place). */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static void bf16_row_to_f32_k(const uint16_t *src, float *dst, int64_t n) {
    const int64_t n16 = n & ~(int64_t)15;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t i = 0; i < n16; i += 16) {
        __m256i r = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r)));
        _mm256_storeu_ps(dst + i + 8, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r)));
    }
    for (int64_t i = n16; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

static void k_order_row(float *row, int64_t n) {
    for (int64_t i = 0; i + 16 <= n; i += 16) { /* swap k 4-7 with k 8-11 */
        __m128 a = _mm_loadu_ps(row + i + 4), b = _mm_loadu_ps(row + i + 8);
        _mm_storeu_ps(row + i + 4, b);
        _mm_storeu_ps(row + i + 8, a);
    }
}
#else
static void bf16_row_to_f32_k(const uint16_t *src, float *dst, int64_t n) { bf16_row_to_f32(src, dst, n); }

static void k_order_row(float *row, int64_t n) {
    (void)row;
    (void)n;
}
#endif

/* Decode attention building blocks, on float32 rows (a bfloat16 cache row is widened first).
 *
 * qk_row: the scores of one cache position for every query head, s[i * L + t] = scale * q_i . k_h(i)
 * (h(i) = i / G). Four heads run at once with independent accumulators, so the FMAs do not wait on
 * each other (one dot product at a time is one dependent FMA chain, ~4x slower), then the four
 * 8-lane sums are reduced together (three hadds and one add); a head-dim tail (D % 8) is added in
 * plain C. pv_rows: acc_i += sum over n positions of p_i(t) v_h(i)(t), n <= 4, one FMA per position
 * in position order (the result equals one position at a time) with each accumulator loaded and
 * stored once per n positions instead of once per position. */
#if defined(__AVX2__) && defined(__FMA__)
static inline void qk_row(const float *krow, const float *qf, int64_t Hq, const int64_t *koff, int64_t D, float scale,
                          float *s, int64_t L, int64_t t) {
    const int64_t D8 = D & ~(int64_t)7;
    int64_t i = 0;
    for (; i + 4 <= Hq; i += 4) {
        const float *k0 = krow + koff[i], *k1 = krow + koff[i + 1];
        const float *k2 = krow + koff[i + 2], *k3 = krow + koff[i + 3];
        const float *q0 = qf + i * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D8; d += 8) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), _mm256_loadu_ps(k1 + d), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), _mm256_loadu_ps(k2 + d), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), _mm256_loadu_ps(k3 + d), a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        float dots[4];
        _mm_storeu_ps(dots, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        const float *ks[4] = {k0, k1, k2, k3}, *qs[4] = {q0, q1, q2, q3};
        for (int j = 0; j < 4; j++) {
            float dot = dots[j];
            for (int64_t d = D8; d < D; d++) dot += qs[j][d] * ks[j][d];
            s[(i + j) * L + t] = dot * scale;
        }
    }
    for (; i < Hq; i++) {
        const float *kh = krow + koff[i], *qh = qf + i * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; d++) dot += qh[d] * kh[d];
        s[i * L + t] = dot * scale;
    }
}
#else
static inline void qk_row(const float *krow, const float *qf, int64_t Hq, const int64_t *koff, int64_t D, float scale,
                          float *s, int64_t L, int64_t t) {
    for (int64_t i = 0; i < Hq; i++) {
        const float *kh = krow + koff[i], *qh = qf + i * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; d++) dot += qh[d] * kh[d];
        s[i * L + t] = dot * scale;
    }
}
#endif

/* Softmax pieces of decode attention over a row of scores x[0..n): row_max, and exp_sum, which
 * replaces x[t] by exp(x[t] - m) (rounded to bfloat16 when round_bf16_out) and returns the float32
 * sum of the unrounded values. The AVX2 version evaluates fast_expf's polynomial on 8 lanes at once
 * (the scalar fast_expf does not vectorise: ~4x the time of the dot products at short contexts). */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 fast_exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 half = _mm256_or_ps(_mm256_and_ps(n, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(0.5f));
    n = _mm256_round_ps(_mm256_add_ps(n, half), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); /* half away from 0 */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* round each (finite) lane to the nearest bfloat16, ties to even, as f32_to_bf16 */
static inline __m256 round_bf16_8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline float row_max(const float *x, int64_t n) {
    int64_t t = 0;
    float m = x[0];
    if (n >= 8) {
        __m256 mv = _mm256_loadu_ps(x);
        for (t = 8; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + t));
        float lanes[8];
        _mm256_storeu_ps(lanes, mv);
        for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    }
    for (; t < n; t++) m = x[t] > m ? x[t] : m;
    return m;
}

static inline float exp_sum(float *x, int64_t n, float m, int round_bf16_out) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + t), mv));
        sv = _mm256_add_ps(sv, e);
        _mm256_storeu_ps(x + t, round_bf16_out ? round_bf16_8(e) : e);
    }
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, sv);
    for (int j = 0; j < 8; j++) sum += lanes[j];
    for (; t < n; t++) {
        const float e = fast_expf(x[t] - m);
        sum += e;
        x[t] = round_bf16_out ? round_bf16(e) : e;
    }
    return sum;
}
#else
static inline float row_max(const float *x, int64_t n) {
    float m = x[0];
    for (int64_t t = 1; t < n; t++) m = x[t] > m ? x[t] : m;
    return m;
}

static inline float exp_sum(float *x, int64_t n, float m, int round_bf16_out) {
    float sum = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float e = fast_expf(x[t] - m);
        sum += e;
        x[t] = round_bf16_out ? round_bf16(e) : e;
    }
    return sum;
}
#endif

/* Prefetch (into L2) the cache rows of block table entry `next` (bs rows of `row_bytes`), issued when
 * a sequence's walk enters the block before it: blocks are scattered, so the hardware prefetcher
 * cannot follow the walk across them. */
static inline void prefetch_block(const char *base, int64_t next, int64_t bs, int64_t row_bytes) {
#if defined(__AVX2__) && defined(__FMA__)
    const char *p = base + next * bs * row_bytes;
    for (int64_t o = 0; o < bs * row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
#else
    (void)base, (void)next, (void)bs, (void)row_bytes;
#endif
}

static inline void pv_rows(const float *const *vrows, int n, const float *s, int64_t L, int64_t t, int64_t Hq,
                           const int64_t *koff, int64_t D, float *acc) {
    for (int64_t i = 0; i < Hq; i++) {
        const int64_t off = koff[i];
        const float *p = s + i * L + t;
        float *a = acc + i * D;
        if (n == 4) {
            const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
            const float *v0 = vrows[0] + off, *v1 = vrows[1] + off, *v2 = vrows[2] + off, *v3 = vrows[3] + off;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                float x = a[d];
                x += p0 * v0[d];
                x += p1 * v1[d];
                x += p2 * v2[d];
                x += p3 * v3[d];
                a[d] = x;
            }
        } else {
            for (int j = 0; j < n; j++) {
                const float pj = p[j], *vj = vrows[j] + off;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += pj * vj[d];
            }
        }
    }
}

/* Decode attention over the paged KV cache: one query token per sequence.
 *
 *   q      [B, Hq, D]            float32, contiguous
 *   kc, vc [num_blocks, bs, Hkv, D] float32, contiguous (the two halves of the layer's cache)
 *   block_tables [B, max_blocks] int64; seq_lens [B] int64 (context length incl. the new token)
 *   out    [B, Hq, D]            float32
 *
 * K and V are read in place through the block table (no gathered copy), position-major so each
 * cache row [Hkv, D] is read once for all Hq heads. Two passes per sequence: scores for all
 * positions, then softmax and the weighted sum of V. Sequences run in parallel (OpenMP).
 */
/* Work items of a decode attention call: whole sequences when there are at least as many as threads;
 * else each sequence's query heads split into `parts` groups of a multiple of four heads (qk_row's
 * four-head path, so each head's arithmetic is the unsplit one), one item per group. */
static int64_t decode_parts(int64_t B, int64_t Hq, int64_t Hkv, int64_t num_threads) {
    if (B >= num_threads || num_threads <= 1) return 1;
    int64_t parts = (num_threads + B - 1) / B;
    if (parts > Hkv) parts = Hkv;
    while (parts > 1 && (Hkv % parts || (Hq / parts) % 4)) parts--;
    return parts;
}

int dyn_paged_decode_f32(const float *q, const float *kc, const float *vc, const int64_t *block_tables,
                         int64_t max_blocks, const int64_t *seq_lens, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t bs, float scale, const float *sinks, int64_t window, float *out, int64_t num_threads) {
    int failed = 0;
    const int64_t G = Hq / Hkv;
    int64_t lmax = 0;
    for (int64_t b = 0; b < B; b++) lmax = seq_lens[b] > lmax ? seq_lens[b] : lmax;
    const int64_t row = Hkv * D; /* floats per cache position */
    const int64_t parts = decode_parts(B, Hq, Hkv, num_threads);
    const int64_t nq = Hq / parts; /* query heads per work item */
    int64_t koff[Hq > 0 ? Hq : 1]; /* query head i reads K/V elements koff[i] .. + D of a cache row */
    for (int64_t i = 0; i < Hq; i++) koff[i] = (i / G) * D; /* (no 64-bit division per position) */
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        float *s = scratch((size_t)(nq * ((lmax > 0 ? lmax : 1) + D))); /* [nq, L] scores, then [nq, D] */
        float *acc = s ? s + nq * (lmax > 0 ? lmax : 1) : NULL;
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * parts; item++) {
            if (!s) continue;
            const int64_t b = item / parts, i0 = (item % parts) * nq; /* sequence, first query head */
            const int64_t L = seq_lens[b];
            const float *qb = q + (b * Hq + i0) * D;
            const float *sk = sinks ? sinks + i0 : NULL;
            float *ob = out + (b * Hq + i0) * D;
            const int64_t *bt = block_tables + b * max_blocks;
            if (L <= 0) {
                memset(ob, 0, sizeof(float) * (size_t)(nq * D));
                continue;
            }
            const int64_t t0 = window > 0 && L > window ? L - window : 0; /* first visible position */
            int64_t blk = t0 / bs, off = t0 % bs; /* walks the block table (no division per position) */
            const int64_t nblk = (L + bs - 1) / bs; /* blocks the sequence uses */
            for (int64_t t = t0; t < L; t++) {
                if (off == 0 && blk + 1 < nblk) prefetch_block((const char *)kc, bt[blk + 1], bs, row * 4);
                qk_row(kc + (bt[blk] * bs + off) * row, qb, nq, koff + i0, D, scale, s, L, t);
                if (++off == bs) off = 0, blk++;
            }
            for (int64_t i = 0; i < nq; i++) {
                float *si = s + i * L;
                float m = row_max(si + t0, L - t0);
                if (sk && sk[i] > m) m = sk[i];
                float sum = exp_sum(si + t0, L - t0, m, 0);
                if (sk) sum += fast_expf(sk[i] - m);
                const float inv = 1.0f / sum;
#pragma omp simd
                for (int64_t t = t0; t < L; t++) si[t] *= inv;
            }
            memset(acc, 0, sizeof(float) * (size_t)(nq * D));
            blk = t0 / bs, off = t0 % bs;
            for (int64_t t = t0; t < L; t += 4) {
                const int n = L - t < 4 ? (int)(L - t) : 4;
                const float *vrows[4];
                for (int j = 0; j < n; j++) {
                    if (off == 0 && blk + 1 < nblk) prefetch_block((const char *)vc, bt[blk + 1], bs, row * 4);
                    vrows[j] = vc + (bt[blk] * bs + off) * row;
                    if (++off == bs) off = 0, blk++;
                }
                pv_rows(vrows, n, s, L, t, nq, koff + i0, D, acc);
            }
            memcpy(ob, acc, sizeof(float) * (size_t)(nq * D));
        }
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Small-M GEMM: y[m, n] = sum_k x[m, k] * w[n, k]  (x [M, K] row stride ldx, w [N, K] contiguous,
 * y [M, N] row stride ldy). Built for M <= ~100 rows against a weight matrix streamed once from
 * memory: tiles of 4 weight rows x up to 3 input rows keep 12 AVX2 accumulators in registers, and
 * a tile's 4 weight rows (4 K floats) stay in L1 while every input row passes over them.
 * ---------------------------------------------------------------------------------------------- */
#ifndef TILE_N
#define TILE_N 3 /* weight rows per tile (<= 4) */
#endif
#ifndef TILE_M
#define TILE_M 4 /* input rows per tile (<= 5): TILE_N * TILE_M accumulators + TILE_N weight vectors */
#endif

/* bfloat16 tiles: 3 weight rows x 3 input rows (9 accumulators, 3 weight vectors, an input vector and
 * the zero vector of the widening; 3 x 4 needs 17 ymm registers and spilled accumulators, 2.1x
 * slower; 3 x 3 measured best of 2x4, 2x5, 2x6, 3x3 at 6-64 rows) */
#ifndef BTILE_N
#define BTILE_N 3
#endif
#ifndef BTILE_M
#define BTILE_M 3
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}


/* One tile: weight rows w[0..nb) x input rows x[0..mb), nb <= TILE_N, mb <= TILE_M (compile-time
 * constants after inlining, so the accumulators live in registers). Each weight vector and each input
 * vector is loaded once per k-step into a register (the empty asm keeps the compiler from re-loading
 * it as a memory operand of every FMA, which makes the loop load-bound). Prefetch: `pf` walks a few
 * tiles ahead on the first pass over a gemm's first chunk; `*cursor` walks through the next chunk's
 * weight rows, one cache line every other k-step of every pass, so memory streams the next chunk
 * evenly while this one computes from L2 (instead of only during each chunk's first pass). */
static inline __attribute__((always_inline)) void tile_nt(const float *x, int64_t ldx, const float *w, int64_t K,
                                                          float *y, int64_t ldy, const int nb, const int mb,
                                                          const float *pf, const float **cursor, const float *cend) {
    __m256 acc[TILE_N][TILE_M];
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < mb; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t k = 0; k < K8; k += 8) {
        for (int i = 0; i < nb; i++) _mm_prefetch((const char *)(pf + i * K + k), _MM_HINT_T0);
        if ((k & 15) == 0 && *cursor < cend) {
            _mm_prefetch((const char *)*cursor, _MM_HINT_T1);
            *cursor += 16;
        }
        __m256 wv[TILE_N];
        for (int i = 0; i < nb; i++) {
            wv[i] = _mm256_loadu_ps(w + i * K + k);
            __asm__("" : "+x"(wv[i]));
        }
        for (int j = 0; j < mb; j++) {
            __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
            __asm__("" : "+x"(xv));
            for (int i = 0; i < nb; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < mb; j++) {
            float s = hsum256(acc[i][j]);
            for (int64_t k = K8; k < K; k++) s += w[i * K + k] * x[j * ldx + k];
            y[j * ldy + i] = s;
        }
}

#define TILE_CASE(NB, MB) \
    case (NB) * 8 + (MB): tile_nt(x + m0 * ldx, ldx, w + n0 * K, K, y + m0 * ldy + n0, ldy, NB, MB, pf, &cursor, cend); \
        break;
#if TILE_M == 5
#define TILE_ROW(NB) TILE_CASE(NB, 1) TILE_CASE(NB, 2) TILE_CASE(NB, 3) TILE_CASE(NB, 4) TILE_CASE(NB, 5)
#elif TILE_M == 4
#define TILE_ROW(NB) TILE_CASE(NB, 1) TILE_CASE(NB, 2) TILE_CASE(NB, 3) TILE_CASE(NB, 4)
#elif TILE_M == 3
#define TILE_ROW(NB) TILE_CASE(NB, 1) TILE_CASE(NB, 2) TILE_CASE(NB, 3)
#else
#error "TILE_M must be 3, 4 or 5"
#endif
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (128 * 1024) /* weight rows per chunk of the small-M GEMMs (in L2 across the input-row
                                    tiles); 128 KB measured 8-13% faster than 256 KB on the decode MoE */
#endif
#ifndef PF_TILES
#define PF_TILES 8 /* prefetch distance in weight-row tiles (~1.5k cycles ahead: covers DRAM latency) */
#endif

/* Loop order: weight rows in chunks that fit L2 (read from memory once), then input-row tiles (a
 * tile's TILE_M rows stay in L1 across the chunk), then weight-row tiles. */
static void gemm_nt(const float *x, int64_t ldx, const float *w, int64_t K, int64_t M, int64_t N, float *y,
                    int64_t ldy) {
    int64_t chunk = (CHUNK_BYTES / (int64_t)sizeof(float)) / (K > 0 ? K : 1); /* CHUNK_BYTES of weight rows */
    chunk = chunk < TILE_N ? TILE_N : chunk - chunk % TILE_N;
    for (int64_t nc = 0; nc < N; nc += chunk) {
        const int64_t nc_end = nc + chunk < N ? nc + chunk : N;
        /* while this chunk computes, walk a prefetch cursor through the next chunk's rows */
        const float *cursor = w + nc_end * K;
        const float *cend = w + (nc_end + chunk < N ? nc_end + chunk : N) * K;
        for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
            const int mb = M - m0 < TILE_M ? (int)(M - m0) : TILE_M;
            for (int64_t n0 = nc; n0 < nc_end; n0 += TILE_N) {
                const int nb = nc_end - n0 < TILE_N ? (int)(nc_end - n0) : TILE_N;
                /* first pass over each chunk: prefetch the rows PF_TILES tiles ahead (the current ones
                 * otherwise); with it on every chunk, not only the first, one-row GEMVs stream 10-24% faster */
                const float *pf = w + (m0 == 0 && n0 + (PF_TILES + 1) * TILE_N <= N ? n0 + PF_TILES * TILE_N : n0) * K;
                switch (nb * 8 + mb) {
                    TILE_ROW(1)
#if TILE_N >= 2
                    TILE_ROW(2)
#endif
#if TILE_N >= 3
                    TILE_ROW(3)
#endif
#if TILE_N >= 4
                    TILE_ROW(4)
#endif
                    default: break;
                }
            }
        }
    }
}


/* bfloat16 weights: as tile_nt, 16 k at a time. A 32-byte load of 16 bfloat16 weights is widened by
 * interleaving with zeros (vpunpcklwd / vpunpckhwd put each bfloat16 in the top half of a 32-bit lane:
 * exact), a shuffle-unit op, so the FMA ports do nothing but FMAs (a zero-extend plus shift, as
 * before, cost a shift on the FMA ports per 8 weights and ran 1.6-1.8x slower than float32 at 16-64
 * rows). The interleave takes k 0-3 and 8-11 into the low vector, 4-7 and 12-15 into the high one
 * (per 128-bit lane), so x comes in the same order: widened by bf16_row_to_f32_k, which permutes
 * each full 16-block alike; a tail of K % 16 stays in natural order. FMA'd in float32.
 * Results get `bias` (float32, or NULL) added and are stored as float32 into y, or rounded to
 * bfloat16 into yb when yb is not NULL. */
static inline __attribute__((always_inline)) void tile_nt_bf16(const float *x, int64_t ldx, const uint16_t *w,
                                                               int64_t K, float *y, uint16_t *yb, int64_t ldy,
                                                               const float *bias, const int nb, const int mb,
                                                               const uint16_t *pf, const uint16_t **cursor,
                                                               const uint16_t *cend) {
    __m256 acc[BTILE_N][BTILE_M];
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < mb; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K16 = K & ~(int64_t)15;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k = 0; k < K16; k += 16) {
        if ((k & 31) == 0) { /* one 64-byte line per weight row every 2 k-steps */
            for (int i = 0; i < nb; i++) _mm_prefetch((const char *)(pf + i * K + k), _MM_HINT_T0);
            if (*cursor < cend) {
                _mm_prefetch((const char *)*cursor, _MM_HINT_T1);
                *cursor += 32;
            }
        }
        __m256 wv[BTILE_N];
        for (int i = 0; i < nb; i++) {
            __m256i r = _mm256_loadu_si256((const __m256i *)(w + i * K + k));
            wv[i] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r));
            __asm__("" : "+x"(wv[i]));
        }
        for (int j = 0; j < mb; j++) {
            __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
            __asm__("" : "+x"(xv));
            for (int i = 0; i < nb; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
        for (int i = 0; i < nb; i++) {
            __m256i r = _mm256_loadu_si256((const __m256i *)(w + i * K + k));
            wv[i] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r));
            __asm__("" : "+x"(wv[i]));
        }
        for (int j = 0; j < mb; j++) {
            __m256 xv = _mm256_loadu_ps(x + j * ldx + k + 8);
            __asm__("" : "+x"(xv));
            for (int i = 0; i < nb; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < mb; j++) {
            float s = hsum256(acc[i][j]);
            for (int64_t k = K16; k < K; k++) s += bf16_to_f32(w[i * K + k]) * x[j * ldx + k];
            if (bias) s += bias[i];
            if (yb)
                yb[j * ldy + i] = f32_to_bf16(s);
            else
                y[j * ldy + i] = s;
        }
}

#define TILE_CASE_BF16(NB, MB)                                                                                   \
    case (NB) * 8 + (MB):                                                                                        \
        tile_nt_bf16(x + m0 * ldx, ldx, w + n0 * K, K, y ? y + m0 * ldy + n0 : NULL,                             \
                     yb ? yb + m0 * ldy + n0 : NULL, ldy, bias ? bias + n0 : NULL, NB, MB, pf, &cursor, cend); \
        break;
#if BTILE_M == 6
#define TILE_ROW_BF16(NB) \
    TILE_CASE_BF16(NB, 1) TILE_CASE_BF16(NB, 2) TILE_CASE_BF16(NB, 3) TILE_CASE_BF16(NB, 4) TILE_CASE_BF16(NB, 5) \
    TILE_CASE_BF16(NB, 6)
#elif BTILE_M == 5
#define TILE_ROW_BF16(NB) \
    TILE_CASE_BF16(NB, 1) TILE_CASE_BF16(NB, 2) TILE_CASE_BF16(NB, 3) TILE_CASE_BF16(NB, 4) TILE_CASE_BF16(NB, 5)
#elif BTILE_M == 4
#define TILE_ROW_BF16(NB) TILE_CASE_BF16(NB, 1) TILE_CASE_BF16(NB, 2) TILE_CASE_BF16(NB, 3) TILE_CASE_BF16(NB, 4)
#else
#define TILE_ROW_BF16(NB) TILE_CASE_BF16(NB, 1) TILE_CASE_BF16(NB, 2) TILE_CASE_BF16(NB, 3)
#endif

/* y [M, N] (+ bias) = x [M, K] float32 @ w [N, K]^T bfloat16, float32 accumulation; the same loop
 * order and prefetching as gemm_nt, with chunks of 256 KB of bfloat16 weight rows. Exactly one of
 * y (float32 out) and yb (bfloat16 out) is not NULL. */
static void gemm_nt_bf16(const float *x, int64_t ldx, const uint16_t *w, int64_t K, int64_t M, int64_t N, float *y,
                         uint16_t *yb, int64_t ldy, const float *bias) {
    int64_t chunk = (CHUNK_BYTES / (int64_t)sizeof(uint16_t)) / (K > 0 ? K : 1);
    chunk = chunk < BTILE_N ? BTILE_N : chunk - chunk % BTILE_N;
    for (int64_t nc = 0; nc < N; nc += chunk) {
        const int64_t nc_end = nc + chunk < N ? nc + chunk : N;
        const uint16_t *cursor = w + nc_end * K;
        const uint16_t *cend = w + (nc_end + chunk < N ? nc_end + chunk : N) * K;
        for (int64_t m0 = 0; m0 < M; m0 += BTILE_M) {
            const int mb = M - m0 < BTILE_M ? (int)(M - m0) : BTILE_M;
            for (int64_t n0 = nc; n0 < nc_end; n0 += BTILE_N) {
                const int nb = nc_end - n0 < BTILE_N ? (int)(nc_end - n0) : BTILE_N;
                const uint16_t *pf =
                    w + (m0 == 0 && n0 + (PF_TILES + 1) * BTILE_N <= N ? n0 + PF_TILES * BTILE_N : n0) * K;
                switch (nb * 8 + mb) {
                    TILE_ROW_BF16(1)
                    TILE_ROW_BF16(2)
#if BTILE_N >= 3
                    TILE_ROW_BF16(3)
#endif
                    default: break;
                }
            }
        }
    }
}
#else
static void gemm_nt(const float *x, int64_t ldx, const float *w, int64_t K, int64_t M, int64_t N, float *y,
                    int64_t ldy) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx, *wn = w + n * K;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; k++) s += xm[k] * wn[k];
            y[m * ldy + n] = s;
        }
}

static void gemm_nt_bf16(const float *x, int64_t ldx, const uint16_t *w, int64_t K, int64_t M, int64_t N, float *y,
                         uint16_t *yb, int64_t ldy, const float *bias) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            const uint16_t *wn = w + n * K;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; k++) s += xm[k] * bf16_to_f32(wn[k]);
            if (bias) s += bias[n];
            if (yb)
                yb[m * ldy + n] = f32_to_bf16(s);
            else
                y[m * ldy + n] = s;
        }
}
#endif


/* y [M, N] = x [M, K] @ w [N, K]^T (row strides ldx, ldy) with the small-M GEMM; with several threads,
 * each takes a contiguous slice of the weight rows (output columns). */
void dyn_gemm_nt_f32(const float *x, int64_t ldx, const float *w, int64_t K, int64_t M, int64_t N, float *y,
                     int64_t ldy, int64_t num_threads) {
    if (num_threads <= 1 || N < 64 * num_threads) {
        gemm_nt(x, ldx, w, K, M, N, y, ldy);
        return;
    }
    int64_t per = (N + num_threads - 1) / num_threads;
    per += (TILE_N - per % TILE_N) % TILE_N;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_threads; t++) {
        const int64_t n0 = t * per, n = N - n0 < per ? N - n0 : per;
        if (n > 0) gemm_nt(x, ldx, w + n0 * K, K, M, n, y + n0, ldy);
    }
}

/* Fused MoE over a ragged assignment, float32, for small rows-per-expert (decode batches).
 *
 *   x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]
 *   pairs grouped by expert: expert e owns sorted positions expert_off[e] .. expert_off[e+1]-1, each with
 *   its token sorted_tok[p], weight sorted_w[p] and destination row sorted_dst[p] in the token-major
 *   pair order; token t owns token-major rows token_off[t] .. token_off[t+1]-1
 *   out [T, H] = per token, the sum of its pairs' weighted expert outputs (0 for tokens with no pair)
 *
 * Experts run in parallel; each gathers its rows, runs gate/up, SiLU * up, down, and scales by the
 * pair weight into y_pairs [P, H] (caller-provided); tokens then sum their rows in pair order, so
 * the result does not depend on the thread count.
 */
/* Fewer active experts than threads (batch 1 at k=1, or k=2 on more cores): the experts run one after
 * another, each GEMM's output rows split over the threads (the same per-row arithmetic as the
 * expert-parallel schedule, so the result is identical), instead of threads idling. */
static int64_t active_experts(const int64_t *expert_off, int64_t E) {
    int64_t a = 0;
    for (int64_t e = 0; e < E; e++) a += expert_off[e + 1] > expert_off[e];
    return a;
}

static int moe_split_f32(const float *x, int64_t T, int64_t H, const float *w13, const float *w2, int64_t E,
                         int64_t I, const int64_t *sorted_tok, const float *sorted_w, const int64_t *sorted_dst,
                         const int64_t *expert_off, const int64_t *token_off, float *y_pairs, float *out,
                         int64_t num_threads) {
    for (int64_t e = 0; e < E; e++) {
        const int64_t p0 = expert_off[e], n = expert_off[e + 1] - p0;
        if (n <= 0) continue;
        float *xe = scratch((size_t)(n * (H + 2 * I + I + H)));
        if (!xe) return -1;
        float *gu = xe + n * H, *h = gu + n * 2 * I, *ye = h + n * I;
        for (int64_t r = 0; r < n; r++) memcpy(xe + r * H, x + sorted_tok[p0 + r] * H, sizeof(float) * (size_t)H);
        dyn_gemm_nt_f32(xe, H, w13 + e * 2 * I * H, H, n, 2 * I, gu, 2 * I, num_threads);
        for (int64_t r = 0; r < n; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            float *hr = h + r * I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) hr[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
        }
        dyn_gemm_nt_f32(h, I, w2 + e * H * I, I, n, H, ye, H, num_threads);
        for (int64_t r = 0; r < n; r++) {
            const float wt = sorted_w[p0 + r];
            const float *src = ye + r * H;
            float *dst = y_pairs + sorted_dst[p0 + r] * H;
#pragma omp simd
            for (int64_t c = 0; c < H; c++) dst[c] = wt * src[c];
        }
    }
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        memset(o, 0, sizeof(float) * (size_t)H);
        for (int64_t p = token_off[t]; p < token_off[t + 1]; p++) {
            const float *src = y_pairs + p * H;
#pragma omp simd
            for (int64_t c = 0; c < H; c++) o[c] += src[c];
        }
    }
    return 0;
}

int dyn_moe_f32(const float *x, int64_t T, int64_t H, const float *w13, const float *w2, int64_t E, int64_t I,
                const int64_t *sorted_tok, const float *sorted_w, const int64_t *sorted_dst,
                const int64_t *expert_off, const int64_t *token_off, float *y_pairs, float *out,
                int64_t num_threads) {
    if (num_threads > 1 && active_experts(expert_off, E) < num_threads)
        return moe_split_f32(x, T, H, w13, w2, E, I, sorted_tok, sorted_w, sorted_dst, expert_off, token_off, y_pairs,
                             out, num_threads);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            const int64_t p0 = expert_off[e], n = expert_off[e + 1] - p0;
            if (n <= 0) continue;
            float *xe = scratch((size_t)(n * (H + 2 * I + I + H)));
            if (!xe) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *gu = xe + n * H, *h = gu + n * 2 * I, *ye = h + n * I;
            for (int64_t r = 0; r < n; r++) memcpy(xe + r * H, x + sorted_tok[p0 + r] * H, sizeof(float) * (size_t)H);
            gemm_nt(xe, H, w13 + e * 2 * I * H, H, n, 2 * I, gu, 2 * I);
            for (int64_t r = 0; r < n; r++) {
                const float *g = gu + r * 2 * I, *u = g + I;
                float *hr = h + r * I;
#pragma omp simd
                for (int64_t i = 0; i < I; i++) hr[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
            }
            gemm_nt(h, I, w2 + e * H * I, I, n, H, ye, H);
            for (int64_t r = 0; r < n; r++) {
                const float wt = sorted_w[p0 + r];
                const float *src = ye + r * H;
                float *dst = y_pairs + sorted_dst[p0 + r] * H;
#pragma omp simd
                for (int64_t c = 0; c < H; c++) dst[c] = wt * src[c];
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *o = out + t * H;
            memset(o, 0, sizeof(float) * (size_t)H);
            for (int64_t p = token_off[t]; p < token_off[t + 1]; p++) {
                const float *src = y_pairs + p * H;
#pragma omp simd
                for (int64_t c = 0; c < H; c++) o[c] += src[c];
            }
        }
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * bfloat16 kernels: bfloat16 weights, activations and KV cache, float32 accumulation. Each rounds
 * where torch's bfloat16 ops round (every GEMM and elementwise result is stored as bfloat16), so
 * the engine's bfloat16 path decodes the same tokens with or without them. Inputs are widened to
 * float32 once per call (activations) or per cache row (K/V); weights are widened in registers.
 * ---------------------------------------------------------------------------------------------- */

/* y [M, N] bfloat16 = x [M, K] bfloat16 @ w [N, K]^T bfloat16 (+ bias [N] float32, or NULL), float32
 * accumulation, each output rounded once. Threads split the weight rows as dyn_gemm_nt_f32. */
int dyn_gemm_nt_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K, int64_t M, int64_t N,
                     uint16_t *y, int64_t ldy, const float *bias, int64_t num_threads) {
    float *xf = scratch_in((size_t)(M * K > 0 ? M * K : 1)); /* [M, K] float32 */
    if (!xf) return -1;
    for (int64_t m = 0; m < M; m++) bf16_row_to_f32_k(x + m * ldx, xf + m * K, K);
    if (num_threads <= 1 || N < 64 * num_threads) {
        gemm_nt_bf16(xf, K, w, K, M, N, NULL, y, ldy, bias);
        return 0;
    }
    int64_t per = (N + num_threads - 1) / num_threads;
    per += (BTILE_N - per % BTILE_N) % BTILE_N;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_threads; t++) {
        const int64_t n0 = t * per, n = N - n0 < per ? N - n0 : per;
        if (n > 0) gemm_nt_bf16(xf, K, w + n0 * K, K, M, n, NULL, y + n0, ldy, bias ? bias + n0 : NULL);
    }
    return 0;
}

/* Fused MoE, bfloat16: dyn_moe_f32's layout and schedule with x [T, H], w13 [E, 2I, H], w2 [E, H, I]
 * and out [T, H] in bfloat16 (y_pairs [P, H] stays float32). Rounds as fused_moe_ref does in
 * bfloat16: gate/up and down outputs, SiLU(gate) and SiLU(gate) * up to bfloat16; the pair weight
 * and the per-token sum in float32; the sum to bfloat16 once. */
/* gemm_nt_bf16 (float32 input rows, float32 out) with the output rows split over threads, as
 * dyn_gemm_nt_bf16 splits them. */
static void gemm_nt_bf16_rows(const float *x, int64_t ldx, const uint16_t *w, int64_t K, int64_t M, int64_t N,
                              float *y, int64_t ldy, int64_t num_threads) {
    if (num_threads <= 1 || N < 64 * num_threads) {
        gemm_nt_bf16(x, ldx, w, K, M, N, y, NULL, ldy, NULL);
        return;
    }
    int64_t per = (N + num_threads - 1) / num_threads;
    per += (BTILE_N - per % BTILE_N) % BTILE_N;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_threads; t++) {
        const int64_t n0 = t * per, n = N - n0 < per ? N - n0 : per;
        if (n > 0) gemm_nt_bf16(x, ldx, w + n0 * K, K, M, n, y + n0, NULL, ldy, NULL);
    }
}

/* moe_split_f32 in bfloat16 (dyn_moe_bf16's per-expert arithmetic). */
static int moe_split_bf16(const uint16_t *x, int64_t T, int64_t H, const uint16_t *w13, const uint16_t *w2, int64_t E,
                          int64_t I, const int64_t *sorted_tok, const float *sorted_w, const int64_t *sorted_dst,
                          const int64_t *expert_off, const int64_t *token_off, float *y_pairs, uint16_t *out,
                          int64_t num_threads) {
    for (int64_t e = 0; e < E; e++) {
        const int64_t p0 = expert_off[e], n = expert_off[e + 1] - p0;
        if (n <= 0) continue;
        float *xe = scratch((size_t)(n * (H + 2 * I + I + H) + H));
        if (!xe) return -1;
        float *gu = xe + n * H, *h = gu + n * 2 * I, *ye = h + n * I;
        for (int64_t r = 0; r < n; r++) bf16_row_to_f32_k(x + sorted_tok[p0 + r] * H, xe + r * H, H);
        gemm_nt_bf16_rows(xe, H, w13 + e * 2 * I * H, H, n, 2 * I, gu, 2 * I, num_threads);
        for (int64_t r = 0; r < n; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            float *hr = h + r * I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) {
                const float gi = round_bf16(g[i]);
                hr[i] = round_bf16(round_bf16(gi / (1.0f + fast_expf(-gi))) * round_bf16(u[i]));
            }
            k_order_row(hr, I);
        }
        gemm_nt_bf16_rows(h, I, w2 + e * H * I, I, n, H, ye, H, num_threads);
        for (int64_t r = 0; r < n; r++) {
            const float wt = sorted_w[p0 + r];
            const float *src = ye + r * H;
            float *dst = y_pairs + sorted_dst[p0 + r] * H;
#pragma omp simd
            for (int64_t c = 0; c < H; c++) dst[c] = round_bf16(src[c]) * wt;
        }
    }
    float *acc = scratch((size_t)H);
    if (!acc) return -1;
    for (int64_t t = 0; t < T; t++) {
        memset(acc, 0, sizeof(float) * (size_t)H);
        for (int64_t p = token_off[t]; p < token_off[t + 1]; p++) {
            const float *src = y_pairs + p * H;
#pragma omp simd
            for (int64_t c = 0; c < H; c++) acc[c] += src[c];
        }
        uint16_t *o = out + t * H;
        for (int64_t c = 0; c < H; c++) o[c] = f32_to_bf16(acc[c]);
    }
    return 0;
}

int dyn_moe_bf16(const uint16_t *x, int64_t T, int64_t H, const uint16_t *w13, const uint16_t *w2, int64_t E,
                 int64_t I, const int64_t *sorted_tok, const float *sorted_w, const int64_t *sorted_dst,
                 const int64_t *expert_off, const int64_t *token_off, float *y_pairs, uint16_t *out,
                 int64_t num_threads) {
    if (num_threads > 1 && active_experts(expert_off, E) < num_threads)
        return moe_split_bf16(x, T, H, w13, w2, E, I, sorted_tok, sorted_w, sorted_dst, expert_off, token_off,
                              y_pairs, out, num_threads);
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            const int64_t p0 = expert_off[e], n = expert_off[e + 1] - p0;
            if (n <= 0) continue;
            float *xe = scratch((size_t)(n * (H + 2 * I + I + H)));
            if (!xe) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *gu = xe + n * H, *h = gu + n * 2 * I, *ye = h + n * I; /* [n, H], [n, 2I], [n, I], [n, H] */
            for (int64_t r = 0; r < n; r++) bf16_row_to_f32_k(x + sorted_tok[p0 + r] * H, xe + r * H, H);
            gemm_nt_bf16(xe, H, w13 + e * 2 * I * H, H, n, 2 * I, gu, NULL, 2 * I, NULL);
            for (int64_t r = 0; r < n; r++) {
                const float *g = gu + r * 2 * I, *u = g + I;
                float *hr = h + r * I;
#pragma omp simd
                for (int64_t i = 0; i < I; i++) {
                    const float gi = round_bf16(g[i]);
                    hr[i] = round_bf16(round_bf16(gi / (1.0f + fast_expf(-gi))) * round_bf16(u[i]));
                }
                k_order_row(hr, I); /* the down GEMM's k order */
            }
            gemm_nt_bf16(h, I, w2 + e * H * I, I, n, H, ye, NULL, H, NULL);
            for (int64_t r = 0; r < n; r++) {
                const float wt = sorted_w[p0 + r];
                const float *src = ye + r * H;
                float *dst = y_pairs + sorted_dst[p0 + r] * H;
#pragma omp simd
                for (int64_t c = 0; c < H; c++) dst[c] = round_bf16(src[c]) * wt;
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *acc = scratch((size_t)H); /* [H]: the expert loop above is done with it */
            if (!acc) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            memset(acc, 0, sizeof(float) * (size_t)H);
            for (int64_t p = token_off[t]; p < token_off[t + 1]; p++) {
                const float *src = y_pairs + p * H;
#pragma omp simd
                for (int64_t c = 0; c < H; c++) acc[c] += src[c];
            }
            uint16_t *o = out + t * H;
            for (int64_t c = 0; c < H; c++) o[c] = f32_to_bf16(acc[c]);
        }
    }
    return failed ? -1 : 0;
}

/* Decode attention, bfloat16 q [B, Hq, D], cache halves [num_blocks, bs, Hkv, D] and out [B, Hq, D];
 * the rest as dyn_paged_decode_f32. Scores and softmax in float32; as torch's CPU flash attention
 * does for bfloat16, the unnormalised probabilities exp(s - max) are rounded to bfloat16 before they
 * weight V, and the float32 sum of V rows is divided by the float32 sum of exp and rounded once. */
int dyn_paged_decode_bf16(const uint16_t *q, const uint16_t *kc, const uint16_t *vc, const int64_t *block_tables,
                          int64_t max_blocks, const int64_t *seq_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t bs, float scale, const float *sinks, int64_t window, uint16_t *out, int64_t num_threads) {
    int failed = 0;
    const int64_t G = Hq / Hkv;
    int64_t lmax = 0;
    for (int64_t b = 0; b < B; b++) lmax = seq_lens[b] > lmax ? seq_lens[b] : lmax;
    const int64_t L1 = lmax > 0 ? lmax : 1;
    const int64_t row = Hkv * D; /* elements per cache position */
    int64_t koff[Hq > 0 ? Hq : 1]; /* query head i reads K/V elements koff[i] .. + D of a cache row */
    for (int64_t i = 0; i < Hq; i++) koff[i] = (i / G) * D;
    const int64_t parts = decode_parts(B, Hq, Hkv, num_threads);
    const int64_t nq = Hq / parts; /* query heads per work item */
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        /* [nq, L] scores, [nq, D] accumulators, [nq, D] q in float32, four K/V rows [Hkv, D], [nq] sums */
        float *s = scratch((size_t)(nq * L1 + 2 * nq * D + 4 * row + nq));
        float *acc = s ? s + nq * L1 : NULL, *qf = s ? acc + nq * D : NULL, *kv = s ? qf + nq * D : NULL;
        float *sums = s ? kv + 4 * row : NULL;
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * parts; item++) {
            if (!s) continue;
            const int64_t b = item / parts, i0 = (item % parts) * nq; /* sequence, first query head */
            const int64_t L = seq_lens[b];
            const float *sk = sinks ? sinks + i0 : NULL;
            uint16_t *ob = out + (b * Hq + i0) * D;
            const int64_t *bt = block_tables + b * max_blocks;
            if (L <= 0) {
                memset(ob, 0, sizeof(uint16_t) * (size_t)(nq * D));
                continue;
            }
            bf16_row_to_f32(q + (b * Hq + i0) * D, qf, nq * D);
            const int64_t t0 = window > 0 && L > window ? L - window : 0; /* first visible position */
            int64_t blk = t0 / bs, off = t0 % bs; /* walks the block table (no division per position) */
            const int64_t nblk = (L + bs - 1) / bs; /* blocks the sequence uses */
            for (int64_t t = t0; t < L; t++) {
                if (off == 0 && blk + 1 < nblk) prefetch_block((const char *)kc, bt[blk + 1], bs, row * 2);
                bf16_row_to_f32(kc + (bt[blk] * bs + off) * row, kv, row);
                qk_row(kv, qf, nq, koff + i0, D, scale, s, L, t);
                if (++off == bs) off = 0, blk++;
            }
            for (int64_t i = 0; i < nq; i++) {
                float *si = s + i * L;
                float m = row_max(si + t0, L - t0);
                if (sk && sk[i] > m) m = sk[i];
                float sum = exp_sum(si + t0, L - t0, m, 1);
                if (sk) sum += fast_expf(sk[i] - m);
                sums[i] = sum;
            }
            memset(acc, 0, sizeof(float) * (size_t)(nq * D));
            blk = t0 / bs, off = t0 % bs;
            for (int64_t t = t0; t < L; t += 4) {
                const int n = L - t < 4 ? (int)(L - t) : 4;
                const float *vrows[4];
                for (int j = 0; j < n; j++) {
                    if (off == 0 && blk + 1 < nblk) prefetch_block((const char *)vc, bt[blk + 1], bs, row * 2);
                    bf16_row_to_f32(vc + (bt[blk] * bs + off) * row, kv + j * row, row);
                    vrows[j] = kv + j * row;
                    if (++off == bs) off = 0, blk++;
                }
                pv_rows(vrows, n, s, L, t, nq, koff + i0, D, acc);
            }
            for (int64_t i = 0; i < nq; i++) {
                const float inv = 1.0f / sums[i];
                for (int64_t d = 0; d < D; d++) ob[i * D + d] = f32_to_bf16(acc[i * D + d] * inv);
            }
        }
    }
    return failed ? -1 : 0;
}

/* RMSNorm over rows, with an optional residual add before it (torch reference: norm_ref.rms_norm_ref).
 *
 *   x, res [T, H] (res may be NULL), w [H]  -> out [T, H]; h_out [T, H] = x + res when res != NULL
 *   h = x (+ res);  out = w * (h * rsqrt(mean(h^2) + eps))
 *
 * The sum of squares is accumulated in double (at least as accurate as torch's float32 cascade
 * sum), the mean and rsqrt in float32. Rows run in parallel only when there are many (prefill). */
void dyn_rmsnorm_f32(const float *x, const float *res, const float *w, float *out, float *h_out, int64_t T,
                     int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        if (res) {
            float *hr = h_out + t * H;
            const float *rr = res + t * H;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) hr[i] = xr[i] + rr[i];
            xr = hr;
        }
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; i++) ss += (double)xr[i] * xr[i];
        const float r = 1.0f / sqrtf((float)ss / (float)H + eps);
        float *o = out + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (xr[i] * r);
    }
}

/* bfloat16: h = round(x + res) as torch's bfloat16 add stores it; the norm in float32, rounded to
 * bfloat16, then times w and rounded again (the reference's `weight * xf.to(bfloat16)`). */
void dyn_rmsnorm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out, uint16_t *h_out,
                      int64_t T, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xr = x + t * H;
        if (res) {
            uint16_t *hr = h_out + t * H;
            const uint16_t *rr = res + t * H;
            for (int64_t i = 0; i < H; i++) hr[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(rr[i]));
            xr = hr;
        }
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; i++) {
            const double v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf((float)ss / (float)H + eps);
        uint16_t *o = out + t * H;
        for (int64_t i = 0; i < H; i++) o[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(xr[i]) * r));
    }
}

/* Input checks of the wrappers, here rather than as torch reductions (each a dispatch and a
 * host sync per call): 1 when every a[0..n) lies in [lo, hi), else 0. */
int dyn_in_range(const int64_t *a, int64_t n, int64_t lo, int64_t hi) {
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= (a[i] >= lo) & (a[i] < hi);
    return ok;
}

/* 1 when off[0..n] rises (non-strictly) from 0 to total, else 0. */
int dyn_offsets_ok(const int64_t *off, int64_t n, int64_t total) {
    int ok = off[0] == 0 && off[n] == total;
    for (int64_t i = 0; i < n; i++) ok &= off[i] <= off[i + 1];
    return ok;
}

/* The pairs of a MoE assignment grouped by expert, stably (a counting sort; what fused_moe's
 * torch.bincount + argsort(stable) + gathers compute): expert_off [E + 1] (expert e owns sorted
 * pairs expert_off[e]..[e+1]-1), order [P] (pair id of each sorted pair), sorted_tok [P] and
 * sorted_w [P] (its token and weight). Expert ids must lie in [0, E). */
void dyn_moe_group(const int64_t *expert_ids, const int64_t *token_ids, const float *weights, int64_t P, int64_t E,
                   int64_t *expert_off, int64_t *order, int64_t *sorted_tok, float *sorted_w) {
    memset(expert_off, 0, sizeof(int64_t) * (size_t)(E + 1));
    for (int64_t p = 0; p < P; p++) expert_off[expert_ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) expert_off[e + 1] += expert_off[e];
    for (int64_t p = 0; p < P; p++) { /* expert_off[e] walks to expert_off[e + 1] ... */
        const int64_t dst = expert_off[expert_ids[p]]++;
        order[dst] = p;
        sorted_tok[dst] = token_ids[p];
        sorted_w[dst] = weights[p];
    }
    for (int64_t e = E; e > 0; e--) expert_off[e] = expert_off[e - 1]; /* ... so shift it back */
    expert_off[0] = 0;
}

/* Neox rotary (rotate halves) of x [T, H, D] (row stride ldt elements between tokens, heads
 * contiguous: head h of token t at x + t * ldt + h * D) by cos/sin [T, R] as RotaryEmbedding lays
 * them out (cos = [c, c], sin = [-s, s]) -> out [T, H, D] contiguous; dims R..D-1 pass through.
 * out_i = x_i * cos_i + x_{i +- R/2} * sin_i with both products rounded before the add, as the torch
 * reference (`rope_ref.apply_rope_ref`) computes it: no FMA contraction here. */
__attribute__((optimize("fp-contract=off"))) void dyn_rope_f32(const float *x, int64_t ldt, const float *cos,
                                                                const float *sin, float *out, int64_t T, int64_t H,
                                                                int64_t D, int64_t R) {
    const int64_t half = R / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * R, *s = sin + t * R;
        for (int64_t h = 0; h < H; h++) {
            const float *xh = x + t * ldt + h * D;
            float *o = out + (t * H + h) * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = xh[i] * c[i], b = xh[i + half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = half; i < R; i++) {
                const float a = xh[i] * c[i], b = xh[i - half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = R; i < D; i++) o[i] = xh[i];
        }
    }
}

/* bfloat16: each product and the sum rounded to bfloat16, as torch's bfloat16 mul/add store them. */
void dyn_rope_bf16(const uint16_t *x, int64_t ldt, const uint16_t *cos, const uint16_t *sin, uint16_t *out,
                   int64_t T, int64_t H, int64_t D, int64_t R) {
    const int64_t half = R / 2;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + t * R, *s = sin + t * R;
        for (int64_t h = 0; h < H; h++) {
            const uint16_t *xh = x + t * ldt + h * D;
            uint16_t *o = out + (t * H + h) * D;
            for (int64_t i = 0; i < R; i++) {
                const int64_t j = i < half ? i + half : i - half;
                const float a = round_bf16(bf16_to_f32(xh[i]) * bf16_to_f32(c[i]));
                const float b = round_bf16(bf16_to_f32(xh[j]) * bf16_to_f32(s[i]));
                o[i] = f32_to_bf16(a + b);
            }
            for (int64_t i = R; i < D; i++) o[i] = xh[i];
        }
    }
}

/* New K/V rows into the paged cache (write_kv_ref): key/value [T, Hkv, D] with row strides ldk/ldv
 * (elements of `esize` bytes between tokens, each token's Hkv * D elements contiguous) to slots
 * slot_mapping [T] of kc/vc [num_slots, Hkv, D]; slots < 0 are skipped. 0, or -1 when a slot is
 * >= num_slots (nothing written then). */
int dyn_write_kv(const char *key, int64_t ldk, const char *value, int64_t ldv, char *kc, char *vc,
                 const int64_t *slots, int64_t T, int64_t row, int64_t num_slots, int64_t esize) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] >= num_slots) return -1;
    const size_t bytes = (size_t)(row * esize);
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        memcpy(kc + slots[t] * (int64_t)bytes, key + t * ldk * esize, bytes);
        memcpy(vc + slots[t] * (int64_t)bytes, value + t * ldv * esize, bytes);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Routing selection (dynserve/routing/policies.py's general path, for CPU tensors): per token, the
 * experts a RoutingConfig keeps and their weights, as token-major (token, expert, weight) pairs.
 *
 * scores [T, E]: probabilities (softmax routers) or unbiased scores (group-limited routers); choice
 * [T, E] (NULL: scores) ranks the experts (group-limited: scores + selection bias, -inf for steered-out
 * experts). With n_group > 1 and topk_group < n_group only the best topk_group groups are allowed (a
 * group scores the sum of its two best choices when group_sigmoid, else its best). Experts are taken
 * in rank order (choice descending, ties by lower id) while the token's policy keeps them, clamped to
 * [lo, hi] of its config (cfg_index [T], NULL: config 0 for all):
 *   0 top_k: k;  1 top_p: rank i while the sum of the q ranked before it < p;  2 threshold: q >= thr;
 *   3 relative: q >= thr * q_max;  4 entropy: k = ent_k[#(ent_thr <= H)], H = -sum q log q.
 * q = scores (grouped == 0), or scores / (sum over the allowed experts) (grouped == 1, whose top_p
 * "before" is cumsum(q) - q as the torch path computes it). Weights: grouped == 0: s, divided by
 * max(sum of kept s, FLT_MIN) when renorm; grouped == 1: s / (renorm ? sum of kept s + 1e-20 : 1) *
 * scale. Outputs offsets [T+1], tok/ids/w [T*E] (compacted to the first P); returns P.
 * ------------------------------------------------------------------------------------------- */
static int64_t route_token(const float *s, const float *c, int64_t E, int64_t n_group, int64_t topk_group,
                           int group_sigmoid, int grouped, int32_t policy, int64_t k, float p, float thr,
                           int64_t lo, int64_t hi, int32_t renorm, const float *e_thr, const int64_t *e_k,
                           int64_t e_n, float scale, int64_t *ids, float *w, unsigned char *avail) {
    for (int64_t e = 0; e < E; e++) avail[e] = 1;
    if (n_group > 1 && topk_group < n_group) {
        int64_t gs = E / n_group;
        float gscore[256];
        unsigned char gtaken[256];
        for (int64_t g = 0; g < n_group; g++) {
            const float *cg = c + g * gs;
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int64_t j = 0; j < gs; j++) {
                float v = cg[j];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            gscore[g] = group_sigmoid ? (gs >= 2 ? b1 + b2 : b1) : b1;
            gtaken[g] = 0;
        }
        for (int64_t r = 0; r < topk_group; r++) {
            int64_t best = -1;
            for (int64_t g = 0; g < n_group; g++)
                if (!gtaken[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            gtaken[best] = 1;
        }
        for (int64_t g = 0; g < n_group; g++)
            if (!gtaken[g]) for (int64_t j = 0; j < gs; j++) avail[g * gs + j] = 0;
    }
    int64_t A = 0;
    float total = 0.0f;  /* grouped: sum of the allowed scores */
    for (int64_t e = 0; e < E; e++) if (avail[e]) { A++; if (grouped) total += s[e]; }
    float inv_den = 1.0f;
    if (grouped) inv_den = total > FLT_MIN ? total : FLT_MIN;
    /* threshold / relative count the allowed experts that pass (the torch path's count, which then
       keeps that many best-ranked: not the same experts when a selection bias reorders them) */
    if (policy >= 2) {
        float qmax = 0.0f, H = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            if (!avail[e]) continue;
            float q = grouped ? s[e] / inv_den : s[e];
            if (q > qmax) qmax = q;
            if (q > 0.0f) H -= q * logf(q > FLT_MIN ? q : FLT_MIN);
        }
        if (policy == 4) {
            int64_t i = 0;
            while (i < e_n && e_thr[i] <= H) i++;
            k = e_k[i];
        } else {
            float bound = policy == 2 ? thr : thr * qmax;
            k = 0;
            for (int64_t e = 0; e < E; e++)
                if (avail[e] && (grouped ? s[e] / inv_den : s[e]) >= bound) k++;
        }
    }
    if (hi > A) hi = A;
    if (lo > hi) lo = hi;
    int64_t n = 0;
    float before = 0.0f, csum = 0.0f;
    while (n < hi) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (avail[e] && (best < 0 || c[e] > c[best])) best = e;
        if (best < 0) break;
        float q = grouped ? s[best] / inv_den : s[best];
        int keep;
        if (policy == 1) {
            if (grouped) { csum += q; before = csum - q; }
            keep = before < p;
            if (!grouped) before += q;
        } else {
            keep = n < k;
        }
        if (!keep && n >= lo) break;
        avail[best] = 0;
        ids[n] = best;
        w[n] = s[best];
        n++;
    }
    if (grouped) {
        float den = 1.0f;
        if (renorm) { float sum = 0.0f; for (int64_t i = 0; i < n; i++) sum += w[i]; den = sum + 1e-20f; }
        for (int64_t i = 0; i < n; i++) w[i] = (w[i] / den) * scale;
    } else if (renorm) {
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) sum += w[i];
        if (sum < FLT_MIN) sum = FLT_MIN;
        for (int64_t i = 0; i < n; i++) w[i] = w[i] / sum;
    }
    return n;
}

int64_t dyn_route(const float *scores, const float *choice, int64_t T, int64_t E, int64_t n_group,
                  int64_t topk_group, int32_t group_sigmoid, int32_t grouped, const int64_t *cfg_index,
                  const int32_t *policy, const int64_t *kk, const float *pp, const float *thr, const int64_t *lo,
                  const int64_t *hi, const int32_t *renorm, const int64_t *ent_off, const float *ent_thr,
                  const int64_t *ent_k, float scale, int64_t *offsets, int64_t *tok, int64_t *ids, float *w) {
    if (E > 4096 || n_group > 256) return -1;
    int64_t *counts = offsets + 1;
#pragma omp parallel for schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        unsigned char avail[4096];
        int64_t ci = cfg_index ? cfg_index[t] : 0;
        const float *s = scores + t * E;
        const float *c = choice ? choice + t * E : s;
        int64_t o = ent_off[ci];
        counts[t] = route_token(s, c, E, n_group, topk_group, group_sigmoid, grouped, policy[ci], kk[ci], pp[ci],
                                thr[ci], lo[ci], hi[ci], renorm[ci], ent_thr + o, ent_k + o + ci,
                                ent_off[ci + 1] - o, scale, ids + t * E, w + t * E, avail);
    }
    offsets[0] = 0;
    for (int64_t t = 0; t < T; t++) offsets[t + 1] += offsets[t];
    for (int64_t t = 0; t < T; t++) {  /* compact token-major (in place: destinations never pass sources) */
        int64_t n = offsets[t + 1] - offsets[t], dst = offsets[t], src = t * E;
        for (int64_t j = 0; j < n; j++) {
            ids[dst + j] = ids[src + j];
            w[dst + j] = w[src + j];
            tok[dst + j] = t;
        }
    }
    return offsets[T];
}

/* ---------------------------------------------------------------------------------------------
 * One decode attention block (Llama/Mixtral attention: no q/k norm, no clipping, no sinks, no
 * window, no projection biases), the calls the Python layer would make, in one native call:
 *
 *   xn = rmsnorm(x; in_w)                        x [T, H] (the residual stream)
 *   qkv = xn @ w_qkv^T                           w_qkv [(Hq + 2 Hkv) D, H]
 *   q, k = rope(q), rope(k)                      cos/sin [T, R]
 *   kv cache[slots] = k, v                       kc/vc [num_slots, Hkv, D]
 *   o = paged decode attention(q)                one query per sequence (T = B)
 *   h = x + o @ w_o^T; y = rmsnorm(h; post_w)    w_o [H, Hq D]
 *
 * Each step is the kernel the separate calls use (so the results are bit-identical to them); the
 * intermediates live in a grow-only buffer of the calling thread. Returns 0; -1 when a slot lies
 * past the cache (nothing written, as dyn_write_kv); -2 when out of memory.
 * ------------------------------------------------------------------------------------------- */
static void *scratch_block(size_t bytes) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    if (bytes > cap) {
        free(buf);
        buf = malloc(bytes);
        cap = buf ? bytes : 0;
    }
    return buf;
}

#define ATTN_BLOCK_ARGS                                                                                     \
    int64_t T, int64_t H, int64_t Hq, int64_t Hkv, int64_t D, int64_t R, float in_eps, float post_eps,       \
        const int64_t *slots, int64_t num_slots, const int64_t *block_tables, int64_t max_blocks,           \
        const int64_t *seq_lens, int64_t bs, float scale, int64_t num_threads

int dyn_attn_block_f32(const float *x, const float *in_w, const float *w_qkv, const float *cos, const float *sin,
                       float *kc, float *vc, const float *w_o, const float *post_w, float *y, float *h,
                       ATTN_BLOCK_ARGS) {
    const int64_t NQKV = (Hq + 2 * Hkv) * D, QD = Hq * D;
    float *xn = (float *)scratch_block(sizeof(float) * (size_t)(T * (H + NQKV + QD + Hkv * D + QD + H)));
    if (!xn) return -2;
    float *qkv = xn + T * H, *q = qkv + T * NQKV, *k = q + T * QD, *o = k + T * Hkv * D, *a = o + T * QD;
    dyn_rmsnorm_f32(x, NULL, in_w, xn, NULL, T, H, in_eps);
    dyn_gemm_nt_f32(xn, H, w_qkv, H, T, NQKV, qkv, NQKV, num_threads);
    dyn_rope_f32(qkv, NQKV, cos, sin, q, T, Hq, D, R);
    dyn_rope_f32(qkv + QD, NQKV, cos, sin, k, T, Hkv, D, R);
    if (dyn_write_kv((const char *)k, Hkv * D, (const char *)(qkv + QD + Hkv * D), NQKV, (char *)kc, (char *)vc,
                     slots, T, Hkv * D, num_slots, (int64_t)sizeof(float)) != 0)
        return -1;
    if (dyn_paged_decode_f32(q, kc, vc, block_tables, max_blocks, seq_lens, T, Hq, Hkv, D, bs, scale, NULL, 0, o,
                             num_threads) != 0)
        return -2;
    dyn_gemm_nt_f32(o, QD, w_o, QD, T, H, a, H, num_threads);
    dyn_rmsnorm_f32(x, a, post_w, y, h, T, H, post_eps);
    return 0;
}

int dyn_attn_block_bf16(const uint16_t *x, const uint16_t *in_w, const uint16_t *w_qkv, const uint16_t *cos,
                        const uint16_t *sin, uint16_t *kc, uint16_t *vc, const uint16_t *w_o, const uint16_t *post_w,
                        uint16_t *y, uint16_t *h, ATTN_BLOCK_ARGS) {
    const int64_t NQKV = (Hq + 2 * Hkv) * D, QD = Hq * D;
    uint16_t *xn = (uint16_t *)scratch_block(sizeof(uint16_t) * (size_t)(T * (H + NQKV + QD + Hkv * D + QD + H)));
    if (!xn) return -2;
    uint16_t *qkv = xn + T * H, *q = qkv + T * NQKV, *k = q + T * QD, *o = k + T * Hkv * D, *a = o + T * QD;
    dyn_rmsnorm_bf16(x, NULL, in_w, xn, NULL, T, H, in_eps);
    if (dyn_gemm_nt_bf16(xn, H, w_qkv, H, T, NQKV, qkv, NQKV, NULL, num_threads) != 0) return -2;
    dyn_rope_bf16(qkv, NQKV, cos, sin, q, T, Hq, D, R);
    dyn_rope_bf16(qkv + QD, NQKV, cos, sin, k, T, Hkv, D, R);
    if (dyn_write_kv((const char *)k, Hkv * D, (const char *)(qkv + QD + Hkv * D), NQKV, (char *)kc, (char *)vc,
                     slots, T, Hkv * D, num_slots, (int64_t)sizeof(uint16_t)) != 0)
        return -1;
    if (dyn_paged_decode_bf16(q, kc, vc, block_tables, max_blocks, seq_lens, T, Hq, Hkv, D, bs, scale, NULL, 0, o,
                              num_threads) != 0)
        return -2;
    if (dyn_gemm_nt_bf16(o, QD, w_o, QD, T, H, a, H, NULL, num_threads) != 0) return -2;
    dyn_rmsnorm_bf16(x, a, post_w, y, h, T, H, post_eps);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * One decode MoE block (a softmax router without groups, selection bias, steering or shared experts;
 * routed experts without biases), the calls the Python layer would make, in one native call:
 *
 *   logits = y @ w_router^T                      y [T, H] (the normed residual), w_router [E, H]
 *   q = softmax(logits) in float32               a NaN / +inf logit: the token's q are all 0
 *   pairs = each token's RoutingConfig (dyn_route's rules, cfg_index / table as dyn_route)
 *   out = h + fused MoE over the pairs           h [T, H] (the residual stream)
 *
 * The router GEMM and the expert kernels are the ones the separate calls use; the softmax is libm's
 * expf, so probabilities (and weights) agree with torch's to float32 rounding, not bit for bit. The
 * checkpoint's top_k (policy 0) must pick the experts torch.topk picks: where a token's last picked
 * and best unpicked probabilities lie within 4e-6 (relative) of each other, which expert torch.topk
 * takes is decided by its rounding and tie order, so the call returns -1 before the experts run and
 * the caller routes the layer op by op. Otherwise returns P (pairs, token-major as dyn_route) and
 * fills offsets [T+1], tok/ids/w [T*E] (first P used), token_counts [T], expert_counts [E] and
 * out [T, H]; -2 when out of memory.
 * ------------------------------------------------------------------------------------------- */
#define MOE_BLOCK_ARGS                                                                                      \
    int64_t T, int64_t H, int64_t E, int64_t I, const int64_t *cfg_index, const int32_t *policy,            \
        const int64_t *kk, const float *pp, const float *thr, const int64_t *lo, const int64_t *hi,          \
        const int32_t *renorm, const int64_t *ent_off, const float *ent_thr, const int64_t *ent_k,           \
        int64_t *offsets, int64_t *tok, int64_t *ids, float *w, int64_t *token_counts, int64_t *expert_counts, \
        int64_t num_threads

/* probs [T, E] from float32 logits; then routing into offsets/tok/ids/w. Returns P or -1 (an
 * ambiguous top_k token). */
static int64_t moe_block_route(float *probs, int64_t T, int64_t E, const int64_t *cfg_index, const int32_t *policy,
                               const int64_t *kk, const float *pp, const float *thr, const int64_t *lo,
                               const int64_t *hi, const int32_t *renorm, const int64_t *ent_off,
                               const float *ent_thr, const int64_t *ent_k, int64_t *offsets, int64_t *tok,
                               int64_t *ids, float *w, int64_t *token_counts) {
    int ambiguous = 0;
    int64_t *counts = offsets + 1;
#pragma omp parallel for schedule(static) if (T >= 64) reduction(| : ambiguous)
    for (int64_t t = 0; t < T; t++) {
        unsigned char avail[4096];
        float *q = probs + t * E;
        float m = -INFINITY;
        int bad = 0;
        for (int64_t e = 0; e < E; e++) {
            bad |= isnan(q[e]);
            if (q[e] > m) m = q[e];
        }
        if (bad || m == INFINITY) {
            for (int64_t e = 0; e < E; e++) q[e] = 0.0f;
        } else {
            float s = 0.0f;
            for (int64_t e = 0; e < E; e++) s += (q[e] = expf(q[e] - m));
            for (int64_t e = 0; e < E; e++) q[e] = q[e] / s;
        }
        const int64_t ci = cfg_index ? cfg_index[t] : 0;
        const int64_t o = ent_off[ci];
        const int64_t n = route_token(q, q, E, 1, 1, 0, 0, policy[ci], kk[ci], pp[ci], thr[ci], lo[ci], hi[ci],
                                      renorm[ci], ent_thr + o, ent_k + o + ci, ent_off[ci + 1] - o, 1.0f,
                                      ids + t * E, w + t * E, avail);
        counts[t] = n;
        if (policy[ci] == 0 && n > 0 && n < E) {
            const float last = q[ids[t * E + n - 1]];
            float next = -1.0f;
            for (int64_t e = 0; e < E; e++)
                if (avail[e] && q[e] > next) next = q[e];
            if (last - next <= 4e-6f * last) ambiguous = 1;
        }
    }
    if (ambiguous) return -1;
    offsets[0] = 0;
    for (int64_t t = 0; t < T; t++) {
        token_counts[t] = offsets[t + 1];
        offsets[t + 1] += offsets[t];
    }
    for (int64_t t = 0; t < T; t++) { /* compact token-major, as dyn_route */
        const int64_t n = offsets[t + 1] - offsets[t], dst = offsets[t], src = t * E;
        for (int64_t j = 0; j < n; j++) {
            ids[dst + j] = ids[src + j];
            w[dst + j] = w[src + j];
            tok[dst + j] = t;
        }
    }
    return offsets[T];
}

/* The expert half: group the P pairs by expert and run the fused MoE into moe_out via `run`. */
static int64_t *moe_block_group(int64_t P, int64_t E, const int64_t *tok, const int64_t *ids, const float *w,
                                int64_t *expert_counts, float **sorted_w_out, size_t extra_bytes, void **extra) {
    char *buf = (char *)scratch_block(sizeof(int64_t) * (size_t)(E + 1 + 2 * P) + sizeof(float) * (size_t)P +
                                      extra_bytes + 64);
    if (!buf) return NULL;
    int64_t *idx = (int64_t *)buf; /* expert_off [E + 1], order [P], sorted_tok [P] */
    float *sorted_w = (float *)(idx + E + 1 + 2 * P);
    *extra = (void *)(((uintptr_t)(sorted_w + P) + 63) & ~(uintptr_t)63);
    dyn_moe_group(ids, tok, w, P, E, idx, idx + E + 1, idx + E + 1 + P, sorted_w);
    for (int64_t e = 0; e < E; e++) expert_counts[e] = idx[e + 1] - idx[e];
    *sorted_w_out = sorted_w;
    return idx;
}

int64_t dyn_moe_block_f32(const float *y, const float *h, const float *w_router, const float *w13, const float *w2,
                          float *out, MOE_BLOCK_ARGS) {
    if (E > 4096) return -2;
    float *probs = (float *)scratch_block(sizeof(float) * (size_t)(T * E > 0 ? T * E : 1)); /* [T, E] */
    if (!probs) return -2;
    dyn_gemm_nt_f32(y, H, w_router, H, T, E, probs, E, num_threads); /* logits, then probabilities */
    const int64_t P = moe_block_route(probs, T, E, cfg_index, policy, kk, pp, thr, lo, hi, renorm, ent_off, ent_thr,
                                      ent_k, offsets, tok, ids, w, token_counts);
    if (P < 0) return -1;
    float *sorted_w;
    void *extra;
    int64_t *idx = moe_block_group(P, E, tok, ids, w, expert_counts, &sorted_w, sizeof(float) * (size_t)(P * H),
                                   &extra);
    if (!idx) return -2;
    if (dyn_moe_f32(y, T, H, w13, w2, E, I, idx + E + 1 + P, sorted_w, idx + E + 1, idx, offsets, (float *)extra,
                    out, num_threads) != 0)
        return -2;
    for (int64_t i = 0; i < T * H; i++) out[i] = h[i] + out[i];
    return P;
}

int64_t dyn_moe_block_bf16(const uint16_t *y, const uint16_t *h, const uint16_t *w_router, const uint16_t *w13,
                           const uint16_t *w2, uint16_t *out, MOE_BLOCK_ARGS) {
    if (E > 4096) return -2;
    const size_t n = (size_t)(T * E > 0 ? T * E : 1);
    float *probs = (float *)scratch_block(sizeof(float) * n + sizeof(uint16_t) * n); /* [T, E] each */
    if (!probs) return -2;
    uint16_t *logits = (uint16_t *)(probs + n);
    if (dyn_gemm_nt_bf16(y, H, w_router, H, T, E, logits, E, NULL, num_threads) != 0) return -2;
    for (int64_t i = 0; i < T * E; i++) probs[i] = bf16_to_f32(logits[i]); /* the bfloat16 logits, widened */
    const int64_t P = moe_block_route(probs, T, E, cfg_index, policy, kk, pp, thr, lo, hi, renorm, ent_off, ent_thr,
                                      ent_k, offsets, tok, ids, w, token_counts);
    if (P < 0) return -1;
    float *sorted_w;
    void *extra;
    int64_t *idx = moe_block_group(P, E, tok, ids, w, expert_counts, &sorted_w, sizeof(float) * (size_t)(P * H),
                                   &extra);
    if (!idx) return -2;
    if (dyn_moe_bf16(y, T, H, w13, w2, E, I, idx + E + 1 + P, sorted_w, idx + E + 1, idx, offsets, (float *)extra,
                     out, num_threads) != 0)
        return -2;
    for (int64_t i = 0; i < T * H; i++) out[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(out[i]));
    return P;
}

/* ---------------------------------------------------------------------------------------------
 * A decode step's layers [fused attention block, fused MoE block] x L in one native call, for models
 * whose every layer is both (dyn_attn_block_* then dyn_moe_block_*; the same kernels, so the same
 * results as calling them layer by layer). x [T, H] is the residual stream in and out; y/h [T, H] are
 * the last layer's normed input to its MoE block and its residual (for the caller's fallback).
 * lp [L, 9]: per layer the addresses of in_w, w_qkv, kc, vc, w_o, post_w, w_router, w13, w2; tp [L, 10]:
 * per layer the addresses of its routing table (cfg_index aside, dyn_route's tables in order). Per-layer
 * routing outputs at offsets [L, T+1], tok/ids/w [L, T*E], token_counts [L, T], expert_counts [L, E],
 * pairs [L]. Runs layers l0.. and returns L when all ran; l when layer l's routing was ambiguous
 * (its attention ran; y and h hold its MoE inputs: the caller runs that MoE op by op and calls again
 * from l + 1); -1 when a slot lies past the cache; -2 when out of memory.
 * ------------------------------------------------------------------------------------------- */
#define DECODE_LAYERS_ARGS                                                                                  \
    const int64_t *lp, const int64_t *tp, int64_t l0, int64_t L, int64_t T, int64_t H, int64_t Hq,          \
        int64_t Hkv, int64_t D, int64_t R, float in_eps, float post_eps, const int64_t *slots,               \
        int64_t num_slots, const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens,        \
        int64_t bs, float scale, int64_t E, int64_t I, const int64_t *cfg_index, int64_t *offsets,           \
        int64_t *tok, int64_t *ids, float *w, int64_t *token_counts, int64_t *expert_counts, int64_t *pairs, \
        int64_t num_threads

#define DECODE_LAYERS_BODY(T_, ATTN, MOE)                                                                   \
    for (int64_t l = l0; l < L; l++) {                                                                      \
        const int64_t *p = lp + l * 9, *t = tp + l * 10;                                                    \
        int st = ATTN(x, (const T_ *)p[0], (const T_ *)p[1], cos, sin, (T_ *)p[2], (T_ *)p[3],            \
                      (const T_ *)p[4], (const T_ *)p[5], y, h, T, H, Hq, Hkv, D, R, in_eps, post_eps, slots,  \
                      num_slots, block_tables, max_blocks, seq_lens, bs, scale, num_threads);               \
        if (st != 0) return st == -1 ? -1 : -2;                                                             \
        const int64_t P = MOE(y, h, (const T_ *)p[6], (const T_ *)p[7], (const T_ *)p[8], x, T, H, E, I,     \
                              cfg_index, (const int32_t *)t[0], (const int64_t *)t[1], (const float *)t[2],   \
                              (const float *)t[3], (const int64_t *)t[4], (const int64_t *)t[5],             \
                              (const int32_t *)t[6], (const int64_t *)t[7], (const float *)t[8],             \
                              (const int64_t *)t[9], offsets + l * (T + 1), tok + l * T * E, ids + l * T * E, \
                              w + l * T * E, token_counts + l * T, expert_counts + l * E, num_threads);      \
        if (P == -1) return l;                                                                              \
        if (P < 0) return -2;                                                                               \
        pairs[l] = P;                                                                                       \
    }                                                                                                       \
    return L;

int64_t dyn_decode_layers_f32(float *x, float *y, float *h, const float *cos, const float *sin,
                              DECODE_LAYERS_ARGS) {
    DECODE_LAYERS_BODY(float, dyn_attn_block_f32, dyn_moe_block_f32)
}

int64_t dyn_decode_layers_bf16(uint16_t *x, uint16_t *y, uint16_t *h, const uint16_t *cos, const uint16_t *sin,
                               DECODE_LAYERS_ARGS) {
    DECODE_LAYERS_BODY(uint16_t, dyn_attn_block_bf16, dyn_moe_block_bf16)
}
