"""rain-sim end to end: lowering + simulation are bit-identical to the integer reference
(op by op over random shapes, on three targets including one with tiny buffers that
forces tiling, and on whole models); tokens order every hazard; timing and energy
follow their closed forms."""
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backend.isa import Op
from qcompile.backend.lowering import compile_program
from qcompile.backend.program import Program
from qcompile.backend.reference import run_integer_graph
from qcompile.backend.simulator import simulate
from qcompile.backend.simulator.timing import instruction_cycles, matmul_cycles
from qcompile.backend.target import Target, load_target
from qcompile.onnx_io import from_proto, load

F = TensorProto.FLOAT
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
RNG = np.random.default_rng(0)


def _target(name="tiny", **changes):
    d = load_target("rain-sim").to_dict()
    d["name"] = name
    d["matrix"].update(rows=8, cols=8)
    d["sram"]["activation"]["size_kib"] = 2
    d["sram"]["weight"]["size_kib"] = 1
    d["sram"]["accumulator"]["size_kib"] = 1
    for key, value in changes.items():
        section, field = key.split("__")
        d[section][field] = value
    return Target.from_dict(d, "test")


TARGETS = {"rain-sim": load_target("rain-sim"), "rain-sim-ws": load_target("rain-sim-ws"), "tiny": _target(),
           "tiny-ws": _target("tiny-ws", matrix__dataflow="weight-stationary")}


def _integer(proto, calib, pipeline="quantize"):
    model = from_proto(proto)
    model.annotations["calibration_data"] = calib
    return qcompile.PassManager.parse(f"fold,calibrate{{progress=false}},{pipeline},lower-integer").run(model).model


def _samples(shapes, n, rng=RNG):
    return {k: rng.standard_normal((n,) + tuple(s)).astype(np.float32) for k, s in shapes.items()}


def _check(int_model, feeds, target_name, expect_ops=None):
    """Compile, go through the file format, simulate all samples at once, and compare
    every output bit for bit with the integer reference run sample by sample."""
    target = TARGETS[target_name]
    prog = compile_program(int_model, target, check_tokens=True)
    prog = Program.from_bytes(prog.to_bytes())
    if expect_ops is not None:
        assert {l["kind"] for l in prog.layers} >= set(expect_ops), [l["kind"] for l in prog.layers]
    res = simulate(prog, target, feeds)
    n = next(iter(feeds.values())).shape[0]
    for i in range(n):
        ref = run_integer_graph(int_model, {k: v[i] for k, v in feeds.items()})
        for name, want in ref.items():
            got = res.outputs[name][i]
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want), f"{name} sample {i}: {np.count_nonzero(got != want)} elements differ"
    return prog, res


