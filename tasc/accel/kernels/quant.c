/* Quantised linear layers for CPU decoding: y (M, N) = x (M, K) @ W^T, with W (N, K) stored in
 * GGUF's Q8_0, Q4_0 or Q4_1 blocks of 32 weights along K (tasc.accel.quant).
 *
 * Contract
 *   - K is a multiple of 32 (nb = K / 32 blocks a row). W is packed by tasc.accel.quant:
 *     columns in groups of 16 (N padded with zero blocks); for group j and block b, the fp16
 *     scales of its 16 columns, sc[j][b][16] (Q4_1: then their mins, [j][b][2][16]), and their
 *     quants, qs[j][b][chunk][16 columns][4 bytes]: chunk g holds bytes 4g..4g+3 of each
 *     column's GGUF quants (Q8_0: int8 elements 4g..4g+3, g < 8; Q4_0/Q4_1: g < 4, low
 *     nibbles elements 4g..4g+3, high nibbles 16+4g..16+4g+3). The values are the GGUF ones:
 *     Q8_0 q*d, Q4_0 (q-8)*d, Q4_1 q*d+m.
 *   - Each row of x (finite) is quantised per block as llama.cpp's q8_0/q8_1: da = maxabs/127,
 *     a_i = round-half-even(x_i * (1/da)) in [-127, 127], sa = da * sum(a_i).
 *   - Each output element is, exactly: acc = 0; for b = 0..nb-1 in order: i = the integer dot
 *     of the block's quants (exact in int32), acc = fma((float)i, d_b * da_b, acc), and for Q4_1
 *     then acc = fma(m_b, sa_b, acc). One lane of a vector register is one column, so y[m][n]
 *     depends on x[m] and column n only: bitwise the same for any M, whichever rows share the
 *     call, any thread count (threads claim runs of column groups), and in every variant.
 *     Built with -ffp-contract=off, so that no compiler fuses the products and sums written apart.
 *   - Variants, one library: "ref" (portable C), "avx2" (AVX2 maddubs), "avxvnni" (VEX
 *     vpdpbusd, 8 columns a register), "vnni" (AVX-512 VNNI, 16 columns a register). Each is
 *     compiled for its instruction set with function target attributes; the caller chooses one
 *     (tasc.accel.quant probes it in a child process with tasc_quant_selftest first). No AMX.
 *   - Up to 8 rows (AVX2 registers: 4) share each load and unpacking of a weight block; more
 *     rows take further passes over the column group's blocks, by then in cache. So a verify step
 *     of 1 + k rows streams the weights from memory once, like a one-token step.
 *   - tasc_quant_argmax: for each row the column of the largest output (ties: the smallest id;
 *     a NaN wins), from the same outputs, without writing the (M, N) logits.
 *
 * Why: a decode step reads every weight once. fp32 weights are 6.4x the bytes of Q4_1; the int8
 * dot products keep the arithmetic below the memory traffic for the rows of a verify step.
 */
#ifndef TASC_QUANT_PASS
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* GGML type ids */
#define GROUP 16                        /* columns a group */
#define RMAX 8                          /* rows sharing a weight block (the most of any variant) */
/* An int32 i (|i| < 2^22; a block dot is below 32 * 128 * 127) accumulated on MAGIC has the
 * bits of the float MAGIC_F + i, so bits - MAGIC_F is (float)i exactly: a float subtraction,
 * which more vector ports execute than the int-to-float conversion. */
#ifndef PREFETCH
#define PREFETCH 4096 /* bytes ahead in the quants stream (the scales: in proportion) */
#endif
#define MAGIC 0x4B400000
#define MAGIC_F 12582912.0f

static int qbytes(int type) { return type == Q8_0 ? 512 : 256; } /* quant bytes a group-block */
static int nscales(int type) { return type == Q4_1 ? 32 : 16; }  /* fp16 values a group-block */
/* M rows in `chunks` chunks as even as possible: chunk c's row count and first row. */
static inline int chunk_rows(int M, int chunks, int c) { return M / chunks + (c < M % chunks); }
static inline int chunk_start(int M, int chunks, int c) { return c * (M / chunks) + (c < M % chunks ? c : M % chunks); }

