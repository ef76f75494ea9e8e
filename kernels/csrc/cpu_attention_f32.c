// Attention, forward and backward, in fp32 on x86 CPUs with AVX2 and FMA (every x86-64 CPU since
// 2013-15: Intel Haswell, AMD Zen 1, and all later): softmax(q k^T * scale) v for fp32 q, k, v.
//
// q [B, H, N, D], k and v [B, H, M, D], fp32 with unit stride over D and any strides over
// (B, H, N); o [B, H, N, D] fp32 (any strides over B, H, N); lse [B, H, N] fp32 (natural log of
// the softmax denominator plus the row max times scale; may be NULL). D in {32, 64}.
//
// Why kernels of our own: at head dim 32 PyTorch's CPU flash attention is about half a compiled
// fp32 FmFormer forward on CPUs without bf16 hardware, at about 40% of the FMA units' peak: its
// blocks are GEMM-library calls with K = D = 32, too thin to amortise them, and an online softmax
// rescales its accumulators per key block. FmFormer's segments are short (M <= a few thousand), so,
// as in cpu_attention.c, the logits of a block of QB queries over all M keys fit in L2 and each
// block is three passes that each do one thing fast, with no rescaling:
//   S = Q K^T   register-blocked 6 queries x 16 keys (12 accumulators), K^T packed per (b, h);
//   softmax     exact per row, exp2 by a degree-5 polynomial (relative error 1.6e-7 in fp32);
//   O = P V     register-blocked 3 queries x 32 d, over key chunks of 64 (a chunk of V stays in L1);
//               12 accumulators, V read as FMA memory operands (2 rows: 10% slower, FMA-latency bound).
// Within a pass the loop order keeps the reused operand in L1: a 16-key slice of K^T (2 KB) serves
// all QB queries; a 64-key chunk of V (8 KB) serves all QB rows of P.
//
// Threads: OpenMP over (b, h, query range) in the forward; each work item packs its (b, h)'s K^T
// and V rows into per-thread buffers (O(M D) against the O(N M D) of the item), so any batch,
// B = 1 included, splits into enough items. The backward (at the end of this file) runs one item
// per (b, h): its dK and dV accumulate over all of that (b, h)'s queries.
#define _GNU_SOURCE  // sched_setaffinity, CPU_SET (cpu_common.h)
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"  // fmf_pin_threads, per-thread scratch pools, query splits

#define QB 24  // queries per block: four 6-row groups of the S micro-kernel, a multiple of PV_ROWS
#define S_ROWS 6
#define PV_ROWS 3
#define KCHUNK 64  // keys per O = P V chunk

