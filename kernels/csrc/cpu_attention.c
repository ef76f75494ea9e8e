// Attention, forward and backward, on x86 CPUs with AMX-BF16 tiles or, built with
// FMF_SOFT_TILES, with AVX512-BF16 alone (the tile section below says how): softmax(q k^T * scale) v
// for bf16 q, k, v.
//
// q [B, H, N, D], k and v [B, H, M, D], bf16 with unit stride over D and any strides over
// (B, H, N); o [B, H, N, D] bf16 (any strides over B, H, N), lse [B, H, N] fp32 (natural log of
// the softmax denominator plus the row max times scale; may be NULL). D in {32, 64}.
//
// Why not online softmax: FmFormer's segments are short (M <= a few thousand), so the logits of a
// 16-row query block over all M keys (16 x M fp32) fit in L1/L2. Each block is then three
// passes that each do one thing fast -- S = Q K^T on AMX tiles, an exact softmax in AVX-512 over
// each row, O = P V on AMX tiles -- with no rescaling of accumulators. Products of bf16 are exact
// in the fp32 tile accumulators; P is rounded to bf16 for the P V product, as flash attention does.
//
// Operand layouts AMX wants (VNNI: the K dimension in pairs):
//   S = Q K^T:  A = Q block [16 q x 32 d] bf16; B = K^T in pairs, kv[d/2][Mp] uint32 with
//               kv[p][j] = (k[j][2p], k[j][2p+1]) -- one 32-bit gather per 16 keys and pair;
//   O = P V:    A = P [16 q x 32 keys] bf16;    B = V in key pairs, vv[Mp/2][D][2] with
//               vv[r][e] = (v[2r][e], v[2r+1][e]) -- one 16-bit interleave per two keys.
// Mp = M rounded up to 32 keys; padded keys have zero k and v and are masked out of the softmax.
//
// Threads: OpenMP over (b, h, query range); each work item repacks its (b, h)'s k and v into
// per-thread buffers (cheap: O(M D) against the O(N M D) of the item) so any batch, B = 1
// included, splits into enough items.
#define _GNU_SOURCE  // sched_setaffinity, CPU_SET
#include <immintrin.h>
#include <sched.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_avx512.h"  // exp2_neg
#include "cpu_common.h"  // fmf_pin_threads, per-thread scratch pools, query splits

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define QB 16  // query rows per block: the AMX tile height

// ---- the eight 16-row x 64-byte tiles the kernels compute on -------------------------------
// Built with FMF_SOFT_TILES (CPUs with AVX512-BF16 but no AMX: AMD Zen 4/5, Intel Cooper Lake),
// the same tile operations run on AVX-512 registers with vdpbf16ps, with AMX's semantics:
// C[m][n] += sum_k A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1] in fp32. So both builds share every
// line of the attention code below and are tested against the same reference.
#ifndef FMF_SOFT_TILES
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

// Linux hands out AMX tile state only to a process that asks for it.
int fmf_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {  // every tile 16 rows x 64 bytes
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}
#define tile_load(t, p, stride) _tile_loadd(t, p, stride)
#define tile_store(t, p, stride) _tile_stored(t, p, stride)
#define tile_zero(t) _tile_zero(t)
#define tile_dp(c, a, b) _tile_dpbf16ps(c, a, b)
// two products with the same A: C0 += A B0, C1 += A B1
#define tile_dp2(c0, c1, a, b0, b1) \
    do {                            \
        _tile_dpbf16ps(c0, a, b0);  \
        _tile_dpbf16ps(c1, a, b1);  \
    } while (0)
// tile_dp, then C stored to p (row stride `stride` bytes)
#define tile_dp_store(c, a, b, p, stride) \
    do {                                  \
        _tile_dpbf16ps(c, a, b);          \
        _tile_stored(c, p, stride);       \
    } while (0)
// `count` steps of tile_dp along K: step i loads tile at from pa + i*astep and bt from pb + i*bstep
#define tile_dp_run(c, at, bt, pa, sa, astep, pb, sb, bstep, count)        \
    do {                                                                  \
        for (int64_t i_ = 0; i_ < (count); i_++) {                        \
            _tile_loadd(at, (const char *)(pa) + i_ * (astep), sa);       \
            _tile_loadd(bt, (const char *)(pb) + i_ * (bstep), sb);       \
            _tile_dpbf16ps(c, at, bt);                                    \
        }                                                                 \
    } while (0)
// tile_dp2, then C0 and C1 stored to p0 and p1 (row stride `stride` bytes)
#define tile_dp2_store(c0, c1, a, b0, b1, p0, p1, stride) \
    do {                                                  \
        tile_dp2(c0, c1, a, b0, b1);                      \
        _tile_stored(c0, p0, stride);                     \
        _tile_stored(c1, p1, stride);                     \
    } while (0)
