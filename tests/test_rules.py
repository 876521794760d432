"""The rule catalogue (qcompile.passes.rules) and the `canonicalize` pass: structure on
tiny graphs, golden text, and numerics against onnxruntime on hand-built, torch-exported
and onnx-packaged models."""
import io
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.ir import print_graph
from qcompile.onnx_io import from_proto, to_proto
from qcompile.passes.canonicalize import Canonicalize
from qcompile.passes.rules import CANONICALIZE, CONV_BN, IDENTITY, MATMUL_ADD
from qcompile.passmanager import PassManager, get_pass
from qcompile.rewrite import apply_rules

from onnx_models import F, build, light_random_weights, run_ort
FOLD_TOL = dict(rtol=1e-5, atol=1e-6)


def feeds_for(proto, seed=0, **fixed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in proto.graph.input:
        shape = [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = fixed.get(i.name, rng.standard_normal(shape).astype(np.float32))
    return feeds


def check_numbers(before, model, exact=False, scale_atol=False, **fixed):
    """Same outputs, under the same names, from onnxruntime before and after."""
    qcompile.check(model)
    feeds = feeds_for(before, **fixed)
    want, got = run_ort(before, feeds), run_ort(to_proto(model), feeds)
    assert list(got) == list(want)
    for name, expected in want.items():
        if exact:
            np.testing.assert_array_equal(got[name], expected)
        else:
            atol = FOLD_TOL["atol"] * (max(1.0, float(np.abs(expected).max())) if scale_atol else 1.0)
            np.testing.assert_allclose(got[name], expected, rtol=FOLD_TOL["rtol"], atol=atol)


def ops(graph):
    return [n.op_type for n in graph.nodes]


def rewrite(proto, rules=CANONICALIZE, **kwargs):
    model = from_proto(proto)
    return model, apply_rules(model, rules, explain=True, **kwargs)


# -- Identity and Dropout -------------------------------------------------------------
def test_identity_chain_goes_and_the_output_keeps_its_name():
    proto = build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["a"]),
                   helper.make_node("Identity", ["a"], ["y"])], {"x": [2, 3]}, {"y": [2, 3]})
    model, report = rewrite(proto, IDENTITY)
    assert report.counts == {"eliminate-identity": 2}
    assert print_graph(model.graph) == "graph g (%x: f32[2,3]) -> (%y: f32[2,3]) {\n  %y = Relu(%x)\n  return %y\n}"
    check_numbers(proto, model, exact=True)


def test_identity_of_a_weight_is_bypassed():
    proto = build([helper.make_node("Identity", ["w"], ["w2"]), helper.make_node("MatMul", ["x", "w2"], ["y"])],
                  {"x": [2, 3]}, {"y": [2, 4]}, {"w": np.ones((3, 4), np.float32)})
    model, _ = rewrite(proto, IDENTITY)
    assert ops(model.graph) == ["MatMul"] and model.graph.nodes[0].inputs[1].name == "w"
    check_numbers(proto, model, exact=True)


@pytest.mark.parametrize("source, kind", [("x", "a graph input"), ("w", "an initializer")])
def test_identity_that_is_the_interface_stays(source, kind):
    proto = build([helper.make_node("Identity", [source], ["y"], name="id")], {"x": [3]}, {"y": [3]},
                  {"w": np.ones(3, np.float32)})
    model, report = rewrite(proto, IDENTITY)
    assert ops(model.graph) == ["Identity"] and not report.fired
    assert report.why_not("eliminate-identity", "id")[0].reason == (
        f"%y is a graph output and its input %{source} is {kind}: the node keeps the model's interface")


def test_identity_between_two_outputs_stays():
    proto = build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
                  {"x": [3]}, {"r": [3], "y": [3]})
    _, report = rewrite(proto, IDENTITY)
    assert report.misses[0].reason == "%y and its input %r are both graph outputs"


def dropout_model(opset, inputs=("x",), outputs=("d",), inits=None, graph_outputs=("y",), **attrs):
    nodes = [helper.make_node("Dropout", list(inputs), list(outputs), name="drop", **attrs),
             helper.make_node("Relu", ["d"], ["y"])]
    outs = {n: [2, 3] for n in graph_outputs}
    ins = {"x": [2, 3]}
    if "t" in inputs and "t" not in (inits or {}):
        ins["t"] = helper.make_tensor_value_info("t", TensorProto.BOOL, [])
    if "mask" in graph_outputs:
        outs["mask"] = helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3])
    return build(nodes, ins, outs, inits, opset=opset)


