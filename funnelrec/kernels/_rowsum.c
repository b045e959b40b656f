/* Weighted sums of table rows by index lists, for embedding gradients and bag sums
 * (funnelrec/kernels/rowsum.py; loaded with ctypes).
 *
 * rsum_rows writes, for every output row r in [lo, hi):
 *   out[r] = sum over k in [start[r], start[r + 1]) of w[k] * src[from[k]]
 * in that order of k (0 for an empty range). from NULL: the source row is k; w NULL:
 * weight 1, and the sum is exactly what adding the rows one by one gives.
 *   - a gather: r a position, one term each, from the ids;
 *   - the gradient of a gather (or of bag sums) into a dense table: r a table row, and
 *     (from, w) the positions that gathered it (or their bags and weights), put in order
 *     of row by rsum_order, a stable counting sort.
 * A row is summed in registers and written once, zeros included: torch builds the same
 * gradient as a zero-filled table plus a scatter-add (or a sort and a CSR product), each
 * a pass over the table from memory. Rows are independent, so callers split [lo, hi)
 * over threads and get the same numbers.
 *
 * rsum_scatter computes bag sums from the same sorted terms the other way round: the
 * table is read once, row by row, and each row is added into the bags that hold it
 * (see scatter_body).
 *
 * AVX-512 (by hand), AVX2+FMA or portable C (the compiler's vectorisation of one loop),
 * chosen at run time: with FMA the weighted sums round once per term, so the levels agree
 * only to rounding, but each gives the same numbers on every run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RSUM_X86 1
#include <immintrin.h>
#else
#define RSUM_X86 0
#endif

#include "_levels.h"

/* Source rows are prefetched this many terms ahead: they are scattered over a table
   that is usually out of L2, where the hardware prefetchers cannot guess them. */
#define RSUM_AHEAD 4

static inline __attribute__((always_inline)) void prefetch_row(const float *row, int64_t d) {
    for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(row + k, 0, 3);
}

static inline __attribute__((always_inline)) void sum_rows_body(
    float *restrict out, int64_t d, int64_t lo, int64_t hi, const int64_t *restrict start,
    const int64_t *restrict from, const float *restrict w,
    const float *restrict src) {
    const int64_t end = start[hi]; /* the terms' end: prefetch across rows, up to it */
    for (int64_t r = lo; r < hi; r++) {
        float *restrict o = out + r * d;
        const int64_t a = start[r], b = start[r + 1];
        if (a >= b) {
            memset(o, 0, (size_t)d * sizeof(float));
            continue;
        }
        for (int64_t k = a; k < b; k++) {
            if (k + RSUM_AHEAD < end) {
                const int64_t q = k + RSUM_AHEAD;
                prefetch_row(src + (from ? from[q] : q) * d, d);
            }
            const float *restrict s = src + (from ? from[k] : k) * d;
            if (w) {
                const float wp = w[k];
                if (k == a)
                    for (int64_t j = 0; j < d; j++) o[j] = wp * s[j];
                else
                    for (int64_t j = 0; j < d; j++) o[j] += wp * s[j];
            } else {
                if (k == a)
                    for (int64_t j = 0; j < d; j++) o[j] = s[j];
                else
                    for (int64_t j = 0; j < d; j++) o[j] += s[j];
            }
        }
    }
}

static void sum_rows_c(float *out, int64_t d, int64_t lo, int64_t hi, const int64_t *start,
                       const int64_t *from, const float *w,
                       const float *src) {
    sum_rows_body(out, d, lo, hi, start, from, w, src);
}

/* The transposed order, for bag sums: out [bags][d], columns [c0, c1) only, is zeroed and
   then, for each table row v in turn (read once, in order), every term k in
   start[v]..start[v + 1] adds w[k] * src[v] to out[to[k]]. The output (a batch of bags) is
   small enough to stay in cache, where a gather by bag reads rows all over the table. */
