"""The built-in passes dce, infer-shapes and upgrade-opset: structure on tiny hand-built
graphs, and numerics against onnxruntime before and after."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompile.passes  # noqa: F401  (registers the built-in passes)
from qcompile.errors import PassFailedError, PipelineError
from qcompile.ir import INT8, Model, TensorType, int_type
from qcompile.onnx_io import from_proto, to_proto
from qcompile.passmanager import PassManager, StatisticsInstrument, available_passes, get_pass

F = TensorProto.FLOAT


def make(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    proto = helper.make_model(graph, opset_imports=opsets)
    return from_proto(proto)


def tensor(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def run(pipeline: str, model: Model):
    return PassManager.parse(pipeline).run(model)


def ort_outputs(model: Model, feeds):
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(graph):
    return [n.op_type for n in graph]


def test_catalogue_is_registered():
    assert {"dce", "infer-shapes", "upgrade-opset"} <= set(available_passes())
    assert get_pass("dce").summary() == "Remove nodes whose results are never used, and unused initializers."


# -- dce ----------------------------------------------------------------------------------
def dead_branches_model(custom: bool = True):
    """y = Relu(x @ w) + b; dead: a Neg->Abs chain, a MatMul on an otherwise unused weight,
    an unused initializer, and (with `custom`) a custom-domain node nobody reads."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Neg", ["mm"], ["neg"], name="dead_neg"),
        helper.make_node("Abs", ["neg"], ["abs"], name="dead_abs"),
        helper.make_node("MatMul", ["x", "w_dead"], ["mm2"], name="dead_matmul"),
        helper.make_node("Relu", ["mm"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "b"], ["y"], name="add"),
    ]
    if custom:
        nodes.append(helper.make_node("Log", ["x"], ["logged"], name="custom", domain="com.example"))
    inits = [const("w", rng.standard_normal((4, 3)).astype(np.float32)),
             const("w_dead", rng.standard_normal((4, 5)).astype(np.float32)),
             const("unused", np.ones(3, np.float32)),
             const("b", rng.standard_normal(3).astype(np.float32))]
    return make(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3])], inits, extra_opsets=[("com.example", 1)])


def test_dce_removes_dead_chains_and_initializers():
    model = dead_branches_model()
    stats = StatisticsInstrument()
    result = PassManager.parse("dce", instruments=[stats]).run(model)
    assert result.modified and result.model is model
    assert [n.name for n in model.graph] == ["matmul", "relu", "add", "custom"]
    assert sorted(model.graph.initializers) == ["b", "w"]
    assert stats.entries[0].counters == {"nodes removed": 3, "initializers removed": 2}
    assert stats.entries[0].op_delta == {"Abs": -1, "MatMul": -1, "Neg": -1}
    # a fixpoint: running again changes nothing
    again = StatisticsInstrument()
    assert not PassManager.parse("dce", instruments=[again]).run(model).modified
    assert again.entries[0].counters == {}


def test_dce_aggressive_removes_custom_domain_nodes():
    model = dead_branches_model()
    run("dce{aggressive=true}", model)
    assert [n.name for n in model.graph] == ["matmul", "relu", "add"]


def test_dce_keeps_graph_outputs_inputs_and_live_multi_output_nodes():
    nodes = [
        helper.make_node("Split", ["x"], ["s0", "s1"], axis=0, num_outputs=2, name="split"),
        helper.make_node("Relu", ["s0"], ["y"], name="relu"),
        helper.make_node("Neg", ["x"], ["z"], name="neg"),  # a graph output nobody else reads
    ]
    model = make(nodes, [tensor("x", [4]), tensor("unused_in", [1]), tensor("w", [2])],
                 [tensor("y", [2]), tensor("z", [4])], [const("w", np.ones(2, np.float32))], opset=18)
    assert not run("dce", model).modified
    assert [n.name for n in model.graph] == ["split", "relu", "neg"]
    assert [v.name for v in model.graph.inputs] == ["x", "unused_in", "w"]
    assert "w" in model.graph.initializers  # an initializer that is also an input is an overridable input


