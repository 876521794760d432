"""The pass infrastructure: the Pass contract, typed options, the registry (plugins
included), the PassManager's error reporting and verification, and the instruments."""
from __future__ import annotations

import io
import sys
import textwrap
from typing import List

import onnx
import pytest
from onnx import TensorProto, helper

import qcompile.passmanager as pm_lib
from qcompile.errors import PassFailedError, PipelineError, QCompileError
from qcompile.ir import Model, Node
from qcompile.onnx_io import from_proto
from qcompile.passmanager import (
    Instrument,
    Pass,
    PassManager,
    PassResult,
    PrintIRInstrument,
    StatisticsInstrument,
    TimingInstrument,
    available_passes,
    get_pass,
    option,
    register_pass,
)
from qcompile.passmanager import registry


# -- fixtures -------------------------------------------------------------------------
def chain_model() -> Model:
    """x -> Relu -> Neg -> Abs -> y, opset 17."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Neg", ["r"], ["n"], name="neg"),
        helper.make_node("Abs", ["n"], ["y"], name="abs"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, restored afterwards, for tests that register passes."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_plugin_names", set())
    monkeypatch.setattr(registry, "_plugins_loaded", True)
    return registry


class Noop(Pass):
    """Does nothing."""

    in_place = True

    def run(self, model):
        return PassResult(model, modified=False)


class Touch(Pass):
    """Claims to modify and bumps a counter."""

    in_place = True

    def run(self, model):
        self.stats["touches"] += 1
        return PassResult(model, modified=True)


class Boom(Pass):
    """Raises a user error."""

    def run(self, model):
        raise QCompileError("calibration data has 3 inputs, the model 2")


class Crash(Pass):
    """Raises a bug."""

    def run(self, model):
        raise KeyError("conv1")


class DropRelu(Pass):
    """Removes the Relu without rewiring its user: a broken graph."""

    def run(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(relu, safe=False)
        return PassResult(model, modified=True)


class AddIdentity(Pass):
    """Appends an Identity on the output (a node-count change the statistics see)."""

    in_place = True

    def run(self, model):
        g = model.graph
        out = g.outputs[0]
        node = g.append(Node("Identity", [out], name="extra"))
        g.replace_output(out, node.output)
        return PassResult(model, modified=True)


# -- options ----------------------------------------------------------------------------
class Quant(Pass):
    """Quantize weights.

    Longer explanation that `qcompile passes` does not show."""

    bits: int = option(8, "weight bit-width", choices=(2, 4, 8))
    method: str = option("minmax", "observer", choices=("minmax", "entropy"))
    scale: float = option(1.0, "scale factor")
    symmetric: bool = option(True, "symmetric ranges")
    layers: list = option((), "layers to quantize (all when empty)")
    ids: list[int] = option([1, 2], "ids")
    opset: int = option(13, "opset", choices=range(7, 22))

    def run(self, model):
        return PassResult(model, modified=False)


def test_options_default_and_given():
    q = Quant(bits=4, layers=("conv1", "conv2"), scale=2)
    assert (q.bits, q.method, q.scale, q.symmetric, q.layers, q.ids, q.opset) == (
        4, "minmax", 2.0, True, ["conv1", "conv2"], [1, 2], 13)
    assert isinstance(q.scale, float)
    assert q.given_options == {"bits": 4, "layers": ["conv1", "conv2"], "scale": 2.0}
    assert str(q) == "quant{bits=4,layers=conv1;conv2,scale=2.0}"
    assert Quant.bits.default == 8 and Quant.bits.type is int  # the class keeps the Option
    other = Quant()
    other.ids.append(3)
    assert Quant().ids == [1, 2]  # list defaults are copied per instance


@pytest.mark.parametrize("kwargs, message", [
    ({"bit": 4}, "pass 'quant' has no option 'bit'; did you mean 'bits'? "
                 "(valid options: bits, ids, layers, method, opset, scale, symmetric)"),
    ({"bits": 3}, "pass 'quant' option 'bits': expected int, one of 2, 4, 8, got 3"),
    ({"bits": "4"}, "pass 'quant' option 'bits': expected int, one of 2, 4, 8, got '4'"),
    ({"bits": True}, "pass 'quant' option 'bits': expected int, one of 2, 4, 8, got True"),
    ({"method": "kl"}, "pass 'quant' option 'method': expected str, one of minmax, entropy, got 'kl'"),
    ({"symmetric": 1}, "pass 'quant' option 'symmetric': expected bool, got 1"),
    ({"layers": "conv1"}, "pass 'quant' option 'layers': expected list of str, got 'conv1'"),
    ({"ids": [1, "2"]}, "pass 'quant' option 'ids': expected list of int, got [1, '2']"),
    ({"opset": 22}, "pass 'quant' option 'opset': expected int, one of 7..21, got 22"),
])
def test_bad_options_are_pipeline_errors(kwargs, message):
    with pytest.raises(PipelineError) as e:
        Quant(**kwargs)
    assert str(e.value) == message


def test_pass_without_options_says_so():
    with pytest.raises(PipelineError, match=r"^pass 'noop' has no option 'x' \(it takes no options\)$"):
        Noop(x=1)


def test_summary_description_and_option_lines():
    assert Quant.summary() == "Quantize weights."
    assert Quant.description().endswith("does not show.")
    assert [str(o) for o in Quant.options()] == [
        "bits=8  (int: 2|4|8)  weight bit-width",
        "method=minmax  (str: minmax|entropy)  observer",
        "scale=1.0  (float)  scale factor",
        "symmetric=true  (bool)  symmetric ranges",
        "layers=(empty)  (list of str)  layers to quantize (all when empty)",
        "ids=1;2  (list of int)  ids",
        "opset=13  (int: 7..21)  opset",
    ]

    class Bare(Pass):
        def run(self, model):
            return PassResult(model, False)

    assert Bare.summary() == "(undocumented)" and Bare.name == "bare"


def test_unregistered_class_names_are_kebab_case():
    class DeadCodeElimination(Noop):
        pass

    class QDQToInteger(Noop):
        pass

    assert DeadCodeElimination.name == "dead-code-elimination"
    assert QDQToInteger.name == "qdq-to-integer"


def test_options_are_inherited_and_annotations_may_be_real_types():
    run = lambda self, model: PassResult(model, False)  # noqa: E731
    Real = type("Real", (Pass,), {"__annotations__": {"n": int, "xs": List[float]}, "n": option(1, "n"),
                                  "xs": option([0.5], "xs"), "run": run})
    Sub = type("Sub", (Real,), {"__annotations__": {"flag": bool}, "flag": option(False, "f")})
    s = Sub(n=2, xs=[1, 2.5], flag=True)
    assert (s.n, s.xs, s.flag) == (2, [1.0, 2.5], True)
    assert [o.name for o in Sub.options()] == ["n", "xs", "flag"]


@pytest.mark.parametrize("body, message", [
    ("x = option(1, 'no annotation')", "option 'x' of pass class Bad has no type"),
    ("x: dict = option({}, 'unsupported')", "option 'x' of pass class Bad: unsupported type"),
    ("x: int = option('a', 'bad default')", "option 'x' of pass class Bad: bad default: expected int"),
    ("x: int = option(3, 'default not a choice', choices=(1, 2))", "bad default: expected int, one of 1, 2, got 3"),
    ("x: str = option('a', 'choices of the wrong type', choices=('a', 2))", "choice 2 is not a str"),
    ("stats: int = option(1, 'reserved')", "option 'stats' of pass class Bad: the name is reserved"),
])
def test_bad_option_declarations_are_type_errors(body, message):
    source = f"class Bad(Pass):\n    {body}\n    def run(self, model):\n        return PassResult(model, False)\n"
    with pytest.raises(TypeError) as e:
        exec(source, {"Pass": Pass, "PassResult": PassResult, "option": option})
    assert message in str(e.value)


# -- the contract the base class checks ------------------------------------------------------
def test_result_must_be_a_pass_result_with_a_model():
    class ReturnsModel(Pass):
        def run(self, model):
            return model

    class ReturnsProto(Pass):
        def run(self, model):
            return PassResult(onnx.ModelProto(), True)

    with pytest.raises(TypeError, match=r"^bug in pass 'returns-model': run\(\) returned Model, not a PassResult"):
        ReturnsModel()(chain_model())
    with pytest.raises(TypeError, match=r"^bug in pass 'returns-proto': its PassResult holds a ModelProto"):
        ReturnsProto()(chain_model())
    with pytest.raises(TypeError, match="runs on a qcompile Model, not ModelProto"):
        Noop()(onnx.ModelProto())


def test_in_place_promise_is_checked():
    class Copies(Pass):
        in_place = True

        def run(self, model):
            return PassResult(chain_model(), True)

    with pytest.raises(TypeError, match="bug in pass 'copies': it declares in_place = True but returned a different"):
        Copies()(chain_model())
    Copies.in_place = False
    model = chain_model()
    assert Copies()(model).model is not model


def test_requires_run_ensures_order_and_stats_reset():
    calls = []

    class Hooked(Pass):
        def requires(self, model):
            calls.append("requires")

        def run(self, model):
            calls.append("run")
            self.stats["runs"] += 1
            return PassResult(model, False)

        def ensures(self, model):
            calls.append("ensures")

    p = Hooked()
    p(chain_model())
    p(chain_model())
    assert calls == ["requires", "run", "ensures"] * 2
    assert p.stats == {"runs": 1}


# -- registry -----------------------------------------------------------------------------
def test_register_get_and_list(scratch_registry):
    @register_pass("t-registered")
    class Registered(Noop):
        """Registered for a test."""

    assert Registered.name == "t-registered"
    assert get_pass("t-registered") is Registered
    assert available_passes()["t-registered"] is Registered
    assert list(available_passes()) == sorted(available_passes())


@pytest.mark.parametrize("name", ["Fold", "fold_x", "-fold", "fold-", "fold--x", "2fold", "", "fold x"])
def test_pass_names_must_be_kebab_case(name):
    with pytest.raises(ValueError, match="is not kebab-case"):
        register_pass(name)


def test_duplicate_names_and_non_passes_are_refused(scratch_registry):
    @register_pass("t-dup")
    class First(Noop):
        pass

    with pytest.raises(ValueError, match=r"pass name 't-dup' is already registered by .*First; .*Second needs another"):
        @register_pass("t-dup")
        class Second(Noop):
            pass

    with pytest.raises(TypeError, match="which is not a subclass of Pass"):
        register_pass("t-not-a-pass")(object)
    with pytest.raises(ValueError, match=r"First is already registered as 't-dup'; a pass has one name"):
        register_pass("t-alias")(First)
    # re-registering the same class (a reloaded module) is fine
    register_pass("t-dup")(First)


def test_unknown_pass_suggests_and_lists(scratch_registry):
    register_pass("t-fold")(type("TFold", (Noop,), {}))
    with pytest.raises(PipelineError) as e:
        get_pass("t-fodl")
    message = str(e.value)
    assert message.startswith("unknown pass 't-fodl'; did you mean 't-fold'? (available passes: ")
    assert "t-fold" in message.split("available passes: ")[1]


# -- entry-point plugins -------------------------------------------------------------------
def make_plugin(root, package, entry_points: str, source: str):
    """A fake installed distribution: a module and a dist-info folder declaring entry points."""
    (root / f"{package}.py").write_text(textwrap.dedent(source))
    info = root / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qcompile.passes]\n" + textwrap.dedent(entry_points))


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch, scratch_registry):
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    registry._reset_plugins()
    for name in set(sys.modules) - before:
        if name.startswith("qc_plugin"):
            del sys.modules[name]


PLUGIN_SOURCE = """
    from qcompile.passmanager import Pass, PassResult, option, register_pass

    class Shout(Pass):
        '''Plugin pass registered through its entry point.'''
        loud: bool = option(False, "louder")
        def run(self, model):
            return PassResult(model, False)

    @register_pass("whisper")
    class Whisper(Pass):
        '''Plugin pass that registers itself.'''
        def run(self, model):
            return PassResult(model, False)

    NOT_A_PASS = 42
