/* Single-thread search of an IVF index of 4-bit PQ codes by inner product, with an exact
 * re-rank: the scan behind funnelrec.ann.fastscan (see its docstring and docs/ann.md).
 *
 * A query q [d]:
 *   1. scores the nlist centroids (q . c_l) and keeps the nprobe best buckets;
 *   2. builds the per-query table of each sub-quantizer s: -(q_s . p_{s,c}) for its 16
 *      codewords c, quantised to 8 bits with one scale for all tables;
 *   3. scans the buckets' codes, 32 vectors per block, summing the 8-bit table entries
 *      in 16-bit lanes with SIMD byte shuffles, and keeps the `kfetch` smallest
 *      approximate distances -(q . c_l + sum_s q_s . p_{s, code_s});
 *   4. re-scores those kfetch rows exactly (q . x over the float vectors) and returns
 *      the k best, best first.
 *
 * Code layout: bucket l holds slots list_start[l] .. list_start[l+1] (a multiple of 32,
 * padded with row -1). Block b (slots 32b .. 32b+31) is M/2 runs of 32 bytes; in run j,
 * byte i holds slot 32b+i's code of sub-quantizer 2j in its low nibble and of 2j+1 in
 * its high nibble. A byte shuffle then looks up 32 slots' entries of one table at once.
 *
 * Three implementations of the block sums give identical numbers: AVX-512BW, AVX2 and
 * portable C; the best the CPU supports is chosen at run time (fs_force_level for tests).
 * The library is loaded with ctypes; the module init below only makes it importable
 * (its path is the module's __file__). Entry points take no Python objects and hold no
 * state between calls, so concurrent calls (ctypes releases the GIL) are safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FS_X86 1
#include <immintrin.h>
#else
#define FS_X86 0
#endif

#define LEVELS_NEED_AVX512BW
#include "_levels.h"

#define FS_BLOCK 32
#define FS_MAX_M 128 /* 255 * m < 2^15: sums fit signed 16-bit lanes */

typedef struct {
    int32_t d;                 /* vector dimension */
    int32_t nlist;             /* buckets */
    int32_t m;                 /* 4-bit sub-quantizers: d % m == 0, m % 4 == 0, m <= 128 */
    int32_t pad_;
    const float *centroids;    /* [ceil(nlist / 16)][d][16]: 16 centroids' i-th components
                                  side by side (zeros past nlist) */
    const float *codebook;     /* [m][16][d / m] */
    const int64_t *list_start; /* [nlist + 1]: bucket l's first slot, a multiple of 32 */
    const int64_t *list_size;  /* [nlist]: its vectors (then padding to a multiple of 32) */
    const uint8_t *codes;      /* [list_start[nlist] / 32][m / 2][32] */
    const int64_t *rows;       /* [list_start[nlist]]: each slot's row, -1 for padding */
    const float *vectors;      /* [rows][d] */
} fs_index;

typedef struct {
    float d;
    int32_t pad_;
    int64_t r;
} fs_cand;

enum { FS_SCALAR = 0, FS_AVX2 = 1, FS_AVX512 = 2 }; /* _levels.h */

/* ------------------------------------------------------------------ selection
 *
 * Which way a comparison goes is unpredictable here, and mispredicted branches made a
 * quickselect over (distance, row) structs, with qsort for the order, the biggest cost
 * after the scan (a bounded heap was no better; timings in docs/ann.md, "The scan
 * kernel"). Now a quickselect on bare floats, whose partition writes every key to both
 * sides and advances one cursor (no branch), finds the cut; the few kept (buckets,
 * final results) are then put in order by insertion.
 */

/* a comes after b: larger distance, or the same distance and a larger row (a total
   order, so results do not depend on the order items arrive in) */
static int worse(const fs_cand *a, const fs_cand *b) {
    return a->d > b->d || (a->d == b->d && a->r > b->r);
}

/* Insertion sort: for the ~100 items sorted here its only mispredicted branch is each
   item's last comparison. */
static void sort_cands(fs_cand *c, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        const fs_cand x = c[i];
        int64_t j = i - 1;
        for (; j >= 0 && worse(&c[j], &x); j--) c[j + 1] = c[j];
        c[j + 1] = x;
    }
}

static float kth_least(float *a, float *lt, float *ge, int64_t n, int64_t k);

/* out[0..k): the k least of (d[i], id_i) for i < n, best first, where id_i is ids[i]
   (or i when ids is NULL); scratch: 3n floats, out: n. Returns k (or n when n < k). */