def if_model(dead_if: bool = False):
    """An If whose then-branch holds a dead Relu reading the outer %b; with `dead_if`,
    a second If nobody reads, whose branches read the outer %c2."""
    then = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["t1"]), helper.make_node("Relu", ["b"], ["t_dead"]),
         helper.make_node("Identity", ["t1"], ["t_out"])], "then", [], [tensor("t_out", [2])])
    other = helper.make_graph([helper.make_node("Abs", ["a"], ["e_out"])], "else", [], [tensor("e_out", [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ra"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="sb"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    if dead_if:
        t2 = helper.make_graph([helper.make_node("Neg", ["c2"], ["t2"])], "then2", [], [tensor("t2", [2])])
        e2 = helper.make_graph([helper.make_node("Abs", ["c2"], ["e2"])], "else2", [], [tensor("e2", [2])])
        nodes += [helper.make_node("Cos", ["x"], ["c2"], name="cos"),
                  helper.make_node("If", ["c"], ["dead_y"], then_branch=t2, else_branch=e2, name="dead_if")]
    return make(nodes, [tensor("x", [2])], [tensor("y", [2])], [const("zero", np.float32(0))])


def test_dce_reaches_into_subgraphs_and_frees_captured_values():
    model = if_model()
    assert run("dce", model).modified
    then = model.graph.nodes[-1].attributes["then_branch"].value
    assert ops(then) == ["Neg", "Identity"]
    assert [n.name for n in model.graph] == ["ra", "rs", "gt", "if"]  # %b was read only by the dead Relu


def test_dce_removes_a_dead_if_and_what_only_its_branches_read():
    model = if_model(dead_if=True)
    run("dce", model)
    assert [n.name for n in model.graph] == ["ra", "rs", "gt", "if"]
    assert model.graph.value("x").users == [model.graph.nodes[0], model.graph.nodes[1]]


@pytest.mark.parametrize("build", [lambda: dead_branches_model(custom=False), if_model,
                                   lambda: if_model(dead_if=True)])
def test_dce_keeps_outputs_identical_in_onnxruntime(build):
    model = build()
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal(model.graph.inputs[0].type.shape).astype(np.float32) * s} for s in (1, -1)]
    before = [ort_outputs(model, f) for f in feeds]
    assert run("dce", model).modified
    onnx.checker.check_model(to_proto(model), full_check=True)
    for f, b in zip(feeds, before):
        np.testing.assert_array_equal(ort_outputs(model, f)[0], b[0])


# -- infer-shapes -------------------------------------------------------------------------
def test_infer_shapes_types_every_value():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0])]
    model = make(nodes, [tensor("x", ["N", 4])], [helper.make_empty_tensor_value_info("y")],
                 [const("w", np.ones((4, 3), np.float32))])
    assert model.graph.value("mm").type is None
    assert run("infer-shapes", model).modified
    assert str(model.graph.value("mm").type) == "f32[N,3]"
    assert str(model.graph.value("y").type) == "f32[3,N]"
    assert not run("infer-shapes", model).modified  # nothing new the second time


def test_infer_shapes_propagates_shape_arithmetic():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape: data propagation gives a static shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_1d"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),
    ]
    inits = [const("zero", np.int64(0)), const("zero_1d", np.array([0], np.int64)),
             const("minus_one", np.array([-1], np.int64))]
    model = make(nodes, [tensor("x", [2, 3, 4])], [helper.make_empty_tensor_value_info("y")], inits)
    run("infer-shapes", model)
    assert model.graph.value("y").type == TensorType(model.graph.value("x").type.dtype, (2, 12))


def test_infer_shapes_keeps_narrow_integer_types_and_known_dims():
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Identity", ["i"], ["y"])]
    model = make(nodes, [tensor("x", [2, 5], TensorProto.INT8)], [tensor("y", ["B", None], TensorProto.INT8)])
    model.graph.value("i").type = TensorType(int_type(3), None)  # an int3 the ONNX types cannot express
    run("infer-shapes", model)
    assert model.graph.value("i").type == TensorType(int_type(3), (2, 5))
    assert model.graph.value("y").type == TensorType(INT8, (2, 5))


def test_infer_shapes_types_subgraph_values():
    model = if_model()
    run("infer-shapes", model)
    then = model.graph.nodes[-1].attributes["then_branch"].value
    assert [str(v.type) for v in then.values()] == ["f32[2]", "f32[2]", "f32[2]"]
    assert str(model.graph.value("s").type) == "f32[]"


# -- upgrade-opset ------------------------------------------------------------------------
def opset11_model():
    """ReduceSum and Squeeze take their axes as attributes at opset 11, as inputs at 13."""
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], axes=[1], keepdims=1),
             helper.make_node("Squeeze", ["s"], ["y"], axes=[1])]
    return make(nodes, [tensor("x", [2, 3])], [tensor("y", [2])], opset=11)


def test_upgrade_opset_converts_and_keeps_numerics():
    model = opset11_model()
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    before = ort_outputs(model, x)
    stats = StatisticsInstrument()
    result = PassManager.parse("upgrade-opset", instruments=[stats]).run(model)
    assert result.modified and result.model.opset == 13
    assert result.model is not model and model.opset == 11  # a new model; the input is kept
    assert [len(n.inputs) for n in result.model.graph] == [2, 2]  # axes became inputs
    assert stats.entries[0].counters == {"opset 11 -> 13": 1}
    np.testing.assert_array_equal(before[0], ort_outputs(result.model, x)[0])


def test_upgrade_opset_never_downgrades():
    model = make([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1])], [tensor("y", [1])], opset=17)
    result = run("upgrade-opset{version=13}", model)
    assert not result.modified and result.model.opset == 17


def test_upgrade_opset_failure_names_the_pass():
    model = make([helper.make_node("NotAnOp", ["x"], ["y"])], [tensor("x", [1])], [tensor("y", [1])], opset=11)
    with pytest.raises(PassFailedError) as e:
        run("dce,upgrade-opset", model)
    assert str(e.value).startswith("pass 'upgrade-opset' failed after [dce]: ")
    assert "'NotAnOp'" in str(e.value)


def test_upgrade_opset_version_is_checked():
    latest = onnx.defs.onnx_opset_version()
    with pytest.raises(PipelineError) as e:
        PassManager.parse("upgrade-opset{version=6}")
    assert str(e.value) == (f"pipeline 'upgrade-opset{{version=6}}', column 23: pass 'upgrade-opset' option "
                            f"'version': expected int, one of 7..{latest}, got 6")
