# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Scans of weight matrices that the lowering makes for every matrix layer (a VGG-19
fully connected layer has 100 million weights):

- `groups_within`: does the matrix fit an N:M sparsity pattern? Asked for every pattern
  the target supports; the answer for dense weights comes from the first group that
  holds too many nonzeros, so the scan stops there instead of counting the whole matrix.
- `row_major_bytes`: the bytes of a weight tile in the row-major K x N order the matrix
  unit reads, from a transposed view (a Gemm's weights with transB) by a cache-blocked
  copy (numpy's strided copy of a transposed int8 matrix runs at a few hundred MB/s).
- `ConstSegment`: the program's constant segment (the packed weights), built in one
  bytes object that is never copied (VGG-19's is 137 MB).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t
from libc.string cimport memcpy, memset


cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1

DEF BLOCK = 64

ctypedef fused integral:
    int8_t
    uint8_t
    int16_t
    int32_t
    int64_t


def groups_within(const integral[:, :] w, Py_ssize_t m, Py_ssize_t limit):
    """True when every group of m consecutive rows of every column of w (K x N, K a
    multiple of m) holds at most `limit` nonzeros. Any strides; the scan follows the
    matrix's memory order."""
    cdef Py_ssize_t k = w.shape[0], ncols = w.shape[1], g, r, j, count
    cdef Py_ssize_t groups = k // m
    cdef int64_t[::1] counts
    if groups == 0 or ncols == 0:
        return True
    if w.strides[0] <= w.strides[1]:            # columns contiguous: one column at a time
        for j in range(ncols):
            for g in range(groups):
                count = 0
                for r in range(g * m, g * m + m):
                    count += w[r, j] != 0
                if count > limit:
                    return False
        return True
    import numpy as np
    counts_arr = np.zeros(ncols, np.int64)
    counts = counts_arr
    for g in range(groups):                      # rows contiguous: one group of rows at a time
        for j in range(ncols):
            counts[j] = 0
        for r in range(g * m, g * m + m):
            for j in range(ncols):
                counts[j] += w[r, j] != 0
        for j in range(ncols):
            if counts[j] > limit:
                return False
    return True


def row_major_bytes(const uint8_t[:, :] a):
    """bytes of a (rows x cols) byte matrix in row-major order, whatever its strides."""
    cdef Py_ssize_t rows = a.shape[0], cols = a.shape[1], i0, j0, i, j, i1, j1
    out = PyBytes_FromStringAndSize(NULL, rows * cols)
    cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
    for i0 in range(0, rows, BLOCK):
        i1 = min(i0 + BLOCK, rows)
        for j0 in range(0, cols, BLOCK):
            j1 = min(j0 + BLOCK, cols)
            for i in range(i0, i1):
                for j in range(j0, j1):
                    dst[i * cols + j] = a[i, j]
    return out


DEF FIRST_CAPACITY = 64 << 20


cdef class ConstSegment:
    """The constant segment under construction: aligned pieces appended in place to one
    bytes object that `finish` cuts to size and hands over, so the segment exists once.
    (A bytearray and then bytes() of it held it twice at the end; a bytearray grown in
    the heap also left its outgrown copies behind.) The object starts as a 64 MiB
    allocation, which the C library maps lazily (untouched pages use no memory), and
    grows by realloc, which for a mapping moves pages (mremap) instead of copying them.
    The bytes object is written only while this builder holds its only reference,
    before anything can see or hash it, which is how CPython builds bytes itself
    (`_PyBytes_Resize`)."""
    cdef PyObject *buf
    cdef Py_ssize_t size
    cdef Py_ssize_t cap

    def __cinit__(self):
        obj = PyBytes_FromStringAndSize(NULL, FIRST_CAPACITY)
        Py_INCREF(obj)
        self.buf = <PyObject *>obj
        self.size = 0
        self.cap = FIRST_CAPACITY

    def __dealloc__(self):
        Py_XDECREF(self.buf)
        self.buf = NULL

    def __len__(self):
        return self.size

    cdef int _reserve(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = self.cap
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        _PyBytes_Resize(&self.buf, cap)
        self.cap = cap
        return 0

    def append(self, data, Py_ssize_t align=1):
        """Zeros up to a multiple of `align`, then the bytes of `data` (any buffer);
        returns the offset of data."""
        if self.buf is NULL:
            raise ValueError("the constant segment is finished")
        if not isinstance(data, bytes):
            data = bytes(data)
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t pad = (align - self.size % align) % align if align > 1 else 0   # C division
        self._reserve(self.size + pad + n)
        cdef char *dst = PyBytes_AS_STRING(<object>self.buf)
        if pad:
            memset(dst + self.size, 0, pad)
        cdef Py_ssize_t addr = self.size + pad
        if n:
            memcpy(dst + addr, PyBytes_AS_STRING(data), n)
        self.size = addr + n
        return addr

    def finish(self):
        """The segment as bytes (the builder is then empty)."""
        if self.buf is NULL:
            raise ValueError("the constant segment is finished")
        _PyBytes_Resize(&self.buf, self.size)
        out = <object>self.buf
        Py_XDECREF(self.buf)
        self.buf = NULL
        return out
