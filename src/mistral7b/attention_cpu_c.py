"""The C source of attention_cpu, in a Python module so that every install carries it (no package data):
the dot products and sums, a query token's attention, and the entry point; the threads come from
`cpu_pool`."""

from . import native

# No trapping math: without it gcc keeps the clamp in `exp_nonpositive` a branch and the loop scalar.
FLAGS = ("-fno-trapping-math",)
SOURCE = r"""// Attention of a few query tokens over a KV cache whose slots carry positions (mistral7b.attention).
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Sums in fixed lanes and a fixed tree, so one result for given inputs whoever calls; four independent
// 8-wide accumulators (an FMA's latency is four of its issue slots), explicitly where AVX2 is built: gcc
// kept the plain loops' accumulators in memory and ran 4x slower.
#if defined(M7B_AVX2) || defined(M7B_VNNI)
#include <immintrin.h>
static inline float hsum(__m256 x) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
#endif

""" + native.HALF_TO_FLOAT + r"""
// Keys and values as stored: float32, or IEEE half (M7B_KV_HALF, a float16 cache: half the bytes a step
// streams, which bound decode past a few hundred positions), widened to float32 as they are read.
#ifdef M7B_KV_HALF
typedef uint16_t kv_t;
#define KV(x) h2f(x)
#define LOAD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#else
typedef float kv_t;
#define KV(x) (x)
#define LOAD8(p) _mm256_loadu_ps(p)
#define LOAD16(p) _mm512_loadu_ps(p)
#endif

static inline float dot(const float *restrict a, const kv_t *restrict b, int64_t n) {
    int64_t d = 0;
    float total = 0.0f;
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; d + 32 <= n; d += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), LOAD8(b + d), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), LOAD8(b + d + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 16), LOAD8(b + d + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 24), LOAD8(b + d + 24), s3);
    }
    for (; d + 8 <= n; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), LOAD8(b + d), s0);
    total = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
    for (; d < n; d++) total += a[d] * KV(b[d]);
    return total;
}

// scores[i] = q . k[idx[i]] * scale. With AVX2, eight keys at a time (eight independent accumulators,
// then one transposing reduction), the rest one by one through `dot`.
static void score_keys(const float *restrict q, const kv_t *restrict k, int64_t stride, const int64_t *restrict idx,
                       int64_t n, int64_t dim, float scale, float *restrict scores) {
    int64_t i = 0;
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    if (dim % 8 == 0) {
        for (; i + 8 <= n; i += 8) {
            const kv_t *row[8];
            __m256 s[8];
            for (int r = 0; r < 8; r++) row[r] = k + idx[i + r] * stride, s[r] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 x = _mm256_loadu_ps(q + d);
                for (int r = 0; r < 8; r++) s[r] = _mm256_fmadd_ps(x, LOAD8(row[r] + d), s[r]);
            }
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
            const __m256 lo = _mm256_permute2f128_ps(h0, h1, 0x20), hi = _mm256_permute2f128_ps(h0, h1, 0x31);
            _mm256_storeu_ps(scores + i, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));
        }
    }
#endif
    for (; i < n; i++) scores[i] = dot(q, k + idx[i] * stride, dim) * scale;
}

#if defined(M7B_AVX2) || defined(M7B_VNNI)
// score_keys for G query heads over KB keys: each key row is loaded once for all G heads. Each (head, key)
// sum is score_keys' own: lanes accumulated over dim in order, then ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
static inline __attribute__((always_inline)) void score_block(int G, int KB, const float *restrict q, int64_t qstride,
        const kv_t *const *row, int64_t dim, float scale, float *restrict scores, int64_t n) {
    __m256 s[4][4];
    for (int h = 0; h < G; h++)
        for (int r = 0; r < KB; r++) s[h][r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
        __m256 key[4];
        for (int r = 0; r < KB; r++) key[r] = LOAD8(row[r] + d);
        for (int h = 0; h < G; h++) {
            const __m256 x = _mm256_loadu_ps(q + h * qstride + d);
            for (int r = 0; r < KB; r++) s[h][r] = _mm256_fmadd_ps(x, key[r], s[h][r]);
        }
    }
    for (int h = 0; h < G; h++) {
        const __m256 pairs = KB == 4 ? _mm256_hadd_ps(_mm256_hadd_ps(s[h][0], s[h][1]), _mm256_hadd_ps(s[h][2], s[h][3]))
                                     : _mm256_hadd_ps(_mm256_hadd_ps(s[h][0], s[h][1]), _mm256_setzero_ps());
        const __m128 sums = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)),
                                       _mm_set1_ps(scale));
        float lane[4];
        _mm_storeu_ps(lane, sums);
        for (int r = 0; r < KB; r++) scores[h * n + r] = lane[r];
    }
}

// score_keys for the G <= 4 heads of a KV head (rows qstride apart) into scores[h * n + i], bit for bit:
// blocks of 8 keys as score_keys takes them, each in KB-key parts (4 keys for up to 3 heads, else 2:
// G x KB accumulators stay in registers), the rest one by one through `dot`.
static inline __attribute__((always_inline)) void score_group_of(int G, const float *restrict q, int64_t qstride,
        const kv_t *restrict k, int64_t stride, const int64_t *restrict idx, int64_t n, int64_t dim, float scale,
        float *restrict scores) {
    const int KB = G <= 3 ? 4 : 2;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int part = 0; part < 8; part += KB) {
            const kv_t *row[4];
            for (int r = 0; r < KB; r++) row[r] = k + idx[i + part + r] * stride;
            score_block(G, KB, q, qstride, row, dim, scale, scores + i + part, n);
        }
    for (; i < n; i++)
        for (int h = 0; h < G; h++) scores[h * n + i] = dot(q + h * qstride, k + idx[i] * stride, dim) * scale;
}
#endif

// Every head of a KV head's group: scores[h * n + i] = q_h . k[idx[i]] * scale.
static void score_group(int64_t group, const float *restrict q, int64_t qstride, const kv_t *restrict k, int64_t stride,
                        const int64_t *restrict idx, int64_t n, int64_t dim, float scale, float *restrict scores) {
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    if (dim % 8 == 0 && group <= 4) {
        switch (group) {  // constant head counts, so that the accumulators stay in registers
            case 4: score_group_of(4, q, qstride, k, stride, idx, n, dim, scale, scores); return;
            case 3: score_group_of(3, q, qstride, k, stride, idx, n, dim, scale, scores); return;
            case 2: score_group_of(2, q, qstride, k, stride, idx, n, dim, scale, scores); return;
            default: score_group_of(1, q, qstride, k, stride, idx, n, dim, scale, scores); return;
        }
    }
#endif
    for (int64_t j = 0; j < group; j++) score_keys(q + j * qstride, k, stride, idx, n, dim, scale, scores + j * n);
}

static inline float sum(const float *restrict x, int64_t n) {
    float lane[8] = {0}, tail = 0.0f;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += x[i + l];
    for (; i < n; i++) tail += x[i];
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
}

// out[0:width] = sum_i p[i] * v[idx[i] * stride + 0:width] / total, width <= 64: with AVX2 and a width of 64,
// eight accumulators (each V row read once per query head).
static inline void weigh(const float *restrict p, const int64_t *restrict idx, int64_t n, const kv_t *restrict v,
                         int64_t stride, int64_t width, float total, float *restrict out) {
    float acc[64] = {0};
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    if (width == 64) {
        __m256 a[8];
        for (int l = 0; l < 8; l++) a[l] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            const __m256 w = _mm256_set1_ps(p[i]);
            const kv_t *row = v + idx[i] * stride;
            for (int l = 0; l < 8; l++) a[l] = _mm256_fmadd_ps(w, LOAD8(row + 8 * l), a[l]);
        }
        for (int l = 0; l < 8; l++) _mm256_storeu_ps(acc + 8 * l, a[l]);
        n = 0;  // done
    }
#endif
    for (int64_t i = 0; i < n; i++)
        for (int l = 0; l < width; l++) acc[l] += p[i] * KV(v[idx[i] * stride + l]);
    for (int l = 0; l < width; l++) out[l] = acc[l] / total;
}

#if defined(M7B_AVX2) || defined(M7B_VNNI)
// weigh for G heads at once over the width 64, in parts of PART lanes (G x PART / 8 accumulators in
// registers; with AVX-512 all 64 lanes, 16 a register, in one part): each V row part is loaded once for all
// G heads; every lane sums over the keys in weigh's order, so the width changes no bit.
static inline __attribute__((always_inline)) void weigh_group_of(int G, const float *restrict p, const int64_t *restrict idx,
        int64_t n, const kv_t *restrict v, int64_t stride, const float *total, float *const *out) {
#if defined(M7B_VNNI)  // 16 lanes: G x 4 accumulators (up to 16 of 32 registers), one pass over the keys
    __m512 a[4][4];
    for (int h = 0; h < G; h++)
        for (int l = 0; l < 4; l++) a[h][l] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const kv_t *row = v + idx[i] * stride;
        __m512 x[4];
        for (int l = 0; l < 4; l++) x[l] = LOAD16(row + 16 * l);
        for (int h = 0; h < G; h++) {
            const __m512 w = _mm512_set1_ps(p[h * n + i]);
            for (int l = 0; l < 4; l++) a[h][l] = _mm512_fmadd_ps(w, x[l], a[h][l]);
        }
    }
    for (int h = 0; h < G; h++) {
        float acc[64];
        for (int l = 0; l < 4; l++) _mm512_storeu_ps(acc + 16 * l, a[h][l]);
        for (int l = 0; l < 64; l++) out[h][l] = acc[l] / total[h];
    }
#else
    const int PART = G <= 1 ? 64 : G <= 3 ? 32 : 16, chunks = PART / 8;
    for (int lo = 0; lo < 64; lo += PART) {
        __m256 a[4][8];
        for (int h = 0; h < G; h++)
            for (int l = 0; l < chunks; l++) a[h][l] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            const kv_t *row = v + idx[i] * stride + lo;
            __m256 x[8];
            for (int l = 0; l < chunks; l++) x[l] = LOAD8(row + 8 * l);
            for (int h = 0; h < G; h++) {
                const __m256 w = _mm256_set1_ps(p[h * n + i]);
                for (int l = 0; l < chunks; l++) a[h][l] = _mm256_fmadd_ps(w, x[l], a[h][l]);
            }
        }
        for (int h = 0; h < G; h++) {
            float acc[64];
            for (int l = 0; l < chunks; l++) _mm256_storeu_ps(acc + 8 * l, a[h][l]);
            for (int l = 0; l < PART; l++) out[h][lo + l] = acc[l] / total[h];
        }
    }
#endif
}
#endif

// weigh for every head of a group: out[h][0:width] from p[h * n + i], totals total[h].
static void weigh_group(int64_t group, const float *restrict p, const int64_t *restrict idx, int64_t n,
                        const kv_t *restrict v, int64_t stride, int64_t width, const float *total, float *const *out) {
#if defined(M7B_AVX2) || defined(M7B_VNNI)
    if (width == 64 && group <= 4) {
        switch (group) {
            case 4: weigh_group_of(4, p, idx, n, v, stride, total, out); return;
            case 3: weigh_group_of(3, p, idx, n, v, stride, total, out); return;
            case 2: weigh_group_of(2, p, idx, n, v, stride, total, out); return;
            default: weigh_group_of(1, p, idx, n, v, stride, total, out); return;
        }
    }
#endif
    for (int64_t j = 0; j < group; j++) weigh(p + j * n, idx, n, v, stride, width, total[j], out[j]);
}

// exp(x) for x <= 0 (scores less their maximum), in place, by Cephes' expf polynomial (within 2 ulp):
// plain arithmetic that vectorises, where libm's expf is a call per score.
static void exp_nonpositive(float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float y = x[i];
        y = y > -87.0f ? y : -87.0f;
        const float k = floorf(y * 1.44269504088896341f + 0.5f);
        const float r = y - k * 0.693359375f + k * 2.12194440e-4f, z = r * r;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        union { int32_t i; float f; } scale = {.i = ((int32_t)k + 127) << 23};
        x[i] = (p * z + r + 1.0f) * scale.f;
    }
}

typedef struct {
    const float *q;
    const kv_t *k, *v;
    const int64_t *qs, *ks, *vs;  // strides (row, head, token or slot); the last dim is contiguous
    const int64_t *q_pos, *k_pos;  // [B, T] and [B, S], contiguous
    const int32_t *order;  // NULL, or [B, T, S]: the slots each token reads, in order, -1 ends the list
    int64_t heads, kv_heads, tokens, keys, dim, window;
    float scale;
    float *out;  // [B, H, T, D] contiguous
    const int64_t *idx, *count;  // per (row, token): the slots it sees (`keys` apart), and how many
    _Atomic int *failed;  // set by a tile that found no memory for its scores
} Attend;

// The slots query token t of row b sees, in the order it reads them, into idx; their count.
static int64_t visible_keys(const Attend *a, int64_t b, int64_t t, int64_t *idx) {
    const int64_t qp = a->q_pos[b * a->tokens + t], *kpos = a->k_pos + b * a->keys;
    const int32_t *order = a->order ? a->order + (b * a->tokens + t) * a->keys : NULL;
    int64_t n = 0;
    for (int64_t i = 0; qp >= 0 && i < a->keys; i++) {
        const int64_t s = order ? order[i] : i;
        if (s < 0) break;
        const int64_t kp = kpos[s];
        if (kp >= 0 && kp <= qp && (a->window <= 0 || qp - kp < a->window)) idx[n++] = s;
    }
    return n;
}

// Query token t of row b, the query heads of KV head g: softmax(q k^T * scale) v over its n visible keys.
static void attend_one(const Attend *a, int64_t b, int64_t t, int64_t g, const int64_t *idx, int64_t n,
                       float *scores) {
    const int64_t group = a->heads / a->kv_heads, dim = a->dim;
    const kv_t *k = a->k + b * a->ks[0] + g * a->ks[1], *v = a->v + b * a->vs[0] + g * a->vs[1];
    const float *q = a->q + b * a->qs[0] + g * group * a->qs[1] + t * a->qs[2];
    score_group(group, q, a->qs[1], k, a->ks[2], idx, n, dim, a->scale, scores);
    float total[group];
    float *out[group];
    for (int64_t j = 0; j < group; j++) {
        float *row = scores + j * n, top = -INFINITY;
        for (int64_t i = 0; i < n; i++) top = row[i] > top ? row[i] : top;
        for (int64_t i = 0; i < n; i++) row[i] -= top;
        exp_nonpositive(row, n);
        total[j] = n ? sum(row, n) : 1.0f;  // no visible key (an idle row): zeros
    }
    for (int64_t d = 0; d < dim; d += 64) {
        for (int64_t j = 0; j < group; j++) out[j] = a->out + ((b * a->heads + g * group + j) * a->tokens + t) * dim + d;
        weigh_group(group, scores, idx, n, v + d, a->vs[2], dim - d < 64 ? dim - d : 64, total, out);
    }
}

"""