/* A chunk's activation record of block b (see quantize): REC bytes a row. */
#define REC 44
static inline int32_t act_q(const uint8_t *rec, int R, int g, int r) { /* elements 4g..4g+3 */
    int32_t v;
    memcpy(&v, rec + 4 * (g * R + r), 4);
    return v;
}
static inline float act_da(const uint8_t *rec, int R, int r) {
    float v;
    memcpy(&v, rec + 32 * R + 4 * r, 4);
    return v;
}
static inline float act_sa(const uint8_t *rec, int R, int r) {
    float v;
    memcpy(&v, rec + 36 * R + 4 * r, 4);
    return v;
}
static inline int32_t act_start(const uint8_t *rec, int R, int r) {
    int32_t v;
    memcpy(&v, rec + 40 * R + 4 * r, 4);
    return v;
}

/* IEEE half -> float, exact (vcvtph2ps gives the same values). */
static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {
        float f = (float)m * 0x1p-24f; /* zero or subnormal */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0);
    } else {
        u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Better in argmax order: larger, or a NaN over a number (torch.argmax); ties keep the first. */
static inline int better(float v, float best) { return v > best || (v != v && best == best); }

typedef int (*run_fn)(int type, const float *x, int M, int K, const uint8_t *qs, const uint16_t *sc,
                      int N, float *out, int threads, int64_t *ids);

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(x) CAT(x, SFX)
#define AI static inline __attribute__((always_inline)) TGT

#define TASC_QUANT_PASS 0
#define SFX ref
#define TGT
#define ROWS 8
#define Q8_BIAS 0
#include __FILE__
#undef SFX
#undef TGT
#undef ROWS
#undef Q8_BIAS
#undef TASC_QUANT_PASS

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8)
#include <immintrin.h>
#define HAVE_AVX2 1
#define TASC_QUANT_PASS 1
#define SFX avx2
#define TGT __attribute__((target("avx2,fma,f16c")))
#define ROWS 4
#define Q8_BIAS 0
#include __FILE__
#undef SFX
#undef TGT
#undef ROWS
#undef Q8_BIAS
#undef TASC_QUANT_PASS

#define HAVE_VNNI 1
#define TASC_QUANT_PASS 3
#define SFX vnni
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define ROWS 8
#define Q8_BIAS 128
#include __FILE__
#undef SFX
#undef TGT
#undef ROWS
#undef Q8_BIAS
#undef TASC_QUANT_PASS

#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11
#define HAVE_AVXVNNI 1
#define TASC_QUANT_PASS 2
#define SFX avxvnni
#define TGT __attribute__((target("avxvnni,avx2,fma,f16c")))
#define ROWS 4
#define Q8_BIAS 128
#include __FILE__
#undef SFX
#undef TGT
#undef ROWS
#undef Q8_BIAS
#undef TASC_QUANT_PASS
#endif
#endif

/* Variants by id: 0 ref, 1 avx2, 2 avxvnni, 3 vnni (tasc.accel.quant.ISAS). */
static run_fn variant(int isa) {
    switch (isa) {
    case 0: return run_ref;
#ifdef HAVE_AVX2
    case 1: return run_avx2;
#endif
#ifdef HAVE_AVXVNNI
    case 2: return run_avxvnni;
#endif
#ifdef HAVE_VNNI
    case 3: return run_vnni;
#endif
    default: return 0;
    }
}

/* Bit i set: variant i is compiled in (whether this CPU runs it is for the caller to probe). */
int tasc_quant_isas(void) {
    int mask = 0;
    for (int i = 0; i < 4; i++) mask |= variant(i) ? 1 << i : 0;
    return mask;
}

static int check(int isa, int type, int K) {
    if (!variant(isa)) return -3;
    if (type != Q8_0 && type != Q4_0 && type != Q4_1) return -2;
    return K <= 0 || K % 32 ? -1 : 0;
}

/* out (M, N) row-major. Returns 0, or -1 (K not a positive multiple of 32), -2 (type),
 * -3 (variant not compiled), -4 (out of memory). */
int tasc_quant_matmul(int isa, int type, const float *x, int M, int K, const uint8_t *qs, const uint16_t *sc,
                      int N, float *out, int threads) {
    int rc = check(isa, type, K);
    return rc ? rc : variant(isa)(type, x, M, K, qs, sc, N, out, threads, 0);
}