// `count` steps of tile_dp2 along K: step i loads tile at from pa + i*astep (row stride sa) and
// tiles bt0, bt1 from pb0, pb1 + i*bstep (row stride sb); steps are byte offsets
#define tile_dp2_run(c0, c1, at, bt0, bt1, pa, sa, astep, pb0, pb1, sb, bstep, count)    \
    do {                                                                                  \
        for (int64_t i_ = 0; i_ < (count); i_++) {                                        \
            _tile_loadd(at, (const char *)(pa) + i_ * (astep), sa);                       \
            _tile_loadd(bt0, (const char *)(pb0) + i_ * (bstep), sb);                     \
            _tile_loadd(bt1, (const char *)(pb1) + i_ * (bstep), sb);                     \
            tile_dp2(c0, c1, at, bt0, bt1);                                               \
        }                                                                                 \
    } while (0)
#define tile_release() _tile_release()
#else
// An operand tile is a view of the memory it was loaded from (the kernels never write that memory
// before the product that reads it); an accumulator tile is 16 x 16 fp32 in a per-thread array,
// written by each product, or a view of the memory tile_dp2_store wrote it to. The products keep
// their accumulators in registers for all of a tile_dp2_run: round trips through the array cost
// 6-22% of the forward on Zen 5.
typedef struct {
    const char *p;
    int64_t stride;
    int state;  // VIEW: only p is valid; FILLED: tile_acc holds it; ZERO: all zeros (not yet written)
} soft_tile;
enum { VIEW, FILLED, ZERO };
static __thread soft_tile tiles[8];
static __thread float tile_acc[8][256] __attribute__((aligned(64)));

int fmf_amx_init(void) { return 1; }
static void configure_tiles(void) {}
#define tile_release() ((void)0)

static inline void tile_load(int t, const void *p, int64_t stride) {
    tiles[t] = (soft_tile){(const char *)p, stride, VIEW};
}

// zeroing is a state, not 1 KB of stores: the product that follows starts from zero registers
// (memset's rep stos cost 6% of the forward on Zen 5)
static inline void tile_zero(int t) { tiles[t].state = ZERO; }

static inline __m512 tile_row(int t, int r) {
    const soft_tile *s = &tiles[t];
    return s->state == ZERO     ? _mm512_setzero_ps()
           : s->state == FILLED ? _mm512_load_ps(tile_acc[t] + 16 * r)
                                : _mm512_loadu_ps((const float *)(s->p + r * s->stride));
}

static inline void tile_rows(int t, __m512 acc[16]) {
    for (int r = 0; r < 16; r++) acc[r] = tile_row(t, r);
}

static inline void tile_store(int t, void *p, int64_t stride) {
    __m512 acc[16];
    tile_rows(t, acc);
    for (int r = 0; r < 16; r++) _mm512_storeu_ps((char *)p + r * stride, acc[r]);
}

// One product over `count` steps along K (A at a + i*astep, B at b + i*bstep, byte offsets), all 16
// rows in registers: 16 independent vdpbf16ps chains hide its latency (4 chains ran at half the
// rate); A's pairs are broadcast from memory, B's row k is loaded once per k. The result goes to out
// (row stride os), which the tile then views, or, with out NULL, to the tile's accumulator.
static inline void soft_dp(int ct, const char *a, int64_t sa, int64_t astep, const char *b, int64_t sb,
                           int64_t bstep, int64_t count, char *out, int64_t os) {
    __m512 acc[16];
    tile_rows(ct, acc);
    for (int64_t i = 0; i < count; i++) {
        const char *ai = a + i * astep, *bi = b + i * bstep;
        for (int k = 0; k < 16; k++) {
            __m512bh bk = (__m512bh)_mm512_loadu_ps((const float *)(bi + k * sb));
            for (int r = 0; r < 16; r++) {
                int32_t pair;
                memcpy(&pair, ai + r * sa + 4 * k, 4);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), bk);
            }
        }
    }
    if (out) {
        for (int r = 0; r < 16; r++) _mm512_storeu_ps(out + r * os, acc[r]);
        tiles[ct] = (soft_tile){out, os, VIEW};
    } else {
        for (int r = 0; r < 16; r++) _mm512_store_ps(tile_acc[ct] + 16 * r, acc[r]);
        tiles[ct].state = FILLED;
    }
}

static inline void tile_dp(int ct, int at, int bt) {
    soft_dp(ct, tiles[at].p, tiles[at].stride, 0, tiles[bt].p, tiles[bt].stride, 0, 1, NULL, 0);
}