def _model(nodes, inputs, output_shape, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", F, output_shape)],
                              [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# -- convolutions --------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    c = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    group = c if kind == "depthwise" else 1
    if kind == "grouped":
        c = 2 * max(c // 2, 1)
        group = 2
    m = c if kind == "depthwise" else group * draw(st.integers(1, 20))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dil = draw(st.integers(1, 2))
    pad = draw(st.integers(0, k - 1)) if k > 1 else 0
    h = draw(st.integers(max(3, (k - 1) * dil + 1), 12))
    w = draw(st.integers(max(3, (k - 1) * dil + 1), 12))
    relu = draw(st.booleans())
    target = draw(st.sampled_from(sorted(TARGETS)))
    return c, m, h, w, k, stride, dil, pad, group, relu, target


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_conv_bit_exact_over_random_shapes(case):
    c, m, h, w, k, stride, dil, pad, group, relu, target = case
    wt = (RNG.standard_normal((m, c // group, k, k)) * 0.3).astype(np.float32)
    b = RNG.standard_normal(m).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu else "y"], kernel_shape=[k, k],
                              strides=[stride] * 2, dilations=[dil] * 2, pads=[pad] * 4, group=group)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", wt), ("b", b)])
    calib = [{"x": x} for x in _samples({"x": (1, c, h, w)}, 8)["x"]]
    int_model = _integer(proto, calib)
    feeds = _samples({"x": (1, c, h, w)}, 3)
    kind = "dwconv" if group == c == m and c > 1 else "conv"
    _check(int_model, feeds, target, expect_ops=[kind])


@pytest.mark.parametrize("weights", ["int4", "int2", "ternary", "binary"])
@pytest.mark.parametrize("target", ["rain-sim", "tiny"])
def test_low_bit_weights_are_packed_and_exact(weights, target):
    c, m = 6, 20
    wt = (RNG.standard_normal((m, c, 3, 3)) * 0.3).astype(np.float32)
    proto = _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)],
                   [("x", [1, c, 7, 7])], None, [("w", wt)])
    calib = [{"x": x} for x in _samples({"x": (1, c, 7, 7)}, 8)["x"]]
    int_model = _integer(proto, calib, f"quantize{{weights={weights}}}")
    prog, res = _check(int_model, _samples({"x": (1, c, 7, 7)}, 2), target)
    wtype = {"int4": "INT4", "int2": "INT2", "ternary": "INT2", "binary": "BINARY"}[weights]
    assert prog.layers[0]["weight_type"] == wtype
    per_byte = {"INT4": 2, "INT2": 4, "BINARY": 8}[wtype]
    assert len(prog.const) < m * c * 9 // per_byte + 1024  # packed, not int8
    layer = res.report["layers"][0]
    e = TARGETS[target].energy
    assert layer["energy_pj"]["mac"] == pytest.approx(layer["sparsity"]["macs_nonzero"] * e.mac(
        {"INT4": "int4", "INT2": "int2", "BINARY": "binary"}[wtype]), rel=1e-3)


# -- GEMM and MatMul ------------------------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70), st.integers(1, 40), st.integers(1, 3), st.sampled_from(sorted(TARGETS)))
def test_gemm_bit_exact(k, n, rows, target):
    wt = (RNG.standard_normal((n, k)) * 0.2).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    proto = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [("x", [rows, k])], None,
                   [("w", wt), ("b", b)])
    calib = [_samples({"x": (rows, k)}, 1)["x"][0] for _ in range(8)]
    int_model = _integer(proto, [{"x": x} for x in calib])
    _check(int_model, _samples({"x": (rows, k)}, 3), target, expect_ops=["gemm"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(2, 12), st.integers(1, 20), st.sampled_from(sorted(TARGETS)))
def test_matmul_of_two_activations_bit_exact(heads, seq, dim, target):
    """Attention's Q @ K^T: both operands are activations (the second goes to the weight buffer)."""
    proto = _model([helper.make_node("MatMul", ["q", "k"], ["y"])], [("q", [1, heads, seq, dim]),
                                                                       ("k", [1, heads, dim, seq])], None)
    calib = [{"q": q, "k": kk} for q, kk in zip(_samples({"q": (1, heads, seq, dim)}, 8)["q"],
                                                 _samples({"k": (1, heads, dim, seq)}, 8)["k"])]
    int_model = _integer(proto, calib)
    feeds = {**_samples({"q": (1, heads, seq, dim)}, 2), **_samples({"k": (1, heads, dim, seq)}, 2)}
    _check(int_model, feeds, target, expect_ops=["gemm"])


# -- pointwise, pooling, tables and data movement ---------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["Add", "Mul"]), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["same", "channel", "spatial", "scalar"]), st.sampled_from(sorted(TARGETS)))
def test_add_mul_with_broadcasting_bit_exact(op, c, h, w, bcast, target):
    other = {"same": [1, c, h, w], "channel": [1, c, 1, 1], "spatial": [1, 1, h, w], "scalar": [1, 1, 1, 1]}[bcast]
    proto = _model([helper.make_node(op, ["a", "b"], ["y"])], [("a", [1, c, h, w]), ("b", other)], None)
    calib = [{"a": a, "b": b} for a, b in zip(_samples({"a": (1, c, h, w)}, 8)["a"], _samples({"b": other}, 8)["b"])]
    int_model = _integer(proto, calib)
    feeds = {**_samples({"a": (1, c, h, w)}, 3), **_samples({"b": other}, 3)}
    _check(int_model, feeds, target, expect_ops=["pointwise"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 10), st.integers(2, 13), st.integers(2, 13), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 1), st.integers(0, 1), st.sampled_from(sorted(TARGETS)))
def test_max_pool_bit_exact(c, h, w, k, s, pad, ceil, target):
    k = min(k, h, w)
    pad = min(pad, k - 1)
    proto = _model([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
                    helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4,
                                     ceil_mode=ceil)],
                   [("x", [1, c, h, w])], None, [("w", RNG.standard_normal((c, c, 1, 1)).astype(np.float32))])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 8)["x"]])
    _check(int_model, _samples({"x": (1, c, h, w)}, 3), target, expect_ops=["pool"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 10), st.integers(2, 13), st.integers(2, 13), st.integers(2, 3), st.integers(1, 3),
       st.integers(0, 1), st.integers(0, 1), st.booleans())