/* ids (M,) int64: the argmax of each row of x @ W^T (as tasc_quant_matmul computes it). */
int tasc_quant_argmax(int isa, int type, const float *x, int M, int K, const uint8_t *qs, const uint16_t *sc,
                      int N, int64_t *ids, int threads) {
    int rc = check(isa, type, K);
    return rc ? rc : variant(isa)(type, x, M, K, qs, sc, N, 0, threads, ids);
}

static uint32_t lcg(uint32_t *s) { return *s = *s * 1664525u + 1013904223u; }

/* 0 when variant isa gives bitwise the ref outputs and ids on pseudo-random weights of each
 * format (3 column groups, the last partial; zero, tied and large activations); else nonzero.
 * Run in a child process before the first use of a variant: a CPU or an OS that does not
 * run its instructions kills the child, not the caller. */
int tasc_quant_selftest(int isa) {
    enum { K = 96, N = 40, NB = K / 32, G = (N + GROUP - 1) / GROUP, MT = 17 };
    static const int types[3] = {Q8_0, Q4_0, Q4_1}, rows[6] = {1, 2, 5, 8, 9, MT};
    run_fn f = variant(isa);
    if (!f) return -3;
    uint32_t seed = 12345u;
    float x[MT * K], a[MT * N], b[MT * N];
    int64_t ia[MT], ib[MT];
    for (int i = 0; i < MT * K; i++) x[i] = (float)((int32_t)(lcg(&seed) >> 8) - (1 << 23)) * 0x1p-21f;
    for (int i = 0; i < 32; i++) x[K + i] = 0.0f;             /* a zero block */
    for (int i = 0; i < K; i++) x[2 * K + i] = (i % 3) * 0.5f; /* rounding ties */
    x[3 * K + 7] = 3.0e4f;
    for (int t = 0; t < 3; t++) {
        int type = types[t], fails = 0;
        size_t nq = (size_t)G * NB * qbytes(type), ns = (size_t)G * NB * nscales(type);
        uint8_t *qs = malloc(nq);
        uint16_t *sc = malloc(ns * 2);
        if (!qs || !sc) return free(qs), free(sc), -4;
        for (size_t i = 0; i < nq; i++) qs[i] = (uint8_t)(lcg(&seed) >> 24);
        for (size_t i = 0; i < ns; i++) /* |value| in [2^-6, 2^2) */
            sc[i] = (uint16_t)(((lcg(&seed) >> 31) << 15) | ((9 + (lcg(&seed) >> 29)) << 10) | (lcg(&seed) >> 22));
        for (int r = 0; r < 6 && !fails; r++) {
            int M = rows[r];
            fails |= run_ref(type, x, M, K, qs, sc, N, a, 1, 0) | f(type, x, M, K, qs, sc, N, b, 1, 0);
            fails |= memcmp(a, b, sizeof(float) * M * N) != 0;
            fails |= run_ref(type, x, M, K, qs, sc, N, 0, 1, ia) | f(type, x, M, K, qs, sc, N, 0, 1, ib);
            fails |= memcmp(ia, ib, sizeof(int64_t) * M) != 0;
        }
        free(qs);
        free(sc);
        if (fails) return 1 + t;
    }
    return 0;
}

#else /* ------------------------------------------------------------- one variant (SFX, TGT) */

/* One block of 32 activations: q = round-to-nearest-even(v / d) in [-127, 127] with d =
 * maxabs / 127 (the max taken on the bits of |v|); returns d, *sum = the sum of q. Each
 * variant's code does the same IEEE operations (exact, or one rounding each), so they agree. */