// tile_dp with the result written straight to p (which may be where C was loaded from)
static inline void tile_dp_store(int ct, int at, int bt, void *p, int64_t stride) {
    soft_dp(ct, tiles[at].p, tiles[at].stride, 0, tiles[bt].p, tiles[bt].stride, 0, 1, p, stride);
}

static inline void tile_dp_run(int ct, int at, int bt, const void *pa, int64_t sa, int64_t astep, const void *pb,
                               int64_t sb, int64_t bstep, int64_t count) {
    (void)at, (void)bt;  // (AMX loads them; here the product reads memory directly)
    soft_dp(ct, pa, sa, astep, pb, sb, bstep, count, NULL, 0);
}

// Two products with the same A, eight rows at a time, over `count` steps along K: each broadcast A
// pair feeds both products (half the broadcasts of two tile_dp calls), and the accumulators stay in
// registers across the steps. Step i reads A at a + i*astep (row stride sa) and B0, B1 at b0, b1 +
// i*bstep (row stride sb), byte offsets. The results go to out0/out1 (row stride os), which the
// tiles then view, or, with out0 NULL, to the tiles' accumulators.
static inline void soft_dp2(int c0, int c1, const char *a, int64_t sa, int64_t astep, const char *b0,
                            const char *b1, int64_t sb, int64_t bstep, int64_t count, char *out0, char *out1,
                            int64_t os) {
    for (int h = 0; h < 16; h += 8) {
        __m512 x[8], y[8];
        for (int r = 0; r < 8; r++) {
            x[r] = tile_row(c0, h + r);
            y[r] = tile_row(c1, h + r);
        }
        for (int64_t i = 0; i < count; i++) {
            const char *ai = a + i * astep, *u0 = b0 + i * bstep, *u1 = b1 + i * bstep;
            for (int k = 0; k < 16; k++) {
                __m512bh u = (__m512bh)_mm512_loadu_ps((const float *)(u0 + k * sb));
                __m512bh w = (__m512bh)_mm512_loadu_ps((const float *)(u1 + k * sb));
                for (int r = 0; r < 8; r++) {
                    int32_t pair;
                    memcpy(&pair, ai + (h + r) * sa + 4 * k, 4);
                    __m512bh ar = (__m512bh)_mm512_set1_epi32(pair);
                    x[r] = _mm512_dpbf16_ps(x[r], ar, u);
                    y[r] = _mm512_dpbf16_ps(y[r], ar, w);
                }
            }
        }
        for (int r = 0; r < 8; r++) {  // (the state still says where rows h+8.. are read from)
            if (out0) {
                _mm512_storeu_ps(out0 + (h + r) * os, x[r]);
                _mm512_storeu_ps(out1 + (h + r) * os, y[r]);
            } else {
                _mm512_store_ps(tile_acc[c0] + 16 * (h + r), x[r]);
                _mm512_store_ps(tile_acc[c1] + 16 * (h + r), y[r]);
            }
        }
    }
    if (out0) {
        tiles[c0] = (soft_tile){out0, os, VIEW};
        tiles[c1] = (soft_tile){out1, os, VIEW};
    } else {
        tiles[c0].state = tiles[c1].state = FILLED;
    }
}

static inline void tile_dp2(int c0, int c1, int at, int b0t, int b1t) {
    // (every caller's two B tiles have one row stride)
    soft_dp2(c0, c1, tiles[at].p, tiles[at].stride, 0, tiles[b0t].p, tiles[b1t].p, tiles[b0t].stride, 0, 1, NULL,
             NULL, 0);
}

// tile_dp2 with the results written straight to p0, p1: no round trip through the accumulators
static inline void tile_dp2_store(int c0, int c1, int at, int b0t, int b1t, void *p0, void *p1, int64_t stride) {
    soft_dp2(c0, c1, tiles[at].p, tiles[at].stride, 0, tiles[b0t].p, tiles[b1t].p, tiles[b0t].stride, 0, 1, p0, p1,
             stride);
}

static inline void tile_dp2_run(int c0, int c1, int at, int bt0, int bt1, const void *pa, int64_t sa, int64_t astep,
                                const void *pb0, const void *pb1, int64_t sb, int64_t bstep, int64_t count) {
    (void)at, (void)bt0, (void)bt1;  // (AMX loads them; here the products read memory directly)
    soft_dp2(c0, c1, pa, sa, astep, pb0, pb1, sb, bstep, count, NULL, NULL, 0);
}
#endif

// (exp2_neg, the softmax's 2^t: cpu_avx512.h)

