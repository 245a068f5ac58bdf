/* The decoder step of a llama-family model on quantised weights, and causal attention over a KV
 * cache one query row at a time (tasc.accel.attention, tasc.accel.fused).
 *
 * Contract
 *   - tasc_attend: q (H, T, D): the T new positions' queries (rotary applied), T rows after
 *     `past` cached ones; k, v (Hkv, cap, D): the cache, the first past + T positions valid (the
 *     new keys and values already written); H is a multiple of Hkv (grouped-query heads: head h
 *     reads KV head h / (H / Hkv)). out (T, H, D): the attention output as the output
 *     projection reads it. work: threads * (past + T + 8 + D) floats of scratch.
 *   - Row (h, i) attends to cache positions 0 .. past + i (causal). Its output is computed by
 *     one fixed sequence of operations that depends only on q[h][i] and those cache rows:
 *     scores s_j = scale * dot(q, k_j) (8-lane fused multiply-adds over D, lanes summed in a
 *     fixed tree), m = max s_j, p_j = exp8(s_j - m), z = the sum of p_j by 8 lanes of j then a
 *     fixed tree, out = (sum_j p_j v_j in j order) / z. So a row's output is bitwise the same whatever T, `past` split or
 *     thread count the call has: a k-token verify step gives exactly the rows of k one-token
 *     steps, and greedy speculative decoding stays lossless through attention.
 *   - tasc_decoder_step: every layer of the model (qmodel) for T new tokens of S requests
 *     (qstep): request s has the next n[s] rows, after past[s] tokens in its own cache. The
 *     rows' embeddings are copied from the model's table by token id (or the caller put them in
 *     h); h ends as the final normed hidden states. The layer's linears are in tasc.accel.quant's
 *     packed blocks, multiplied by the matmul function passed in (tasc_quant_matmul: rows
 *     independent of each other); RMSNorm and SiLU are computed per row in a fixed order, rotary
 *     from cos/sin rows the model's rotary module gave (a table by position, or a row per step
 *     row), each row's key and value written into its request's cache at its position, and each
 *     row attends as in tasc_attend over its own request's cache. With `keep`, the step ends
 *     with the greedy ids of each request's last keep[s] rows from the LM head's argmax function
 *     (tasc_quant_argmax: rows independent too), so a decode or verify step is one call. Every
 *     piece is row-wise, so the step keeps the attention's contract, and a row's result does not
 *     depend on the other requests that share the step (batched decoding gives each request's
 *     tokens of decoding it alone, bitwise).
 *   - D (head dim) and the hidden size are multiples of 8. Built for AVX2 + FMA, or with
 *     TASC_PORTABLE for any CPU with the same results bitwise.
 *
 * Why: torch's attention kernels choose their blocking by the number of query rows, so one
 * query row and the same row inside a chunk can differ in the last bits, and quantising the
 * next layer's activations to int8 turns such a bit into a different token now and then. The
 * whole step in C removes the per-operation overhead of running a small model op by op; the
 * embeddings, rotary rows and the head's argmax inside it remove the Python work between
 * steps, which runs slowly right after a step, the step's weight stream having evicted the
 * interpreter's data from the core's caches.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef TASC_PORTABLE
#include <immintrin.h>
#else
/* The same file built for a CPU without AVX2 (tasc.accel.native's "decoder_portable"): these
 * stand-ins for the AVX2 intrinsics below work lane by lane with the same IEEE operations
 * (fmaf for a fused multiply-add), so such a CPU computes bitwise the same results. */
typedef struct { float v[8]; } __m256;
typedef struct { float v[4]; } __m128;
typedef struct { int32_t v[8]; } __m256i;
#define _CMP_LT_OQ 0x11
#define _CMP_GE_OQ 0x1d
#define _MM_FROUND_TO_NEAREST_INT 0
#define _MM_FROUND_NO_EXC 8
#define LANES(n, expr)                                                                         \
    for (int l = 0; l < n; l++) expr
static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline __m256 _mm256_set1_ps(float a) { __m256 r; LANES(8, r.v[l] = a); return r; }
static inline __m256 _mm256_setzero_ps(void) { return _mm256_set1_ps(0.0f); }
static inline __m256 _mm256_setr_ps(float a, float b, float c, float d, float e, float f, float g, float h) {
    __m256 r = {{a, b, c, d, e, f, g, h}};
    return r;
}
static inline __m256 _mm256_loadu_ps(const float *p) { __m256 r; memcpy(r.v, p, 32); return r; }
static inline void _mm256_storeu_ps(float *p, __m256 a) { memcpy(p, a.v, 32); }
#define BINARY(name, expr)                                                                     \
    static inline __m256 name(__m256 a, __m256 b) { __m256 r; LANES(8, r.v[l] = (expr)); return r; }