#if TASC_QUANT_PASS == 0
static float NAME(qblock)(const float *v, int8_t *q, int32_t *sum) {
    uint32_t top = 0;
    for (int i = 0; i < 32; i++) {
        uint32_t u;
        memcpy(&u, v + i, 4);
        u &= 0x7fffffffu;
        top = u > top ? u : top;
    }
    float amax, d, id;
    memcpy(&amax, &top, 4);
    d = amax / 127.0f;
    id = d != 0.0f ? 1.0f / d : 0.0f;
    *sum = 0;
    for (int i = 0; i < 32; i++) {
        float t = v[i] * id;
        t = (t + 0x1.8p23f) - 0x1.8p23f; /* round to nearest even, |t| < 2^22 */
        t = t > 127.0f ? 127.0f : t < -127.0f ? -127.0f : t;
        q[i] = (int8_t)t;
        *sum += q[i];
    }
    return d;
}
#elif TASC_QUANT_PASS == 3
AI float NAME(qblock)(const float *v, int8_t *q, int32_t *sum) {
    const __m512i abs = _mm512_set1_epi32(0x7fffffff);
    __m512 x0 = _mm512_loadu_ps(v), x1 = _mm512_loadu_ps(v + 16);
    uint32_t top = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(x0), abs),
                                                            _mm512_and_si512(_mm512_castps_si512(x1), abs)));
    float amax, d, id;
    memcpy(&amax, &top, 4);
    d = amax / 127.0f;
    id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id), mg = _mm512_set1_ps(0x1.8p23f), hi = _mm512_set1_ps(127.0f),
                 lo = _mm512_set1_ps(-127.0f);
    __m512 t0 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x0, vid), mg), mg);
    __m512 t1 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x1, vid), mg), mg);
    __m512i i0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t0, lo), hi));
    __m512i i1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t1, lo), hi));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(i1));
    return d;
}
#else
AI float NAME(qblock)(const float *v, int8_t *q, int32_t *sum) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff);
    __m256 x[4];
    __m256i m = _mm256_setzero_si256(), i[4];
    for (int k = 0; k < 4; k++) {
        x[k] = _mm256_loadu_ps(v + 8 * k);
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(x[k]), abs));
    }
    m = _mm256_max_epu32(m, _mm256_permute2x128_si256(m, m, 1));
    m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0x4e));
    m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0xb1));
    uint32_t top = (uint32_t)_mm256_cvtsi256_si32(m);
    float amax, d, id;
    memcpy(&amax, &top, 4);
    d = amax / 127.0f;
    id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id), mg = _mm256_set1_ps(0x1.8p23f), hi = _mm256_set1_ps(127.0f),
                 lo = _mm256_set1_ps(-127.0f);
    __m256i s = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        __m256 t = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x[k], vid), mg), mg);
        i[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi));
        s = _mm256_add_epi32(s, i[k]);
    }
    s = _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 1));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0x4e));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xb1));
    *sum = _mm256_cvtsi256_si32(s);
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, b);
    return d;
}
#endif

/* Quantises block b of the R rows of x (a chunk of rows) into act: per block a record of REC * R bytes,
 * the quants as int32 words [8 chunks g][R rows] (elements 4g..4g+3), then per row da, sa =
 * da * sum(quants), and the integer start of the block's dot: MAGIC plus the correction of the
 * variant's unsigned weights (Q4_0: -8 * sum; Q8_0 stored as w + 128 where Q8_BIAS: -128 * sum). */
static TGT void NAME(quantize)(int type, const float *x, int R, int K, int b, uint8_t *act) {
    const int unit = type == Q4_0 ? -8 : type == Q8_0 ? -Q8_BIAS : 0;
    uint8_t *rec = act + (size_t)b * REC * R;
    for (int r = 0; r < R; r++) {
        int8_t q[32];
        int32_t sum, start;
        float d = NAME(qblock)(x + (size_t)r * K + (size_t)b * 32, q, &sum), sa = d * (float)sum;
        for (int g = 0; g < 8; g++) memcpy(rec + 4 * (g * R + r), q + 4 * g, 4);
        start = MAGIC + unit * sum;
        memcpy(rec + 32 * R + 4 * r, &d, 4);
        memcpy(rec + 36 * R + 4 * r, &sa, 4);
        memcpy(rec + 40 * R + 4 * r, &start, 4);
    }
}

#if TASC_QUANT_PASS == 0 /* ----------------------------------------------------- portable C */

