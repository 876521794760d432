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
    ih = (oh - 1) * sh + (kh - 1) * dh + 1 + data.draw(st.integers(0, 2))
    iw = (ow - 1) * sw + (kw - 1) * dw + 1 + data.draw(st.integers(0, 2))
    dt = data.draw(st.sampled_from([np.int8, np.uint8]))
    x = rng.integers(np.iinfo(dt).min, int(np.iinfo(dt).max) + 1, (n, c, ih, iw + 3)).astype(dt)
    x = x[..., :iw] if data.draw(st.booleans()) else np.ascontiguousarray(x[..., :iw])   # rows apart, or not
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


FLOAT_SRC = [np.int8, np.uint8, np.int16, np.int32, np.float64]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_requantize_float_kernel_is_the_rounding_rule(data):
    """The float64 kernel (vectorised runs included: long rows, both store orders, int8
    and uint8 destinations) equals the integer rule wherever `_float_exact` allows it."""
    from qcompile.backend.simulator.functional import _float_exact

    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    s_dt = data.draw(st.sampled_from(FLOAT_SRC))
    d_dt = data.draw(st.sampled_from(DST))
    n, rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 150)), data.draw(st.integers(1, 40))
    per = data.draw(st.sampled_from([0, 1, 2]))
    sp = n if data.draw(st.booleans()) else 1
    if s_dt == np.float64:
        x = rng.integers(-2 ** 31, 2 ** 31, (n, rows, cols)).astype(np.float64)   # x m fits int64, as in use
    else:
        info = np.iinfo(s_dt)
        x = rng.integers(info.min, int(info.max) + 1, (n, rows, cols), dtype=np.int64).astype(s_dt)
    x_zp = int(rng.integers(-128, 128))
    bound = 2 ** 31 + 128 if s_dt == np.float64 else max(abs(int(np.iinfo(s_dt).min) - x_zp), int(np.iinfo(s_dt).max) - x_zp)
    count = 1 if per == 0 else (cols if per == 1 else rows)
    m = rng.integers(1 << 20, 1 << 31, (sp, count), dtype=np.int64)
    m[rng.random((sp, count)) < 0.2] *= -1
    s = rng.integers(1, 53, (sp, count), dtype=np.int64)
    out = np.iinfo(d_dt)
    wide = data.draw(st.booleans()) and d_dt in (np.int8, np.uint8)          # [lo, hi] beyond the type: wraps
    top = min(int(out.max), 1000)
    lo = -300 if wide else int(rng.integers(max(int(out.min), -1000), top + 1))
    hi = 300 if wide else int(rng.integers(lo, top + 1))
    zp = int(rng.integers(lo, hi + 1))
    if not _float_exact(bound, m, s, zp, lo, hi):
        return
    shape = (sp, 1, 1) if per == 0 else ((sp, 1, cols) if per == 1 else (sp, rows, 1))
    want = requantize(x.astype(np.int64) - x_zp, m.reshape(shape), s.reshape(shape), zp, lo, hi)
    want = want.astype(np.int32).astype(d_dt)
    dst = np.zeros((n, cols, rows), d_dt).transpose(0, 2, 1) if data.draw(st.booleans()) else \
        np.zeros((n, rows, cols), d_dt)
    src = np.repeat(x, 2, axis=2)[:, :, ::2] if data.draw(st.booleans()) else x
    r = np.ldexp(m.astype(np.float64), (-s).astype(np.int32))
    _kernels.requantize_float(src, dst, r, per, x_zp, zp + 0.5, lo, hi)
    assert np.array_equal(dst, want)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_im2col_f32_is_the_explicit_im2col_minus_flip(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    dt = data.draw(st.sampled_from([np.int8, np.uint8]))
    dims = tuple(data.draw(st.integers(1, 4)) for _ in range(5)) + (data.draw(st.integers(1, 40)),)
    base = rng.integers(np.iinfo(dt).min, int(np.iinfo(dt).max) + 1, dims[:5] + (2 * dims[5],)).astype(dt)
    a = base[..., ::2] if data.draw(st.booleans()) else base[..., :dims[5]]       # strided or unit channels
    flip = 128 if dt == np.uint8 else 0
    rows, k = int(np.prod(dims[:3])), int(np.prod(dims[3:]))
    out = np.empty((rows, k), np.float32)
    sums = np.empty(rows, np.int64)
    _kernels.im2col_f32(a, out, flip, sums)
    want = a.reshape(rows, k).astype(np.int64) - flip
    assert np.array_equal(out, want.astype(np.float32))
    assert np.array_equal(sums, want.sum(axis=1))


@pytest.mark.parametrize("engine", ["float32", "int_mm"])
@pytest.mark.parametrize("k", [5, 1024, 2500])           # one chunk, exactly one, three (K_CHUNK = 1024)
def test_gemm_engines_are_exact(monkeypatch, engine, k):
    """Both GEMM engines accumulate A B exactly, modulo 2^32, with the zero-point terms;
    float32 across K chunks at the extreme values where a float32 sum could round."""
    from qcompile.backend.simulator import gemm

    if engine == "int_mm":
        pytest.importorskip("torch")
    monkeypatch.setenv("QCOMPILE_GEMM", engine)
    g = gemm.engine()
    assert g.name == engine
    rng = np.random.default_rng(k)
    a = rng.choice(np.array([-128, 127, -127], np.int8), (3 * 7, k))
    b = rng.choice(np.array([-128, 127], np.int8), (k, 9))
    acc = rng.integers(-2 ** 31, 2 ** 31, (3, 7, 9), dtype=np.int64).astype(np.int32)
    col = rng.integers(-2 ** 31, 2 ** 31, 9, dtype=np.int64).astype(np.int32)
    row = rng.integers(-2 ** 31, 2 ** 31, 21, dtype=np.int64).astype(np.int32)
    want = acc.astype(np.int64) + (a.astype(np.int64) @ b.astype(np.int64)).reshape(3, 7, 9) + col + \
        row.reshape(3, 7, 1)
    g.accumulate(acc, a.astype(g.operand), g.prepare(b), col, row)
    assert np.array_equal(acc, want.astype(np.int32))                 # int64 -> int32 wraps as the hardware


def test_gemm_engine_choice_is_checked(monkeypatch):
    from qcompile.backend.simulator import gemm

    monkeypatch.setenv("QCOMPILE_GEMM", "fp16")
    with pytest.raises(ValueError, match="QCOMPILE_GEMM='fp16': choose one of int_mm, float32, direct"):
        gemm.engine()


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_direct_madd_kernel_is_the_exact_product(data):
    """madd_gemm over a random (S, m0, m1, k0, k1, k2) view (overlapping windows, contiguous
    or strided runs, int8 or uint8, any zero points, odd K, n across vector and block
    edges) equals the int64 sum of centred products wrapped to int32, added to the
    accumulator or starting from the bias row, with A's nonzero counts per K index, in
    both the AVX2 and the scalar loop."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    dims = [data.draw(st.integers(1, 3)) for _ in range(3)] + [data.draw(st.integers(1, 4)) for _ in range(2)] + \
        [data.draw(st.integers(1, 40))]
    contiguous = data.draw(st.booleans())
    inner = 1 if contiguous else data.draw(st.integers(2, 5))
    strides = [data.draw(st.integers(0, 3)) * dims[5] * inner + data.draw(st.integers(0, 2)) for _ in range(5)] + \
        [inner]
    signed = data.draw(st.booleans())
    dt = np.int8 if signed else np.uint8
    base = rng.integers(0, 256, sum((d - 1) * s for d, s in zip(dims, strides)) + 1).astype(np.uint8)
    a = np.ndarray(tuple(dims), dt, base, 0, tuple(strides))
    info = np.iinfo(dt)
    za = data.draw(st.integers(int(info.min), int(info.max)))
    k, n = dims[3] * dims[4] * dims[5], data.draw(st.integers(1, 70))
    b = rng.integers(-128, 128, (k, n))
    zb = data.draw(st.integers(-127, 127))
    b = np.clip(b, zb - 255, zb + 255)
    want = (a.reshape(-1, k).astype(np.int64) - za) @ (b - zb)
    acc0 = rng.integers(-2 ** 31, 2 ** 31, (dims[0], dims[1] * dims[2], n), dtype=np.int64).astype(np.int32)
    col = rng.integers(-2 ** 31, 2 ** 31, n, dtype=np.int64).astype(np.int32) if data.draw(st.booleans()) else None
    assign = data.draw(st.booleans())
    start = (np.zeros_like(acc0, np.int64) if assign else acc0.astype(np.int64)) + (0 if col is None else col)
    expected = (start + want.reshape(acc0.shape)).astype(np.int32)      # int64 -> int32 wraps as the hardware
    w = _kernels.madd_pack((b - zb).astype(np.int16))
    for level in (1, 0):
        old = _kernels.set_madd_level(level)
        try:
            acc = acc0.copy()
            counts = np.zeros(k, np.int64)
            _kernels.madd_gemm(a.view(np.uint8), signed, za, w, n, acc, col, assign, counts)
        finally:
            _kernels.set_madd_level(old)
        assert np.array_equal(acc, expected)
        assert np.array_equal(counts, (a.reshape(-1, k) != za).sum(axis=0))


def test_direct_madd_kernel_refuses_mismatched_operands():
    a = np.zeros((1, 2, 2, 1, 1, 3), np.uint8)
    w = _kernels.madd_pack(np.zeros((3, 5), np.int16))
    with pytest.raises(ValueError, match="madd_gemm: operand, weights and accumulator do not match"):
        _kernels.madd_gemm(a, False, 0, w, 5, np.zeros((1, 4, 6), np.int32))
    with pytest.raises(ValueError, match="madd_gemm: accumulator rows must be contiguous"):
        _kernels.madd_gemm(a, False, 0, w, 5, np.zeros((1, 4, 10), np.int32)[:, :, ::2])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_vadd_kernel_is_the_qadd_rule(data):
    """The fused VADD (`_kernels.vadd`, chosen by functional._fused_vadd) equals the
    integer reference's QAdd: requantize((a - za) Ma + (b - zb) Mb, 1, s, zp, lo, hi)."""
    from qcompile.backend.simulator.functional import _fused_vadd
    from qcompile.quant_math import quantize_multiplier_pair

    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    ta, tb, td = (data.draw(st.sampled_from([np.int8, np.uint8])) for _ in range(3))
    n, count = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 100))
    a = rng.integers(np.iinfo(ta).min, int(np.iinfo(ta).max) + 1, (n, count)).astype(ta)
    b = rng.integers(np.iinfo(tb).min, int(np.iinfo(tb).max) + 1, (1 if data.draw(st.booleans()) else n, count)
                     ).astype(tb)
    ma, mb, shift = quantize_multiplier_pair(*np.exp(rng.uniform(-6, 3, 2)))
    ma, mb = ma * int(rng.choice([-1, 1])), mb * int(rng.choice([-1, 1]))         # negative multipliers too
    info = np.iinfo(td)
    lo = int(rng.integers(info.min, int(info.max) + 1))
    hi = int(rng.integers(lo, int(info.max) + 1))
    args = {"a_zp": int(rng.integers(-128, 256)), "b_zp": int(rng.integers(-128, 256)), "ma": ma, "mb": mb,
            "shift": shift, "out_zp": int(rng.integers(lo, hi + 1)), "lo": lo, "hi": hi}
    fused = _fused_vadd([(0, np.dtype(ta)), (0, np.dtype(tb)), (0, np.dtype(td))], args)
    assert fused is not None            # 8-bit operands with QAdd's multipliers: always exact in float64
    acc = (a.astype(np.int64) - args["a_zp"]) * ma + (b.astype(np.int64) - args["b_zp"]) * mb
    want = requantize(acc, 1, shift, args["out_zp"], lo, hi).astype(td)
    got = np.zeros((n, count), td)
    _kernels.vadd(a.view(np.uint8), b.view(np.uint8), got.view(np.uint8), fused[0], args["a_zp"], args["b_zp"],
                  ma, mb, fused[1], args["out_zp"] + 0.5, lo, hi)
    assert np.array_equal(got, want)


