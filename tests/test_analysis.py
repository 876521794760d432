"""Shape inference, MAC counts, summaries and DOT output."""
import io
import json
import re
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
    x = torch.randn(1, 3, 16, 16)
    expected = _layer_macs(torch, net, x)
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


# -- shape inference ---------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]))


def _types(model):
    return {v.name: str(v.type) for g in model.graph.walk() for v in g.values()}


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_infer_shapes_folds_shape_arithmetic_and_counts_changes():
    """Shape -> Gather -> Concat -> Reshape resolves through data propagation; the
    symbolic batch survives; the count is the values whose type changed."""
    idx = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    twelve = helper.make_tensor("m", TensorProto.INT64, [1], [12])
    model = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["n"]),
                    helper.make_node("Concat", ["n", "m"], ["t"], axis=0),
                    helper.make_node("Reshape", ["x", "t"], ["y"])],
                   [_vi("x", ["N", 3, 4])], [_vi("y", None)], [idx, twelve])
    before = _types(model)
    assert infer_shapes(model) == 4  # s, n, t new; y gains its shape
    after = _types(model)
    assert after["y"] == "f32[N,12]" and after["t"] == "i64[2]"
    assert {k: v for k, v in after.items() if k in ("x", "i", "m")} == {k: before[k] for k in ("x", "i", "m")}
    assert infer_shapes(model) == 0  # idempotent
    assert [n.op_type for n in model.graph.nodes] == ["Shape", "Gather", "Concat", "Reshape"]


def test_infer_shapes_keeps_qcompile_types_and_merges_dims():
    """An int3 value (stored as int8) stays int3; a known dim beats an unknown one;
    ONNX's invented `unk__` symbols become unknown."""
    from qcompile.ir import TensorType, int_type

    model = _model([helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Reshape", ["b", "s"], ["y"])],
                   [_vi("x", [2, 8], TensorProto.INT8), _vi("s", [2], TensorProto.INT64)],
                   [_vi("y", None, TensorProto.INT8)])
    a = model.graph.value("a")
    a.type = TensorType(int_type(3), (None, 8))
    infer_shapes(model)
    assert str(a.type) == "i3[2,8]"
    assert str(model.graph.value("b").type) == "i8[2,8]"
    assert str(model.graph.value("y").type) == "i8[?,?]"  # rank from `s`, sizes unknown, no unk__ names


def test_infer_shapes_survives_ops_it_cannot_type():
    """A custom-domain op (not even imported) and an unknown standard op leave their
    outputs alone; every other value is still typed."""
    model = _model([helper.make_node("Foo", ["x"], ["a"], domain="my.ops"), helper.make_node("Relu", ["x"], ["b"]),
                    helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("NoSuchOp", ["b"], ["d"]),
                    helper.make_node("Sigmoid", ["b"], ["y"])],
                   [_vi("x", [1, 4])], [_vi("y", None)])
    assert infer_shapes(model) >= 2
    types = _types(model)
    assert types["a"] == "None" and types["d"] == "None"
    assert types["b"] == "f32[1,4]" and types["y"] == "f32[1,4]"


def test_infer_shapes_falls_back_node_by_node(monkeypatch):
    """When whole-model inference raises, each node is inferred on its own (constant
    shape inputs included) and failures are skipped."""
    def broken(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("simulated failure")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [0, -1])
    model = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Foo", ["a"], ["b"], domain="my.ops"),
                    helper.make_node("Reshape", ["a", "s"], ["c"]), helper.make_node("Add", ["b", "c"], ["y"])],
                   [_vi("x", ["N", 3, 4])], [_vi("y", None)], [shape], opsets=(("", 17), ("my.ops", 1)))
    assert infer_shapes(model) == 2
    types = _types(model)
    assert (types["a"], types["b"], types["c"]) == ("f32[N,3,4]", "None", "f32[N,12]")


def test_infer_shapes_types_subgraphs_and_large_weights():
    """Values inside an If branch get types; a large initializer is typed as an input
    to inference (its data is never needed for shapes) and keeps its data."""
    big = np.arange(64 * 40, dtype=np.float32).reshape(64, 40)
    then_graph = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [], [_vi("t", None)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [], [_vi("e", None)])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                    helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                   [_vi("x", [2, 64]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", None)],
                   [onnx.numpy_helper.from_array(big, "w")])
    infer_shapes(model)
    types = _types(model)
    assert (types["h"], types["t"], types["e"], types["y"]) == ("f32[2,40]",) * 4
    assert model.graph.initializers["w"].const_value is not None
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value, big)
    assert [v.name for v in model.graph.inputs] == ["x", "cond"]


# -- more MAC counts: attention, einsum, recurrent and residual torch models ------------
@pytest.mark.parametrize("node, inputs, expected", [
    # 4-D attention: 2 batches x 4 heads x 6 queries x 10 keys x (8 for QK^T + 16 for PV)
    (helper.make_node("Attention", ["q", "k", "v"], ["y"]),
     [("q", [2, 4, 6, 8]), ("k", [2, 2, 10, 8]), ("v", [2, 2, 10, 16])], 2 * 4 * 6 * 10 * (8 + 16)),
    # the same in the 3-D layout with head counts as attributes
    (helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2),
     [("q", [2, 6, 32]), ("k", [2, 10, 16]), ("v", [2, 10, 32])], 2 * 4 * 6 * 10 * (8 + 16)),
    # past keys lengthen the key sequence to 13
    (helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"]),
     [("q", [2, 4, 6, 8]), ("k", [2, 2, 10, 8]), ("v", [2, 2, 10, 16]), ("pk", [2, 2, 3, 8]), ("pv", [2, 2, 3, 16])],
     2 * 4 * 6 * 13 * (8 + 16)),
    (helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik"), [("a", [2, 3, 4]), ("b", [2, 4, 5])], 120),
    (helper.make_node("Einsum", ["a", "b"], ["y"], equation="...ij,...jk"), [("a", [2, 3, 4]), ("b", [2, 4, 5])], 120),
    # 3-D conv (any rank): 2 x 4 x 3^3 outputs (padding 1) x 2 channels x 27 taps
    (helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 6), [("x", [2, 2, 3, 3, 3]), ("w", [4, 2, 3, 3, 3])],
     2 * 4 * 27 * 2 * 27),
])
def test_macs_attention_einsum_conv3d(node, inputs, expected):
    graph = helper.make_graph([node], "g", [_vi(n, s) for n, s in inputs], [_vi(o, None) for o in node.output])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    infer_shapes(model)
    assert node_macs(model.graph.nodes[0]) == expected


