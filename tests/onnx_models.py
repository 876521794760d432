"""Tiny ONNX models for tests, built with onnx.helper, and an onnxruntime runner that
compares our rewrites rather than onnxruntime's own graph optimisations."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def build(nodes, inputs, outputs, inits=None, opset=17, subgraph=False):
    """A ModelProto (or, with `subgraph`, a GraphProto) from onnx.helper nodes; inputs
    and outputs map names to shapes (None: unknown) or to ValueInfoProtos, inits names
    to arrays."""
    def info(name, shape):
        return shape if isinstance(shape, onnx.ValueInfoProto) else helper.make_tensor_value_info(name, F, shape)

    graph = helper.make_graph(nodes, "g", [info(n, s) for n, s in inputs.items()],
                              [info(n, s) for n, s in outputs.items()],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()])
    if subgraph:
        return graph
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


def run_ort(proto, feeds):
    """{output name: array}, onnxruntime's graph optimisations off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
