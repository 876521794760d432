"""The simulator's compiled kernels equal the integer reference's arithmetic
(qcompile.quant_math.requantize; depthwise convolution as int32 sums), over random
values, multipliers, shifts, layouts and types."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.backend.simulator import _kernels
from qcompile.quant_math import requantize

SRC = [np.int8, np.uint8, np.int16, np.int32]
DST = [np.int8, np.uint8, np.int16, np.int32]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_requantize_kernel_is_the_rounding_rule(data):
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    s_dt = data.draw(st.sampled_from(SRC))
    d_dt = data.draw(st.sampled_from(DST))
    n, rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 9))
    per = data.draw(st.sampled_from([0, 1, 2]))
    per_sample = data.draw(st.booleans())
    info = np.iinfo(s_dt)
    x = rng.integers(info.min, int(info.max) + 1, (n, rows, cols), dtype=np.int64).astype(s_dt)
    x_zp = int(rng.integers(-128, 128))
    count = 1 if per == 0 else (cols if per == 1 else rows)
    sp = n if per_sample else 1
    m = rng.integers(1 << 30, 1 << 31, (sp, count), dtype=np.int64)
    m[rng.random((sp, count)) < 0.2] *= -1                      # negative multipliers too
    s = rng.integers(0, 63, (sp, count), dtype=np.int64)
    out = np.iinfo(d_dt)
    lo = int(rng.integers(out.min, int(out.max) + 1))
    hi = int(rng.integers(lo, int(out.max) + 1))
    zp = int(rng.integers(lo, hi + 1))
    shape = (sp, 1, 1) if per == 0 else ((sp, 1, cols) if per == 1 else (sp, rows, 1))
    want = requantize(x.astype(np.int64) - x_zp, m.reshape(shape), s.reshape(shape), zp, lo, hi).astype(d_dt)
    transposed = data.draw(st.booleans())                     # a planar store from pixel-major values
    dst = np.zeros((n, cols, rows), d_dt).transpose(0, 2, 1) if transposed else np.zeros((n, rows, cols), d_dt)
    src = np.repeat(x, 2, axis=2)[:, :, ::2] if data.draw(st.booleans()) else x     # a strided view
    _kernels.requantize(src, dst, m, s, per, x_zp, zp, lo, hi)
    assert np.array_equal(dst, want)


def test_requantize_kernel_refuses_mismatched_operands():
    x = np.zeros((1, 4, 3), np.int32)
    with pytest.raises(ValueError, match="shapes differ"):
        _kernels.requantize(x, np.zeros((1, 3, 4), np.int8), np.ones((1, 1), np.int64), np.ones((1, 1), np.int64),
                            0, 0, 0, -128, 127)
    with pytest.raises(ValueError, match="multiplier count"):
        _kernels.requantize(x, np.zeros((1, 4, 3), np.int8), np.ones((1, 4), np.int64), np.ones((1, 4), np.int64),
                            1, 0, 0, -128, 127)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_depthwise_kernel_equals_int32_sums(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    n, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    kh, kw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    sh, sw, dh, dw = (data.draw(st.integers(1, 3)) for _ in range(4))
    oh, ow = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    ih, iw = (oh - 1) * sh + (kh - 1) * dh + 1 + data.draw(st.integers(0, 2)), (ow - 1) * sw + (kw - 1) * dw + 1
    dt = data.draw(st.sampled_from([np.int8, np.uint8]))
    x = rng.integers(np.iinfo(dt).min, int(np.iinfo(dt).max) + 1, (n, c, ih, iw)).astype(dt)
    w = rng.integers(-128, 128, (data.draw(st.sampled_from([1, n])), c, kh, kw)).astype(np.int8)
    x_zp = int(rng.integers(-128, 256))
    acc = rng.integers(-(1 << 31), 1 << 31, (n, c, oh, ow), dtype=np.int64).astype(np.int32)
    want = acc.astype(np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
            want = want + (tap.astype(np.int64) - x_zp) * w[:, :, i, j][:, :, None, None]
    want = ((want + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)     # int32 wrap-around
    _kernels.depthwise(x, w, acc, x_zp, sh, sw, dh, dw)
    assert np.array_equal(acc, want)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_gather_rows_is_the_explicit_im2col(data):
    """A 6-D (S, m0, m1, k0, k1, k2) view with contiguous k2 (any other strides, windows
    overlapping) copied to (S m0 m1, k0 k1 k2) rows: numpy's reshape, by memcpy."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    dims = [data.draw(st.integers(1, 4)) for _ in range(5)] + [data.draw(st.integers(1, 40))]
    k2 = dims[5]
    strides = [data.draw(st.integers(0, 3)) * k2 for _ in range(5)] + [1]
    base = rng.integers(0, 256, sum((d - 1) * s for d, s in zip(dims, strides)) + 1).astype(np.uint8)
    a = np.ndarray(tuple(dims), np.uint8, base, 0, tuple(strides))
    out = np.empty((dims[0] * dims[1] * dims[2], dims[3] * dims[4] * k2), np.uint8)
    _kernels.gather_rows(a, out)
    assert np.array_equal(out, a.reshape(out.shape))