BINARY(_mm256_add_ps, a.v[l] + b.v[l])
BINARY(_mm256_sub_ps, a.v[l] - b.v[l])
BINARY(_mm256_mul_ps, a.v[l] * b.v[l])
BINARY(_mm256_div_ps, a.v[l] / b.v[l])
BINARY(_mm256_max_ps, a.v[l] > b.v[l] ? a.v[l] : b.v[l]) /* a NaN gives b, as vmaxps */
BINARY(_mm256_min_ps, a.v[l] < b.v[l] ? a.v[l] : b.v[l])
BINARY(_mm256_andnot_ps, bits_f(~f_bits(a.v[l]) & f_bits(b.v[l])))
#undef BINARY
static inline __m256 _mm256_fmadd_ps(__m256 a, __m256 b, __m256 c) { __m256 r; LANES(8, r.v[l] = fmaf(a.v[l], b.v[l], c.v[l])); return r; }
static inline __m256 _mm256_fnmadd_ps(__m256 a, __m256 b, __m256 c) { __m256 r; LANES(8, r.v[l] = fmaf(-a.v[l], b.v[l], c.v[l])); return r; }
static inline __m256 _mm256_cmp_ps(__m256 a, __m256 b, int p) {
    __m256 r;
    LANES(8, r.v[l] = bits_f((p == _CMP_LT_OQ ? a.v[l] < b.v[l] : a.v[l] >= b.v[l]) ? 0xffffffffu : 0u));
    return r;
}
static inline __m256 _mm256_blendv_ps(__m256 a, __m256 b, __m256 m) { __m256 r; LANES(8, r.v[l] = f_bits(m.v[l]) >> 31 ? b.v[l] : a.v[l]); return r; }
static inline __m256 _mm256_round_ps(__m256 a, int mode) { __m256 r; (void)mode; LANES(8, r.v[l] = nearbyintf(a.v[l])); return r; }
static inline __m256i _mm256_cvtps_epi32(__m256 a) { __m256i r; LANES(8, r.v[l] = (int32_t)lrintf(a.v[l])); return r; }
static inline __m256i _mm256_set1_epi32(int32_t a) { __m256i r; LANES(8, r.v[l] = a); return r; }
static inline __m256i _mm256_add_epi32(__m256i a, __m256i b) { __m256i r; LANES(8, r.v[l] = (int32_t)((uint32_t)a.v[l] + (uint32_t)b.v[l])); return r; }
static inline __m256i _mm256_slli_epi32(__m256i a, int n) { __m256i r; LANES(8, r.v[l] = (int32_t)((uint32_t)a.v[l] << n)); return r; }
static inline __m256 _mm256_castsi256_ps(__m256i a) { __m256 r; memcpy(r.v, a.v, 32); return r; }
static inline __m256 _mm256_hadd_ps(__m256 a, __m256 b) {
    __m256 r = {{a.v[0] + a.v[1], a.v[2] + a.v[3], b.v[0] + b.v[1], b.v[2] + b.v[3],
                 a.v[4] + a.v[5], a.v[6] + a.v[7], b.v[4] + b.v[5], b.v[6] + b.v[7]}};
    return r;
}
static inline __m256 _mm256_permute2f128_ps(__m256 a, __m256 b, int imm) {
    const float *half[4] = {a.v, a.v + 4, b.v, b.v + 4};
    __m256 r;
    memcpy(r.v, half[imm & 3], 16);
    memcpy(r.v + 4, half[(imm >> 4) & 3], 16);
    return r;
}
static inline __m128 _mm256_castps256_ps128(__m256 a) { __m128 r; memcpy(r.v, a.v, 16); return r; }
static inline __m128 _mm256_extractf128_ps(__m256 a, int i) { __m128 r; memcpy(r.v, a.v + 4 * (i & 1), 16); return r; }
static inline __m128 _mm_add_ps(__m128 a, __m128 b) { __m128 r; LANES(4, r.v[l] = a.v[l] + b.v[l]); return r; }
static inline __m128 _mm_max_ps(__m128 a, __m128 b) { __m128 r; LANES(4, r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l]); return r; }
static inline __m128 _mm_add_ss(__m128 a, __m128 b) { a.v[0] += b.v[0]; return a; }
static inline __m128 _mm_max_ss(__m128 a, __m128 b) { a.v[0] = a.v[0] > b.v[0] ? a.v[0] : b.v[0]; return a; }
static inline __m128 _mm_movehl_ps(__m128 a, __m128 b) { __m128 r = {{b.v[2], b.v[3], a.v[2], a.v[3]}}; return r; }
static inline __m128 _mm_shuffle_ps(__m128 a, __m128 b, int i) {
    __m128 r = {{a.v[i & 3], a.v[(i >> 2) & 3], b.v[(i >> 4) & 3], b.v[(i >> 6) & 3]}};
    return r;
}
static inline float _mm_cvtss_f32(__m128 a) { return a.v[0]; }
#undef LANES
#endif

