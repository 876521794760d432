"""Tiny ONNX models for tests, built with onnx.helper, and an onnxruntime runner that
compares our rewrites rather than onnxruntime's own graph optimisations."""
import os

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


def light_as_constants(proto):
    """An onnx 'light' model with its initializers no longer graph inputs (IR 3 required
    them there, which makes them overridable, so not constants)."""
    names = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto.ir_version = 8
    return proto


def light_random_weights(proto, seed=0):
    """An onnx 'light' model with seeded random weights in place of its all-zero
    ConstantOfShape generators (so outputs are not degenerate), as constants."""
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    readers = {}
    for n in proto.graph.node:
        for k, name in enumerate(n.input):
            readers.setdefault(name, (n.op_type, k))
    nodes = []
    for n in proto.graph.node:
        if n.op_type != "ConstantOfShape":
            nodes.append(n)
            continue
        shape = tuple(int(d) for d in shapes[n.input[0]])
        op, k = readers[n.output[0]]
        if op == "BatchNormalization" and k in (1, 4):
            data = rng.uniform(0.5, 1.5, shape)
        elif op in ("BatchNormalization", "Mul", "Add"):
            data = rng.normal(0, 0.2, shape) + (1.0 if op == "Mul" else 0.0)
        else:
            data = rng.normal(0, np.sqrt(1 / max(1, int(np.prod(shape[1:])))), shape)
        proto.graph.initializer.append(numpy_helper.from_array(data.astype(np.float32), n.output[0]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return light_as_constants(proto)


LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def light_model(name, seed=0):
    """(model, input name, per-sample input shape) of the onnx package's light_{name}.onnx
    with seeded random weights (`light_random_weights`); the test is skipped where the
    onnx package ships no light models."""
    path = os.path.join(LIGHT_DIR, f"light_{name}.onnx")
    if not os.path.exists(path):
        import pytest

        pytest.skip("the onnx package ships no light models here")
    proto = light_random_weights(onnx.load(path), seed)
    inp = proto.graph.input[0]
    return proto, inp.name, [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
