/* Direct int8 GEMM of the functional simulator for small products (digits' convolutions,
 * classifier heads): acc[r][j] = (assign ? col[j] : acc[r][j] + col[j])
 *                                + sum_k (a[r][k] - za) * (w[k][j] - zb),
 * int32 arithmetic modulo 2^32, as the accumulator adds. Each row r of A is gathered
 * straight from the MATMUL's implicit im2col view (no im2col array, no float copy) into
 * an int16 row of centred values; B is prepared once (_kernels.madd_pack's layout: centred
 * int16 weights, K in pairs, n in vectors of 8 columns). Every centred value lies in
 * [-255, 255], so a pair's products (AVX2 vpmaddwd: two int16 x int16 products summed
 * into int32) are exact and only the int32 accumulation wraps, which is associative
 * modulo 2^32: the result is bit-identical to any other order of the same sums.
 * With AVX2 (checked at run time) eight columns go per vector, four vectors per pass
 * over the row; elsewhere a scalar loop does the same sums. */
#include "_requant.h"   /* qc_have_avx2, qc_acc_i32 */

/* The rows of A: rows r = (s, i0, i1) at base + s ss + i0 s0 + i1 s1; within a row the K
 * elements are o0 x o1 runs of `run` elements (byte strides t0, t1 between runs, rs
 * within a run). */
typedef struct {
    const uint8_t *base;
    ptrdiff_t S, m0, m1, ss, s0, s1;
    ptrdiff_t o0, o1, run, t0, t1, rs;
    int is_signed, za;
} qc_rows_t;

/* row[k] = a[k] - za as int16 for the K = o0 o1 run elements of the row at p */
static inline void qc_gather_scalar(const qc_rows_t *g, const uint8_t *p, int16_t *row) {
    ptrdiff_t i, j, t, k = 0;
    for (i = 0; i < g->o0; i++)
        for (j = 0; j < g->o1; j++) {
            const uint8_t *q = p + i * g->t0 + j * g->t1;
            if (g->is_signed)
                for (t = 0; t < g->run; t++) row[k++] = (int16_t)((int8_t)q[t * g->rs] - g->za);
            else
                for (t = 0; t < g->run; t++) row[k++] = (int16_t)(q[t * g->rs] - g->za);
        }
}

/* count[k] += row[k] != 0: A's nonzero operands per K index (the energy model's counts) */
static inline void qc_count_nonzero(const int16_t *row, ptrdiff_t k, int64_t *count) {
    for (ptrdiff_t t = 0; t < k; t++) count[t] += row[t] != 0;
}

static void qc_madd_scalar(const qc_rows_t *g, const int16_t *w, ptrdiff_t kp, ptrdiff_t n, ptrdiff_t nv,
                           int32_t *acc, ptrdiff_t as, ptrdiff_t ar, const int32_t *col, int assign,
                           int64_t *count, int16_t *row, int32_t *sums) {
    ptrdiff_t s, i0, i1, q, j, k = g->o0 * g->o1 * g->run;
    for (s = 0; s < g->S; s++)
        for (i0 = 0; i0 < g->m0; i0++)
            for (i1 = 0; i1 < g->m1; i1++) {
                qc_gather_scalar(g, g->base + s * g->ss + i0 * g->s0 + i1 * g->s1, row);
                if (count) qc_count_nonzero(row, k, count);
                memset(sums, 0, (size_t)n * sizeof(int32_t));
                for (q = 0; q < kp; q++) {
                    const int16_t *wq = w + q * nv * 16;
                    for (j = 0; j < n; j++)
                        sums[j] = (int32_t)((uint32_t)sums[j] + (uint32_t)(row[2 * q] * wq[(j >> 3) * 16 + 2 * (j & 7)] +
                                                                           row[2 * q + 1] * wq[(j >> 3) * 16 + 2 * (j & 7) + 1]));
                }
                qc_acc_i32(acc + s * as + (i0 * g->m1 + i1) * ar, sums, col, 0, n, assign);
            }
}

#ifdef QC_AVX2

/* the row's runs as int16, 16 or 8 bytes at a time where a run is contiguous; `off` holds
 * the runs' byte offsets (locals throughout: the int16 stores may alias anything, as
 * Python's -fno-strict-aliasing lets them) */
__attribute__((target("avx2"))) static inline void qc_gather_avx2(const uint8_t *p, const ptrdiff_t *off,
                                                                  ptrdiff_t runs, ptrdiff_t run, ptrdiff_t rs,
                                                                  int is_signed, int za, int16_t *row) {
    ptrdiff_t i, t;
    __m256i z16 = _mm256_set1_epi16((short)za);
    __m128i z8 = _mm_set1_epi16((short)za);
    for (i = 0; i < runs; i++, row += run) {
        const uint8_t *q = p + off[i];
        t = 0;
        if (rs == 1) {
            for (; t + 16 <= run; t += 16) {
                __m128i b = _mm_loadu_si128((const __m128i *)(q + t));
                __m256i v = is_signed ? _mm256_cvtepi8_epi16(b) : _mm256_cvtepu8_epi16(b);
                _mm256_storeu_si256((__m256i *)(row + t), _mm256_sub_epi16(v, z16));
            }
            for (; t + 8 <= run; t += 8) {
                __m128i b = _mm_loadl_epi64((const __m128i *)(q + t));
                __m128i v = is_signed ? _mm_cvtepi8_epi16(b) : _mm_cvtepu8_epi16(b);
                _mm_storeu_si128((__m128i *)(row + t), _mm_sub_epi16(v, z8));
            }
        }
        if (is_signed)
            for (; t < run; t++) row[t] = (int16_t)((int8_t)q[t * rs] - za);
        else
            for (; t < run; t++) row[t] = (int16_t)(q[t * rs] - za);
    }
}