static void NAME(rows)(int type, int R, const uint8_t *act, int nb, const uint8_t *qs, const uint16_t *sc,
                       float *out, int ldo) {
    const int QB = qbytes(type), SC = nscales(type), off = type == Q4_0 ? 8 : 0;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < GROUP; c++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *q = qs + (size_t)b * QB, *rec = act + (size_t)b * REC * R;
                const uint16_t *s16 = sc + (size_t)b * SC;
                int32_t i = 0;
                for (int g = 0; g < (type == Q8_0 ? 8 : 4); g++)
                    for (int k = 0; k < 4; k++) {
                        int a = (int8_t)rec[4 * (g * R + r) + k], v = q[64 * g + 4 * c + k];
                        if (type == Q8_0)
                            i += (int8_t)v * a;
                        else
                            i += ((v & 15) - off) * a + ((v >> 4) - off) * (int8_t)rec[4 * ((g + 4) * R + r) + k];
                    }
                acc = fmaf((float)i, h2f(s16[c]) * act_da(rec, R, r), acc);
                if (type == Q4_1) acc = fmaf(h2f(s16[16 + c]), act_sa(rec, R, r), acc);
            }
            out[(size_t)r * ldo + c] = acc;
        }
}

#elif TASC_QUANT_PASS == 1 || TASC_QUANT_PASS == 2 /* ------------- 8 columns a ymm register */

/* Columns 8h..8h+7 of a group; R <= 4 rows (16 ymm registers). */
AI void NAME(half)(const int type, const int R, const int h, const uint8_t *act, int nb, const uint8_t *qs,
                   const uint16_t *sc, float *out, int ldo) {
    const int QB = qbytes(type), SC = nscales(type);
    const __m256i low = _mm256_set1_epi8(0x0F);
#if TASC_QUANT_PASS == 1
    const __m256i ones = _mm256_set1_epi16(1);
#else
    const __m256i bias = _mm256_set1_epi8((char)0x80);
#endif
    __m256 f[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) f[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *q = qs + (size_t)b * QB + 32 * h, *rec = act + (size_t)b * REC * R;
        const uint16_t *s16 = sc + (size_t)b * SC + 8 * h;
        __m256i acc[4];
        if (h == 0) { /* the second half finds the group in cache */
#pragma GCC unroll 8
            for (int l = 0; l < QB; l += 64) _mm_prefetch((const char *)q + PREFETCH + l, _MM_HINT_T0);
            _mm_prefetch((const char *)s16 + PREFETCH * SC / QB * 2, _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) /* avx2 Q4: int16 sums first, the start added after */
            acc[r] = TASC_QUANT_PASS == 1 && type != Q8_0 ? _mm256_setzero_si256()
                                                          : _mm256_set1_epi32(act_start(rec, R, r));
        if (type == Q8_0) {
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(q + 64 * g));
#if TASC_QUANT_PASS == 1
                __m256i wa = _mm256_abs_epi8(w); /* |w| * sign(a, w) = w * a; |-128| = 128 unsigned */
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m256i s = _mm256_sign_epi8(_mm256_set1_epi32(act_q(rec, R, g, r)), w);
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s), ones));
                }
#else
                __m256i wb = _mm256_xor_si256(w, bias); /* w + 128 unsigned */
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    acc[r] = _mm256_dpbusd_avx_epi32(acc[r], wb, _mm256_set1_epi32(act_q(rec, R, g, r)));
#endif
            }
        } else {
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 64 * g));
                __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m256i al = _mm256_set1_epi32(act_q(rec, R, g, r)), ah = _mm256_set1_epi32(act_q(rec, R, g + 4, r));
#if TASC_QUANT_PASS == 1 /* pairs <= 2 * 15 * 127, eight of them fit int16 */
                    acc[r] = _mm256_add_epi16(acc[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, al),
                                                                       _mm256_maddubs_epi16(hi, ah)));
#else
                    acc[r] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc[r], lo, al), hi, ah);
#endif
                }
            }
#if TASC_QUANT_PASS == 1
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_add_epi32(_mm256_madd_epi16(acc[r], ones), _mm256_set1_epi32(act_start(rec, R, r)));
#endif
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s16));
        const __m256 mn = type == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + 16))) : d;
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m256 fi = _mm256_sub_ps(_mm256_castsi256_ps(acc[r]), _mm256_set1_ps(MAGIC_F));
            f[r] = _mm256_fmadd_ps(fi, _mm256_mul_ps(d, _mm256_set1_ps(act_da(rec, R, r))), f[r]);
            if (type == Q4_1) f[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(act_sa(rec, R, r)), f[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + (size_t)r * ldo + 8 * h, f[r]);
}