static inline __attribute__((always_inline)) void scatter_body(
    float *restrict out, int64_t d, int64_t c0, int64_t c1, int64_t bags, int64_t rows,
    const int64_t *restrict start, const int64_t *restrict to, const float *restrict w,
    const float *restrict src) {
    for (int64_t b = 0; b < bags; b++) memset(out + b * d + c0, 0, (size_t)(c1 - c0) * 4);
    for (int64_t v = 0; v < rows; v++) {
        const float *restrict s = src + v * d;
        for (int64_t k = start[v]; k < start[v + 1]; k++) {
            float *restrict o = out + to[k] * d;
            const float wk = w ? w[k] : 1.0f;
            for (int64_t j = c0; j < c1; j++) o[j] += wk * s[j];
        }
    }
}

static void scatter_c(float *out, int64_t d, int64_t c0, int64_t c1, int64_t bags, int64_t rows,
                      const int64_t *start, const int64_t *to, const float *w, const float *src) {
    scatter_body(out, d, c0, c1, bags, rows, start, to, w, src);
}

#if RSUM_X86
/* The AVX-512 path by hand: a row is summed in blocks of 128 columns held in eight
   registers (the last block masked), so the terms are read once each and the row is
   written once: the compiler's loop loads and stores the row for every term. */
__attribute__((target("avx512f"))) static void sum_rows_avx512(
    float *out, int64_t d, int64_t lo, int64_t hi, const int64_t *start,
    const int64_t *from, const float *w, const float *src) {
    const int64_t end = start[hi]; /* the terms' end: prefetch across rows, up to it */
    for (int64_t r = lo; r < hi; r++) {
        float *o = out + r * d;
        const int64_t a = start[r], b = start[r + 1];
        if (a >= b) {
            memset(o, 0, (size_t)d * sizeof(float));
            continue;
        }
        for (int64_t j0 = 0; j0 < d; j0 += 128) {
            __mmask16 m[8];
            for (int v = 0; v < 8; v++) {
                const int64_t left = d - j0 - 16 * v;
                m[v] = left >= 16 ? (__mmask16)0xFFFF
                                  : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
            }
            __m512 acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7;
            acc0 = acc1 = acc2 = acc3 = acc4 = acc5 = acc6 = acc7 = _mm512_setzero_ps();
            for (int64_t k = a; k < b; k++) {
                if (k + RSUM_AHEAD < end) {
                    const int64_t q = k + RSUM_AHEAD;
                    const float *next = src + (from ? from[q] : q) * d + j0;
                    for (int64_t j = 0; j < 128 && j0 + j < d; j += 16)
                        _mm_prefetch((const char *)(next + j), _MM_HINT_T0);
                }
                const float *s = src + (from ? from[k] : k) * d + j0;
#define RSUM_TERM(acc, v)                                                            \
    {                                                                                \
        const __m512 x = _mm512_maskz_loadu_ps(m[v], s + 16 * (v));                  \
        acc = k == a ? (w ? _mm512_mul_ps(wp, x) : x)                               \
                     : (w ? _mm512_fmadd_ps(wp, x, acc) : _mm512_add_ps(acc, x));    \
    }
                const __m512 wp = _mm512_set1_ps(w ? w[k] : 1.0f);
                RSUM_TERM(acc0, 0) RSUM_TERM(acc1, 1) RSUM_TERM(acc2, 2) RSUM_TERM(acc3, 3)
                RSUM_TERM(acc4, 4) RSUM_TERM(acc5, 5) RSUM_TERM(acc6, 6) RSUM_TERM(acc7, 7)
#undef RSUM_TERM
            }
            _mm512_mask_storeu_ps(o + j0, m[0], acc0);
            _mm512_mask_storeu_ps(o + j0 + 16, m[1], acc1);
            _mm512_mask_storeu_ps(o + j0 + 32, m[2], acc2);
            _mm512_mask_storeu_ps(o + j0 + 48, m[3], acc3);
            _mm512_mask_storeu_ps(o + j0 + 64, m[4], acc4);
            _mm512_mask_storeu_ps(o + j0 + 80, m[5], acc5);
            _mm512_mask_storeu_ps(o + j0 + 96, m[6], acc6);
            _mm512_mask_storeu_ps(o + j0 + 112, m[7], acc7);
        }
    }
}

