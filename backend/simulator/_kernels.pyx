# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Fused kernels of the functional simulator: requantization and depthwise convolution
in one pass over memory each, where numpy needs five or more (a float64 temporary per
step). Both compute exactly what the integer reference defines (qcompile.quant_math):
int64 arithmetic, one rounding, saturation; built with -fwrapv (setup.py), so an int64
product that overflows wraps as numpy's does. The loops run without bounds checks, so
every shape they rely on is checked first.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t
from libc.string cimport memcpy

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


def gather_rows(const uint8_t[:, :, :, :, :, :] a, uint8_t[:, ::1] out):
    """out[(s, i, j), (p, q, r)] = a[s, i, j, p, q, r]: the implicit im2col of a MATMUL
    operand made explicit, for a view whose innermost axis is contiguous (the channels
    of pixel-major planes): one memcpy per run of a.shape[5] bytes, where numpy copies
    element by element."""
    cdef Py_ssize_t S = a.shape[0], M0 = a.shape[1], M1 = a.shape[2], K0 = a.shape[3], K1 = a.shape[4]
    cdef Py_ssize_t K2 = a.shape[5]
    cdef Py_ssize_t s, i, j, p, q, row = 0
    cdef uint8_t* d
    if (a.strides[5] != 1 and K2 > 1) or out.shape[0] != S * M0 * M1 or out.shape[1] != K0 * K1 * K2:
        raise ValueError("gather_rows: operand and output do not match")
    with nogil:
        for s in range(S):
            for i in range(M0):
                for j in range(M1):
                    d = &out[row, 0]
                    for p in range(K0):
                        for q in range(K1):
                            memcpy(d, &a[s, i, j, p, q, 0], K2)
                            d += K2
                    row += 1
