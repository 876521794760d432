"""The `fold` pass and its components (constant folding, CSE, no-op and BatchNorm-into-
Gemm/MatMul rules): structure on tiny graphs, then numerics against onnxruntime on the
onnx package's light models and on torch-exported models."""
import collections
import glob
import io
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
import qcompile.passes.fold  # noqa: F401  (registers the pass)
from qcompile.onnx_io import from_proto, to_proto
from qcompile.passes.constant_folding import fold_constants
from qcompile.passes.cse import eliminate_common_subexpressions
from qcompile.passes.fold import Fold
from qcompile.passes.rules import BN_MATMUL, FOLD, NOOP
from qcompile.passmanager import PassManager, get_pass
from qcompile.rewrite import apply_rules

from onnx_models import F, build, light_as_constants, light_random_weights, run_ort


def random_feeds(proto, seed=0):
    """Seeded standard-normal data for every input that is not an initializer."""
    rng = np.random.default_rng(seed)
    constants = {t.name for t in proto.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in proto.graph.input if i.name not in constants}


def check_numbers(before, model, feeds=None):
    """Same outputs under the same names before and after, within 1e-5 relative.
    atol: folding reorders float32 arithmetic (BatchNorm's scale moves into the weights,
    so products are rounded at a different point), which perturbs results by a few ulps
    of the *largest* terms summed; near-zero elements then differ by ~1e-7 * scale
    where scale is the output's magnitude. 1e-6 * max|output| covers that and is still
    1000x below any real error."""
    qcompile.check(model)
    feeds = random_feeds(before) if feeds is None else feeds
    want, got = run_ort(before, feeds), run_ort(to_proto(model), feeds)
    assert list(got) == list(want)
    for name, expected in want.items():
        atol = 1e-6 * max(1e-3, float(np.abs(expected).max()))
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=atol)


def ops(graph):
    return [n.op_type for n in graph.nodes]


def fold(proto, **options):
    model = from_proto(proto)
    p = Fold(**options)
    result = p(model)
    return model, p.stats, result.modified


# -- constant folding -------------------------------------------------------------------
def test_constant_chain_folds_and_output_keeps_its_name():
    proto = build([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([1, 2, 3]))),
                   helper.make_node("Mul", ["c", "w"], ["cw"]),
                   helper.make_node("Sqrt", ["cw"], ["s"]),
                   helper.make_node("Add", ["x", "s"], ["y"])],
                  {"x": [3]}, {"y": [3]}, {"w": np.float32([4, 8, 3])})
    model, stats, modified = fold(proto)
    assert modified and ops(model.graph) == ["Add"]
    assert stats["constant-folding: nodes folded"] == 3 and stats["constant-folding: values folded"] == 1
    assert [o.name for o in model.graph.outputs] == ["y"]
    (s,) = [v for v in model.graph.nodes[0].inputs if v.name != "x"]
    np.testing.assert_allclose(s.const_value, np.sqrt([4, 16, 9]))
    assert list(model.graph.initializers) == [s.name]  # w is gone: unused initializer
    check_numbers(proto, model)


def test_left_alone_random_graph_input_initializer_and_constant_output():
    """Random ops, an initializer that is also a graph input (overridable), and a node
    computing a graph output stay."""
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[3], seed=1.0),
             helper.make_node("Add", ["x", "r"], ["y"]),
             helper.make_node("Neg", ["g"], ["n"]),
             helper.make_node("Mul", ["x", "n"], ["z"]),
             helper.make_node("Abs", ["k"], ["out2"])]
    proto = build(nodes, {"x": [3], "g": [3]}, {"y": [3], "z": [3], "out2": [3]},
                  {"g": np.float32([1, 2, 3]), "k": np.float32([-1, 2, -3])})
    model, stats, _ = fold(proto)
    assert sorted(ops(model.graph)) == ["Abs", "Add", "Mul", "Neg", "RandomNormal"]
    assert "constant-folding: nodes folded" not in stats