def test_average_pool_with_a_divisor_per_position_bit_exact(c, h, w, k, s, pad, ceil, relu):
    """AveragePool that excludes padding (or cuts ceil_mode windows) has a divisor per
    output position: it runs on the host, through the simulator's fast form
    (host._AveragePool), and equals the integer reference bit for bit."""
    k = min(k, h, w)
    pad = min(pad, k - 1)
    if not pad and not ceil:
        pad = min(1, k - 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("AveragePool", ["c"], ["p" if relu else "y"], kernel_shape=[k, k], strides=[s, s],
                              pads=[pad] * 4, ceil_mode=ceil, count_include_pad=0)]
    if relu:
        nodes.append(helper.make_node("Relu", ["p"], ["y"]))
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", RNG.standard_normal((c, c, 1, 1)).astype(np.float32))])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 8)["x"]])
    prog, _ = _check(int_model, _samples({"x": (1, c, h, w)}, 3), "rain-sim")
    pools = [i for i, op in enumerate(prog.host_ops) if b"QAveragePool" in op.model]
    if pad and s == 1 and min(h, w) > k:
        assert pools                # corner windows have fewer taps than inner ones: on the host
    from qcompile.backend.simulator.host import HostRunner

    assert all(HostRunner(prog)._runner(i)[0] == "pool" for i in pools)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_average_pools_tables_transpose_concat_bit_exact(target):
    c, h, w = 6, 9, 7
    wt = RNG.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Sigmoid", ["a"], ["s"]),                       # a lookup table
        helper.make_node("Tanh", ["a"], ["t"]),                          # another
        helper.make_node("Concat", ["s", "t"], ["cat"], axis=1),
        helper.make_node("AveragePool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["tp"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["tp"], ["f"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["gf"], axis=1),
        helper.make_node("Concat", ["f", "gf"], ["y"], axis=1),
    ]
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", wt)])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 8)["x"]])
    prog, _ = _check(int_model, _samples({"x": (1, c, h, w)}, 3), target)
    ops = [l["op"] for l in prog.layers]
    assert sum(o.startswith("LUT:") for o in ops) == 2, ops
    assert "QAveragePool" in ops and "Transpose" in ops and ops.count("Concat") == 2
    assert not [l for l in prog.layers if l["unit"] == "host"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_slice_is_data_movement_and_bit_exact(data):
    """Slice of a quantized tensor (random starts, ends, negative indices, steps, axes) is
    a DMA move on the accelerator, not a HOST op, and matches the integer reference."""
    c, h, w = data.draw(st.integers(2, 9)), data.draw(st.integers(2, 12)), data.draw(st.integers(2, 12))
    dims = [c, h, w]
    axes = data.draw(st.lists(st.sampled_from([1, 2, 3, -1]), min_size=1, max_size=3, unique_by=lambda a: a % 4))
    starts, ends, steps = [], [], []
    for a in axes:
        d = dims[a % 4 - 1]
        lo = data.draw(st.integers(-d, d - 1))
        starts.append(lo)
        first = lo + d if lo < 0 else lo
        ends.append(data.draw(st.integers(first + 1, d + 3)))
        steps.append(data.draw(st.integers(1, 3)))
    wt = RNG.standard_normal((c, c, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]),
             helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    ints = [("st", np.array(starts, np.int64)), ("en", np.array(ends, np.int64)), ("ax", np.array(axes, np.int64)),
            ("sp", np.array(steps, np.int64))]
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", wt)] + ints)
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 6)["x"]])
    target = data.draw(st.sampled_from(sorted(TARGETS)))
    prog, _ = _check(int_model, _samples({"x": (1, c, h, w)}, 2), target)
    index = [slice(None)] * 4
    for a, lo, hi, k in zip(axes, starts, ends, steps):
        index[a % 4] = slice(lo, hi, k)
    noop = np.zeros((1, c, h, w))[tuple(index)].shape == (1, c, h, w)        # fold removes a Slice of everything
    assert [l["op"] for l in prog.layers if l["kind"] == "move"] == ([] if noop else ["Slice"]), prog.layers
    assert not [l for l in prog.layers if l["unit"] == "host"]


@pytest.mark.parametrize("op, axes, keepdims, target", [
    ("ReduceMean", [2, 3], 1, "tiny"), ("ReduceSum", [1], 0, "rain-sim"), ("ReduceMax", [1, 3], 1, "tiny-ws"),
    ("ReduceMean", [3], 0, "rain-sim-ws")])
def test_reductions_run_on_the_vector_unit_bit_exact(op, axes, keepdims, target):
    """ReduceMean/Sum/Max: a Transpose when the reduced axes are not last (DMA), a
    global average pool or a row MaxPool (VPOOL), reshapes as aliases; no HOST op."""
    c, h, w = 5, 6, 7
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node(op, ["a", "ax"], ["y"], keepdims=keepdims)]
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", RNG.standard_normal((c, c, 1, 1)).astype(np.float32)),
                                                        ("ax", np.array(axes, np.int64))], opset=18)
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 6)["x"]])
    prog, _ = _check(int_model, _samples({"x": (1, c, h, w)}, 3), target)
    kinds = [l["kind"] for l in prog.layers]
    assert "pool" in kinds and "host" not in kinds, prog.layers
    assert ("move" in kinds) == (axes != [3] and axes != [2, 3])


# -- whole models ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_digits_example_bit_exact_on_every_target(target):
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    data = np.load(os.path.join(EXAMPLES, "digits_eval.npz"))
    prog, res = _check(int_model, {"input": data["input"][:16]}, target)
    full = simulate(prog, TARGETS[target], {"input": data["input"]})
    acc = (full.outputs["logits"].reshape(300, 10).argmax(1) == data["label"]).mean()
    assert acc >= 0.975  # the float model: 98.33%
    assert all(l["unit"] != "host" for l in prog.layers)


