// The transformer feed-forward, inference only, on x86 CPUs with AVX512-BF16 (vdpbf16ps):
// y = fc2(gelu(fc1(x))) for bf16 rows, in one pass over 16-row blocks.
//
// x [M, C] bf16 (unit stride over C, row stride sx); w1p [C/2][H][2] bf16: fc1's weight [H, C]
// with C in pairs (w1p[p][j] = (w1[j][2p], w1[j][2p+1])), the operand layout vdpbf16ps wants;
// b1 [H] fp32; w2p [H/2][C][2] bf16 likewise from fc2's weight [C, H]; b2 [C] fp32;
// y [M, C] bf16 (row stride sy). C and H multiples of 32, C <= 512, H <= 2048.
//
// Why: oneDNN runs the two Linears as two calls, the first with exact GELU in its epilogue, and
// the [M, H] hidden goes to memory and back. Here a block's hidden (16 x H bf16, at most 64 KB)
// stays in L1/L2 and GELU is computed on the accumulators. Products of bf16 are exact in fp32;
// the hidden is rounded to bf16 for fc2, as the bf16 Linear's output is.
//
// GELU: 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7) with
// exp(-z^2) from a degree-3 minimax 2^f (relative error 7.6e-5) and rcp14 (2^-14): about 1e-4 of
// the result, far below the 3.9e-3 of the bf16 hidden it is rounded to.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_avx512.h"  // exp2_neg

#define RB 16     // rows per block
#define MAX_C 512
#define MAX_H 2048

static inline __m512 gelu(__m512 x) {
    __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678f));
    __m512 t = _mm512_rcp14_ps(_mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 q = _mm512_mul_ps(p, exp2_neg(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.44269504f))));
    // q = 1 - erf(z): x >= 0 takes 0.5 x (2 - q), x < 0 takes 0.5 x q
    __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 s = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.f), q), q);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), s);
}

// acc x (columns n0..n0+15) and y (n0+16..n0+31) of 8 rows += a[8 rows][2kp] b, over kp pairs:
// b points at the packed weight's column n0 (pair stride 2n elements). 16 independent vdpbf16ps
// chains hide its latency; each broadcast pair of a feeds both.
static inline void dp8x2(__m512 x[8], __m512 y[8], const uint16_t *a, int64_t sa, const uint16_t *b, int64_t n,
                         int64_t kp) {
    for (int64_t p = 0; p < kp; p++) {
        __m512bh u = (__m512bh)_mm512_loadu_si512(b + p * n * 2);
        __m512bh w = (__m512bh)_mm512_loadu_si512(b + p * n * 2 + 32);
        for (int r = 0; r < 8; r++) {
            int32_t pair;
            memcpy(&pair, a + r * sa + 2 * p, 4);
            __m512bh ar = (__m512bh)_mm512_set1_epi32(pair);
            x[r] = _mm512_dpbf16_ps(x[r], ar, u);
            y[r] = _mm512_dpbf16_ps(y[r], ar, w);
        }
    }
}

static inline void bias8(__m512 x[8], __m512 y[8], const float *b) {
    __m512 u = _mm512_loadu_ps(b), w = _mm512_loadu_ps(b + 16);
    for (int r = 0; r < 8; r++) x[r] = u, y[r] = w;
}

// Returns 0; 1 for sizes the kernel does not take, 3 when out of memory.
int fmf_mlp_fwd(const uint16_t *x, int64_t sx, int64_t m, int64_t c, int64_t h, const uint16_t *w1p,
                const float *b1, const uint16_t *w2p, const float *b2, uint16_t *y, int64_t sy) {
    if (c % 32 || h % 32 || c > MAX_C || h > MAX_H || c < 32 || h < 32) return 1;
    const int64_t nb = (m + RB - 1) / RB;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        // per thread: a ragged last block zero-padded, and the block's hidden in bf16 (80 KB at
        // most: on the heap, since a worker's stack may be small)
        uint16_t *xb = aligned_alloc(64, sizeof(uint16_t) * RB * (MAX_C + MAX_H));
        uint16_t *hb = xb + RB * MAX_C;
        failed = xb == NULL;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nb; blk++) {
            if (failed) continue;  // (the call then fails: its caller raises)
            const int64_t r0 = blk * RB, rows = m - r0 < RB ? m - r0 : RB;
            const uint16_t *xa = x + r0 * sx;
            int64_t sa = sx;
            if (rows < RB) {  // (reading past the last row would read another tensor's memory)
                memset(xb, 0, sizeof(uint16_t) * RB * c);
                for (int64_t r = 0; r < rows; r++) memcpy(xb + r * c, x + (r0 + r) * sx, 2 * c);
                xa = xb, sa = c;
            }
            for (int half = 0; half < RB; half += 8) {
                for (int64_t n0 = 0; n0 < h; n0 += 32) {
                    __m512 u[8], v[8];
                    bias8(u, v, b1 + n0);
                    dp8x2(u, v, xa + half * sa, sa, w1p + n0 * 2, h, c / 2);
                    for (int r = 0; r < 8; r++)  // (cvtne2ps: the second operand is the low half)
                        _mm512_store_si512(hb + (half + r) * h + n0, (__m512i)_mm512_cvtne2ps_pbh(gelu(v[r]), gelu(u[r])));
                }
            }
            for (int half = 0; half < rows; half += 8) {
                for (int64_t n0 = 0; n0 < c; n0 += 32) {
                    __m512 u[8], v[8];
                    bias8(u, v, b2 + n0);
                    dp8x2(u, v, hb + half * h, h, w2p + n0 * 2, c, h / 2);
                    for (int r = 0; r < 8 && half + r < rows; r++)
                        _mm512_storeu_si512(y + (r0 + half + r) * sy + n0, (__m512i)_mm512_cvtne2ps_pbh(v[r], u[r]));
                }
            }
        }
        free(xb);
    }
    return failed ? 3 : 0;
}