def test_shape_of_a_static_value_folds():
    proto = build([helper.make_node("Shape", ["x"], ["s"], start=1),
                   helper.make_node("Concat", ["one", "s"], ["s2"], axis=0),
                   helper.make_node("Reshape", ["x", "s2"], ["r"]),
                   helper.make_node("Relu", ["r"], ["y"])],
                  {"x": [2, 3, 4]}, {"y": [2, 3, 4]}, {"one": np.int64([2])})
    model, stats, _ = fold(proto)
    assert stats["constant-folding: shapes folded"] == 1
    assert ops(model.graph) == ["Relu"]  # Reshape to its own shape went too
    check_numbers(proto, model)


def test_fold_limit_keeps_large_constants_symbolic():
    proto = build([helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                    value=numpy_helper.from_array(np.float32([0.5]))),
                   helper.make_node("Add", ["x", "big"], ["y"])],
                  {"x": [64, 64]}, {"y": [64, 64]}, {"shape": np.int64([64, 64])})
    model, stats, _ = fold(proto, fold_limit_bytes=1024)
    assert ops(model.graph) == ["ConstantOfShape", "Add"]
    model, stats, _ = fold(proto)
    assert ops(model.graph) == ["Add"]
    check_numbers(proto, model)


def test_folding_is_one_onnxruntime_session_per_sweep(monkeypatch):
    sessions = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    nodes = [helper.make_node("Neg", ["w"], ["a"]), helper.make_node("Exp", ["w"], ["b"]),
             helper.make_node("Add", ["x", "a"], ["p"]), helper.make_node("Mul", ["p", "b"], ["y"])]
    model = from_proto(build(nodes, {"x": [2]}, {"y": [2]}, {"w": np.float32([1, 2])}))
    qcompile.analysis.infer_shapes(model)
    result = fold_constants(model)
    assert len(sessions) == 1 and result.values_folded == 2 and result.nodes_folded == 2


# -- CSE ---------------------------------------------------------------------------------
def test_cse_merges_duplicates_with_equal_attributes_only():
    t = numpy_helper.from_array(np.float32([1.5]))
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["x"], ["t2"], perm=[1, 0]),
             helper.make_node("Transpose", ["x"], ["t3"], perm=[0, 1]),  # different perm: kept apart
             helper.make_node("Add", ["t1", "c1"], ["a1"]),
             helper.make_node("Add", ["t2", "c2"], ["a2"]),  # c2 equals c1: merges after the initializers
             helper.make_node("Constant", [], ["k1"], value=t),
             helper.make_node("Constant", [], ["k2"], value=t),
             helper.make_node("Sum", ["a1", "a2", "t3", "k1", "k2"], ["y"])]
    proto = build(nodes, {"x": [2, 2]}, {"y": [2, 2]},
                  {"c1": np.float32([[1, 2]]), "c2": np.float32([[1, 2]])})
    model = from_proto(proto)
    result = eliminate_common_subexpressions(model)
    assert result.initializers_merged == 1 and result.nodes_merged == 3  # Transpose, Add, Constant
    s = model.graph.nodes[-1]
    assert s.inputs[0] is s.inputs[1] and s.inputs[3] is s.inputs[4] and s.inputs[2] is not s.inputs[0]


def test_cse_keeps_graph_outputs_and_random_ops():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"]),
             helper.make_node("RandomUniformLike", ["x"], ["r1"]),
             helper.make_node("RandomUniformLike", ["x"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["y3"])]
    model = from_proto(build(nodes, {"x": [2]}, {"y1": [2], "y2": [2], "y3": [2]}))
    assert not eliminate_common_subexpressions(model).changed
    model, stats, _ = fold(build(nodes, {"x": [2]}, {"y1": [2], "y2": [2], "y3": [2]}))
    assert [o.name for o in model.graph.outputs] == ["y1", "y2", "y3"] and len(model.graph) == 5


