// What both CPU attention libraries (cpu_attention.c, cpu_attention_f32.c) share: thread
// placement (so whichever library this CPU loads can pin the pool), per-thread scratch pools and
// the split of a forward's (b, h) slices into query ranges.
#ifndef FMF_CPU_COMMON_H
#define FMF_CPU_COMMON_H
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>

// Pins thread t of an OpenMP team of n to cpus[t] (t = 0, the calling thread, when cpus[0] >= 0).
// The team is the process's one OpenMP pool (libgomp is loaded once: PyTorch's intra-op work runs
// on the same threads). Why: after about 0.1 s idle the pool's workers sleep, and Linux wakes a
// sleeper next to the thread that wakes it, so two threads share one core for milliseconds (a
// 3.4 ms B=32 attention took 11.5 ms after 0.1 s idle on a 2-core machine; 4.5 ms with its worker
// pinned). Returns how many threads of the team took their placement.
int fmf_pin_threads(const int *cpus, int n) {
    int pinned = 0;
#pragma omp parallel num_threads(n) reduction(+ : pinned)
    {
        const int t = omp_get_thread_num();
        if (omp_get_num_threads() == n && cpus[t] >= 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[t], &set);
            pinned = sched_setaffinity(0, sizeof set, &set) == 0;
        }
    }
    return pinned;
}
// Per-thread scratch, one allocation for all threads: buffer i of every thread is sizes[i] bytes,
// 64-byte aligned. pool_alloc returns the pool (NULL when out of memory) and each thread's stride;
// pool_carve points out[0..n) at thread t's buffers.
static inline size_t aligned64(size_t x) { return (x + 63) & ~(size_t)63; }

static char *pool_alloc(const size_t *sizes, int n, int nthreads, size_t *per_thread) {
    *per_thread = 0;
    for (int i = 0; i < n; i++) *per_thread += aligned64(sizes[i]);
    return aligned_alloc(64, *per_thread * nthreads);
}

static void pool_carve(char *pool, size_t per_thread, int t, const size_t *sizes, int n, void **out) {
    char *at = pool + per_thread * t;
    for (int i = 0; i < n; i++) {
        out[i] = at;
        at += aligned64(sizes[i]);
    }
}

// Splits of each of bh (b, h) slices into query ranges of whole blocks (nblocks per slice), so
// that small batches still feed every thread: at least two items a thread and a whole number of
// items per thread (B=1, 3 heads, 2 threads: 6 items, 6-8% faster than 9, which left one thread a
// third of an item behind, and than 12, which repacked k and v twice as often).
static inline int64_t fmf_query_splits(int64_t bh, int64_t nblocks, int nthreads) {
    int64_t splits = 1;
    while ((bh * splits < 2 * (int64_t)nthreads || bh * splits % nthreads) && splits < nblocks) splits++;
    return splits;
}
#endif
