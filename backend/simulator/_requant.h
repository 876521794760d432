/* The SIMD inner loops of _kernels.pyx, each with a scalar fallback and its own comment:
 * float64 requantization runs, byte transposes, max-pool taps, the fused VADD, byte
 * lookups (VLUT) and depthwise planes. First, requantize_float's runs:
 * d[t] = clip(floor((s[t] - xzp) * r + c), lo, hi), the same float steps as the numpy
 * path (separate multiply and add, so the rounding is the same), with r one value
 * (rs = 0) or one per element (rs = 1). On x86-64 with AVX2 (checked at run time) four
 * values go at a time through AVX2 intrinsics; elsewhere, and for the tail, a scalar
 * loop. The caller guarantees [lo, hi] lies inside DST's range, so packing with
 * saturation changes nothing. */
#ifndef QC_REQUANT_H
#define QC_REQUANT_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(QC_NO_AVX2)
#include <immintrin.h>
#define QC_AVX2 1
static int qc_avx2 = -1;
static int qc_have_avx2(void) {
    if (qc_avx2 < 0) {
        __builtin_cpu_init();
        qc_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return qc_avx2;
}
#endif

static inline int32_t qc_rq1(double x, double r, double c, double lo, double hi) {
    double v = floor(x * r + c);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return (int32_t)v;
}

/* LOAD4(p): four source values as doubles; STORE4(q, p): four int32 in range as DST */
#define QC_LOAD4_int32_t(p) _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(p)))
#define QC_LOAD4_double(p) _mm256_loadu_pd(p)
#define QC_LOAD4_int8_t(p) _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(qc_load32(p))))
#define QC_LOAD4_uint8_t(p) _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(qc_load32(p))))
#define QC_STORE4_int8_t(q, p) qc_store32(p, _mm_cvtsi128_si32(_mm_packs_epi16(_mm_packs_epi32(q, q), q)))
#define QC_STORE4_uint8_t(q, p) qc_store32(p, _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(q, q), q)))

static inline int qc_load32(const void *p) { int v; memcpy(&v, p, 4); return v; }
static inline void qc_store32(void *p, int v) { memcpy(p, &v, 4); }

#ifdef QC_AVX2
#define QC_RQ_AVX2(NAME, SRC, DST)                                                                  \
    __attribute__((target("avx2"))) static ptrdiff_t NAME##_avx2(                                  \
        const SRC *s, DST *d, const double *r, ptrdiff_t rs, ptrdiff_t n, double xzp, double c,     \
        double lo, double hi) {                                                                     \
        __m256d vx = _mm256_set1_pd(xzp), vc = _mm256_set1_pd(c), vlo = _mm256_set1_pd(lo);        \
        __m256d vhi = _mm256_set1_pd(hi), vr = _mm256_set1_pd(r[0]);                                \
        ptrdiff_t t = 0;                                                                            \
        for (; t + 4 <= n; t += 4) {                                                                \
            __m256d v = _mm256_sub_pd(QC_LOAD4_##SRC(s + t), vx);                                   \
            if (rs) vr = _mm256_loadu_pd(r + t);                                                    \
            v = _mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(v, vr), vc));                           \
            v = _mm256_min_pd(_mm256_max_pd(v, vlo), vhi);                                          \
            QC_STORE4_##DST(_mm256_cvttpd_epi32(v), d + t);                                         \
        }                                                                                           \
        return t;                                                                                   \
    }
#else
#define QC_RQ_AVX2(NAME, SRC, DST)
#endif

#ifdef QC_AVX2
#define QC_RQ_VECTOR(NAME) if (qc_have_avx2()) t = NAME##_avx2(s, d, r, rs, n, xzp, c, lo, hi);
#else
#define QC_RQ_VECTOR(NAME)
#endif