RATIO = {"ratio": np.array(0.5, np.float32)}


@pytest.mark.parametrize("proto", [
    dropout_model(10, outputs=("d", "mask")),  # opsets 7-11: inference at run time
    dropout_model(13),
    dropout_model(13, inputs=("x", "ratio"), outputs=("d", "mask"), inits=RATIO),
    dropout_model(13, inputs=("x", "ratio", "t"), inits=dict(RATIO, t=np.array(False))),
    dropout_model(13, inputs=("x", "", "")),
], ids=["opset10", "opset13", "ratio", "training-false", "absent-inputs"])
def test_inference_dropout_goes(proto):
    model, report = rewrite(proto, IDENTITY)
    assert ops(model.graph) == ["Relu"] and report.counts == {"eliminate-dropout": 1}
    assert set(model.graph.initializers) == set()  # ratio and training_mode went with it
    check_numbers(proto, model, exact=True)


def test_opset6_dropout_needs_is_test():
    model, report = rewrite(dropout_model(6, outputs=("d", "mask"), is_test=1), IDENTITY)
    assert ops(model.graph) == ["Relu"]
    _, report = rewrite(dropout_model(6, outputs=("d", "mask")), IDENTITY)
    assert report.misses[0].reason == "an opset 1-6 Dropout without is_test=1 runs in training mode"


@pytest.mark.parametrize("proto, reason", [
    (dropout_model(13, inputs=("x", "ratio", "t"), inits=dict(RATIO, t=np.array(True))), "training_mode %t is true"),
    (dropout_model(13, inputs=("x", "ratio", "t"), inits=RATIO), "training_mode %t is not a constant"),
    (dropout_model(13, outputs=("d", "mask"), graph_outputs=("y", "mask")), "the mask output %mask is used"),
], ids=["training", "unknown-mode", "mask-used"])
def test_training_dropout_stays(proto, reason):
    model, report = rewrite(proto, IDENTITY)
    assert "Dropout" in ops(model.graph) and not report.fired
    assert report.why_not("eliminate-dropout", "drop")[0].reason == reason


# -- Conv + BatchNormalization -----------------------------------------------------------
def conv_bn_model(spatial=2, channels=(4, 6), group=1, bias=True, eps=1e-3, seed=0, extra=None, bn_attrs=None,
                  opset=17):
    rng = np.random.default_rng(seed)
    cin, cout = channels
    kernel = [3] * spatial
    w = rng.standard_normal([cout, cin // group] + kernel).astype(np.float32)
    inits = {"w": w, "gamma": rng.uniform(0.5, 2, cout), "beta": rng.standard_normal(cout),
             "mean": rng.standard_normal(cout), "var": rng.uniform(0.1, 2, cout)}
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    if bias:
        inits["b"] = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], name="conv", group=group,
                              pads=[1] * (2 * spatial)),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=eps, **(bn_attrs or {}))]
    outputs = {"y": [2, cout] + [5] * spatial}
    if extra:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="other"))
        outputs["r"] = [2, cout] + [5] * spatial
    return build(nodes, {"x": [2, cin] + [5] * spatial}, outputs, inits, opset=opset)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(bias=False), dict(spatial=1, channels=(4, 8), group=2), dict(channels=(6, 6), group=6),
    dict(spatial=3, channels=(2, 3)),
], ids=["2d", "no-bias", "grouped-1d", "depthwise", "3d"])
def test_conv_bn_folds(kwargs):
    proto = conv_bn_model(**kwargs)
    model, report = rewrite(proto, CONV_BN)
    assert ops(model.graph) == ["Conv"] and report.counts == {"fold-conv-bn": 1}
    assert model.graph.nodes[0].attr("group") == kwargs.get("group", 1)
    assert len(model.graph.initializers) == 2  # W' and b' only
    check_numbers(proto, model, **FOLD_TOL)


def test_conv_bn_golden_text():
    proto = conv_bn_model(spatial=1, channels=(1, 2), bias=False)
    model = from_proto(proto)
    before = [line.strip() for line in print_graph(model.graph).splitlines() if "=" in line]
    assert before == [
        "%c = Conv(%x, %w) {group=1, pads=[1, 1]}  # conv",
        "%y = BatchNormalization(%c, %gamma, %beta, %mean, %var) {epsilon=0.001}  # bn",
    ]
    apply_rules(model, CANONICALIZE)
    after = [line.strip() for line in print_graph(model.graph).splitlines()]
    assert after[1].startswith("init %w_folded_0: f32[2,1,3]")
    assert after[2].startswith("init %w_bias_folded_1: f32[2]")
    assert after[3:] == ["%y = Conv(%x, %w_folded_0, %w_bias_folded_1) {group=1, pads=[1, 1]}  # conv",
                         "return %y", "}"]


