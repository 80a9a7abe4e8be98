/* y = x W^T * scale + bias for W int8 [N, K] (one scale per output row) and x float32 [M, K]:
 * kaki's int8 product for CPUs with AVX512-VNNI (kaki/native.py builds and loads this
 * file; docs/quantization.md has the measurements that made it worth writing).
 *
 * Why our own: fbgemm's dynamic int8 GEMM (what quantize_dynamic runs) rounds the activations to
 * 8 bits per tensor, which changes 6 of 50 of the demo model's greedy answers; kaki's workaround
 * around it (two 8-bit row blocks) costs several elementwise torch ops per layer, which is most
 * of what a decode step spends beyond reading the weights. PyTorch's weight-only int8 CPU kernel
 * is several times slower beyond a few rows, and widening int8 to float in registers (exact) is
 * compute-bound at a third of memory bandwidth on this CPU.
 *
 * Here each activation row is quantized on its own to 16 bits (symmetric: x = s (q - 32768),
 * q in [1, 65535]) and split into a high and a low byte; VNNI's vpdpbusd multiplies 64 unsigned
 * activation bytes by 64 signed weight bytes per instruction, so two instructions (high, low)
 * per 64 weights and row give sum_k q_k w_k exactly in integers:
 *     x . w = s (256 H + L - 32768 sum_k w_k),
 * with the weight row sums computed once per layer. The only rounding is x to 16 bits per row
 * (relative error ~2^-16 of the row's largest value), against 2^-8 per tensor for fbgemm's.
 *
 * Threads come from OpenMP: the library links the libgomp that PyTorch has already loaded (same
 * soname), so its parallel regions run on torch's own worker threads, which are already spinning
 * between ops, instead of waking a pool of their own.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "kaki's int8 kernel needs AVX512F, AVX512BW and AVX512-VNNI (fbgemm's kernel is used without them)"
#endif

/* Blocking. One activation row (decode at batch 1, where the weight streams from memory): one
 * weight row at a time, U1 steps of 64 inputs unrolled, so each thread reads the weight as a
 * single sequential stream, which the hardware prefetcher follows best (four interleaved rows
 * streamed ~25% slower); on the 1B benchmark model this reads ~90% of torch's own streaming-sum
 * bandwidth. Several rows: NB weight rows x MB activation rows per register block (2 x 3 x 4 =
 * 24 accumulators, 4 weight and 2 activation vectors of the 32 zmm registers), so each load feeds
 * 3-6 vpdpbusd; of 1x8, 2x4, 2x6, 4x2, 3x4 and 4x3, 3x4 was fastest at 8 rows (13% over 2x4) and
 * for prompts (16%). A thread takes TILE output rows at a time: a tile's weight (TILE * K bytes,
 * 1 MB at K = 16384) stays in L2 while every activation row block passes over it, so a prompt
 * reads each weight from memory once. */
#define U1 4
#ifndef NB
#define NB 4
#endif
#ifndef MB
#define MB 3
#endif
#define NV ((2 * MB * NB + 15) / 16 * 16) /* accumulators of a block, in whole reduce16s */
#define TILE 64
#define L1_BYTES (40 * 1024)
#define ZERO 32768

/* Row m of x to 16-bit codes, split into bytes: hi/lo rows of Kp bytes (zero beyond K). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, uint8_t *hi, uint8_t *lo,
                          float *step) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        __m512 vmax = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
        float amax = _mm512_reduce_max_ps(vmax);
        for (; k < K; k++) amax = r[k] > amax ? r[k] : (-r[k] > amax ? -r[k] : amax);
        const float s = amax > 0 ? amax / 32767.0f : 1.0f, inv = 1.0f / s;
        step[m] = s;
        uint8_t *h = hi + m * Kp, *l = lo + m * Kp;
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i vzero = _mm512_set1_epi32(ZERO), mask = _mm512_set1_epi32(255);
        for (k = 0; k + 16 <= K; k += 16) {
            /* Round to nearest (the default MXCSR mode); |x| <= amax keeps q in [1, 65535]. */
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + k), vinv)), vzero);
            _mm_storeu_si128((__m128i *)(h + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 8)));
            _mm_storeu_si128((__m128i *)(l + k), _mm512_cvtepi32_epi8(_mm512_and_si512(q, mask)));
        }
        for (; k < K; k++) {
            int q = (int)__builtin_lrintf(r[k] * inv) + ZERO;
            h[k] = (uint8_t)(q >> 8);
            l[k] = (uint8_t)(q & 255);
        }
        memset(h + K, 0, Kp - K);
        memset(l + K, 0, Kp - K);
    }
}