/* sums[0..8 NB) = NB vectors of columns from v0: sums over K pairs of the row's pair
 * (broadcast) times the weights' vectors */
#define QC_MADD_BLOCK(NB)                                                                      \
    do {                                                                                       \
        __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;                        \
        const __m256i *wq = (const __m256i *)(w + v0 * 16);                                    \
        for (q = 0; q < kp; q++, wq += nv) {                                                   \
            int32_t pair;                                                                      \
            memcpy(&pair, row + 2 * q, 4);                                                     \
            __m256i b = _mm256_set1_epi32(pair);                                               \
            c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(b, _mm256_loadu_si256(wq)));           \
            if (NB > 1) c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(b, _mm256_loadu_si256(wq + 1))); \
            if (NB > 2) c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(b, _mm256_loadu_si256(wq + 2))); \
            if (NB > 3) c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(b, _mm256_loadu_si256(wq + 3))); \
        }                                                                                      \
        _mm256_storeu_si256((__m256i *)sums, c0);                                              \
        if (NB > 1) _mm256_storeu_si256((__m256i *)(sums + 8), c1);                            \
        if (NB > 2) _mm256_storeu_si256((__m256i *)(sums + 16), c2);                           \
        if (NB > 3) _mm256_storeu_si256((__m256i *)(sums + 24), c3);                           \
    } while (0)

__attribute__((target("avx2"))) static void qc_madd_avx2(const qc_rows_t *g, const int16_t *w, ptrdiff_t kp,
                                                         ptrdiff_t n, ptrdiff_t nv, int32_t *acc, ptrdiff_t as,
                                                         ptrdiff_t ar, const int32_t *col, int assign,
                                                         int64_t *count, int16_t *row, int32_t *sums,
                                                         ptrdiff_t *off) {
    const uint8_t *base = g->base;
    ptrdiff_t S = g->S, m0 = g->m0, m1 = g->m1, ss = g->ss, s0 = g->s0, s1 = g->s1;
    ptrdiff_t runs = g->o0 * g->o1, run = g->run, rs = g->rs, k = runs * run;
    int is_signed = g->is_signed, za = g->za;
    ptrdiff_t s, i0, i1, q, v0;
    for (i0 = 0; i0 < g->o0; i0++)
        for (i1 = 0; i1 < g->o1; i1++) off[i0 * g->o1 + i1] = i0 * g->t0 + i1 * g->t1;
    for (s = 0; s < S; s++)
        for (i0 = 0; i0 < m0; i0++)
            for (i1 = 0; i1 < m1; i1++) {
                qc_gather_avx2(base + s * ss + i0 * s0 + i1 * s1, off, runs, run, rs, is_signed, za, row);
                if (count) qc_count_nonzero(row, k, count);
                int32_t *row_out = acc + s * as + (i0 * m1 + i1) * ar;
                for (v0 = 0; v0 < nv; v0 += 4) {
                    ptrdiff_t nb = nv - v0 < 4 ? nv - v0 : 4;
                    ptrdiff_t cols = n - 8 * v0 < 32 ? n - 8 * v0 : 32;
                    if (nb == 4) QC_MADD_BLOCK(4);
                    else if (nb == 3) QC_MADD_BLOCK(3);
                    else if (nb == 2) QC_MADD_BLOCK(2);
                    else QC_MADD_BLOCK(1);
                    qc_acc_i32(row_out + 8 * v0, sums, col ? col + 8 * v0 : NULL, 0, cols, assign);
                }
            }
}
#endif

static int qc_madd_level = 1;   /* 0: the scalar loop only (tests compare both) */

/* whether qc_madd takes its AVX2 loop */
static int qc_madd_simd(void) {
#ifdef QC_AVX2
    return qc_madd_level >= 1 && qc_have_avx2();
#else
    return 0;
#endif
}

/* The kernel on this CPU; `row` holds 2 kp + 16 int16, `sums` n + 32 int32, `off` o0 o1 offsets */
static void qc_madd(const qc_rows_t *g, const int16_t *w, ptrdiff_t kp, ptrdiff_t n, int32_t *acc, ptrdiff_t as,
                    ptrdiff_t ar, const int32_t *col, int assign, int64_t *count, int16_t *row, int32_t *sums,
                    ptrdiff_t *off) {
    ptrdiff_t nv = (n + 7) / 8;
    memset(row, 0, (size_t)(2 * kp + 16) * sizeof(int16_t));  /* an odd K's last pair partner stays 0 */
#ifdef QC_AVX2
    if (qc_madd_simd()) {
        qc_madd_avx2(g, w, kp, n, nv, acc, as, ar, col, assign, count, row, sums, off);
        return;
    }
#endif
    qc_madd_scalar(g, w, kp, n, nv, acc, as, ar, col, assign, count, row, sums);
}