def test_conv_with_two_users_is_not_folded():
    model, report = rewrite(conv_bn_model(extra=True), CONV_BN)
    assert ops(model.graph) == ["Conv", "BatchNormalization", "Relu"]
    miss = report.why_not("fold-conv-bn", "bn")[0]
    assert (miss.stage, miss.reason) == ("check", "conv output %c has 2 users")
    assert miss.culprits == ("%c", "'bn' (BatchNormalization)", "'other' (Relu)")


@pytest.mark.parametrize("change, reason", [
    (lambda p: p.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1)),
     "BatchNormalization has training_mode=1"),
    (lambda p: p.graph.input.append(helper.make_tensor_value_info("mean", F, [6])),
     "input 3 of 'bn' (BatchNormalization) %mean is not a constant "
     "(it is a graph input whose initializer is only a default)"),
    (lambda p: p.graph.input.append(helper.make_tensor_value_info("b", F, [6])), "the Conv bias %b is not a constant"),
    (lambda p: p.graph.node[1].output.extend(["m", "v"]) or p.graph.output.append(
        helper.make_tensor_value_info("m", F, [6])),
     "BatchNormalization output %m (running statistics) is used: training mode"),
], ids=["training-mode", "variable-mean", "variable-bias", "running-stats"])
def test_conv_bn_left_alone(change, reason):
    proto = conv_bn_model()
    change(proto)
    model, report = rewrite(proto, CONV_BN)
    assert "BatchNormalization" in ops(model.graph)
    assert [m.reason for m in report.why_not("fold-conv-bn")] == [reason]


def test_negative_variance_is_left_alone():
    proto = conv_bn_model()
    var = next(t for t in proto.graph.initializer if t.name == "var")
    var.CopyFrom(numpy_helper.from_array(-np.ones(6, np.float32), "var"))
    _, report = rewrite(proto, CONV_BN)
    assert report.misses[0].reason == "variance %var + epsilon is not positive everywhere"


def test_per_activation_batchnorm_is_left_alone():
    _, report = rewrite(conv_bn_model(opset=8, bn_attrs={"spatial": 0}), CONV_BN)
    assert report.misses[0].reason == "per-activation BatchNormalization (spatial=0) is not folded"


# -- MatMul + Add -----------------------------------------------------------------------
def matmul_add_model(c_shape=(4,), a_shape=(3, 5), swap=False, m_dim=3, extra=False):
    rng = np.random.default_rng(3)
    inits = {"b": rng.standard_normal((5, 4)).astype(np.float32),
             "c": rng.standard_normal(c_shape).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["a", "b"], ["m"], name="mm"),
             helper.make_node("Add", ["c", "m"] if swap else ["m", "c"], ["y"], name="add")]
    outputs = {"y": None}
    if extra:
        nodes.append(helper.make_node("Neg", ["m"], ["n"]))
        outputs["n"] = None
    a_info = helper.make_tensor_value_info("a", F, None if a_shape is None else [m_dim] + list(a_shape[1:]))
    return build(nodes, {"a": a_info}, outputs, inits)


@pytest.mark.parametrize("c_shape", [(), (1,), (4,), (1, 4), (3, 1), (3, 4), (1, 1)])
@pytest.mark.parametrize("swap", [False, True], ids=["add-mm-c", "add-c-mm"])
def test_matmul_add_becomes_gemm(c_shape, swap):
    proto = matmul_add_model(c_shape, swap=swap)
    model, report = rewrite(proto, MATMUL_ADD)
    assert ops(model.graph) == ["Gemm"] and report.counts == {"fuse-matmul-add": 1}
    assert [v.name for v in model.graph.nodes[0].inputs] == ["a", "b", "c"]
    check_numbers(proto, model, **FOLD_TOL)


