/* The decoder step of a llama-family model on quantised weights, and causal attention over a KV
 * cache one query row at a time (tasc.accel.attention, tasc.accel.fused).
 *
 * Contract
 *   - tasc_attend: q (H, T, D): the T new positions' queries (rotary applied), T rows after
 *     `past` cached ones; k, v (Hkv, cap, D): the cache, the first past + T positions valid (the
 *     new keys and values already written); H is a multiple of Hkv (grouped-query heads: head h
 *     reads KV head h / (H / Hkv)). out (T, H, D): the attention output as the output
 *     projection reads it. work: threads * (past + T) floats of scratch.
 *   - Row (h, i) attends to cache positions 0 .. past + i (causal). Its output is computed by
 *     one fixed sequence of operations that depends only on q[h][i] and those cache rows:
 *     scores s_j = scale * dot(q, k_j) (8-lane fused multiply-adds over D, lanes summed in a
 *     fixed tree), m = max s_j, p_j = expf(s_j - m), z = sum p_j in j order, out = (sum_j p_j
 *     v_j in j order) / z. So a row's output is bitwise the same whatever T, `past` split or
 *     thread count the call has: a k-token verify step gives exactly the rows of k one-token
 *     steps, and greedy speculative decoding stays lossless through attention.
 *   - tasc_decoder_step: every layer of the model for T new tokens (embeddings in h, final
 *     normed hidden states out), with the layer's linears in tasc.accel.quant's packed blocks
 *     multiplied by the matmul function passed in (tasc_quant_matmul: rows independent of each
 *     other), RMSNorm and SiLU computed per row in a fixed order, rotary from the cos/sin rows
 *     the model's rotary module gave, keys and values written into the cache at past..past+T-1,
 *     and tasc_attend. Every piece is row-wise, so the step keeps the attention's contract.
 *   - D (head dim) and the hidden size are multiples of 8; AVX2 + FMA.
 *
 * Why: torch's attention kernels choose their blocking by the number of query rows, so one
 * query row and the same row inside a chunk can differ in the last bits, and quantising the
 * next layer's activations to int8 turns such a bit into a different token now and then. The
 * whole step in C removes the per-operation overhead of running a small model op by op.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot8(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int x = 0; x < d; x += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + x), _mm256_loadu_ps(b + x), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static void attend_row(const float *qrow, const float *k, const float *v, int n, int d, float scale,
                       float *scores, float *out) {
    float m = -INFINITY;
    for (int j = 0; j < n; j++) {
        float s = scale * dot8(qrow, k + (long)j * d, d);
        scores[j] = s;
        if (s > m) m = s;
    }
    float z = 0.0f;
    for (int j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - m);
        z += scores[j];
    }
    for (int x = 0; x < d; x += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), _mm256_loadu_ps(v + (long)j * d + x), acc);
        _mm256_storeu_ps(out + x, _mm256_div_ps(acc, _mm256_set1_ps(z)));
    }
}

void tasc_attend(const float *q, const float *k, const float *v, int H, int Hkv, int T, int D, int cap,
                 int past, float scale, float *out, float *work, int threads) {
    int rep = H / Hkv;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int hi = 0; hi < H * T; hi++) {
        int h = hi / T, i = hi % T, g = h / rep;
        float *scores = work + (long)omp_get_thread_num() * (past + T);
        attend_row(q + ((long)h * T + i) * D, k + (long)g * cap * D, v + (long)g * cap * D, past + i + 1, D, scale,
                   scores, out + ((long)i * H + h) * D);
    }
}

/* One quantised linear (tasc.accel.quant's packed layout) and its optional bias. */
typedef struct {
    const void *qs, *sc;
    const float *bias;
    int type, n;
} qlinear;

typedef struct {
    const float *norm1, *norm2; /* RMSNorm weights (hidden) */
    qlinear qkv, o, gate_up, down;
} qlayer;

typedef int (*matmul_fn)(int isa, int type, const float *x, int M, int K, const void *qs, const void *sc, int N,
                         float *out, int threads);

static void rmsnorm(const float *x, const float *w, float eps, int T, int D, float *out) {
    for (int i = 0; i < T; i++) {
        const float *r = x + (long)i * D;
        float ss = 0.0f;
        for (int d = 0; d < D; d++) ss += r[d] * r[d];
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int d = 0; d < D; d++) out[(long)i * D + d] = w[d] * (r[d] * inv);
    }
}

