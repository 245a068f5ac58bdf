/* Load-time work on GGUF block-quantised weights (tasc.accel.quant): quantising float weights
 * into Q8_0, Q4_0 or Q4_1 blocks, and packing blocks into the kernel layout of quant.c.
 *
 * Contract
 *   - tasc_quantize_blocks: n_blocks runs of 32 floats (x, contiguous) -> n_blocks GGUF blocks
 *     (out: 34, 18 or 20 bytes each), the bytes of gguf.quants.quantize and of tasc's numpy
 *     path, bitwise: the same float32 operations in the same order (built with
 *     -ffp-contract=off, no fast-math), roundf/truncation, fp16 by round-to-nearest-even.
 *       Q8_0: d = amax / 127, id = d ? 1/d : 0, q_i = roundf(x_i * id); bytes fp16 d, int8 q.
 *       Q4_0: m = the element of largest |x| (the first), d = m / -8, id as above,
 *             q_i = min(15, (int)(x_i * id + 8.5)); bytes fp16 d, nibbles q_i | q_{i+16} << 4.
 *       Q4_1: lo, hi = min, max, d = (hi - lo) / 15, id as above,
 *             q_i = min(15, (int)((x_i - lo) * id + 0.5)); bytes fp16 d, fp16 lo, nibbles.
 *     Finite input expected (the loader's weights are).
 *   - tasc_pack_layout: n rows of GGUF blocks (K/32 blocks a row) -> quant.c's layout: for
 *     each group of 16 rows (the last zero-padded) and block b, the quants qs[group][b][chunk]
 *     [16][4] (chunk c: bytes 4c..4c+3 of each row's block quants) and the fp16 fields
 *     sc[group][b][field][16] (d; Q4_1: d then m). The inverse stays in Python (rarely used).
 *   - Both split their rows over `threads` OpenMP threads; results do not depend on it.
 *   - Return 0, or -2 for an unsupported type.
 *
 * Why: done in numpy, with its temporaries, quantising and laying out the weights were most of
 * a fine-tuned model's load (docs/performance.md); these loops are one pass over the bytes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* GGML type ids */
#define GROUP 16                        /* rows a packed group */

static int type_size(int type) { return type == Q8_0 ? 34 : type == Q4_0 ? 18 : type == Q4_1 ? 20 : 0; }
static int fields(int type) { return type == Q4_1 ? 2 : 1; } /* fp16 values heading a block */

/* float32 -> fp16 bits, round to nearest even, subnormals and overflow to inf as IEEE (and as
 * numpy's astype(float16)). Normal range: add the rounding bias to the float's bits; below it
 * the FPU's own rounding of an addition to a magic number does the work. */
static uint16_t f2h(float f) {
    uint32_t u, sign;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u >= 0x47800000u) /* >= 65536, inf, NaN */
        return (uint16_t)(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (u < 0x38800000u) { /* below fp16's smallest normal, 2^-14 */
        const uint32_t magic_u = 126u << 23; /* 0.5: its ulp is fp16's subnormal step 2^-24 */
        float v, magic;
        memcpy(&v, &u, 4);
        memcpy(&magic, &magic_u, 4);
        v += magic;
        memcpy(&u, &v, 4);
        return (uint16_t)(sign | (u - magic_u));
    }
    u += 0xc8000fffu + ((u >> 13) & 1u); /* rebias the exponent (-112 << 23), round half to even */
    return (uint16_t)(sign | (u >> 13));
}

static void put_h(uint8_t *p, float v) {
    uint16_t h = f2h(v);
    memcpy(p, &h, 2);
}

/* roundf (half away from zero) of |v| < 2^23, without a libm call: v - trunc(v) is exact. */
static inline int round_away(float v) {
    int t = (int)v;
    float r = v - (float)t;
    return t + (r >= 0.5f) - (r <= -0.5f);
}

static void quantize_q8_0(const float *x, uint8_t *out) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++)
        amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_h(out, d);
    for (int i = 0; i < 32; i++)
        out[2 + i] = (uint8_t)(int8_t)round_away(x[i] * id);
}

static void nibbles(const uint8_t *q, uint8_t *out) {
    for (int i = 0; i < 16; i++)
        out[i] = (uint8_t)(q[i] | q[16 + i] << 4);
}

static void quantize_q4_0(const float *x, uint8_t *out) {
    float amax = fabsf(x[0]), max = x[0]; /* the first of the largest, as numpy's argmax */
    for (int i = 1; i < 32; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        int v = (int)(x[i] * id + 8.5f);
        q[i] = (uint8_t)(v < 15 ? v : 15);
    }
    put_h(out, d);
    nibbles(q, out + 2);
}

static void quantize_q4_1(const float *x, uint8_t *out) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    float d = (hi - lo) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        int v = (int)((x[i] - lo) * id + 0.5f);
        q[i] = (uint8_t)(v < 15 ? v : 15);
    }
    put_h(out, d);
    put_h(out + 2, lo);
    nibbles(q, out + 4);
}

int tasc_quantize_blocks(int type, const float *x, int64_t n_blocks, uint8_t *out, int threads) {
    const int size = type_size(type);
    if (!size)
        return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n_blocks; b++) {
        if (type == Q8_0)
            quantize_q8_0(x + 32 * b, out + size * b);
        else if (type == Q4_0)
            quantize_q4_0(x + 32 * b, out + size * b);
        else
            quantize_q4_1(x + 32 * b, out + size * b);
    }
    return 0;
}

int tasc_pack_layout(int type, const uint8_t *blocks, int n, int K, uint8_t *qs, uint16_t *sc, int threads) {
    const int size = type_size(type);
    if (!size)
        return -2;
    const int nb = K / 32, nf = fields(type), quant_bytes = size - 2 * nf, groups = (n + GROUP - 1) / GROUP;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < groups; g++) {
        for (int b = 0; b < nb; b++) {
            uint8_t *q = qs + ((int64_t)g * nb + b) * GROUP * quant_bytes;  /* [chunk][16][4] */
            uint16_t *s = sc + ((int64_t)g * nb + b) * GROUP * nf;          /* [field][16] */
            for (int i = 0; i < GROUP; i++) {
                const int row = g * GROUP + i;
                if (row >= n) { /* padding: zero blocks */
                    for (int c = 0; c < quant_bytes / 4; c++)
                        memset(q + (c * GROUP + i) * 4, 0, 4);
                    for (int f = 0; f < nf; f++)
                        s[f * GROUP + i] = 0;
                    continue;
                }
                const uint8_t *block = blocks + ((int64_t)row * nb + b) * size;
                for (int c = 0; c < quant_bytes / 4; c++)
                    memcpy(q + (c * GROUP + i) * 4, block + 2 * nf + 4 * c, 4);
                for (int f = 0; f < nf; f++)
                    memcpy(s + f * GROUP + i, block + 2 * f, 2);
            }
        }
    }
    return 0;
}