# -- no-op rules -----------------------------------------------------------------------------
NOOP_CASES = {
    "reshape": ([helper.make_node("Reshape", ["x", "s"], ["n"])], {"s": np.int64([0, -1, 4])}),
    "transpose": ([helper.make_node("Transpose", ["x"], ["n"], perm=[0, 1, 2])], {}),
    "cast": ([helper.make_node("Cast", ["x"], ["n"], to=F)], {}),
    "expand": ([helper.make_node("Expand", ["x", "s"], ["n"])], {"s": np.int64([3, 1])}),
    "unsqueeze-squeeze": ([helper.make_node("Unsqueeze", ["x", "a"], ["u"]),
                           helper.make_node("Squeeze", ["u", "a"], ["n"])], {"a": np.int64([-1, 0])}),
    "pad": ([helper.make_node("Pad", ["x", "p"], ["n"], mode="reflect")], {"p": np.zeros(6, np.int64)}),
    "slice": ([helper.make_node("Slice", ["x", "st", "en", "ax"], ["n"])],
              {"st": np.int64([0, -99]), "en": np.int64([2**62, 4]), "ax": np.int64([2, 1])}),
    "concat": ([helper.make_node("Concat", ["x"], ["n"], axis=1)], {}),
}
NOOP_KEPT = {
    "reshape": ([helper.make_node("Reshape", ["x", "s"], ["n"])], {"s": np.int64([2, 4, 3])}),
    "transpose": ([helper.make_node("Transpose", ["x"], ["n"], perm=[0, 2, 1])], {}),
    "cast": ([helper.make_node("Cast", ["x"], ["n"], to=TensorProto.FLOAT16)], {}),
    "expand": ([helper.make_node("Expand", ["x", "s"], ["n"])], {"s": np.int64([2, 2, 3, 4])}),
    "unsqueeze-squeeze": ([helper.make_node("Unsqueeze", ["x", "a"], ["u"]),
                           helper.make_node("Squeeze", ["u", "b"], ["n"])],
                          {"a": np.int64([0]), "b": np.int64([1])}),
    "pad": ([helper.make_node("Pad", ["x", "p"], ["n"])], {"p": np.int64([0, 0, 1, 0, 0, 0])}),
    "slice": ([helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["n"])],
              {"st": np.int64([-1]), "en": np.int64([-99]), "ax": np.int64([2]), "sp": np.int64([-1])}),
}


def noop_model(nodes, inits):
    graph_nodes = nodes + [helper.make_node("Relu", ["n"], ["y"])]
    return build(graph_nodes, {"x": [2, 3, 4]}, {"y": None}, inits)


@pytest.mark.parametrize("case", sorted(NOOP_CASES))
def test_noop_is_removed(case):
    proto = noop_model(*NOOP_CASES[case])
    model = from_proto(proto)
    qcompile.analysis.infer_shapes(model)
    report = apply_rules(model, NOOP)
    assert ops(model.graph) == ["Relu"] and len(report.fired) == 1, report
    check_numbers(proto, model)


@pytest.mark.parametrize("case", sorted(NOOP_KEPT))
def test_real_shape_op_is_kept(case):
    proto = noop_model(*NOOP_KEPT[case])
    model = from_proto(proto)
    qcompile.analysis.infer_shapes(model)
    report = apply_rules(model, NOOP, explain=True)
    assert not report.fired and len(model.graph) == len(proto.graph.node)
    assert report.misses


def test_noop_without_static_shape_says_why():
    proto = build([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], {"x": ["n", 3]}, {"y": None},
                  {"s": np.int64([0, 3])})
    model = from_proto(proto)
    report = apply_rules(model, NOOP, explain=True)
    assert report.misses[0].reason == "the shape of %x is not static: run infer-shapes first"


# -- BatchNormalization into Gemm / MatMul -------------------------------------------------
def bn_params(n, seed):
    rng = np.random.default_rng(seed)
    return {"g": rng.uniform(0.5, 1.5, n).astype(np.float32), "b": rng.normal(0, 0.3, n).astype(np.float32),
            "m": rng.normal(0, 0.3, n).astype(np.float32), "v": rng.uniform(0.5, 1.5, n).astype(np.float32)}


@pytest.mark.parametrize("trans_b, bias", [(0, "c"), (1, "c"), (1, None), (0, "c1")])
def test_gemm_bn_folds(trans_b, bias):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = {"w": w, "c": rng.normal(size=6).astype(np.float32), "c1": np.float32([0.25]), **bn_params(6, 2)}
    gemm_in = ["x", "w"] + ([bias] if bias else [])
    proto = build([helper.make_node("Gemm", gemm_in, ["h"], transB=trans_b, alpha=0.5, beta=2.0),
                   helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
                  {"x": [4, 5]}, {"y": [4, 6]}, inits)
    model = from_proto(proto)
    report = apply_rules(model, BN_MATMUL)
    assert report.counts == {"fold-gemm-bn": 1} and ops(model.graph) == ["Gemm"]
    assert model.graph.nodes[0].attr("transB", 0) == trans_b and model.graph.nodes[0].attr("alpha") == 0.5
    check_numbers(proto, model)


def test_matmul_bn_folds_then_becomes_gemm():
    inits = {"w": np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32), **bn_params(6, 4)}
    proto = build([helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])],
                  {"x": [4, 5]}, {"y": [4, 6]}, inits)
    model, stats, _ = fold(proto)
    assert stats["rule fold-matmul-bn"] == 1 and stats["rule fuse-matmul-add"] == 1
    assert ops(model.graph) == ["Gemm"]
    check_numbers(proto, model)


