/*
 * kaki's float32 small-M product: y = x @ w.T + bias for a few rows of x (1-8: a batch's decode
 * step, speculative drafts being verified) against a large float32 weight, streaming the weight
 * from memory once for all the rows.
 *
 * Why: at these sizes the product is bound by reading the weight. MKL streams it once for one row
 * (its GEMV), but for 2-8 rows its GEMM packs the weight first, and a 2-row product of the ~1B
 * benchmark model's 8192x2048 layer took 5.9 ms against 2.9 ms for one row (BENCHMARKS.md).
 * Here every output element is one dot product of a weight row and an activation row, like
 * F.linear's, only summed in another order.
 *
 * Plain C with GCC's vector extensions, so one source serves every build of the native library:
 * 16-float vectors (zmm registers) where AVX-512 is on, 8-float ones (ymm) in the AVX2 builds. Included at the end of int8_kernel.c and int8_kernel_avx2.c,
 * so kaki.native builds, caches and loads it with them.
 *
 * Blocking: RB weight rows at a time, each vector of them multiplied into M activation rows
 * (RB x M accumulators: 16 at M = 8, within AVX-512's 32 registers; AVX2 spills a few, which
 * costs little while the weight's bytes are the bottleneck). Each thread takes a contiguous span
 * of output rows, so it reads one sequential stream of the weight.
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define ROWS_VW 16 /* floats per vector: one zmm register */
#else
#define ROWS_VW 8 /* one ymm register */
#endif
#define ROWS_RB 2  /* weight rows per block */
#define ROWS_MAX_M 8

typedef float rows_vf __attribute__((vector_size(ROWS_VW * sizeof(float))));

static inline rows_vf rows_load(const float *p) {
    rows_vf v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline float rows_hsum(rows_vf v) {
    float s = 0.0f;
    for (int i = 0; i < ROWS_VW; i++)
        s += v[i];
    return s;
}

/* Output rows [n0, n1) for M (a constant after inlining) activation rows. */
/* fp-contract: a += v * x as one FMA (C11 mode would keep a multiply and an add). */
#define ROWS_FMA __attribute__((optimize("fp-contract=fast")))

static inline __attribute__((always_inline)) ROWS_FMA void rows_span(const float *x, const int M, int64_t K,
                                                           const float *w, const float *bias, int64_t N,
                                                           int64_t n0, int64_t n1, float *y) {
    const int64_t Kv = K / ROWS_VW * ROWS_VW;
    int64_t n = n0;
    for (; n + ROWS_RB <= n1; n += ROWS_RB) {
        const float *w0 = w + n * K, *w1 = w0 + K;
        rows_vf a0[ROWS_MAX_M], a1[ROWS_MAX_M];
        for (int m = 0; m < M; m++)
            a0[m] = a1[m] = (rows_vf){0};
        for (int64_t k = 0; k < Kv; k += ROWS_VW) {
            const rows_vf v0 = rows_load(w0 + k), v1 = rows_load(w1 + k);
            for (int m = 0; m < M; m++) {
                const rows_vf xv = rows_load(x + m * K + k);
                a0[m] += v0 * xv;
                a1[m] += v1 * xv;
            }
        }
        for (int m = 0; m < M; m++) {
            float s0 = rows_hsum(a0[m]), s1 = rows_hsum(a1[m]);
            for (int64_t k = Kv; k < K; k++) {
                s0 += w0[k] * x[m * K + k];
                s1 += w1[k] * x[m * K + k];
            }
            y[m * N + n] = s0 + (bias ? bias[n] : 0.0f);
            y[m * N + n + 1] = s1 + (bias ? bias[n + 1] : 0.0f);
        }
    }
    for (; n < n1; n++) { /* an odd last row */
        const float *w0 = w + n * K;
        rows_vf a0[ROWS_MAX_M];
        for (int m = 0; m < M; m++)
            a0[m] = (rows_vf){0};
        for (int64_t k = 0; k < Kv; k += ROWS_VW) {
            const rows_vf v0 = rows_load(w0 + k);
            for (int m = 0; m < M; m++)
                a0[m] += v0 * rows_load(x + m * K + k);
        }
        for (int m = 0; m < M; m++) {
            float s0 = rows_hsum(a0[m]);
            for (int64_t k = Kv; k < K; k++)
                s0 += w0[k] * x[m * K + k];
            y[m * N + n] = s0 + (bias ? bias[n] : 0.0f);
        }
    }
}

/* A span with M as a compile-time constant, so the accumulators live in registers. */
static ROWS_FMA void rows_span_m(const float *x, int M, int64_t K, const float *w, const float *bias, int64_t N,
                        int64_t n0, int64_t n1, float *y) {
    switch (M) {
    case 1: rows_span(x, 1, K, w, bias, N, n0, n1, y); break;
    case 2: rows_span(x, 2, K, w, bias, N, n0, n1, y); break;
    case 3: rows_span(x, 3, K, w, bias, N, n0, n1, y); break;
    case 4: rows_span(x, 4, K, w, bias, N, n0, n1, y); break;
    case 5: rows_span(x, 5, K, w, bias, N, n0, n1, y); break;
    case 6: rows_span(x, 6, K, w, bias, N, n0, n1, y); break;
    case 7: rows_span(x, 7, K, w, bias, N, n0, n1, y); break;
    default: rows_span(x, 8, K, w, bias, N, n0, n1, y); break;
    }
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N]; all float32 and contiguous. M > 8 runs in
 * blocks of 8 rows (each block streams the weight again: callers keep M small). `threads`
 * OpenMP threads, each a contiguous span of output rows (an even count, so spans start on a
 * block). Returns 0. */
ROWS_FMA int kaki_f32_rows(const float *x, int64_t M, int64_t K, const float *w, const float *bias, int64_t N, float *y,
                  int threads) {
    if (threads < 1)
        threads = 1;
    if (threads > N / ROWS_RB)
        threads = N / ROWS_RB > 0 ? (int)(N / ROWS_RB) : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t pairs = (N + 1) / 2;
        const int64_t n0 = 2 * (pairs * t / T), n1e = 2 * (pairs * (t + 1) / T);
        const int64_t n1 = n1e < N ? n1e : N;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_MAX_M) {
            const int mb = M - m0 < ROWS_MAX_M ? (int)(M - m0) : ROWS_MAX_M;
            rows_span_m(x + m0 * K, mb, K, w, bias, N, n0, n1, y + m0 * N);
        }
    }
    return 0;
}