"""


def test_entry_point_plugins_load_lazily_once(plugin_dir, monkeypatch):
    make_plugin(plugin_dir, "qc_plugin_good", "shout = qc_plugin_good:Shout\nwhisper = qc_plugin_good:Whisper\n",
                PLUGIN_SOURCE)
    assert "qc_plugin_good" not in sys.modules  # nothing loaded before it is needed
    shout = get_pass("shout")
    assert shout.name == "shout" and shout.summary() == "Plugin pass registered through its entry point."
    assert {"shout", "whisper"} <= set(available_passes())
    assert str(PassManager.parse("shout{loud=true},whisper")) == "shout{loud=true},whisper"

    calls = []
    monkeypatch.setattr(registry.importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or [])
    available_passes()
    with pytest.raises(PipelineError):
        get_pass("not-there")
    assert calls == []  # loaded once: later lookups do not scan again

    registry._reset_plugins()
    assert "shout" not in registry._registry


def test_broken_plugins_warn_and_are_skipped(plugin_dir):
    make_plugin(plugin_dir, "qc_plugin_mixed",
                "whisper = qc_plugin_mixed:Whisper\nnumber = qc_plugin_mixed:NOT_A_PASS\n"
                "gone = qc_plugin_mixed:Missing\nBad_Name = qc_plugin_mixed:Shout\n",
                PLUGIN_SOURCE)
    make_plugin(plugin_dir, "qc_plugin_broken", "broken = qc_plugin_broken:Pass\n", "raise ImportError('no numpy here')\n")
    with pytest.warns(UserWarning) as caught:
        passes = available_passes()
    messages = sorted(str(w.message) for w in caught)
    assert "whisper" in passes and "number" not in passes and "gone" not in passes
    assert any("plugin 'broken' (qc_plugin_broken:Pass, from qc_plugin_broken) failed to load and is skipped: "
               "ImportError: no numpy here" in m for m in messages), messages
    assert any("plugin 'number'" in m and "not a Pass subclass" in m for m in messages), messages
    assert any("plugin 'gone'" in m and "AttributeError" in m for m in messages), messages
    assert any("plugin 'Bad_Name'" in m and "not kebab-case" in m for m in messages), messages


# -- PassManager ------------------------------------------------------------------------
def test_run_in_order_and_modified_is_any():
    model = chain_model()
    result = PassManager([Noop(), Noop()]).run(model)
    assert result.model is model and result.modified is False
    assert PassManager([Noop(), Touch(), Noop()]).run(model).modified is True
    assert len(PassManager([Noop(), Touch()])) == 2


def test_failing_pass_is_named_with_the_passes_before():
    with pytest.raises(PassFailedError) as e:
        PassManager([Noop(), Touch(), Boom(), Noop()]).run(chain_model())
    err = e.value
    assert str(err) == "pass 'boom' failed after [noop, touch]: calibration data has 3 inputs, the model 2"
    assert err.pass_name == "boom" and err.ran_before == ["noop", "touch"]
    assert isinstance(err.__cause__, QCompileError)


def test_a_bug_in_a_pass_keeps_its_exception_type_in_the_message():
    with pytest.raises(PassFailedError) as e:
        PassManager([Crash()]).run(chain_model())
    assert str(e.value) == "pass 'crash' failed after []: KeyError: 'conv1'"
    assert isinstance(e.value.__cause__, KeyError)


def test_contract_violation_is_reported_through_the_manager():
    class Sloppy(Pass):
        def run(self, model):
            return None

    with pytest.raises(PassFailedError, match=r"^pass 'sloppy' failed after \[noop\]: TypeError: bug in pass 'sloppy'"):
        PassManager([Noop(), Sloppy()]).run(chain_model())


def test_verifier_after_each_pass_blames_the_pass():
    with pytest.raises(PassFailedError) as e:
        PassManager([Noop(), DropRelu(), Noop()]).run(chain_model())
    message = str(e.value)
    assert message.startswith("pass 'drop-relu' failed after [noop]: it left an invalid graph (a bug in the pass): ")
    assert "%r is not defined" in message
    assert e.value.pass_name == "drop-relu"
    # without verification the broken graph goes through
    assert PassManager([DropRelu()], verify=False).run(chain_model()).modified


def test_invalid_input_is_not_blamed_on_the_first_pass():
    model = chain_model()
    DropRelu()(model)
    with pytest.raises(QCompileError, match="^the input model is invalid before any pass ran: node 'neg'"):
        PassManager([Noop()]).run(model)


def test_manager_rejects_non_passes():
    with pytest.raises(TypeError, match=r"PassManager takes Pass instances: write Noop\(\) instead of the class"):
        PassManager([Noop])
    with pytest.raises(TypeError, match="PassManager takes Pass instances, not str"):
        PassManager(["dce"])
    with pytest.raises(TypeError, match="takes a qcompile Model"):
        PassManager([]).run(onnx.ModelProto())


# -- instruments -------------------------------------------------------------------------
class Recorder(Instrument):
    def __init__(self):
        self.events = []

    def before_pipeline(self, model):
        self.events.append("start")

    def before_pass(self, pass_, model):
        self.events.append(f"before {pass_.name}")

    def after_pass(self, pass_, result):
        self.events.append(f"after {pass_.name} {result.modified}")

    def after_pipeline(self, result):
        self.events.append(f"end {result.modified}")


def test_instrument_hooks_in_order():
    rec = Recorder()
    PassManager([Noop(), Touch()], instruments=[rec]).run(chain_model())
    assert rec.events == ["start", "before noop", "after noop False", "before touch", "after touch True", "end True"]


def test_print_ir_after_named_pass_and_all():
    out = io.StringIO()
    PassManager([Noop(), AddIdentity()], instruments=[PrintIRInstrument(after={"add-identity"}, stream=out)]).run(
        chain_model())
    text = out.getvalue()
    assert text.startswith("// IR after add-identity\nmodel ir_version=")
    assert "Identity(%y)  # extra" in text and "// IR after noop" not in text

    out = io.StringIO()
    PassManager([Noop(), AddIdentity()], instruments=[PrintIRInstrument(all=True, before={"noop"}, stream=out)]).run(
        chain_model())
    headers = [line for line in out.getvalue().splitlines() if line.startswith("//")]
    assert headers == ["// IR before noop", "// IR after noop", "// IR after add-identity"]


def test_print_ir_shows_the_broken_graph_before_the_verifier_rejects_it():
    out = io.StringIO()
    with pytest.raises(PassFailedError):
        PassManager([DropRelu()], instruments=[PrintIRInstrument(all=True, stream=out)]).run(chain_model())
    assert "// IR after drop-relu" in out.getvalue() and "Relu" not in out.getvalue()


def test_timing_and_statistics_together():
    timing, stats = TimingInstrument(), StatisticsInstrument()
    manager = PassManager([Noop(), AddIdentity(), Touch()], instruments=[timing, stats, PrintIRInstrument()])
    manager.run(chain_model())

    assert [label for label, _ in timing.timings] == ["noop", "add-identity", "touch"]
    assert all(seconds >= 0 for _, seconds in timing.timings)
    report = timing.report().splitlines()
    assert report[0] == "pass timing (wall clock):"
    assert [line.split()[-1] for line in report[2:5]] == ["noop", "add-identity", "touch"]
    assert report[-1].split()[1:] == ["100.0%", "total"]

    assert [(e.pass_text, e.nodes_before, e.nodes_after, e.op_delta, e.counters, e.modified) for e in stats.entries] == [
        ("noop", 3, 3, {}, {}, False),
        ("add-identity", 3, 4, {"Identity": 1}, {}, True),
        ("touch", 4, 4, {}, {"touches": 1}, True),
    ]
    assert stats.report() == textwrap.dedent("""\
        pass statistics:
          noop: nodes 3 -> 3 (+0), not modified
          add-identity: nodes 3 -> 4 (+1)
            ops: Identity +1
          touch: nodes 4 -> 4 (+0)
            touches: 1""")


def test_timing_accumulates_over_runs():
    timing = TimingInstrument()
    manager = PassManager([Noop()], instruments=[timing])
    manager.run(chain_model())
    first = timing.timings[0][1]
    manager.run(chain_model())
    assert len(timing.timings) == 1 and timing.timings[0][1] >= first


# -- public surface ----------------------------------------------------------------------
def test_public_api():
    assert sorted(pm_lib.__all__) == [
        "ENTRY_POINT_GROUP", "Instrument", "Option", "Pass", "PassManager", "PassResult", "PassStatistics",
        "PrintIRInstrument", "StatisticsInstrument", "TimingInstrument", "available_passes", "get_pass", "option",
        "register_pass",
    ]
    for name in pm_lib.__all__:
        assert hasattr(pm_lib, name), name
    assert pm_lib.ENTRY_POINT_GROUP == "qcompile.passes"
