/* The element-wise part of the sampled softmax's row chunk in one pass per row
 * (funnelrec/kernels/softmax.py, `_loss_and_grads`; loaded with ctypes).
 *
 * For each row i of the logits L [rows][cols] (without the bias; accidental hits already
 * -inf), with the candidates' logQ bias b [cols]:
 *   top_i = max(max_j (L_ij + b_j), pos_i)
 *   E_ij  = exp(max(L_ij + b_j - top_i, -50)), and 0 where L_ij is -inf
 *   z_i   = sum_j E_ij
 * E overwrites L; top and z are written out. torch does this in six passes over the
 * [rows, cols] block (add, amax, sub, clamp, exp, sum), each reading it from memory; here
 * a row (16 KB at 4,096 columns) is read once for its maximum and then exponentiated
 * while still in cache.
 *
 * exp: range reduction to r in [-ln2/2, ln2/2], a degree-7 Taylor polynomial (relative
 * error < 1e-8 on that range; ~1.2e-7 against expf overall), times 2^n. AVX-512F, AVX2+FMA
 * or portable C (expf), chosen at run time; the SIMD paths agree with each other only to
 * rounding, but each gives the same numbers on every run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RS_X86 1
#include <immintrin.h>
#else
#define RS_X86 0
#endif

#include "_levels.h"

#define RS_FLOOR (-50.0f) /* exponent floor: see softmax.py (denormals) */

/* max(m, max_j (row[j] + b[j])) over j in [from, cols) */
static float max_from(const float *row, const float *b, int64_t from, int64_t cols, float m) {
    for (int64_t j = from; j < cols; j++) m = row[j] + b[j] > m ? row[j] + b[j] : m;
    return m;
}

/* E over row[from..cols) in place; returns sum_j E_j over that range */
static float exp_from(float *row, const float *b, int64_t from, int64_t cols, float top) {
    float acc = 0.0f;
    for (int64_t j = from; j < cols; j++) {
        const float x = row[j];
        const float e = x == -INFINITY ? 0.0f : expf(fmaxf(x + b[j] - top, RS_FLOOR));
        row[j] = e;
        acc += e;
    }
    return acc;
}

static void rows_scalar(float *L, int64_t rows, int64_t cols, const float *b, const float *pos,
                        float *top, float *z) {
    for (int64_t i = 0; i < rows; i++) {
        float *row = L + i * cols;
        top[i] = max_from(row, b, 0, cols, pos[i]);
        z[i] = exp_from(row, b, 0, cols, top[i]);
    }
}

#if RS_X86
__attribute__((target("avx512f"))) static inline __m512 exp_avx512(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n); /* p * 2^n */
}

__attribute__((target("avx512f"))) static void rows_avx512(float *L, int64_t rows, int64_t cols,
                                                            const float *b, const float *pos,
                                                            float *top, float *z) {
    const __m512 floor_ = _mm512_set1_ps(RS_FLOOR), ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < rows; i++) {
        float *row = L + i * cols;
        __m512 m0 = ninf, m1 = ninf;
        int64_t j = 0;
        for (; j + 32 <= cols; j += 32) {
            m0 = _mm512_max_ps(m0, _mm512_add_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(b + j)));
            m1 = _mm512_max_ps(
                m1, _mm512_add_ps(_mm512_loadu_ps(row + j + 16), _mm512_loadu_ps(b + j + 16)));
        }
        const float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
        const float t = max_from(row, b, j, cols, m > pos[i] ? m : pos[i]);
        const __m512 s = _mm512_set1_ps(t);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (j = 0; j + 32 <= cols; j += 32) {
            const __m512 x0 = _mm512_loadu_ps(row + j), x1 = _mm512_loadu_ps(row + j + 16);
            const __mmask16 k0 = _mm512_cmp_ps_mask(x0, ninf, _CMP_NEQ_OQ);
            const __mmask16 k1 = _mm512_cmp_ps_mask(x1, ninf, _CMP_NEQ_OQ);
            const __m512 y0 = _mm512_sub_ps(_mm512_add_ps(x0, _mm512_loadu_ps(b + j)), s);
            const __m512 y1 = _mm512_sub_ps(_mm512_add_ps(x1, _mm512_loadu_ps(b + j + 16)), s);
            const __m512 e0 = _mm512_maskz_mov_ps(k0, exp_avx512(_mm512_max_ps(y0, floor_)));
            const __m512 e1 = _mm512_maskz_mov_ps(k1, exp_avx512(_mm512_max_ps(y1, floor_)));
            _mm512_storeu_ps(row + j, e0);
            _mm512_storeu_ps(row + j + 16, e1);
            a0 = _mm512_add_ps(a0, e0);
            a1 = _mm512_add_ps(a1, e1);
        }
        top[i] = t;
        z[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + exp_from(row, b, j, cols, t);
    }
}

