"""The C source of cpu_kernels, in a Python module so that every install carries it (no package data): the
quantization, the portable dot products, the tiles and the entry point; the vector units' grids come from
`cpu_kernels_simd`, the threads from `cpu_pool`."""

from ..cpu_pool import CLIENT
from ..native import HALF_TO_FLOAT
from .cpu_kernels_simd import GRIDS

DOTS = r"""// Quantized weights x int8-quantized activations on the CPU: llama.cpp's q4_1 x q8_0 dot product.
//
// Activations are quantized per row in blocks of 32: qx = round(x / dx), dx = max|x| / 127, and the
// block's sum sx = dx * sum(qx) is kept. A weight block is w = d * q + m (q unsigned 4-bit nibbles, or
// signed int8), so a block's dot is d * dx * sum(q * qx) + m * sx: exactly the dequantized weights times
// the dequantized activations. (The exact sum of x in m * sx mixes two views of x: the error then
// weighs by w - m instead of w, 2.5x larger: +1.2% perplexity on the default model instead of +0.3%.)
//
// Every output (row of x, row of w) is reduced by the same code in the same order whatever the number
// of rows, the thread count or the split of outputs over threads: results are batch-invariant.
// Built with -mavx2 or -mavx512vnni (from the CPU's flags) or neither: the scalar loops are the reference.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(M7B_AVX2) || defined(M7B_VNNI)
#include <immintrin.h>
#endif

#define QK 32

// Block scales and offsets are IEEE half floats, as GGUF stores them: 2 bytes each per 32 weights.
""" + HALF_TO_FLOAT + r"""
int m7b_abi(void) { return 6; }

// `paired` (AVX2, 4-bit weights): blocks 2p and 2p + 1 interleave as q4_pair_dot reads them, halves of 16
// [2p lo | 2p+1 lo | 2p hi | 2p+1 hi] (lo: inputs 0-15 of a block); an odd last block stays in order.
static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, float *sx, int paired) {
    const int64_t nb = k / QK, pairs_end = paired ? nb / 2 * 2 : 0;
    for (int64_t b = 0; b < nb; b++) {
        const float *v = x + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int8_t *lo = qx + (b < pairs_end ? (b & ~1) * QK + (b & 1) * 16 : b * QK);  // inputs 0-15
        int8_t *hi = lo + (b < pairs_end ? 32 : 16) - 16;                            // 16-31, at hi + i
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) sum += (i < 16 ? lo : hi)[i] = (int8_t)lrintf(v[i] * id);
        dx[b] = d;
        sx[b] = d * (float)sum;
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

// A weight row's block offsets times an activation row's block sums, sum over blocks of m * sx: 8 at a
// time in 8 lanes (hsum's order), then the last nb % 8 one by one, added last. One running sum waited on
// each multiply-add: 57% of a 5-row matmul's time (AVX2, 14336 x 4096). Every path calls this for every output.
static inline float offset_dot(const uint16_t *m, const float *sx, int64_t nb) {
    int64_t b = 0;
    float tail = 0.f;
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    __m256 acc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + b))), _mm256_loadu_ps(sx + b), acc);
    for (; b < nb; b++) tail += h2f(m[b]) * sx[b];
    return hsum(acc) + tail;
#else
    float acc[8] = {0.f};
    for (; b + 8 <= nb; b += 8)
        for (int j = 0; j < 8; j++) acc[j] += h2f(m[b + j]) * sx[b + j];
    for (; b < nb; b++) tail += h2f(m[b]) * sx[b];
    return (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + tail;
#endif
}

#if !defined(M7B_AVX2) && !defined(M7B_VNNI)
// R outputs (weight rows w + r * wrow) for one quantized input row, in portable C (the reference).
static inline void rows_dot(int R, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d, const uint16_t *m,
                            int64_t nb, const int8_t *qx, const float *dx, const float *sx, float *out) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    for (int r = 0; r < R; r++) out[r] = m ? offset_dot(m + r * nb, sx, nb) : 0.f;  // m NULL: symmetric int8
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
            acc += (float)s * (h2f(d[r * nb + b]) * dx[b]);
        }
        out[r] += acc;
    }
}
#endif

"""