@pytest.mark.parametrize("gemm_bytes", [None, 4096])
@pytest.mark.parametrize("engine", ["float32", "int_mm", "direct"])
def test_both_gemm_engines_bit_exact_on_the_example(monkeypatch, engine, gemm_bytes):
    """The simulator's two exact GEMM engines (simulator/gemm.py) give the integer
    reference's outputs; the tiny target splits every layer into many MATMULs. With a
    small GEMM budget every MATMUL goes a few samples at a time."""
    if engine == "int_mm":
        pytest.importorskip("torch")
    from qcompile.backend.simulator import functional

    if gemm_bytes:
        monkeypatch.setattr(functional, "_GEMM_BYTES", gemm_bytes)
    monkeypatch.setenv("QCOMPILE_GEMM", engine)
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:32]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    prog, _ = _check(int_model, {"input": np.load(os.path.join(EXAMPLES, "digits_eval.npz"))["input"][:8]}, "tiny")
    assert sum(i.op == Op.MATMUL for i in prog.instructions) > 10


def test_a_layer_no_tiling_fits_runs_on_the_host(monkeypatch):
    """A model too large for the target's buffers is never refused: a matrix layer with
    no tiling that fits (forced here: no candidate tilings at all) becomes a HOST op run
    by the integer reference, named in the report with the reason, and stays bit-exact."""
    from qcompile.backend.lowering import matrix

    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:32]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    monkeypatch.setattr(matrix, "_ranked", lambda candidates, cost, keep=12: [])
    data = np.load(os.path.join(EXAMPLES, "digits_eval.npz"))
    prog, res = _check(int_model, {"input": data["input"][:4]}, "tiny")
    hosted = [l for l in prog.layers if l["op"] in ("QConv", "QGemm")]
    assert len(hosted) == 3 and all(l["unit"] == "host" for l in hosted)
    assert all("no tiling of " in l["reason"] and "fits the target's SRAM buffers" in l["reason"] for l in hosted)
    assert {h["op"] for h in res.report["host_ops"]} == {"QConv", "QGemm"}


def _torch_integer(name):
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.dirname(__file__))
    from torch_models import exported, sample_feeds

    model, args = exported(name)
    data = sample_feeds(args, sample_axis=True)

    calib = data(16)
    model.annotations["calibration_data"] = [{k: v[i] for k, v in calib.items()} for i in range(16)]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    return int_model, data(4)


@pytest.mark.filterwarnings("ignore:calibrate. non-finite")
@pytest.mark.parametrize("name, target", [("resnet", "tiny"), ("mobilenet", "rain-sim-ws"),
                                          ("transformer", "rain-sim"), ("lstm", "rain-sim")])
def test_torch_models_bit_exact(name, target):
    int_model, feeds = _torch_integer(name)
    prog, res = _check(int_model, feeds, target)
    kinds = {l["kind"] for l in prog.layers}
    if name in ("resnet", "mobilenet"):
        assert "conv" in kinds and res.report["total"]["macs"] > 0
    if name == "mobilenet":
        assert "dwconv" in kinds
    if name == "transformer":   # attention and FFN matmuls on the matrix unit, GELU as tables
        assert sum(l["op"] in ("QMatMul", "QGemm") for l in prog.layers) >= 10
        assert any(l["op"].startswith("LUT:") for l in prog.layers)
    if name == "lstm":
        assert any(l["op"] == "LSTM" and l["unit"] == "host" for l in prog.layers)


# -- timing and energy ------------------------------------------------------------------------
@pytest.mark.parametrize("dataflow", ["output-stationary", "weight-stationary"])
@pytest.mark.parametrize("m, k, n", [(64, 27, 16), (196, 576, 64), (5, 300, 70)])
def test_single_tile_gemm_cycles_follow_scalesim_closed_forms(dataflow, m, k, n):
    r = c = 32
    cycles = matmul_cycles(m, k, n, r, c, dataflow, fill=True)
    if dataflow == "output-stationary":
        scalesim = math.ceil(m / r) * math.ceil(n / c) * (k + r + c - 2) - 1
    else:
        scalesim = math.ceil(k / r) * math.ceil(n / c) * (m + 2 * r + c - 2) - 1
    assert cycles == scalesim + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.lists(st.integers(1, 300), min_size=1, max_size=6),
       st.lists(st.integers(1, 600), min_size=1, max_size=6), st.sampled_from([(32, 32), (8, 16), (4, 4)]),
       st.booleans())
def test_tiling_cost_model_sums_the_simulators_closed_forms_over_every_tile(ms, ns, ks, array, os_flow):
    """The lowering's cost model (its sums factored per axis) equals the simulator's
    matrix cycles summed over every (M, N, K) tile, the fill on each output tile's first
    K chunk only (output-stationary)."""
    from qcompile.backend.lowering._tiling import matrix_cycles

    r, c = array
    flow = "output-stationary" if os_flow else "weight-stationary"
    want = sum(matmul_cycles(m, k, n, r, c, flow, fill=(not os_flow or j == 0))
               for m in ms for n in ns for j, k in enumerate(ks))
    got = matrix_cycles(*(np.asarray(v, np.int64) for v in (ms, ns, ks)), r, c, os_flow)
    assert got == want


