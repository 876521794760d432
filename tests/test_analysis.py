"""Shape inference, MAC counts, summaries and DOT output."""
import io
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompile.analysis import format_summary, infer_shapes, node_macs, summarize, to_dot
from qcompile.onnx_io import from_proto


def single_op_model(op, inputs, output_shape, inits=(), **attrs):
    """One node; `inputs` are (name, shape) pairs, `inits` initializers."""
    names = [n for n, _ in inputs] + [t.name for t in inits]
    node = helper.make_node(op, names, ["y"], name="the_op", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], list(inits))
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)
    return model


def weight(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel())


@pytest.mark.parametrize("op, inputs, inits, attrs, expected", [
    # 3x3 stride-2 conv with padding: out [1,4,4,4]; 4*16 outputs x 3*9 taps
    ("Conv", [("x", [1, 3, 8, 8])], [weight("w", [4, 3, 3, 3])], dict(strides=[2, 2], pads=[1, 1, 1, 1]), 1728),
    # depthwise: 8 channels x 64 positions x 9 taps
    ("Conv", [("x", [1, 8, 8, 8])], [weight("w", [8, 1, 3, 3])], dict(group=8, pads=[1, 1, 1, 1]), 4608),
    # dilated conv: out 4x4 = (8 - 2*2 - 1 + 1)
    ("Conv", [("x", [2, 1, 8, 8])], [weight("w", [2, 1, 3, 3])], dict(dilations=[2, 2]), 2 * 2 * 16 * 9),
    # batched, broadcast MatMul: [2,3,4,5] @ [5,6] -> 144 outputs x 5
    ("MatMul", [("a", [2, 3, 4, 5])], [weight("b", [5, 6])], {}, 720),
    ("Gemm", [("a", [2, 4])], [weight("b", [3, 4])], dict(transB=1), 24),
    # ConvTranspose: each of 2*9 inputs scatters into 4 channels x 4 taps
    ("ConvTranspose", [("x", [1, 2, 3, 3])], [weight("w", [2, 4, 2, 2])], dict(strides=[2, 2]), 288),
    ("Relu", [("x", [4, 4])], [], {}, 0),
])
def test_macs_by_hand(op, inputs, inits, attrs, expected):
    model = single_op_model(op, inputs, None, inits, **attrs)
    assert node_macs(model.graph.nodes[0]) == expected


def test_lstm_macs():
    # seq 5, batch 2, input 3, hidden 4: 4 gates x 4 x (3 + 4) per step and sample
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=4)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight("w", [1, 16, 3]), weight("r", [1, 16, 4])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert node_macs(model.graph.nodes[0]) == 5 * 2 * 4 * 4 * 7


def test_unknown_shapes_give_none_not_a_guess():
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)
    s = summarize(model)
    assert node_macs(model.graph.nodes[0]) is None and s.unknown_macs == ["MatMul"]


def test_torch_cnn_macs_match_module_layers():
    """Expected MACs computed from the torch layers themselves, via forward hooks."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()
    expected = 0

    def hook(module, inputs, output):
        nonlocal expected
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            expected += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, torch.nn.Linear):
            expected += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net]
    x = torch.randn(1, 3, 16, 16)
    net(x)
    for h in handles:  # the exporter runs forward again
        h.remove()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17)
    model = from_proto(onnx.load_from_string(buf.getvalue()))
    infer_shapes(model)
    s = summarize(model)
    assert s.total_macs == expected
    assert s.params == sum(p.numel() for p in net.parameters())


def test_summary_text_json_and_params():
    model = single_op_model("Gemm", [("a", [2, 4])], None, [weight("b", [3, 4]), weight("c", [3])], transB=1)
    s = summarize(model)
    assert (s.params, s.param_bytes, s.total_macs, s.num_nodes) == (15, 60, 24, 1)
    assert s.op_histogram == {"Gemm": 1}
    assert s.inputs == [{"name": "a", "dtype": "f32", "shape": [2, 4]}]
    data = json.loads(json.dumps(s.to_dict()))
    assert data["nodes"][0]["macs"] == 24 and data["nodes"][0]["params"] == 15
    text = format_summary(s)
    assert "params   15 (60 B; f32 15)" in text and "MACs     24 (24 MAC)" in text
    assert text.splitlines()[-1].split() == ["0", "the_op", "Gemm", "f32[2,4]", "f32[3,4]", "f32[3]", "f32[2,3]",
                                             "15", "24"]


def test_symbolic_batch_is_taken_as_one():
    model = single_op_model("MatMul", [("a", ["N", 4])], None, [weight("b", [4, 3])])
    s = summarize(model)
    assert s.total_macs == 12 and s.symbolic_dims == ["N"]
    assert "symbolic dims N taken as 1" in format_summary(s)


def test_dot_output_escapes_and_connects():
    model = single_op_model("Gemm", [('a"b', [2, 4])], None, [weight("w", [3, 4])], transB=1)
    dot = to_dot(model.graph)
    assert dot.startswith('digraph "g" {') and dot.rstrip().endswith("}")
    assert 'label="a\\"b\\nf32[2,4]"' in dot
    assert "input0 -> node0" in dot and "node0 -> output0" in dot
    assert "w: f32[3,4]" in dot  # weights folded into the node label
    assert "init0" in to_dot(model.graph, show_initializers=True)
