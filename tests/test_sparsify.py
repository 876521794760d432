"""The sparsify pass (passes/prune/sparsify.py): N:M patterns hold in every group, block
sparsity zeroes whole blocks to the target, activation thresholds reach their zero
fraction, the metadata record, the digits example (accuracy, quantize, lower-integer),
a torch-exported ResNet, and errors."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompile
import qcompile.passes  # noqa: F401  (registers the passes)
from qcompile.errors import PassFailedError
from qcompile.onnx_io import from_proto, to_proto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "examples", "digits_cnn.onnx")
CALIB = os.path.join(ROOT, "examples", "digits_calib.npz")
EVAL = os.path.join(ROOT, "examples", "digits_eval.npz")
F = TensorProto.FLOAT


def run(pipeline, model):
    return qcompile.PassManager.parse(pipeline).run(model)


def outputs(model, feeds):
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def init(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def layers_graph():
    """x[2,3,6,6] -> Conv 3->16 (K=3: no N:M) -> Conv 16->8 -> Flatten -> Gemm(transB=1)
    288->16 -> MatMul 16->8 -> Gemm(transB=0) 8->4."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_first", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["b"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3"], ["g"], name="gemm_t", transB=1),
             helper.make_node("MatMul", ["g", "w4"], ["h"], name="matmul"),
             helper.make_node("Gemm", ["h", "w5"], ["y"], name="gemm")]
    shapes = {"w1": (16, 3, 3, 3), "w2": (8, 16, 3, 3), "w3": (16, 288), "w4": (16, 8), "w5": (8, 4)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", F, [2, 4])],
                              [init(k, rng.normal(size=s)) for k, s in shapes.items()])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def weights(model):
    return {n.name: n.inputs[1].const_value for n in model.graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")}


K_AXIS = {"conv": 1, "gemm_t": 1, "matmul": 0, "gemm": 0}


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group(n, m):
    model = layers_graph()
    before = weights(model)
    with pytest.warns(UserWarning, match=rf"layer 'conv_first' \(Conv\) skipped: its K axis \(3\) is not a "
                                         rf"multiple of M={m}"):
        result = run(f"sparsify{{weights={n}:{m}}}", model)
    after = weights(result.model)
    assert result.modified
    np.testing.assert_array_equal(after["conv_first"], before["conv_first"])
    rec = json.loads(result.model.metadata_props["qcompile.sparsity"])["weights"]
    by_node = {e["node"]: e for e in rec.values()}
    for name, axis in K_AXIS.items():
        w, orig = np.moveaxis(after[name], axis, -1), np.moveaxis(before[name], axis, -1)
        groups = w.reshape(-1, m)
        assert ((groups != 0).sum(1) == n).all(), name  # exactly N non-zeros in every group of M
        o = np.abs(orig.reshape(-1, m))
        kept_min = np.where(groups != 0, o, np.inf).min(1)
        dropped_max = np.where(groups == 0, o, -np.inf).max(1)
        assert (kept_min >= dropped_max).all(), name  # the N largest magnitudes are the ones kept
        entry = {k: by_node[name][k] for k in ("pattern", "n", "m", "axis", "density")}
        assert entry == {"pattern": "n:m", "n": n, "m": m, "axis": axis, "density": n / m}
    (y,) = outputs(result.model, {"x": np.ones((2, 3, 6, 6), np.float32)})
    assert y.shape == (2, 4)


@pytest.mark.parametrize("block", ["1x4", "4x4"])
def test_block_sparsity_zeroes_whole_blocks_to_the_target(block):
    r, c = map(int, block.split("x"))
    model = layers_graph()
    with pytest.warns(UserWarning, match="'conv_first' .*not tiled"):
        m = run(f"sparsify{{weights={block},sparsity=0.5,exclude=^gemm$}}", model).model
    after = weights(m)
    for name in ("conv", "gemm_t", "matmul"):
        w = after[name]
        w2 = (w.reshape(w.shape[0], -1) if name != "matmul" else w.T)
        blocks = w2.reshape(w2.shape[0] // r, r, w2.shape[1] // c, c)
        nonzero = (blocks != 0).any(axis=(1, 3))
        full = (blocks != 0).all(axis=(1, 3))
        np.testing.assert_array_equal(nonzero, full)  # a block is all kept or all zero
        assert (~nonzero).sum() == round(0.5 * nonzero.size), name
    assert (after["gemm"] != 0).all()  # excluded
    rec = json.loads(m.metadata_props["qcompile.sparsity"])["weights"]
    assert {e["node"]: e["block"] for e in rec.values()} == {"conv": [r, c], "gemm_t": [r, c], "matmul": [r, c]}


def digits_accuracy(model):
    data = np.load(EVAL)
    (logits,) = outputs(model, {"input": data["input"].reshape((-1, 1, 8, 8))})
    return float((logits.argmax(1) == data["label"]).mean())


def digits(pipeline):
    return run(pipeline, qcompile.load(DIGITS)).model


@pytest.fixture(scope="module")
def digits_float():
    return digits_accuracy(digits("fold"))


def test_digits_2_4_accuracy_and_through_quantize_and_lower_integer(digits_float):
    with pytest.warns(UserWarning, match="'/0/Conv'"):
        sparse = digits("fold,sparsify{weights=2:4}")
    acc = digits_accuracy(sparse)
    print(f"digits: float {digits_float:.3f}, 2:4 {acc:.3f}")
    assert acc >= digits_float - 0.05
    with pytest.warns(UserWarning, match="'/0/Conv'"):
        q = digits(f"fold,sparsify{{weights=2:4}},calibrate{{data={CALIB},progress=false}},"
                   "quantize{search_samples=0}")
    for n in q.graph.nodes:  # the 2:4 pattern survives as integer zeros
        w = n.inputs[0].const_value if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer else None
        if w is not None and w.ndim >= 2 and w.shape[1] % 4 == 0:
            groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
            assert ((groups != 0).sum(1) <= 2).all()
    assert digits_accuracy(q) >= digits_float - 0.06
    lowered = run("lower-integer", q).model
    assert sum(n.op_type in ("QConv", "QGemm") for n in lowered.graph.nodes) == 3


def test_digits_activation_thresholds_reach_their_target(digits_float):
    m = digits(f"fold,sparsify{{weights=none,activations=0.7,data={CALIB}}}")
    rec = json.loads(m.metadata_props["qcompile.sparsity"])
    acts = rec["activations"]
    assert rec["weights"] == {}
    thresholded = {k: e for k, e in acts.items() if "threshold" in e}
    assert {e["source"] for e in thresholded.values()} == {"/2/Relu_output_0", "/7/Flatten_output_0"}
    for e in thresholded.values():
        assert e["target"] == 0.7 and e["threshold"] > 0
        assert 0.68 <= e["zero_fraction"] <= 0.75, e
        assert e["natural_zero_fraction"] < 0.7
    assert 0.3 < acts["/5/Relu_output_0"]["natural_zero_fraction"] < 0.8  # natural zeros after ReLU, measured
    assert [n.op_type for n in m.graph.nodes].count("ThresholdedRelu") == 2
    acc = digits_accuracy(m)
    print(f"digits: 70% activation zeros {acc:.3f}")
    assert acc >= digits_float - 0.1
    q = run(f"calibrate{{data={CALIB},progress=false}},quantize{{search_samples=0}},lower-integer", m).model
    assert any(n.op_type == "QConv" for n in q.graph.nodes)
    _thresholds_run_as_tables(q, {"input": np.load(EVAL)["input"][:6]}, 2)


def _thresholds_run_as_tables(int_model, feeds, count):
    """On rain-sim the thresholds are lookup tables of the vector unit (not HOST ops), and
    the simulator's outputs equal the integer reference's."""
    from qcompile.backend.lowering import compile_program
    from qcompile.backend.reference import run_integer_graph
    from qcompile.backend.simulator import simulate
    from qcompile.backend.target import load_target

    target = load_target("rain-sim")
    prog = compile_program(int_model, target)
    tables = [l for l in prog.layers if l["op"].startswith("LUT:")]
    assert len(tables) == count and all(l["unit"] == "vector" for l in tables), prog.layers
    assert not {h.op_type for h in prog.host_ops} & {"ThresholdedRelu", "Where", "Less", "Abs"}
    res = simulate(prog, target, feeds)
    n = next(iter(feeds.values())).shape[0]
    for i in range(n):
        for name, want in run_integer_graph(int_model, {k: v[i] for k, v in feeds.items()}).items():
            assert np.array_equal(res.outputs[name][i], want)


def test_signed_activation_gets_a_where_threshold():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [init("w1", rng.normal(size=(8, 4, 1, 1))), init("w2", rng.normal(size=(4, 8, 1, 1)))])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = [{"x": rng.normal(size=(1, 4, 5, 5)).astype(np.float32)} for _ in range(8)]
    model.annotations["calibration_data"] = feeds
    m = run("sparsify{weights=none,activations=0.5}", model).model
    assert [n.op_type for n in m.graph.nodes] == ["Conv", "Abs", "Less", "Where", "Conv"]
    (e,) = [e for e in json.loads(m.metadata_props["qcompile.sparsity"])["activations"].values() if "threshold" in e]
    assert e["source"] == "a" and abs(e["zero_fraction"] - 0.5) < 0.02
    q = run("calibrate{progress=false},quantize{search_samples=0},lower-integer", m).model
    _thresholds_run_as_tables(q, {"x": rng.normal(size=(3, 1, 4, 5, 5)).astype(np.float32)}, 1)


@pytest.mark.parametrize("options, message", [
    ("weights=4:4", r"N:M needs 1 <= N < M \(N kept of every M\), got 4:4"),
    ("weights=0:4", r"got 0:4"),
    ("weights=2x", r"'2x' is not a pattern: use N:M"),
    ("weights=1x4,sparsity=1.0", r"sparsify: option sparsity must be in \[0, 1\), got 1"),
    ("activations=1.5", r"option activations must be in \[0, 1\)"),
    ("activations=0.5", r"sparsify: activations=0.5 needs calibration data: give the pass option data=PATH"),
    ("overrides=gemm", r"overrides: 'gemm' is not PATTERN:TYPE"),
])
def test_bad_options_are_errors_and_change_nothing(options, message):
    model = layers_graph()
    before = {k: v.const_value.copy() for k, v in model.graph.initializers.items()}
    with pytest.raises(PassFailedError, match=message):
        run(f"sparsify{{{options}}}", model)
    assert set(model.graph.initializers) == set(before) and len(model.graph) == 6
    assert "qcompile.sparsity" not in model.metadata_props


def test_overrides_pick_patterns_per_layer():
    model = layers_graph()
    m = run("sparsify{weights=2:4,overrides=conv_first:none;^gemm$:1x4;matmul:1:4}", model).model
    rec = {e["node"]: e for e in json.loads(m.metadata_props["qcompile.sparsity"])["weights"].values()}
    assert set(rec) == {"conv", "gemm_t", "matmul", "gemm"}
    assert rec["matmul"]["n"] == 1 and rec["gemm"]["pattern"] == "block" and rec["conv"]["n"] == 2


def test_prune_then_sparsify_merge_their_records():
    model = layers_graph()
    m = run("prune{sparsity=0.3,exclude=conv$},sparsify{weights=2:4,exclude=conv_first|gemm}", model).model
    rec = {e["node"]: e["pattern"] for e in json.loads(m.metadata_props["qcompile.sparsity"])["weights"].values()}
    assert rec["conv"] == "n:m" and rec["conv_first"] == "unstructured" and rec["gemm"] == "unstructured"


def test_torch_resnet_2_4_runs():
    pytest.importorskip("torch")
    from torch_models import BUILDERS

    module, args = BUILDERS["resnet"]()
    model = run("fold", qcompile.from_torch(module, args)).model
    feed = {model.graph.inputs[0].name: args[0].numpy()}
    (ref,) = outputs(model, feed)
    with pytest.warns(UserWarning, match="stem"):
        m = run("sparsify{weights=2:4}", model).model
    (got,) = outputs(m, feed)
    assert got.shape == ref.shape
    rec = json.loads(m.metadata_props["qcompile.sparsity"])["weights"]
    assert len(rec) == 6 and all(e["density"] == 0.5 for e in rec.values())