static int linear(matmul_fn mm, int isa, const qlinear *l, const float *x, int T, int K, float *out, int threads) {
    int rc = mm(isa, l->type, x, T, K, l->qs, l->sc, l->n, out, threads);
    if (rc || !l->bias) return rc;
    for (int i = 0; i < T; i++)
        for (int j = 0; j < l->n; j++) out[(long)i * l->n + j] += l->bias[j];
    return 0;
}

/* x (T, heads, hd) in place: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. */
static void rotary(float *x, const float *cos, const float *sin, int T, int heads, int hd, int stride) {
    int half = hd / 2;
    for (int i = 0; i < T; i++)
        for (int h = 0; h < heads; h++) {
            float *r = x + (long)i * stride + h * hd;
            const float *c = cos + (long)i * hd, *s = sin + (long)i * hd;
            for (int d = 0; d < half; d++) {
                float a = r[d], b = r[d + half];
                r[d] = a * c[d] - b * s[d];
                r[d + half] = b * c[d + half] + a * s[d + half];
            }
        }
}

/* h (T, D): in, the token embeddings; out, the final normed hidden states. keys/values
 * (layers, Hkv, cap, hd). scratch: floats for T * (2 D + (H + 2 Hkv) hd + 3 F) plus the
 * attention's threads * (past + T): T * (D + 3 H hd + 2 Hkv hd + 3 F) + threads * (past + T). Returns 0 or a matmul error code. */
int tasc_decoder_step(int T, int L, int D, int H, int Hkv, int hd, int F, float eps, float scale, float *h,
                      const float *cos, const float *sin, const qlayer *layers, const float *final_norm,
                      float *keys, float *values, int cap, int past, matmul_fn mm, int isa, int threads,
                      float *scratch) {
    int nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv;
    float *x = scratch, *att = x + (long)T * D, *qkv = att + (long)T * nq, *gu = qkv + (long)T * nqkv;
    float *act = gu + (long)T * 2 * F, *q = act + (long)T * F, *work = q + (long)T * nq;
    int rc;
    for (int l = 0; l < L; l++) {
        const qlayer *ly = layers + l;
        float *kc = keys + (long)l * Hkv * cap * hd, *vc = values + (long)l * Hkv * cap * hd;
        rmsnorm(h, ly->norm1, eps, T, D, x);
        if ((rc = linear(mm, isa, &ly->qkv, x, T, D, qkv, threads))) return rc;
        rotary(qkv, cos, sin, T, H, hd, nqkv);
        rotary(qkv + nq, cos, sin, T, Hkv, hd, nqkv);
        for (int i = 0; i < T; i++) {
            const float *row = qkv + (long)i * nqkv;
            for (int hh = 0; hh < H; hh++) memcpy(q + ((long)hh * T + i) * hd, row + hh * hd, hd * sizeof(float));
            for (int g = 0; g < Hkv; g++) {
                memcpy(kc + ((long)g * cap + past + i) * hd, row + nq + g * hd, hd * sizeof(float));
                memcpy(vc + ((long)g * cap + past + i) * hd, row + nq + nkv + g * hd, hd * sizeof(float));
            }
        }
        tasc_attend(q, kc, vc, H, Hkv, T, hd, cap, past, scale, att, work, threads);
        if ((rc = linear(mm, isa, &ly->o, att, T, nq, x, threads))) return rc;
        for (long j = 0; j < (long)T * D; j++) h[j] += x[j];
        rmsnorm(h, ly->norm2, eps, T, D, x);
        if ((rc = linear(mm, isa, &ly->gate_up, x, T, D, gu, threads))) return rc;
        for (int i = 0; i < T; i++)
            for (int j = 0; j < F; j++) {
                float g = gu[(long)i * 2 * F + j], u = gu[(long)i * 2 * F + F + j];
                act[(long)i * F + j] = g / (1.0f + expf(-g)) * u;
            }
        if ((rc = linear(mm, isa, &ly->down, act, T, F, x, threads))) return rc;
        for (long j = 0; j < (long)T * D; j++) h[j] += x[j];
    }
    rmsnorm(h, final_norm, eps, T, D, x);
    memcpy(h, x, (long)T * D * sizeof(float));
    return 0;
}
