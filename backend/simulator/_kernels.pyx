# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Fused kernels of the functional simulator: requantization and depthwise convolution
in one pass over memory each, where numpy needs five or more (a float64 temporary per
step). Both compute exactly what the integer reference defines (qcompile.quant_math):
int64 arithmetic, one rounding, saturation; built with -fwrapv (setup.py), so an int64
product that overflows wraps as numpy's does. The loops run without bounds checks, so
every shape they rely on is checked first.
"""
import numpy as np

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from "_requant.h" nogil:
    int32_t qc_rq1(double x, double r, double c, double lo, double hi)
    void qc_rq_i32_i8(const int32_t* s, int8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                      double lo, double hi)
    void qc_rq_i32_u8(const int32_t* s, uint8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                      double lo, double hi)
    void qc_rq_f64_i8(const double* s, int8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                      double lo, double hi)
    void qc_rq_f64_u8(const double* s, uint8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                      double lo, double hi)
    void qc_rq_i8_i8(const int8_t* s, int8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                     double lo, double hi)
    void qc_rq_i8_u8(const int8_t* s, uint8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                     double lo, double hi)
    void qc_rq_u8_i8(const uint8_t* s, int8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                     double lo, double hi)
    void qc_rq_u8_u8(const uint8_t* s, uint8_t* d, const double* r, Py_ssize_t rs, Py_ssize_t n, double xzp, double c,
                     double lo, double hi)
    void qc_transpose_bytes(const uint8_t* s, Py_ssize_t ss, uint8_t* d, Py_ssize_t ds, Py_ssize_t rows,
                            Py_ssize_t cols)
    void qc_max_u8(uint8_t* m, const uint8_t* s, Py_ssize_t n)
    void qc_max_i8(int8_t* m, const int8_t* s, Py_ssize_t n)
    void qc_dwplane_u8(int32_t* out, const uint8_t* s, Py_ssize_t n, const Py_ssize_t* off, const int32_t* w,
                       int taps, int32_t zp)
    void qc_dwplane_i8(int32_t* out, const int8_t* s, Py_ssize_t n, const Py_ssize_t* off, const int32_t* w,
                       int taps, int32_t zp)
    void qc_lut8(const uint8_t* s, uint8_t* d, const uint8_t* tbl, Py_ssize_t n, uint8_t flip)
    void qc_acc_i32(int32_t* a, const int32_t* r, const int32_t* col, int32_t extra, Py_ssize_t n, int assign)
    void qc_acc_f32(int32_t* a, const float* r, const int32_t* col, int32_t extra, Py_ssize_t n, int assign)
    int qc_lut_level
    void qc_vadd(int code, const void* a, const void* b, void* d, Py_ssize_t n, double azp, double bzp, double ma,
                 double mb, double r, double c, double lo, double hi)

cdef extern from "_madd.h" nogil:
    ctypedef struct qc_rows_t:
        const uint8_t* base
        Py_ssize_t S, m0, m1, ss, s0, s1, o0, o1, run, t0, t1, rs
        int is_signed, za
    void qc_madd(const qc_rows_t* g, const int16_t* w, Py_ssize_t kp, Py_ssize_t n, int32_t* acc, Py_ssize_t as_,
                 Py_ssize_t ar, const int32_t* col, int assign, int64_t* count, int16_t* row, int32_t* sums,
                 Py_ssize_t* off)
    int qc_madd_level
    int qc_madd_simd()

ctypedef fused src_t:
    int8_t
    uint8_t
    int16_t
    int32_t

ctypedef fused dst_t:
    int8_t
    uint8_t
    int16_t
    int32_t

ctypedef fused fsrc_t:
    int8_t
    uint8_t
    int16_t
    int32_t
    double

ctypedef fused pix_t:
    int8_t
    uint8_t


DEF_BLOCK = 64       # rows per block of a transposing requantize: their cache lines stay in L1


cdef inline int64_t _rq(int64_t x, int64_t m, int64_t s, int64_t zp, int64_t lo, int64_t hi) noexcept nogil:
    """The rounding rule for one (already zero-point-centred) value."""
    cdef int64_t v = x * m
    if s > 0:
        v = (v + (<int64_t>1 << (s - 1))) >> s
    v += zp
    return lo if v < lo else (hi if v > hi else v)


def requantize(const src_t[:, :, :] src, dst_t[:, :, :] dst, const int64_t[:, :] mult,
               const int64_t[:, :] shift, int per, int64_t x_zp, int64_t zp, int64_t lo, int64_t hi):
    """dst = saturate(((src - x_zp) * M + 2^(s-1)) >> s + zp, lo, hi) over (S, rows, cols)
    blocks; M and s (S or 1, L) per block: L = 1 (one pair), cols (per=1) or rows (per=2).
    The inner loop runs along the destination's smaller stride (contiguous stores); when
    that is the rows (a transposing store, planar from pixel-major), rows go in blocks."""
    cdef Py_ssize_t S = src.shape[0], R = src.shape[1], C = src.shape[2]
    cdef Py_ssize_t a, i, j, i0, i1, pa
    cdef int64_t m = 0, s = 0
    cdef bint cols_inner = dst.strides[2] <= dst.strides[1]
    cdef Py_ssize_t blk = DEF_BLOCK
    if dst.shape[0] != S or dst.shape[1] != R or dst.shape[2] != C:
        raise ValueError("requantize: source and destination shapes differ")
    if mult.shape[1] != (1 if per == 0 else (C if per == 1 else R)) or shift.shape[1] != mult.shape[1] \
            or mult.shape[0] not in (1, S) or shift.shape[0] != mult.shape[0]:
        raise ValueError("requantize: multiplier count does not match per")
    for a in range(shift.shape[0]):
        for i in range(shift.shape[1]):
            if not 0 <= shift[a, i] < 63:
                raise ValueError("requantize: shift outside [0, 63)")
    with nogil:
        for a in range(S):
            pa = a if mult.shape[0] > 1 else 0
            if per == 0:
                m, s = mult[pa, 0], shift[pa, 0]
            if cols_inner:
                for i in range(R):
                    if per == 2:
                        m, s = mult[pa, i], shift[pa, i]
                    for j in range(C):
                        if per == 1:
                            m, s = mult[pa, j], shift[pa, j]
                        dst[a, i, j] = <dst_t>_rq(<int64_t>src[a, i, j] - x_zp, m, s, zp, lo, hi)
            else:
                i0 = 0
                while i0 < R:
                    i1 = i0 + blk if i0 + blk < R else R
                    for j in range(C):
                        if per == 1:
                            m, s = mult[pa, j], shift[pa, j]
                        for i in range(i0, i1):
                            if per == 2:
                                m, s = mult[pa, i], shift[pa, i]
                            dst[a, i, j] = <dst_t>_rq(<int64_t>src[a, i, j] - x_zp, m, s, zp, lo, hi)
                    i0 = i1


cdef inline void _rq_run(const fsrc_t* sp, Py_ssize_t ss, dst_t* dp, Py_ssize_t ds, const double* rp,
                         Py_ssize_t rs, Py_ssize_t n, double x_zp, double c, double lo, double hi,
                         bint fast) noexcept nogil:
    """n values of requantize_float along one run: source, destination and multiplier
    strides in elements (rs 0: one multiplier). Unit-stride runs whose [lo, hi] fits the
    destination type (`fast`) go to _requant.h's vectorised loops, the others through its
    scalar rule qc_rq1 (the cast to dst_t wraps, as the numpy path's int32 cast does)."""
    cdef Py_ssize_t t
    if fast and ds == 1 and ss == 1 and 0 <= rs <= 1:    # the vectorised runs of _requant.h
        if fsrc_t is int32_t and dst_t is int8_t:
            qc_rq_i32_i8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is int32_t and dst_t is uint8_t:
            qc_rq_i32_u8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is double and dst_t is int8_t:
            qc_rq_f64_i8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is double and dst_t is uint8_t:
            qc_rq_f64_u8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is int8_t and dst_t is int8_t:
            qc_rq_i8_i8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is int8_t and dst_t is uint8_t:
            qc_rq_i8_u8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is uint8_t and dst_t is int8_t:
            qc_rq_u8_i8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
        if fsrc_t is uint8_t and dst_t is uint8_t:
            qc_rq_u8_u8(sp, dp, rp, rs, n, x_zp, c, lo, hi)
            return
    for t in range(n):
        dp[t * ds] = <dst_t>qc_rq1(<double>sp[t * ss] - x_zp, rp[t * rs], c, lo, hi)


def requantize_float(const fsrc_t[:, :, :] src, dst_t[:, :, :] dst, const double[:, :] r, int per, double x_zp,
                     double c, int32_t lo, int32_t hi):
    """dst = clip(floor((src - x_zp) r + c), lo, hi) over (S, rows, cols) blocks, in float64:
    the float form of requantization that the simulator uses where `_float_exact` proves
    it equal to the integer rule (c = zp + 1/2, r = m 2^-s); r (S or 1, L) as `requantize`'s
    multipliers. One pass; runs go along the destination's contiguous axis, rows in
    blocks when that is the rows (a transposing store: the block's source stays in L1)."""
    cdef Py_ssize_t S = src.shape[0], R = src.shape[1], C = src.shape[2]
    cdef Py_ssize_t a, i, j, i0, i1, pa
    cdef Py_ssize_t s1 = src.strides[1] // <Py_ssize_t>sizeof(fsrc_t), s2 = src.strides[2] // <Py_ssize_t>sizeof(fsrc_t)
    cdef Py_ssize_t d1 = dst.strides[1] // <Py_ssize_t>sizeof(dst_t), d2 = dst.strides[2] // <Py_ssize_t>sizeof(dst_t)
    cdef Py_ssize_t r1 = r.strides[1] // <Py_ssize_t>sizeof(double)
    cdef double flo = lo, fhi = hi
    cdef bint cols_inner = abs(d2) <= abs(d1)
    cdef Py_ssize_t blk = DEF_BLOCK
    cdef bint fast = (dst_t is int8_t and -128 <= lo and hi <= 127) or (dst_t is uint8_t and 0 <= lo and hi <= 255)
    if dst.shape[0] != S or dst.shape[1] != R or dst.shape[2] != C:
        raise ValueError("requantize_float: source and destination shapes differ")
    if r.shape[1] != (1 if per == 0 else (C if per == 1 else R)) or r.shape[0] not in (1, S):
        raise ValueError("requantize_float: multiplier count does not match per")
    if R == 0 or C == 0:
        return
    cdef dst_t* tmp = NULL
    cdef dst_t* dp
    cdef double* rt = NULL           # per-column multipliers repeated over a block of rows
    # short contiguous rows (s1 = C) with multipliers per column: a block of rows is one run
    cdef bint rows_run = s2 == 1 and s1 == C and C < 64 and per != 2 and r.shape[0] == 1 and (per == 0 or r1 == 1)
    if not cols_inner:
        tmp = <dst_t*>malloc(blk * C * sizeof(dst_t))
        if tmp == NULL:
            raise MemoryError()
    if rows_run and per == 1:
        rt = <double*>malloc(blk * C * sizeof(double))
        if rt == NULL:
            free(tmp)
            raise MemoryError()
        for i in range(blk):
            for j in range(C):
                rt[i * C + j] = r[0, j]
    with nogil:
        for a in range(S):
            pa = a if r.shape[0] > 1 else 0
            if cols_inner and rows_run and d2 == 1 and d1 == C:
                i0 = 0                  # source and destination rows both contiguous: blocks of rows
                while i0 < R:
                    i1 = i0 + blk if i0 + blk < R else R
                    _rq_run(&src[a, i0, 0], 1, &dst[a, i0, 0], 1, rt if per == 1 else &r[0, 0], per,
                            (i1 - i0) * C, x_zp, c, flo, fhi, fast)
                    i0 = i1
            elif cols_inner:
                for i in range(R):
                    _rq_run(&src[a, i, 0], s2, &dst[a, i, 0], d2, &r[pa, i if per == 2 else 0],
                            r1 if per == 1 else 0, C, x_zp, c, flo, fhi, fast)
            elif s2 == 1 and per != 2 and (r1 == 1 or per == 0):
                # transposing store from contiguous source rows: each block of rows is
                # requantized along the rows into tmp (vectorised), then transposed out
                i0 = 0
                while i0 < R:
                    i1 = i0 + blk if i0 + blk < R else R
                    if rows_run:        # the block's rows as one run
                        _rq_run(&src[a, i0, 0], 1, tmp, 1, rt if per == 1 else &r[0, 0], per, (i1 - i0) * C,
                                x_zp, c, flo, fhi, fast)
                    else:
                        for i in range(i0, i1):
                            _rq_run(&src[a, i, 0], 1, &tmp[(i - i0) * C], 1, &r[pa, 0], 1 if per == 1 else 0, C,
                                    x_zp, c, flo, fhi, fast)
                    if sizeof(dst_t) == 1 and d1 == 1 and d2 > 0:      # into channel planes: SIMD tiles
                        qc_transpose_bytes(<const uint8_t*>tmp, C, <uint8_t*>&dst[a, i0, 0], d2, i1 - i0, C)
                    else:
                        for j in range(C):
                            dp = &dst[a, i0, j]
                            for i in range(i1 - i0):
                                dp[i * d1] = tmp[i * C + j]
                    i0 = i1
            else:
                i0 = 0
                while i0 < R:
                    i1 = i0 + blk if i0 + blk < R else R
                    for j in range(C):
                        _rq_run(&src[a, i0, j], s1, &dst[a, i0, j], d1, &r[pa, i0 if per == 2 else (j if per == 1 else 0)],
                                r1 if per == 2 else 0, i1 - i0, x_zp, c, flo, fhi, fast)
                    i0 = i1
        free(tmp)
        free(rt)


cdef inline Py_ssize_t _run_width(Py_ssize_t ws, Py_ssize_t W, int sw) noexcept nogil:
    """The row width of the plane a windowed kernel runs over (see `_tap_run`): the plane's
    own row stride for unit column strides, else the width of its sw column phases."""
    return ws if sw == 1 else (W + sw - 1) // sw


cdef inline void _column_phases(const pix_t* plane, Py_ssize_t ws, Py_ssize_t H, Py_ssize_t W, int sw,
                                Py_ssize_t pw, pix_t* phases) noexcept nogil:
    """phases[ph, y, x] = plane[y, x sw + ph] for the sw phases of an H x W plane (rows ws
    apart), each pw wide; past the plane's edge a copy of the row's first value (what
    lands there only feeds dropped columns)."""
    cdef Py_ssize_t ph, y, xp, col
    for ph in range(sw):
        for y in range(H):
            for xp in range(pw):
                col = xp * sw + ph
                phases[(ph * H + y) * pw + xp] = plane[y * ws + col] if col < W else plane[y * ws]


cdef inline const pix_t* _tap_run(const pix_t* plane, const pix_t* phases, Py_ssize_t ws, Py_ssize_t H,
                                  Py_ssize_t pw, int sw, Py_ssize_t r, Py_ssize_t q) noexcept nogil:
    """Where the run of the tap at row offset r and column offset q starts. Windowed kernels
    (depthwise, max pool) treat each tap as one long vectorised run over a flattened plane,
    where rows of OW (7 to 28 here) hardly vectorise: over the plane itself (rows ws apart)
    for unit column strides, else over its column phases (`_column_phases`: a tap's
    columns x sw + q are consecutive in phase q % sw). Outputs are computed on virtual rows
    sh * pw long (L = (OH - 1) sh pw + OW elements) whose extra columns are dropped."""
    if sw > 1:
        return &phases[(q % sw * H + r) * pw + q // sw]
    return &plane[r * ws + q]


def depthwise(const pix_t[:, :, :, :] src, const int8_t[:, :, :, :] wgt, int32_t[:, :, :, :] acc, int x_zp,
              int sh, int sw, int dh, int dw):
    """acc[n, c, y, x] += sum_ij (src[n, c, y sh + i dh, x sw + j dw] - x_zp) * wgt[n or 0, c, i, j]
    in int32 (wrapping, as the accumulator does). Output rows are the inner loop, so with
    unit strides along them (the planes the simulator keeps) the compiler vectorises it."""
    cdef Py_ssize_t N = acc.shape[0], C = acc.shape[1], OH = acc.shape[2], OW = acc.shape[3]
    cdef Py_ssize_t KH = wgt.shape[2], KW = wgt.shape[3]
    cdef Py_ssize_t n, c, y, x, i, j, wn
    cdef Py_ssize_t xs = src.strides[3] // sizeof(pix_t) * sw, ys = acc.strides[3] // 4
    cdef int32_t w
    cdef const pix_t* sp
    cdef int32_t* ap
    if (src.strides[3] % sizeof(pix_t)) or (acc.strides[3] % 4):
        raise ValueError("depthwise: misaligned strides")
    if src.shape[0] != N or src.shape[1] != C or wgt.shape[1] != C or wgt.shape[0] not in (1, N) or \
            (OH - 1) * sh + (KH - 1) * dh >= src.shape[2] or (OW - 1) * sw + (KW - 1) * dw >= src.shape[3]:
        raise ValueError("depthwise: windows, planes or weights do not match")
    cdef Py_ssize_t H = src.shape[2], W = src.shape[3], ws = src.strides[2] // <Py_ssize_t>sizeof(pix_t)
    cdef Py_ssize_t pw, vrow, L, taps = KH * KW, wfill = -1
    cdef int32_t* tmp
    cdef pix_t* phases = NULL
    cdef const pix_t* plane
    cdef const pix_t* base
    cdef Py_ssize_t* off = NULL
    cdef int32_t* wk = NULL
    cdef char* live = NULL
    # accumulator strides in locals (stores could alias the memoryview's)
    cdef Py_ssize_t an = acc.strides[0] // 4, ac = acc.strides[1] // 4, ay = acc.strides[2] // 4
    cdef int32_t* acc0
    if src.strides[3] == sizeof(pix_t) and src.strides[2] % sizeof(pix_t) == 0 and ws >= W and OH * OW > 0 and \
            N * C > 0 and taps > 0:
        # all taps of a plane in one pass over one long run (`_tap_run`, `qc_dwplane_*`); the
        # taps' offsets are the same for every plane, the weights are widened once
        pw = _run_width(ws, W, sw)
        vrow = sh * pw
        L = (OH - 1) * vrow + OW
        tmp = <int32_t*>malloc(L * sizeof(int32_t))
        off = <Py_ssize_t*>malloc(taps * sizeof(Py_ssize_t))
        wk = <int32_t*>malloc(C * taps * sizeof(int32_t))
        live = <char*>malloc(C)
        if sw > 1:
            phases = <pix_t*>malloc(sw * H * pw * sizeof(pix_t))
        if tmp == NULL or off == NULL or wk == NULL or live == NULL or (sw > 1 and phases == NULL):
            free(tmp)
            free(off)
            free(wk)
            free(live)
            free(phases)
            raise MemoryError()
        acc0 = &acc[0, 0, 0, 0]
        with nogil:
            plane = &src[0, 0, 0, 0]
            base = phases if sw > 1 else plane
            for i in range(KH):
                for j in range(KW):
                    off[i * KW + j] = _tap_run(plane, phases, ws, H, pw, sw, i * dh, j * dw) - base
            for n in range(N):
                wn = n if wgt.shape[0] > 1 else 0
                if wn != wfill:                  # int32 weights per channel; channels of zeros skipped
                    for c in range(C):
                        live[c] = 0
                        for i in range(KH):
                            for j in range(KW):
                                w = wgt[wn, c, i, j]
                                wk[c * taps + i * KW + j] = w
                                if w != 0:
                                    live[c] = 1
                    wfill = wn
                for c in range(C):
                    if not live[c]:
                        continue
                    plane = &src[n, c, 0, 0]
                    base = phases if sw > 1 else plane
                    if sw > 1:
                        _column_phases(plane, ws, H, W, sw, pw, phases)
                    if pix_t is uint8_t:
                        qc_dwplane_u8(tmp, base, L, off, &wk[c * taps], taps, x_zp)   # wraps modulo 2^32 (-fwrapv)
                    else:
                        qc_dwplane_i8(tmp, base, L, off, &wk[c * taps], taps, x_zp)
                    for y in range(OH):
                        ap = acc0 + n * an + c * ac + y * ay
                        for x in range(OW):
                            ap[x * ys] += tmp[y * vrow + x]
        free(tmp)
        free(off)
        free(wk)
        free(live)
        free(phases)
        return
    with nogil:
        for n in range(N):
            wn = n if wgt.shape[0] > 1 else 0
            for c in range(C):
                for y in range(OH):
                    ap = &acc[n, c, y, 0]
                    for i in range(KH):
                        for j in range(KW):
                            w = wgt[wn, c, i, j]
                            if w == 0:
                                continue
                            sp = &src[n, c, y * sh + i * dh, j * dw]
                            if xs == 1 and ys == 1:
                                for x in range(OW):
                                    ap[x] += (<int32_t>sp[x] - x_zp) * w          # wraps modulo 2^32 (-fwrapv)
                            else:
                                for x in range(OW):
                                    ap[x * ys] += (<int32_t>sp[x * xs] - x_zp) * w


def maxpool(const pix_t[:, :, :, :] src, pix_t[:, :, :, :] dst, int kh, int kw, int sh, int sw, int dh, int dw):
    """dst[n, c, y, x] = max_ij src[n, c, y sh + i dh, x sw + j dw] over (N, C, H, W) planes of
    8-bit values: VPOOL's max mode in one pass, where numpy takes a strided pass per tap;
    each tap one long run (`_tap_run`), as in `depthwise`."""
    cdef Py_ssize_t N = dst.shape[0], C = dst.shape[1], OH = dst.shape[2], OW = dst.shape[3]
    cdef Py_ssize_t H = src.shape[2], W = src.shape[3], ws, pw, vrow, L, n, c, y, x, i, j
    cdef const pix_t* plane
    cdef const pix_t* sp
    cdef pix_t* run
    cdef pix_t* phases = NULL
    cdef pix_t* dp
    if src.shape[0] != N or src.shape[1] != C or kh < 1 or kw < 1 or \
            (OH - 1) * sh + (kh - 1) * dh >= H or (OW - 1) * sw + (kw - 1) * dw >= W:
        raise ValueError("maxpool: windows and planes do not match")
    if N * C * OH * OW == 0:
        return
    if src.strides[3] != sizeof(pix_t) or src.strides[2] % sizeof(pix_t) or src.strides[2] < W * sizeof(pix_t) \
            or dst.strides[3] != sizeof(pix_t):
        raise ValueError("maxpool: plane rows must be contiguous")
    ws = src.strides[2] // <Py_ssize_t>sizeof(pix_t)
    cdef pix_t m0, m1
    cdef const pix_t* r0
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and dh == 1 and dw == 1:
        # the common 2x2 / stride 2 pool: two rows at a time, no column phases
        with nogil:
            for n in range(N):
                for c in range(C):
                    for y in range(OH):
                        r0 = &src[n, c, 2 * y, 0]
                        dp = &dst[n, c, y, 0]
                        for x in range(OW):
                            m0 = r0[2 * x] if r0[2 * x] > r0[2 * x + 1] else r0[2 * x + 1]
                            m1 = r0[ws + 2 * x] if r0[ws + 2 * x] > r0[ws + 2 * x + 1] else r0[ws + 2 * x + 1]
                            dp[x] = m0 if m0 > m1 else m1
        return
    pw = _run_width(ws, W, sw)
    vrow = sh * pw
    L = (OH - 1) * vrow + OW
    run = <pix_t*>malloc(L * sizeof(pix_t))
    if sw > 1:
        phases = <pix_t*>malloc(sw * H * pw * sizeof(pix_t))
    if run == NULL or (sw > 1 and phases == NULL):
        free(run)
        free(phases)
        raise MemoryError()
    with nogil:
        for n in range(N):
            for c in range(C):
                plane = &src[n, c, 0, 0]
                if sw > 1:
                    _column_phases(plane, ws, H, W, sw, pw, phases)
                for i in range(kh):
                    for j in range(kw):
                        sp = _tap_run(plane, phases, ws, H, pw, sw, i * dh, j * dw)
                        if i == 0 and j == 0:
                            memcpy(run, sp, L * sizeof(pix_t))
                        elif pix_t is uint8_t:
                            qc_max_u8(run, sp, L)
                        else:
                            qc_max_i8(run, sp, L)
                for y in range(OH):
                    dp = &dst[n, c, y, 0]
                    for x in range(OW):
                        dp[x] = run[y * vrow + x]
    free(run)
    free(phases)


def lut(const uint8_t[:, :] src, const dst_t[:, :] tables, dst_t[:, :] dst, bint signed, Py_ssize_t nch,
        Py_ssize_t inner):
    """dst[s, e] = tables[s or 0, 256 ch + (src[s, e] ^ 0x80 if signed else src[s, e])],
    ch = (e // inner) % nch: VLUT, a table per channel of `inner` consecutive elements
    (8-bit indices given as bytes), in runs of one channel each (byte tables through
    SIMD lookups, `qc_lut8`); numpy needs an int64 index array and a gather for the same."""
    cdef Py_ssize_t S = dst.shape[0], n = dst.shape[1], s, e0, e1, t, ch
    cdef uint8_t flip = 0x80 if signed else 0
    cdef const dst_t* tbl
    cdef const uint8_t* sp
    cdef dst_t* dp
    if src.shape[0] != S or src.shape[1] != n or tables.shape[0] not in (1, S) or tables.shape[1] != 256 * nch or \
            nch < 1 or inner < 1:
        raise ValueError("lut: operands, tables or channels do not match")
    if n > 1 and (src.strides[1] != 1 or dst.strides[1] != sizeof(dst_t)):
        raise ValueError("lut: rows must be contiguous")
    if tables.shape[1] > 1 and tables.strides[1] != sizeof(dst_t):
        raise ValueError("lut: tables must be contiguous")
    if n == 0:
        return
    with nogil:
        for s in range(S):
            sp = &src[s, 0]
            dp = &dst[s, 0]
            e0 = 0
            while e0 < n:
                e1 = (e0 // inner + 1) * inner
                if e1 > n:
                    e1 = n
                ch = (e0 // inner) % nch
                tbl = &tables[s if tables.shape[0] > 1 else 0, 256 * ch]
                if sizeof(dst_t) == 1:          # byte tables: SIMD lookups (_requant.h)
                    qc_lut8(sp + e0, <uint8_t*>(dp + e0), <const uint8_t*>tbl, e1 - e0, flip)
                else:
                    for t in range(e0, e1):
                        dp[t] = tbl[sp[t] ^ flip]
                e0 = e1


def set_lut_level(int level):
    """The widest path byte lookups may take (2: AVX-512 VBMI, 1: AVX2, 0: scalar; the
    CPU's support is still checked); returns the previous one. For tests."""
    global qc_lut_level
    old = qc_lut_level
    qc_lut_level = level
    return old


def window_sums(src, acc, int x_zp, int kh, int kw, int sh, int sw, int dh, int dw):
    """acc[n, c, y, x] += sum_ij (src[n, c, y sh + i dh, x sw + j dw] - x_zp): average pools'
    window sums, as a depthwise convolution with weights of 1."""
    depthwise(src, np.ones((1, src.shape[1], kh, kw), np.int8), acc, x_zp, sh, sw, dh, dw)


def vadd(const uint8_t[:, :] a, const uint8_t[:, :] b, uint8_t[:, :] d, int code, double a_zp,
         double b_zp, double ma, double mb, double r, double c, double lo, double hi):
    """d = clip(floor(((a - a_zp) ma + (b - b_zp) mb) r + c), lo, hi) over (S or 1, count)
    rows of 8-bit values (given as bytes; `code` = 4 (a signed) + 2 (b signed) + (d signed)),
    one pass (_requant.h qc_vadd). A one-row operand is broadcast over d's S rows. The
    caller proves every step exact (the float form of the rounding rule, `_float_exact`)."""
    cdef Py_ssize_t S = d.shape[0], n = d.shape[1], i
    if a.shape[1] != n or b.shape[1] != n or a.shape[0] not in (1, S) or b.shape[0] not in (1, S):
        raise ValueError("vadd: operand shapes do not match")
    if n > 1 and (a.strides[1] != 1 or b.strides[1] != 1 or d.strides[1] != 1):
        raise ValueError("vadd: rows must be contiguous")
    cdef Py_ssize_t sa = 1 if a.shape[0] > 1 else 0, sb = 1 if b.shape[0] > 1 else 0
    if n == 0:
        return
    with nogil:
        for i in range(S):
            qc_vadd(code, &a[i * sa, 0], &b[i * sb, 0], &d[i, 0], n, a_zp, b_zp, ma, mb, r, c, lo, hi)


cdef inline void _copy_run(uint8_t* d, const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """n bytes from s to d (apart): memcpy for long runs, 8-byte moves for short ones."""
    cdef Py_ssize_t t = 0
    if n >= 64:
        memcpy(d, s, n)
        return
    while t + 8 <= n:
        memcpy(d + t, s + t, 8)         # a fixed size: one move
        t += 8
    while t < n:
        d[t] = s[t]
        t += 1


def copy_rows(const uint8_t[:, :, :, :] src, uint8_t[:, :, :, :] dst):
    """dst[s, i, j, :] = src[s or 0, i, j, :]: a LOAD or STORE of a strided block whose
    rows are contiguous in both memories (given as bytes; a source with one sample is
    broadcast over the destination's), a row at a time, where numpy's strided copy takes
    several steps per short row."""
    cdef Py_ssize_t S = dst.shape[0], N0 = dst.shape[1], N1 = dst.shape[2], R = dst.shape[3]
    cdef Py_ssize_t s, i, j
    cdef bint one = src.shape[0] == 1
    if src.shape[0] not in (1, S) or src.shape[1] != N0 or src.shape[2] != N1 or src.shape[3] != R:
        raise ValueError("copy_rows: source and destination do not match")
    if R > 1 and (src.strides[3] != 1 or dst.strides[3] != 1):
        raise ValueError("copy_rows: rows must be contiguous")
    if R == 0 or S == 0 or N0 == 0 or N1 == 0:
        return
    # strides in locals (see gather_rows)
    cdef Py_ssize_t a0 = 0 if one else src.strides[0], a1 = src.strides[1], a2 = src.strides[2]
    cdef Py_ssize_t b0 = dst.strides[0], b1 = dst.strides[1], b2 = dst.strides[2]
    cdef const uint8_t* sp = &src[0, 0, 0, 0]
    cdef uint8_t* dp = &dst[0, 0, 0, 0]
    with nogil:
        for s in range(S):
            for i in range(N0):
                for j in range(N1):
                    _copy_run(dp + s * b0 + i * b1 + j * b2, sp + s * a0 + i * a1 + j * a2, R)


def transpose_planes(const uint8_t[:, :, :] src, uint8_t[:, :, ::1] dst):
    """dst[s, p, k] = src[s, k, p]: channel planes (K planes of P bytes, each plane
    contiguous, planes at any stride) made pixel-major, the layout whose rows a MATMUL's
    im2col reads, in SIMD tiles of 16 x 16 bytes (`qc_transpose_bytes`), where numpy
    steps one byte at a time across the planes."""
    cdef Py_ssize_t S = src.shape[0], K = src.shape[1], P = src.shape[2], s
    if dst.shape[0] != S or dst.shape[1] != P or dst.shape[2] != K or (P > 1 and src.strides[2] != 1):
        raise ValueError("transpose_planes: planes and output do not match")
    if K == 0 or P == 0:
        return
    with nogil:
        for s in range(S):
            qc_transpose_bytes(&src[s, 0, 0], src.strides[1], &dst[s, 0, 0], K, K, P)


def gather_rows(const uint8_t[:, :, :, :, :, :] a, uint8_t[:, ::1] out):
    """out[(s, i, j), (p, q, r)] = a[s, i, j, p, q, r]: the implicit im2col of a MATMUL
    operand made explicit, for a view whose innermost axis is contiguous (the channels
    of pixel-major planes, or single channels): runs of a.shape[5] bytes, or of
    a.shape[4] a.shape[5] bytes when the window's columns are adjacent too, where numpy
    copies a few bytes per inner loop (`_copy_run`: 8-byte moves, memcpy for long runs)."""
    cdef Py_ssize_t S = a.shape[0], M0 = a.shape[1], M1 = a.shape[2], K0 = a.shape[3], K1 = a.shape[4]
    cdef Py_ssize_t K2 = a.shape[5]
    cdef Py_ssize_t s, i, j, p, q, run = K2, runs = K1
    # strides and pointers in locals: the byte stores may alias anything in memory, the
    # memoryviews' stride arrays included, which would be reloaded after every store
    cdef Py_ssize_t t0 = a.strides[0], t1 = a.strides[1], t2 = a.strides[2], t3 = a.strides[3]
    cdef Py_ssize_t t4 = a.strides[4]
    cdef uint8_t* d
    cdef const uint8_t* base
    cdef const uint8_t* px
    if (a.strides[5] != 1 and K2 > 1) or out.shape[0] != S * M0 * M1 or out.shape[1] != K0 * K1 * K2:
        raise ValueError("gather_rows: operand and output do not match")
    if K1 > 1 and a.strides[4] == K2:         # the window's columns follow each other: one run per row
        run, runs = K1 * K2, 1
    if run == 0 or out.shape[0] == 0:
        return
    base = &a[0, 0, 0, 0, 0, 0]
    d = &out[0, 0]
    with nogil:
        for s in range(S):
            for i in range(M0):
                for j in range(M1):
                    px = base + s * t0 + i * t1 + j * t2
                    for p in range(K0):
                        for q in range(runs):
                            _copy_run(d, px + p * t3 + q * t4, run)
                            d += run


def im2col_f32(const pix_t[:, :, :, :, :, :] a, float[:, ::1] out, int flip, int64_t[::1] rowsum=None):
    """out[(s, i, j), (p, q, r)] = a[s, i, j, p, q, r] - flip as float32: the implicit
    im2col of a MATMUL operand, in the form the float32 GEMM takes (flip = 128 turns
    uint8 into the int8 values of gemm.py's bound; 0 for int8), in one pass. With
    `rowsum`, also each row's sum of those values (for the weight zero-point term)."""
    cdef Py_ssize_t S = a.shape[0], M0 = a.shape[1], M1 = a.shape[2], K0 = a.shape[3], K1 = a.shape[4]
    cdef Py_ssize_t K2 = a.shape[5], ks = a.strides[5] // <Py_ssize_t>sizeof(pix_t)
    cdef Py_ssize_t s, i, j, p, q, r, row = 0
    cdef float* d
    cdef const pix_t* src
    cdef int64_t total
    cdef int v
    cdef bint sums = rowsum is not None
    if out.shape[0] != S * M0 * M1 or out.shape[1] != K0 * K1 * K2 or (sums and rowsum.shape[0] != out.shape[0]):
        raise ValueError("im2col_f32: operand and output do not match")
    with nogil:
        for s in range(S):
            for i in range(M0):
                for j in range(M1):
                    d = &out[row, 0]
                    total = 0
                    for p in range(K0):
                        for q in range(K1):
                            if K2 == 0:
                                continue
                            src = &a[s, i, j, p, q, 0]
                            if ks == 1:
                                for r in range(K2):
                                    v = <int>src[r] - flip
                                    d[r] = <float>v
                                    total += v
                            else:
                                for r in range(K2):
                                    v = <int>src[r * ks] - flip
                                    d[r] = <float>v
                                    total += v
                            d += K2
                    if sums:
                        rowsum[row] = total
                    row += 1


ctypedef fused prod_t:
    float
    int32_t


def accumulate(int32_t[:, :, :] acc, const prod_t[:, :] res, const int32_t[::1] col=None,
               const int32_t[::1] row=None, bint assign=False):
    """acc[s, i, j] += res[s M + i, j] (int32, or an exact integer in float32) [+ col[j]]
    [+ row[s M + i]], modulo 2^32 as the int32 accumulator adds (-fwrapv): one pass where
    numpy's strided adds over short accumulator rows take one each. res's rows may be
    apart (a column slice of a wider product). `assign`: acc = the sum instead (a MATMUL
    whose bias LOAD was folded into col)."""
    cdef Py_ssize_t S = acc.shape[0], M = acc.shape[1], N = acc.shape[2]
    cdef Py_ssize_t s, i, r
    cdef bint has_col = col is not None, has_row = row is not None
    if res.shape[0] != S * M or res.shape[1] != N or (has_col and col.shape[0] != N) or \
            (has_row and row.shape[0] != S * M):
        raise ValueError("accumulate: accumulator and product do not match")
    if acc.strides[2] != 4 or (N > 1 and res.strides[1] != sizeof(prod_t)):
        raise ValueError("accumulate: accumulator and product rows must be contiguous")
    if S * M * N == 0:
        return
    # pointers and strides in locals (see gather_rows); the rows through _requant.h's qc_acc_*
    cdef int32_t* a0 = &acc[0, 0, 0]
    cdef const prod_t* r0 = &res[0, 0]
    cdef const int32_t* cp = &col[0] if has_col else NULL
    cdef Py_ssize_t as0 = acc.strides[0] // 4, as1 = acc.strides[1] // 4, rs = res.strides[0] // sizeof(prod_t)
    with nogil:
        for s in range(S):
            for i in range(M):
                r = s * M + i
                if prod_t is float:
                    qc_acc_f32(a0 + s * as0 + i * as1, r0 + r * rs, cp, row[r] if has_row else 0, N, assign)
                else:
                    qc_acc_i32(a0 + s * as0 + i * as1, r0 + r * rs, cp, row[r] if has_row else 0, N, assign)


def madd_pack(const int16_t[:, :] centred):
    """Centred weights b - zb (K, n), each within [-255, 255], in the layout of `madd_gemm`
    (_madd.h): K in pairs and n in vectors of 8 columns, zero-padded: (ceil(K/2), ceil(n/8) 16)."""
    k, n = centred.shape[0], centred.shape[1]
    kp, nv = (k + 1) // 2, (n + 7) // 8
    w = np.zeros((2 * kp, 8 * nv), np.int16)
    w[:k, :n] = centred
    return np.ascontiguousarray(w.reshape(kp, 2, nv, 8).transpose(0, 2, 3, 1)).reshape(kp, 16 * nv)


def madd_simd():
    """Whether `madd_gemm` runs its AVX2 loop here (else its scalar loop, much slower)."""
    return bool(qc_madd_simd())


def madd_gemm(const uint8_t[:, :, :, :, :, :] a, bint signed, int za, const int16_t[:, ::1] w, Py_ssize_t n,
              int32_t[:, :, :] acc, const int32_t[::1] col=None, bint assign=False, int64_t[::1] counts=None):
    """acc[s, i M1 + j, c] = (assign ? col[c] : acc + col[c]) + sum over k = (p, q, r) of
    (a[s, i, j, p, q, r] - za) (b[k, c] - zb), modulo 2^32: a MATMUL straight from its
    implicit im2col view `a` (bytes, int8 when `signed`) and `w = madd_pack(b - zb)`, every
    centred value within [-255, 255] (the caller checks). With `counts`, also adds each K
    index's nonzero centred operands over all rows (the energy model's A counts)."""
    cdef Py_ssize_t S = a.shape[0], M0 = a.shape[1], M1 = a.shape[2], K0 = a.shape[3], K1 = a.shape[4]
    cdef Py_ssize_t K2 = a.shape[5], k = K0 * K1 * K2
    cdef qc_rows_t g
    cdef int16_t* row
    cdef int32_t* sums
    cdef Py_ssize_t* off
    if acc.shape[0] != S or acc.shape[1] != M0 * M1 or acc.shape[2] != n or w.shape[0] != (k + 1) // 2 or \
            w.shape[1] != (n + 7) // 8 * 16 or (col is not None and col.shape[0] != n) or \
            (counts is not None and counts.shape[0] != k):
        raise ValueError("madd_gemm: operand, weights and accumulator do not match")
    if n > 1 and acc.strides[2] != 4:
        raise ValueError("madd_gemm: accumulator rows must be contiguous")
    if S * M0 * M1 * n == 0:
        return
    if k == 0:
        accumulate(acc, np.zeros((S * M0 * M1, n), np.int32), col, None, assign)
        return
    g.base = &a[0, 0, 0, 0, 0, 0]
    g.S, g.m0, g.m1, g.ss, g.s0, g.s1 = S, M0, M1, a.strides[0], a.strides[1], a.strides[2]
    # K = (p, q, r) as o0 x o1 runs: single-element axes dropped, adjacent axes merged
    g.o0, g.o1, g.run, g.t0, g.t1, g.rs = K0, K1, K2, a.strides[3], a.strides[4], a.strides[5]
    if g.run == 1:
        g.run, g.rs, g.o1, g.t1 = g.o1, g.t1, 1, 0
    if g.run == 1:
        g.run, g.rs, g.o0, g.t0 = g.o0, g.t0, 1, 0
    if g.o1 == 1:
        g.o1, g.t1, g.o0, g.t0 = g.o0, g.t0, 1, 0
    if g.rs == 1 and g.t1 == g.run:
        g.run, g.o1, g.t1 = g.run * g.o1, 1, 0
    if g.rs == 1 and g.o1 == 1 and g.t0 == g.run:
        g.run, g.o0, g.t0 = g.run * g.o0, 1, 0
    g.is_signed, g.za = signed, za
    row = <int16_t*>malloc((w.shape[0] * 2 + 16) * sizeof(int16_t))
    sums = <int32_t*>malloc((n + 32) * sizeof(int32_t))
    off = <Py_ssize_t*>malloc(g.o0 * g.o1 * sizeof(Py_ssize_t))
    if row == NULL or sums == NULL or off == NULL:
        free(row)
        free(sums)
        free(off)
        raise MemoryError()
    try:
        with nogil:
            qc_madd(&g, &w[0, 0], w.shape[0], n, &acc[0, 0, 0], acc.strides[0] // 4, acc.strides[1] // 4,
                    &col[0] if col is not None else NULL, assign, &counts[0] if counts is not None else NULL, row,
                    sums, off)
    finally:
        free(row)
        free(sums)
        free(off)


def set_madd_level(int level):
    """Force `madd_gemm`'s scalar loop (0) or allow AVX2 (1, the default); returns the old
    level (tests compare both)."""
    global qc_madd_level
    old = qc_madd_level
    qc_madd_level = level
    return old