def test_output_stationary_k_chunks_add_up_to_one_tile():
    """Splitting K into chunks (fill only on the first) costs what one instruction costs."""
    whole = matmul_cycles(100, 300, 40, 32, 32, "output-stationary", True)
    parts = matmul_cycles(100, 128, 40, 32, 32, "output-stationary", True) + \
        matmul_cycles(100, 128, 40, 32, 32, "output-stationary", False) + \
        matmul_cycles(100, 44, 40, 32, 32, "output-stationary", False)
    assert parts == whole


def test_timeline_overlaps_units_and_energy_adds_up():
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    model.annotations["calibration_data"] = [{"input": x} for x in np.load(
        os.path.join(EXAMPLES, "digits_calib.npz"))["input"][:32]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    target = TARGETS["tiny"]
    prog = compile_program(int_model, target)
    res = simulate(prog, target, {"input": np.zeros((1, 1, 1, 8, 8), np.float32)})
    t = res.report["total"]
    busy = t["busy"]
    assert max(busy.values()) <= t["cycles"] < busy["dma"] + busy["matrix"] + busy["vector"]  # units overlap
    for i, ins in enumerate(prog.instructions):
        assert res.timeline.end[i] - res.timeline.start[i] == instruction_cycles(ins, target)
    assert t["macs"] == 80896
    e = t["energy_pj"]
    assert e["total"] == pytest.approx(e["mac"] + e["vector"] + e["sram"] + e["dram"] + e["static"], rel=1e-6)
    nonzero = sum(l["sparsity"]["macs_nonzero"] for l in res.report["layers"] if l["sparsity"])
    assert 0 < nonzero < 80896   # zero activations (the padding, ReLU's zeros) skip MAC energy
    assert e["mac"] == pytest.approx(nonzero * target.energy.mac("int8"), rel=1e-6)
    assert e["static"] == pytest.approx(target.energy.static_power_mw * 1e-3 * t["cycles"] /
                                        (target.clock_mhz * 1e6) * 1e12, rel=1e-6)
    assert t["dram_bytes"] == sum(l["dram_bytes"] for l in res.report["layers"])
    # the tiny target tiles: several matrix instructions per conv
    assert sum(i.op == Op.MATMUL for i in prog.instructions) > 3


@pytest.mark.parametrize("target", ["rain-sim", "tiny"])
def test_four_bit_activations_and_weights_bit_exact(target):
    """W4A4: int4 activations live in int8 containers with a narrowed range, also at the
    program's input (the interface quantization clips to [-8, 7])."""
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:64]]
    int_model = qcompile.PassManager.parse(
        "fold,calibrate{progress=false},quantize{weights=int4,activations=int4},lower-integer").run(model).model
    data = np.load(os.path.join(EXAMPLES, "digits_eval.npz"))
    prog, res = _check(int_model, {"input": data["input"][:8]}, target)
    assert {l["weight_type"] for l in prog.layers if l["unit"] == "matrix"} == {"INT4"}
    assert prog.inputs[0]["out_min"] == -8 and prog.inputs[0]["out_max"] == 7


# -- sparsity ----------------------------------------------------------------------------------
def _nm_weights(shape, n, m, axis=1):
    """Random weights where every group of m consecutive entries along `axis` keeps n."""
    w = RNG.standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    keep = np.argsort(-np.abs(groups), axis=-1)[..., :n]
    mask = np.zeros_like(groups, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return np.moveaxis((groups * mask).reshape(moved.shape), -1, axis)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("target", ["rain-sim", "rain-sim-ws", "tiny"])
def test_nm_sparse_weights_run_compressed_and_exact(n, m, target):
    c, k = 16, 32
    w_conv = _nm_weights((k, c, 3, 3), n, m) * 0.3
    w_fc = _nm_weights((10, k * 4), n, m)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]
    proto = _model(nodes, [("x", [1, c, 8, 8])], None, [("w", w_conv.astype(np.float32)),
                                                         ("wf", w_fc.astype(np.float32))])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, 8, 8)}, 8)["x"]])
    feeds = _samples({"x": (1, c, 8, 8)}, 3)
    prog, res = _check(int_model, feeds, target)
    matrix_layers = [l for l in res.report["layers"] if l["unit"] == "matrix"]
    assert [l["sparsity"]["nm"] for l in matrix_layers] == [f"{n}:{m}"] * 2
    assert all(i.args["sp_m"] == m for i in prog.instructions if i.op == Op.MATMUL)
    for l in matrix_layers:
        sp = l["sparsity"]
        assert sp["macs_performed"] * m == l["macs"] * n      # only the kept weights are multiplied
        assert sp["saved_cycles"] > 0 and sp["saved_dram_bytes"] > 0 and sp["saved_mac_energy_pj"] > 0
    # the same model on a target without N:M support runs dense: more cycles, same outputs
    d = TARGETS[target].to_dict()
    d["name"], d["matrix"]["sparsity"] = "dense", []
    dense_target = Target.from_dict(d, "test")
    dense = simulate(compile_program(int_model, dense_target), dense_target, feeds)
    for name in res.outputs:
        assert np.array_equal(dense.outputs[name], res.outputs[name])
    dense_matrix = sum(l["cycles"]["matrix"] for l in dense.report["layers"])
    sparse_matrix = sum(l["cycles"]["matrix"] for l in res.report["layers"])
    assert sparse_matrix < dense_matrix
    assert all(l["sparsity"]["nm"] is None for l in dense.report["layers"] if l["sparsity"])


