"""The rain-sim ISA (encoding, assembly) and the .rsim program file (round trip, refusals)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.backend.isa import SPECS, Instr, IsaError, Op, decode, encode, format_asm, parse_asm
from qcompile.backend.program import FORMAT_VERSION, Program, ProgramError, load_program, save_program
from qcompile.backend.target import load_target

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples"))
MODEL = os.path.join(EXAMPLES, "digits_cnn.onnx")
CALIB = os.path.join(EXAMPLES, "digits_calib.npz")
EVAL = os.path.join(EXAMPLES, "digits_eval.npz")


def _qcompile(*args):
    """The CLI as `python -m qcompile`, run outside the source tree so the installed package is the one imported
    (the checkout's `qcompile/` folder lacks `qcompile.passes` and `qcompile.backend`, which install from
    `passes/` and `backend/`)."""
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())


@st.composite
def instructions(draw):
    op = draw(st.sampled_from(list(Op)))
    args = {f: draw(st.integers(-(1 << 31), (1 << 31) - 1)) for f in SPECS[op].fields}
    return Instr(op, args, draw(st.integers(0, 15)), draw(st.integers(0, 15)), draw(st.integers(0, 65535)))


@settings(max_examples=200, deadline=None)
@given(st.lists(instructions(), max_size=12))
def test_encoding_and_assembly_round_trip(instrs):
    words = encode(instrs)
    back = decode(words)
    assert [(i.op, i.args, i.wait, i.signal, i.layer) for i in back] == \
        [(i.op, i.args, i.wait, i.signal, i.layer) for i in instrs]
    text = format_asm(instrs)
    again = parse_asm(text)
    assert format_asm(again) == text
    assert np.array_equal(encode(again), words)


def test_every_opcode_has_a_unit_and_distinct_fields():
    for op, spec in SPECS.items():
        assert len(set(spec.fields)) == len(spec.fields), op
        assert spec.doc
    assert len({int(op) for op in Op}) == len(Op)


@pytest.mark.parametrize("text, message", [
    ("FROB a=1", "unknown opcode 'FROB'"),
    ("HOST wait=x index=0", "unknown unit letter 'x'"),
    ("HOST index=0 colour=3", "HOST has no field 'colour'"),
    ("VFILL buf=0 addr=0 dtype=0 count=4", "VFILL needs field 'value'"),
    ("HOST index", "expected field=value"),
])
def test_assembly_errors_name_the_line_and_the_problem(text, message):
    with pytest.raises(IsaError, match="line 1: " + message):
        parse_asm("; a comment\n" * 0 + text)


def test_decode_refuses_cut_and_unknown_instructions():
    words = encode([Instr(Op.HOST, {"index": 3})])
    with pytest.raises(IsaError, match="cut short"):
        decode(words[:1])
    with pytest.raises(IsaError, match="unknown opcode 0x7f"):
        decode(np.array([0x7F], np.int32))


def test_field_overflow_is_refused():
    with pytest.raises(IsaError, match="32 bits"):
        encode([Instr(Op.HOST, {"index": 1 << 33})])


# -- program files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_program(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsim") / "digits.rsim"
    r = _qcompile(MODEL, "--target", "rain-sim", "--calib", CALIB, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def test_program_file_round_trips(digits_program, tmp_path):
    prog = load_program(str(digits_program))
    data = prog.to_bytes()
    again = Program.from_bytes(data)
    assert again.to_bytes() == data
    assert again.target_name == "rain-sim"
    assert again.target_fingerprint == load_target("rain-sim").fingerprint()
    assert [i.op for i in again.instructions] == [i.op for i in prog.instructions]
    save_program(again, str(tmp_path / "copy.rsim"))
    assert (tmp_path / "copy.rsim").read_bytes() == data


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:40], "truncated rain-sim program"),
    (lambda d: d[:-7], "truncated rain-sim program"),
    (lambda d: d[:200] + bytes([d[200] ^ 0x40]) + d[201:], "checksum mismatch"),
    (lambda d: d[:4] + (FORMAT_VERSION + 1).to_bytes(2, "little") + d[6:], "format version 2"),
    (lambda d: b"PK\x03\x04" + d[4:], "not a rain-sim program"),
])
def test_damaged_program_files_are_refused_in_one_line(digits_program, tmp_path, damage, message):
    bad = tmp_path / "bad.rsim"
    bad.write_bytes(damage(digits_program.read_bytes()))
    with pytest.raises(ProgramError, match=message):
        load_program(str(bad))
    r = _qcompile("run", bad, "--input", EVAL, "-o", tmp_path / "y.npz")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert message.split()[0] in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "y.npz").exists()


def test_program_for_another_target_is_refused(digits_program, tmp_path):
    r = _qcompile("run", digits_program, "--input", EVAL, "--target", "rain-sim-ws", "-o", tmp_path / "y.npz")
    assert r.returncode == 2
    assert "compiled for target 'rain-sim'" in r.stderr and "not for 'rain-sim-ws'" in r.stderr
    assert not (tmp_path / "y.npz").exists()


def test_run_checks_inputs_by_name_and_shape(digits_program, tmp_path):
    np.savez(tmp_path / "wrong.npz", input=np.zeros((3, 1, 8, 8), np.float32))
    r = _qcompile("run", digits_program, "--input", tmp_path / "wrong.npz")
    assert r.returncode == 2 and "input 'input'" in r.stderr and "[N, 1, 1, 8, 8]" in r.stderr
    np.savez(tmp_path / "named.npz", image=np.zeros((3, 1, 1, 8, 8), np.float32))
    r = _qcompile("run", digits_program, "--input", tmp_path / "named.npz")
    assert r.returncode == 2 and "missing input 'input'" in r.stderr and "image" in r.stderr
    np.savez(tmp_path / "ints.npz", input=np.zeros((3, 1, 1, 8, 8), np.int64))
    r = _qcompile("run", digits_program, "--input", tmp_path / "ints.npz")
    assert r.returncode == 2 and "expected float samples" in r.stderr


def test_run_writes_float_outputs_and_reports_accuracy(digits_program, tmp_path):
    r = _qcompile("run", digits_program, "--input", EVAL, "-o", tmp_path / "y.npz", "--report-json",
                  tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npz")["logits"]
    labels = np.load(EVAL)["label"]
    assert y.shape == (300, 1, 10) and y.dtype == np.float32
    acc = float((y.reshape(300, 10).argmax(1) == labels).mean())
    assert acc >= 0.97
    assert f"top-1 accuracy against the file's labels {100 * acc:.2f}%" in r.stdout
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["total"]["cycles"] > 0 and rep["total"]["macs"] == 80896
    assert [l["op"] for l in rep["layers"]] == ["QConv", "QConv", "MaxPool", "Flatten", "QGemm"]


def test_inspect_disassembles_a_program(digits_program):
    r = _qcompile("inspect", digits_program)
    assert r.returncode == 0, r.stderr
    assert "rain-sim program, format v1, target rain-sim" in r.stdout
    code = r.stdout.split("  code:\n", 1)[1]
    assert len(parse_asm(code)) == len(load_program(str(digits_program)).instructions)


def test_compile_for_target_needs_calibration_data(tmp_path):
    r = _qcompile(MODEL, "--target", "rain-sim", "-o", tmp_path / "m.rsim")
    assert r.returncode == 2
    assert "--calib DATA.npz" in r.stderr and "--random-calib" in r.stderr
    assert not (tmp_path / "m.rsim").exists()
    r = _qcompile(MODEL, "--target", "rain-sim", "--random-calib", "-o", tmp_path / "m.rsim")
    assert r.returncode == 0, r.stderr
    assert "warning: calibrating on 32 random samples" in r.stderr
    assert (tmp_path / "m.rsim").exists()


def test_a_failed_simulation_leaves_no_program_behind(tmp_path):
    """Calibration takes samples of batch 2 for the symbolic batch dimension; the program is
    compiled for batch 1, so simulating those samples fails after compilation: exit 2 and
    no .rsim or report file."""
    x = np.load(CALIB)["input"][:32].reshape(16, 2, 1, 8, 8)
    np.savez(tmp_path / "batch2.npz", input=x)
    r = _qcompile(MODEL, "--target", "rain-sim", "--calib", tmp_path / "batch2.npz", "-o", tmp_path / "m.rsim",
                  "--report-json", tmp_path / "r.json")
    assert r.returncode == 2 and "input 'input'" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch2.npz"]


def test_dump_stages_and_bad_stage(tmp_path):
    r = _qcompile(MODEL, "--target", "rain-sim", "--calib", CALIB, "--dump", "all")
    assert r.returncode == 0, r.stderr
    for stage in ("partition", "schedule", "allocation", "instructions", "binary"):
        assert f"// stage {stage}" in r.stderr
    r = _qcompile(MODEL, "--target", "rain-sim", "--calib", CALIB, "--dump", "tiles")
    assert r.returncode == 2 and "--dump tiles: no such stage" in r.stderr


def test_bad_target_option_is_one_line(tmp_path):
    r = _qcompile(MODEL, "--target", "nope", "--calib", CALIB)
    assert r.returncode == 2 and "unknown target 'nope'" in r.stderr and "Traceback" not in r.stderr
