"""ONNX import and export, feature by feature: external data, declarations and metadata,
opsets and domains, control-flow subgraphs, qcompile's own types, load errors, opset
upgrades. The conformance suite (test_roundtrip_conformance.py) covers onnx's test models."""
import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import ModelLoadError, QCompileError
from qcompile.ir import (
    BIPOLAR,
    FLOAT,
    TERNARY,
    Graph,
    Model,
    Node,
    QuantParams,
    Tensor,
    TensorType,
    Value,
    check,
    int_type,
)
from qcompile.onnx_io import from_proto, to_proto, upgrade_opset
from roundtrip_cases import compare_outputs, data_dir_cases, node_cases, run_model, structure_difference


def info(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def round_trip(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = from_proto(proto)
    check(model)
    return to_proto(model)


def assert_same(proto: onnx.ModelProto) -> onnx.ModelProto:
    exported = round_trip(proto)
    assert structure_difference(proto, exported) is None, structure_difference(proto, exported)
    return exported


# -- external data ---------------------------------------------------------------------
def mlp_with_external_data(folder, location="weights.bin"):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [info("x", [2, 4])], [info("y", [2, 8])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = os.path.join(folder, "mlp.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def external_refs(proto):
    return [(t.name, t.data_location, [(e.key, e.value) for e in t.external_data]) for t in proto.graph.initializer]


@pytest.mark.parametrize("location", ["weights.bin", "data/weights.bin"])
def test_external_data_file_is_kept_and_copied(tmp_path, location):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / os.path.dirname(location)).mkdir(parents=True, exist_ok=True)
    path = mlp_with_external_data(str(src), location)
    original = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in original.graph.initializer)

    model = qcompile.load(path)
    weights = model.graph.initializers["w"].const
    assert weights.is_external and weights.proto.raw_data == b""  # not read on load
    out = dst / "mlp.onnx"
    dst.mkdir()
    qcompile.save(model, str(out))

    assert (dst / location).read_bytes() == (src / location).read_bytes()
    saved = onnx.load(str(out), load_external_data=False)
    assert external_refs(saved) == external_refs(original)
    assert structure_difference(original, saved) is None
    x = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    assert compare_outputs(run_model(path, x), run_model(str(out), x)) is None
    np.testing.assert_array_equal(weights.numpy(), numpy_helper.to_array(onnx.load(path).graph.initializer[0]))


def test_save_beside_the_original_keeps_its_data_file(tmp_path):
    path = mlp_with_external_data(str(tmp_path))
    before = (tmp_path / "weights.bin").read_bytes()
    qcompile.save(qcompile.load(path), path)
    assert (tmp_path / "weights.bin").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx", "weights.bin"]  # no temporary files left
    assert run_model(path, {"x": np.ones((2, 4), np.float32)})[0].shape == (2, 8)


def test_missing_external_data_file_is_a_clear_error(tmp_path):
    path = mlp_with_external_data(str(tmp_path))
    model = qcompile.load(path)
    os.remove(tmp_path / "weights.bin")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QCompileError, match="cannot copy external data .*weights.bin"):
        qcompile.save(model, str(out / "mlp.onnx"))
    assert os.listdir(out) == []  # nothing half-written


# -- declarations, metadata, opsets, domains -------------------------------------------
def annotated_model(opset=7):
    """Doc strings and metadata everywhere, value_info in an unusual order (and on an
    initializer), an old opset and a custom domain."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 2, 3])
    add = helper.make_node("Add", ["x", "w"], ["a"], name="add", doc_string="adds the bias")
    relu = helper.make_node("Relu", ["a"], ["b"], name="relu")
    custom = helper.make_node("Scale", ["b"], ["y"], name="scale", domain="com.example", factor=2.0)
    graph = helper.make_graph([add, relu, custom], "annotated", [info("x", [3])], [info("y", ["N"])], [w],
                              doc_string="graph doc",
                              value_info=[info("b", ["N"]), info("w", [3]), info("a", [3])])
    graph.input[0].doc_string = "the input"
    for msg, props in ((graph.node[0], {"origin": "layer1"}), (graph, {"stage": "float"}),
                       (graph.value_info[2], {"k": "v"})):
        for key, value in props.items():
            entry = msg.metadata_props.add()
            entry.key, entry.value = key, value
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.example", 1)],
                              producer_name="tests", producer_version="1.0", doc_string="model doc", model_version=3)
    helper.set_model_props(model, {"author": "qcompile", "license": "MIT"})
    return model


def test_metadata_doc_strings_value_info_and_opsets_are_kept():
    proto = annotated_model()
    assert_same(proto)
    model = from_proto(proto)
    assert model.opset_imports == {"": 7, "com.example": 1} and model.opset == 7
    assert model.metadata_props == {"author": "qcompile", "license": "MIT"}
    assert (model.doc_string, model.producer_name, model.producer_version, model.model_version) == \
        ("model doc", "tests", "1.0", 3)
    g = model.graph
    assert (g.doc_string, g.metadata_props) == ("graph doc", {"stage": "float"})
    add, _, scale = g.nodes
    assert (add.doc_string, add.metadata_props) == ("adds the bias", {"origin": "layer1"})
    assert scale.domain == "com.example" and scale.attr("factor") == 2.0
    assert g.inputs[0].doc_string == "the input"
    assert str(g.value("b").type) == "f32[N]" and g.value("a").metadata_props == {"k": "v"}
    exported = to_proto(model)
    assert [vi.name for vi in exported.graph.value_info] == ["b", "w", "a"]


def test_old_opset_model_runs_the_same():
    proto = annotated_model(opset=7)
    proto.graph.node[2].CopyFrom(helper.make_node("Neg", ["b"], ["y"], name="neg"))  # onnxruntime lacks com.example
    exported = assert_same(proto)
    x = {"x": np.array([-5.0, 0.5, 1.0], np.float32)}
    assert compare_outputs(run_model(proto, x), run_model(exported, x)) is None


def test_repeated_and_outer_declarations_are_kept():
    """Declarations no single Value can hold: an input passed straight through as an
    output with its own ValueInfo, the same value twice among the outputs, value_info for
    a graph output, value_info in a subgraph naming an outer value; and sibling branches
    reusing a name (valid ONNX)."""
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [info("t", None)],
                               value_info=[info("x", [3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["t"])], "else", [], [info("t", None)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [info("c", [], TensorProto.BOOL), info("x", [3])],
                              [info("y", [3]), info("x", None), info("y", None)], value_info=[info("y", ["N"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    exported = assert_same(proto)
    model = from_proto(proto)
    assert str(model.graph.inputs[1].type) == "f32[3]"  # not overwritten by the output's ValueInfo
    for c in (True, False):
        feeds = {"c": np.array(c), "x": np.array([-1.0, 2.0, -3.0], np.float32)}
        assert compare_outputs(run_model(proto, feeds), run_model(exported, feeds)) is None


def test_stale_declarations_give_way_to_the_ir():
    """A kept repeat declaration is written back only while its value keeps its type."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [info("x", [3])],
                              [info("y", [3]), info("x", [3])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model.graph.inputs[0].type = TensorType(FLOAT, ("N",))
    outputs = to_proto(model).graph.output
    assert [d.dim_param for d in outputs[1].type.tensor_type.shape.dim] == ["N"]


# -- control flow ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_if", "test_if_seq", "test_if_opt", "test_loop11", "test_loop16_seq_none",
                                  "test_scan_sum", "test_scan9_sum", "test_range_float_type_positive_delta_expanded"])