def test_zero_skipping_saves_cycles_only_where_the_target_says_so():
    c = 8
    w = RNG.standard_normal((16, c, 3, 3)).astype(np.float32)
    w[:, :, 1, :] = 0.0                                        # a third of the weights are zero
    proto = _model([helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
                    helper.make_node("Relu", ["a"], ["y"])], [("x", [1, c, 8, 8])], None, [("w", w)])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, 8, 8)}, 8)["x"]])
    feeds = _samples({"x": (1, c, 8, 8)}, 2)
    gating = TARGETS["rain-sim"]
    d = gating.to_dict()
    d["name"], d["matrix"]["skip_zero_cycles"] = "skipping", True
    skipping = Target.from_dict(d, "test")
    a = simulate(compile_program(int_model, gating), gating, feeds)
    b = simulate(compile_program(int_model, skipping), skipping, feeds)
    la, lb = a.report["layers"][0], b.report["layers"][0]
    assert la["sparsity"]["weight_density"] == pytest.approx(2 / 3, abs=0.01)
    assert la["sparsity"]["macs_nonzero"] < 0.7 * la["macs"]   # zero weights gate the MAC energy on both
    assert la["energy_pj"]["mac"] == pytest.approx(lb["energy_pj"]["mac"])
    assert la["sparsity"]["saved_cycles"] == 0                 # ... but save cycles only where allowed
    assert lb["cycles"]["matrix"] < la["cycles"]["matrix"]
    for name in a.outputs:
        assert np.array_equal(a.outputs[name], b.outputs[name])


@pytest.mark.parametrize("bad, message", [(["3:2"], "0 < N < M"), (["2-4"], "N:M"), ("2:4", "expected a list")])
def test_bad_sparsity_patterns_in_a_target_are_refused(bad, message):
    from qcompile.backend.target import TargetError

    d = load_target("rain-sim").to_dict()
    d["matrix"]["sparsity"] = bad
    with pytest.raises(TargetError, match="matrix.sparsity"):
        Target.from_dict(d, "t.toml")


def test_onnx_light_model_squeezenet_end_to_end():
    """One of the onnx package's light models (seeded random weights): Concat of fire
    modules, global average pool, Softmax on the host; bit-exact and timed."""
    sys.path.insert(0, os.path.dirname(__file__))
    from onnx_models import light_model

    proto, name, shape = light_model("squeezenet")
    rng = np.random.default_rng(0)
    int_model = _integer(proto, [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(2)])
    prog, res = _check(int_model, {name: rng.standard_normal([2] + shape).astype(np.float32)}, "rain-sim")
    kinds = [l["kind"] for l in prog.layers]
    assert kinds.count("conv") == 26 and "move" in kinds
    assert {h["op"] for h in res.report["host_ops"]} <= {"Softmax", "Dequantize", "Quantize", "Flatten", "Reshape"}
    assert res.report["total"]["macs"] > 3e8 and res.report["total"]["cycles"] > 0


def test_report_text_has_shapes_energy_components_and_sparsity_per_layer():
    from qcompile.backend.simulator import format_report

    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:32]]
    int_model = qcompile.PassManager.parse(
        "fold,sparsify{weights=2:4},calibrate{progress=false},quantize{overrides=Gemm:int4},lower-integer"
    ).run(model).model
    target = TARGETS["rain-sim"]
    res = simulate(compile_program(int_model, target), target, {"input": np.load(
        os.path.join(EXAMPLES, "digits_eval.npz"))["input"][:4]})
    text = format_report(res.report)
    head = text.splitlines()[1].split()
    for col in ("input", "output", "prec", "E mac".split()[0], "vec", "sram", "dram", "stat"):
        assert col in head
    conv = next(l for l in text.splitlines() if " /3/Conv " in l and "QConv" in l)
    assert "1x8x8x8" in conv and "1x16x8x8" in conv
    e = res.report["total"]["energy_pj"]
    by = {}
    for l in res.report["layers"]:
        by[l["precision"]] = by.get(l["precision"], 0.0) + l["energy_pj"]["mac"]
    assert f"(a8w8 {by['a8w8'] / 1e3:.2f}, a8w4 {by['a8w4'] / 1e3:.2f})" in text
    assert abs(sum(by.values()) - e["mac"]) < 1e-6 * max(1.0, e["mac"])
    rows = text[text.index("sparsity per layer"):].splitlines()
    conv_row = next(r for r in rows if "/3/Conv" in r).split()
    assert conv_row[2:4] == ["50%", "2:4"]


