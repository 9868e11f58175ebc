"""The vector units' dot products of cpu_kernels (C source, part of cpu_kernels_c.SOURCE): R weight rows x
S activation rows per call, each weight block unpacked once for all S rows, as AVX-512 VNNI and AVX2 do
them. `GRID` names this build's, `GRID_ROWS` its weight rows a grid takes."""

GRIDS = r"""#if defined(M7B_VNNI)
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
        const int8_t *qx, int64_t k, const float *dx, const float *dxp, const float *sx, float *out, int64_t n) {
    const int64_t stride = bits == 4 ? QK / 2 : QK;
    (void)dxp;  // AVX2's paired scales; 512-bit pairs widen dx here
    float df[4 * nb];  // the rows' scales, widened once (not per block)
    halves_to_floats(d, df, R * nb);
    for (int r = 0; r < R; r++)  // m NULL: no offsets (symmetric int8), which saves reading a row of zeros
        for (int s = 0; s < S; s++) out[s * n + r] = m ? offset_dot(m + r * nb, sx + s * nb, nb) : 0.f;
    __m512 acc[4][8];  // R x S <= 16 (grid_tile's shapes), so that the accumulators stay in registers
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512 xd[8];
        for (int s = 0; s < S; s++) xd[s] = pair_scale(dx + s * nb + b);
        for (int r = 0; r < R; r++) {
            __mmask64 neg = 0;
            // The next R rows ahead, as grid_dot_avx2 does
            _mm_prefetch((const char *)(w + (r + R) * wrow + b * stride), _MM_HINT_T0);
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

#if defined(M7B_AVX2)
// Two blocks' scales as 8 lanes, four each: [v0 x 4 | v1 x 4].
static inline __m256 pair_lanes(__m128 v) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
}

// Blocks b and b + 1 of 4-bit weights: lo holds q[0..15] of each, hi q[16..31]; x in quantize_row's pairs.
// A maddubs lane sums two products of at most 15 * 127, so two of them add in int16 before one widening
// (a block's dot in 4 lanes: half the maddubs-to-float work of a block at a time).
static inline __m256i q4_pair_dot(__m256i lo, __m256i hi, const int8_t *x) {
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// R weight rows x S activation rows, each weight block unpacked once for all S rows. Every output takes
// the same operations in the same order whatever R and S are (a scale product is the same in any lane),
// so grouping rows never changes a result. 4-bit weights go two blocks at a time (q4_pair_dot, scales
// from `dxp`: each row's dx widened to pair_lanes' form); int8 and an odd last block one at a time.
static inline __attribute__((always_inline)) void grid_dot_avx2(
        int R, int S, const uint8_t *w, int64_t wrow, int bits, const uint16_t *d, const uint16_t *m, int64_t nb,
        const int8_t *qx, int64_t k, const float *dx, const float *dxp, const float *sx, float *out, int64_t n) {
    const int64_t stride = bits == 4 ? QK / 2 : QK, pstride = nb / 2 * 8;
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) out[s * n + r] = m ? offset_dot(m + r * nb, sx + s * nb, nb) : 0.f;
    __m256 acc[4][8];
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm256_setzero_ps();
    int64_t b = 0;
    if (bits == 4) {
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (; b + 2 <= nb; b += 2)
            for (int r = 0; r < R; r++) {
                // The next R rows' same bytes, ahead: weights stream from memory once a step (the default
                // model's 96 MB is thrice the L3) and the hardware prefetcher alone fed ~8 of ~22 GB/s here.
                _mm_prefetch((const char *)(w + (r + R) * wrow + b * stride), _MM_HINT_T0);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + r * wrow + b * stride));
                const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                int32_t two;
                memcpy(&two, d + r * nb + b, 4);
                const __m256 wd = pair_lanes(_mm_cvtph_ps(_mm_cvtsi32_si128(two)));
                for (int s = 0; s < S; s++) {
                    __m256 p = _mm256_cvtepi32_ps(q4_pair_dot(lo, hi, qx + s * k + b * QK));
                    acc[r][s] = _mm256_fmadd_ps(p, _mm256_mul_ps(wd, _mm256_loadu_ps(dxp + s * pstride + b * 4)), acc[r][s]);
                }
            }
    }
    for (; b < nb; b++)
        for (int r = 0; r < R; r++) {
            const uint8_t *wb = w + r * wrow + b * stride;
            _mm_prefetch((const char *)(wb + R * wrow), _MM_HINT_T0);
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
#define VERIFY_ROWS 2  // a verify's 5-8 rows against 2 weight rows: 10% faster than 1 (Zen 5, default model)
#elif defined(M7B_AVX2)
#define GRID grid_dot_avx2
#define GRID_ROWS 2
#define VERIFY_ROWS 1  // 2 is 10% slower: 16 ymm registers
#endif
"""
