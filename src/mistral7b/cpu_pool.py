"""One thread pool for the CPU's C kernels (quant.cpu_kernels' matmuls, attention_cpu's decode attention).

The pool is a library of its own, built like the kernels (`native`), whose entry point each kernel
library is handed when it loads (`attach`): two pools would each keep a helper spinning after its job
while the other's job runs, more threads than a small machine's cores. Without the pool (no compiler) a
kernel library runs its tiles on the calling thread.

`decode_threads` sets how many threads the kernels split over inside a decode step.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
from pathlib import Path

import torch

from .native import build, load_or_none

SOURCE = r"""// A pool of our own, not OpenMP: runs of tiles are claimed from an atomic word (generation << 32 |
// next tile), by the caller too, which at the end waits only for tiles a helper is in the middle of: a
// helper not scheduled on a busy machine does no work, where an OpenMP barrier would stall the step.
// Helpers spin briefly for the next job, then sleep on a condition variable.
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#if defined(M7B_AVX2) || defined(M7B_VNNI)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif

typedef void (*m7b_task)(const void *ctx, int64_t tile);
typedef struct {
    m7b_task run;
    const void *ctx;
    int64_t tiles;
    int helpers;
} Job;

#define MAX_HELPERS 63
static Job job;
static _Atomic uint64_t claim;  // generation << 32 | next tile
static _Atomic int64_t done_tiles;
static _Atomic int sleepers;
static int started;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

// Claims and runs tiles of generation `gen` until none is left (or a newer job replaced it).
static void work(uint64_t gen, const Job *j) {
    for (;;) {
        uint64_t word = atomic_load_explicit(&claim, memory_order_acquire);
        if (word >> 32 != gen || (int64_t)(word & 0xffffffffu) >= j->tiles) return;
        // A run of tiles per claim (~8 per thread): an atomic per tile cost more than small tiles do.
        const int64_t first = (int64_t)(word & 0xffffffffu), step = j->tiles / (8 * (j->helpers + 1)) + 1,
                      end = first + step < j->tiles ? first + step : j->tiles;
        if (!atomic_compare_exchange_weak(&claim, &word, word + (uint64_t)(end - first))) continue;
        for (int64_t t = first; t < end; t++) j->run(j->ctx, t);
        atomic_fetch_add_explicit(&done_tiles, end - first, memory_order_release);
    }
}

static void *helper(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = atomic_load_explicit(&claim, memory_order_acquire) >> 32;
        for (int spin = 0; gen == seen && spin < 20000; spin++) {
            PAUSE();
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

// run(ctx, t) for t in [0, tiles), over up to `threads` threads, the caller's included; returns when all ran.
void m7b_parallel_for(m7b_task run, const void *ctx, int64_t tiles, int threads) {
    pthread_mutex_lock(&caller);
    Job j = {run, ctx, tiles, tiles > 1 && threads > 1 ? start_helpers(threads - 1) : 0};
    if (j.helpers > threads - 1) j.helpers = threads - 1;
    job = j;
    uint64_t gen = (atomic_load(&claim) >> 32) + 1;
    atomic_store_explicit(&done_tiles, 0, memory_order_relaxed);
    atomic_store_explicit(&claim, gen << 32, memory_order_release);
    if (j.helpers && atomic_load(&sleepers)) {
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    work(gen, &j);
    // A helper descheduled in the middle of a tile holds the step until it runs again: past a short
    // spin, give this core away rather than burn the time slice it may be waiting for.
    for (int spin = 0; atomic_load_explicit(&done_tiles, memory_order_acquire) < tiles; spin++) {
        if (spin > 2000) {
            sched_yield();
            continue;
        }
        PAUSE();
    }
    pthread_mutex_unlock(&caller);
}
"""

# The C side of a kernel library's hook: `parallel_for` (the pool's entry, or NULL: the calling thread).
CLIENT = r"""
typedef void (*m7b_task)(const void *ctx, int64_t tile);
typedef void (*m7b_parallel_for_t)(m7b_task run, const void *ctx, int64_t tiles, int threads);
static m7b_parallel_for_t parallel_for;
void m7b_use_pool(void *fn) { parallel_for = (m7b_parallel_for_t)fn; }

static void run_tiles(m7b_task run, const void *ctx, int64_t tiles, int threads) {
    if (parallel_for && threads > 1 && tiles > 1) {
        parallel_for(run, ctx, tiles, threads);
        return;
    }
    for (int64_t t = 0; t < tiles; t++) run(ctx, t);
}
"""

# The threads the kernels split over inside `decode_threads` (None elsewhere: torch's count).
_DECODE_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("m7b_decode_threads", default=None)


@functools.cache
def library():
    """The loaded pool, or None (with a one-line notice) when it cannot be built: the kernels then run on
    the calling thread."""
    return load_or_none(_open, "CPU thread pool", "the C kernels run on one thread")


def _open(variant: str):
    lib = ctypes.CDLL(str(build(variant, SOURCE, "m7b_pool")))
    lib.m7b_parallel_for.restype = None
    return lib


def attach(kernels: ctypes.CDLL) -> ctypes.CDLL:
    """Hands the pool to a kernel library built with CLIENT; returns it."""
    pool = library()
    if pool is not None:
        kernels.m7b_use_pool.argtypes = [ctypes.c_void_p]
        kernels.m7b_use_pool(ctypes.cast(pool.m7b_parallel_for, ctypes.c_void_p))
    return kernels


def threads() -> int:
    """The threads a kernel call splits over now."""
    return _DECODE_THREADS.get() or torch.get_num_threads()


def physical_cores() -> int:
    """Cores this process may run on, counting hyperthread siblings once (a matmul thread per sibling
    only contends for the same core's units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@contextlib.contextmanager
def decoding(threads: int):
    """The C kernels split each call over `threads`, torch's own ops run on one thread. A decode step's
    other ops are too small to split, and an OpenMP team with a descheduled member stalls each of them
    for a time slice: on a busy 2-core machine (load 5-6) a default-model step took 35-260 ms with 2
    torch threads and 25-34 ms with one. An OpenMP team also spins after its work, on the cores this
    pool's next call needs: one torch op outside the scope between two forwards made a verify of 2
    tokens cost 1.4-1.7 decode steps instead of 1.15 (Zen 5, 2 cores). This pool never waits for a
    helper that has not started."""
    before, token = torch.get_num_threads(), _DECODE_THREADS.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _DECODE_THREADS.reset(token)


def decode_threads(fn, threads: int):
    """`fn` run inside `decoding(threads)`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with decoding(threads):
            return fn(*args, **kwargs)

    return wrapper
