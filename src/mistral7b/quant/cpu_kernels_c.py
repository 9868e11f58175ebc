"""The C source of cpu_kernels, in a Python module so that every install carries it (no package data): the
quantization, the dot products and the entry point; the threads come from `cpu_pool`."""

from ..cpu_pool import CLIENT

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
static inline float h2f(uint16_t h) {
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    return _cvtsh_ss(h);
#else  // exact through ldexpf; the all-ones exponent is inf or nan
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v = exp == 0x1f ? (man ? NAN : INFINITY) : ldexpf((float)(exp ? man | 0x400 : man), (exp ? exp : 1) - 25);
    return h & 0x8000 ? -v : v;
#endif
}

int m7b_abi(void) { return 5; }

static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) sum += qx[b * QK + i] = (int8_t)lrintf(v[i] * id);
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

#if defined(M7B_VNNI)
// A pair of weight blocks as dpbusd's unsigned operand: nibbles in the x layout [b lo | b hi | b+1 lo |
// b+1 hi], or |q| for int8, whose signs (`neg`) pair_dot then puts on x.
static inline __m512i pair_weights(const uint8_t *w, int bits, __mmask64 *neg) {
    if (bits == 4) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)w);
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        return _mm512_and_si512(_mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
    }
    __m512i q = _mm512_loadu_si512((const void *)w);
    *neg = _mm512_movepi8_mask(q);
    return _mm512_abs_epi8(q);
}

static inline __m512i pair_dot(__m512i wu, __mmask64 neg, int bits, const int8_t *qx) {
    __m512i x = _mm512_loadu_si512((const void *)qx);
    if (bits == 8) x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, x);
}

static inline __m512 pair_scale(const float *v) {  // [v0 x 8 | v1 x 8]
    return _mm512_insertf32x8(_mm512_set1_ps(v[0]), _mm256_set1_ps(v[1]), 1);
}

static inline void halves_to_floats(const uint16_t *h, float *f, int64_t count) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
    for (; i < count; i++) f[i] = h2f(h[i]);
}

// R weight rows x S activation rows (rows of qx k apart, of out n apart): each pair of weight blocks is
// unpacked once for all S rows. Every output takes the same float operations in the same order
// whatever R and S are (a product d * dx is the same in a lane as in a scalar), so grouping rows never
// changes a result.
static inline __attribute__((always_inline)) void grid_dot(
        int R, int S, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d, const uint16_t *m, int64_t nb,
        const int8_t *qx, int64_t k, const float *dx, const float *sx, float *out, int64_t n) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    float df[4 * nb];  // the rows' scales, widened once (not per block)
    halves_to_floats(d, df, R * nb);
    for (int r = 0; r < R; r++)  // m NULL: no offsets (symmetric int8), which saves reading a row of zeros
        for (int s = 0; s < S; s++) out[s * n + r] = m ? offset_dot(m + r * nb, sx + s * nb, nb) : 0.f;
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512 xd[4];
        for (int s = 0; s < S; s++) xd[s] = pair_scale(dx + s * nb + b);
        for (int r = 0; r < R; r++) {
            __mmask64 neg = 0;
            __m512i wu = pair_weights(w + r * wrow + b * stride, bits, &neg);
            __m512 wd = pair_scale(df + r * nb + b);
            for (int s = 0; s < S; s++) {
                __m512 p = _mm512_cvtepi32_ps(pair_dot(wu, neg, bits, qx + s * k + b * QK));
                acc[r][s] = _mm512_fmadd_ps(p, _mm512_mul_ps(wd, xd[s]), acc[r][s]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            __m256 a = _mm256_add_ps(_mm512_castps512_ps256(acc[r][s]), _mm512_extractf32x8_ps(acc[r][s], 1));
            if (b < nb) {
                __m256 p = _mm256_cvtepi32_ps(block_dot(w + r * wrow + b * stride, bits, qx + s * k + b * QK));
                a = _mm256_fmadd_ps(p, _mm256_set1_ps(df[r * nb + b] * dx[s * nb + b]), a);
            }
            out[s * n + r] += hsum(a);
        }
}
#endif

// R outputs (weight rows w + r * wrow) for one quantized input row; each row's arithmetic is the same
// whatever R is, so grouping rows never changes a result.
static inline void rows_dot(int R, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d, const uint16_t *m,
                            int64_t nb, const int8_t *qx, const float *dx, const float *sx, float *out) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    for (int r = 0; r < R; r++) out[r] = m ? offset_dot(m + r * nb, sx, nb) : 0.f;  // m NULL: symmetric int8
#if defined(M7B_AVX2)
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < R; r++) {
            __m256 p = _mm256_cvtepi32_ps(block_dot(w + r * wrow + b * stride, bits, qx + b * QK));
            acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(h2f(d[r * nb + b]) * dx[b]), acc[r]);
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
            acc += (float)s * (h2f(d[r * nb + b]) * dx[b]);
        }
        out[r] += acc;
    }