// 2^t for t <= 0: t clamped to -126 (2^-126 is 0 next to the row maximum's 1), f = t - floor(t)
// in [0, 1), 2^f by a degree-5 fit (relative error 1.6e-7 in fp32 arithmetic), and floor(t) added
// to the exponent bits (2^f is in [1, 2), so the result stays a normal float).
static inline __m256 exp2_neg(__m256 t) {
    t = _mm256_max_ps(t, _mm256_set1_ps(-126.0f));
    const __m256 fl = _mm256_floor_ps(t), f = _mm256_sub_ps(t, fl);
    __m256 p = _mm256_set1_ps(1.8775727e-3f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.9893444e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5826318e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4015361e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9315308e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.9999994e-1f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(fl), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

static inline float hmax8(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

static inline float hsum8(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// r[i][j] <- r[j][i] for an 8 x 8 block of floats (unpack, shuffle, lane permute)
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// k [M, D] (row stride sk) -> kt[D][Mp], keys >= M zero; 8 x 8 blocks transposed in registers
static void pack_kt(const float *k, int64_t sk, int64_t m, int64_t mp, int64_t d, float *kt) {
    __m256 r[8];
    for (int64_t j0 = 0; j0 < mp; j0 += 8)
        for (int64_t c = 0; c < d; c += 8) {
            for (int64_t i = 0; i < 8; i++) r[i] = j0 + i < m ? _mm256_loadu_ps(k + (j0 + i) * sk + c) : _mm256_setzero_ps();
            transpose8(r);
            for (int64_t i = 0; i < 8; i++) _mm256_store_ps(kt + (c + i) * mp + j0, r[i]);
        }
}

// S[r][j0 .. j0+16) for S_ROWS query rows q (row stride d): the d loop's two K^T vectors serve
// all six rows (12 FMAs per 2 loads and 6 broadcasts)
static inline void s_block(const float *q, const float *kt, int64_t mp, int64_t d, int64_t j0, float *s) {
    __m256 a0[S_ROWS], a1[S_ROWS];
    for (int r = 0; r < S_ROWS; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e++) {
        const __m256 b0 = _mm256_load_ps(kt + e * mp + j0), b1 = _mm256_load_ps(kt + e * mp + j0 + 8);
        for (int r = 0; r < S_ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(q + r * d + e);
            a0[r] = _mm256_fmadd_ps(a, b0, a0[r]);
            a1[r] = _mm256_fmadd_ps(a, b1, a1[r]);
        }
    }
    for (int r = 0; r < S_ROWS; r++) {
        _mm256_store_ps(s + r * mp + j0, a0[r]);
        _mm256_store_ps(s + r * mp + j0 + 8, a1[r]);
    }
}

// softmax numerators of one row in place: s[j] <- 2^((s[j] - max) scale log2e) for j < m (keys
// j >= m are never read again); returns their sum, and the row's max logit in *rowmax
static inline float softmax_row(float *s, int64_t m, float c, float *rowmax) {
    const int64_t full = m & ~(int64_t)7;
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {  // two chains: vmaxps's latency
        m0 = _mm256_max_ps(m0, _mm256_load_ps(s + j));
        m1 = _mm256_max_ps(m1, _mm256_load_ps(s + j + 8));
    }
    for (; j < full; j += 8) m0 = _mm256_max_ps(m0, _mm256_load_ps(s + j));
    float mx = hmax8(_mm256_max_ps(m0, m1));
    for (j = full; j < m; j++) mx = s[j] > mx ? s[j] : mx;
    *rowmax = mx;
    const __m256 cc = _mm256_set1_ps(c), off = _mm256_set1_ps(mx * c);
    __m256 z0 = _mm256_setzero_ps(), z1 = z0;
    for (j = 0; j + 16 <= full; j += 16) {
        const __m256 e0 = exp2_neg(_mm256_fmsub_ps(_mm256_load_ps(s + j), cc, off));
        const __m256 e1 = exp2_neg(_mm256_fmsub_ps(_mm256_load_ps(s + j + 8), cc, off));
        _mm256_store_ps(s + j, e0);
        _mm256_store_ps(s + j + 8, e1);
        z0 = _mm256_add_ps(z0, e0);
        z1 = _mm256_add_ps(z1, e1);
    }
    for (; j < full; j += 8) {
        const __m256 e = exp2_neg(_mm256_fmsub_ps(_mm256_load_ps(s + j), cc, off));
        _mm256_store_ps(s + j, e);
        z0 = _mm256_add_ps(z0, e);
    }
    if (full < m) {  // the ragged keys: lanes >= m get -inf logits, so 2^-126 (t is clamped): zeroed
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(m - full)), lane));
        const __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_load_ps(s + full), keep);
        const __m256 e = _mm256_and_ps(exp2_neg(_mm256_fmsub_ps(x, cc, off)), keep);
        _mm256_store_ps(s + full, e);
        z0 = _mm256_add_ps(z0, e);
    }
    return hsum8(_mm256_add_ps(z0, z1));
}