@pytest.mark.parametrize("proto, reason", [
    (matmul_add_model(a_shape=(2, 3, 5)), "%a has rank 3; Gemm multiplies 2-D matrices"),
    (matmul_add_model(a_shape=None),
     "the rank of %a is unknown: run shape inference first (the infer-shapes pass)"),
    (matmul_add_model(c_shape=(3, 4), m_dim="M"), "C %c of shape [3, 4] does not broadcast one way to [M, N] = [M, 4]"),
    (matmul_add_model(c_shape=(2, 3, 4)), "C %c of shape [2, 3, 4] does not broadcast one way to [M, N] = [3, 4]"),
    (matmul_add_model(extra=True), "MatMul output %m has 2 users"),
], ids=["rank-3", "unknown-rank", "symbolic-rows", "rank-3-bias", "shared-product"])
def test_matmul_add_left_alone(proto, reason):
    model, report = rewrite(proto, MATMUL_ADD)
    assert "Gemm" not in ops(model.graph)
    assert [m.reason for m in report.why_not("fuse-matmul-add")] == [reason]


def test_shapes_inferred_first_let_the_product_fuse():
    proto = build([helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "b"], ["m"]),
                   helper.make_node("Add", ["m", "c"], ["y"])], {"a": [3, 5]}, {"y": [3, 4]},
                  {"b": np.ones((5, 4), np.float32), "c": np.arange(4, dtype=np.float32)})
    model = from_proto(proto)
    assert not PassManager.parse("canonicalize").run(model).modified  # %r has no known rank
    assert PassManager.parse("infer-shapes,canonicalize").run(model).modified
    assert ops(model.graph) == ["Relu", "Gemm"]
    check_numbers(proto, model, **FOLD_TOL)


def test_residual_add_is_not_a_bias():
    proto = build([helper.make_node("MatMul", ["a", "b"], ["m"]),
                   helper.make_node("Add", ["m", "a"], ["y"], name="res")],
                  {"a": [4, 4]}, {"y": [4, 4]}, {"b": np.eye(4, dtype=np.float32)})
    _, report = rewrite(proto, MATMUL_ADD)
    assert report.misses[0].reason == "input 1 of 'res' (Add) %a is not a constant (it is a graph input)"


# -- real models ------------------------------------------------------------------------
try:
    import torch
except ImportError:  # torch is an optional extra
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def export(module, *shape, training=False, **kwargs):
    """ModelProto of a torch module (TorchScript exporter, BatchNormalization kept)."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.PRESERVE
    module.train(training)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), f, dynamo=False, opset_version=17, training=mode,
                          input_names=["x"], output_names=["y"], **kwargs)
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(f.getvalue()))


def randomize_bn(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)
    return module


def basic_block(cin=3, cout=8):
    """A ResNet basic block with a projection shortcut, then a small classifier head."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
            self.short, self.bn3 = nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)
            self.drop = nn.Dropout(0.2)
            self.w = nn.Parameter(torch.randn(cout, 5) * 0.3)
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + self.bn3(self.short(x)))
            y = self.drop(y.mean((2, 3)))
            return y @ self.w + self.b

    torch.manual_seed(0)
    return BasicBlock()


@needs_torch
@pytest.mark.parametrize("fresh", [False, True], ids=["trained-stats", "fresh-stats"])
def test_torch_resnet_block_canonicalizes(fresh):
    """Fresh BatchNorm statistics are exported as shared initializers behind Identity
    nodes: the rules must compose (Identity elimination first, then folding)."""
    block = basic_block() if fresh else randomize_bn(basic_block())
    proto = export(block, 2, 3, 16, 16)
    model = from_proto(proto)
    canonicalize = Canonicalize()
    result = PassManager([canonicalize]).run(model)
    assert result.modified
    expected = {"fold-conv-bn": 3, "fuse-matmul-add": 1}
    if fresh:
        expected["eliminate-identity"] = ops(from_proto(proto).graph).count("Identity")
        assert expected["eliminate-identity"] > 0
    assert canonicalize.stats == expected
    assert sorted(ops(model.graph)) == ["Add", "Conv", "Conv", "Conv", "Gemm", "ReduceMean", "Relu", "Relu"]
    check_numbers(proto, model, **FOLD_TOL)


@needs_torch
def test_torch_training_export_is_left_alone():
    proto = export(basic_block(), 2, 3, 16, 16, training=True)
    model, report = rewrite(proto)
    assert ops(model.graph).count("BatchNormalization") == 3 and "Dropout" in ops(model.graph)
    reasons = {m.rule: m.reason for m in report.misses}
    assert reasons["fold-conv-bn"] == "BatchNormalization has training_mode=1"
    assert reasons["eliminate-dropout"].endswith("is true")