# -- MATMULs sharing their A operand ---------------------------------------------------------
@pytest.mark.parametrize("engine", ["float32", "int_mm", "direct"])
def test_matmuls_sharing_a_tile_run_as_one_product(monkeypatch, engine):
    """A convolution with more output channels than the array has columns becomes one
    MATMUL per channel tile over the same input tile: the simulator groups them
    (`_SharedA`) and does one wide GEMM. Outputs equal the integer reference, and outputs
    and report (operand-sparsity counts included) equal a run with grouping off."""
    if engine == "int_mm":
        pytest.importorskip("torch")
    from qcompile.backend.simulator import functional

    monkeypatch.setenv("QCOMPILE_GEMM", engine)
    c, m, h, w = 8, 20, 6, 6           # the tiny target: 8 columns, a 1 KiB weight buffer
    wt = (RNG.standard_normal((m, c, 3, 3)) * 0.2).astype(np.float32)
    b = RNG.standard_normal(m).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    proto = _model(nodes, [("x", [1, c, h, w])], None, [("w", wt), ("b", b)])
    int_model = _integer(proto, [{"x": x} for x in _samples({"x": (1, c, h, w)}, 8)["x"]])
    feeds = _samples({"x": (1, c, h, w)}, 5)
    prog, res = _check(int_model, feeds, "tiny")
    groups = prog.__dict__["_rainsim_plan"].groups
    assert len(groups) >= 4 and len({id(g) for g in groups.values()}) < len(groups)
    monkeypatch.setattr(functional._SharedA, "find", staticmethod(lambda steps: {}))
    prog2 = Program.from_bytes(prog.to_bytes())
    res2 = simulate(prog2, TARGETS["tiny"], feeds)
    assert not prog2.__dict__["_rainsim_plan"].groups
    assert np.array_equal(res.raw_outputs["y"], res2.raw_outputs["y"])
    assert res.report == res2.report


def test_shared_a_groups_break_at_writes_to_a_or_to_b():
    """`_SharedA.find` groups two MATMULs over the same A only while nothing writes A's
    bytes between them and each B is, in every run, a LOAD of constants."""
    from qcompile.backend.simulator.functional import ACT, ARENA, CONST, WGT, Machine, _SharedA

    i8, i32 = np.dtype(np.int8), np.dtype(np.int32)
    a_blk = (ACT, i8, 0, (1, 4, 1, 1, 8), (32, 8, 0, 0, 1))
    b_blk = (WGT, i8, 64, (8, 4), (4, 1))

    def load(src, dst):
        return Machine._copy, (src, dst, dst[0] == WGT and src[0] != CONST)

    def matmul(pc):
        return Machine._matmul, (pc, a_blk, None, 4, 8, (WGT, "dense", b_blk), (2, i32, 0, (4, 4), (16, 4)), 0, 0)

    weights = load((CONST, i8, 0, (1, 1, 32), (0, 0, 1)), (WGT, i8, 64, (1, 1, 32), (0, 0, 1)))
    other = load((CONST, i8, 32, (1, 1, 32), (0, 0, 1)), (WGT, i8, 64, (1, 1, 32), (0, 0, 1)))
    into_a = load((ARENA, i8, 0, (1, 1, 8), (0, 0, 1)), (ACT, i8, 8, (1, 1, 8), (0, 0, 1)))
    beside_a = load((ARENA, i8, 0, (1, 1, 8), (0, 0, 1)), (ACT, i8, 40, (1, 1, 8), (0, 0, 1)))
    from_arena = load((ARENA, i8, 0, (1, 1, 32), (0, 0, 1)), (WGT, i8, 64, (1, 1, 32), (0, 0, 1)))

    def find(*steps):
        g = _SharedA.find(list(steps))
        return sorted((pc, tuple(x.members), [s[0] for s in x.sources]) for pc, x in g.items())

    assert find(weights, matmul(1), other, beside_a, matmul(4)) == [(1, (1, 4), [0, 32]), (4, (1, 4), [0, 32])]
    assert find(weights, matmul(1), other, into_a, matmul(4)) == []        # A rewritten in between
    assert find(weights, matmul(1), from_arena, matmul(3)) == []           # B per inference
    assert find(from_arena, matmul(1), weights, matmul(3)) == []           # the first B per inference


