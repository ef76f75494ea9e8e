// AVX-512 helpers the bf16 CPU kernels share (cpu_attention.c, cpu_mlp.c).
#ifndef FMF_CPU_AVX512_H
#define FMF_CPU_AVX512_H
#include <immintrin.h>

// 2^t for t <= 0 in three steps: f = t - floor(t) in [0, 1) (vreduceps), 2^f by a degree-3
// minimax polynomial (relative error 7.6e-5, far below the 3.9e-3 of the bf16 values it feeds),
// times 2^floor(t) (vscalefps: exact, and 0 for any t below the float range, so no clamp is needed).
static inline __m512 exp2_neg(__m512 t) {
    __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(7.8022547e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.2606564e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9583648e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992466e-1f));
    return _mm512_scalef_ps(p, t);
}
#endif