// r[i][j] <- r[j][i] for a 16 x 16 block of 32-bit words: the usual 4-stage unpack/shuffle.
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}
// k [M, D] (row stride sk) -> kv[D/2][Mp] key-pair columns; keys >= M are zero. Rows are loaded
// whole (one cache line at D = 32) and transposed in registers: gathering the columns from the
// model's strided rows cost 12% of the kernel.
static void pack_k(const uint16_t *k, int64_t sk, int64_t m, int64_t mp, int64_t d, uint32_t *kv) {
    __m512i r[16];
    for (int64_t j0 = 0; j0 < mp; j0 += 16) {
        for (int64_t c = 0; c < d / 32; c++) {
            for (int64_t i = 0; i < 16; i++)
                r[i] = j0 + i < m ? _mm512_loadu_si512(k + (j0 + i) * sk + 32 * c) : _mm512_setzero_si512();
            transpose16(r);
            for (int64_t p = 0; p < 16; p++) _mm512_storeu_si512(kv + (16 * c + p) * mp + j0, r[p]);
        }
    }
}

// v [M, D] (row stride sv) -> vv[Mp/2][D][2]: rows 2r and 2r+1 interleaved element by element.
static void pack_v(const uint16_t *v, int64_t sv, int64_t m, int64_t mp, int64_t d, uint16_t *vv) {
    __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                  39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t r = 0; r < mp / 2; r++) {
        int64_t j = 2 * r;
        for (int64_t c = 0; c < d; c += 32) {
            __m512i a = j < m ? _mm512_loadu_si512(v + j * sv + c) : _mm512_setzero_si512();
            __m512i b = j + 1 < m ? _mm512_loadu_si512(v + (j + 1) * sv + c) : _mm512_setzero_si512();
            uint16_t *out = vv + (r * d + c) * 2;
            _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, lo, b));       // elements c .. c+15
            _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(a, hi, b));  // elements c+16 .. c+31
        }
    }
}

// One block of rows (nrows <= 16) of one (b, h): q rows qp (stride sq) -> o rows op (stride so).
static void attend_block(const uint16_t *qp, int64_t sq, int64_t nrows, const uint32_t *kv, const uint16_t *vv,
                         int64_t m, int64_t mp, int64_t d, float scale, float *sbuf, uint16_t *pbuf,
                         uint16_t *qbuf, float *obuf, uint16_t *op, int64_t so, float *lse) {
    // the block's queries, zero-padded to 16 rows (tile loads read all 16)
    for (int64_t i = 0; i < QB; i++) {
        if (i < nrows)
            memcpy(qbuf + i * d, qp + i * sq, d * 2);
        else
            memset(qbuf + i * d, 0, d * 2);
    }
    // S = Q K^T, 16 keys per tile, two tiles per step in different registers so that one's
    // load, product and store overlap the other's (tiles are not renamed)
    tile_load(1, qbuf, d * 2);
    if (d == 64) tile_load(2, qbuf + 32, d * 2);
    for (int64_t j0 = 0; j0 < mp; j0 += 32) {
        tile_zero(0);
        tile_zero(4);
        tile_load(3, kv + j0, mp * 4);
        tile_load(5, kv + j0 + 16, mp * 4);
        if (d == 64) {
            tile_dp2(0, 4, 1, 3, 5);
            tile_load(3, kv + 16 * mp + j0, mp * 4);
            tile_load(5, kv + 16 * mp + j0 + 16, mp * 4);
            tile_dp2_store(0, 4, 2, 3, 5, sbuf + j0, sbuf + j0 + 16, mp * 4);
        } else {
            tile_dp2_store(0, 4, 1, 3, 5, sbuf + j0, sbuf + j0 + 16, mp * 4);
        }
    }
    // exact softmax per row: P = 2^((s - max) * scale * log2 e), rounded to bf16; keys >= M get 0
    const float c = scale * 1.44269504088896341f;
    float inv[QB], rowlse[QB];
    int64_t full = m & ~(int64_t)15;
    __mmask16 tail = (__mmask16)((1u << (m - full)) - 1);
    for (int64_t i = 0; i < QB; i++) {
        const float *s = sbuf + i * mp;
        uint16_t *p = pbuf + i * mp;
        // four running maxima: one chain would wait on vmaxps's latency at every vector
        __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        int64_t j = 0;
        for (; j + 64 <= full; j += 64) {
            m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
            m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
            m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
            m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
        }
        for (; j < full; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
        if (tail) m1 = _mm512_mask_max_ps(m1, tail, m1, _mm512_maskz_loadu_ps(tail, s + full));
        __m512 mx = _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
        float rmax = _mm512_reduce_max_ps(mx);
        __m512 off = _mm512_set1_ps(rmax * c);
        __m512 cc = _mm512_set1_ps(c);
        __m512 sum = _mm512_setzero_ps(), sum1 = sum;
        for (j = 0; j + 32 <= full; j += 32) {  // two vectors per step: one 64-byte store of bf16
            __m512 e0 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cc, off));
            __m512 e1 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), cc, off));
            sum = _mm512_add_ps(sum, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        for (; j < full; j += 16) {
            __m512 e = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cc, off));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(p + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        if (full < mp) {  // the ragged 16 keys, then zeros up to Mp
            __m512 e = _mm512_maskz_mov_ps(tail, exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(s + full), cc, off)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(p + full), (__m256i)_mm512_cvtneps_pbh(e));
            for (j = full + 16; j < mp; j += 16) _mm256_storeu_si256((__m256i *)(p + j), _mm256_setzero_si256());
        }
        float rsum = _mm512_reduce_add_ps(_mm512_add_ps(sum, sum1));
        inv[i] = 1.0f / rsum;
        rowlse[i] = rmax * scale + logf(rsum);
    }
    // O = P V: D/16 accumulator tiles (4..7), 32 keys per step
    tile_zero(4);
    tile_zero(5);
    if (d == 64) {
        tile_zero(6);
        tile_zero(7);
    }
    // step j0/32 along the keys: P columns j0.. (64 bytes on) and V key pairs j0/2.. (64 d bytes on)
    tile_dp2_run(4, 5, 0, 1, 2, pbuf, mp * 2, 64, vv, vv + 32, d * 4, 64 * d, mp / 32);
    if (d == 64) tile_dp2_run(6, 7, 0, 3, 1, pbuf, mp * 2, 64, vv + 64, vv + 96, d * 4, 64 * d, mp / 32);
    tile_store(4, obuf, d * 4);
    tile_store(5, obuf + 16, d * 4);
    if (d == 64) {
        tile_store(6, obuf + 32, d * 4);
        tile_store(7, obuf + 48, d * 4);
    }
    for (int64_t i = 0; i < nrows; i++) {
        __m512 r = _mm512_set1_ps(inv[i]);
        for (int64_t e = 0; e < d; e += 16)
            _mm256_storeu_si256((__m256i *)(op + i * so + e),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(obuf + i * d + e), r)));
        if (lse) lse[i] = rowlse[i];
    }
}

