// Thread placement for the CPU attention kernels: included by both C files (cpu_attention.c,
// cpu_attention_f32.c), so whichever library this CPU loads can pin the pool.
#ifndef FMF_PIN_THREADS_H
#define FMF_PIN_THREADS_H
#include <omp.h>
#include <sched.h>

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
#endif
