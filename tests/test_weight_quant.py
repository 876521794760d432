"""Weight quantizers: integer ranges, exactness properties, MSE search against min/max,
and agreement with onnxruntime's DequantizeLinear."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.ir import BIPOLAR, TERNARY, int_type
from qcompile.passes.quantize import WeightFormat, dequantize, quantize_weight, weight_format


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits", ["8", "4", "3", "2"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_codes_in_range_and_error_bounded(bits, per_channel):
    w = gaussian((16, 8, 3, 3))
    fmt = weight_format(bits, per_channel=per_channel, search="minmax")
    q, p = quantize_weight(w, fmt)
    b = int(bits)
    assert q.dtype == fmt.dtype.numpy_dtype and q.shape == w.shape  # int4, int2 are ONNX types
    q = q.astype(np.int32)
    assert q.min() >= -(2 ** (b - 1) - 1) and q.max() <= 2 ** (b - 1) - 1
    assert np.all(p.zero_point == 0)
    assert (p.axis == 0) if per_channel else (p.axis is None)
    # min/max never clips: every error is at most half a step
    scale = p.scale.reshape(-1, 1, 1, 1) if per_channel else p.scale
    assert np.all(np.abs(dequantize(q, p) - w) <= scale / 2 + 1e-7)
    # symmetric grid: -w quantizes to -q
    assert np.array_equal(quantize_weight(-w, fmt)[0].astype(np.int32), -q)


def test_mse_search_beats_minmax_at_low_bits():
    w = gaussian((32, 64))
    w[0, 0] = 12.0  # an outlier that min/max would let stretch channel 0's grid
    for bits in ("4", "3", "2"):
        q_mm, p_mm = quantize_weight(w, weight_format(bits, search="minmax"))
        q_mse, p_mse = quantize_weight(w, weight_format(bits, search="mse"))
        e_mm = np.square(dequantize(q_mm, p_mm) - w).sum()
        e_mse = np.square(dequantize(q_mse, p_mse) - w).sum()
        assert e_mse < e_mm, bits


def test_per_channel_beats_per_tensor_when_channels_differ():
    w = gaussian((8, 32)) * np.logspace(-2, 0, 8, dtype=np.float32)[:, None]
    qc, pc = quantize_weight(w, weight_format("4", per_channel=True))
    qt, pt = quantize_weight(w, weight_format("4", per_channel=False))
    assert np.square(dequantize(qc, pc) - w).sum() < 0.5 * np.square(dequantize(qt, pt) - w).sum()


def test_asymmetric_keeps_zero_exact_and_uses_unsigned_codes():
    w = np.abs(gaussian((4, 50))) + 0.5  # all positive
    w[:, 0] = 0.0
    q, p = quantize_weight(w, weight_format("8", symmetric=False))
    assert q.dtype == np.uint8 and q.min() >= 0 and q.max() <= 255
    assert np.all(dequantize(q, p)[:, 0] == 0.0)
    assert np.abs(dequantize(q, p) - w).max() < 0.01


def test_ternary_and_binary():
    w = gaussian((6, 100))
    q, p = quantize_weight(w, WeightFormat(TERNARY))
    assert set(np.unique(q)) <= {-1, 0, 1} and 0 in set(np.unique(q))
    q, p = quantize_weight(w, WeightFormat(BIPOLAR))
    assert set(np.unique(q)) == {-1, 1}
    np.testing.assert_allclose(p.scale, np.abs(w).mean(axis=1), rtol=1e-6)


def test_axis_other_than_zero_and_bad_input():
    w = gaussian((3, 5))
    q, p = quantize_weight(w, weight_format("8", axis=1))
    assert p.scale.shape == (5,) and p.axis == 1
    with pytest.raises(ValueError, match="out of range"):
        quantize_weight(w, weight_format("8", axis=2))
    with pytest.raises(ValueError, match="2..16, ternary, binary"):
        weight_format("17")
    assert weight_format("int4").dtype == int_type(4)


def test_onnxruntime_dequantizes_to_the_same_floats():
    """Per-channel int8 and int4 through ONNX DequantizeLinear (opset 21)."""
    w = gaussian((4, 6))
    for bits, onnx_type in (("8", TensorProto.INT8), ("4", TensorProto.INT4)):
        q, p = quantize_weight(w, weight_format(bits))
        qt = helper.make_tensor("q", onnx_type, q.shape, q.astype(np.int32).ravel().tolist())
        zp = helper.make_tensor("zp", onnx_type, [4], [0, 0, 0, 0])
        node = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=0)
        graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
                                  [qt, numpy_helper.from_array(p.scale, "s"), zp])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {})[0], dequantize(q, p))


def test_an_all_zero_channel_keeps_a_typical_scale_so_its_bias_survives():
    """A pruned (all-zero) filter is exact at any scale; the tiny floor scale would make
    its int32 bias (s_in * s_w) saturate, and the channel would lose its bias."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import qcompile
    from qcompile.onnx_io import from_proto, to_proto

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0
    b = np.array([0.1, -0.2, 1.25, 0.3], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model.annotations["calibration_data"] = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
                                             for _ in range(16)]
    qdq = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize").run(model).model
    sess = ort.InferenceSession(to_proto(qdq).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)})[0]
    assert np.allclose(y[0, 2], 1.25, atol=0.05)   # the zero filter's channel is its bias
