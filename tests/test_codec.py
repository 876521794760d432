"""The compiled instruction codec (backend/_codec.pyx) against the pure-Python encoder and
decoder it replaced, kept here as the reference: the same words on real programs and on
random instructions, the same errors, and decode(encode(x)) == x."""
import os
from typing import List

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.backend import isa
from qcompile.backend.isa import SPECS, Instr, IsaError, Op, decode, encode
from qcompile.backend.lowering import compile_program
from qcompile.backend.target import load_target
from qcompile.onnx_io import load

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples"))


# -- the reference: isa.encode / isa.decode as they were in Python ------------------------
def ref_encode(instrs) -> np.ndarray:
    words: List[int] = []
    for ins in instrs:
        spec = SPECS[ins.op]
        if not 0 <= ins.layer < isa.MAX_LAYERS:
            raise IsaError(f"layer index {ins.layer} out of range")
        header = int(ins.op) | (ins.wait & 0xF) << isa._WAIT_SHIFT | (ins.signal & 0xF) << isa._SIGNAL_SHIFT | \
            ins.layer << isa._LAYER_SHIFT
        words.append(header - (1 << 32) if header >= 1 << 31 else header)
        try:
            words.extend(int(ins.args[f]) for f in spec.fields)
        except KeyError as e:
            raise IsaError(f"{ins.op.name}: missing field {e.args[0]}") from None
    arr = np.asarray(words, dtype=np.int64)
    if arr.size and (arr.min() < -(1 << 31) or arr.max() >= 1 << 31):
        raise IsaError("an instruction field does not fit in 32 bits")
    return arr.astype("<i4")


def ref_decode(code) -> List[Instr]:
    words = np.asarray(code, dtype="<i4").tolist()
    out: List[Instr] = []
    i, n = 0, len(words)
    while i < n:
        header = words[i] & 0xFFFFFFFF
        try:
            op = Op(header & isa._HEADER_OP)
        except ValueError:
            raise IsaError(f"unknown opcode 0x{header & 0xFF:02x} at word {i}") from None
        spec = SPECS[op]
        if i + 1 + len(spec.fields) > n:
            raise IsaError(f"instruction {op.name} at word {i} is cut short")
        args = dict(zip(spec.fields, words[i + 1:i + 1 + len(spec.fields)]))
        out.append(Instr(op, args, (header >> isa._WAIT_SHIFT) & 0xF, (header >> isa._SIGNAL_SHIFT) & 0xF,
                         header >> isa._LAYER_SHIFT))
        i += 1 + len(spec.fields)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# -- real programs ---------------------------------------------------------------------------
def _digits_program(target):
    model = load(os.path.join(EXAMPLES, "digits_cnn.onnx"))
    calib = np.load(os.path.join(EXAMPLES, "digits_calib.npz"))["input"]
    model.annotations["calibration_data"] = [{"input": x} for x in calib[:32]]
    int_model = qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model
    return compile_program(int_model, load_target(target))


def _squeezenet_program():
    from onnx_models import light_model  # tests/ is on sys.path (rootdir-relative imports)
    from qcompile.onnx_io import from_proto

    proto, name, shape = light_model("squeezenet")
    rng = np.random.default_rng(0)
    model = from_proto(proto)
    model.annotations["calibration_data"] = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    int_model = qcompile.PassManager.parse(
        "fold,calibrate{progress=false},quantize{search_samples=0},lower-integer").run(model).model
    return compile_program(int_model, load_target("rain-sim"))


@pytest.mark.filterwarnings("ignore:calibrate")
@pytest.mark.parametrize("which", ["digits:rain-sim", "digits:rain-sim-ws", "squeezenet"])
def test_real_programs_encode_and_decode_as_the_python_reference(which):
    prog = _squeezenet_program() if which == "squeezenet" else _digits_program(which.split(":")[1])
    instrs = ref_decode(prog.code)
    assert len(instrs) > 20 and {i.op for i in instrs} >= {Op.LOAD, Op.STORE, Op.MATMUL, Op.VREQ}
    assert decode(prog.code) == instrs
    assert _same(encode(instrs), ref_encode(instrs))
    assert _same(encode(instrs), np.asarray(prog.code))
    assert decode(encode(instrs)) == instrs


# -- random instructions ---------------------------------------------------------------------
_I32 = st.integers(-(1 << 31), (1 << 31) - 1)


@st.composite
def instructions(draw, values=_I32):
    op = draw(st.sampled_from(list(Op)))
    args = {f: draw(values) for f in SPECS[op].fields}
    return Instr(op, args, draw(st.integers(0, 15)), draw(st.integers(0, 15)), draw(st.integers(0, 65535)))


@settings(max_examples=300, deadline=None)
@given(st.lists(instructions(), max_size=20))
def test_random_streams_match_the_reference_and_round_trip(instrs):
    words = encode(instrs)
    assert _same(words, ref_encode(instrs))
    assert decode(words) == instrs == ref_decode(words)


@settings(max_examples=100, deadline=None)
@given(st.lists(instructions(st.one_of(_I32, st.integers(-(1 << 40), 1 << 40))), min_size=1, max_size=6),
       st.integers(-70000, 70000), st.integers(-40, 40))
def test_errors_are_the_references(instrs, layer, wait):
    """Out-of-range fields, layers and wide token masks: the same words or the same error."""
    instrs[-1].layer, instrs[0].wait = layer, wait
    _same_outcome(ref_encode, encode, instrs, _same)


@settings(max_examples=200, deadline=None)
@given(st.lists(_I32, max_size=40))
def test_decoding_arbitrary_words_fails_or_succeeds_as_the_reference(raw):
    _same_outcome(ref_decode, decode, np.asarray(raw, np.int32), lambda got, want: got == want)


def _same_outcome(ref, new, arg, same):
    """`new(arg)` gives what `ref(arg)` gives (`same`), or raises the same IsaError."""
    try:
        want = ref(arg)
    except IsaError as e:
        with pytest.raises(IsaError) as got:
            new(arg)
        assert str(got.value) == str(e)
        return
    assert same(new(arg), want)


def test_numpy_and_bool_field_values_encode_as_ints():
    ins = Instr(Op.VFILL, {"buf": np.int8(1), "addr": np.int64(64), "dtype": np.uint8(0), "count": True,
                           "value": -5}, wait=3, signal=np.int64(8), layer=np.int64(7))
    assert _same(encode([ins]), ref_encode([ins]))
    assert decode(encode([ins])) == [Instr(Op.VFILL, {"buf": 1, "addr": 64, "dtype": 0, "count": 1, "value": -5},
                                           3, 8, 7)]


def test_missing_fields_and_empty_streams():
    with pytest.raises(IsaError, match="VFILL: missing field value"):
        encode([Instr(Op.VFILL, {"buf": 0, "addr": 0, "dtype": 0, "count": 1})])
    assert _same(encode([]), ref_encode([]))
    assert decode(np.zeros(0, np.int32)) == []