// o[r][0 .. 32) += sum over k in [k0, k1) of p[r rs + k ks] v[k][0 .. 32) (row strides vs, os) for
// PV_ROWS rows r, the accumulators in registers for the run (12 FMAs, V as their memory operands,
// per 3 broadcasts). O = P V: P's rows are queries (rs = Mp, ks = 1); the backward's dV = P^T dO
// and dK = dS^T Q read P and dS transposed (rs = 1, ks = Mp).
static inline void pv_block(const float *p, int64_t rs, int64_t ks, const float *v, int64_t vs, int64_t k0,
                            int64_t k1, float *o, int64_t os) {
    __m256 acc[PV_ROWS][4];
    for (int r = 0; r < PV_ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_loadu_ps(o + r * os + 8 * c);
    for (int64_t k = k0; k < k1; k++) {
        const float *vk = v + k * vs;
        const __m256 v0 = _mm256_loadu_ps(vk), v1 = _mm256_loadu_ps(vk + 8), v2 = _mm256_loadu_ps(vk + 16),
                     v3 = _mm256_loadu_ps(vk + 24);
        for (int r = 0; r < PV_ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(p + r * rs + k * ks);
            acc[r][0] = _mm256_fmadd_ps(a, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, v1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(a, v2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(a, v3, acc[r][3]);
        }
    }
    for (int r = 0; r < PV_ROWS; r++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(o + r * os + 8 * c, acc[r][c]);
}

// One block of rows (nrows <= QB) of one (b, h): q rows qp (stride sq) -> o rows op (stride so)
// and, with lse not NULL, lse[i] = the row's max logit * scale + log(its softmax denominator).
// kt: K^T [D][Mp]; vr: V rows [Mp][D]; buffers: qbuf [QB][D], sbuf [QB][Mp], obuf [QB][D].
static void attend_block(const float *qp, int64_t sq, int64_t nrows, const float *kt, const float *vr, int64_t m,
                         int64_t mp, int64_t d, float scale, float *qbuf, float *sbuf, float *obuf, float *op,
                         int64_t so, float *lse) {
    for (int64_t i = 0; i < QB; i++) {  // zero-padded to QB rows: the micro-kernels run whole groups
        if (i < nrows)
            memcpy(qbuf + i * d, qp + i * sq, d * 4);
        else
            memset(qbuf + i * d, 0, d * 4);
    }
    const int64_t groups = (nrows + S_ROWS - 1) / S_ROWS, rows = groups * S_ROWS;
    for (int64_t j0 = 0; j0 < mp; j0 += 16)
        for (int64_t g = 0; g < groups; g++) s_block(qbuf + g * S_ROWS * d, kt, mp, d, j0, sbuf + g * S_ROWS * mp);
    const float c = scale * 1.44269504088896341f;
    float inv[QB], rowlse[QB];
    for (int64_t i = 0; i < rows; i++) {
        float mx;
        const float sum = softmax_row(sbuf + i * mp, m, c, &mx);
        inv[i] = 1.0f / sum;
        rowlse[i] = mx * scale + logf(sum);
    }
    memset(obuf, 0, rows * d * 4);
    for (int64_t j0 = 0; j0 < m; j0 += KCHUNK) {
        const int64_t j1 = j0 + KCHUNK < m ? j0 + KCHUNK : m;
        for (int64_t e = 0; e < d; e += 32)
            for (int64_t r = 0; r < rows; r += PV_ROWS)
                pv_block(sbuf + r * mp, mp, 1, vr + e, d, j0, j1, obuf + r * d + e, d);
    }
    for (int64_t i = 0; i < nrows; i++) {
        const __m256 w = _mm256_set1_ps(inv[i]);
        for (int64_t e = 0; e < d; e += 8) _mm256_storeu_ps(op + i * so + e, _mm256_mul_ps(_mm256_load_ps(obuf + i * d + e), w));
        if (lse) lse[i] = rowlse[i];
    }
}

// One problem of fmf_attention_f32_fwd_many, laid out as cpu_attention.c's fmf_fwd_problem (the
// Python side fills both with one ctypes structure); lse [B, H, n] contiguous, or NULL.
typedef struct {
    const float *q, *k, *v;
    float *o;
    float *lse;
    int64_t B, H, n, m, d;
    int64_t sq[3], sk[3], sv[3], so[3];
    float scale;
} fmf_f32_problem;

static int64_t query_splits(const fmf_f32_problem *p, int nthreads) {
    return fmf_query_splits(p->B * p->H, (p->n + QB - 1) / QB, nthreads);
}

// count problems in one parallel region, their work items in one queue (a layer's two
// independent attentions in one call). Returns 0 on success, 1 for an unsupported D or count
// (nothing is computed), 3 out of memory.
int fmf_attention_f32_fwd_many(const fmf_f32_problem *ps, int count, int nthreads) {
    enum { MAXP = 8 };
    if (count < 1 || count > MAXP) return 1;
    int64_t splits[MAXP], first[MAXP + 1], mpmax = 16, dmax = 32;
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        const fmf_f32_problem *p = ps + i;
        if (p->d != 32 && p->d != 64) return 1;
        splits[i] = p->n && p->B && p->H && p->m ? query_splits(p, nthreads) : 0;
        first[i + 1] = first[i] + p->B * p->H * splits[i];
        const int64_t mp = (p->m + 15) & ~(int64_t)15;
        if (mp > mpmax) mpmax = mp;
        if (p->d > dmax) dmax = p->d;
    }
    const int64_t items = first[count];
    if (!items) return 0;
    // per thread: K^T, V rows, the block's Q, logits and O
    const size_t sizes[] = {mpmax * dmax * 4, mpmax * dmax * 4, QB * dmax * 4, QB * mpmax * 4, QB * dmax * 4};
    size_t per_thread;
    char *pool = pool_alloc(sizes, 5, nthreads, &per_thread);
    if (!pool) return 3;
#pragma omp parallel num_threads(nthreads)
    {
        void *b[5];
        pool_carve(pool, per_thread, omp_get_thread_num(), sizes, 5, b);
        float *kt = b[0], *vr = b[1], *qbuf = b[2], *sbuf = b[3], *obuf = b[4];
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            int i = 0;
            while (it >= first[i + 1]) i++;
            const fmf_f32_problem *p = ps + i;
            const int64_t n = p->n, m = p->m, d = p->d, mp = (m + 15) & ~(int64_t)15, nblocks = (n + QB - 1) / QB;
            const int64_t j = it - first[i], bh = j / splits[i], part = j % splits[i], bb = bh / p->H, h = bh % p->H;
            const int64_t per = (nblocks + splits[i] - 1) / splits[i];
            const int64_t blk0 = part * per, blk1 = blk0 + per < nblocks ? blk0 + per : nblocks;
            if (blk0 >= blk1) continue;
            pack_kt(p->k + bb * p->sk[0] + h * p->sk[1], p->sk[2], m, mp, d, kt);
            const float *v = p->v + bb * p->sv[0] + h * p->sv[1];
            for (int64_t r = 0; r < m; r++) memcpy(vr + r * d, v + r * p->sv[2], d * 4);
            for (int64_t blk = blk0; blk < blk1; blk++) {
                const int64_t i0 = blk * QB, rows = n - i0 < QB ? n - i0 : QB;
                attend_block(p->q + bb * p->sq[0] + h * p->sq[1] + i0 * p->sq[2], p->sq[2], rows, kt, vr, m, mp, d,
                             p->scale, qbuf, sbuf, obuf, p->o + bb * p->so[0] + h * p->so[1] + i0 * p->so[2], p->so[2],
                             p->lse ? p->lse + (bb * p->H + h) * n + i0 : NULL);
            }
        }
    }
    free(pool);
    return 0;
}

// ---- backward -----------------------------------------------------------------------------
// dq, dk, dv of o = softmax(q k^T * scale) v from o, do and the forward's lse, per (b, h), query
// blocks of QB outer, all keys inner (the block's P and dS, QB x Mp each, stay in L2):
//   S = Q K^T, dP = dO V^T                  (s_block, K^T and V^T packed once per (b, h))
//   P = 2^(S scale log2e - lse log2e),  dS = P (dP - delta) scale,  delta = rowsum(dO o)
//   dQ = dS K                               (the block's rows are final)
//   dV += P^T dO, dK += dS^T Q              (fp32 accumulators over all blocks, [Mp][D])
// Padded query rows (q = do = 0) give dS = 0 and are left out of the P^T and dS^T products.
typedef struct {
    float *kt, *vt;          // [D][Mp]
    float *dk, *dv;          // [Mp + PV_ROWS][D] accumulators (key rows run in PV_ROWS steps past m)
    float *sbuf, *dpbuf;     // [QB][Mp] + PV_ROWS: S then P; dP then dS (read PV_ROWS keys past m)
    float *qbuf, *dobuf, *dqbuf;  // [QB][D]
} bwd_buffers;

static void backward_one(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv,
                         const float *o, int64_t so, const float *dout, int64_t sdo, const float *lse, float *dq,
                         int64_t sdq, float *dk, int64_t sdk, float *dv, int64_t sdv, int64_t n, int64_t m, int64_t d,
                         float scale, const bwd_buffers *w) {
    const int64_t mp = (m + 15) & ~(int64_t)15, rowsp = (m + PV_ROWS - 1) / PV_ROWS * PV_ROWS;
    const float log2e = 1.44269504088896341f, c = scale * log2e;
    pack_kt(k, sk, m, mp, d, w->kt);
    pack_kt(v, sv, m, mp, d, w->vt);
    memset(w->dk, 0, rowsp * d * 4);
    memset(w->dv, 0, rowsp * d * 4);
    const int64_t full = m & ~(int64_t)7;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(m - full)), lane));
    const __m256 cc = _mm256_set1_ps(c), sc = _mm256_set1_ps(scale);
    for (int64_t i0 = 0; i0 < n; i0 += QB) {
        const int64_t nrows = n - i0 < QB ? n - i0 : QB, groups = (nrows + S_ROWS - 1) / S_ROWS;
        const int64_t rows = groups * S_ROWS;
        float lse2[QB], dlt[QB];
        for (int64_t i = 0; i < QB; i++) {
            if (i < nrows) {
                const float *qi = q + (i0 + i) * sq, *oi = o + (i0 + i) * so, *gi = dout + (i0 + i) * sdo;
                memcpy(w->qbuf + i * d, qi, d * 4);
                memcpy(w->dobuf + i * d, gi, d * 4);
                __m256 acc = _mm256_setzero_ps();
                for (int64_t e = 0; e < d; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(gi + e), _mm256_loadu_ps(oi + e), acc);
                dlt[i] = hsum8(acc);
                lse2[i] = lse[i0 + i] * log2e;
            } else {
                memset(w->qbuf + i * d, 0, d * 4);
                memset(w->dobuf + i * d, 0, d * 4);
                dlt[i] = lse2[i] = 0.0f;
            }
        }
        for (int64_t j0 = 0; j0 < mp; j0 += 16)
            for (int64_t g = 0; g < groups; g++) {
                s_block(w->qbuf + g * S_ROWS * d, w->kt, mp, d, j0, w->sbuf + g * S_ROWS * mp);
                s_block(w->dobuf + g * S_ROWS * d, w->vt, mp, d, j0, w->dpbuf + g * S_ROWS * mp);
            }
        for (int64_t i = 0; i < rows; i++) {  // P and dS in place; lanes of keys >= m zeroed
            float *sr = w->sbuf + i * mp, *dr = w->dpbuf + i * mp;
            const __m256 L = _mm256_set1_ps(lse2[i]), D = _mm256_set1_ps(dlt[i]);
            for (int64_t j = 0; j < mp; j += 8) {
                __m256 p = exp2_neg(_mm256_fmsub_ps(_mm256_load_ps(sr + j), cc, L));
                __m256 ds = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_load_ps(dr + j), D)), sc);
                if (j + 8 > m) {
                    const __m256 kj = j == full ? keep : _mm256_setzero_ps();
                    p = _mm256_and_ps(p, kj);
                    ds = _mm256_and_ps(ds, kj);
                }
                _mm256_store_ps(sr + j, p);
                _mm256_store_ps(dr + j, ds);
            }
        }
        // dQ = dS K (K rows read in place), the block's rows final
        memset(w->dqbuf, 0, rows * d * 4);
        for (int64_t e = 0; e < d; e += 32)
            for (int64_t r = 0; r < rows; r += PV_ROWS)
                for (int64_t j0 = 0; j0 < m; j0 += KCHUNK)
                    pv_block(w->dpbuf + r * mp, mp, 1, k + e, sk, j0, j0 + KCHUNK < m ? j0 + KCHUNK : m,
                             w->dqbuf + r * d + e, d);
        for (int64_t i = 0; i < nrows; i++) memcpy(dq + (i0 + i) * sdq, w->dqbuf + i * d, d * 4);
        // dV += P^T dO, dK += dS^T Q over the block's real rows, PV_ROWS keys at a time
        for (int64_t e = 0; e < d; e += 32)
            for (int64_t j = 0; j < rowsp; j += PV_ROWS) {
                pv_block(w->sbuf + j, 1, mp, w->dobuf + e, d, 0, nrows, w->dv + j * d + e, d);
                pv_block(w->dpbuf + j, 1, mp, w->qbuf + e, d, 0, nrows, w->dk + j * d + e, d);
            }
    }
    for (int64_t j = 0; j < m; j++) {
        memcpy(dk + j * sdk, w->dk + j * d, d * 4);
        memcpy(dv + j * sdv, w->dv + j * d, d * 4);
    }
}

