/* Small-batch fp32 GEMM for CPU decoding: out (M, N) = x (M, K) @ W^T, W (N, K).
 *
 * Contract
 *   - W is pre-packed as Wp[N/8][K][8] (tasc.accel.packed.pack): each 8-column block is one
 *     contiguous run, so the weights stream from memory once, sequentially, whatever M is.
 *   - N is a multiple of 8 (pad the packed weight); out has row stride N.
 *   - Every output element is one FMA chain over k = 0..K-1 in order, so a row's result is
 *     bitwise the same whether it is computed alone (a one-token step) or with others (a
 *     k-token verify step): M changes the speed, never the numbers.
 *   - Up to 12 rows share one pass over a weight block (12 accumulators + 1 weight register
 *     fit the 16 AVX2 registers); more rows take further passes over the cached block.
 *
 * Why: the BLAS sgemm behind torch packs the weight for every call, which costs as much as
 * the arithmetic at M = 2..16, so a k-token verify step cost 2-2.5 one-token steps on CPU.
 */
#include <stddef.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));

#define KERNEL(R)                                                                              \
    static void block_##R(const float *x, int K, const float *w, float *out, int N) {         \
        v8 a[R];                                                                               \
        for (int r = 0; r < R; r++) a[r] = (v8){0};                                            \
        for (int k = 0; k < K; k++) {                                                          \
            __builtin_prefetch(w + (size_t)k * 8 + 512, 0, 0);                                 \
            v8 wk = *(const v8 *)(w + (size_t)k * 8);                                          \
            for (int r = 0; r < R; r++) {                                                      \
                float s = x[(size_t)r * K + k];                                                \
                v8 b = {s, s, s, s, s, s, s, s};                                               \
                a[r] = a[r] + b * wk;                                                          \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++) *(v8 *)(out + (size_t)r * N) = a[r];                       \
    }

KERNEL(1) KERNEL(2) KERNEL(3) KERNEL(4) KERNEL(5) KERNEL(6)
KERNEL(7) KERNEL(8) KERNEL(9) KERNEL(10) KERNEL(11) KERNEL(12)

typedef void (*block_fn)(const float *, int, const float *, float *, int);
static const block_fn BLOCKS[13] = {0, block_1, block_2, block_3, block_4, block_5, block_6,
                                    block_7, block_8, block_9, block_10, block_11, block_12};

/* x: (M, K) row-major; Wp: packed (N/8, K, 8); out: (M, N) row-major. threads > 1 splits the
 * column blocks between OpenMP threads (each column's arithmetic is unchanged). */
void tasc_small_gemm(const float *x, int M, int K, const float *Wp, int N, float *out, int threads) {
    int blocks = N / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int jb = 0; jb < blocks; jb++) {
        const float *w = Wp + (size_t)jb * K * 8;
        for (int m = 0; m < M; m += 12) {
            int R = M - m < 12 ? M - m : 12;
            BLOCKS[R](x + (size_t)m * K, K, w, out + (size_t)m * N + (size_t)jb * 8, N);
        }
    }
}

/* ------------------------------------------------------------------ exact greedy argmax head
 *
 * tasc_head_argmax: ids[m] = argmax_v of the logits row x[m] @ W^T, exactly as tasc_small_gemm
 * would compute it, without reading the fp32 W in full (the LM head is a fifth of a small
 * model's weights and is read on every decode step).
 *
 * Contract
 *   - q is an int8 copy of W packed like Wp, (N/8, K, 8), with W[v][k] ~ scale[v] * q[v][k];
 *     coef[v] bounds |exact - approximate logit| per unit of ||x[m]||_1 (quantisation error
 *     plus the rounding of both sums; tasc.accel.argmax_head.ArgmaxHead computes it in float64).
 *   - Pass 1 screens every column with the int8 copy; pass 2 recomputes in fp32, from W
 *     (N, K) row-major, every column whose bound reaches the best lower bound. A column
 *     outside that set cannot be the argmax, so the result is exact.
 *   - Pass 2 is one FMA chain over k = 0..K-1 in order, the chain of one lane of
 *     tasc_small_gemm: the values, and so the argmax, are bitwise those of the full fp32
 *     head. Ties go to the smallest id, as torch.argmax does.
 *   - Columns n_valid..N-1 (packing pad) never win. approx is scratch of (M, N) floats.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Accumulators as GCC vectors, as in block_R: written with intrinsics on an __m256 array,
 * GCC kept a copy of the array in memory and stored every accumulator on every k (8 rows:
 * 13 cycles per k instead of ~4). */