def test_samples_run_in_chunks_with_the_same_outputs_and_report(monkeypatch):
    """`simulate` runs the samples in chunks that fit `CHUNK_BYTES` (equal sizes: 5 samples
    at 2 a chunk go as 2, 2, 1): outputs, operand-sparsity counts and the whole report
    equal one run of all samples at once."""
    from qcompile.backend import simulator

    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:16]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    target = TARGETS["tiny"]
    prog = compile_program(int_model, target)
    feeds = {"input": np.load(os.path.join(EXAMPLES, "digits_eval.npz"))["input"][:5]}
    whole = simulate(prog, target, feeds)
    per_sample = prog.arena_size + target.sram["activation"].size_bytes + target.sram["accumulator"].size_bytes
    monkeypatch.setattr(simulator, "CHUNK_BYTES", 2 * per_sample)
    assert simulator.chunk_size(prog, target, 5) == 2 and simulator.chunk_size(prog, target, 4) == 2
    assert simulator.chunk_size(prog, target, 1) == 1
    calls = []
    real = simulator.Machine
    monkeypatch.setattr(simulator, "Machine", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    chunked = simulate(prog, target, feeds)
    assert calls == [2, 2, 1]
    assert np.array_equal(whole.outputs["logits"], chunked.outputs["logits"])
    assert whole.report == chunked.report and whole.report["total"]["energy_pj"]["total"] > 0


def test_direct_kernel_runs_small_matmuls_with_the_engines_results(monkeypatch):
    """MATMULs with constant weights that the direct kernel takes (forced, and as chosen
    by size: digits' convolutions and classifier) give the integer reference's outputs
    and the same report, operand-sparsity counts included, as the float32 engine."""
    from qcompile.backend.simulator import functional

    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:16]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    feeds = {"input": np.load(os.path.join(EXAMPLES, "digits_eval.npz"))["input"][:7]}
    monkeypatch.setenv("QCOMPILE_GEMM", "float32")
    _, engine = _check(int_model, feeds, "rain-sim")
    monkeypatch.setenv("QCOMPILE_GEMM", "direct")
    prog, direct = _check(int_model, feeds, "rain-sim")
    taken = [v[1] for k, v in prog.__dict__["_rainsim_plan"].cache.items() if k[0] == "direct"]
    assert len(taken) == 3 and all(t is not None for t in taken)
    assert np.array_equal(engine.raw_outputs["logits"], direct.raw_outputs["logits"])
    assert engine.report == direct.report
    assert functional._direct_pays(None, "off", 1, 1, 1) is False
    assert functional._direct_pays(None, "on", 10 ** 6, 4096, 4096) is True
    assert functional._direct_weights(np.array([[-128, 127]], np.int8), 200) is None   # -128 - 200 < -255


@pytest.mark.parametrize("engine", ["float32", "int_mm", "direct"])
def test_bias_loads_fold_into_the_next_matmul(monkeypatch, engine):
    """A LOAD that fills an accumulator tile with the bias row, followed by the MATMUL on
    that tile, becomes one step: the MATMUL starts its sums from the row. Outputs equal
    the integer reference and, with the report, a run without folding; a tile that
    something reads in between is not folded."""
    if engine == "int_mm":
        pytest.importorskip("torch")
    from qcompile.backend.simulator import functional
    from qcompile.backend.simulator.functional import ACC, CONST, Machine, _fold_bias_loads

    monkeypatch.setenv("QCOMPILE_GEMM", engine)
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:16]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    feeds = {"input": np.load(os.path.join(EXAMPLES, "digits_eval.npz"))["input"][:6]}
    prog, res = _check(int_model, feeds, "tiny")
    plan = prog.__dict__["_rainsim_plan"]
    assert len(plan.biases) >= 10 and sum(fn is Machine._folded for fn, _ in plan.steps) == len(plan.biases)
    monkeypatch.setattr(functional, "_fold_bias_loads", lambda steps, const, reach=64: {})
    prog2 = Program.from_bytes(prog.to_bytes())
    res2 = simulate(prog2, TARGETS["tiny"], feeds)
    assert not prog2.__dict__["_rainsim_plan"].biases
    assert np.array_equal(res.raw_outputs["logits"], res2.raw_outputs["logits"]) and res.report == res2.report

    i8, i32, u8 = np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.uint8)
    const = np.arange(64, dtype=np.int32).view(np.uint8)            # the bias row: 0, 1, 2, 3
    load_bias = (Machine._copy_rows, ((CONST, u8, 0, (1, 4, 16), (0, 0, 1)), (ACC, u8, 0, (1, 4, 16), (0, 16, 1)),
                                      False))
    matmul = (Machine._matmul, (9, (0, i8, 0, (1, 4, 1, 1, 8), (32, 8, 0, 0, 1)), None, 4, 8, None,
                                (ACC, i32, 0, (4, 4), (16, 4)), 0, 0))
    reads_acc = (Machine._vreq, (5, (ACC, i32, 0, (4, 4), (16, 4)), (0, i8, 64, (4, 4), (4, 1)), None, 0, 1, 1, 0,
                                 0, -128, 127))
    steps = [load_bias, matmul]
    assert list(_fold_bias_loads(steps, const)[9]) == [0, 1, 2, 3] and steps[0][0] is Machine._folded
    steps = [load_bias, reads_acc, matmul]
    assert _fold_bias_loads(steps, const) == {} and steps[0] is load_bias