// One forward problem of fmf_attention_fwd_many: q [B, H, n, d], k and v [B, H, m, d], o [B, H,
// n, d], lse [B, H, n] (contiguous, or NULL), as in the header above; s*: the (b, h, row) strides.
typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *o;
    float *lse;
    int64_t B, H, n, m, d;
    int64_t sq[3], sk[3], sv[3], so[3];
    float scale;
} fmf_fwd_problem;

static int64_t query_splits(const fmf_fwd_problem *p, int nthreads) {
    return fmf_query_splits(p->B * p->H, (p->n + QB - 1) / QB, nthreads);
}

// count problems in one parallel region, their work items in one queue: one call for the
// independent attentions of a layer (FmFormer's two self-attentions, its two cross-attentions)
// pays the call and the threads' start once. Returns 0 on success, 1 for an unsupported D (in
// any problem; nothing is computed), 2 when AMX is not granted, 3 out of memory.
int fmf_attention_fwd_many(const fmf_fwd_problem *ps, int count, int nthreads) {
    enum { MAXP = 8 };
    if (count < 1 || count > MAXP) return 1;
    int64_t splits[MAXP], first[MAXP + 1], mpmax = 32, dmax = 32;
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        const fmf_fwd_problem *p = ps + i;
        if (p->d != 32 && p->d != 64) return 1;
        splits[i] = p->n && p->B * p->H ? query_splits(p, nthreads) : 0;
        first[i + 1] = first[i] + p->B * p->H * splits[i];
        const int64_t mp = (p->m + 31) & ~(int64_t)31;
        if (mp > mpmax) mpmax = mp;
        if (p->d > dmax) dmax = p->d;
    }
    if (!fmf_amx_init()) return 2;
    const int64_t items = first[count];
    if (!items) return 0;
    // per thread: packed k and v, the block's logits, P, Q and O, sized for the largest problem
    const size_t sizes[] = {mpmax * dmax * 2, mpmax * dmax * 2, QB * mpmax * 4, QB * mpmax * 2, QB * dmax * 2,
                            QB * dmax * 4};
    size_t per_thread;
    char *pool = pool_alloc(sizes, 6, nthreads, &per_thread);
    if (!pool) return 3;