def test_vadd_is_not_fused_when_the_float_form_could_round():
    from qcompile.backend.simulator.functional import _fused_vadd

    ops = [(0, np.dtype(np.int8))] * 3
    args = {"a_zp": 0, "b_zp": 0, "ma": 1 << 30, "mb": 1 << 30, "shift": 60, "out_zp": 0, "lo": -128, "hi": 127}
    assert _fused_vadd(ops, args) is None                             # 2^-60 scaling: beyond _float_exact
    assert _fused_vadd([(0, np.dtype(np.int16))] * 3, dict(args, shift=30)) is None     # 16-bit operands
    assert _fused_vadd(ops, dict(args, shift=30)) is not None


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_reference_window_sums_equal_the_sliding_window_sums(data):
    """backend.reference._window_sums (QAveragePool's taps, one strided add each) equals
    the plain sum over numpy's sliding windows, in 1, 2 and 3 spatial dimensions."""
    from qcompile.backend.reference import _window_sums

    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    d = data.draw(st.integers(1, 3))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(d)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(d)]
    spatial = [k + data.draw(st.integers(0, 6)) for k in kernel]
    x = rng.integers(-300, 300, [2, 3] + spatial).astype(np.int32)
    win = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=tuple(range(2, 2 + d)))
    want = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)].sum(
        axis=tuple(range(2 + d, 2 + 2 * d)))
    got = _window_sums(x, kernel, strides)
    assert got.dtype == x.dtype and np.array_equal(got, want)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_requantize_plan_uses_the_float_kernel_where_the_values_allow(data):
    """An int32 requantization whose shift is too large for the float form over the whole
    int32 range (`_float_exact` fails for the type's bound) takes the float kernel when
    the values' actual bound allows it, else the integer rule: equal to the rule either way."""
    import types

    from qcompile.backend.simulator.functional import _Requant, _float_exact

    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    n, rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 40))
    per = data.draw(st.sampled_from([0, 1, 2]))
    count = 1 if per == 0 else (cols if per == 1 else rows)
    shape = (1, 1, 1) if per == 0 else ((1, 1, cols) if per == 1 else (1, rows, 1))
    m = rng.integers(1 << 24, 1 << 31, count, dtype=np.int64).reshape(shape)
    s = rng.integers(45, 47, count, dtype=np.int64).reshape(shape)
    top = 1 << 19 if data.draw(st.booleans()) else 1 << 31
    x = rng.integers(-top, top, (n, rows, cols), dtype=np.int64).astype(np.int32)
    x_zp = int(rng.integers(-3, 4))
    d_dt = data.draw(st.sampled_from([np.int8, np.uint8]))
    lo, hi = (-128, 127) if d_dt == np.int8 else (0, 255)
    zp = int(rng.integers(lo, hi + 1))
    if _float_exact(2 ** 31 + 3, m, s, zp, lo, hi):
        return
    rq = _Requant(np.dtype(d_dt), x, x_zp, 2 ** 31 + 3, m, s, zp, lo, hi)
    assert rq.kind == "int"
    actual = int(np.abs(x.astype(np.int64) - x_zp).max())
    z = (2 * abs(zp) + 1) * 2 ** (int(s.max()) - 1)
    if actual * int(np.abs(m).max()) + z < 2 ** 53:        # case (a) of _float_exact holds for these values
        assert actual <= rq.float_upto                      # so the float kernel runs
    dst = np.zeros(x.shape, d_dt)
    rq.apply(types.SimpleNamespace(scratch=np.empty(0)), dst, x)
    assert np.array_equal(dst, requantize(x.astype(np.int64) - x_zp, m, s, zp, lo, hi).astype(d_dt))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_byte_requantize_by_table_is_the_rounding_rule(data):
    """Bytes to bytes with one multiplier (`_Requant`'s 256-entry table, VLUT's kernel):
    dense blocks, and strided ones (the other kernels), equal the integer rule, casts that
    wrap included."""
    import types

    from qcompile.backend.simulator.functional import _Requant

    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    s_dt, d_dt = data.draw(st.sampled_from([np.int8, np.uint8])), data.draw(st.sampled_from([np.int8, np.uint8]))
    n, rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 90))
    x = rng.integers(np.iinfo(s_dt).min, int(np.iinfo(s_dt).max) + 1, (n, rows, cols)).astype(s_dt)
    if data.draw(st.booleans()):
        x = np.repeat(x, 2, axis=2)[:, :, ::2]                      # rows apart: not dense
    m = np.int64(rng.integers(1, 1 << 31))
    sh = np.int64(rng.integers(0, 40))
    x_zp, zp = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    lo, hi = (-300, 300) if data.draw(st.booleans()) else (int(np.iinfo(d_dt).min), int(np.iinfo(d_dt).max))
    info = np.iinfo(s_dt)
    bound = max(abs(int(info.min) - x_zp), abs(int(info.max) - x_zp))          # as the simulator's _bound
    rq = _Requant(np.dtype(d_dt), x, x_zp, bound, m, sh, zp, lo, hi)
    assert rq.table is not None
    dst = np.zeros(x.shape, d_dt)
    rq.apply(types.SimpleNamespace(scratch=np.empty(0)), dst, x)
    assert np.array_equal(dst, requantize(x.astype(np.int64) - x_zp, m, sh, zp, lo, hi).astype(d_dt))