#endif
}

#if defined(M7B_AVX2)
// R weight rows x S activation rows, as rows_dot does each pair (its float operations in its order, so
// grouping never changes a result), with each weight block unpacked once for all S rows: a verify's or a
// prefill's rows cost less than as many one-row passes (AVX2 has no VNNI grid_dot).
static inline __attribute__((always_inline)) void grid_dot_avx2(
        int R, int S, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d, const uint16_t *m, int64_t nb,
        const int8_t *qx, int64_t k, const float *dx, const float *sx, float *out, int64_t n) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) out[s * n + r] = m ? offset_dot(m + r * nb, sx + s * nb, nb) : 0.f;
    __m256 acc[2][8];
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * wrow + b * stride;
            // The weight's scale widened once for the S rows; each row's product d * dx a vector multiply
            // of a broadcast load (rows_dot's scalar product, the same bits), not a multiply and a shuffle.
            const __m256 wd = _mm256_set1_ps(h2f(d[r * nb + b]));
            __m256i q = bits == 4 ? load_q4(wb) : _mm256_loadu_si256((const __m256i *)wb);
            __m256i u = bits == 4 ? q : _mm256_sign_epi8(q, q);  // int8: |q|, its sign put on x below
            for (int s = 0; s < S; s++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(qx + s * k + b * QK));
                if (bits == 8) x = _mm256_sign_epi8(x, q);
                __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u, x));
                acc[r][s] = _mm256_fmadd_ps(p, _mm256_mul_ps(wd, _mm256_broadcast_ss(dx + s * nb + b)), acc[r][s]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) out[s * n + r] += hsum(acc[r][s]);
}
#endif

#if defined(M7B_VNNI)
#define GRID grid_dot
#define GRID_ROWS 4
#elif defined(M7B_AVX2)
#define GRID grid_dot_avx2
#define GRID_ROWS 2
#endif