#pragma omp parallel num_threads(nthreads)
    {
        void *b[6];
        pool_carve(pool, per_thread, omp_get_thread_num(), sizes, 6, b);
        uint32_t *kv = b[0];
        uint16_t *vv = b[1], *pbuf = b[3], *qbuf = b[4];
        float *sbuf = b[2], *obuf = b[5];
        configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            int i = 0;
            while (it >= first[i + 1]) i++;
            const fmf_fwd_problem *p = ps + i;
            const int64_t n = p->n, m = p->m, d = p->d, mp = (m + 31) & ~(int64_t)31, nblocks = (n + QB - 1) / QB;
            const int64_t j = it - first[i], bh = j / splits[i], part = j % splits[i], bb = bh / p->H, h = bh % p->H;
            const int64_t per = (nblocks + splits[i] - 1) / splits[i];
            const int64_t blk0 = part * per, blk1 = blk0 + per < nblocks ? blk0 + per : nblocks;
            if (blk0 >= blk1) continue;
            pack_k(p->k + bb * p->sk[0] + h * p->sk[1], p->sk[2], m, mp, d, kv);
            pack_v(p->v + bb * p->sv[0] + h * p->sv[1], p->sv[2], m, mp, d, vv);
            for (int64_t blk = blk0; blk < blk1; blk++) {
                int64_t i0 = blk * QB, rows = n - i0 < QB ? n - i0 : QB;
                attend_block(p->q + bb * p->sq[0] + h * p->sq[1] + i0 * p->sq[2], p->sq[2], rows, kv, vv, m, mp, d,
                             p->scale, sbuf, pbuf, qbuf, obuf, p->o + bb * p->so[0] + h * p->so[1] + i0 * p->so[2],
                             p->so[2], p->lse ? p->lse + (bb * p->H + h) * n + i0 : NULL);
            }
        }
        tile_release();
    }
    free(pool);
    return 0;
}