#define QC_RQ_RUN(NAME, SRC, DST)                                                                  \
    QC_RQ_AVX2(NAME, SRC, DST)                                                                      \
    static void NAME(const SRC *s, DST *d, const double *r, ptrdiff_t rs, ptrdiff_t n, double xzp,  \
                     double c, double lo, double hi) {                                              \
        ptrdiff_t t = 0;                                                                            \
        QC_RQ_VECTOR(NAME)                                                                          \
        for (; t < n; t++) d[t] = (DST)qc_rq1((double)s[t] - xzp, r[rs ? t : 0], c, lo, hi);       \
    }

QC_RQ_RUN(qc_rq_i32_i8, int32_t, int8_t)
QC_RQ_RUN(qc_rq_i32_u8, int32_t, uint8_t)
QC_RQ_RUN(qc_rq_f64_i8, double, int8_t)
QC_RQ_RUN(qc_rq_f64_u8, double, uint8_t)
QC_RQ_RUN(qc_rq_i8_i8, int8_t, int8_t)
QC_RQ_RUN(qc_rq_i8_u8, int8_t, uint8_t)
QC_RQ_RUN(qc_rq_u8_i8, uint8_t, int8_t)
QC_RQ_RUN(qc_rq_u8_u8, uint8_t, uint8_t)

/* Fused elementwise add of two 8-bit operands (VADD): d[t] = clip(floor(((a[t] - azp) ma +
 * (b[t] - bzp) mb) r + c), lo, hi), one pass where numpy needs seven. The caller ensures
 * |a - azp| |ma| + |b - bzp| |mb| < 2^52 and r = 2^-s with `_float_exact`'s conditions, so
 * every step is exact and the AVX2 loop (four values at a time, checked at run time) and
 * the scalar loop agree whatever the order of operations. */
#define QC_VADD_ARGS(SA, SB, DST)                                                                  \
    const SA *a, const SB *b, DST *d, ptrdiff_t n, double azp, double bzp, double ma, double mb,   \
    double r, double c, double lo, double hi
#ifdef QC_AVX2
#define QC_VADD_AVX2(NAME, SA, SB, DST)                                                            \
    __attribute__((target("avx2"))) static ptrdiff_t NAME##_avx2(QC_VADD_ARGS(SA, SB, DST)) {      \
        __m256d vaz = _mm256_set1_pd(azp), vbz = _mm256_set1_pd(bzp), vma = _mm256_set1_pd(ma);     \
        __m256d vmb = _mm256_set1_pd(mb), vr = _mm256_set1_pd(r), vc = _mm256_set1_pd(c);          \
        __m256d vlo = _mm256_set1_pd(lo), vhi = _mm256_set1_pd(hi);                                 \
        ptrdiff_t t = 0;                                                                            \
        for (; t + 4 <= n; t += 4) {                                                                \
            __m256d x = _mm256_mul_pd(_mm256_sub_pd(QC_LOAD4_##SA(a + t), vaz), vma);              \
            __m256d y = _mm256_mul_pd(_mm256_sub_pd(QC_LOAD4_##SB(b + t), vbz), vmb);              \
            __m256d v = _mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(x, y), vr), vc)); \
            v = _mm256_min_pd(_mm256_max_pd(v, vlo), vhi);                                          \
            QC_STORE4_##DST(_mm256_cvttpd_epi32(v), d + t);                                         \
        }                                                                                           \
        return t;                                                                                   \
    }
#define QC_VADD_VECTOR(NAME) if (qc_have_avx2()) t = NAME##_avx2(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi);
#else
#define QC_VADD_AVX2(NAME, SA, SB, DST)
#define QC_VADD_VECTOR(NAME)
#endif

#define QC_VADD(NAME, SA, SB, DST)                                                                 \
    QC_VADD_AVX2(NAME, SA, SB, DST)                                                                 \
    static void NAME(QC_VADD_ARGS(SA, SB, DST)) {                                                   \
        ptrdiff_t t = 0;                                                                            \
        QC_VADD_VECTOR(NAME)                                                                        \
        for (; t < n; t++)                                                                          \
            d[t] = (DST)qc_rq1(((double)a[t] - azp) * ma + ((double)b[t] - bzp) * mb, r, c, lo, hi); \
    }