TILES = r"""
#ifdef GRID
// Outputs [lo, hi) of every activation row (dxp: AVX2's paired dx, nb / 2 * 8 floats a row). 5 to 8 rows (a
// verify of k + 1 <= 8 tokens) all against VERIFY_ROWS weight rows at a time: a pass over the weights, not
// two. AVX2: one row (decode) 4 weight rows at a time. Otherwise grids of GRID_ROWS weight rows x up to 4
// activation rows.
static void grid_tile(int64_t lo, int64_t hi, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d,
                      const uint16_t *m, int64_t nb, int64_t rows, int64_t k, int64_t n, const int8_t *qx,
                      const float *dx, const float *dxp, const float *sx, float *out) {
#define AT(j) w + (j) * wrow, wrow, bits, d + (j) * nb, m ? m + (j) * nb : m, nb
#if defined(M7B_AVX2)
    if (rows == 1) {
        int64_t j = lo;
        for (; j + 4 <= hi; j += 4) GRID(4, 1, AT(j), qx, k, dx, dxp, sx, out + j, n);
        for (; j < hi; j++) GRID(1, 1, AT(j), qx, k, dx, dxp, sx, out + j, n);
        return;
    }
#endif
// A verify's rows (5 to 8, constant shapes: accumulators in registers) against R weight rows at j.
#define VERIFY_GRID(R) switch (rows) {                                          \
        case 8: GRID(R, 8, AT(j), qx, k, dx, dxp, sx, out + j, n); break;      \
        case 7: GRID(R, 7, AT(j), qx, k, dx, dxp, sx, out + j, n); break;      \
        case 6: GRID(R, 6, AT(j), qx, k, dx, dxp, sx, out + j, n); break;      \
        default: GRID(R, 5, AT(j), qx, k, dx, dxp, sx, out + j, n);            \
    }
    if (rows > 4 && rows <= 8) {
        int64_t j = lo;
        for (; j + VERIFY_ROWS <= hi; j += VERIFY_ROWS) VERIFY_GRID(VERIFY_ROWS)
        for (; j < hi; j++) VERIFY_GRID(1)
        return;
    }
#undef VERIFY_GRID
    for (int64_t s = 0; s < rows; s += 4) {
        const int S = rows - s < 4 ? (int)(rows - s) : 4;
        const int8_t *xs = qx + s * k;
        const float *dxs = dx + s * nb, *dxps = dxp + s * (nb / 2 * 8), *sxs = sx + s * nb;
        int64_t j = lo;
        for (; j + GRID_ROWS <= hi; j += GRID_ROWS) {
            float *o = out + s * n + j;
            switch (S) {
#if defined(M7B_VNNI)  // two 2 x 4 grids: 13% faster than one 4 x 4 (16 accumulators, operands: near 32 registers)
                case 4: GRID(2, 4, AT(j), xs, k, dxs, dxps, sxs, o, n);
                        GRID(2, 4, AT(j + 2), xs, k, dxs, dxps, sxs, o + 2, n); break;
#else
                case 4: GRID(GRID_ROWS, 4, AT(j), xs, k, dxs, dxps, sxs, o, n); break;
#endif
                case 3: GRID(GRID_ROWS, 3, AT(j), xs, k, dxs, dxps, sxs, o, n); break;
                case 2: GRID(GRID_ROWS, 2, AT(j), xs, k, dxs, dxps, sxs, o, n); break;
                default: GRID(GRID_ROWS, 1, AT(j), xs, k, dxs, dxps, sxs, o, n);
            }
        }
        for (; j < hi; j++) GRID(1, S, AT(j), xs, k, dxs, dxps, sxs, out + s * n + j, n);
    }
#undef AT
}
#endif

// Outputs [lo, hi) of every activation row: the grids where there is a vector unit; portable C one
// activation row at a time, 4 weight rows at a time.
static void tile_dot(int64_t lo, int64_t hi, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d,
                     const uint16_t *m, int64_t nb, int64_t rows, int64_t k, int64_t n, const int8_t *qx,
                     const float *dx, const float *dxp, const float *sx, float *out) {
#ifdef GRID
    grid_tile(lo, hi, w, wrow, bits, d, m, nb, rows, k, n, qx, dx, dxp, sx, out);
#else
    (void)dxp;
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *xr = qx + r * k;
        const float *dxr = dx + r * nb, *sxr = sx + r * nb;
        float *o = out + r * n;
        int64_t j = lo;
        for (; j + 4 <= hi; j += 4) rows_dot(4, w + j * wrow, wrow, bits, d + j * nb, m ? m + j * nb : m, nb, xr, dxr, sxr, o + j);
        for (; j < hi; j++) rows_dot(1, w + j * wrow, wrow, bits, d + j * nb, m ? m + j * nb : m, nb, xr, dxr, sxr, o + j);
    }
#endif
}

"""