def _layer_macs(torch, module, *args):
    """MACs of the Conv/Linear/LSTM layers of `module`, from the layers' own sizes and
    the shapes forward hooks see (not from the ONNX graph)."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        if isinstance(layer, torch.nn.Conv2d):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += output.numel() * (layer.in_channels // layer.groups) * k
        elif isinstance(layer, torch.nn.Linear):
            total += output.numel() * layer.in_features
        elif isinstance(layer, torch.nn.LSTM):
            batch, seq = inputs[0].shape[:2] if layer.batch_first else inputs[0].shape[1::-1]
            dirs = 2 if layer.bidirectional else 1
            h = layer.hidden_size
            for i in range(layer.num_layers):
                size_in = layer.input_size if i == 0 else dirs * h
                total += seq * batch * dirs * 4 * h * (size_in + h)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(*args)
    for h in handles:
        h.remove()
    return total


def test_resnet_macs_match_torch_layers():
    """The residual CNN of the torch tests (BatchNorm folded by the exporter, strided
    1x1 projections, residual Adds): summary MACs equal the layers' MACs."""
    torch = pytest.importorskip("torch")
    import qcompile
    from torch_models import resnet

    module, args = resnet()
    expected = _layer_macs(torch, module, *args)
    model = qcompile.from_torch(module, args)
    infer_shapes(model)
    s = summarize(model)
    assert s.unknown_macs == [] and s.total_macs == expected
    assert s.op_histogram["Conv"] == 6 and sum(r.macs for r in s.nodes if r.op == "Conv") > 0


def test_bidirectional_lstm_macs_match_torch_layers():
    torch = pytest.importorskip("torch")
    import qcompile

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 16, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(3, 7, 6)
    model = qcompile.from_torch(lstm, x)
    infer_shapes(model)
    s = summarize(model)
    assert s.op_histogram["LSTM"] == 2
    assert s.total_macs == _layer_macs(torch, lstm, x) == 3 * 7 * 2 * 4 * 16 * (6 + 16 + 32 + 16)


# -- DOT ---------------------------------------------------------------------------------
_DOT_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<arrow>->)|(?P<id>[A-Za-z_][A-Za-z0-9_]*|-?[0-9.]+)'
                        r'|(?P<punct>[{}\[\];,=]))', re.S)


def _dot_statements(text):
    """Tokenize DOT (failing on anything that is not a DOT token) and return the node
    ids declared and the edges, checking brackets balance."""
    pos, tokens = 0, []
    while pos < len(text.rstrip()):
        m = _DOT_TOKEN.match(text, pos)
        assert m, f"not DOT at {text[pos:pos + 40]!r}"
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    depth = {"{": 0, "[": 0}
    for kind, tok in tokens:
        if tok in "{[":
            depth[tok] += 1
        elif tok in "}]":
            depth["{" if tok == "}" else "["] -= 1
            assert min(depth.values()) >= 0
    assert depth == {"{": 0, "[": 0}
    nodes, edges = set(), []
    statements, current, in_attrs = [], [], False
    for kind, tok in tokens[3:-1]:  # inside `digraph "name" { ... }`
        in_attrs = (in_attrs or tok == "[") and tok != "]"
        if tok == ";" and not in_attrs:
            statements.append(current)
            current = []
        else:
            current.append(tok)
    for st in statements:
        if len(st) > 2 and st[1] == "->":
            edges.append((st[0], st[2]))
        elif st and st[0] not in ("node", "edge", "graph") and (len(st) == 1 or st[1] == "["):
            nodes.add(st[0])
    return nodes, edges


def test_dot_is_valid_with_hostile_names_and_shows_kinds():
    """Names with quotes, backslashes, braces and newlines stay inside their strings;
    every edge joins declared nodes; inputs, outputs and initializers look different."""
    nasty = 'x "quoted" \\ back{slash}\nnew;line'
    graph = helper.make_graph(
        [helper.make_node("MatMul", [nasty, "w"], ["h"], name='mm "1"'), helper.make_node("Relu", ["h"], ["y\\n"])],
        'graph "g"', [_vi(nasty, [2, 4])], [_vi("y\\n", None)], [weight("w", [4, 3])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)
    for show in (False, True):
        dot = to_dot(model.graph, show_initializers=show)
        nodes, edges = _dot_statements(dot)
        assert edges and all(a in nodes and b in nodes for a, b in edges)
        assert ("init0" in nodes) is show
        lines = {ident: line for ident in nodes for line in dot.splitlines() if line.strip().startswith(ident + " [")}
        shapes = {re.search(r"shape=(\w+)", lines[i]).group(1) if "shape=" in lines[i] else "box" for i in nodes}
        assert {"ellipse", "box"} <= shapes and (("note" in shapes) is show)
    assert '\\"quoted\\" \\\\ back{slash}\\nnew;line' in dot
    assert 'y\\\\n\\nf32[2,3]' in dot
