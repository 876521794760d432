"""The compiled helpers of the lowering against the numpy and Python forms they replaced:
the N:M check and the row-major bytes of weight tiles (_weights.pyx), the cost model of
a regular tiling without its size lists (_tiling.estimate_grid)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.backend.lowering._tiling import estimate, estimate_grid
from qcompile.backend.lowering._weights import groups_within, row_major_bytes
from qcompile.backend.lowering.context import nm_pattern


def _ref_nm_pattern(matrix, patterns, group_divides):
    k = matrix.shape[0]
    if np.asarray(matrix).dtype == np.uint8:
        return None
    for n, m in patterns:
        if k % m or group_divides % m:
            continue
        if (matrix.reshape(k // m, m, -1) != 0).sum(axis=1).max(initial=0) <= n:
            return n, m
    return None


PATTERNS = [(1, 4), (2, 4), (1, 2), (4, 8)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.floats(0, 1), st.sampled_from([np.int8, np.int32, np.int64,
                                                                                np.int16, np.float32]),
       st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_nm_pattern_is_the_numpy_reference(groups, cols, density, dtype, transposed, seed):
    rng = np.random.default_rng(seed)
    k = 8 * groups
    w = (rng.integers(-3, 4, (k, cols)) * (rng.random((k, cols)) < density)).astype(dtype)
    if transposed:                          # a Gemm's transB weights: a transposed view
        w = np.ascontiguousarray(w.T).T
    for divides in (k or 8, 4, 2):
        assert nm_pattern(w, PATTERNS, divides) == _ref_nm_pattern(w, PATTERNS, divides)


def test_groups_within_reads_read_only_and_strided_views():
    w = np.zeros((16, 6), np.int8)
    w[::4, :] = 1
    w.setflags(write=False)
    assert groups_within(w, 4, 1) and not groups_within(w, 8, 1)
    assert groups_within(w[::-1], 4, 1) and groups_within(w.T.T, 4, 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 150), st.integers(0, 150), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_row_major_bytes_is_tobytes(rows, cols, seed, step):
    a = np.random.default_rng(seed).integers(0, 256, (cols, rows)).astype(np.uint8).T
    if step:
        a = a[::2, 1::3]
    assert row_major_bytes(a) == a.tobytes()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(1, 64), st.integers(1, 30), st.integers(0, 300), st.integers(1, 64),
       st.integers(0, 600), st.integers(1, 200), st.sampled_from([1, 9, 49]), st.sampled_from([None, (2, 4), (1, 8)]),
       st.sampled_from([(32, 32), (16, 8)]), st.booleans(), st.integers(0, 10 ** 7), st.integers(0, 10 ** 7))
def test_estimate_grid_is_estimate_over_the_tile_lists(m, mt, ms, n, nt, k, kt, ks, nm, array, os_flow, a, w):
    m_sizes = [min(mt, m - r0) * ms for r0 in range(0, m, mt)]
    n_sizes = [min(nt, n - c0) for c0 in range(0, n, nt)]
    k_sizes = [min(kt, k - c0) * ks for c0 in range(0, k, kt)]
    if nm is not None:
        k_sizes = [x // nm[1] * nm[0] for x in k_sizes]
    args = (array[0], array[1], os_flow, a, w, m * n, 20.0, 80)
    want = estimate(np.asarray(m_sizes, np.int64), np.asarray(n_sizes, np.int64), np.asarray(k_sizes, np.int64), *args)
    sp_n, sp_m = nm or (0, 0)
    assert estimate_grid(m, mt, ms, n, nt, k, kt, ks, sp_n, sp_m, *args) == want
