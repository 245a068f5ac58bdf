/* Small-batch fp32 GEMM for CPU decoding: out (M, N) = x (M, K) @ W^T, W (N, K).
 *
 * Contract
 *   - W is pre-packed as Wp[N/8][K][8] (tasc.cpu_kernels.pack): each 8-column block is one
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
