/* y = x W^T * scale + bias for W int8 [N, K] (one scale per output row) and x float32 [M, K]:
 * kaki's int8 product for x86 CPUs with AVX2 and no AVX512-VNNI (int8_kernel.c is that one).
 * kaki/native.py builds this file twice, with explicit flags rather than -march=native, so
 * that both builds can be made and tested on any AVX2 machine (AVX-512 ones included):
 *   "avx2":      -mavx2 -mfma              (vpmaddwd + vpaddd)
 *   "avx2-vnni": -mavx2 -mfma -mavxvnni    (AVX-VNNI's 256-bit vpdpwssd: the same in one instruction)
 *
 * Same numerics as the AVX-512 build, to the bit: each activation row is rounded on its own to
 * signed 16-bit codes c = round(x / s), s = amax / 32767 (c in [-32767, 32767], the same codes
 * as int8_kernel.c's q - 32768), and sum_k c_k w_k is computed exactly in integers, then scaled
 * by the same float64 expression. Here the codes need no split into bytes: vpmaddwd multiplies
 * 16 int16 codes by 16 int8 weights sign-extended to int16 (vpmovsxbw) and adds neighbouring
 * pairs into 8 int32 lanes, so one instruction per 16 weights and row (VNNI's vpdpbusd, at
 * 64 bytes, needs two per 64 with the byte split).
 *
 * Why the sums are exact. One vpmaddwd lane is at most 2 * 32767 * 128 = 8,388,352 < 2^23 in
 * size (weights may be -128 though kaki never makes one), so an int32 accumulator holds 256 of
 * them: 2,147,418,112 < 2^31. Each accumulator therefore sees at most CHUNK = 4096 inputs
 * (256 steps of 16) and is then widened into int64 lanes; the K bound is the caller's, 65536
 * (MAX_K in native.py), where the int64 total is < 2^38. vpmaddwd and vpdpwssd (not the
 * saturating vpdpwssds) wrap, which never happens within these bounds.
 *
 * Threads come from OpenMP, linked to the libgomp PyTorch has loaded (see int8_kernel.c).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "this build of kaki's int8 kernel needs AVX2 and FMA (-mavx2 -mfma)"
#endif

/* Blocking, as in int8_kernel.c but for 16 ymm registers. One activation row: one weight row at
 * a time (a single sequential stream per thread), U1 steps of 16 inputs unrolled. Several rows:
 * NB weight rows x MB activation rows per register block: 3 x 3 = 9 accumulators, 3 weight
 * vectors, an activation vector and vpmaddwd's product fit the 16 registers (3 x 4 spills), and
 * each sign-extended weight vector feeds 3 products; 2 x 4, 2 x 5 and 2 x 6 measured the same
 * within noise at 1-32 rows (on the AVX-512 machine, one thread, 2048 x 4096). A thread takes TILE output rows at a time. */
#define U1 4
#ifndef NB
#define NB 3
#endif
#ifndef MB
#define MB 3
#endif
#define TILE 64
#define L1_BYTES (24 * 1024)
#define CHUNK 4096 /* inputs per int32 accumulator before it is widened (see above) */

/* acc += the products of a's and b's int16 lanes, summed in pairs. In inline asm because GCC 12
 * copies accumulators to fresh registers around the intrinsics and then spills 5 of dot_block's 9
 * to the stack (as it did with vpdpbusd in int8_kernel.c); 1.7-2x faster at 2-32 rows. {vex}
 * (written %{vex%} in GCC's asm) asks for AVX-VNNI's encoding, never AVX512-VNNI's EVEX one. */
static inline __m256i madd(__m256i acc, __m256i a, __m256i b) {
#ifdef __AVXVNNI__
    __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
#else
    __m256i t;
    __asm__("vpmaddwd %3, %2, %1\n\tvpaddd %1, %0, %0" : "+x"(acc), "=&x"(t) : "x"(a), "x"(b));
#endif
    return acc;
}

/* 16 weights, sign-extended to int16. */
static inline __m256i load_w(const int8_t *w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); }