// ---- backward -----------------------------------------------------------------------------
// dq, dk, dv of o = softmax(q k^T * scale) v from o, do and the forward's lse. Per (b, h), keys
// outer in chunks of 32, all queries inner (their packed operands stay in cache), everything
// key-major so the softmax terms are per-lane vectors over 16 queries:
//   S^T = K Q^T, dP^T = V dO^T   (A: key rows, B: Q^T / dO^T in d pairs)
//   P^T = 2^(S^T scale log2e - lse log2e),  dS^T = P^T (dP^T - delta) scale
//   dq^T += K^T dS^T             (A: K^T rows, B: dS^T in key pairs; fp32 in memory across chunks)
//   dv = P^T dO, dk = dS^T Q     (over all queries at once: the chunk's rows are final)
// Padded queries have zero q and do (so zero products) and finite lse and delta (0).
static void split_pairs(const uint32_t *kv, int64_t mp, int64_t d, uint16_t *kt) {
    // kv[d/2][Mp] pairs -> kt[D][Mp]: the low halves are even d, the high halves odd d
    for (int64_t p = 0; p < d / 2; p++)
        for (int64_t j = 0; j < mp; j += 16) {
            __m512i w = _mm512_loadu_si512(kv + p * mp + j);
            _mm256_storeu_si256((__m256i *)(kt + 2 * p * mp + j), _mm512_cvtepi32_epi16(w));
            _mm256_storeu_si256((__m256i *)(kt + (2 * p + 1) * mp + j), _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
        }
}

static void pad_rows(const uint16_t *x, int64_t sx, int64_t m, int64_t mp, int64_t d, uint16_t *out) {
    for (int64_t j = 0; j < mp; j++) {
        if (j < m)
            memcpy(out + j * d, x + j * sx, d * 2);
        else
            memset(out + j * d, 0, d * 2);
    }
}

static inline __m512 load_bf16(const uint16_t *p) {  // 16 bf16 -> fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

typedef struct {
    uint32_t *qt, *dot;   // [D/2][Np] d-pair columns of q and do
    uint16_t *qv, *dov;   // [Np/2][D][2] query pairs of q and do
    uint16_t *kr, *vr;    // [Mp][D] zero-padded rows
    uint32_t *kv;         // [D/2][Mp] (for kt)
    uint16_t *kt;         // [D][Mp]
    float *dqt;           // [D][Np]
    float *lse2, *dlt;    // [Np]
    uint16_t *pt, *dst;   // [32][Np]
    float *sbuf, *dpbuf;  // [32][16]
    uint16_t *dsv;        // [16][16][2]
    float *ov, *ok;       // [16][D]
} bwd_buffers;

static void backward_one(const uint16_t *q, int64_t sq, const uint16_t *k, int64_t sk, const uint16_t *v, int64_t sv,
                         const uint16_t *o, int64_t so, const uint16_t *dout, int64_t sdo, const float *lse,
                         uint16_t *dq, int64_t sdq, uint16_t *dk, int64_t sdk, uint16_t *dv, int64_t sdv, int64_t n,
                         int64_t m, int64_t d, float scale, const bwd_buffers *w) {
    const int64_t np = (n + 31) & ~(int64_t)31, mp = (m + 31) & ~(int64_t)31;
    const float log2e = 1.44269504088896341f, c = scale * log2e;
    pack_k(q, sq, n, np, d, w->qt);
    pack_k(dout, sdo, n, np, d, w->dot);
    pack_v(q, sq, n, np, d, w->qv);
    pack_v(dout, sdo, n, np, d, w->dov);
    pad_rows(k, sk, m, mp, d, w->kr);
    pad_rows(v, sv, m, mp, d, w->vr);
    pack_k(k, sk, m, mp, d, w->kv);
    split_pairs(w->kv, mp, d, w->kt);
    memset(w->dqt, 0, d * np * 4);
    for (int64_t i = 0; i < np; i++) {
        float dl = 0.0f;
        if (i < n) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t e = 0; e < d; e += 16)
                acc = _mm512_fmadd_ps(load_bf16(dout + i * sdo + e), load_bf16(o + i * so + e), acc);
            dl = _mm512_reduce_add_ps(acc);
        }
        w->lse2[i] = i < n ? lse[i] * log2e : 0.0f;
        w->dlt[i] = dl * scale;
    }
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 cc = _mm512_set1_ps(c), sc = _mm512_set1_ps(scale);
    for (int64_t kc = 0; kc < mp; kc += 32) {
        for (int64_t q0 = 0; q0 < np; q0 += 16) {
            tile_zero(0);
            tile_zero(1);
            tile_zero(2);
            tile_zero(3);
            // S^T = K Q^T and dP^T = V dO^T over head-dim chunks; the last chunk's products store the tiles
#define BWD_QD_LOAD(ch)                                          \
    tile_load(5, w->qt + 16 * (ch) * np + q0, np * 4);           \
    tile_load(6, w->dot + 16 * (ch) * np + q0, np * 4)
#define BWD_KV_LOAD(src, ch)                                     \
    tile_load(4, (src) + kc * d + 32 * (ch), d * 2);             \
    tile_load(7, (src) + (kc + 16) * d + 32 * (ch), d * 2)
            const int64_t last = d / 32 - 1;
            for (int64_t ch = 0; ch < last; ch++) {
                BWD_QD_LOAD(ch);
                BWD_KV_LOAD(w->kr, ch);
                tile_dp(0, 4, 5);
                tile_dp(1, 7, 5);
                BWD_KV_LOAD(w->vr, ch);
                tile_dp(2, 4, 6);
                tile_dp(3, 7, 6);
            }
            BWD_QD_LOAD(last);
            BWD_KV_LOAD(w->kr, last);
            tile_dp_store(0, 4, 5, w->sbuf, 64);
            tile_dp_store(1, 7, 5, w->sbuf + 256, 64);
            BWD_KV_LOAD(w->vr, last);
            tile_dp_store(2, 4, 6, w->dpbuf, 64);
            tile_dp_store(3, 7, 6, w->dpbuf + 256, 64);
#undef BWD_QD_LOAD
#undef BWD_KV_LOAD
            __m512 L = _mm512_loadu_ps(w->lse2 + q0), D = _mm512_loadu_ps(w->dlt + q0);
            for (int64_t r = 0; r < 32; r += 2) {
                __m512 p0 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(w->sbuf + 16 * r), cc, L));
                __m512 p1 = exp2_neg(_mm512_fmsub_ps(_mm512_loadu_ps(w->sbuf + 16 * r + 16), cc, L));
                __m512 d0 = _mm512_mul_ps(p0, _mm512_fmsub_ps(_mm512_loadu_ps(w->dpbuf + 16 * r), sc, D));
                __m512 d1 = _mm512_mul_ps(p1, _mm512_fmsub_ps(_mm512_loadu_ps(w->dpbuf + 16 * r + 16), sc, D));
                _mm256_storeu_si256((__m256i *)(w->pt + r * np + q0), (__m256i)_mm512_cvtneps_pbh(p0));
                _mm256_storeu_si256((__m256i *)(w->pt + (r + 1) * np + q0), (__m256i)_mm512_cvtneps_pbh(p1));
                __m512i ds = (__m512i)_mm512_cvtne2ps_pbh(d1, d0);  // [row r | row r+1]
                _mm256_storeu_si256((__m256i *)(w->dst + r * np + q0), _mm512_castsi512_si256(ds));
                _mm256_storeu_si256((__m256i *)(w->dst + (r + 1) * np + q0), _mm512_extracti64x4_epi64(ds, 1));
                _mm512_storeu_si512(w->dsv + r * 16, _mm512_permutexvar_epi16(pairs, ds));
            }
            for (int64_t t = 0; t < d / 16; t++) {
                tile_load(0, w->dqt + 16 * t * np + q0, np * 4);
                tile_load(4, w->kt + 16 * t * mp + kc, mp * 2);
                tile_load(5, w->dsv, 64);
                tile_dp_store(0, 4, 5, w->dqt + 16 * t * np + q0, np * 4);
            }
        }
        for (int64_t h = 0; h < 2 && kc + 16 * h < m; h++) {
            for (int64_t t = 0; t < d / 16; t++) {
                tile_zero(0);
                tile_zero(1);
                // 32 queries per step: P^T / dS^T columns q0.. (64 bytes on), dO / Q query pairs q0/2..
                tile_dp_run(0, 4, 5, w->pt + 16 * h * np, np * 2, 64, w->dov + 32 * t, d * 4, 64 * d, np / 32);
                tile_dp_run(1, 6, 7, w->dst + 16 * h * np, np * 2, 64, w->qv + 32 * t, d * 4, 64 * d, np / 32);
                tile_store(0, w->ov + 16 * t, d * 4);
                tile_store(1, w->ok + 16 * t, d * 4);
            }
            for (int64_t r = 0; r < 16 && kc + 16 * h + r < m; r++) {
                int64_t j = kc + 16 * h + r;
                for (int64_t e = 0; e < d; e += 16) {
                    _mm256_storeu_si256((__m256i *)(dv + j * sdv + e), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w->ov + r * d + e)));
                    _mm256_storeu_si256((__m256i *)(dk + j * sdk + e), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w->ok + r * d + e)));
                }
            }
        }
    }
    // dq^T [D][Np] -> dq rows, 16 x 16 blocks at a time
    __m512i r16[16];
    for (int64_t q0 = 0; q0 < n; q0 += 16)
        for (int64_t t = 0; t < d / 16; t++) {
            for (int64_t i = 0; i < 16; i++) r16[i] = _mm512_loadu_si512(w->dqt + (16 * t + i) * np + q0);
            transpose16(r16);
            for (int64_t i = 0; i < 16 && q0 + i < n; i++)
                _mm256_storeu_si256((__m256i *)(dq + (q0 + i) * sdq + 16 * t),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r16[i])));
        }
}