QC_VADD(qc_vadd_uuu, uint8_t, uint8_t, uint8_t)
QC_VADD(qc_vadd_uus, uint8_t, uint8_t, int8_t)
QC_VADD(qc_vadd_usu, uint8_t, int8_t, uint8_t)
QC_VADD(qc_vadd_uss, uint8_t, int8_t, int8_t)
QC_VADD(qc_vadd_suu, int8_t, uint8_t, uint8_t)
QC_VADD(qc_vadd_sus, int8_t, uint8_t, int8_t)
QC_VADD(qc_vadd_ssu, int8_t, int8_t, uint8_t)
QC_VADD(qc_vadd_sss, int8_t, int8_t, int8_t)

/* The VADD run for operand signedness `code` = 4 (a signed) + 2 (b signed) + (d signed). */
static void qc_vadd(int code, const void *a, const void *b, void *d, ptrdiff_t n, double azp, double bzp,
                    double ma, double mb, double r, double c, double lo, double hi) {
    switch (code) {
    case 0: qc_vadd_uuu(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 1: qc_vadd_uus(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 2: qc_vadd_usu(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 3: qc_vadd_uss(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 4: qc_vadd_suu(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 5: qc_vadd_sus(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    case 6: qc_vadd_ssu(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    default: qc_vadd_sss(a, b, d, n, azp, bzp, ma, mb, r, c, lo, hi); break;
    }
}

/* d[j * ds + i] = s[i * ss + j] for i < rows, j < cols: the byte transposition of a
 * transposing store (requantized rows of pixels x channels into channel planes). With
 * SSE2 (every x86-64), 16 x 16 tiles go through four rounds of unpacks: after round k
 * each register holds 2^k-byte runs of one column; the edges go byte by byte. */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__SSE2__)
/* The first two steps of a byte transposition of `rows` (8 or 16) loaded rows x: column
 * pairs of rows 2k, 2k+1 into t, then four-byte columns of rows 4k..4k+3 back into x. */
static inline void qc_zip_bytes(__m128i *x, __m128i *t, int rows) {
    int k;
    for (k = 0; k < rows / 2; k++) {
        t[2 * k] = _mm_unpacklo_epi8(x[2 * k], x[2 * k + 1]);
        t[2 * k + 1] = _mm_unpackhi_epi8(x[2 * k], x[2 * k + 1]);
    }
    for (k = 0; k < rows / 4; k++) {
        x[4 * k] = _mm_unpacklo_epi16(t[4 * k], t[4 * k + 2]);
        x[4 * k + 1] = _mm_unpackhi_epi16(t[4 * k], t[4 * k + 2]);
        x[4 * k + 2] = _mm_unpacklo_epi16(t[4 * k + 1], t[4 * k + 3]);
        x[4 * k + 3] = _mm_unpackhi_epi16(t[4 * k + 1], t[4 * k + 3]);
    }
}
#endif

static void qc_transpose_bytes(const uint8_t *s, ptrdiff_t ss, uint8_t *d, ptrdiff_t ds, ptrdiff_t rows,
                               ptrdiff_t cols) {
    ptrdiff_t i0 = 0, j0, i, j, k;
#if defined(__SSE2__)
    for (; i0 + 16 <= rows; i0 += 16) {
        for (j0 = 0; j0 + 16 <= cols; j0 += 16) {
            __m128i x[16], t[16];
            for (k = 0; k < 16; k++) x[k] = _mm_loadu_si128((const __m128i *)(s + (i0 + k) * ss + j0));
            qc_zip_bytes(x, t, 16);
            for (k = 0; k < 2; k++) {      /* eight-byte columns of rows 8k..8k+7 */
                for (j = 0; j < 4; j++) {
                    t[8 * k + 2 * j] = _mm_unpacklo_epi32(x[8 * k + j], x[8 * k + 4 + j]);
                    t[8 * k + 2 * j + 1] = _mm_unpackhi_epi32(x[8 * k + j], x[8 * k + 4 + j]);
                }
            }
            for (k = 0; k < 8; k++) {      /* whole columns 2k, 2k+1 */
                x[2 * k] = _mm_unpacklo_epi64(t[k], t[k + 8]);
                x[2 * k + 1] = _mm_unpackhi_epi64(t[k], t[k + 8]);
            }
            for (k = 0; k < 16; k++) _mm_storeu_si128((__m128i *)(d + (j0 + k) * ds + i0), x[k]);
        }
        for (j = j0; j < cols; j++)
            for (k = 0; k < 16; k++) d[j * ds + i0 + k] = s[(i0 + k) * ss + j];
    }
    if (i0 + 8 <= rows) {                  /* eight rows left: 8 x 16 tiles, as above */
        for (j0 = 0; j0 + 16 <= cols; j0 += 16) {
            __m128i x[8], t[8];
            for (k = 0; k < 8; k++) x[k] = _mm_loadu_si128((const __m128i *)(s + (i0 + k) * ss + j0));
            qc_zip_bytes(x, t, 8);
            for (k = 0; k < 4; k++) {      /* eight-byte columns 2k, 2k+1 (of 16) */
                t[2 * k] = _mm_unpacklo_epi32(x[k], x[k + 4]);
                t[2 * k + 1] = _mm_unpackhi_epi32(x[k], x[k + 4]);
            }
            for (k = 0; k < 8; k++) {      /* t[k] holds columns 2k and 2k+1 */
                _mm_storel_epi64((__m128i *)(d + (j0 + 2 * k) * ds + i0), t[k]);
                _mm_storel_epi64((__m128i *)(d + (j0 + 2 * k + 1) * ds + i0), _mm_srli_si128(t[k], 8));
            }
        }
        for (j = j0; j < cols; j++)
            for (k = 0; k < 8; k++) d[j * ds + i0 + k] = s[(i0 + k) * ss + j];
        i0 += 8;
    }
#endif
    for (i = i0; i < rows; i++)
        for (j = 0; j < cols; j++) d[j * ds + i] = s[i * ss + j];
}

/* One max-pool tap over a run: m[t] = max(m[t], s[t]) for 8-bit values; vectorised by gcc
 * (the AVX2 copy, checked at run time, has the signed byte max that SSE2 lacks). */
#define QC_MAX(NAME, T)                                                                            \
    QC_MAX_AVX2(NAME, T)                                                                            \
    static void NAME(T *restrict m, const T *restrict s, ptrdiff_t n) {                             \
        QC_MAX_VECTOR(NAME)                                                                         \
        for (ptrdiff_t t = 0; t < n; t++) m[t] = s[t] > m[t] ? s[t] : m[t];                        \
    }
#ifdef QC_AVX2
#define QC_MAX_AVX2(NAME, T)                                                                       \
    __attribute__((target("avx2"))) static void NAME##_avx2(T *restrict m, const T *restrict s,     \
                                                           ptrdiff_t n) {                           \
        for (ptrdiff_t t = 0; t < n; t++) m[t] = s[t] > m[t] ? s[t] : m[t];                        \
    }
#define QC_MAX_VECTOR(NAME) if (qc_have_avx2()) { NAME##_avx2(m, s, n); return; }
#else
#define QC_MAX_AVX2(NAME, T)
#define QC_MAX_VECTOR(NAME)
#endif

QC_MAX(qc_max_u8, uint8_t)
QC_MAX(qc_max_i8, int8_t)

/* VLUT runs of byte tables: d[t] = tbl[s[t] ^ flip] for n bytes, a 256-entry table. With
 * AVX-512 VBMI (checked at run time) 64 lookups go at a time: two two-register byte
 * permutes pick from the table's halves by the index's low 7 bits, its top bit blends
 * them. With AVX2, 32 at a time: 16 in-lane shuffles, one per 16-entry slice, each kept
 * where the index's high nibble names its slice. Elsewhere, and for the tail, a scalar
 * loop. A lookup either way, so the results are the same. */
#ifdef QC_AVX2
static int qc_vbmi = -1;
static int qc_have_vbmi(void) {
    if (qc_vbmi < 0) {
        __builtin_cpu_init();
        qc_vbmi = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vbmi") ? 1 : 0;
    }
    return qc_vbmi;
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static ptrdiff_t qc_lut8_vbmi(
    const uint8_t *s, uint8_t *d, const uint8_t *tbl, ptrdiff_t n, uint8_t flip) {
    __m512i t0 = _mm512_loadu_si512((const void *)tbl), t1 = _mm512_loadu_si512((const void *)(tbl + 64));
    __m512i t2 = _mm512_loadu_si512((const void *)(tbl + 128)), t3 = _mm512_loadu_si512((const void *)(tbl + 192));
    __m512i vf = _mm512_set1_epi8((char)flip);
    ptrdiff_t t = 0;
    for (; t + 64 <= n; t += 64) {
        __m512i x = _mm512_xor_si512(_mm512_loadu_si512((const void *)(s + t)), vf);
        __m512i lo = _mm512_permutex2var_epi8(t0, x, t1);       /* entries 0..127 by bits 0-6 */
        __m512i hi = _mm512_permutex2var_epi8(t2, x, t3);       /* entries 128..255 */
        _mm512_storeu_si512((void *)(d + t), _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi));
    }
    return t;
}

__attribute__((target("avx2"))) static ptrdiff_t qc_lut8_avx2(const uint8_t *s, uint8_t *d, const uint8_t *tbl,
                                                            ptrdiff_t n, uint8_t flip) {
    __m256i slice[16];
    __m256i nib = _mm256_set1_epi8(0x0F), vf = _mm256_set1_epi8((char)flip);
    ptrdiff_t t = 0;
    int h;
    for (h = 0; h < 16; h++) slice[h] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tbl + 16 * h)));
    for (; t + 32 <= n; t += 32) {
        __m256i x = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(s + t)), vf);
        __m256i lo = _mm256_and_si256(x, nib), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
        __m256i r = _mm256_setzero_si256();
        for (h = 0; h < 16; h++) {
            __m256i hit = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8((char)h));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_shuffle_epi8(slice[h], lo), hit));
        }
        _mm256_storeu_si256((__m256i *)(d + t), r);
    }
    return t;
}
#endif