/* The last n < 16 weights of a row, zero beyond n (no read past the matrix). */
static inline __m256i load_w_tail(const int8_t *w, int64_t n) {
    int8_t t[16] = {0};
    memcpy(t, w, (size_t)n);
    return load_w(t);
}

/* int64 lanes += the int32 lanes of v. */
static inline __m256i widen_add(__m256i acc64, __m256i v) {
    return _mm256_add_epi64(acc64, _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                                    _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1))));
}

static inline int64_t sum64(__m256i v) {
    const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* Row m of x to int16 codes: rows of Kp (K rounded up to 16) codes, zero beyond K. The same
 * arithmetic as int8_kernel.c's quantize_rows, so the same codes. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, int16_t *codes, float *step) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        __m256 vmax = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(r + k)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        float amax = _mm_cvtss_f32(h);
        for (; k < K; k++) amax = r[k] > amax ? r[k] : (-r[k] > amax ? -r[k] : amax);
        const float s = amax > 0 ? amax / 32767.0f : 1.0f, inv = 1.0f / s;
        step[m] = s;
        int16_t *c = codes + m * Kp;
        const __m256 vinv = _mm256_set1_ps(inv);
        for (k = 0; k + 8 <= K; k += 8) {
            /* Round to nearest (the default MXCSR mode); |x| <= amax keeps |c| <= 32767. */
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), vinv));
            _mm_storeu_si128((__m128i *)(c + k), _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        for (; k < K; k++) c[k] = (int16_t)__builtin_lrintf(r[k] * inv);
        memset(c + K, 0, sizeof(int16_t) * (size_t)(Kp - K));
    }
}

/* sum_k a_k w_k of one activation row against one weight row. */
static inline int64_t dot_row(const int16_t *a, int64_t K, const int8_t *w) {
    __m256i total = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t end = k0 + CHUNK < K ? k0 + CHUNK : K;
        __m256i acc[U1];
        for (int u = 0; u < U1; u++) acc[u] = _mm256_setzero_si256();
        int64_t k = k0;
        for (; k + 16 * U1 <= end; k += 16 * U1)
            for (int u = 0; u < U1; u++)
                acc[u] = madd(acc[u], _mm256_loadu_si256((const __m256i *)(a + k + 16 * u)), load_w(w + k + 16 * u));
        for (; k + 16 <= end; k += 16) acc[0] = madd(acc[0], _mm256_loadu_si256((const __m256i *)(a + k)), load_w(w + k));
        if (k < end) acc[0] = madd(acc[0], _mm256_loadu_si256((const __m256i *)(a + k)), load_w_tail(w + k, end - k));
        /* The U1 accumulators together saw at most CHUNK inputs: their int32 sum cannot wrap. */
        for (int u = 1; u < U1; u++) acc[0] = _mm256_add_epi32(acc[0], acc[u]);
        total = widen_add(total, acc[0]);
    }
    return sum64(total);
}

/* One step of 16 inputs for dot_block: weight vectors wv[NB] against activation rows m < mb. */
#define BLOCK_STEP(k, wv)                                                                           \
    for (int m = 0; m < mb; m++) {                                                                  \
        const __m256i av = _mm256_loadu_si256((const __m256i *)(a + m * Kp + (k)));                 \
        for (int j = 0; j < NB; j++) acc[m][j] = madd(acc[m][j], av, wv[j]);                        \
    }

/* sum_k a[m]_k w[j]_k for activation rows m < mb (a constant once inlined, so the loops unroll
 * and the accumulators stay in registers) and weight rows j < NB: out[m NB + j]. */
