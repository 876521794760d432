"""Structure tests of the IR: use-def bookkeeping, safe mutation, ordering, types."""
import numpy as np
import pytest

from qcompile.ir import (
    BIPOLAR,
    FLOAT,
    INT8,
    TERNARY,
    CycleError,
    Graph,
    Model,
    Node,
    QuantParams,
    TensorType,
    Value,
    check,
    int_type,
    verify,
)


def chain():
    """x -> Relu -> Neg -> y, with the Relu output also read by an Add."""
    g = Graph("chain")
    x = g.add_input(Value("x", TensorType(FLOAT, (2, 3))))
    relu = g.append(Node("Relu", [x], name="relu"))
    neg = g.append(Node("Neg", [relu.output], name="neg"))
    add = g.append(Node("Add", [relu.output, neg.output], name="add"))
    g.add_output(add.output)
    return g, x, relu, neg, add


def test_uses_follow_input_changes():
    g, x, relu, neg, add = chain()
    assert relu.output.uses == [(neg, 0), (add, 0)]
    add.set_input(0, x)
    assert relu.output.uses == [(neg, 0)]
    assert (add, 0) in x.uses
    add.replace_input_with(neg.output, x)
    assert neg.output.uses == []
    assert x.uses == [(relu, 0), (add, 0), (add, 1)]
    check(g)


def test_replace_all_uses_moves_uses_and_graph_outputs():
    g, x, relu, neg, add = chain()
    moved = add.output.replace_all_uses_with(neg.output)
    assert moved == 0 and g.outputs == [neg.output]
    assert relu.output.replace_all_uses_with(x) == 2
    assert relu.output.uses == [] and neg.inputs == (x,)
    check(g)


def test_remove_refuses_node_in_use_and_names_users():
    g, x, relu, neg, add = chain()
    with pytest.raises(ValueError, match=r"cannot remove node 'relu' \(Relu\): used by 'neg' \(Neg\), 'add' \(Add\)"):
        g.remove(relu)
    with pytest.raises(ValueError, match="graph outputs"):
        g.remove(add)
    relu.output.replace_all_uses_with(x)
    g.remove(relu)
    assert relu.graph is None and x.uses == [(neg, 0), (add, 0)]
    check(g)


def test_new_values_get_unique_names():
    g, x, relu, neg, add = chain()
    n1 = g.append(Node("Relu", [x]))
    n2 = g.append(Node("Relu", [x]))
    assert n1.output.name and n2.output.name and n1.output.name != n2.output.name
    assert n1.output.name not in {"x", relu.output.name}


def test_sort_restores_topological_order_and_reports_cycles():
    g, x, relu, neg, add = chain()
    g._nodes.reverse()
    problems = verify(g)
    assert any("used before node" in p and "graph.sort()" in p for p in problems)
    g.sort()
    assert [n.name for n in g.nodes] == ["relu", "neg", "add"]
    check(g)
    relu.set_input(0, add.output)  # relu <- add <- neg <- relu
    with pytest.raises(CycleError, match="cycle"):
        g.sort()
    assert any("has a cycle" in p for p in verify(g))


def test_verifier_explains_undefined_input_and_domain():
    g = Graph("g")
    stray = Value("stray", TensorType(FLOAT, (1,)))
    n = g.append(Node("Relu", [stray], name="r", domain="com.example"))
    g.add_output(n.output)
    problems = verify(Model(g, {"": 17}))
    assert any("input 0 %stray is not defined" in p and "add it as a graph input" in p for p in problems)
    assert any("domain 'com.example'" in p and "opset_imports" in p for p in problems)


def test_verifier_rejects_duplicate_names():
    g = Graph("g")
    x = g.add_input(Value("x", TensorType(FLOAT, (1,))))
    n = g.append(Node("Relu", [x], outputs=[Value("x")]))
    g.add_output(n.output)
    assert any("defined twice" in p for p in verify(g))


def test_integer_types_any_width():
    assert int_type(8) is INT8 or int_type(8) == INT8
    i3 = int_type(3)
    assert (i3.min, i3.max, i3.bits, str(i3)) == (-4, 3, 3, "i3")
    u5 = int_type(5, signed=False)
    assert (u5.min, u5.max) == (0, 31)
    assert int_type(4).is_onnx_native and not i3.is_onnx_native
    assert i3.numpy_dtype == np.int8 and int_type(12).numpy_dtype == np.int16
    assert int_type(32).max == 2**31 - 1
    assert (TERNARY.min, TERNARY.max) == (-1, 1)
    assert BIPOLAR.contains(np.array([1, -1])) and not BIPOLAR.contains(np.array([0]))
    assert i3.contains(np.array([-4, 3])) and not i3.contains(np.array([4]))
    with pytest.raises(ValueError, match="BIPOLAR"):
        int_type(1, signed=True)
    with pytest.raises(ValueError):
        int_type(33)


def test_quantized_tensor_type():
    q = QuantParams(np.array([0.1, 0.2], np.float32), np.array([0, 0]), axis=0)
    t = TensorType(int_type(4), (2, 3), q)
    assert str(t) == "i4[2,3]{axis=0, channels=2}"
    assert t.quant == QuantParams(np.array([0.1, 0.2]), np.array([0, 0]), axis=0)
    with pytest.raises(ValueError, match="integer type"):
        TensorType(FLOAT, (2,), QuantParams(np.float32(0.1), np.int64(0)))
    with pytest.raises(ValueError, match="positive"):
        QuantParams(np.float32(0.0), np.int64(0))
    with pytest.raises(ValueError, match="scalar"):
        QuantParams(np.array([0.1], np.float32), np.array([0]), axis=None)


def test_networkx_view_and_constants():
    g, x, relu, neg, add = chain()
    nxg = g.to_networkx()
    assert sorted(nxg.edges) == [(0, 1), (0, 2), (1, 2)]
    c = g.make_constant(np.ones((2, 3), np.float32), "one")
    add.set_input(1, c)
    assert c.is_initializer and c.type == TensorType(FLOAT, (2, 3))
    assert g.find_cycle() is None
    with pytest.raises(ValueError, match="used by"):
        g.remove_initializer(c.name)


def test_removing_a_node_with_a_subgraph_releases_captured_values():
    g = Graph("outer")
    x = g.add_input(Value("x", TensorType(FLOAT, (1,))))
    relu = g.append(Node("Relu", [x], name="relu"))
    body = Graph("then")
    inner = body.append(Node("Neg", [relu.output], name="neg"))
    body.add_output(inner.output)
    cond = g.add_input(Value("c", TensorType(FLOAT, ())))
    branch = g.append(Node("If", [cond], {"then_branch": body, "else_branch": body}, name="if"))
    assert relu.output.users == [inner]
    assert g.captured_values(branch) == [relu.output]
    g.remove(branch)
    assert relu.output.uses == [] and inner.inputs == (relu.output,)
    g.append(branch)  # re-inserting restores the captured use
    assert relu.output.users == [inner]