ENTRY = r"""// ---------------------------------------------------------------------------------------- entry point
typedef struct {
    const uint8_t *w;
    const uint16_t *d, *m;
    const float *dx, *dxp, *sx;
    const int8_t *qx;
    float *out;
    int64_t rows, k, n, nb, wrow;
    int bits;
} Job;

#define TILE 16

static void run_tile(const void *ctx, int64_t t) {
    const Job *j = ctx;
    const int64_t lo = t * TILE, hi = lo + TILE < j->n ? lo + TILE : j->n;
    tile_dot(lo, hi, j->w, j->wrow, j->bits, j->d, j->m, j->nb, j->rows, j->k, j->n, j->qx, j->dx, j->dxp, j->sx,
             j->out);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// out[M, N] = x[M, K] @ w[N, K]^T; w: bits 4 -> [N, K / 2] nibbles, bits 8 -> [N, K] int8;
// d, m: [N, K / 32] float32 (m may be NULL). x and out are float32, or bfloat16 when `bf16` is set
// (the same float32 arithmetic in between). Returns 0, or -1 when out of memory.
int m7b_linear(const void *x, int64_t rows, int64_t k, const uint8_t *w, int bits, const uint16_t *d,
               const uint16_t *m, int64_t n, void *out, int threads, int bf16) {
    const int64_t nb = k / QK, pstride = nb / 2 * 8;
#if defined(M7B_AVX2)
    const int paired = bits == 4;  // grid_dot_avx2's 4-bit pairs: qx interleaved, dx widened (dxp)
#else
    const int paired = 0;
#endif
    int8_t *qx = malloc(rows * k);
    float *dx = malloc(sizeof(float) * rows * (nb * 2 + pstride));
    float *scratch = bf16 ? malloc(sizeof(float) * (k > n ? k : n) * rows) : NULL;
    if (!qx || !dx || (bf16 && !scratch)) {
        free(qx);
        free(dx);
        free(scratch);
        return -1;
    }
    float *sx = dx + rows * nb, *dxp = sx + rows * nb;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = (const float *)x + r * k;
        if (bf16) {
            for (int64_t i = 0; i < k; i++) scratch[i] = from_bf16(((const uint16_t *)x)[r * k + i]);
            row = scratch;
        }
        quantize_row(row, k, qx + r * k, dx + r * nb, sx + r * nb, paired);
        for (int64_t i = 0; paired && i < pstride; i++) dxp[r * pstride + i] = dx[r * nb + i / 8 * 2 + i % 8 / 4];
    }
    float *result = bf16 ? scratch : (float *)out;
    Job j = {w, d, m, dx, dxp, sx, qx, result, rows, k, n, nb, bits == 4 ? k / 2 : k, bits};
    run_tiles(run_tile, &j, (n + TILE - 1) / TILE, threads);
    if (bf16)
        for (int64_t i = 0; i < rows * n; i++) ((uint16_t *)out)[i] = to_bf16(scratch[i]);
    free(qx);
    free(dx);
    free(scratch);
    return 0;
}
"""

SOURCE = DOTS + GRIDS + TILES + CLIENT + ENTRY
