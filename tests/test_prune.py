"""The prune pass (passes/prune): structure on a small hand-built graph (channels removed
in step through BatchNormalization, Relu, a residual Add, pooling, Concat and a
depthwise Conv), numerics in onnxruntime, exact unstructured sparsity, the sensitivity
allocation, torch-exported ResNet/MobileNet-style models, the digits example, errors, and
the pruned model through calibrate, quantize and lower-integer."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompile
import qcompile.passes  # noqa: F401  (registers the passes)
from qcompile.errors import PassFailedError
from qcompile.onnx_io import from_proto, to_proto
from qcompile.passes.prune.allocate import Unit, allocate

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


def block_graph(zero=False):
    """x[2,4,8,8] -> a: Conv 4->8 -> BN -> Relu = r;  b: Conv(r) 8->8;  Add(b, r) -> Relu
    -> MaxPool = p;  c: Conv(r) 8->4 -> depthwise Conv 4 = q;  Concat(p, q) [12]
    -> d: Conv 12->6 -> GlobalAveragePool -> Flatten -> Gemm 6->3.
    With `zero`, channels 0 and 1 of a/b, channel 0 of c and channels 0, 1 of d are exactly
    zero (weights, bias, the depthwise filter, and BN maps 0 to 0), so removing them
    changes nothing."""
    rng = np.random.default_rng(0)
    w = {"wa": rng.normal(size=(8, 4, 3, 3)), "ba": rng.normal(size=8) * 0.1,
         "wb": rng.normal(size=(8, 8, 3, 3)), "bb": rng.normal(size=8) * 0.1,
         "wc": rng.normal(size=(4, 8, 1, 1)), "bc": rng.normal(size=4) * 0.1,
         "wdw": rng.normal(size=(4, 1, 3, 3)), "bdw": rng.normal(size=4) * 0.1,
         "wd": rng.normal(size=(6, 12, 1, 1)), "bd": rng.normal(size=6) * 0.1,
         "wf": rng.normal(size=(3, 6)), "bf": rng.normal(size=3),
         "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.normal(size=8) * 0.1,
         "mean": rng.normal(size=8) * 0.1, "var": rng.uniform(0.5, 1.5, 8)}
    # filters grow with their index (distinct norms), scaled so outputs are O(1)
    w = {k: v * 0.3 * (1.0 + 0.5 * np.arange(v.shape[0]).reshape((-1,) + (1,) * (v.ndim - 1)) / v.shape[0])
         if k.startswith("w") and k != "wf" else v for k, v in w.items()}
    if zero:
        for k in ("wa", "ba", "wb", "bb", "beta", "mean", "wd", "bd"):
            w[k][:2] = 0
        for k in ("wc", "bc", "wdw", "bdw"):
            w[k][:1] = 0
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["a_bn"], name="bn"),
        helper.make_node("Relu", ["a_bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "r"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["s_r"], name="relu2"),
        helper.make_node("MaxPool", ["s_r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["r", "wc", "bc"], ["c"], name="conv_c", strides=[2, 2]),
        helper.make_node("Conv", ["c", "wdw", "bdw"], ["q"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["p", "q"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wd", "bd"], ["d"], name="conv_d"),
        helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [2, 3])],
                              [init(k, v) for k, v in w.items()])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def feeds(seed=1):
    return {"x": np.random.default_rng(seed).normal(size=(2, 4, 8, 8)).astype(np.float32)}


def weight(model, node_name, index=1):
    node = next(n for n in model.graph.nodes if n.name == node_name)
    return node.inputs[index].const_value


# -- structured: structure -------------------------------------------------------------
def test_structured_removes_channels_in_step_through_bn_add_pool_concat():
    model = block_graph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("prune{mode=structured,sparsity=0.5}", model)
    assert result.modified
    m = result.model
    wa, wb, wc, wdw, wd = (weight(m, n) for n in ("conv_a", "conv_b", "conv_c", "dw", "conv_d"))
    assert wa.shape[0] == wb.shape[0] == 4  # a and b tied by the residual Add: pruned in step
    assert wb.shape[1] == 4  # b reads r: its input channels go too
    assert wc.shape == (2, 4, 1, 1)  # c's filters halved, its input channels follow a
    assert wdw.shape == (2, 1, 3, 3) and next(n for n in m.graph.nodes if n.name == "dw").attr("group") == 2
    assert weight(m, "dw", 2).shape == (2,)
    assert wd.shape == (3, 6, 1, 1)  # concat: 4 (from a/b) + 2 (from c) input channels; d halved
    assert weight(m, "fc").shape == (3, 3)  # the Gemm reads d's 3 channels through GAP/Flatten
    for i in range(1, 5):
        assert weight(m, "bn", i).shape == (4,)
    assert any("'fc' (Gemm) skipped" in str(w.message) and "graph output %y" in str(w.message) for w in caught)
    (y,) = outputs(m, feeds())
    assert y.shape == (2, 3)
    rec = json.loads(m.metadata_props["qcompile.sparsity"])
    chans = {e["node"]: (e["channels_before"], e["channels"]) for e in rec["weights"].values()}
    assert chans == {"conv_a": (8, 4), "conv_b": (8, 4), "conv_c": (4, 2), "conv_d": (6, 3)}


def test_structured_keeps_the_same_channels_on_both_branches():
    """Structured pruning equals the unpruned model with the removed channels' consumer
    weights zeroed (exact removal), and the kept channels of a and b are the same."""
    model = block_graph(zero=True)
    before = outputs(model, feeds())[0]
    m = run("prune{mode=structured,sparsity=0.25}", model).model
    after = outputs(m, feeds())[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    assert weight(m, "conv_a").shape[0] == 6 and weight(m, "conv_c").shape[0] == 3
    assert weight(m, "conv_d").shape[:2] == (4, 9)


def test_zero_sparsity_changes_nothing():
    for mode in ("unstructured", "structured"):
        model = block_graph()
        before = outputs(model, feeds())[0]
        result = run(f"prune{{mode={mode},sparsity=0.0}}", model)
        assert not result.modified
        np.testing.assert_array_equal(outputs(result.model, feeds())[0], before)


def test_transpose_stops_a_layer_with_a_warning_naming_it():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 1, 3, 2]),
             helper.make_node("Conv", ["t", "w2"], ["b"], name="conv2"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [init("w1", rng.normal(size=(8, 3, 1, 1))), init("w2", rng.normal(size=(8, 8, 1, 1))),
                               init("w3", rng.normal(size=(2, 8, 1, 1)))])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.warns(UserWarning, match=r"layer 'conv1' \(Conv\) skipped: its output channels reach 'tr' "
                                         r"\(Transpose\)"):
        m = run("prune{mode=structured,sparsity=0.5}", model).model
    assert weight(m, "conv1").shape == (8, 3, 1, 1)
    assert weight(m, "conv2").shape == (4, 8, 1, 1) and weight(m, "conv3").shape == (2, 4, 1, 1)
    (y,) = outputs(m, {"x": np.ones((1, 3, 6, 6), np.float32)})
    assert y.shape == (1, 2, 6, 6)


# -- unstructured -----------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_sparsity_is_exact(scope):
    model = block_graph()
    sizes = {n.name: n.inputs[1].const_value.size for n in model.graph.nodes if n.op_type in ("Conv", "Gemm")}
    m = run(f"prune{{sparsity=0.3,scope={scope}}}", model).model
    zeros = {n: int((weight(m, n) == 0).sum()) for n in sizes}
    if scope == "layer":
        assert zeros == {n: round(0.3 * s) for n, s in sizes.items()}
    else:
        assert sum(zeros.values()) == round(0.3 * sum(sizes.values()))
    masks = m.annotations["sparsity_masks"]
    for n in sizes:
        node = next(x for x in m.graph.nodes if x.name == n)
        np.testing.assert_array_equal(masks[node.inputs[1].name], node.inputs[1].const_value != 0)
    assert outputs(m, feeds())[0].shape == (2, 3)


def test_overrides_and_exclude():
    model = block_graph()
    m = run("prune{sparsity=0.5,overrides=conv_a:0.25;Gemm:0,exclude=conv_d}", model).model
    assert (weight(m, "conv_a") == 0).sum() == round(0.25 * 288)
    assert (weight(m, "fc") == 0).sum() == 0 and (weight(m, "conv_d") == 0).sum() == 0
    assert (weight(m, "conv_b") == 0).sum() == 288


def test_allocate_prefers_insensitive_units_and_meets_the_target():
    units = [Unit("hard", 100, [0.0, 1.0, 2.0, 3.0]), Unit("easy", 100, [0.0, 0.01, 0.02, 5.0])]
    ratios = allocate(units, [0.25, 0.5, 0.75], 60)
    assert ratios["easy"] == 0.5 and ratios["hard"] == pytest.approx(0.1)
    assert ratios["easy"] * 100 + ratios["hard"] * 100 == pytest.approx(60)


def digits_accuracy(model):
    data = np.load(EVAL)
    x = data["input"].reshape((-1, 1, 8, 8))
    (logits,) = outputs(model, {"input": x})
    return float((logits.argmax(1) == data["label"]).mean())


def digits(pipeline):
    return run(pipeline, qcompile.load(DIGITS)).model


@pytest.fixture(scope="module")
def digits_float():
    return digits_accuracy(digits("fold"))


def test_digits_unstructured_50_percent(digits_float):
    m = digits("fold,prune{sparsity=0.5,scope=global}")
    acc = digits_accuracy(m)
    print(f"digits: float {digits_float:.3f}, 50% unstructured (global) {acc:.3f}")
    assert acc >= digits_float - 0.03


def test_digits_sensitivity_meets_the_global_target_with_less_error(digits_float):
    pipeline = f"fold,prune{{sparsity=0.7,sensitivity=true,data={CALIB}}}"
    result = qcompile.PassManager.parse(pipeline)
    m = result.run(qcompile.load(DIGITS)).model
    stats = result.passes[1].stats
    layer = digits("fold,prune{sparsity=0.7}")
    nodes = [n for n in m.graph.nodes if n.op_type in ("Conv", "Gemm")]
    total = sum(n.inputs[1].const_value.size for n in nodes)
    zeros = sum(int((n.inputs[1].const_value == 0).sum()) for n in nodes)
    assert zeros == round(0.7 * total)
    assert stats["sensitivity: units measured"] == 3
    acc, acc_layer = digits_accuracy(m), digits_accuracy(layer)
    print(f"digits 70% unstructured: sensitivity {acc:.3f}, uniform per layer {acc_layer:.3f}")
    assert acc > acc_layer and acc >= digits_float - 0.15


def test_digits_structured_with_sensitivity_runs_smaller(digits_float):
    m = digits(f"fold,prune{{mode=structured,sparsity=0.25,sensitivity=true,data={CALIB}}}")
    params = sum(v.const_value.size for v in m.graph.initializers.values())
    base = sum(v.const_value.size for v in digits("fold").graph.initializers.values())
    acc = digits_accuracy(m)
    print(f"digits 25% structured (sensitivity): {base} -> {params} parameters, accuracy {acc:.3f}")
    assert params < base and acc >= digits_float - 0.2


def test_pruned_digits_goes_through_quantize_and_lower_integer(digits_float):
    pipeline = (f"fold,prune{{sparsity=0.5,scope=global}},calibrate{{data={CALIB},progress=false}},"
                "quantize{search_samples=0}")
    m = digits(pipeline)
    zero_w = 0
    for n in m.graph.nodes:
        if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer and n.inputs[0].const_value.ndim >= 2:
            zero_w += int((n.inputs[0].const_value == 0).sum())
    assert zero_w >= round(0.5 * (72 + 1152 + 2560))  # the pruned zeros survive as integer zeros
    assert digits_accuracy(m) >= digits_float - 0.05
    lowered = run("lower-integer", m).model
    assert any(n.op_type == "QConv" for n in lowered.graph.nodes)
    structured = digits(f"fold,prune{{mode=structured,sparsity=0.25}},calibrate{{data={CALIB},progress=false}},"
                        "quantize{search_samples=0},lower-integer")
    assert any(n.op_type == "QConv" for n in structured.graph.nodes)


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ("sparsity=1.0", r"prune: option sparsity must be in \[0, 1\), got 1"),
    ("sparsity=-0.1", r"prune: option sparsity must be in \[0, 1\)"),
    ("overrides=conv_a", r"overrides: 'conv_a' is not PATTERN:SPARSITY"),
    ("overrides=conv_a:1.5", r"overrides \(conv_a:1.5\) must be in \[0, 1\)"),
    ("exclude=(", r"option exclude: '\(' is not a valid regular expression"),
    ("sensitivity=true", r"prune: sensitivity=true needs calibration data: give the pass option data=PATH"),
    ("levels=0.5;1.0", r"levels: each level must be in \(0, 1\)"),
])
def test_bad_options_are_errors_and_change_nothing(options, message):
    model = block_graph()
    before = {k: v.const_value.copy() for k, v in model.graph.initializers.items()}
    with pytest.raises(PassFailedError, match=message):
        run(f"prune{{{options}}}", model)
    assert set(model.graph.initializers) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(model.graph.initializers[k].const_value, v)


# -- torch-exported models ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_torch_models_structured(name):
    pytest.importorskip("torch")
    from torch_models import BUILDERS

    module, args = BUILDERS[name]()
    model = run("fold", qcompile.from_torch(module, args)).model
    feed = {model.graph.inputs[0].name: args[0].numpy()}
    (ref,) = outputs(model, feed)
    base = sum(v.const_value.size for v in model.graph.initializers.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = run(f"prune{{mode=structured,sparsity=0.5,sensitivity=true,data={_npz(model, args)}}}", model).model
    (got,) = outputs(m, feed)
    params = sum(v.const_value.size for v in m.graph.initializers.values())
    assert got.shape == ref.shape and params < base
    qcompile.check(m)
    if name == "resnet":  # the stem and block1.conv2 meet in a residual Add: the same channels go
        convs = {n.name: n.inputs[1].const_value.shape for n in m.graph.nodes if n.op_type == "Conv"}
        assert convs["/stem/stem.0/Conv"][0] == convs["/block1/conv2/Conv"][0]
        assert convs["/block2/conv2/Conv"][0] == convs["/block2/down/down.0/Conv"][0]
    unstructured = run("prune{sparsity=0.5,scope=global}", run("fold", qcompile.from_torch(module, args)).model).model
    assert outputs(unstructured, feed)[0].shape == ref.shape




def _npz(model, args):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "calib.npz")
    x = np.random.default_rng(0).normal(size=(4,) + tuple(args[0].shape)).astype(np.float32)
    np.savez(path, **{model.graph.inputs[0].name: x})
    return path
