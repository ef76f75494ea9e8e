// The video tokenizer's first step on x86 CPUs with AVX-512: cut a uint8 clip into tubelets and
// LayerNorm each one, z = (v - mean) * rstd * w + b, in bf16.
//
// video [B, C, T, H, W] uint8, contiguous. One scale: the frame sampled every d pixels (the
// reference's x[..., ::d, ::d]) cut into pf-frame x p x p tubelets; token (t, h, w) in that order,
// its K = p*p*pf*C values in the reference's order (p1, p2, pf, c): value k = ((p1*p + p2)*pf +
// f)*C + c is pixel (row d*(h*p + p1), column d*(w*p + p2)) of frame t*pf + f, channel c.
// w, b [K] fp32; z [B, n, K] bf16 (n = T/pf * H/(d p) * W/(d p)).
//
// Why: inductor's loop for this LayerNorm reads 8 bytes per vector (one patch row) and took 3.7%
// of a compiled bf16 FmFormer forward. Here each tubelet is gathered once into a K-byte buffer,
// its sums are exact integers (so the mean and variance are exact, as F.layer_norm's are not),
// and the normalisation runs 16 values per instruction.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define MAX_K 4096

// Tubelet i's K values gathered into v in the (p1, p2, pf, c) order. A static inline function
// the compiler specialises for the model's sizes (C=3, pf=2, p=8) below, so its loops unroll.
static inline void gather(uint8_t *v, const uint8_t *video, int64_t bi, int64_t t, int64_t h, int64_t wi, int64_t C,
                          int64_t T, int64_t H, int64_t W, int64_t d, int64_t p, int64_t pf) {
    for (int64_t f = 0; f < pf; f++)
        for (int64_t c = 0; c < C; c++) {
            const uint8_t *plane = video + ((bi * C + c) * T + t * pf + f) * H * W;
            for (int64_t p1 = 0; p1 < p; p1++) {
                const uint8_t *row = plane + d * (h * p + p1) * W + d * wi * p;
                uint8_t *out = v + (p1 * p * pf + f) * C + c;
                for (int64_t p2 = 0; p2 < p; p2++) out[p2 * pf * C] = row[d * p2];
            }
        }
}

// (sum of v, sum of v^2) over K bytes (K a multiple of 16), exact
static inline void sums(const uint8_t *v, int64_t K, int64_t *s1, int64_t *s2) {
    __m512i a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(v + k)));
        a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(x, _mm512_set1_epi16(1)));
        a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(x, x));  // pairs of squares: < 2^17 each
    }
    for (; k < K; k += 16) {
        __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v + k)));
        a1 = _mm512_add_epi32(a1, x);
        a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(x, x));
    }
    *s1 = _mm512_reduce_add_epi32(a1);  // K <= 4096: sums < 2^28
    *s2 = _mm512_reduce_add_epi32(a2);
}

// Returns 0, or 1 for sizes the kernel does not take.
int fmf_patch_norm(const uint8_t *video, int64_t B, int64_t C, int64_t T, int64_t H, int64_t W, int64_t d,
                   int64_t p, int64_t pf, const float *w, const float *b, float eps, uint16_t *z) {
    const int64_t K = p * p * pf * C;
    if (K > MAX_K || K % 16 || d < 1 || T % pf || H % (d * p) || W % (d * p)) return 1;
    const int64_t tn = T / pf, hn = H / (d * p), wn = W / (d * p), n = tn * hn * wn;
    const int model = C == 3 && pf == 2 && p == 8;
#pragma omp parallel
    {
        uint8_t v[MAX_K] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * n; i++) {
            const int64_t bi = i / n, tok = i % n;
            const int64_t t = tok / (hn * wn), h = tok / wn % hn, wi = tok % wn;
            if (model)
                gather(v, video, bi, t, h, wi, 3, T, H, W, d, 8, 2);
            else
                gather(v, video, bi, t, h, wi, C, T, H, W, d, p, pf);
            int64_t s1, s2;
            sums(v, K, &s1, &s2);
            // mean and variance from the exact sums, in double (F.layer_norm: biased variance)
            const double mean = (double)s1 / K, var = ((double)s2 * K - (double)s1 * s1) / ((double)K * K);
            const __m512 m = _mm512_set1_ps((float)mean), r = _mm512_set1_ps((float)(1.0 / sqrt(var + eps)));
            uint16_t *zo = z + i * K;
            for (int64_t k = 0; k < K; k += 16) {
                __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v + k))));
                __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(x, m), r), _mm512_loadu_ps(w + k),
                                           _mm512_loadu_ps(b + k));
                _mm256_storeu_si256((__m256i *)(zo + k), (__m256i)_mm512_cvtneps_pbh(y));
            }
        }
    }
    return 0;
}