AI void NAME(rows)(const int type, const int R, const uint8_t *act, int nb, const uint8_t *qs, const uint16_t *sc,
                   float *out, int ldo) {
    NAME(half)(type, R, 0, act, nb, qs, sc, out, ldo);
    NAME(half)(type, R, 1, act, nb, qs, sc, out, ldo);
}

#elif TASC_QUANT_PASS == 3 /* ----------------------------------- 16 columns a zmm register */

/* A whole group; R <= 8 rows: 8 weight registers, R integer and R float accumulators. The
 * rows' dot chains are interleaved (chunk-major) so that two vpdpbusd a cycle find work. */
AI void NAME(rows)(const int type, const int R, const uint8_t *act, int nb, const uint8_t *qs, const uint16_t *sc,
                   float *out, int ldo) {
    const int QB = qbytes(type), SC = nscales(type);
    const __m512i low = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8((char)0x80);
    __m512 f[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *q = qs + (size_t)b * QB, *rec = act + (size_t)b * REC * R;
        const uint16_t *s16 = sc + (size_t)b * SC;
        __m512i w[8], acc[8]; /* w[g]: elements 4g..4g+3 of the 16 columns */
#pragma GCC unroll 8
        for (int l = 0; l < QB; l += 64) _mm_prefetch((const char *)q + PREFETCH + l, _MM_HINT_T0);
        _mm_prefetch((const char *)s16 + PREFETCH * SC / QB * 2, _MM_HINT_T0);
        if (type == Q8_0) {
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) /* w + 128 unsigned */
                w[g] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + 64 * g)), bias);
        } else {
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                __m512i raw = _mm512_loadu_si512((const void *)(q + 64 * g));
                w[g] = _mm512_and_si512(raw, low);
                w[g + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) acc[r] = _mm512_set1_epi32(act_start(rec, R, r));
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++)
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r] = _mm512_dpbusd_epi32(acc[r], w[g], _mm512_set1_epi32(act_q(rec, R, g, r)));
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s16));
        const __m512 mn = type == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s16 + 16))) : d;
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512 fi = _mm512_sub_ps(_mm512_castsi512_ps(acc[r]), _mm512_set1_ps(MAGIC_F));
            f[r] = _mm512_fmadd_ps(fi, _mm512_mul_ps(d, _mm512_set1_ps(act_da(rec, R, r))), f[r]);
            if (type == Q4_1) f[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(act_sa(rec, R, r)), f[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (size_t)r * ldo, f[r]);
}

#endif

#define TILE_CASE(T, R) NAME(rows)(T, R, act, nb, qs, sc, out, ldo)
#define TILE_TYPE(T)                                                                           \
    switch (R) {                                                                               \
    case 1: TILE_CASE(T, 1); break;                                                            \
    case 2: TILE_CASE(T, 2); break;                                                            \
    case 3: TILE_CASE(T, 3); break;                                                            \
    case 4: TILE_CASE(T, 4); break;                                                            \
    case 5: TILE_CASE(T, ROWS < 5 ? 4 : 5); break;                                             \
    case 6: TILE_CASE(T, ROWS < 6 ? 4 : 6); break;                                             \
    case 7: TILE_CASE(T, ROWS < 7 ? 4 : 7); break;                                             \
    default: TILE_CASE(T, ROWS < 8 ? 4 : 8); break;                                            \
    }

/* One column group and one chunk of R <= ROWS rows into out (row stride ldo, 16 columns). */
static TGT void NAME(tile)(int type, int R, const uint8_t *act, int nb, const uint8_t *qs, const uint16_t *sc,
                           float *out, int ldo) {
    if (type == Q8_0) {
        TILE_TYPE(Q8_0)
    } else if (type == Q4_0) {
        TILE_TYPE(Q4_0)
    } else {
        TILE_TYPE(Q4_1)
    }
}
#undef TILE_CASE
#undef TILE_TYPE

/* The variant's entry: out (M, N), or ids (M,) when out is NULL. Rows go in chunks of at most
 * ROWS, as even as possible, each quantised into its own records; threads claim runs of the
 * column groups. A partial last group, and argmax, go through a small buffer. */