/* The 8 lanes of acc summed in one fixed tree. */
static inline float hsum8(__m256 acc) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* exp(x): Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial, the
 * exponent put in the bits), 0 below -87.3, clamped at e^88.37 above. About 1 ulp; one fixed
 * sequence of operations a lane, so a lane's result depends on its input only. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.37626f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

/* Eight keys' scores scale * dot(q, k_u): each an 8-lane chain of fused multiply-adds over D,
 * its lanes summed as ((0+1)+(2+3))+((4+5)+(6+7)); the eight chains interleave. */
static inline __m256 scores8(const float *q, const float *const *kp, int d, __m256 scale) {
    __m256 a[8];
    for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
    for (int x = 0; x < d; x += 8) {
        const __m256 qx = _mm256_loadu_ps(q + x);
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(qx, _mm256_loadu_ps(kp[u] + x), a[u]);
    }
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    return _mm256_mul_ps(scale, sum);
}

/* One query row over n cache rows. scores: n rounded up to 8 floats. Every step is by lanes of
 * 8 positions j (the last group padded: a zero key, score -inf, weight 0) or by output lane
 * over j in order, so the row's result depends on q, n and the n cache rows only. */
static void attend_row(const float *qrow, const float *k, const float *v, int n, int d, float scale,
                       float *scores, const float *zeros, float *out) {
    const int n8 = (n + 7) & ~7;
    const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    __m256 vm = ninf;
    for (int j = 0; j < n8; j += 8) {
        const float *kp[8];
        for (int u = 0; u < 8; u++) kp[u] = j + u < n ? k + (long)(j + u) * d : zeros;
        __m256 s = scores8(qrow, kp, d, vs);
        if (j + 8 > n) /* the padding lanes: -inf */
            s = _mm256_blendv_ps(s, ninf, _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                                        _mm256_set1_ps((float)(n - j)), _CMP_GE_OQ));
        _mm256_storeu_ps(scores + j, s);
        vm = _mm256_max_ps(vm, s);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const __m256 m = _mm256_set1_ps(_mm_cvtss_f32(m4));
    __m256 vz = _mm256_setzero_ps();
    for (int j = 0; j < n8; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
        _mm256_storeu_ps(scores + j, p);
        vz = _mm256_add_ps(vz, p);
    }
    const __m256 iz = _mm256_set1_ps(hsum8(vz));
    for (int x0 = 0; x0 < d; x0 += 64) { /* eight output registers a pass */
        const int u = d - x0 < 64 ? (d - x0) / 8 : 8;
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        if (u == 8) {
            for (int j = 0; j < n; j++) {
                const __m256 p = _mm256_set1_ps(scores[j]);
                const float *vr = v + (long)j * d + x0;
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * i), acc[i]);
            }
        } else {
            for (int j = 0; j < n; j++) {
                const __m256 p = _mm256_set1_ps(scores[j]);
                for (int i = 0; i < u; i++) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + (long)j * d + x0 + 8 * i), acc[i]);
            }
        }
        for (int i = 0; i < u; i++) _mm256_storeu_ps(out + x0 + 8 * i, _mm256_div_ps(acc[i], iz));
    }
}