// st: strides (b, h, row) of q, k, v, o, do, dq, dk, dv, 3 each. lse: contiguous [B, H, N].
// Returns 0 on success, 1 for an unsupported D, 3 out of memory.
int fmf_attention_f32_bwd(const float *q, const float *k, const float *v, const float *o, const float *dout,
                          const float *lse, float *dq, float *dk, float *dv, int64_t B, int64_t H, int64_t n,
                          int64_t m, int64_t d, const int64_t *st, float scale, int nthreads) {
    if (d != 32 && d != 64) return 1;
    if (!B || !H || !m) return 0;
    const int64_t mp = (m + 15) & ~(int64_t)15;
    const size_t sizes[] = {d * mp * 4, d * mp * 4, (mp + PV_ROWS) * d * 4, (mp + PV_ROWS) * d * 4,
                            (QB * mp + PV_ROWS) * 4, (QB * mp + PV_ROWS) * 4, QB * d * 4, QB * d * 4, QB * d * 4};
    enum { NB = sizeof sizes / sizeof sizes[0] };
    size_t per_thread;
    char *pool = pool_alloc(sizes, NB, nthreads, &per_thread);
    if (!pool) return 3;
#pragma omp parallel num_threads(nthreads)
    {
        void *b[NB];
        pool_carve(pool, per_thread, omp_get_thread_num(), sizes, NB, b);
        const bwd_buffers w = {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]};
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t bb = bh / H, hh = bh % H;
#define AT(ptr, i) (ptr + bb * st[3 * (i)] + hh * st[3 * (i) + 1])
            backward_one(AT(q, 0), st[2], AT(k, 1), st[5], AT(v, 2), st[8], AT(o, 3), st[11], AT(dout, 4), st[14],
                         lse + bh * n, AT(dq, 5), st[17], AT(dk, 6), st[20], AT(dv, 7), st[23], n, m, d, scale, &w);
#undef AT
        }
    }
    free(pool);
    return 0;
}