/* acc += the products of a's unsigned bytes with b's signed bytes, summed in fours. In inline asm
 * because GCC 12 copies the accumulator to a fresh register and back around every
 * _mm512_dpbusd_epi32 in a loop (a third of dot_block's instructions were such moves). */
static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* The H and L lane sums of one activation row against one weight row: out[0], out[1]. Bytes
 * beyond K are masked off the weight's loads (no read past the matrix) and zero in the
 * activations. */
static inline void dot_row(const uint8_t *hi, const uint8_t *lo, int64_t K, const int8_t *w, __m512i *out) {
    __m512i ah[U1], al[U1];
    for (int u = 0; u < U1; u++) ah[u] = al[u] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 * U1 <= K; k += 64 * U1)
        for (int u = 0; u < U1; u++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + k + 64 * u));
            ah[u] = dpbusd(ah[u], _mm512_loadu_si512((const void *)(hi + k + 64 * u)), wv);
            al[u] = dpbusd(al[u], _mm512_loadu_si512((const void *)(lo + k + 64 * u)), wv);
        }
    for (; k < K; k += 64) {
        const __mmask64 take = K - k >= 64 ? ~0ULL : (~0ULL) >> (64 - (K - k));
        const __m512i wv = _mm512_maskz_loadu_epi8(take, w + k);
        ah[0] = dpbusd(ah[0], _mm512_loadu_si512((const void *)(hi + k)), wv);
        al[0] = dpbusd(al[0], _mm512_loadu_si512((const void *)(lo + k)), wv);
    }
    for (int u = 1; u < U1; u++) {
        ah[0] = _mm512_add_epi32(ah[0], ah[u]);
        al[0] = _mm512_add_epi32(al[0], al[u]);
    }
    out[0] = ah[0];
    out[1] = al[0];
}

/* One step of 64 inputs for dot_block: weight vectors wv[NB] against activation rows m < mb. */
#define BLOCK_STEP(k, wv)                                                                           \
    for (int m = 0; m < mb; m++) {                                                                  \
        const __m512i h = _mm512_loadu_si512((const void *)(hi + m * Kp + (k)));                    \
        const __m512i l = _mm512_loadu_si512((const void *)(lo + m * Kp + (k)));                    \
        for (int j = 0; j < NB; j++) {                                                              \
            ah[m][j] = dpbusd(ah[m][j], h, wv[j]);                                     \
            al[m][j] = dpbusd(al[m][j], l, wv[j]);                                     \
        }                                                                                           \
    }

/* The H and L lane sums of activation rows m < mb (a constant once inlined, so the loops unroll
 * and the accumulators stay in registers) against weight rows w[0 .. NB): out[(m NB + j) 2 + 0/1].
 * The main loop has no branch (one in it made GCC shuffle the accumulators through memory). */
static inline __attribute__((always_inline)) void dot_block(const uint8_t *hi, const uint8_t *lo, int64_t Kp,
                                                            int64_t K, const int mb, const int8_t *const w[NB],
                                                            __m512i *out) {
    __m512i ah[MB][NB], al[MB][NB], wv[NB];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) ah[m][j] = al[m][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int j = 0; j < NB; j++) {
            /* The next block's rows, at the same offset, into L2: four interleaved streams are
             * more than the hardware prefetcher keeps ahead of. Into L1 (T0) it was 1.5x faster
             * than none at 2 rows from memory; into L2 (T1) another 1.2-1.25x at 2 and 8 rows and
             * 1.15x for prompts, as it no longer evicts the activations from L1. */
            _mm_prefetch((const char *)(w[j] + NB * K + k), _MM_HINT_T1);
            wv[j] = _mm512_loadu_si512((const void *)(w[j] + k));
        }
        BLOCK_STEP(k, wv)
    }
    if (k < K) {
        const __mmask64 take = (~0ULL) >> (64 - (K - k));
        for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_epi8(take, w[j] + k);
        BLOCK_STEP(k, wv)
    }
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) {
            out[(m * NB + j) * 2] = ah[m][j];
            out[(m * NB + j) * 2 + 1] = al[m][j];
        }
}