void tasc_attend(const float *q, const float *k, const float *v, int H, int Hkv, int T, int D, int cap,
                 int past, float scale, float *out, float *work, int threads) {
    int rep = H / Hkv;
    const long per = past + T + 8 + D; /* a thread's scores, rounded up, and a zero key */
#pragma omp parallel num_threads(threads)
    {
        float *scores = work + (long)omp_get_thread_num() * per, *zeros = scores + past + T + 8;
        memset(zeros, 0, sizeof(float) * D);
#pragma omp for schedule(dynamic, 1)
        for (int hi = 0; hi < H * T; hi++) {
            int h = hi / T, i = hi % T, g = h / rep;
            attend_row(q + ((long)h * T + i) * D, k + (long)g * cap * D, v + (long)g * cap * D, past + i + 1, D,
                       scale, scores, zeros, out + ((long)i * H + h) * D);
        }
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
typedef int (*argmax_fn)(int isa, int type, const float *x, int M, int K, const void *qs, const void *sc, int N,
                         int64_t *ids, int threads);

/* The model, set up once per weights by tasc.accel.fused. */
typedef struct {
    int L, D, H, Hkv, hd, F, vocab;
    float eps, scale;
    const qlayer *layers;
    const float *final_norm;
    const float *embed; /* (vocab, D) token embeddings; NULL: the caller puts them in h */
    qlinear head;       /* the LM head of argmax steps (qs NULL: none) */
    matmul_fn mm;
    argmax_fn am;
    int isa;
} qmodel;

/* One step of S requests. */
typedef struct {
    int T, S, threads;
    const int *ids;         /* the T new token ids, request by request (read where the model has embed) */
    const float *cos, *sin; /* rotary rows (hd floats each): row `position` of a table, else row r of the step */
    int by_position;
    const int *n, *past, *cap;
    float *const *keys, *const *values; /* request s's cache (layers, Hkv, cap[s], hd) each */
    const int *keep;        /* argmax: the last keep[s] rows of request s; NULL: no argmax */
    int64_t *out;           /* their greedy ids, request by request */
} qstep;

/* RMSNorm of each row: the squares summed by 8 lanes of fused multiply-adds, the lanes in
 * hsum8's tree (D a multiple of 8). */
static void rmsnorm(const float *x, const float *w, float eps, int T, int D, float *out) {
    for (int i = 0; i < T; i++) {
        const float *r = x + (long)i * D;
        __m256 ss = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 v = _mm256_loadu_ps(r + d);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum8(ss) / (float)D + eps));
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(out + (long)i * D + d,
                             _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(r + d), inv)));
    }
}

static int linear(matmul_fn mm, int isa, const qlinear *l, const float *x, int T, int K, float *out, int threads) {
    int rc = mm(isa, l->type, x, T, K, l->qs, l->sc, l->n, out, threads);
    if (rc || !l->bias) return rc;
    for (int i = 0; i < T; i++)
        for (int j = 0; j < l->n; j++) out[(long)i * l->n + j] += l->bias[j];
    return 0;
}

/* One row's heads (heads * hd floats at x) in place: x * cos + rotate_half(x) * sin,
 * rotate_half(x) = [-x2, x1]; by 8 lanes where they fit, the same operations a lane as the
 * scalar tail. */
static void rotary(float *x, const float *c, const float *s, int heads, int hd) {
    const int half = hd / 2, h8 = half & ~7;
    for (int h = 0; h < heads; h++) {
        float *r = x + h * hd;
        for (int d = 0; d < h8; d += 8) {
            const __m256 a = _mm256_loadu_ps(r + d), b = _mm256_loadu_ps(r + d + half);
            _mm256_storeu_ps(r + d, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + d)),
                                                  _mm256_mul_ps(b, _mm256_loadu_ps(s + d))));
            _mm256_storeu_ps(r + d + half, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + d + half)),
                                                         _mm256_mul_ps(a, _mm256_loadu_ps(s + d + half))));
        }
        for (int d = h8; d < half; d++) {
            float a = r[d], b = r[d + half];
            r[d] = a * c[d] - b * s[d];
            r[d + half] = b * c[d + half] + a * s[d + half];
        }
    }
}

/* h (T, D): the final normed hidden states (in: the embeddings where m->embed is NULL).
 * scratch: T * (D + 3 H hd + 2 Hkv hd + 3 F + 3) floats for the layer's activations and the
 * rows' positions, plus the attention's threads * (max(past[s] + n[s]) + 8 + hd). Returns 0,
 * -5 for a token id outside the embedding table, or a matmul error code. */