// st: strides (b, h, row) of q, k, v, o, do, dq, dk, dv, 3 each. lse: contiguous [B, H, N].
int fmf_attention_bwd(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                      const uint16_t *dout, const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv, int64_t B,
                      int64_t H, int64_t n, int64_t m, int64_t d, const int64_t *st, float scale, int nthreads) {
    if (d != 32 && d != 64) return 1;
    if (!fmf_amx_init()) return 2;
    const int64_t np = (n + 31) & ~(int64_t)31, mp = (m + 31) & ~(int64_t)31;
    const size_t sizes[] = {np * d * 2, np * d * 2, np * d * 2, np * d * 2, mp * d * 2, mp * d * 2, mp * d * 2,
                            mp * d * 2, d * np * 4, np * 4, np * 4, 32 * np * 2, 32 * np * 2, 32 * 16 * 4,
                            32 * 16 * 4, 1024, 16 * d * 4, 16 * d * 4};
    const int nbuf = sizeof sizes / sizeof sizes[0];
    size_t per_thread;
    char *pool = pool_alloc(sizes, nbuf, nthreads, &per_thread);
    if (!pool) return 3;
#pragma omp parallel num_threads(nthreads)
    {
        void *b[18];
        pool_carve(pool, per_thread, omp_get_thread_num(), sizes, nbuf, b);
        bwd_buffers w = {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                         b[14], b[15], b[16], b[17]};
        configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t bb = bh / H, hh = bh % H;
#define AT(ptr, i) (ptr + bb * st[3 * (i)] + hh * st[3 * (i) + 1])
            backward_one(AT(q, 0), st[2], AT(k, 1), st[5], AT(v, 2), st[8], AT(o, 3), st[11], AT(dout, 4), st[14],
                         lse + bh * n, AT(dq, 5), st[17], AT(dk, 6), st[20], AT(dv, 7), st[23], n, m, d, scale, &w);
#undef AT
        }
        tile_release();
    }
    free(pool);
    return 0;
}