static int64_t least_sorted(const float *d, const int64_t *ids, int64_t n, int64_t k,
                            float *scratch, fs_cand *out) {
    if (k > n) k = n;
    if (k <= 0) return 0;
    memcpy(scratch, d, (size_t)n * sizeof(float));
    const float cut = kth_least(scratch, scratch + n, scratch + 2 * n, n, k - 1);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) { /* all <= cut: k of them, and any ties beyond */
        out[m].d = d[i];
        out[m].r = ids ? ids[i] : i;
        m += d[i] <= cut;
    }
    sort_cands(out, m); /* ties in (d, row) order, so the k kept do not depend on luck */
    return k;
}

static float median3(float a, float b, float c) {
    if (a > b) {
        const float t = a;
        a = b;
        b = t;
    }
    return c < a ? a : c > b ? b : c;
}

/* The k-th least (0-based) of a[0..n); a, lt and ge (n floats each) are overwritten. */
static float kth_least(float *a, float *lt, float *ge, int64_t n, int64_t k) {
    while (n > 32) {
        const float p = median3(a[0], a[n / 2], a[n - 1]);
        int64_t nl = 0, ng = 0;
        for (int64_t i = 0; i < n; i++) { /* x to both; only its side's cursor moves */
            const float x = a[i];
            const int64_t less = x < p;
            lt[nl] = x;
            ge[ng] = x;
            nl += less;
            ng += 1 - less;
        }
        float *t = a;
        if (k < nl) {
            a = lt;
            lt = t;
            n = nl;
            continue;
        }
        int64_t equal = 0, m = 0;
        for (int64_t i = 0; i < ng; i++) equal += ge[i] == p;
        if (k < nl + equal) return p;
        for (int64_t i = 0; i < ng; i++) { /* those > p */
            const float x = ge[i];
            t[m] = x;
            m += x > p;
        }
        k -= nl + equal;
        n = m;
    }
    for (int64_t i = 1; i < n; i++) {
        const float x = a[i];
        int64_t j = i - 1;
        for (; j >= 0 && a[j] > x; j--) a[j + 1] = a[j];
        a[j + 1] = x;
    }
    return a[k];
}

/* Keep, in their order, the keep least of keys[0..n) (with their slots), ties at the cut
   going to the earliest; returns the largest key kept. scratch: 3n floats. */
static float keep_least(float *keys, int64_t *slots, int64_t n, int64_t keep, float *scratch) {
    memcpy(scratch, keys, (size_t)n * sizeof(float));
    const float cut = kth_least(scratch, scratch + n, scratch + 2 * n, n, keep - 1);
    int64_t below = 0;
    for (int64_t i = 0; i < n; i++) below += keys[i] < cut;
    int64_t ties = keep - below, m = 0;
    for (int64_t i = 0; i < n; i++) {
        const float x = keys[i];
        const int64_t s = slots[i];
        const int tie = x == cut && ties > 0;
        ties -= tie;
        keys[m] = x;
        slots[m] = s;
        m += (x < cut) | tie;
    }
    return cut;
}

/* ------------------------------------------------------------------ dot products */

static float dot_scalar(const float *a, const float *b, int d) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < d; i++) r += a[i] * b[i];
    return r;
}

#if FS_X86
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float r = _mm_cvtss_f32(h);
    for (; i < d; i++) r += a[i] * b[i];
    return r;
}
#endif

/* ------------------------------------------------------------------ bucket scores
 *
 * out[l] = -(q . c_l) for the nlist centroids, stored 16 to a block with their i-th
 * components side by side: each block is 16 lanes of multiply-adds over i, no
 * horizontal sums, and several blocks in flight at once.
 */

static void coarse_scalar(const float *q, const float *ct, int d, int nlist, float *out) {
    for (int b = 0; b * 16 < nlist; b++) {
        float acc[16] = {0};
        const float *c = ct + (int64_t)b * d * 16;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < 16; j++) acc[j] += q[i] * c[i * 16 + j];
        for (int j = 0; j < 16 && b * 16 + j < nlist; j++) out[b * 16 + j] = -acc[j];
    }
}