@needs_torch
def test_torch_linear_on_sequences_stays_matmul():
    proto = export(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()), 2, 5, 6)
    model, report = rewrite(proto, MATMUL_ADD)
    assert "Gemm" not in ops(model.graph)
    assert report.why_not("fuse-matmul-add")[0].reason == "%x has rank 3; Gemm multiplies 2-D matrices"


LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_shufflenet.onnx")


def deployable(proto, seed=0):
    """The onnx package's 'light' model with seeded random constant weights and its
    logits (the Softmax input) as output."""
    proto = light_random_weights(proto, seed)
    index = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Softmax")
    logits = proto.graph.node[index].input[0]
    del proto.graph.node[index], proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info(logits, F, None))
    return proto


@pytest.mark.skipif(not os.path.exists(LIGHT), reason="the onnx package ships without its test models")
def test_shufflenet_from_the_onnx_test_data():
    proto = deployable(onnx.load(LIGHT))
    model, report = rewrite(proto)
    assert report.counts == {"fold-conv-bn": 49} and report.misses == []
    assert "BatchNormalization" not in ops(model.graph)
    check_numbers(proto, model, scale_atol=True)


# -- the pass ---------------------------------------------------------------------------
def test_canonicalize_pass_contract():
    cls = get_pass("canonicalize")
    assert cls is Canonicalize and cls.summary().startswith("Remove Identity")
    assert CANONICALIZE.names == ("eliminate-identity", "eliminate-dropout", "fold-conv-bn", "fuse-matmul-add")
    model = from_proto(conv_bn_model())
    p = Canonicalize()
    first = p(model)
    assert first.modified and first.model is model and p.stats == {"fold-conv-bn": 1}
    assert not p(model).modified


def test_canonicalize_rules_can_be_disabled():
    model = from_proto(conv_bn_model())
    pm = PassManager.parse("canonicalize{max_iterations=3,disable=fold-conv-bn}")
    assert str(pm) == "canonicalize{max_iterations=3,disable=fold-conv-bn}"
    assert not pm.run(model).modified and "BatchNormalization" in ops(model.graph)
    with pytest.raises(qcompile.PipelineError, match="fuse-matmul-add"):
        PassManager.parse("canonicalize{disable=fold-bn}")


