"""The C source's second half: the thread pool and the entry point, `m7b_linear` (see cpu_kernels_c)."""

THREADS = r"""// ---------------------------------------------------------------------------------------- threads
// A pool of our own, not OpenMP: runs of tiles are claimed from an atomic word (generation << 32 |
// next tile), by the caller too, which at the end waits only for tiles a helper is in the middle of: a
// helper not scheduled on a busy machine does no work, where an OpenMP barrier would stall the step.
// Helpers spin briefly for the next job, then sleep on a condition variable.
typedef struct {
    const uint8_t *w;
    const uint16_t *d, *m;
    const float *dx, *sx;
    const int8_t *qx;
    float *out;
    int64_t rows, k, n, nb, wrow, tiles;
    int bits, helpers;
} Job;

#define TILE 16
#define MAX_HELPERS 63
static Job job;
static _Atomic uint64_t claim;  // generation << 32 | next tile
static _Atomic int64_t done_tiles;
static _Atomic int sleepers;
static int started;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static void run_tile(const Job *j, int64_t t) {
    const int64_t lo = t * TILE, hi = lo + TILE < j->n ? lo + TILE : j->n;
    tile_dot(lo, hi, j->w, j->wrow, j->bits, j->d, j->m, j->nb, j->rows, j->k, j->n, j->qx, j->dx, j->sx, j->out);
}

// Claims and runs tiles of generation `gen` until none is left (or a newer job replaced it).
static void work(uint64_t gen, const Job *j) {
    for (;;) {
        uint64_t word = atomic_load_explicit(&claim, memory_order_acquire);
        if (word >> 32 != gen || (int64_t)(word & 0xffffffffu) >= j->tiles) return;
        // A run of tiles per claim (~8 per thread): an atomic per tile cost more than small tiles do.
        const int64_t first = (int64_t)(word & 0xffffffffu), step = j->tiles / (8 * (j->helpers + 1)) + 1,
                      end = first + step < j->tiles ? first + step : j->tiles;
        if (!atomic_compare_exchange_weak(&claim, &word, word + (uint64_t)(end - first))) continue;
        for (int64_t t = first; t < end; t++) run_tile(j, t);
        atomic_fetch_add_explicit(&done_tiles, end - first, memory_order_release);
    }
}

static void *helper(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = atomic_load_explicit(&claim, memory_order_acquire) >> 32;
        for (int spin = 0; gen == seen && spin < 20000; spin++) {
#if defined(M7B_AVX2) || defined(M7B_VNNI)
            _mm_pause();
#endif
            gen = atomic_load_explicit(&claim, memory_order_acquire) >> 32;
        }
        if (gen == seen) {
            pthread_mutex_lock(&lock);
            atomic_fetch_add(&sleepers, 1);
            while ((gen = atomic_load(&claim) >> 32) == seen) pthread_cond_wait(&wake, &lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&lock);
        }
        seen = gen;
        Job copy = job;  // valid if a claim of `gen` succeeds: the caller rewrites it only once all are done
        if (index < copy.helpers) work(gen, &copy);
    }
    return NULL;
}

static int start_helpers(int wanted) {
    pthread_mutex_lock(&lock);
    for (; started < wanted && started < MAX_HELPERS; started++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, (void *)(intptr_t)started)) break;
        pthread_detach(thread);
    }
    int have = started;
    pthread_mutex_unlock(&lock);
    return have;
}

// Not reentrant: one caller at a time (the engine's single model thread); a lock keeps it safe anyway.
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER;

static void run_job(Job *j, int threads) {
    pthread_mutex_lock(&caller);
    j->helpers = j->tiles > 1 && threads > 1 ? start_helpers(threads - 1) : 0;
    if (j->helpers > threads - 1) j->helpers = threads - 1;
    job = *j;
    uint64_t gen = (atomic_load(&claim) >> 32) + 1;
    atomic_store_explicit(&done_tiles, 0, memory_order_relaxed);
    atomic_store_explicit(&claim, gen << 32, memory_order_release);
    if (job.helpers && atomic_load(&sleepers)) {
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    work(gen, &job);
    // A helper descheduled in the middle of a tile holds the step until it runs again: past a short
    // spin, give this core away rather than burn the time slice it may be waiting for.
    for (int spin = 0; atomic_load_explicit(&done_tiles, memory_order_acquire) < job.tiles; spin++) {
        if (spin > 2000) {
            sched_yield();
            continue;
        }
#if defined(M7B_AVX2) || defined(M7B_VNNI)
        _mm_pause();
#endif
    }
    pthread_mutex_unlock(&caller);
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
    Job j = {w, d, m, dx, sx, qx, result, rows, k, n, nb, bits == 4 ? k / 2 : k, (n + TILE - 1) / TILE, bits, 0};
    run_job(&j, threads);
    if (bf16)
        for (int64_t i = 0; i < rows * n; i++) ((uint16_t *)out)[i] = to_bf16(scratch[i]);
    free(qx);
    free(dx);
    free(scratch);
    return 0;
}
"""