#ifdef GRID
// Outputs [lo, hi) of every activation row, in grids of GRID_ROWS weight rows x up to 4 activation rows.
static void grid_tile(int64_t lo, int64_t hi, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d,
                      const uint16_t *m, int64_t nb, int64_t rows, int64_t k, int64_t n, const int8_t *qx,
                      const float *dx, const float *sx, float *out) {
#if defined(M7B_AVX2)
    if (rows > 4 && rows <= 8) {  // a verify of k + 1 <= 8 tokens: one pass over the weights, not two
        for (int64_t j = lo; j < hi; j++) {
            const uint8_t *wj = w + j * wrow;
            const uint16_t *dj = d + j * nb, *mj = m ? m + j * nb : m;
            switch (rows) {
                case 8: GRID(1, 8, wj, wrow, bits, dj, mj, nb, qx, k, dx, sx, out + j, n); break;
                case 7: GRID(1, 7, wj, wrow, bits, dj, mj, nb, qx, k, dx, sx, out + j, n); break;
                case 6: GRID(1, 6, wj, wrow, bits, dj, mj, nb, qx, k, dx, sx, out + j, n); break;
                default: GRID(1, 5, wj, wrow, bits, dj, mj, nb, qx, k, dx, sx, out + j, n);
            }
        }
        return;
    }
#endif
    for (int64_t s = 0; s < rows; s += 4) {
        const int S = rows - s < 4 ? (int)(rows - s) : 4;
        const int8_t *xs = qx + s * k;
        const float *dxs = dx + s * nb, *sxs = sx + s * nb;
        int64_t j = lo;
        for (; j + GRID_ROWS <= hi; j += GRID_ROWS) {
            const uint8_t *wj = w + j * wrow;
            const uint16_t *dj = d + j * nb, *mj = m ? m + j * nb : m;
            float *o = out + s * n + j;
            switch (S) {  // constant shapes, so that each grid's accumulators stay in registers
                case 4: GRID(GRID_ROWS, 4, wj, wrow, bits, dj, mj, nb, xs, k, dxs, sxs, o, n); break;
                case 3: GRID(GRID_ROWS, 3, wj, wrow, bits, dj, mj, nb, xs, k, dxs, sxs, o, n); break;
                case 2: GRID(GRID_ROWS, 2, wj, wrow, bits, dj, mj, nb, xs, k, dxs, sxs, o, n); break;
                default: GRID(GRID_ROWS, 1, wj, wrow, bits, dj, mj, nb, xs, k, dxs, sxs, o, n);
            }
        }
        for (; j < hi; j++)
            GRID(1, S, w + j * wrow, wrow, bits, d + j * nb, m ? m + j * nb : m, nb, xs, k, dxs, sxs, out + s * n + j, n);
    }
}
#endif

// Outputs [lo, hi) of every activation row. AVX2 takes one row (decode) through rows_dot, 4 weight rows
// at a time, and several (a verify, a prefill) through grids that unpack each weight block once.
static void tile_dot(int64_t lo, int64_t hi, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d,
                     const uint16_t *m, int64_t nb, int64_t rows, int64_t k, int64_t n, const int8_t *qx,
                     const float *dx, const float *sx, float *out) {
#if defined(M7B_VNNI)
    grid_tile(lo, hi, w, wrow, bits, d, m, nb, rows, k, n, qx, dx, sx, out);
#else
#if defined(M7B_AVX2)
    if (rows > 1) {
        grid_tile(lo, hi, w, wrow, bits, d, m, nb, rows, k, n, qx, dx, sx, out);
        return;
    }
#endif
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
    const float *dx, *sx;
    const int8_t *qx;
    float *out;
    int64_t rows, k, n, nb, wrow;
    int bits;
} Job;

#define TILE 16

static void run_tile(const void *ctx, int64_t t) {
    const Job *j = ctx;
    const int64_t lo = t * TILE, hi = lo + TILE < j->n ? lo + TILE : j->n;
    tile_dot(lo, hi, j->w, j->wrow, j->bits, j->d, j->m, j->nb, j->rows, j->k, j->n, j->qx, j->dx, j->sx, j->out);
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
    const int64_t nb = k / QK;
    int8_t *qx = malloc(rows * k);
    float *dx = malloc(sizeof(float) * rows * nb * 2);
    float *scratch = bf16 ? malloc(sizeof(float) * (k > n ? k : n) * rows) : NULL;
    if (!qx || !dx || (bf16 && !scratch)) {
        free(qx);
        free(dx);
        free(scratch);
        return -1;
    }
    float *sx = dx + rows * nb;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = (const float *)x + r * k;
        if (bf16) {
            for (int64_t i = 0; i < k; i++) scratch[i] = from_bf16(((const uint16_t *)x)[r * k + i]);
            row = scratch;
        }
        quantize_row(row, k, qx + r * k, dx + r * nb, sx + r * nb);
    }
    float *result = bf16 ? scratch : (float *)out;
    Job j = {w, d, m, dx, sx, qx, result, rows, k, n, nb, bits == 4 ? k / 2 : k, bits};
    run_tiles(run_tile, &j, (n + TILE - 1) / TILE, threads);
    if (bf16)
        for (int64_t i = 0; i < rows * n; i++) ((uint16_t *)out)[i] = to_bf16(scratch[i]);
    free(qx);
    free(dx);
    free(scratch);
    return 0;
}
"""

SOURCE = DOTS + CLIENT + ENTRY