static TGT int NAME(run)(int type, const float *x, int M, int K, const uint8_t *qs, const uint16_t *sc,
                         int N, float *out, int threads, int64_t *ids) {
    const int nb = K / 32, G = (N + GROUP - 1) / GROUP, T = threads > 1 ? threads : 1;
    const int chunks = (M + ROWS - 1) / ROWS;
    const size_t gq = (size_t)nb * qbytes(type), gs = (size_t)nb * nscales(type);
    if (M <= 0 || N <= 0) return 0;
    uint8_t *act = malloc((size_t)REC * nb * M);
    float *bv = ids ? malloc(sizeof(float) * T * M) : 0;
    int64_t *bi = ids ? malloc(sizeof(int64_t) * T * M) : 0;
    if (!act || (ids && (!bv || !bi))) {
        free(act), free(bv), free(bi);
        return -4;
    }
    if (ids)
        for (int i = 0; i < T * M; i++) bi[i] = -1;
    /* Threads claim runs of column groups as they go (not a fixed share each): a thread whose
     * core another job is using takes fewer, so a busy neighbour slows the call by its share of
     * the time, not to the pace of the slowest thread. Two runs a thread: finer claims (a layer's
     * products have 36-192 groups, a few KB each) cost more than they balanced, in contended
     * claims and in memory streams the prefetcher has to find again at every claim. */
    const int run = G / (2 * T) > 1 ? G / (2 * T) : 1;
    int next = 0;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        const int t = omp_get_thread_num();
        float tmp[RMAX * GROUP];
        /* The activations first, a block of a chunk's rows at a time, shared out among the
         * threads (done by one, it kept the others waiting in every multi-row product). Chunk c's
         * records start at act + REC nb m0, m0 its first row. */
#pragma omp for schedule(static)
        for (int u = 0; u < chunks * nb; u++) {
            const int c = u / nb, m0 = chunk_start(M, chunks, c);
            NAME(quantize)(type, x + (size_t)m0 * K, chunk_rows(M, chunks, c), K, u % nb, act + (size_t)REC * nb * m0);
        }
        for (;;) {
            int j0;
#pragma omp atomic capture
            j0 = next++;
            j0 *= run;
            if (j0 >= G) break;
            for (int j = j0; j < j0 + run && j < G; j++) {
                const int cols = N - GROUP * j < GROUP ? N - GROUP * j : GROUP;
                for (int c = 0, m0 = 0; c < chunks; c++) {
                    const int R = chunk_rows(M, chunks, c);
                    const uint8_t *a = act + (size_t)REC * nb * m0;
                    if (out && cols == GROUP) {
                        NAME(tile)(type, R, a, nb, qs + j * gq, sc + j * gs, out + (size_t)m0 * N + (size_t)GROUP * j, N);
                    } else {
                        NAME(tile)(type, R, a, nb, qs + j * gq, sc + j * gs, tmp, GROUP);
                        for (int r = 0; r < R && out; r++)
                            memcpy(out + (size_t)(m0 + r) * N + (size_t)GROUP * j, tmp + r * GROUP, sizeof(float) * cols);
                        for (int r = 0; r < R && ids; r++) {
                            float *best = bv + (size_t)t * M + m0 + r;
                            int64_t *arg = bi + (size_t)t * M + m0 + r;
                            for (int k = 0; k < cols; k++)
                                if (*arg < 0 || better(tmp[r * GROUP + k], *best))
                                    *best = tmp[r * GROUP + k], *arg = (int64_t)GROUP * j + k;
                        }
                    }
                    m0 += R;
                }
            }
        }
    }
    for (int m = 0; ids && m < M; m++) { /* each thread's best; equal values: the smallest id */
        ids[m] = bi[m];
        float best = bv[m];
        for (int t = 1; t < T; t++) {
            const float v = bv[(size_t)t * M + m];
            const int64_t i = bi[(size_t)t * M + m];
            const int tie = v == best || (v != v && best != best);
            if (i >= 0 && (ids[m] < 0 || better(v, best) || (tie && i < ids[m]))) best = v, ids[m] = i;
        }
    }
    free(act), free(bv), free(bi);
    return 0;
}

#endif