#define QKERNEL(R)                                                                             \
    static void qblock_##R(const float *x, int K, const int8_t *q, float *out, int N) {       \
        v8 a[R];                                                                               \
        for (int r = 0; r < R; r++) a[r] = (v8){0};                                            \
        for (int k = 0; k < K; k++) {                                                          \
            __m128i raw = _mm_loadl_epi64((const __m128i *)(q + (size_t)k * 8));               \
            v8 wk = (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));                         \
            for (int r = 0; r < R; r++) {                                                      \
                float s = x[(size_t)r * K + k];                                                \
                v8 b = {s, s, s, s, s, s, s, s};                                               \
                a[r] = a[r] + b * wk;                                                          \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++) *(v8 *)(out + (size_t)r * N) = a[r];                       \
    }

QKERNEL(1) QKERNEL(2) QKERNEL(3) QKERNEL(4) QKERNEL(5) QKERNEL(6)
QKERNEL(7) QKERNEL(8) QKERNEL(9) QKERNEL(10) QKERNEL(11) QKERNEL(12)

typedef void (*qblock_fn)(const float *, int, const int8_t *, float *, int);
static const qblock_fn QBLOCKS[13] = {0, qblock_1, qblock_2, qblock_3, qblock_4, qblock_5, qblock_6,
                                      qblock_7, qblock_8, qblock_9, qblock_10, qblock_11, qblock_12};

/* One lane of tasc_small_gemm: acc = fma(x[k], w[k], acc) for k = 0..K-1. */
static float exact_dot(const float *x, const float *w, int K) {
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc = fmaf(x[k], w[k], acc);
    return acc;
}

/* Returns the number of columns recomputed exactly (all rows), for statistics. */
long tasc_head_argmax(const float *x, int M, int K, const int8_t *q, const float *scale, const float *coef,
                      const float *W, int N, int n_valid, int64_t *ids, float *approx, int threads) {
    int blocks = N / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int jb = 0; jb < blocks; jb++) {
        const int8_t *qb = q + (size_t)jb * K * 8;
        for (int m = 0; m < M; m += 12) {
            int R = M - m < 12 ? M - m : 12;
            QBLOCKS[R](x + (size_t)m * K, K, qb, approx + (size_t)m * N + (size_t)jb * 8, N);
        }
    }
    long rescored = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && M > 1) reduction(+ : rescored)
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float *am = approx + (size_t)m * N;
        double l1d = 0.0;
        for (int k = 0; k < K; k++) l1d += fabs((double)xm[k]);
        float l1 = (float)(l1d * 1.001);
        /* Lower bound of the best column: max_v (s_v d_v - l1 c_v); am becomes the upper bounds. */
        float lo = -INFINITY;
        for (int v = 0; v < n_valid; v++) {
            float val = scale[v] * am[v], err = l1 * coef[v];
            if (val - err > lo) lo = val - err;
            am[v] = val + err;
        }
        lo -= 1e-6f * (fabsf(lo) + 1.0f); /* the rounding of these few operations */
        float best = -INFINITY;
        int64_t arg = -1;
        for (int v = 0; v < n_valid; v++) {
            if (am[v] < lo) continue;
            float e = exact_dot(xm, W + (size_t)v * K, K);
            rescored++;
            if (e > best || arg < 0) {
                best = e;
                arg = v;
            }
        }
        ids[m] = arg;
    }
    return rescored;
}
