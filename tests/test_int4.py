"""4-bit activations and packed INT4 weights: quantize exports ONNX INT4 QDQ that
onnxruntime runs (default graph optimisations on); lower-integer moves 4-bit tensors
into int8 containers with out_min/out_max narrowed to [-8, 7]; the integer reference
matches onnxruntime op by op within 1 LSB and on whole models.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
import qcompile.passes  # noqa: F401  (registers the passes)
import qcompile.passes.lower_integer  # noqa: F401
from qcompile.backend.reference import run_integer_graph
from qcompile.errors import PassFailedError
from qcompile.onnx_io import from_proto, to_proto
from qcompile.quant_math import DOMAIN

EX = "examples"
I4 = ml_dtypes.int4


def _ort(proto, feeds, optimize=True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


# -- op by op: float -> Q(int4) -> DQ -> op -> Q(int4) -> DQ -> float ----------------------
class _Q4:
    """A tiny int4 QDQ model around one op. Inputs are float and quantized in the model
    (onnxruntime's Python API takes no int4 arrays); the output is the dequantized
    int4 result, compared in units of its scale (LSB)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.feeds = [], [], [], {}

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def act(self, name, shape):
        s, z = np.float32(self.rng.uniform(0.1, 0.3)), np.array(self.rng.integers(-3, 3), I4)
        self.feeds[name] = self.rng.normal(0, 1, shape).astype(np.float32)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.init(name + "_s", s), self.init(name + "_z", z)
        self.nodes += [helper.make_node("QuantizeLinear", [name, name + "_s", name + "_z"], [name + "_q"]),
                       helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_f"])]
        return name + "_f", float(s)

    def weight(self, name, shape, axis, s_in, dtype=I4, bias=True):
        lim = 7 if dtype == I4 else 127
        w = self.rng.integers(-lim, lim + 1, shape).astype(dtype)
        ch = shape[axis]
        s_w = self.rng.uniform(0.01, 0.05, ch).astype(np.float32)
        self.init(name + "_q", w), self.init(name + "_s", s_w), self.init(name + "_z", np.zeros(ch, dtype))
        self.nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name],
                                           axis=axis))
        if not bias:
            return name, None
        self.init(name + "_bq", self.rng.integers(-300, 300, ch).astype(np.int32))
        self.init(name + "_bs", (np.float32(s_in) * s_w).astype(np.float32))
        self.init(name + "_bz", np.zeros(ch, np.int32))
        self.nodes.append(helper.make_node("DequantizeLinear", [name + "_bq", name + "_bs", name + "_bz"],
                                           [name + "_b"], axis=0))
        return name, name + "_b"

    def model(self, outputs):
        g = helper.make_graph(self.nodes, "t", self.inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)

    def finish(self, out, relu=False):
        probe = _ort(self.model([out]), self.feeds, optimize=False)[0]  # (DQ(int4) -> MaxPool: no kernel)
        lo, hi = (0.0, float(probe.max())) if relu else (min(float(probe.min()), 0.0), float(probe.max()))
        scale = np.float32((hi - lo) / 15 * 0.8)  # some saturation
        zp = int(np.clip(np.rint(-8 - lo / scale), -8, 7))
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], ["act"]))
            out = "act"
        self.init("y_s", scale), self.init("y_z", np.array(zp, I4))
        self.nodes += [helper.make_node("QuantizeLinear", [out, "y_s", "y_z"], ["y_q"]),
                       helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"])]
        return self.model(["y"]), float(scale)


def _check(proto, scale, feeds, lowered_op):
    want = _ort(proto, feeds)[0]
    typed = onnx.shape_inference.infer_shapes(proto)  # as quantize's output: every tensor typed
    lowered = qcompile.PassManager.parse("lower-integer").run(from_proto(typed)).model
    ops = [n.op_type for n in lowered.graph.nodes]
    assert lowered_op in ops and "QuantizeLinear" not in ops, ops
    for n in lowered.graph.nodes:
        if n.domain == DOMAIN and n.op_type not in ("Dequantize",):
            assert n.output.type.dtype.numpy_dtype == np.int8, n.label
            assert (n.attr("out_min"), n.attr("out_max")) == (-8, 7) or n.attr("out_min") >= -8, n.label
    for v in lowered.graph.initializers.values():
        assert v.const_value.dtype in (np.int8, np.uint8, np.int32, np.float32), v.name
    inter = run_integer_graph(lowered, feeds, outputs=[lowered.graph.outputs[0].producer.inputs[0].name])
    codes = next(iter(inter.values()))
    assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7
    got = run_integer_graph(lowered, feeds)["y"]
    lsb = np.abs(got.astype(np.float64) - want) / scale
    assert (lsb <= 1 + 1e-3).mean() >= 0.999, f"{lowered_op}: max {lsb.max():.2f} LSB"
    return lsb


@pytest.mark.parametrize("group,relu,wtype", [(1, True, I4), (8, False, I4), (1, True, np.int16)],
                         ids=["conv", "depthwise", "conv-w8-in-int16"])
def test_qconv_int4_within_one_lsb(group, relu, wtype):
    b = _Q4(group)
    x, s = b.act("x", [2, 8, 9, 9])
    w, bias = b.weight("w", [16 if group == 1 else 8, 8 // group, 3, 3], 0, s, dtype=wtype)
    b.nodes.append(helper.make_node("Conv", [x, w, bias], ["c"], pads=[1, 1, 1, 1], group=group))
    _check(*b.finish("c", relu), b.feeds, "QConv")


def test_qgemm_and_qmatmul_int4_within_one_lsb():
    b = _Q4(1)
    x, s = b.act("x", [6, 40])
    w, bias = b.weight("w", [12, 40], 0, s)
    b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["g"], transB=1))
    _check(*b.finish("g"), b.feeds, "QGemm")
    b = _Q4(2)
    x, s = b.act("x", [2, 5, 16])
    w, _ = b.weight("w", [16, 8], 1, s, bias=False)
    b.nodes.append(helper.make_node("MatMul", [x, w], ["m"]))
    _check(*b.finish("m"), b.feeds, "QMatMul")
    b = _Q4(3)
    q, _ = b.act("q", [2, 3, 5, 8])
    k, _ = b.act("k", [2, 3, 8, 5])
    b.nodes.append(helper.make_node("MatMul", [q, k], ["m"]))
    _check(*b.finish("m"), b.feeds, "QMatMul")


@pytest.mark.parametrize("op", ["Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Relu"])
def test_elementwise_and_pooling_int4_within_one_lsb(op):
    b = _Q4(len(op))
    a, _ = b.act("a", [2, 4, 6, 6])
    inputs = [a]
    attrs = {}
    if op in ("Add", "Mul", "Concat"):
        inputs.append(b.act("c", [2, 4, 6, 6])[0])
        attrs = {"axis": 1} if op == "Concat" else {}
    elif op in ("MaxPool", "AveragePool"):
        attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    b.nodes.append(helper.make_node(op, inputs, ["r"], **attrs))
    lowered = {"Add": "QAdd", "Mul": "QMul", "MaxPool": "MaxPool", "AveragePool": "QAveragePool",
               "GlobalAveragePool": "QAveragePool", "Concat": "Concat", "Relu": "Requantize"}[op]
    _check(*b.finish("r"), b.feeds, lowered)


# -- the quantize pass ---------------------------------------------------------------------
def _digits(options):
    m = qcompile.load(f"{EX}/digits_cnn.onnx")
    text = f"fold,calibrate{{data={EX}/digits_calib.npz,progress=false}},quantize{{{options}}}"
    return qcompile.PassManager.parse(text).run(m).model


def _accuracy(proto):
    d = np.load(f"{EX}/digits_eval.npz")
    y = _ort(proto, {"input": d["input"].reshape(-1, 1, 8, 8)})[0]
    return float((y.argmax(1) == d["label"]).mean())


@pytest.fixture(scope="module")
def w4a4():
    return to_proto(_digits("weights=int4,activations=int4"))


def test_int4_activations_export_onnx_int4_qdq(w4a4):
    assert {o.version for o in w4a4.opset_import if o.domain in ("", "ai.onnx")} == {21}
    q_types = {n.output[0]: n for n in w4a4.graph.node if n.op_type == "QuantizeLinear"}
    zps = {i.name: i for i in w4a4.graph.initializer}
    assert q_types and all(zps[n.input[2]].data_type == TensorProto.INT4 for n in q_types.values())
    weights = [i for i in w4a4.graph.initializer if i.name.endswith(tuple(f"_quantized_{k}" for k in range(99)))
               and i.data_type != TensorProto.INT32]
    assert weights and all(w.data_type == TensorProto.INT4 for w in weights)  # packed: 2 per byte
    assert all(len(w.raw_data) == (int(np.prod(w.dims)) + 1) // 2 for w in weights if w.raw_data)
    assert _accuracy(w4a4) >= 0.95  # float 98.3%


def test_w4a4_integer_graph_matches_onnxruntime(w4a4):
    lowered = qcompile.PassManager.parse("lower-integer").run(from_proto(w4a4)).model
    bits = json.loads(lowered.metadata_props["qcompile.activation_bits"])
    assert bits and set(bits.values()) == {"i4"}
    wbits = json.loads(lowered.metadata_props["qcompile.weight_bits"])
    assert set(wbits.values()) == {"i4"} and set(wbits) <= set(lowered.graph.initializers)
    for name in wbits:
        w = lowered.graph.initializers[name].const_value
        assert w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7
    quant = next(n for n in lowered.graph.nodes if n.op_type == "Quantize")
    assert (quant.attr("out_min"), quant.attr("out_max")) == (-8, 7)
    d = np.load(f"{EX}/digits_eval.npz")
    x = d["input"].reshape(-1, 1, 8, 8)
    want = _ort(w4a4, {"input": x})[0]
    got = run_integer_graph(lowered, {"input": x})["logits"]
    scale = float(numpy_helper.to_array(next(i for i in w4a4.graph.initializer if i.name.startswith("logits_scale"))))
    assert np.abs(got - want).max() <= scale * 1.001  # within 1 LSB everywhere
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    onnx.checker.check_model(to_proto(lowered))
    from qcompile.analysis import format_summary, summarize
    text = format_summary(summarize(lowered))  # what `qcompile inspect` prints
    assert "QConv" in text and "{scale=" in text and " as i4" in text


def test_w8a4_keeps_conv_weights_out_of_onnxruntimes_qlinearconv_fusion():
    model = _digits("activations=int4")
    proto = to_proto(model)
    conv_w = [n.inputs[1].producer.inputs[0] for n in model.graph.nodes if n.op_type == "Conv"]
    assert all(w.const_value.dtype == np.int16 for w in conv_w)  # 8-bit values in an int16 container
    assert set(json.loads(model.metadata_props["qcompile.weight_bits"]).values()) == {"i8"}
    assert _accuracy(proto) >= 0.95
    lowered = qcompile.PassManager.parse("lower-integer").run(from_proto(proto)).model
    assert all(lowered.graph.initializers[w.name].const_value.dtype == np.int8 for w in conv_w)


def test_activation_overrides_and_sensitive_fallback():
    model = _digits("activation_overrides=/3/Conv:int4;input:int4")
    types = {n.inputs[0].name: n.output.type.dtype.bits for n in model.graph.nodes if n.op_type == "QuantizeLinear"}
    assert types["input"] == 4 and types["/5/Relu_output_0"] == 4  # /3/Conv's output, after its fused Relu
    assert sorted(types.values()).count(4) == 2 and model.opset == 21
    raised = _digits("activations=int4,min_activation_sqnr=25")
    reasons = [d for d in raised.annotations["quantization_decisions"] if "tensor" in d]
    assert reasons and all("estimated int4 SQNR" in d["reason"] and d["kept_at"] in ("i8", "i16") for d in reasons)
    with pytest.raises(PassFailedError, match=r"activation_overrides: 'int5' in 'Conv:int5' is not one of"):
        _digits("activation_overrides=Conv:int5")
    with pytest.raises(PassFailedError, match="int4 activations need packed=true"):
        _digits("activations=int4,packed=false")


def test_packed_int4_weights_and_the_int8_container_fallback(tmp_path):
    packed, boxed = _digits("weights=int4,search_samples=0"), _digits("weights=int4,packed=false,search_samples=0")
    assert packed.opset == 21 and boxed.opset == 17
    for model, dtype in ((packed, I4), (boxed, np.int8)):
        ws = [n.inputs[1].producer.inputs[0].const_value for n in model.graph.nodes if n.op_type in ("Conv", "Gemm")]
        assert all(w.dtype == dtype for w in ws)
        qcompile.save(model, str(tmp_path / f"{np.dtype(dtype).name}.onnx"))
    size = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert size["int4.onnx"] < size["int8.onnx"] - 1500  # 4.4k weights: about 2.2 KiB saved
    np.testing.assert_array_equal(_ort(to_proto(packed), {"input": np.ones((1, 1, 8, 8), np.float32)})[0],
                                  _ort(to_proto(boxed), {"input": np.ones((1, 1, 8, 8), np.float32)})[0])
    from qcompile.analysis import summarize
    rows = summarize(qcompile.load(str(tmp_path / "int4.onnx"))).quantized
    assert {r["type"] for r in rows if r["role"] == "weight"} == {"i4"}


@pytest.mark.filterwarnings("ignore:calibrate. non-finite")
@pytest.mark.parametrize("name", ["mobilenet", "transformer"])
def test_int4_activations_on_torch_models(name, tmp_path):
    """MobileNet's ReLU6 Clips are redundant at their 4-bit scale and dropped (onnxruntime
    cannot fuse a Clip with an int4 Q); the transformer keeps its host float ops."""
    pytest.importorskip("torch")
    from torch_models import exported, sample_feeds
    model, args = exported(name)
    data = sample_feeds(args)

    np.savez(tmp_path / "calib.npz", **data(48))
    qdq = qcompile.PassManager.parse(
        f"fold,calibrate{{data={tmp_path / 'calib.npz'},progress=false}},quantize{{activations=int4}}").run(model).model
    if name == "mobilenet":
        assert not any(n.op_type == "Clip" for n in qdq.graph.nodes)
    proto = to_proto(qdq)
    evals = data(64)
    want = _ort(proto, evals)[0]
    lowered = qcompile.PassManager.parse("lower-integer").run(from_proto(proto)).model
    got = run_integer_graph(lowered, evals)[lowered.graph.outputs[0].name]
    sqnr = 10 * np.log10(np.square(want).sum() / max(np.square(got - want).sum(), 1e-30))
    assert sqnr >= 40 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
