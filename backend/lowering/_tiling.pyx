# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""The cost model that ranks tilings: estimated cycles of a layer for one choice of
M, N and K tile sizes, from the matrix unit's closed forms (as in the simulator's
timing model) and the DMA traffic the loop order implies. Called for every candidate
tiling of every matrix layer (hundreds of candidates times thousands of tiles), hence
compiled.
"""
from libc.stdint cimport int64_t


cdef inline int64_t _cdiv(int64_t a, int64_t b):
    return (a + b - 1) // b


def matrix_cycles(int64_t[::1] m_sizes, int64_t[::1] n_sizes, int64_t[::1] k_sizes, int rows, int cols,
                  bint output_stationary):
    """Matrix-unit cycles summed over every (M, N, K) tile: output-stationary
    ceil(M/R) ceil(N/C) K plus the fill (R + C - 2) per fold on the first K chunk;
    weight-stationary ceil(K/R) ceil(N/C) (M + 2R + C - 2). Both sums factor into
    one sum per axis, so the cost is linear in the tile counts, not their product
    (a 224x224 convolution has thousands of tiles per candidate)."""
    cdef Py_ssize_t i, j
    cdef int64_t sm = 0, sn = 0, sk = 0
    for j in range(n_sizes.shape[0]):
        sn += _cdiv(n_sizes[j], cols)
    if output_stationary:
        for i in range(m_sizes.shape[0]):
            sm += _cdiv(m_sizes[i], rows)
        for i in range(k_sizes.shape[0]):
            sk += k_sizes[i]
        return sm * sn * (sk + (rows + cols - 2 if k_sizes.shape[0] else 0))
    for i in range(k_sizes.shape[0]):
        sk += _cdiv(k_sizes[i], rows)
    for i in range(m_sizes.shape[0]):
        sm += m_sizes[i] + 2 * rows + cols - 2
    return sk * sn * sm


cdef double _estimate(int64_t compute, Py_ssize_t nm, Py_ssize_t nn, Py_ssize_t nk, int64_t a_bytes,
                      int64_t w_bytes, int64_t out_bytes, double bytes_per_cycle, int64_t latency):
    cdef int64_t reload
    if nk == 1:
        reload = min(a_bytes * nn + w_bytes, a_bytes + w_bytes * nm)
    else:
        reload = a_bytes * nn + w_bytes * nm
    cdef int64_t transfers = nm * nn * (2 * nk + 3)
    cdef double dma = (reload + out_bytes) / bytes_per_cycle + transfers * latency
    cdef double big = compute if compute > dma else dma
    cdef double small = dma if compute > dma else compute
    return big + 0.05 * small + 1e-3 * transfers


def estimate(int64_t[::1] m_sizes, int64_t[::1] n_sizes, int64_t[::1] k_sizes, int rows, int cols,
             bint output_stationary, int64_t a_bytes, int64_t w_bytes, int64_t out_bytes, double bytes_per_cycle,
             int64_t latency):
    """Estimated cycles: the larger of matrix and DMA time (they overlap), plus a little
    of the smaller (imperfect overlap), plus a tie-breaker on the number of transfers."""
    cdef int64_t compute = matrix_cycles(m_sizes, n_sizes, k_sizes, rows, cols, output_stationary)
    return _estimate(compute, m_sizes.shape[0], n_sizes.shape[0], k_sizes.shape[0], a_bytes, w_bytes, out_bytes,
                     bytes_per_cycle, latency)


def estimate_grid(int64_t m_total, int64_t m_tile, int64_t m_scale, int64_t n_total, int64_t n_tile,
                  int64_t k_total, int64_t k_tile, int64_t k_scale, int64_t sp_n, int64_t sp_m, int rows, int cols,
                  bint output_stationary, int64_t a_bytes, int64_t w_bytes, int64_t out_bytes,
                  double bytes_per_cycle, int64_t latency):
    """`estimate` of a regular tiling, without building its size lists: M, N and K cut
    into tiles of m_tile, n_tile, k_tile (the last ones smaller), M tiles holding
    m_scale rows per unit (output pixels per output row), K tiles k_scale columns per
    unit (kernel positions per input channel) of which sp_n in every sp_m stream
    (N:M-sparse weights; sp_m = 0: dense). The same figure as `estimate` on the lists,
    called once per candidate tiling of every matrix layer."""
    cdef int64_t start, size, sm = 0, sm_ws = 0, sn = 0, sk = 0, sk_ws = 0, compute
    cdef Py_ssize_t nm = 0, nn = 0, nk = 0
    start = 0
    while start < m_total:
        size = min(m_tile, m_total - start) * m_scale
        sm += _cdiv(size, rows)
        sm_ws += size + 2 * rows + cols - 2
        nm += 1
        start += m_tile
    start = 0
    while start < n_total:
        sn += _cdiv(min(n_tile, n_total - start), cols)
        nn += 1
        start += n_tile
    start = 0
    while start < k_total:
        size = min(k_tile, k_total - start) * k_scale
        if sp_m:
            size = size // sp_m * sp_n
        sk += size
        sk_ws += _cdiv(size, rows)
        nk += 1
        start += k_tile
    if output_stationary:
        compute = sm * sn * (sk + (rows + cols - 2 if nk else 0))
    else:
        compute = sk_ws * sn * sm_ws
    return _estimate(compute, nm, nn, nk, a_bytes, w_bytes, out_bytes, bytes_per_cycle, latency)