__attribute__((target("avx2,fma"))) static inline __m256 exp_avx2(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n through the exponent bits: n is in [-73, 1] here (x in [-50, 0]), well inside
       the normal range */
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) static void rows_avx2(float *L, int64_t rows, int64_t cols,
                                                           const float *b, const float *pos,
                                                           float *top, float *z) {
    const __m256 floor_ = _mm256_set1_ps(RS_FLOOR), ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < rows; i++) {
        float *row = L + i * cols;
        __m256 m0 = ninf, m1 = ninf;
        int64_t j = 0;
        for (; j + 16 <= cols; j += 16) {
            m0 = _mm256_max_ps(m0, _mm256_add_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(b + j)));
            m1 = _mm256_max_ps(
                m1, _mm256_add_ps(_mm256_loadu_ps(row + j + 8), _mm256_loadu_ps(b + j + 8)));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
        float m = pos[i];
        for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
        const float t = max_from(row, b, j, cols, m);
        const __m256 s = _mm256_set1_ps(t);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (j = 0; j + 16 <= cols; j += 16) {
            const __m256 x0 = _mm256_loadu_ps(row + j), x1 = _mm256_loadu_ps(row + j + 8);
            const __m256 k0 = _mm256_cmp_ps(x0, ninf, _CMP_NEQ_OQ);
            const __m256 k1 = _mm256_cmp_ps(x1, ninf, _CMP_NEQ_OQ);
            const __m256 y0 = _mm256_sub_ps(_mm256_add_ps(x0, _mm256_loadu_ps(b + j)), s);
            const __m256 y1 = _mm256_sub_ps(_mm256_add_ps(x1, _mm256_loadu_ps(b + j + 8)), s);
            const __m256 e0 = _mm256_and_ps(k0, exp_avx2(_mm256_max_ps(y0, floor_)));
            const __m256 e1 = _mm256_and_ps(k1, exp_avx2(_mm256_max_ps(y1, floor_)));
            _mm256_storeu_ps(row + j, e0);
            _mm256_storeu_ps(row + j + 8, e1);
            a0 = _mm256_add_ps(a0, e0);
            a1 = _mm256_add_ps(a1, e1);
        }
        _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
        top[i] = t;
        z[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
               ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + exp_from(row, b, j, cols, t);
    }
}
#endif

/* 0 portable C, 1 AVX2, 2 AVX-512 (_levels.h) */
int rs_level(void) { return cpu_level(); }

/* Force a level (tests); see force_level. */
int rs_force_level(int level) { return force_level(level); }

/* See the file's comment. L [rows][cols] row-major, b [cols], pos [rows]; writes L,
   top [rows], z [rows]. */
void rs_softmax_rows(float *L, int64_t rows, int64_t cols, const float *b, const float *pos,
                     float *top, float *z) {
#if RS_X86
    const int level = cpu_level();
    if (level == 2) {
        rows_avx512(L, rows, cols, b, pos, top, z);
        return;
    }
    if (level == 1) {
        rows_avx2(L, rows, cols, b, pos, top, z);
        return;
    }
#endif
    rows_scalar(L, rows, cols, b, pos, top, z);
}

static struct PyModuleDef rowsoftmax_module = {
    PyModuleDef_HEAD_INIT, "_rowsoftmax", "C kernel loaded with ctypes by funnelrec.kernels.softmax",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rowsoftmax(void) { return PyModule_Create(&rowsoftmax_module); }
