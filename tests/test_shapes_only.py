"""The integer reference's shapes-only pass (`integer_graph_shapes`), which the lowering
uses instead of running the graph on zeros: every tensor's shape and element type, and
the value of every tensor that does not depend on the data, equal what the full run
gives; where a shape needs the data it says so, and the lowering falls back to the full
run with the same program."""
import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backend import reference
from qcompile.backend.lowering import compile_program
from qcompile.backend.reference import ShapesNeedValues, integer_graph_shapes, run_integer_graph
from qcompile.backend.target import load_target
from qcompile.onnx_io import from_proto

F = TensorProto.FLOAT
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
RNG = np.random.default_rng(3)


def _w(*shape):
    return (RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _integer(nodes, inputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    concrete = {n: [d if isinstance(d, int) else 1 for d in s] for n, s in inputs}   # "N": a batch of 1
    model.annotations["calibration_data"] = [{n: RNG.standard_normal(s).astype(np.float32) for n, s in
                                              concrete.items()} for _ in range(4)]
    return qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model


def _conv(x="x", y="y", w=None, **attrs):
    return helper.make_node("Conv", [x, "w"] + (["b"] if w is None else []), [y], **attrs)


CASES = {
    "conv_pads_strides_dilations": lambda: _integer(
        [_conv(kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])],
        [("x", [1, 4, 11, 9])], [("w", _w(5, 4, 3, 3)), ("b", _w(5))]),
    "grouped_and_depthwise_conv": lambda: _integer(
        [helper.make_node("Conv", ["x", "w"], ["a"], group=2, kernel_shape=[3, 3], pads=[1] * 4),
         helper.make_node("Conv", ["a", "dw"], ["y"], group=6, kernel_shape=[3, 3], strides=[2, 2])],
        [("x", [1, 4, 10, 10])], [("w", _w(6, 2, 3, 3)), ("dw", _w(6, 1, 3, 3))]),
    "max_pool_ceil_and_average_pools": lambda: _integer(
        [_conv(y="c", w=False, kernel_shape=[1, 1]),
         helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4, ceil_mode=1),
         helper.make_node("AveragePool", ["m"], ["p"], kernel_shape=[2, 2], pads=[1] * 4, ceil_mode=1,
                          count_include_pad=0),
         helper.make_node("AveragePool", ["m"], ["q"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["p"], ["g"]),
         helper.make_node("Flatten", ["q"], ["qf"]), helper.make_node("Flatten", ["g"], ["gf"]),
         helper.make_node("Concat", ["qf", "gf"], ["y"], axis=1)],
        [("x", [1, 3, 13, 10])], [("w", _w(3, 3, 1, 1))]),
    "gemm_transb_matmul_softmax": lambda: _integer(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
         helper.make_node("MatMul", ["g", "v"], ["m"]), helper.make_node("Softmax", ["m"], ["y"])],
        [("x", [3, 20])], [("w", _w(12, 20)), ("b", _w(12)), ("v", _w(12, 7))]),
    "matmul_of_two_activations": lambda: _integer(
        [helper.make_node("MatMul", ["q", "k"], ["y"])], [("q", [1, 2, 5, 8]), ("k", [1, 2, 8, 5])]),
    "add_mul_broadcast_tables_transpose": lambda: _integer(
        [_conv(y="c", w=False, kernel_shape=[1, 1]), helper.make_node("Add", ["c", "s"], ["a"]),
         helper.make_node("Mul", ["a", "c"], ["m"]), helper.make_node("Sigmoid", ["m"], ["sg"]),
         helper.make_node("Transpose", ["sg"], ["y"], perm=[0, 2, 3, 1])],
        [("x", [1, 4, 6, 5]), ("s", [1, 1, 6, 5])], [("w", _w(4, 4, 1, 1))]),
    "slice_and_reduce": lambda: _integer(
        [_conv(y="c", w=False, kernel_shape=[1, 1]),
         helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["s"]),
         helper.make_node("ReduceMean", ["s", "rax"], ["y"], keepdims=0)],
        [("x", [1, 5, 9, 8])], [("w", _w(5, 5, 1, 1)), ("st", np.array([1, -7], np.int64)),
                                ("en", np.array([9, 8], np.int64)), ("ax", np.array([2, 3], np.int64)),
                                ("sp", np.array([2, 1], np.int64)), ("rax", np.array([1], np.int64))], opset=18),
    "reshape_to_a_computed_shape": lambda: _integer(
        [_conv(y="c", w=False, kernel_shape=[1, 1]), helper.make_node("Shape", ["c"], ["sh"]),
         helper.make_node("Gather", ["sh", "i0"], ["n"], axis=0), helper.make_node("Unsqueeze", ["n", "u"], ["nu"]),
         helper.make_node("Concat", ["nu", "m1"], ["ns"], axis=0), helper.make_node("Reshape", ["c", "ns"], ["y"])],
        [("x", ["N", 3, 4, 4])], [("w", _w(3, 3, 1, 1)), ("i0", np.array(0, np.int64)),
                                ("u", np.array([0], np.int64)), ("m1", np.array([-1], np.int64))]),
}


def _digits():
    model = qcompile.load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"][:8]
    model.annotations["calibration_data"] = [{"input": x} for x in calib]
    return qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model


CASES["digits_example"] = _digits


def _input_specs(model):
    return {v.name: (tuple(d if isinstance(d, int) else 1 for d in v.type.shape), v.type.dtype.numpy_dtype)
            for v in model.graph.inputs if v.const_value is None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_types_and_static_values_are_the_full_runs(case):
    model = CASES[case]()
    specs = _input_specs(model)
    shapes, dtypes, values = integer_graph_shapes(model, specs)
    names = [v.name for v in model.graph.values() if v.const_value is None]
    env = run_integer_graph(model, {k: np.zeros(s, d) for k, (s, d) in specs.items()}, outputs=names)
    for name, a in env.items():
        assert shapes[name] == a.shape, name
        assert dtypes[name] == a.dtype, name
        if name in values:          # a value that does not depend on the data: exactly the run's
            assert values[name].dtype == a.dtype and np.array_equal(values[name], a), name
    if case == "reshape_to_a_computed_shape":
        assert {"sh", "n", "nu", "ns"} <= set(values)
    data_dependent = {v.name for v in model.graph.values() if v.producer is not None and v.producer.domain ==
                      "qcompile.int"}
    assert not data_dependent & set(values)


@pytest.mark.parametrize("case", ["digits_example", "reshape_to_a_computed_shape", "max_pool_ceil_and_average_pools"])
def test_the_fallback_to_the_full_run_compiles_the_same_program(case, monkeypatch):
    model = CASES[case]()
    target = load_target("rain-sim")
    fast = compile_program(model, target).to_bytes()

    def refuse(*_):
        raise ShapesNeedValues("as if a shape depended on the data")

    monkeypatch.setattr(reference, "integer_graph_shapes", refuse)
    assert compile_program(model, target).to_bytes() == fast


def test_a_shape_that_depends_on_the_data_is_refused_not_guessed():
    model = CASES["gemm_transb_matmul_softmax"]()
    softmax = next(n for n in model.graph.nodes if n.op_type == "Softmax")
    softmax.op_type = "NonZero"      # its output shape is the count of nonzeros
    with pytest.raises(ShapesNeedValues, match="depends on the data"):
        integer_graph_shapes(model, _input_specs(model))