ENTRY = r"""// One tile of the pool: query token t of row b for KV head g (tile = (b * tokens + t) * kv_heads + g): its
// query heads share the keys read.
static void attend_tile(const void *ctx, int64_t tile) {
    const Attend *a = ctx;
    const int64_t g = tile % a->kv_heads, bt = tile / a->kv_heads;
    float *scores = malloc(sizeof(float) * (a->heads / a->kv_heads * a->keys + 1));
    if (scores)
        attend_one(a, bt / a->tokens, bt % a->tokens, g, a->idx + bt * a->keys, a->count[bt], scores);
    else
        atomic_store(a->failed, 1);
    free(scores);
}

// Every (row, token, KV head) is a tile, each computed alone whatever thread runs it; a token's visible
// keys are found once for all its KV heads. Returns 0, or -1 when out of memory.
int m7b_attend(const float *q, int64_t qs0, int64_t qs1, int64_t qs2, const kv_t *k, int64_t ks0, int64_t ks1,
               int64_t ks2, const kv_t *v, int64_t vs0, int64_t vs1, int64_t vs2, const int64_t *q_pos,
               const int64_t *k_pos, const int32_t *order, int64_t batch, int64_t heads, int64_t kv_heads,
               int64_t tokens, int64_t keys, int64_t dim, int64_t window, float scale, float *out, int threads) {
    const int64_t qs[3] = {qs0, qs1, qs2}, ks[3] = {ks0, ks1, ks2}, vs[3] = {vs0, vs1, vs2};
    int64_t *idx = malloc(sizeof(int64_t) * (batch * tokens * keys + 1));
    int64_t *count = malloc(sizeof(int64_t) * (batch * tokens + 1));
    _Atomic int failed = !idx || !count;
    Attend a = {q, k, v, qs, ks, vs, q_pos, k_pos, order, heads, kv_heads, tokens, keys, dim, window, scale, out,
                idx, count, &failed};
    for (int64_t bt = 0; !failed && bt < batch * tokens; bt++)
        count[bt] = visible_keys(&a, bt / tokens, bt % tokens, idx + bt * keys);
    if (!failed) run_tiles(attend_tile, &a, batch * tokens * kv_heads, threads);
    free(idx);
    free(count);
    return atomic_load(&failed) ? -1 : 0;
}
"""