#if FS_X86
__attribute__((target("avx2,fma"))) static void coarse_avx2(const float *q, const float *ct,
                                                             int d, int nlist, float *out) {
    float tmp[32];
    for (int b = 0; b * 16 < nlist; b += 2) {
        const int two = (b + 1) * 16 < nlist;
        const float *c0 = ct + (int64_t)b * d * 16, *c1 = two ? c0 + d * 16 : c0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < d; i++) {
            const __m256 qi = _mm256_set1_ps(q[i]);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(c0 + i * 16), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(c0 + i * 16 + 8), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(c1 + i * 16), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(c1 + i * 16 + 8), a3);
        }
        _mm256_storeu_ps(tmp, a0);
        _mm256_storeu_ps(tmp + 8, a1);
        _mm256_storeu_ps(tmp + 16, a2);
        _mm256_storeu_ps(tmp + 24, a3);
        for (int j = 0; j < 32 && b * 16 + j < nlist; j++) out[b * 16 + j] = -tmp[j];
    }
}

__attribute__((target("avx512f"))) static void coarse_avx512(const float *q, const float *ct,
                                                              int d, int nlist, float *out) {
    float tmp[64];
    const int blocks = (nlist + 15) / 16;
    for (int b = 0; b < blocks; b += 4) {
        const float *c[4];
        for (int u = 0; u < 4; u++) c[u] = ct + (int64_t)(b + u < blocks ? b + u : b) * d * 16;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < d; i++) {
            const __m512 qi = _mm512_set1_ps(q[i]);
            a0 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(c[0] + i * 16), a0);
            a1 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(c[1] + i * 16), a1);
            a2 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(c[2] + i * 16), a2);
            a3 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(c[3] + i * 16), a3);
        }
        _mm512_storeu_ps(tmp, a0);
        _mm512_storeu_ps(tmp + 16, a1);
        _mm512_storeu_ps(tmp + 32, a2);
        _mm512_storeu_ps(tmp + 48, a3);
        for (int j = 0; j < 64 && b * 16 + j < nlist; j++) out[b * 16 + j] = -tmp[j];
    }
}
#endif

/* ------------------------------------------------------------------ block sums
 *
 * Each returns the 32 sums of a block in `sums` (slot i at sums[i]) and a bit mask of
 * the slots whose sum is < thr (bit i: slot i).
 *
 * 16-bit lanes: the shuffle gives 32 bytes, slot i at byte i; seen as 16-bit lanes, lane
 * j = byte 2j + 256 * byte 2j+1. Adding whole lanes into acc_w and the high bytes alone
 * into acc_h, the odd slots' sums are acc_h and the even slots' acc_w - (acc_h << 8)
 * (mod 2^16: exact, as each sum is at most 255 m < 2^15).
 */

static uint32_t block_scalar(const uint8_t *blk, const uint8_t *lut, int m, int thr,
                             uint16_t *sums) {
    uint32_t mask = 0;
    for (int i = 0; i < FS_BLOCK; i++) {
        unsigned s = 0;
        for (int j = 0; j < m / 2; j++) {
            uint8_t c = blk[FS_BLOCK * j + i];
            s += lut[(2 * j) * 16 + (c & 15)] + lut[(2 * j + 1) * 16 + (c >> 4)];
        }
        sums[i] = (uint16_t)s;
        if ((int)s < thr) mask |= 1u << i;
    }
    return mask;
}

#if FS_X86
/* even [16] (slots 0, 2, ..., 30) and odd [16] lanes -> sums in slot order, and the mask */
__attribute__((target("avx2"))) static uint32_t finish_avx2(__m256i even, __m256i odd, int thr,
                                                             uint16_t *sums) {
    /* interleave back into slot order: unpack works within 128-bit halves, so slots
       0-15 come out as (lo of half 0, hi of half 0) and 16-31 from half 1 */
    __m256i a = _mm256_unpacklo_epi16(even, odd); /* slots 0-7 | 16-23 */
    __m256i b = _mm256_unpackhi_epi16(even, odd); /* slots 8-15 | 24-31 */
    __m256i first = _mm256_permute2x128_si256(a, b, 0x20);  /* slots 0-15 */
    __m256i second = _mm256_permute2x128_si256(a, b, 0x31); /* slots 16-31 */
    _mm256_storeu_si256((__m256i *)sums, first);
    _mm256_storeu_si256((__m256i *)(sums + 16), second);
    __m256i t = _mm256_set1_epi16((short)thr);
    /* sums < 2^15, so signed compares are exact; packs keeps the halves' order */
    __m256i lt = _mm256_packs_epi16(_mm256_cmpgt_epi16(t, first), _mm256_cmpgt_epi16(t, second));
    lt = _mm256_permute4x64_epi64(lt, 0xD8);
    return (uint32_t)_mm256_movemask_epi8(lt);
}