/* Lane i of the result = the sum of v[i]'s 16 lanes: 45 instructions for 16 sums, where one
 * _mm512_reduce_add_epi32 each takes ~10 in a dependent chain (at 2048 inputs a row, single
 * reductions were a third of the time at 8 rows). */
static inline __m512i reduce16(const __m512i v[16]) {
    __m512i t[8], s[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the partial sums of v[4i .. 4i+3] */
        s[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    /* Add the four 128-bit lanes of each s[i] and put s[i]'s totals in lane group i. */
    const __m512i p0 = _mm512_add_epi32(_mm512_shuffle_i32x4(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                        _mm512_shuffle_i32x4(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512i p1 = _mm512_add_epi32(_mm512_shuffle_i32x4(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                        _mm512_shuffle_i32x4(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* y[m, n] from the reduced sums H and L: one rounding of dot * (step * scale), whose factor is
 * exact in float64 (two floats' product), as in finish4 and int8_kernel_avx2.c, so every path and
 * build gives the same float for the same integer sum. */
static inline void finish(int64_t H, int64_t L, int64_t m, int64_t n, const float *step, const float *scale,
                          const int32_t *rowsum, const float *bias, int64_t N, float *y) {
    const int64_t dot = 256 * H + L - (int64_t)ZERO * rowsum[n];
    y[m * N + n] = (float)((double)dot * ((double)step[m] * (double)scale[n])) + (bias ? bias[n] : 0.0f);
}

/* finish() for 4 consecutive outputs y[m, n .. n+3] from 4 (H, L) pairs at sums[0 .. 7], in
 * vectors: the same arithmetic (int64, then float64), without the scalar conversions per output
 * (13-15% faster prompts and 5-10% faster 8-row steps than finish() one output at a time). */
static inline void finish4(const int32_t *sums, int64_t m, int64_t n, const float *step, const float *scale,
                           const int32_t *rowsum, const float *bias, int64_t N, float *y) {
    const __m256i hl = _mm256_loadu_si256((const __m256i *)sums); /* 4 int64: H low, L high */
    const __m256i H = _mm256_srai_epi64(_mm256_slli_epi64(hl, 32), 32), L = _mm256_srai_epi64(hl, 32);
    const __m256i zr = _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)(rowsum + n))), 15);
    const __m256i dot = _mm256_sub_epi64(_mm256_add_epi64(_mm256_slli_epi64(H, 8), L), zr); /* ZERO = 2^15 */
    const __m256d sc = _mm256_mul_pd(_mm256_set1_pd((double)step[m]), _mm256_cvtps_pd(_mm_loadu_ps(scale + n)));
    __m128 v = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtepi64_pd(dot), sc));
    if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + n));
    _mm_storeu_ps(y + m * N + n, v);
}

static void tile(const uint8_t *hi, const uint8_t *lo, const float *step, int64_t M, int64_t K, int64_t Kp,
                 const int8_t *w, const float *scale, const int32_t *rowsum, const float *bias, int64_t N,
                 int64_t n0, int64_t n1, float *y) {
    __m512i v[NV > 16 ? NV : 16];
    int32_t sums[NV > 16 ? NV : 16];
    if (M == 1) {
        /* Eight weight rows' sums per reduce16. */
        for (int64_t n = n0; n < n1; n += 8) {
            const int rows = n1 - n < 8 ? (int)(n1 - n) : 8;
            for (int i = 0; i < rows; i++) dot_row(hi, lo, K, w + (n + i) * K, v + 2 * i);
            for (int i = 2 * rows; i < 16; i++) v[i] = _mm512_setzero_si512();
            _mm512_storeu_si512((void *)sums, reduce16(v));
            /* (finish4 here measured ~5% slower at one row: it is memory-bound anyway.) */
            for (int i = 0; i < rows; i++) finish(sums[2 * i], sums[2 * i + 1], 0, n + i, step, scale, rowsum, bias, N, y);
        }
        return;
    }
    /* Where a block of weight rows and all the activations fit in L1 (decode of a small batch),
     * each weight block meets every activation row while it is there, so the weight streams once
     * in order; otherwise (prompts, or long rows) the whole tile, in L2, meets each activation
     * row block in turn, which stays in L1. */
    const int small = NB * K + 2 * M * Kp <= L1_BYTES;
    const int64_t mstep = small ? M : MB, nstep = small ? NB : n1 - n0;
    for (int64_t mo = 0; mo < M; mo += mstep)
        for (int64_t no = n0; no < n1; no += nstep)
            for (int64_t m0 = mo; m0 < mo + mstep && m0 < M; m0 += MB) {
                const int mb = M - m0 < MB ? (int)(M - m0) : MB;
                for (int64_t n = no; n < no + nstep && n < n1; n += NB) {
                    const int nb = n1 - n < NB ? (int)(n1 - n) : NB;
                    const int8_t *wp[NB];
                    /* A short last block repeats its first row rather than reading past the matrix. */
                    for (int j = 0; j < NB; j++) wp[j] = w + (n + (j < nb ? j : 0)) * K;
                    switch (mb) {
#if MB >= 4
                    case 4: dot_block(hi + m0 * Kp, lo + m0 * Kp, Kp, K, 4, wp, v); break;
#endif
#if MB >= 3
                    case 3: dot_block(hi + m0 * Kp, lo + m0 * Kp, Kp, K, 3, wp, v); break;
#endif
#if MB >= 2
                    case 2: dot_block(hi + m0 * Kp, lo + m0 * Kp, Kp, K, 2, wp, v); break;
#endif
                    default: dot_block(hi + m0 * Kp, lo + m0 * Kp, Kp, K, 1, wp, v); break;
                    }
                    for (int i = 2 * MB * NB; i < NV; i++) v[i] = _mm512_setzero_si512();
                    for (int c = 0; c < NV; c += 16) _mm512_storeu_si512((void *)(sums + c), reduce16(v + c));
                    for (int m = 0; m < mb; m++)
                        if (nb == NB && NB == 4)
                            finish4(sums + m * NB * 2, m0 + m, n, step, scale, rowsum, bias, N, y);
                        else
                            for (int j = 0; j < nb; j++)
                                finish(sums[(m * NB + j) * 2], sums[(m * NB + j) * 2 + 1], m0 + m, n + j, step, scale,
                                   rowsum, bias, N, y);
                }
            }
}

/* x [M, K] float32, w [N, K] int8, scale [N], rowsum [N] (sum of each weight row), bias [N] or
 * NULL, y [M, N]; all contiguous. K <= 65536 keeps the int32 lane sums from overflowing.
 * Returns 0, or -1 if the activation buffer could not be allocated. */
int kaki_int8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                     const int32_t *rowsum, const float *bias, int64_t N, float *y, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64;
    uint8_t *buf = aligned_alloc(64, (size_t)(2 * M * Kp));
    float *step = malloc(sizeof(float) * (size_t)M);
    if (!buf || !step) {
        free(buf);
        free(step);
        return -1;
    }
    quantize_rows(x, M, K, Kp, buf, buf + M * Kp, step);
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tiles > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * TILE, n1 = n0 + TILE < N ? n0 + TILE : N;
        tile(buf, buf + M * Kp, step, M, K, Kp, w, scale, rowsum, bias, N, n0, n1, y);
    }
    free(buf);
    free(step);
    return 0;
}

/* The float32 small-M product rides in the same library (its file says why). */
#include "rows_f32.h"