# -- Conv + per-channel Mul/Add (BatchNormalization spelled out) ---------------------------
def conv_affine_model(ops_and_constants, bias=True, channels=(4, 6), group=1, seed=0, extra=False, swap=False):
    """Conv, then each (op, constant) in turn: Mul/Add by the constant."""
    rng = np.random.default_rng(seed)
    cin, cout = channels
    inits = {"w": rng.standard_normal([cout, cin // group, 3, 3]).astype(np.float32)}
    if bias:
        inits["b"] = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["t0"], name="conv", group=group,
                              pads=[1, 1, 1, 1])]
    for i, (op, c) in enumerate(ops_and_constants):
        inits[f"k{i}"] = np.asarray(c, np.float32)
        args = [f"k{i}", f"t{i}"] if swap else [f"t{i}", f"k{i}"]
        nodes.append(helper.make_node(op, args, [f"t{i + 1}"], name=f"{op.lower()}{i}"))
    outputs = {f"t{len(ops_and_constants)}": [2, cout, 5, 5]}
    if extra:
        nodes.append(helper.make_node("Relu", ["t0"], ["r"], name="other"))
        outputs["r"] = [2, cout, 5, 5]
    return build(nodes, {"x": [2, cin, 5, 5]}, outputs, inits)


_R = np.random.default_rng(7)


@pytest.mark.parametrize("steps, kwargs", [
    ([("Mul", _R.uniform(0.5, 2, (6, 1, 1))), ("Add", _R.standard_normal((6, 1, 1)))], {}),
    ([("Mul", _R.uniform(0.5, 2, (1, 6, 1, 1))), ("Add", _R.standard_normal((1, 6, 1, 1)))], {"bias": False}),
    ([("Mul", 1.5), ("Add", [0.25])], {}),
    ([("Mul", _R.uniform(0.5, 2, (6, 1, 1)))], {"channels": (6, 6), "group": 6, "swap": True}),
], ids=["per-channel", "rank-4-no-bias", "scalars", "depthwise-commuted"])
def test_conv_then_per_channel_mul_add_folds_into_the_conv(steps, kwargs):
    from qcompile.passes.rules import CONV_AFFINE

    proto = conv_affine_model(steps, **kwargs)
    model, report = rewrite(proto, CONV_AFFINE)
    assert ops(model.graph) == ["Conv"] and sum(report.counts.values()) == len(steps)
    assert len(model.graph.initializers) == 2  # W' and b'
    check_numbers(proto, model, **FOLD_TOL)


@pytest.mark.parametrize("steps, kwargs, reason", [
    ([("Mul", _R.uniform(0.5, 2, (1, 1, 5, 5)))], {}, "is not one value per output channel"),
    ([("Add", _R.standard_normal((2, 6, 1, 1)))], {}, "is not one value per output channel"),
    ([("Mul", _R.uniform(0.5, 2, (6,)))], {}, "is not one value per output channel"),
    ([("Mul", _R.uniform(0.5, 2, (1, 1, 6, 1, 1)))], {}, "would broadcast the rank-4 Conv output"),
    ([("Add", _R.standard_normal((6, 1, 1)))], {"extra": True}, "conv output %t0 has 2 users"),
], ids=["spatial", "batch", "last-axis", "higher-rank", "two-users"])
def test_conv_then_mul_add_left_alone(steps, kwargs, reason):
    from qcompile.passes.rules import CONV_AFFINE

    proto = conv_affine_model(steps, **kwargs)
    model, report = rewrite(proto, CONV_AFFINE)
    assert ops(model.graph)[:2] == ["Conv", steps[0][0]] and not report.fired
    assert any(reason in m.reason for m in report.misses), [m.reason for m in report.misses]


# -- Sum -> Add ------------------------------------------------------------------------
def test_sum_becomes_a_chain_of_adds_with_the_same_outputs():
    from qcompile.passes.rules import SUM_ADD

    two = build([helper.make_node("Sum", ["a", "b"], ["s"], name="join"), helper.make_node("Relu", ["s"], ["y"])],
                {"a": [2, 3, 4], "b": [3, 1]}, {"y": [2, 3, 4]})
    model, _ = rewrite(two, SUM_ADD)
    assert ops(model.graph) == ["Add", "Relu"] and model.graph.nodes[0].name == "join"
    check_numbers(two, model)
    three = build([helper.make_node("Sum", ["a", "b", "c"], ["y"])], {"a": [2, 3], "b": [2, 3], "c": [3]},
                  {"y": [2, 3]})
    model, _ = rewrite(three, SUM_ADD)
    assert ops(model.graph) == ["Add", "Add"]
    check_numbers(three, model)
    # two unnamed Sums: their intermediate Adds get distinct names
    both = build([helper.make_node("Sum", ["a", "b", "c"], ["s"]), helper.make_node("Sum", ["s", "b", "c"], ["y"])],
                 {"a": [2, 3], "b": [2, 3], "c": [3]}, {"y": [2, 3]})
    model, _ = rewrite(both, SUM_ADD)
    names = [n.name for n in model.graph.nodes if n.name]
    assert ops(model.graph) == ["Add"] * 4 and len(names) == 2 and len(set(names)) == 2
    check_numbers(both, model)


def test_sum_left_alone():
    from qcompile.passes.rules import SUM_ADD

    one = build([helper.make_node("Sum", ["a"], ["y"])], {"a": [2, 3]}, {"y": [2, 3]})
    model, report = rewrite(one, SUM_ADD)
    assert ops(model.graph) == ["Sum"] and report.misses[0].reason == "a Sum of one input is a copy"
    old = build([helper.make_node("Sum", ["a", "b"], ["y"])], {"a": [2, 3], "b": [2, 3]}, {"y": [2, 3]}, opset=7)
    model, report = rewrite(old, SUM_ADD)
    assert ops(model.graph) == ["Sum"] and report.misses[0].reason.startswith("opset 7: ")


def test_a_residual_sum_is_quantized_and_lowered_like_an_add():
    """ShuffleNet joins its branches with Sum: after fold, quantize and lower-integer it is
    a QAdd with the Relu fused, not a float op between Dequantize and Quantize."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    proto = build([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sum", ["c", "x"], ["s"]),
                   helper.make_node("Relu", ["s"], ["y"])], {"x": [1, 4, 5, 5]}, {"y": [1, 4, 5, 5]}, {"w": w})
    model = from_proto(proto)
    model.annotations["calibration_data"] = [{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
                                             for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    kinds = [(n.domain, n.op_type) for n in out.graph.nodes]
    assert ("qcompile.int", "QAdd") in kinds and ("", "Sum") not in kinds and ("", "Relu") not in kinds