__attribute__((target("avx2"))) static uint32_t block_avx2(const uint8_t *blk, const __m256i *lut,
                                                            int m, int thr, uint16_t *sums) {
    __m256i acc_w = _mm256_setzero_si256(), acc_h = _mm256_setzero_si256();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < m / 2; j++) {
        __m256i c = _mm256_loadu_si256((const __m256i *)(blk + FS_BLOCK * j));
        __m256i lo = _mm256_and_si256(c, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
        __m256i r0 = _mm256_shuffle_epi8(lut[2 * j], lo);
        __m256i r1 = _mm256_shuffle_epi8(lut[2 * j + 1], hi);
        acc_w = _mm256_add_epi16(acc_w, _mm256_add_epi16(r0, r1));
        acc_h = _mm256_add_epi16(
            acc_h, _mm256_add_epi16(_mm256_srli_epi16(r0, 8), _mm256_srli_epi16(r1, 8)));
    }
    __m256i even = _mm256_sub_epi16(acc_w, _mm256_slli_epi16(acc_h, 8));
    return finish_avx2(even, acc_h, thr, sums);
}

/* Two runs (sub-quantizers 4j .. 4j+3) per 64-byte load; lut holds, per j, the tables of
   4j and 4j+2 (low nibbles) and of 4j+1 and 4j+3 (high nibbles), each in two 128-bit
   lanes. The two 256-bit halves are added at the end. */
__attribute__((target("avx512f,avx512bw,avx2"))) static uint32_t block_avx512(
    const uint8_t *blk, const __m512i *lut, int m, int thr, uint16_t *sums) {
    __m512i acc_w = _mm512_setzero_si512(), acc_h = _mm512_setzero_si512();
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < m / 4; j++) {
        __m512i c = _mm512_loadu_si512((const void *)(blk + 2 * FS_BLOCK * j));
        __m512i lo = _mm512_and_si512(c, low4);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
        __m512i r0 = _mm512_shuffle_epi8(lut[2 * j], lo);
        __m512i r1 = _mm512_shuffle_epi8(lut[2 * j + 1], hi);
        acc_w = _mm512_add_epi16(acc_w, _mm512_add_epi16(r0, r1));
        acc_h = _mm512_add_epi16(
            acc_h, _mm512_add_epi16(_mm512_srli_epi16(r0, 8), _mm512_srli_epi16(r1, 8)));
    }
    __m256i w = _mm256_add_epi16(_mm512_castsi512_si256(acc_w), _mm512_extracti64x4_epi64(acc_w, 1));
    __m256i h = _mm256_add_epi16(_mm512_castsi512_si256(acc_h), _mm512_extracti64x4_epi64(acc_h, 1));
    __m256i even = _mm256_sub_epi16(w, _mm256_slli_epi16(h, 8));
    return finish_avx2(even, h, thr, sums);
}
#endif

/* ------------------------------------------------------------------ search */

/* The level searches run at: 0 portable C, 1 AVX2, 2 AVX-512 (with BW). */
int fs_level(void) { return cpu_level(); }

/* Force a level (tests); see force_level. */
int fs_force_level(int level) { return force_level(level); }

/* Per-call working memory (one allocation). */
typedef struct {
    float *keys;     /* [cap] approximate distances of the candidates kept so far */
    int64_t *slots;  /* [cap] their slots (positions in the code layout) */
    float *scratch;  /* [3 max(cap, nlist) + 3 kfetch] for keep_least / least_sorted */
    float *coarse;   /* [nlist] */
    fs_cand *probes; /* [nlist]: the buckets (and ties past nprobe) */
    fs_cand *final;  /* [kfetch]: the best re-ranked (and ties past k) */
    float *table;    /* [m * 16] */
    int64_t cap;
} fs_work;