def test_subgraphs_come_back_unchanged(name):
    (case,) = [c for c in node_cases() if c.name == name]
    proto, _ = case.load()
    exported = assert_same(proto)
    subgraphs = 0
    for node, node_out in zip(proto.graph.node, exported.graph.node):
        for a, a_out in zip(node.attribute, node_out.attribute):
            if a.type == onnx.AttributeProto.GRAPH:
                assert structure_difference(a.g, a_out.g) is None
                subgraphs += 1
    assert subgraphs


def control_flow_model():
    """If, Loop and Scan bodies that read outer values (x, w, s) instead of inputs."""
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"])], "then", [], [info("t", [3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e"])], "else", [], [info("e", [3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "w"], ["acc_out"])],
        "loop_body", [info("i", [], TensorProto.INT64), info("cond_in", [], TensorProto.BOOL), info("acc_in", [3])],
        [info("cond_out", [], TensorProto.BOOL), info("acc_out", [3])])
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "row"], ["sum_mid"]), helper.make_node("Mul", ["sum_mid", "s"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["row_out"])],
        "scan_body", [info("sum_in", [3]), info("row", [3])], [info("sum_out", [3]), info("row_out", [3])])
    nodes = [
        helper.make_node("If", ["c"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["n", "", "branch"], ["looped"], name="loop", body=body),
        helper.make_node("Scan", ["looped", "rows"], ["total", "trace"], name="scan", body=scan_body, num_scan_inputs=1),
    ]
    w = numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "w")
    s = numpy_helper.from_array(np.array(0.75, np.float32), "s")
    graph = helper.make_graph(
        nodes, "control",
        [info("c", [], TensorProto.BOOL), info("n", [], TensorProto.INT64), info("x", [3]), info("rows", [4, 3])],
        [info("total", [3]), info("trace", [4, 3])], [w, s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_captured_outer_values_list_their_inner_uses():
    proto = control_flow_model()
    model = from_proto(proto)
    g = model.graph
    if_node, loop, scan = g.nodes
    x, w, s = g.value("x"), g.value("w"), g.value("s")
    assert {n.op_type for n, _ in x.uses} == {"Mul", "Sub"}
    assert all(n.graph is not g for n, _ in x.uses)  # read only inside the branches
    assert {n.graph.name for n, _ in w.uses} == {"then", "else", "loop_body"}
    assert [n.graph.name for n, _ in s.uses] == ["scan_body"]
    assert g.captured_values(if_node) == [x, w] and g.captured_values(loop) == [w] and g.captured_values(scan) == [s]
    assert g.is_sorted()
    exported = assert_same(proto)
    rng = np.random.default_rng(3)
    for c in (True, False):
        feeds = {"c": np.array(c), "n": np.array(3, np.int64), "x": rng.standard_normal(3).astype(np.float32),
                 "rows": rng.standard_normal((4, 3)).astype(np.float32)}
        assert compare_outputs(run_model(proto, feeds), run_model(exported, feeds)) is None


# -- qcompile's own types ----------------------------------------------------------------
def test_integer_types_onnx_lacks_and_quant_params_survive_save_and_load(tmp_path):
    g = Graph("quantized")
    i3 = TensorType(int_type(3), (2, 4), QuantParams(np.float32(0.05), np.int64(1)))
    per_channel = TensorType(int_type(5, signed=False), (4, 2), QuantParams([0.1, 0.2], [3, 7], axis=1))
    x = g.add_input(Value("x", i3))
    w = g.add_initializer(Value("w", TensorType(TERNARY, (4, 2)),
                                const=Tensor(np.array([[1, -1], [0, 1], [-1, 0], [1, 1]], np.int8), TERNARY)))
    bias = g.add_input(Value("bias", per_channel))
    mm = g.append(Node("MatMulInteger", [x, w], name="mm"))
    mm.output.type = TensorType(int_type(24), (2, 2))
    sign = g.append(Node("Sign", [mm.output], name="sign"))
    to_bipolar = g.append(Node("Cast", [sign.output], {"to": TensorProto.INT8}, name="cast"))
    to_bipolar.output.type = TensorType(BIPOLAR, (2, 2))
    g.add_output(to_bipolar.output)
    g.add_output(bias)
    model = Model(g, {"": 17})
    check(model)
    path = tmp_path / "q.onnx"
    qcompile.save(model, str(path))
    onnx.checker.check_model(str(path))
    loaded = qcompile.load(str(path))
    check(loaded)
    lg = loaded.graph
    assert lg.value("x").type == i3 and lg.value("bias").type == per_channel
    assert lg.value(w.name).type == TensorType(TERNARY, (4, 2))
    assert lg.value(mm.output.name).type == TensorType(int_type(24), (2, 2))
    assert lg.value(to_bipolar.output.name).type == TensorType(BIPOLAR, (2, 2))
    np.testing.assert_array_equal(lg.value(w.name).const_value, w.const_value)
    again = tmp_path / "again.onnx"
    qcompile.save(loaded, str(again))
    assert structure_difference(onnx.load(str(path)), onnx.load(str(again))) is None


# -- load errors ------------------------------------------------------------------------
def one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as e:
        qcompile.load(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_errors_name_the_file(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("graph main (float[2] x) => (float[2] y) { y = Relu(x) }\n")
    assert "text file" in one_line_error(text)
    data = mlp_with_external_data(str(tmp_path))
    full = onnx.load(data)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(full.SerializeToString()[: len(full.SerializeToString()) // 2])
    assert "truncated or corrupt" in one_line_error(truncated)
    assert "is a directory" in one_line_error(tmp_path)


def test_undefined_node_input_names_the_node(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["x", "ghost"], ["y"], name="add1")], "g", [info("x", [2])],
                              [info("y", [2])])
    path = tmp_path / "dangling.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    message = one_line_error(path)
    assert "node 'add1' (Add) input 1 'ghost' is not defined" in message


# -- opset upgrades ---------------------------------------------------------------------
def opset11_model():
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], axes=[1], keepdims=1, name="sum"),
             helper.make_node("Squeeze", ["s"], ["y"], axes=[1], name="squeeze")]
    graph = helper.make_graph(nodes, "reduce", [info("x", [2, 3])], [info("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return model


def test_upgrade_opset_converts_logs_and_leaves_the_original(caplog):
    proto = opset11_model()
    model = from_proto(proto)
    model.graph.nodes[0].metadata_props = {"origin": "layer1"}
    with caplog.at_level(logging.INFO, logger="qcompile.onnx_io"):
        upgraded = upgrade_opset(model, 13)
    assert "upgraded model 'reduce' from opset 11 to 13" in caplog.text
    assert model.opset == 11 and [len(n.inputs) for n in model.graph] == [1, 1]  # untouched
    assert upgraded.opset == 13 and upgraded.ir_version == 7
    assert [len(n.inputs) for n in upgraded.graph] == [2, 2]
    assert all(n.inputs[1].const is not None for n in upgraded.graph)  # axes became initializers
    assert upgraded.graph.nodes[0].metadata_props == {"origin": "layer1"}  # the converter drops it; restored
    check(upgraded)
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert compare_outputs(run_model(proto, x), run_model(to_proto(upgraded), x)) is None


def test_upgrade_opset_keeps_external_data(tmp_path):
    path = mlp_with_external_data(str(tmp_path))
    upgraded = upgrade_opset(qcompile.load(path), 21)
    assert upgraded.opset == 21 and upgraded.path == path
    assert upgraded.graph.initializers["w"].const.is_external
    out = tmp_path / "out"
    out.mkdir()
    qcompile.save(upgraded, str(out / "mlp.onnx"))
    x = {"x": np.ones((2, 4), np.float32)}
    assert compare_outputs(run_model(path, x), run_model(str(out / "mlp.onnx"), x)) is None


def test_upgrade_opset_keeps_qcompile_types():
    """The converter drops ValueInfo metadata, where these types travel: restored."""
    g = Graph("int")
    x = g.add_input(Value("x", TensorType(int_type(4), (2, 3), QuantParams(np.float32(0.5), np.int64(0)))))
    total = g.append(Node("ReduceSum", [x], {"axes": [1], "keepdims": 1}, name="sum"))
    total.output.type = TensorType(int_type(6), (2, 1))
    g.add_output(total.output)
    upgraded = upgrade_opset(Model(g, {"": 11}, ir_version=7), 13)
    assert upgraded.graph.inputs[0].type == x.type
    assert upgraded.graph.outputs[0].type == total.output.type


def test_upgrade_opset_errors_are_clear():
    model = from_proto(opset11_model())
    with pytest.raises(QCompileError, match="cannot upgrade from opset 11 to the older opset 9"):
        upgrade_opset(model, 9)
    with pytest.raises(QCompileError, match="the installed onnx knows opsets up to"):
        upgrade_opset(model, onnx.defs.onnx_opset_version() + 1)
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [info("x", [2])], [info("y", [2])])
    unknown = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    with pytest.raises(QCompileError, match="'NoSuchOp' is not an ONNX op the installed onnx knows"):
        upgrade_opset(unknown, 13)


def test_upgrade_to_the_same_opset_is_a_copy(caplog):
    model = from_proto(opset11_model())
    with caplog.at_level(logging.INFO, logger="qcompile.onnx_io"):
        same = upgrade_opset(model, 11)
    assert same is not model and same.opset == 11 and "upgraded" not in caplog.text
    assert structure_difference(to_proto(model), to_proto(same)) is None


def old_opset_cases():
    """The pytorch-* models at opsets 1-6 (34 of them use ops onnxruntime has no CPU
    kernel for at that opset)."""
    cases = []
    for case in data_dir_cases(("pytorch-converted", "pytorch-operator")):
        opset = onnx.load(case.path, load_external_data=False).opset_import[0].version
        if opset < 7:
            cases.append(case)
    return cases


# onnx's converter keeps PRelu's [C] slope as is, but from opset 7 on it broadcasts
# from the right, so these models no longer describe per-channel slopes.
CONVERTER_CANNOT = {f"pytorch-converted/test_PReLU_{d}d_multiparam": "PRelu" for d in (1, 2, 3)}


@pytest.mark.parametrize("case", old_opset_cases(), ids=lambda c: c.id)
def test_upgrade_opset_makes_old_models_runnable(case):
    """Old models stay at their opset unless asked; upgraded to 13 they run in
    onnxruntime and give onnx's reference outputs."""
    _, (inputs, *_) = case.load()
    model = qcompile.load(case.path)
    assert model.opset < 7
    folder = os.path.join(os.path.dirname(case.path), "test_data_set_0")
    expected = [numpy_helper.to_array(onnx.load_tensor(os.path.join(folder, f)))
                for f in sorted(os.listdir(folder)) if f.startswith("output_")]
    upgraded = to_proto(upgrade_opset(model, 13))
    if case.id in CONVERTER_CANNOT:
        with pytest.raises(Exception, match=CONVERTER_CANNOT[case.id]):
            run_model(upgraded, inputs)
        return
    for want, got in zip(expected, run_model(upgraded, inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, equal_nan=True)



def test_weights_as_inputs_export_drops_large_data_only():
    """to_proto(weights_as_inputs_over=N): big initializers become typed inputs, small
    ones (shapes, scalars) stay data; feeding the weights back gives the same outputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    shape = np.array([2, 32], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w.T.copy(), "w"), numpy_helper.from_array(shape, "shape")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    light = to_proto(model, weights_as_inputs_over=100)
    assert [t.name for t in light.graph.initializer] == ["shape"]
    assert [i.name for i in light.graph.input] == ["x", "w"]
    assert [d.dim_value for d in light.graph.input[1].type.tensor_type.shape.dim] == [32, 64]
    x = rng.standard_normal(64).astype(np.float32)
    full = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    fed = ort.InferenceSession(light.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(full.run(None, {"x": x})[0], fed.run(None, {"x": x, "w": w.T.copy()})[0])
