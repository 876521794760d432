"""HOST operations run for all inferences at once only where the op treats dimension 0 as
the batch: which one-node models qualify, and bit-exactness against one-at-a-time runs."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.backend.lowering import compile_program
from qcompile.backend.program import Program
from qcompile.backend.reference import run_integer_graph
from qcompile.backend.simulator import simulate
from qcompile.backend.simulator.host import _batchable
from qcompile.backend.target import load_target
from qcompile.onnx_io import from_proto

F = TensorProto.FLOAT


def _one_node(op, inputs, output_shape, inits=(), opset=17, **attrs):
    """A one-node model: `inputs` are (name, shape) fed tensors, `inits` (name, array) constants."""
    names = [n for n, _ in inputs] + [n for n, _ in inits]
    graph = helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", F, output_shape)],
                              [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("proto, ok", [
    (_one_node("Relu", [("x", [1, 3, 4])], [1, 3, 4]), True),
    (_one_node("Add", [("x", [1, 3, 4])], [1, 3, 4], inits=[("c", np.ones((3, 4), np.float32))]), True),
    (_one_node("Add", [("x", [1, 3, 4])], [1, 3, 4], inits=[("c", np.ones((1, 3, 4), np.float32))]), True),
    # a fed operand of lower rank: stacking inferences would broadcast them onto axis 1
    (_one_node("Add", [("x", [1, 3, 1]), ("z", [1, 1])], [1, 3, 1]), False),
    # a constant operand of full rank that Concat would have to repeat per inference
    (_one_node("Concat", [("x", [1, 3])], [1, 5], inits=[("c", np.ones((1, 2), np.float32))], axis=1), False),
    (_one_node("Concat", [("x", [1, 3]), ("z", [1, 2])], [1, 5], axis=1), True),
    (_one_node("Concat", [("x", [1, 3])], [1, 3], axis=0), False),   # along the batch axis
    (_one_node("Flatten", [("x", [1, 2, 3, 4])], [1, 24], axis=1), True),
    (_one_node("Flatten", [("x", [1, 2, 3, 4])], [1, 24]), True),      # axis 1 by default
    (_one_node("Flatten", [("x", [1, 2, 3, 4])], [1, 24], axis=0), False),
    (_one_node("Softmax", [("x", [1, 6])], [1, 6], axis=-1), True),
    (_one_node("Softmax", [("x", [1, 6])], [1, 6], axis=0), False),
    (_one_node("Transpose", [("x", [1, 2, 3])], [1, 3, 2], perm=[0, 2, 1]), True),
    (_one_node("Transpose", [("x", [1, 1, 3])], [1, 1, 3], perm=[1, 0, 2]), False),  # moves the batch axis
    (_one_node("ReduceSum", [("x", [1, 6])], [1, 1]), False),         # not a known per-sample op
    (_one_node("Relu", [("x", [2, 3])], [2, 3]), False),              # dimension 0 is not 1
])
def test_which_host_ops_run_batched(proto, ok):
    assert _batchable(proto) is ok


def test_batched_host_ops_match_the_reference_sample_by_sample():
    """A float graph whose every op runs on the host (Softmax, LayerNormalization, Concat,
    Transpose, a broadcasting Mul, and ReduceSum, which is not batched): the simulator's
    outputs for 7 samples equal the reference's one sample at a time, bit for bit."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Softmax", ["x"], ["s"], axis=-1),
        helper.make_node("LayerNormalization", ["s", "g", "b"], ["l"], axis=-1),
        helper.make_node("Concat", ["l", "x"], ["c"], axis=2),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["t", "k"], ["m"]),
        helper.make_node("ReduceSum", ["m", "ax"], ["y"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 6])],
        [helper.make_tensor_value_info("y", F, [1, 12, 1])],
        [numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "g"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
         numpy_helper.from_array(rng.standard_normal((12, 1)).astype(np.float32), "k"),
         numpy_helper.from_array(np.array([2], np.int64), "ax")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model = qcompile.PassManager.parse("infer-shapes").run(model).model
    target = load_target("rain-sim")
    prog = Program.from_bytes(compile_program(model, target).to_bytes())
    assert {h.op_type for h in prog.host_ops} >= {"Softmax", "LayerNormalization", "Concat", "Transpose", "Mul",
                                                  "ReduceSum"}
    import onnx

    batched = {h.op_type: _batchable(onnx.load_from_string(h.model)) for h in prog.host_ops}
    assert batched["Softmax"] and batched["LayerNormalization"] and batched["Transpose"] and batched["Mul"]
    assert not batched["ReduceSum"]
    x = rng.standard_normal((7, 1, 4, 6)).astype(np.float32)
    got = simulate(prog, target, {"x": x}, timing=False).outputs["y"]
    want = np.stack([run_integer_graph(model, {"x": x[i]})["y"] for i in range(7)])
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_an_op_on_constants_alone_is_not_batched():
    """Its output is one tensor, not one per inference (the transformer's Quantize of the
    constant 1/sqrt(d) scale)."""
    c = numpy_helper.from_array(np.array([0.5], np.float32), "c")
    graph = helper.make_graph([helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("c", F, [1])],
                              [helper.make_tensor_value_info("y", F, [1])], [c])
    assert _batchable(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) is False