@pytest.mark.parametrize("rows,cols", [(16, 16), (70, 37), (64, 32), (15, 40), (33, 15), (8, 16), (12, 40), (9, 17),
                                       (24, 8)])
def test_transposing_store_moves_every_byte(rows, cols):
    """A transposing requantize into channel planes (SIMD 16 x 16 and 8 x 16 tiles, byte edges)
    puts value (i, j) at plane j, pixel i: with r = 1 the store is a pure transposition."""
    rng = np.random.default_rng(rows * cols)
    x = rng.integers(-128, 128, (2, rows, cols)).astype(np.int32)
    planes = np.zeros((2, cols, rows + 3), np.int8)                # planes longer than the run
    dst = planes[:, :, :rows].transpose(0, 2, 1)
    _kernels.requantize_float(x, dst, np.ones((1, cols)), 1, 0, 0.5, -128, 127)
    assert np.array_equal(planes[:, :, :rows], x.transpose(0, 2, 1)) and not planes[:, :, rows:].any()


@pytest.mark.parametrize("k,p", [(3, 50), (8, 100), (8, 15), (12, 40), (16, 16), (24, 33), (40, 70)])
def test_transpose_planes_is_the_transpose(k, p):
    """Channel planes made pixel-major (16 x 16 and 8 x 16 SIMD tiles, byte edges), planes
    at a stride beyond their length: every byte lands at (pixel, channel)."""
    rng = np.random.default_rng(k * p)
    planes = rng.integers(0, 256, (2, k, p + 5)).astype(np.uint8)[:, :, :p]
    out = np.empty((2, p, k), np.uint8)
    _kernels.transpose_planes(planes, out)
    assert np.array_equal(out, planes.transpose(0, 2, 1))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_lut_kernel_is_the_per_channel_gather(data):
    """VLUT's kernel (`_kernels.lut`) equals indexing the tables directly: entry x - min(int8)
    for int8 indices, of the table of the element's channel ((e // inner) % nch)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    d_dt = data.draw(st.sampled_from(DST))
    signed = data.draw(st.booleans())
    s, nch, inner = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 20))
    n = data.draw(st.integers(0, 120))
    x = rng.integers(0, 256, (s, n)).astype(np.uint8)
    info = np.iinfo(d_dt)
    tables = rng.integers(info.min, int(info.max) + 1, (s if data.draw(st.booleans()) else 1, nch * 256)).astype(d_dt)
    idx = (x.astype(np.int64) ^ (0x80 if signed else 0)) + 256 * ((np.arange(n) // inner) % nch)
    want = np.take_along_axis(np.broadcast_to(tables, (s, nch * 256)), idx, axis=1)
    got = np.zeros((s, n), d_dt)
    _kernels.lut(x, tables, got, signed, nch, inner)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("level", [2, 1, 0])
@pytest.mark.parametrize("d_dt", [np.int8, np.uint8])
def test_byte_lut_paths_are_the_gather(level, d_dt):
    """Byte tables over long channel runs go through SIMD lookups (`qc_lut8`: AVX-512
    VBMI, AVX2, scalar; each path forced in turn, the CPU permitting): every index of
    every table, runs of 1 to 300 bytes with the 64- and 32-byte blocks' tails, equal
    the direct gather."""
    rng = np.random.default_rng(level)
    for signed in (False, True):
        for inner in (1, 31, 32, 63, 64, 65, 100, 300):
            nch = 3
            n = inner * nch * 2 + 7
            x = rng.integers(0, 256, (2, n)).astype(np.uint8)
            x[0, :min(n, 256)] = np.arange(min(n, 256))
            tables = rng.integers(np.iinfo(d_dt).min, int(np.iinfo(d_dt).max) + 1, (1, nch * 256)).astype(d_dt)
            idx = (x.astype(np.int64) ^ (0x80 if signed else 0)) + 256 * ((np.arange(n) // inner) % nch)
            got = np.zeros((2, n), d_dt)
            old = _kernels.set_lut_level(level)
            try:
                _kernels.lut(x, tables, got, signed, nch, inner)
            finally:
                _kernels.set_lut_level(old)
            assert np.array_equal(got, tables[0][idx]), (signed, inner)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_maxpool_kernel_is_the_window_maximum(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    dt = data.draw(st.sampled_from([np.int8, np.uint8]))
    kh, kw, sh, sw, dh, dw = (data.draw(st.integers(1, 3)) for _ in range(6))
    oh, ow = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    h = (oh - 1) * sh + (kh - 1) * dh + 1 + data.draw(st.integers(0, 2))
    w = (ow - 1) * sw + (kw - 1) * dw + 1 + data.draw(st.integers(0, 2))
    x = rng.integers(np.iinfo(dt).min, int(np.iinfo(dt).max) + 1, (2, 3, h, w + 2)).astype(dt)
    x = x[..., :w] if data.draw(st.booleans()) else np.ascontiguousarray(x[..., :w])     # rows apart, or not
    want = np.max([x[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
                   for i in range(kh) for j in range(kw)], axis=0)
    got = np.zeros((2, 3, oh, ow), dt)
    _kernels.maxpool(x, got, kh, kw, sh, sw, dh, dw)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dt", [np.int8, np.uint8])
@pytest.mark.parametrize("h, w, pad", [(8, 8, 0), (7, 9, 2), (2, 2, 1)])
def test_two_by_two_max_pool_and_tall_planes(dt, h, w, pad):
    """The 2x2 / stride 2 fast path of the max-pool kernel, on planes with rows apart and
    odd sizes (the last row or column dropped), and the same pool over the planes seen as
    one tall plane per sample (`functional._tall_planes`, when H = OH * 2)."""
    from qcompile.backend.simulator.functional import _tall_planes

    rng = np.random.default_rng(h * 100 + w)
    x = rng.integers(np.iinfo(dt).min, int(np.iinfo(dt).max) + 1, (3, 5, h, w + pad)).astype(dt)[..., :w]
    oh, ow = h // 2, w // 2
    want = x[:, :, :2 * oh, :2 * ow].reshape(3, 5, oh, 2, ow, 2).max(axis=(3, 5))
    got = np.zeros((3, 5, oh, ow), dt)
    _kernels.maxpool(x, got, 2, 2, 2, 2, 1, 1)
    assert np.array_equal(got, want)
    tall, out = _tall_planes(x, got, (2, 2, 2, 2, 1, 1, oh, ow))
    assert (tall.shape[2] == 5 * h) == (h == 2 * oh)        # only where the windows stay in their plane
    got[...] = 0
    _kernels.maxpool(tall, out, 2, 2, 2, 2, 1, 1)
    assert np.array_equal(got, want)