__attribute__((target("avx2,fma"))) static void sum_rows_avx2(
    float *out, int64_t d, int64_t lo, int64_t hi, const int64_t *start,
    const int64_t *from, const float *w, const float *src) {
    sum_rows_body(out, d, lo, hi, start, from, w, src);
}

/* The bags' sums of a block of 128 columns build up in a dense [bags][128] buffer: in
   `out` itself, with rows d apart, the block's lines would all fall in the same part of
   the cache's sets (a 256-wide batch of 1,024 bags fills exactly the L2 of 1 MB). */
__attribute__((target("avx512f"))) static int scatter_avx512(
    float *out, int64_t d, int64_t c0, int64_t c1, int64_t bags, int64_t rows,
    const int64_t *start, const int64_t *to, const float *w, const float *src) {
    float *acc = aligned_alloc(64, (size_t)(bags > 0 ? bags : 1) * 128 * sizeof(float));
    if (!acc) return -1;
    for (int64_t j0 = c0; j0 < c1; j0 += 128) {
        __mmask16 m[8];
        for (int v = 0; v < 8; v++) {
            const int64_t left = c1 - j0 - 16 * v;
            m[v] = left >= 16 ? (__mmask16)0xFFFF
                              : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
        }
        memset(acc, 0, (size_t)bags * 128 * sizeof(float));
        for (int64_t v = 0; v < rows; v++) {
            const int64_t a = start[v], e = start[v + 1];
            if (a >= e) continue;
            const float *s = src + v * d + j0;
            /* the next rows, fetched past L2 (NTA) so as not to evict the sums there: it
               pays when the table is not in cache (docs/candidates.md, "Kernel choices") */
            if (v + 2 < rows) {
                const float *ahead = src + (v + 2) * d + j0;
                for (int64_t j = 0; j < 128 && j0 + j < c1; j += 16)
                    _mm_prefetch((const char *)(ahead + j), _MM_HINT_NTA);
            }
            const __m512 x0 = _mm512_maskz_loadu_ps(m[0], s);
            const __m512 x1 = _mm512_maskz_loadu_ps(m[1], s + 16);
            const __m512 x2 = _mm512_maskz_loadu_ps(m[2], s + 32);
            const __m512 x3 = _mm512_maskz_loadu_ps(m[3], s + 48);
            const __m512 x4 = _mm512_maskz_loadu_ps(m[4], s + 64);
            const __m512 x5 = _mm512_maskz_loadu_ps(m[5], s + 80);
            const __m512 x6 = _mm512_maskz_loadu_ps(m[6], s + 96);
            const __m512 x7 = _mm512_maskz_loadu_ps(m[7], s + 112);
            for (int64_t k = a; k < e; k++) {
                float *o = acc + to[k] * 128;
                const __m512 wk = _mm512_set1_ps(w ? w[k] : 1.0f);
#define RSUM_ADD(x, v) \
    _mm512_store_ps(o + 16 * (v), _mm512_fmadd_ps(wk, x, _mm512_load_ps(o + 16 * (v))));
                RSUM_ADD(x0, 0) RSUM_ADD(x1, 1) RSUM_ADD(x2, 2) RSUM_ADD(x3, 3)
                RSUM_ADD(x4, 4) RSUM_ADD(x5, 5) RSUM_ADD(x6, 6) RSUM_ADD(x7, 7)
#undef RSUM_ADD
            }
        }
        for (int64_t b = 0; b < bags; b++)
            for (int v = 0; v < 8; v++)
                _mm512_mask_storeu_ps(out + b * d + j0 + 16 * v, m[v],
                                      _mm512_load_ps(acc + b * 128 + 16 * v));
    }
    free(acc);
    return 0;
}

__attribute__((target("avx2,fma"))) static void scatter_avx2(
    float *out, int64_t d, int64_t c0, int64_t c1, int64_t bags, int64_t rows,
    const int64_t *start, const int64_t *to, const float *w, const float *src) {
    scatter_body(out, d, c0, c1, bags, rows, start, to, w, src);
}
#endif