static inline __attribute__((always_inline)) void dot_block(const int16_t *a, int64_t Kp, int64_t K, const int mb,
                                                            const int8_t *const w[NB], int64_t *out) {
    __m256i acc[MB][NB], total[MB][NB], wv[NB];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) total[m][j] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t end = k0 + CHUNK < K ? k0 + CHUNK : K;
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < NB; j++) acc[m][j] = _mm256_setzero_si256();
        int64_t k = k0;
        for (; k + 64 <= end; k += 64) {
            /* The next block's rows into L2, one line per row and step, as in int8_kernel.c:
             * interleaved row streams are more than the hardware prefetcher keeps ahead of. */
            for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(w[j] + NB * K + k), _MM_HINT_T1);
            for (int u = 0; u < 64; u += 16) {
                for (int j = 0; j < NB; j++) wv[j] = load_w(w[j] + k + u);
                BLOCK_STEP(k + u, wv)
            }
        }
        for (; k + 16 <= end; k += 16) {
            for (int j = 0; j < NB; j++) wv[j] = load_w(w[j] + k);
            BLOCK_STEP(k, wv)
        }
        if (k < end) {
            for (int j = 0; j < NB; j++) wv[j] = load_w_tail(w[j] + k, end - k);
            BLOCK_STEP(k, wv)
        }
        for (int m = 0; m < mb; m++)
            for (int j = 0; j < NB; j++) total[m][j] = widen_add(total[m][j], acc[m][j]);
    }
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < NB; j++) out[m * NB + j] = sum64(total[m][j]);
}

/* y[m, n] from the exact sum: one rounding of dot * (step * scale), whose factor is exact in
 * float64 (two floats' product), the same expression as int8_kernel.c's. */
static inline void finish(int64_t dot, int64_t m, int64_t n, const float *step, const float *scale,
                          const float *bias, int64_t N, float *y) {
    y[m * N + n] = (float)((double)dot * ((double)step[m] * (double)scale[n])) + (bias ? bias[n] : 0.0f);
}

static void tile(const int16_t *a, const float *step, int64_t M, int64_t K, int64_t Kp, const int8_t *w,
                 const float *scale, const float *bias, int64_t N, int64_t n0, int64_t n1, float *y) {
    if (M == 1) {
        for (int64_t n = n0; n < n1; n++) finish(dot_row(a, K, w + n * K), 0, n, step, scale, bias, N, y);
        return;
    }
    /* Small decode batches: a weight block meets every activation row while it is in L1, so the
     * weight streams once in order; otherwise the tile, in L2, meets each row block in turn. */
    const int small = NB * K + 2 * M * Kp <= L1_BYTES;
    const int64_t mstep = small ? M : MB, nstep = small ? NB : n1 - n0;
    int64_t sums[MB * NB];
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
                    case 4: dot_block(a + m0 * Kp, Kp, K, 4, wp, sums); break;
#endif
#if MB >= 3
                    case 3: dot_block(a + m0 * Kp, Kp, K, 3, wp, sums); break;
#endif
#if MB >= 2
                    case 2: dot_block(a + m0 * Kp, Kp, K, 2, wp, sums); break;
#endif
                    default: dot_block(a + m0 * Kp, Kp, K, 1, wp, sums); break;
                    }
                    for (int m = 0; m < mb; m++)
                        for (int j = 0; j < nb; j++) finish(sums[m * NB + j], m0 + m, n + j, step, scale, bias, N, y);
                }
            }
}

/* x [M, K] float32, w [N, K] int8, scale [N], rowsum [N] (unused here: the codes are signed, so
 * no zero-point correction; the argument keeps one signature for every build), bias [N] or NULL,
 * y [M, N]; all contiguous; K <= 65536. Returns 0, or -1 if the activation buffer could not be
 * allocated. */
int kaki_int8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                     const int32_t *rowsum, const float *bias, int64_t N, float *y, int threads) {
    (void)rowsum;
    const int64_t Kp = (K + 15) / 16 * 16;
    int16_t *codes = aligned_alloc(64, (sizeof(int16_t) * (size_t)(M * Kp) + 63) / 64 * 64);
    float *step = malloc(sizeof(float) * (size_t)M);
    if (!codes || !step) {
        free(codes);
        free(step);
        return -1;
    }
    quantize_rows(x, M, K, Kp, codes, step);
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tiles > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * TILE, n1 = n0 + TILE < N ? n0 + TILE : N;
        tile(codes, step, M, K, Kp, w, scale, bias, N, n0, n1, y);
    }
    free(codes);
    free(step);
    return 0;
}

/* The float32 small-M product rides in the same library (its file says why). */
#include "rows_f32.h"