/* The widest lookup path qc_lut8 may take: 2 VBMI, 1 AVX2, 0 scalar (tests lower it to
 * check every path on one machine); the CPU's support is still checked. */
static int qc_lut_level = 2;

static void qc_lut8(const uint8_t *s, uint8_t *d, const uint8_t *tbl, ptrdiff_t n, uint8_t flip) {
    ptrdiff_t t = 0;
#ifdef QC_AVX2
    if (n >= 64 && qc_lut_level >= 2 && qc_have_vbmi()) t = qc_lut8_vbmi(s, d, tbl, n, flip);
    else if (n >= 32 && qc_lut_level >= 1 && qc_have_avx2()) t = qc_lut8_avx2(s, d, tbl, n, flip);
#endif
    for (; t < n; t++) d[t] = tbl[s[t] ^ flip];
}

/* A depthwise plane in one pass: out[t] = sum_k (s[t + off[k]] - zp) w[k] for t < n, int32
 * wrapping (-fwrapv), for 8-bit s: all taps of an output summed in registers, where one
 * pass per tap would read and write the partial sums once per tap. With AVX2
 * (checked at run time) eight outputs at a time, each tap a widening load and a multiply
 * (sum x w - zp sum w, the same modulo 2^32), the last eight overlapping the ones before
 * (outputs are assigned, so computing some twice changes nothing); runs under eight, and
 * other CPUs, scalar. Only s[t + off[k]] for t < n is read. */