int tasc_decoder_step(const qmodel *m, const qstep *st, float *h, float *scratch) {
    const int T = st->T, D = m->D, H = m->H, Hkv = m->Hkv, hd = m->hd, F = m->F, threads = st->threads;
    int nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv, rep = H / Hkv, longest = 0;
    float *x = scratch, *att = x + (long)T * D, *qkv = att + (long)T * nq, *gu = qkv + (long)T * nqkv;
    float *act = gu + (long)T * 2 * F, *q = act + (long)T * F, *work = q + (long)T * nq + 3L * T;
    int *seq = (int *)(q + (long)T * nq), *pos = seq + T; /* each row's request and position */
    for (int s = 0, r = 0; s < st->S; s++)
        for (int i = 0; i < st->n[s]; i++, r++) {
            seq[r] = s, pos[r] = st->past[s] + i;
            longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
        }
    if (m->embed)
        for (int r = 0; r < T; r++) {
            if (st->ids[r] < 0 || st->ids[r] >= m->vocab) return -5;
            memcpy(h + (long)r * D, m->embed + (long)st->ids[r] * D, D * sizeof(float));
        }
    const long per = longest + 8 + hd; /* a thread's scores, rounded up, and a zero key */
    int rc;
    for (int l = 0; l < m->L; l++) {
        const qlayer *ly = m->layers + l;
        rmsnorm(h, ly->norm1, m->eps, T, D, x);
        if ((rc = linear(m->mm, m->isa, &ly->qkv, x, T, D, qkv, threads))) return rc;
        for (int i = 0; i < T; i++) { /* rotary rows: by position in a table, else the step's row i */
            const long row = (st->by_position ? pos[i] : i) * (long)hd;
            rotary(qkv + (long)i * nqkv, st->cos + row, st->sin + row, H, hd);
            rotary(qkv + (long)i * nqkv + nq, st->cos + row, st->sin + row, Hkv, hd);
        }
        for (int i = 0; i < T; i++) {
            const float *row = qkv + (long)i * nqkv;
            const long c = st->cap[seq[i]];
            float *kc = st->keys[seq[i]] + (long)l * Hkv * c * hd, *vc = st->values[seq[i]] + (long)l * Hkv * c * hd;
            for (int hh = 0; hh < H; hh++) memcpy(q + ((long)hh * T + i) * hd, row + hh * hd, hd * sizeof(float));
            for (int g = 0; g < Hkv; g++) {
                memcpy(kc + ((long)g * c + pos[i]) * hd, row + nq + g * hd, hd * sizeof(float));
                memcpy(vc + ((long)g * c + pos[i]) * hd, row + nq + nkv + g * hd, hd * sizeof(float));
            }
        }
#pragma omp parallel num_threads(threads)
        {
            float *scores = work + (long)omp_get_thread_num() * per, *zeros = scores + longest + 8;
            memset(zeros, 0, sizeof(float) * hd);
#pragma omp for schedule(dynamic, 1)
            for (int hi = 0; hi < H * T; hi++) {
                const int hh = hi / T, i = hi % T, g = hh / rep;
                const long c = st->cap[seq[i]], off = ((long)l * Hkv + g) * c * hd;
                attend_row(q + ((long)hh * T + i) * hd, st->keys[seq[i]] + off, st->values[seq[i]] + off, pos[i] + 1,
                           hd, m->scale, scores, zeros, att + ((long)i * H + hh) * hd);
            }
        }
        if ((rc = linear(m->mm, m->isa, &ly->o, att, T, nq, x, threads))) return rc;
        for (long j = 0; j < (long)T * D; j++) h[j] += x[j];
        rmsnorm(h, ly->norm2, m->eps, T, D, x);
        if ((rc = linear(m->mm, m->isa, &ly->gate_up, x, T, D, gu, threads))) return rc;
        /* SiLU(gate) * up by 8 lanes (F: the down projection's K, a multiple of 32); shared out
         * among the threads for a multi-row step, where it would be a serial stretch. */
#pragma omp parallel for num_threads(threads) schedule(static) if (T > 1 && threads > 1)
        for (long ij = 0; ij < (long)T * F; ij += 8) {
            const long i = ij / F, j = ij % F;
            __m256 g = _mm256_loadu_ps(gu + i * 2 * F + j), u = _mm256_loadu_ps(gu + i * 2 * F + F + j);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            g = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(act + i * F + j, _mm256_mul_ps(g, u));
        }
        if ((rc = linear(m->mm, m->isa, &ly->down, act, T, F, x, threads))) return rc;
        for (long j = 0; j < (long)T * D; j++) h[j] += x[j];
    }
    rmsnorm(h, m->final_norm, m->eps, T, D, x);
    memcpy(h, x, (long)T * D * sizeof(float));
    if (!st->keep) return 0; /* (keep without a head: the argmax rejects type 0, -2) */
    /* The kept rows side by side in x, then their argmax through the head in one call. */
    int kept = 0;
    for (int s = 0, end = 0; s < st->S; s++) {
        end += st->n[s];
        memcpy(x + (long)kept * D, h + (long)(end - st->keep[s]) * D, (long)st->keep[s] * D * sizeof(float));
        kept += st->keep[s];
    }
    return kept ? m->am(m->isa, m->head.type, x, kept, D, m->head.qs, m->head.sc, m->head.n, st->out, threads) : 0;
}
