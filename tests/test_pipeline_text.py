"""Pipelines as text: parse, print back identically, and precise one-line errors."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import PipelineError
from qcompile.passmanager import Pass, PassManager, PassResult, option, register_pass


class _Base(Pass):
    in_place = True

    def run(self, model):
        return PassResult(model, modified=False)


@register_pass("tp-fold")
class TpFold(_Base):
    """A pass without options."""


@register_pass("tp-calibrate")
class TpCalibrate(_Base):
    """A pass with an enum option."""

    method: str = option("minmax", "observer", choices=("minmax", "entropy", "percentile"))
    percentile: float = option(99.99, "percentile kept")


@register_pass("tp-quantize")
class TpQuantize(_Base):
    """A pass with options of every type."""

    weights: str = option("int8", "weight type", choices=("int2", "int4", "int8"))
    activations: str = option("int8", "activation type", choices=("int4", "int8"))
    bits: int = option(8, "bits")
    scale: float = option(1.0, "scale")
    per_channel: bool = option(True, "per-channel weights")


@register_pass("tp-select")
class TpSelect(_Base):
    """Free text and lists."""

    label: str = option("", "any text")
    layers: list = option((), "layer names")
    ids: list[int] = option((), "integers")
    weights: list[float] = option((), "floats")


def parse(text):
    return PassManager.parse(text)


# -- round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "",
    "tp-fold",
    "tp-fold,tp-calibrate{method=entropy},tp-quantize{weights=int4,activations=int8}",
    "tp-quantize{activations=int4,weights=int2}",  # options keep the order given
    "tp-quantize{bits=-3,scale=1e-05,per_channel=false}",
    "tp-calibrate{percentile=inf}",
    "tp-fold,tp-fold,tp-fold",
    'tp-select{label="two words"}',
    'tp-select{label="a,b{c}=d;e"}',
    'tp-select{label="say \\"hi\\" \\\\ bye"}',
    'tp-select{label=""}',
    "tp-select{label=/layer1/conv/Conv:0}",
    "tp-select{layers=conv1;conv2;fc,ids=1;-2;3}",
    'tp-select{layers=conv1;"a b";""}',
    "tp-select{layers=}",
    "tp-select{weights=0.5;1e+20;-0.0}",
])
def test_canonical_text_prints_back_identically(text):
    pm = parse(text)
    assert str(pm) == text
    assert str(parse(str(pm))) == text


@pytest.mark.parametrize("text, canonical", [
    ("  tp-fold ,\n\ttp-calibrate { method = entropy } ", "tp-fold,tp-calibrate{method=entropy}"),
    ("tp-fold{}", "tp-fold"),
    ("tp-fold { }", "tp-fold"),
    ("tp-quantize{bits=08,per_channel=TRUE}", "tp-quantize{bits=8,per_channel=true}"),
    ("tp-quantize{per_channel=0,scale=2}", "tp-quantize{per_channel=false,scale=2.0}"),
    ('tp-select{label="plain"}', "tp-select{label=plain}"),
    ("tp-select{layers = a ; b , ids = 1 ; 2 }", "tp-select{layers=a;b,ids=1;2}"),
    ("tp-quantize{bits=1_000}", "tp-quantize{bits=1000}"),
    ("   ", ""),
])
def test_whitespace_and_spelling_are_canonicalised(text, canonical):
    assert str(parse(text)) == canonical


def test_parsed_values_are_typed():
    q, s = parse('tp-quantize{bits=4,scale=0.25,per_channel=false},tp-select{layers=a;"b c",ids=3;4}').passes
    assert (q.bits, q.scale, q.per_channel, q.weights) == (4, 0.25, False, "int8")
    assert (s.layers, s.ids, s.label) == (["a", "b c"], [3, 4], "")
    assert isinstance(q, TpQuantize) and q.given_options == {"bits": 4, "scale": 0.25, "per_channel": False}


# -- property: any pipeline prints to text that parses back to the same pipeline -----------
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_floats = st.floats(allow_nan=False)
_passes = st.one_of(
    st.builds(TpFold),
    st.builds(TpCalibrate, method=st.sampled_from(["minmax", "entropy", "percentile"]), percentile=_floats),
    st.fixed_dictionaries({}, optional={
        "weights": st.sampled_from(["int2", "int4", "int8"]), "activations": st.sampled_from(["int4", "int8"]),
        "bits": st.integers(-2**70, 2**70), "scale": _floats, "per_channel": st.booleans(),
    }).map(lambda kw: TpQuantize(**kw)),
    st.fixed_dictionaries({}, optional={
        "label": _text, "layers": st.lists(_text, max_size=4), "ids": st.lists(st.integers(), max_size=4),
        "weights": st.lists(_floats, max_size=3),
    }).map(lambda kw: TpSelect(**kw)),
)


def _same(a, b):
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(_passes, max_size=5), st.sampled_from(["", " ", "\n  "]))
def test_round_trip_property(passes, space):
    text = str(PassManager(passes))
    back = parse(text)
    assert str(back) == text
    assert [type(p) for p in back.passes] == [type(p) for p in passes]
    for p, q in zip(passes, back.passes):
        assert list(p.given_options) == list(q.given_options)
        assert all(_same(v, q.given_options[k]) for k, v in p.given_options.items())
    # whitespace around the separators changes nothing
    spaced = text.replace("},", "}" + space + "," + space) if '"' not in text else text
    assert str(parse(space + spaced + space)) == text


# -- errors: one line, precise -----------------------------------------------------------
@pytest.mark.parametrize("text, message, column", [
    ("tp-fold,tp-fodl", "pipeline 'tp-fold,tp-fodl', column 9: unknown pass 'tp-fodl'; did you mean 'tp-fold'?", 9),
    ("tp-quantize{bit=4}",
     "pipeline 'tp-quantize{bit=4}', column 13: pass 'tp-quantize' has no option 'bit'; did you mean 'bits'? "
     "(valid options: activations, bits, per_channel, scale, weights)", 13),
    ("tp-fold{x=1}", "pipeline 'tp-fold{x=1}', column 9: pass 'tp-fold' has no option 'x' (it takes no options)", 9),
    ("tp-quantize{weights=int3}",
     "pipeline 'tp-quantize{weights=int3}', column 21: pass 'tp-quantize' option 'weights': "
     "expected str, one of int2, int4, int8, got 'int3'", 21),
    ("tp-quantize{bits=four}",
     "pipeline 'tp-quantize{bits=four}', column 18: pass 'tp-quantize' option 'bits': expected int, got 'four'", 18),
    ("tp-quantize{per_channel=yes}",
     "pipeline 'tp-quantize{per_channel=yes}', column 25: pass 'tp-quantize' option 'per_channel': "
     "expected bool, got 'yes'", 25),
    ("tp-quantize{bits=4;8}",
     "pipeline 'tp-quantize{bits=4;8}', column 18: pass 'tp-quantize' option 'bits': "
     "expected int, got '4;8' (';' separates list items)", 18),
    ("tp-quantize{bits=}",
     "pipeline 'tp-quantize{bits=}', column 18: pass 'tp-quantize' option 'bits': expected int, got nothing", 18),
    ("tp-select{ids=1;x}",
     "pipeline 'tp-select{ids=1;x}', column 15: pass 'tp-select' option 'ids': expected list of int, got 'x'", 15),
    ("tp-fold,", "pipeline 'tp-fold,', column 9: expected a pass name, found the end of the text", 9),
    (",tp-fold", "pipeline ',tp-fold', column 1: expected a pass name, found ','", 1),
    ("tp-fold tp-fold", "pipeline 'tp-fold tp-fold', column 9: expected ',' between passes, found 't'", 9),
    ("tp-quantize{bits 4}", "pipeline 'tp-quantize{bits 4}', column 18: expected '=' after option 'bits', found '4'", 18),
    ("tp-quantize{bits=4",
     "pipeline 'tp-quantize{bits=4', column 19: the '{' at column 12 is never closed: expected '}'", 19),
    ("tp-quantize{bits=4,}",
     "pipeline 'tp-quantize{bits=4,}', column 20: expected an option name of pass 'tp-quantize', found '}'", 20),
    ("tp-quantize{bits=4,bits=2}",
     "pipeline 'tp-quantize{bits=4,bits=2}', column 20: option 'bits' of pass 'tp-quantize' is given twice", 20),
    ('tp-select{label="open}', "pipeline 'tp-select{label=\"open}', column 17: the string opened here is never "
                               "closed: expected '\"'", 17),
    ('tp-select{label="a\\n"}', "pipeline 'tp-select{label=\"a\\\\n\"}', column 19: unknown escape in a quoted "
                                "value: only \\\" and \\\\ are allowed", 19),
    ("tp-select{label=a b}", "pipeline 'tp-select{label=a b}', column 19: expected ',' or '}' after the value of "
                             "option 'label', found 'b' (quote values with spaces or , { } = ; characters)", 19),
    ("tp-select{layers=a;;b}",
     "pipeline 'tp-select{layers=a;;b}', column 20: expected a value, found ';' (write an empty string as \"\")", 20),
    ("tp-fold}", "pipeline 'tp-fold}', column 8: expected ',' between passes, found '}'", 8),
])
def test_errors_are_one_line_and_point_at_the_column(text, message, column):
    with pytest.raises(PipelineError) as e:
        parse(text)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.column == column


def test_unknown_pass_lists_the_available_ones():
    with pytest.raises(PipelineError) as e:
        parse("tp-nothing-like-it")
    listing = str(e.value).split("(available passes: ")[1].rstrip(")").split(", ")
    assert {"tp-fold", "tp-calibrate", "tp-quantize", "tp-select"} <= set(listing)
    assert listing == sorted(listing)


def test_suggestion_ignores_case():
    with pytest.raises(PipelineError, match="did you mean 'tp-fold'"):
        parse("TP-FOLD")


def test_parse_takes_text():
    with pytest.raises(TypeError, match="a pipeline is text, not list"):
        PassManager.parse(["tp-fold"])
