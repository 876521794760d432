"""Golden text of the IR printer: stable, deterministic, subgraphs nested."""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.ir import print_model
from qcompile.onnx_io import from_proto

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def small_model():
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.arange(36, dtype=np.float32).tolist())
    then_g = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("LeakyRelu", ["z"], ["out"], alpha=0.1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_printer_golden():
    text = print_model(from_proto(small_model()))
    with open(os.path.join(GOLDEN, "tiny_if.txt")) as f:
        assert text == f.read()


def test_printer_is_deterministic():
    assert print_model(from_proto(small_model())) == print_model(from_proto(small_model()))
    onnx.checker.check_model(small_model())