#define QC_DWPLANE(NAME, SRC, WIDEN)                                                               \
    QC_DWPLANE_AVX2(NAME, SRC, WIDEN)                                                               \
    static void NAME(int32_t *restrict out, const SRC *restrict s, ptrdiff_t n,                    \
                     const ptrdiff_t *off, const int32_t *w, int taps, int32_t zp) {                \
        ptrdiff_t t = 0;                                                                            \
        QC_DWPLANE_VECTOR(NAME)                                                                     \
        for (; t < n; t++) {                                                                        \
            int32_t a = 0;                                                                          \
            for (int k = 0; k < taps; k++) a += ((int32_t)s[t + off[k]] - zp) * w[k];               \
            out[t] = a;                                                                             \
        }                                                                                           \
    }
#ifdef QC_AVX2
#define QC_DWPLANE_AVX2(NAME, SRC, WIDEN)                                                          \
    __attribute__((target("avx2"))) static ptrdiff_t NAME##_avx2(                                  \
        int32_t *restrict out, const SRC *restrict s, ptrdiff_t n, const ptrdiff_t *off,            \
        const int32_t *w, int taps, int32_t zp) {                                                   \
        int32_t bias = 0;                                                                           \
        ptrdiff_t t = 0;                                                                            \
        for (int k = 0; k < taps; k++) bias -= zp * w[k];                                           \
        __m256i vb = _mm256_set1_epi32(bias);                                                       \
        for (; t + 8 <= n; t += 8) {                                                                \
            __m256i a = vb;                                                                         \
            for (int k = 0; k < taps; k++) {                                                        \
                __m256i x = WIDEN(_mm_loadl_epi64((const __m128i *)(s + t + off[k])));              \
                a = _mm256_add_epi32(a, _mm256_mullo_epi32(x, _mm256_set1_epi32(w[k])));            \
            }                                                                                       \
            _mm256_storeu_si256((__m256i *)(out + t), a);                                           \
            if (t + 8 < n && t + 16 > n) t = n - 16;   /* the last eight overlap: no scalar tail */ \
        }                                                                                           \
        return t;                                                                                   \
    }