/* 0 portable C, 1 AVX2, 2 AVX-512 (_levels.h) */
int rsum_level(void) { return cpu_level(); }

/* Force a level (tests); see force_level. */
int rsum_force_level(int level) { return force_level(level); }

/* See the file's comment. out [hi][d] (rows lo..hi-1 written), start [hi + 1]; from, w: NULL
   or as many entries as start[hi]; src has every row `from` names. */
void rsum_rows(float *out, int64_t d, int64_t lo, int64_t hi, const int64_t *start,
               const int64_t *from, const float *w, const float *src) {
#if RSUM_X86
    const int level = cpu_level();
    if (level == 2) {
        sum_rows_avx512(out, d, lo, hi, start, from, w, src);
        return;
    }
    if (level == 1) {
        sum_rows_avx2(out, d, lo, hi, start, from, w, src);
        return;
    }
#endif
    sum_rows_c(out, d, lo, hi, start, from, w, src);
}

/* See scatter_body. out [bags][d] (columns c0..c1-1 written), start [rows + 1], to and w
   (w may be NULL) as many entries as start[rows], every to[k] in 0..bags-1. */
void rsum_scatter(float *out, int64_t d, int64_t c0, int64_t c1, int64_t bags, int64_t rows,
                  const int64_t *start, const int64_t *to, const float *w, const float *src) {
#if RSUM_X86
    const int level = cpu_level();
    if (level == 2 && scatter_avx512(out, d, c0, c1, bags, rows, start, to, w, src) == 0) return;
    if (level == 1) {
        scatter_avx2(out, d, c0, c1, bags, rows, start, to, w, src);
        return;
    }
#endif
    scatter_c(out, d, c0, c1, bags, rows, start, to, w, src);
}

/* A stable counting sort of ids [n] in 0..rows-1, for rsum_rows: start [rows + 1] gets
   where each row's terms begin, from_out each term's source row and w_out (when w is not
   NULL) its weight, in order of row and, within a row, of position. A position i's source
   row is its bag (the b with offsets[b] <= i < offsets[b + 1], offsets [bags]
   non-decreasing from 0), or i itself when offsets is NULL; its weight w[i], and a
   position of weight 0 is left out (it would add nothing). from_out and w_out have room
   for n terms; start[rows] is how many were kept. Returns 0, or the 1-based position of
   the first id out of range (nothing else is meaningful then). */
int64_t rsum_order(const int64_t *ids, int64_t n, int64_t rows, const int64_t *offsets,
                   int64_t bags, const float *w, int64_t *start, int64_t *from_out,
                   float *w_out) {
    memset(start, 0, (size_t)(rows + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        const int64_t v = ids[i];
        if (v < 0 || v >= rows) return i + 1;
        start[v + 1] += !w || w[i] != 0.0f;
    }
    for (int64_t r = 0; r < rows; r++) start[r + 1] += start[r];
    const int64_t kept = start[rows];
    /* each position goes to its row's last free slot, walking the ids from the last, so a
       row's positions come out increasing; start[v + 1] counts down to row v's start */
    int64_t bag = bags - 1;
    for (int64_t i = n - 1; i >= 0; i--) {
        if (offsets)
            while (bag > 0 && offsets[bag] > i) bag--;
        if (w && w[i] == 0.0f) continue;
        const int64_t v = ids[i];
        const int64_t slot = --start[v + 1];
        from_out[slot] = offsets ? bag : i;
        if (w) w_out[slot] = w[i];
    }
    /* start[v + 1] now holds where row v begins: shift back by one */
    memmove(start, start + 1, (size_t)rows * sizeof(int64_t));
    start[rows] = kept;
    return 0;
}

static struct PyModuleDef rowsum_module = {
    PyModuleDef_HEAD_INIT, "_rowsum", "C kernel loaded with ctypes by funnelrec.kernels.rowsum", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rowsum(void) { return PyModule_Create(&rowsum_module); }