static void search_one(const fs_index *ix, const float *q, int nprobe, int k, int kfetch,
                       int level, fs_work *w, int64_t *out_rows, float *out_scores) {
    const int d = ix->d, m = ix->m, nlist = ix->nlist, dsub = d / m;
    float (*dot)(const float *, const float *, int) = dot_scalar;
#if FS_X86
    if (level >= FS_AVX2) dot = dot_avx2;
#endif
    /* 1. buckets: the nprobe largest q . c_l (ties: lower bucket), best first */
    float *coarse = w->coarse; /* as distances */
#if FS_X86
    if (level == FS_AVX512) coarse_avx512(q, ix->centroids, d, nlist, coarse);
    else if (level == FS_AVX2) coarse_avx2(q, ix->centroids, d, nlist, coarse);
    else
#endif
        coarse_scalar(q, ix->centroids, d, nlist, coarse);
    least_sorted(coarse, NULL, nlist, nprobe, w->scratch, w->probes);

    /* 2. tables: t[s][c] = -(q_s . p_{s,c}) - min_c, as 8 bits with one scale */
    float *table = w->table;
    float offset = 0.0f, range = 0.0f;
    for (int s = 0; s < m; s++) {
        float lo = FLT_MAX, hi = -FLT_MAX;
        for (int c = 0; c < 16; c++) {
            const float *p = ix->codebook + ((int64_t)s * 16 + c) * dsub;
            float v = 0.0f;
            for (int i = 0; i < dsub; i++) v -= q[s * dsub + i] * p[i];
            table[s * 16 + c] = v;
            if (v < lo) lo = v;
            if (v > hi) hi = v;
        }
        for (int c = 0; c < 16; c++) table[s * 16 + c] -= lo;
        offset += lo;
        if (hi - lo > range) range = hi - lo;
    }
    const float scale = range > 0.0f ? 255.0f / range : 1.0f, unscale = 1.0f / scale;
    uint8_t lut8[FS_MAX_M * 16];
    for (int i = 0; i < m * 16; i++) {
        float v = table[i] * scale + 0.5f;
        lut8[i] = (uint8_t)(v >= 255.0f ? 255.0f : v);
    }
    /* the tables as the SIMD kernels read them (see block_avx2 / block_avx512) */
    _Alignas(64) uint8_t wide[FS_MAX_M * 32];
    if (level == FS_AVX2)
        for (int s = 0; s < m; s++) { /* table s in both 128-bit lanes */
            memcpy(wide + 32 * s, lut8 + 16 * s, 16);
            memcpy(wide + 32 * s + 16, lut8 + 16 * s, 16);
        }
    if (level == FS_AVX512)
        for (int j = 0; j < m / 4; j++)
            for (int h = 0; h < 2; h++) { /* lanes: table 4j+h twice, then 4j+2+h twice */
                uint8_t *t = wide + 64 * (2 * j + h);
                memcpy(t, lut8 + 16 * (4 * j + h), 16);
                memcpy(t + 16, lut8 + 16 * (4 * j + h), 16);
                memcpy(t + 32, lut8 + 16 * (4 * j + 2 + h), 16);
                memcpy(t + 48, lut8 + 16 * (4 * j + 2 + h), 16);
            }

    /* 3. scan: keep the kfetch least approximate distances sum / scale + base, as
       (distance, slot); a slot's row is looked up only for those kept at the end */
    int64_t n = 0;
    float worst = FLT_MAX; /* the kfetch-th least distance so far, once there are kfetch */
    uint16_t sums[FS_BLOCK];
    const int64_t block_bytes = (int64_t)FS_BLOCK * (m / 2);
    for (int p = 0; p < nprobe; p++) {
        const int l = (int)w->probes[p].r;
        const float base = offset + coarse[l];
        const int64_t s0 = ix->list_start[l], end = s0 + ix->list_size[l];
        if (p + 1 < nprobe) { /* the next bucket's first lines: its stream starts warm */
            const int64_t next = ix->list_start[w->probes[p + 1].r];
            const char *ahead = (const char *)(ix->codes + next / FS_BLOCK * block_bytes);
            for (int o = 0; o < 1024; o += 64) __builtin_prefetch(ahead + o);
        }
        for (int64_t v = s0; v < end; v += FS_BLOCK) {
            const uint8_t *blk = ix->codes + v / FS_BLOCK * block_bytes;
            if (v + 2 * FS_BLOCK < end) /* two blocks ahead within the bucket */
                for (int64_t o = 0; o < block_bytes; o += 64)
                    __builtin_prefetch((const char *)blk + 2 * block_bytes + o);
            /* sum < (worst - base) * scale can enter; 32767 admits every sum */
            const float lim = (worst - base) * scale;
            const int thr = lim >= 32767.0f ? 32767 : lim <= 0.0f ? 0 : (int)lim + 1;
            uint32_t mask;
#if FS_X86
            if (level == FS_AVX512) mask = block_avx512(blk, (const __m512i *)wide, m, thr, sums);
            else if (level == FS_AVX2) mask = block_avx2(blk, (const __m256i *)wide, m, thr, sums);
            else
#endif
                mask = block_scalar(blk, lut8, m, thr, sums);
            if (end - v < FS_BLOCK) mask &= (1u << (end - v)) - 1; /* padding slots */
            while (mask) {
                const int i = __builtin_ctz(mask);
                mask &= mask - 1;
                w->keys[n] = sums[i] * unscale + base;
                w->slots[n] = v + i;
                n++;
            }
            if (n > w->cap - FS_BLOCK) {
                worst = keep_least(w->keys, w->slots, n, kfetch, w->scratch);
                n = kfetch;
            }
        }
    }
    if (n > kfetch) {
        keep_least(w->keys, w->slots, n, kfetch, w->scratch);
        n = kfetch;
    }

    /* 4. exact re-rank of the rows kept, then the k best, best first */
    int64_t *row = w->slots; /* each slot's row, in place */
    for (int64_t i = 0; i < n; i++) row[i] = ix->rows[row[i]];
    float *exact = w->keys;
    for (int64_t i = 0; i < n; i++) {
        if (i + 8 < n) {
            const char *ahead = (const char *)(ix->vectors + row[i + 8] * d);
            for (int o = 0; o < d * 4; o += 64) __builtin_prefetch(ahead + o);
        }
        exact[i] = -dot(q, ix->vectors + row[i] * d, d);
    }
    fs_cand *best = w->final;
    const int64_t kk = least_sorted(exact, row, n, k, w->scratch, best);
    for (int64_t i = 0; i < k; i++) {
        out_rows[i] = i < kk ? best[i].r : -1;
        out_scores[i] = i < kk ? -best[i].d : -INFINITY;
    }
}