def test_matmul_bn_on_sequences_is_left_alone():
    inits = {"w": np.ones((5, 6), np.float32), **bn_params(3, 4)}
    proto = build([helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])],
                  {"x": [2, 3, 5]}, {"y": [2, 3, 6]}, inits)
    model = from_proto(proto)
    report = apply_rules(model, BN_MATMUL, explain=True)
    assert not report.fired
    assert report.why_not("fold-matmul-bn")[0].reason.startswith("%x has rank 3")


# -- the pass ------------------------------------------------------------------------------
def test_fold_pass_contract():
    assert get_pass("fold") is Fold
    pm = PassManager.parse("fold{max_iterations=3,cse=false,fold_limit_bytes=1024}")
    assert str(pm) == "fold{max_iterations=3,cse=false,fold_limit_bytes=1024}"
    assert set(NOOP.names) <= set(FOLD.names) and set(BN_MATMUL.names) <= set(FOLD.names)
    with pytest.raises(qcompile.PipelineError, match="fold_limit_bytes"):
        PassManager.parse("fold{fold_limit=3}")
    model = from_proto(build([helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {"y": [2]}))
    result = Fold()(model)
    assert not result.modified and result.model is model


# -- real models ---------------------------------------------------------------------------
LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT = sorted(glob.glob(os.path.join(LIGHT_DIR, "light_*.onnx")))
needs_light = pytest.mark.skipif(not LIGHT, reason="the onnx package ships without its test models")


def light_id(path):
    return os.path.basename(path)[len("light_"):-len(".onnx")]


@needs_light
@pytest.mark.parametrize("path", LIGHT, ids=light_id)
def test_light_model_folds(path):
    """Every light model: weights folded from ConstantOfShape (the big fully connected
    ones stay symbolic under fold_limit_bytes), outputs unchanged."""
    proto = light_as_constants(onnx.load(path))
    model, stats, modified = fold(proto)
    print(light_id(path), dict(stats))
    assert modified and stats["nodes after"] < stats["nodes before"]
    assert "ConstantOfShape" not in ops(model.graph) or light_id(path) in ("vgg19", "bvlc_alexnet", "zfnet512")
    check_numbers(proto, model)


@needs_light
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "inception_v2"])
def test_light_model_with_random_weights_folds(name):
    proto = light_random_weights(onnx.load(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))
    model, stats, _ = fold(proto)
    print(name, dict(stats))
    assert "BatchNormalization" not in ops(model.graph)
    check_numbers(proto, model)


try:
    import torch
except ImportError:  # torch is an optional extra
    torch = None


def torch_proto(name):
    """The torch model exported with BatchNormalization and constants kept (no
    exporter-side folding), so fold has the work to do."""
    import torch_models

    module, example = torch_models.BUILDERS[name]()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, f, dynamo=False, opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load_from_string(f.getvalue())
    return proto, {i.name: e.numpy() for i, e in zip(proto.graph.input, example)}


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer", "lstm", "gru"])
def test_torch_model_folds(name):
    proto, feeds = torch_proto(name)
    model, stats, modified = fold(proto)
    print(name, dict(stats))
    before = collections.Counter(n.op_type for n in proto.graph.node)
    after = collections.Counter(ops(model.graph))
    assert modified and after["Constant"] == 0 and after["Identity"] == 0
    assert stats["nodes after"] < stats["nodes before"]
    if before["BatchNormalization"]:
        assert after["BatchNormalization"] == 0 and stats["rule fold-conv-bn"] == before["BatchNormalization"]
    if name == "transformer":
        assert after["Shape"] == 0 and stats["cse: nodes merged"] > 0
    check_numbers(proto, model, feeds)
