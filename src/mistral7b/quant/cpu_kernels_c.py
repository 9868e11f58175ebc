"""The C source of cpu_kernels, kept in a Python module so that every install (wheel, sdist, editable)
carries it without package-data settings."""

SOURCE = r"""// Quantized weights x int8-quantized activations on the CPU: llama.cpp's q4_1 x q8_0 dot product.
//
// Activations are quantized per row in blocks of 32: qx = round(x / dx), dx = max|x| / 127, and the
// exact float sum sx of each block is kept. A weight block is w = d * q + m (q unsigned 4-bit nibbles,
// or signed int8), so a block's dot is d * dx * sum(q * qx) + m * sx.
//
// Every output (row of x, row of w) is reduced by the same code in the same order whatever the number
// of rows, the thread count or the split of outputs over threads: results are batch-invariant.
// Built by cpu_kernels.py with -mavx2 or -mavx512vnni (chosen at run time from the CPU's flags), or
// with neither: the scalar loops below are the reference for both.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(M7B_AVX2) || defined(M7B_VNNI)
#include <immintrin.h>
#endif

#define QK 32

int m7b_abi(void) { return 2; }

static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
            sum += v[i];
        }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        for (int i = 0; i < QK; i++) qx[b * QK + i] = (int8_t)lrintf(v[i] * id);
        dx[b] = d;
        sx[b] = sum;
    }
}

#if defined(M7B_AVX2) || defined(M7B_VNNI)
// 8 int32 partial sums of u * s over 32 bytes (u unsigned, s signed; |u * s| pairs fit int16).
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(M7B_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i load_q4(const uint8_t *p) {  // byte j: q[j] low nibble, q[j + 16] high
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline __m256i block_dot(const uint8_t *w, int bits, const int8_t *qx) {
    __m256i x = _mm256_loadu_si256((const __m256i *)qx);
    if (bits == 4) return dot_u8s8(load_q4(w), x);
    __m256i q = _mm256_loadu_si256((const __m256i *)w);  // signed: |q| times x with q's sign
    return dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
}
#endif

#if defined(M7B_VNNI)
// Two blocks per 512-bit register: [b lo | b hi | b+1 lo | b+1 hi] nibbles, as the x layout.
static inline __m512i block_pair_dot(const uint8_t *w, int bits, const int8_t *qx) {
    __m512i x = _mm512_loadu_si512((const void *)qx);
    if (bits == 4) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)w);
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        both = _mm512_and_si512(_mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
        return _mm512_dpbusd_epi32(_mm512_setzero_si512(), both, x);
    }
    __m512i q = _mm512_loadu_si512((const void *)w);
    __mmask64 neg = _mm512_movepi8_mask(q);
    __m512i zero = _mm512_setzero_si512();
    __m512i xs = _mm512_mask_sub_epi8(x, neg, zero, x);  // x with q's sign, |q| unsigned
    return _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(q), xs);
}
#endif

// R outputs (weight rows w + r * wrow) for one quantized input row; each row's arithmetic is the same
// whatever R is, so grouping rows never changes a result.
static inline void rows_dot(int R, const uint8_t *w, int64_t wrow, int bits, const float *d, const float *m,
                            int64_t nb, const int8_t *qx, const float *dx, const float *sx, float *out) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    for (int r = 0; r < R; r++) {
        float offset = 0.f;
        if (m)  // NULL: no offsets (symmetric int8), which saves reading a row of zeros
            for (int64_t b = 0; b < nb; b++) offset += m[r * nb + b] * sx[b];
        out[r] = offset;
    }
#if defined(M7B_VNNI)
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        for (int r = 0; r < R; r++) {
            const float *dr = d + r * nb + b;
            __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(dr[0] * dx[b]), _mm256_set1_ps(dr[1] * dx[b + 1]), 1);
            __m512 p = _mm512_cvtepi32_ps(block_pair_dot(w + r * wrow + b * stride, bits, qx + b * QK));
            acc[r] = _mm512_fmadd_ps(p, scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 a = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm512_extractf32x8_ps(acc[r], 1));
        if (b < nb) {
            __m256 p = _mm256_cvtepi32_ps(block_dot(w + r * wrow + b * stride, bits, qx + b * QK));
            a = _mm256_fmadd_ps(p, _mm256_set1_ps(d[r * nb + b] * dx[b]), a);
        }
        out[r] += hsum(a);
    }
#elif defined(M7B_AVX2)
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < R; r++) {
            __m256 p = _mm256_cvtepi32_ps(block_dot(w + r * wrow + b * stride, bits, qx + b * QK));
            acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d[r * nb + b] * dx[b]), acc[r]);
        }
    for (int r = 0; r < R; r++) out[r] += hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + r * wrow + b * stride;
            const int8_t *xb = qx + b * QK;
            int32_t s = 0;
            for (int i = 0; i < QK; i++) {
                int q = bits == 4 ? (i < 16 ? wb[i] & 15 : wb[i - 16] >> 4) : (int8_t)wb[i];
                s += q * xb[i];
            }
            acc += (float)s * (d[r * nb + b] * dx[b]);
        }
        out[r] += acc;
    }
#endif
}

static void tile_dot(int64_t lo, int64_t hi, const uint8_t *w, int64_t wrow, int bits, const float *d,
                     const float *m, int64_t nb, const int8_t *qx, const float *dx, const float *sx, float *out) {
    int64_t j = lo;
    for (; j + 4 <= hi; j += 4) rows_dot(4, w + j * wrow, wrow, bits, d + j * nb, m ? m + j * nb : m, nb, qx, dx, sx, out + j);
    for (; j < hi; j++) rows_dot(1, w + j * wrow, wrow, bits, d + j * nb, m ? m + j * nb : m, nb, qx, dx, sx, out + j);
}

// out[M, N] = x[M, K] @ w[N, K]^T; w: bits 4 -> [N, K / 2] nibbles, bits 8 -> [N, K] int8;
// d, m: [N, K / 32] float32 (m may be NULL). Returns 0, or -1 when out of memory.
int m7b_linear(const float *x, int64_t rows, int64_t k, const uint8_t *w, int bits, const float *d,
               const float *m, int64_t n, float *out, int threads) {
    const int64_t nb = k / QK, wrow = bits == 4 ? k / 2 : k, tile = 16;
    int8_t *qx = malloc(rows * k);
    float *dx = malloc(sizeof(float) * rows * nb * 2);
    if (!qx || !dx) {
        free(qx);
        free(dx);
        return -1;
    }
    float *sx = dx + rows * nb;
    for (int64_t r = 0; r < rows; r++) quantize_row(x + r * k, k, qx + r * k, dx + r * nb, sx + r * nb);
    const int64_t tiles = (n + tile - 1) / tile;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tiles > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t lo = t * tile, hi = lo + tile < n ? lo + tile : n;
        for (int64_t r = 0; r < rows; r++)
            tile_dot(lo, hi, w, wrow, bits, d, m, nb, qx + r * k, dx + r * nb, sx + r * nb, out + r * n);
    }
    free(qx);
    free(dx);
    return 0;
}
"""