#define QC_DWPLANE_VECTOR(NAME) if (n >= 8 && qc_have_avx2()) t = NAME##_avx2(out, s, n, off, w, taps, zp);
#else
#define QC_DWPLANE_AVX2(NAME, SRC, WIDEN)
#define QC_DWPLANE_VECTOR(NAME)
#endif

QC_DWPLANE(qc_dwplane_u8, uint8_t, _mm256_cvtepu8_epi32)
QC_DWPLANE(qc_dwplane_i8, int8_t, _mm256_cvtepi8_epi32)

/* One accumulator row of a MATMUL: a[j] (+)= r[j] + col[j] + extra, int32 wrapping
 * (-fwrapv), r the GEMM's int32 product or its exact float32 (`assign`: the row starts
 * from the sum, a bias folded into col; else it adds to it). restrict lets gcc vectorise
 * what it otherwise could not (the stores might alias the operands). */
#define QC_ACC(NAME, T)                                                                            \
    static void NAME(int32_t *restrict a, const T *restrict r, const int32_t *restrict col,         \
                     int32_t extra, ptrdiff_t n, int assign) {                                      \
        ptrdiff_t j;                                                                                \
        if (col && assign) for (j = 0; j < n; j++) a[j] = (int32_t)r[j] + col[j] + extra;           \
        else if (col) for (j = 0; j < n; j++) a[j] += (int32_t)r[j] + col[j] + extra;              \
        else if (assign) for (j = 0; j < n; j++) a[j] = (int32_t)r[j] + extra;                     \
        else for (j = 0; j < n; j++) a[j] += (int32_t)r[j] + extra;                                \
    }
QC_ACC(qc_acc_i32, int32_t)
QC_ACC(qc_acc_f32, float)

#endif  /* QC_REQUANT_H */
