"""The pattern rewriter (qcompile.rewrite): patterns, rules, rule sets and the driver,
on tiny hand-built graphs, with onnxruntime checking that rewrites keep the numbers."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile.ir import Graph, Node, print_graph
from qcompile.onnx_io import from_proto, to_proto
from qcompile.rewrite import (
    Const, Failure, Match, Op, Rule, RuleSet, Var, apply_rules, constant_value, fail,
)

from onnx_models import F, build, run_ort


def rng_feeds(proto, seed=0):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in proto.graph.input}


def assert_same_numbers(before, model, exact=False):
    """onnxruntime gives the same outputs, under the same names, before and after."""
    qcompile.check(model)
    after = to_proto(model)
    feeds = rng_feeds(before)
    want, got = run_ort(before, feeds), run_ort(after, feeds)
    assert list(got) == list(want)
    for name in want:
        if exact:
            np.testing.assert_array_equal(got[name], want[name])
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def ops(graph):
    return [n.op_type for n in graph.nodes]


# -- rules used by these tests --------------------------------------------------------
def _zero(m):
    c = m.const("c")
    return True if not np.any(c) else fail(f"%{m['c'].name} is not zero", m["c"])


ADD_ZERO = Rule("add-zero", Op("Add", Var("x"), Const("c"), name="add", commutative=True),
                lambda m, g: m["x"], check=_zero)

GEMM_PATTERN = Op("Add", Op("MatMul", Var("a"), Const("b"), name="mm"), Const("c"), name="add", commutative=True)
FUSE = Rule("fuse", GEMM_PATTERN, lambda m, g: m.emit("Gemm", [m["a"], m["b"], m["c"]]).outputs[0])


def matmul_add(swap=False, extra_user=False):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "b"], ["m"], name="mm"),
             helper.make_node("Add", ["c", "m"] if swap else ["m", "c"], ["y"], name="add")]
    outputs = {"y": [2, 4]}
    if extra_user:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="relu"))
        outputs["r"] = [2, 4]
    return build(nodes, {"x": [2, 3]}, outputs,
                 {"b": rng.standard_normal((3, 4)).astype(np.float32), "c": rng.standard_normal(4).astype(np.float32)})


# -- patterns -------------------------------------------------------------------------
def test_pattern_captures_nodes_and_values():
    model = from_proto(matmul_add())
    add = model.graph.nodes[1]
    m = GEMM_PATTERN.match(add)
    assert isinstance(m, Match)
    assert m["add"] is add and m["mm"] is model.graph.nodes[0]
    assert m["a"] is model.graph.inputs[0]
    assert m.value("mm").name == "m"
    assert m.const("c").shape == (4,)
    assert m.nodes == (add, model.graph.nodes[0])
    with pytest.raises(KeyError, match="captures: a, add, b, c, mm"):
        m["nope"]


def test_commutative_tries_the_inputs_swapped():
    model = from_proto(matmul_add(swap=True))
    add = model.graph.nodes[1]
    assert isinstance(GEMM_PATTERN.match(add), Match)
    strict = Op("Add", Op("MatMul", Var("a"), Const("b")), Const("c"))
    failure = strict.match(add)
    assert isinstance(failure, Failure) and not failure
    assert failure.reason == "input 0 of 'add' (Add) %c is an initializer, not computed by MatMul"


def test_mismatch_names_the_node_where_the_graph_differs():
    model = from_proto(build([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                              helper.make_node("Add", ["r", "c"], ["y"], name="add")],
                             {"x": [2]}, {"y": [2]}, {"c": np.ones(2, np.float32)}))
    failure = GEMM_PATTERN.match(model.graph.nodes[1])
    assert failure.reason == "input 0 of 'add' (Add) comes from 'relu' (Relu), not MatMul"
    assert failure.culprits == (model.graph.nodes[0],)
    assert GEMM_PATTERN.match(model.graph.nodes[0]).reason == "'relu' (Relu) is not Add"


def test_a_name_used_twice_must_be_the_same_value():
    square = Op("Mul", Var("x"), Var("x"))
    model = from_proto(build([helper.make_node("Mul", ["a", "a"], ["s"]), helper.make_node("Mul", ["a", "b"], ["y"])],
                             {"a": [2], "b": [2]}, {"s": [2], "y": [2]}))
    same, different = model.graph.nodes
    assert isinstance(square.match(same), Match)
    assert "'x' must be %a, found %b" in square.match(different).reason


def test_op_type_alternatives_domains_and_extra_inputs():
    model = from_proto(build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["s"]),
                              helper.make_node("Gelu", ["s"], ["y"], domain="com.microsoft")],
                             {"x": [2]}, {"y": [2]}))
    relu, sigmoid, gelu = model.graph.nodes
    either = Op(("Relu", "Sigmoid"), Var())
    assert isinstance(either.match(relu), Match) and isinstance(either.match(sigmoid), Match)
    assert "domain 'com.microsoft'" in Op("Gelu", Var()).match(gelu).reason
    assert isinstance(Op("Gelu", Var(), domain="com.microsoft").match(gelu), Match)
    assert isinstance(Op("Gelu", Var(), domain=None).match(gelu), Match)
    assert Op("Relu").match(relu).reason.endswith("has 1 input, the pattern Relu() takes 0")
    assert isinstance(Op("Relu", extra_inputs=True).match(relu), Match)


def test_trailing_absent_inputs_do_not_count():
    model = from_proto(build([helper.make_node("Clip", ["x", "", ""], ["y"])], {"x": [2]}, {"y": [2]}))
    assert isinstance(Op("Clip", Var("x")).match(model.graph.nodes[0]), Match)


def test_const_matches_initializers_and_constant_nodes_only():
    value = helper.make_tensor("v", F, [2], [1.0, 2.0])
    model = from_proto(build(
        [helper.make_node("Constant", [], ["k"], value=value), helper.make_node("Constant", [], ["f"], value_float=3.0),
         helper.make_node("Add", ["x", "k"], ["s"]), helper.make_node("Add", ["s", "f"], ["y"])],
        {"x": [2]}, {"y": [2]}))
    g = model.graph
    np.testing.assert_array_equal(constant_value(g.value("k")), [1.0, 2.0])
    assert constant_value(g.value("f")) == np.float32(3.0)
    assert constant_value(g.value("x")) is None and constant_value(g.value("s")) is None
    m = Op("Add", Var(), Const("c")).match(g.nodes[2])
    assert m.constant_nodes == (g.nodes[0],)
    # an initializer that is also a graph input can be overridden: not a constant
    g.add_input(g.initializers.setdefault("d", g.make_constant(np.zeros(2, np.float32), "d")))
    assert constant_value(g.inputs[-1]) is None


def test_pattern_and_rule_declarations_are_checked():
    with pytest.raises(ValueError, match="exactly 2 input patterns"):
        Op("Sum", Var(), Var(), Var(), commutative=True)
    with pytest.raises(TypeError, match="must be patterns"):
        Op("Relu", "x")
    with pytest.raises(TypeError, match="rooted at an Op"):
        Rule("r", Var("x"), lambda m, g: None)
    with pytest.raises(ValueError, match="names both a node and a value"):
        Rule("r", Op("Relu", Var("x"), name="x"), lambda m, g: None)
    assert str(GEMM_PATTERN) == "add=Add(mm=MatMul(a, const b), const c)"


# -- rules ----------------------------------------------------------------------------
def test_rule_reports_the_stage_that_refused():
    model = from_proto(build([helper.make_node("Add", ["x", "c"], ["y"])], {"x": [2]}, {"y": [2]},
                             {"c": np.ones(2, np.float32)}))
    add = model.graph.nodes[0]
    refused = ADD_ZERO.match(add)
    assert (refused.stage, refused.reason) == ("check", "%c is not zero")
    assert ADD_ZERO.match(Node("Relu", [model.graph.inputs[0]])).stage == "pattern"
    numpy_false = Rule("np", Op("Add", Var(), Var()), lambda m, g: None, check=lambda m: np.bool_(False))
    assert numpy_false.match(add).reason == "the check of rule 'np' refused Add -> %y"
    bad = Rule("bad", Op("Add", Var(), Var()), lambda m, g: None, check=lambda m: None)
    with pytest.raises(TypeError, match="bug in rule 'bad': check returned None"):
        bad.match(add)


# -- rule sets ------------------------------------------------------------------------
def test_rule_sets_compose_and_index_by_root_op():
    relu = Rule("relu-rule", Op("Relu", Var()), lambda m, g: None)
    a, b = RuleSet("a", [ADD_ZERO]), RuleSet("b", [FUSE, relu])
    both = a + b
    assert both.name == "a+b" and both.names == ("add-zero", "fuse", "relu-rule")
    assert both.for_op("Add") == (ADD_ZERO, FUSE) and both.for_op("Relu") == (relu,) and both.for_op("Conv") == ()
    assert (both + a).names == both.names  # the same rule twice is kept once
    assert "fuse" in both and FUSE in both and len(both) == 3
    assert both.without("fuse").names == ("add-zero", "relu-rule")
    with pytest.raises(KeyError, match="did you mean 'fuse'"):
        both.without("fues")
    with pytest.raises(ValueError, match="two different rules are named 'fuse'"):
        both + Rule("fuse", Op("Neg", Var()), lambda m, g: None)
    assert str(a) == "rule set a (1 rules)\n  add-zero: add=Add(x, const c)"


def test_only_rules_indexed_under_the_node_op_are_tried():
    calls = []
    conv_rule = Rule("conv-rule", Op("Conv", Var(), Var()), lambda m, g: None, check=lambda m: calls.append(m) or True)
    model = from_proto(matmul_add())
    report = apply_rules(model, RuleSet("s", [conv_rule, ADD_ZERO]), explain=True)
    assert calls == [] and {m.rule for m in report.misses} == {"add-zero"}


# -- the driver -----------------------------------------------------------------------
def test_fused_matmul_add_keeps_the_numbers_and_the_output_name():
    proto = matmul_add()
    model = from_proto(proto)
    report = apply_rules(model, FUSE)
    assert ops(model.graph) == ["Gemm"] and [v.name for v in model.graph.outputs] == ["y"]
    assert report.counts == {"fuse": 1} and report.converged and report.iterations == 2
    assert [str(f) for f in report.fired] == ["fuse rewrote 'add' (Add)"]
    assert set(model.graph.initializers) == {"b", "c"}
    assert model.graph.outputs[0].type is not None
    assert_same_numbers(proto, model)


def test_matched_node_with_other_users_stays():
    proto = matmul_add(extra_user=True)
    model = from_proto(proto)
    apply_rules(model, FUSE)
    assert ops(model.graph) == ["MatMul", "Gemm", "Relu"]
    assert_same_numbers(proto, model)


def test_output_fed_by_a_graph_input_goes_through_an_identity():
    proto = build([helper.make_node("Add", ["x", "zero"], ["y"], name="add")], {"x": [3]}, {"y": [3]},
                  {"zero": np.zeros(3, np.float32)})
    model = from_proto(proto)
    apply_rules(model, ADD_ZERO)
    assert ops(model.graph) == ["Identity"] and model.graph.outputs[0].name == "y"
    assert model.graph.initializers == {}  # the zero was only used by the removed Add
    assert_same_numbers(proto, model, exact=True)


def test_output_that_is_already_another_output_goes_through_an_identity():
    proto = build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "zero"], ["y"])],
                  {"x": [3]}, {"r": [3], "y": [3]}, {"zero": np.zeros(3, np.float32)})
    model = from_proto(proto)
    apply_rules(model, ADD_ZERO)
    assert ops(model.graph) == ["Relu", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["r", "y"]
    assert_same_numbers(proto, model, exact=True)


def test_output_computed_in_the_graph_is_renamed():
    proto = build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "zero"], ["s"]),
                   helper.make_node("Add", ["zero", "s"], ["y"])],
                  {"x": [3]}, {"y": [3]}, {"zero": np.zeros(3, np.float32)})
    model = from_proto(proto)
    report = apply_rules(model, ADD_ZERO)
    assert report.count("add-zero") == 2
    assert print_graph(model.graph).splitlines()[1:] == ["  %y = Relu(%x)", "  return %y", "}"]
    assert_same_numbers(proto, model, exact=True)


def test_shared_constants_stay_while_used():
    proto = build([helper.make_node("Add", ["x", "zero"], ["s"]), helper.make_node("Mul", ["s", "zero"], ["y"])],
                  {"x": [3]}, {"y": [3]}, {"zero": np.zeros(3, np.float32)})
    model = from_proto(proto)
    apply_rules(model, ADD_ZERO)
    assert ops(model.graph) == ["Mul"] and list(model.graph.initializers) == ["zero"]


def test_iteration_limit_and_convergence():
    nodes = [helper.make_node("Add", ["x", "zero"], ["a"])]
    nodes += [helper.make_node("Add", [f"{p}", "zero"], [q]) for p, q in zip("ab", "by")]
    proto = build([helper.make_node("Relu", ["x0"], ["x"])] + nodes, {"x0": [3]}, {"y": [3]},
                  {"zero": np.zeros(3, np.float32)})
    model = from_proto(proto)
    report = apply_rules(model, ADD_ZERO, max_iterations=1)
    assert report.iterations == 1 and not report.converged and len(report.fired) == 3
    assert apply_rules(model, ADD_ZERO).converged
    with pytest.raises(ValueError, match="positive integer"):
        apply_rules(model, ADD_ZERO, max_iterations=0)
    with pytest.raises(TypeError, match="Model or Graph"):
        apply_rules(to_proto(model), ADD_ZERO)


def test_explain_says_why_each_tried_rule_did_not_match():
    proto = build([helper.make_node("Add", ["x", "one"], ["s"], name="add1"),
                   helper.make_node("Add", ["s", "x"], ["y"], name="add2")],
                  {"x": [3]}, {"y": [3]}, {"one": np.ones(3, np.float32)})
    model = from_proto(proto)
    report = apply_rules(model, RuleSet("s", [ADD_ZERO, FUSE]), explain=True)
    assert not report.fired and report.converged
    why = {(m.rule, m.node_name): (m.stage, m.reason) for m in report.misses}
    assert why[("add-zero", "add1")] == ("check", "%one is not zero")
    assert why[("fuse", "add1")] == ("pattern", "input 0 of 'add1' (Add) %x is a graph input, not computed by MatMul")
    assert why[("add-zero", "add2")][0] == "pattern"
    assert [str(m) for m in report.why_not("add-zero", "add2")] == [
        "add-zero did not match 'add2' (Add): input 1 of 'add2' (Add) %x is not a constant (it is a graph input)"]
    assert report.why_not(node="add1")[0].culprits == ("%one",)
    assert "not matched:" in str(report)
    assert apply_rules(model, ADD_ZERO).misses == []  # only collected on request


def test_rules_see_the_model_opset():
    seen = []
    probe = Rule("probe", Op("Relu", Var()), lambda m, g: None, check=lambda m: seen.append(m.opset) or fail("no"))
    model = from_proto(build([helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {"y": [2]}, opset=13))
    apply_rules(model, probe)
    apply_rules(model.graph, probe)
    assert seen == [13, None]


def test_rewrite_bugs_are_reported_as_bugs():
    model = from_proto(matmul_add())
    nothing = Rule("nothing", GEMM_PATTERN, lambda m, g: [None])
    with pytest.raises(RuntimeError, match="bug in rule 'nothing'.*still used"):
        apply_rules(model, nothing)
    model = from_proto(matmul_add())
    with pytest.raises(TypeError, match="bug in rule 'many'"):
        apply_rules(model, Rule("many", GEMM_PATTERN, lambda m, g: [m["a"], m["a"]]))


def if_model():
    """y = If(cond) then Add(MatMul(x, b), c) else MatMul(x, b) + c computed outside."""
    rng = np.random.default_rng(2)
    inits = {"b": rng.standard_normal((3, 4)).astype(np.float32), "c": rng.standard_normal(4).astype(np.float32)}
    then_g = build([helper.make_node("MatMul", ["x", "b"], ["tm"]), helper.make_node("Add", ["tm", "c"], ["t"])],
                   {}, {"t": None}, subgraph=True)
    else_g = build([helper.make_node("Add", ["om", "c"], ["e"])], {}, {"e": None}, subgraph=True)
    nodes = [helper.make_node("MatMul", ["x", "b"], ["om"]),
             helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return build(nodes, {"x": [2, 3]}, {"y": [2, 4]}, inits)


def test_subgraphs_are_rewritten_on_request():
    proto = if_model()
    model = from_proto(proto)
    report = apply_rules(model, FUSE, subgraphs=False)
    assert not report.fired
    report = apply_rules(model, FUSE, explain=True)
    then_g, else_g = (model.graph.nodes[2].attr(k) for k in ("then_branch", "else_branch"))
    assert ops(then_g) == ["Gemm"] and ops(else_g) == ["Add"]
    assert then_g.outputs[0].name == "t" and report.fired[0].graph == then_g.name
    assert report.why_not("fuse")[0].reason == "input 0 of Add -> %e %om comes from an enclosing graph"
    assert_same_numbers(proto, model)


def test_rewrites_that_break_the_order_are_sorted():
    def late(m, g):  # reads a value defined after the root: the driver must re-sort
        return m.emit("Neg", [g.value("late")]).outputs[0]
    rule = Rule("late", Op("Relu", Var(), name="relu"), late, check=lambda m: m["relu"].name == "first" or fail("no"))
    model = from_proto(build([helper.make_node("Relu", ["x"], ["r"], name="first"),
                              helper.make_node("Sigmoid", ["x"], ["late"]),
                              helper.make_node("Relu", ["r"], ["y"])], {"x": [2]}, {"y": [2]}))
    apply_rules(model, rule)
    assert model.graph.is_sorted() and ops(model.graph) == ["Sigmoid", "Neg", "Relu"]
    qcompile.check(model)


def test_rewriting_a_bare_graph():
    g = Graph("bare")
    x = g.add_input(qcompile.Value("x"))
    zero = g.make_constant(np.zeros(2, np.float32), "zero")
    relu = g.append(Node("Relu", [x]))
    add = g.append(Node("Add", [relu.output, zero]))
    g.add_output(add.output)
    report = apply_rules(g, [ADD_ZERO])
    assert report.ruleset == "rules" and ops(g) == ["Relu"] and g.outputs[0] is relu.output


def test_public_api():
    import qcompile.rewrite as rewrite
    assert sorted(rewrite.__all__) == [
        "Const", "Failure", "Firing", "Match", "Miss", "Op", "Pattern", "RewriteReport", "Rule", "RuleSet", "Var",
        "apply_rules", "constant_value", "fail",
    ]
    for name in rewrite.__all__:
        assert hasattr(rewrite, name), name