/* Search nq queries [nq][d] one after another; out_rows / out_scores [nq][k], best first,
   -1 / -inf past what the probed buckets hold. Returns 0, or -1 for bad arguments, -2
   when out of memory, -3 when a query holds NaN or an infinity (nothing is searched). */
int fs_search(const fs_index *ix, const float *queries, int64_t nq, int nprobe, int k,
              int kfetch, int64_t *out_rows, float *out_scores) {
    if (!ix || ix->d <= 0 || ix->m <= 0 || ix->m > FS_MAX_M || ix->m % 4 || ix->d % ix->m ||
        ix->nlist <= 0 || k <= 0 || nq < 0)
        return -1;
    if (nprobe > ix->nlist) nprobe = ix->nlist;
    if (nprobe < 1) nprobe = 1;
    if (kfetch < k) kfetch = k;
    for (int64_t i = 0; i < nq * ix->d; i++)
        if (!isfinite(queries[i])) return -3;
    const int level = cpu_level();
    fs_work w;
    w.cap = 2 * (int64_t)kfetch + 2 * FS_BLOCK;
    const int64_t most = w.cap > ix->nlist ? w.cap : ix->nlist;
    const size_t bytes = (size_t)w.cap * (sizeof(float) + sizeof(int64_t)) +
                         (size_t)(3 * most + 3 * kfetch + ix->nlist + 16 * ix->m) * sizeof(float) +
                         (size_t)(ix->nlist + kfetch) * sizeof(fs_cand);
    char *mem = malloc(bytes);
    if (!mem) return -2;
    /* 8-byte items first, then the floats */
    w.slots = (int64_t *)mem;
    w.probes = (fs_cand *)(w.slots + w.cap);
    w.final = w.probes + ix->nlist;
    w.keys = (float *)(w.final + kfetch);
    w.scratch = w.keys + w.cap;
    w.coarse = w.scratch + 3 * most + 3 * kfetch;
    w.table = w.coarse + ix->nlist;
    for (int64_t i = 0; i < nq; i++)
        search_one(ix, queries + i * ix->d, nprobe, k, kfetch, level, &w, out_rows + i * k,
                   out_scores + i * k);
    free(mem);
    return 0;
}

static struct PyModuleDef fastscan_module = {PyModuleDef_HEAD_INIT, "_fastscan",
                                             "C kernel loaded with ctypes by funnelrec.ann.fastscan",
                                             -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastscan(void) { return PyModule_Create(&fastscan_module); }
