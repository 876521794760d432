"""Targets (backend/target.py): the presets load with DESIGN.md's figures, the
fingerprint identifies the parameters, every kind of bad file gets a one-line error
naming the file and the key, and `qcompile targets` lists and shows them."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from qcompile.backend.target import (
    DATAFLOWS, ENERGY_FIGURES, PRECISIONS, SRAM_BUFFERS, Target, TargetError, estimate_sram_pj_per_byte,
    format_target, list_targets, load_target, preset_dir,
)
from qcompile.cli import main
from qcompile.errors import QCompileError

PRESET = os.path.join(preset_dir(), "rain-sim.toml")


def preset_text():
    with open(PRESET) as f:
        return f.read()


def write(tmp_path, text, name="t.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def edited(pattern, replacement):
    """The rain-sim preset with one regex substitution (which must match once)."""
    text, n = re.subn(pattern, replacement, preset_text(), count=1, flags=re.M)
    assert n == 1, pattern
    return text


# --------------------------------------------------------------------------- presets


def test_rain_sim_preset():
    t = load_target("rain-sim")
    assert (t.name, t.clock_mhz) == ("rain-sim", 800.0)
    assert (t.matrix.rows, t.matrix.cols, t.matrix.dataflow) == (32, 32, "output-stationary")
    assert t.matrix.precisions == ("int8", "int4", "int2", "binary")
    assert (t.vector.width, t.vector.lut_entries) == (32, 256)
    assert {n: t.sram[n].size_bytes for n in SRAM_BUFFERS} == {
        "activation": 256 * 1024, "weight": 256 * 1024, "accumulator": 64 * 1024}
    assert t.sram["accumulator"].element_bytes == 4 and t.sram["accumulator"].elements == 16384
    assert t.sram["weight"].pj_per_byte == t.energy.sram_weight_pj_per_byte
    assert (t.dram.bandwidth_gb_s, t.dram.latency_ns) == (16.0, 100.0)
    assert t.dram_bytes_per_cycle == 20.0
    assert t.dram_latency_cycles == 80 and isinstance(t.dram_latency_cycles, int)
    assert t.seconds(800_000_000) == pytest.approx(1.0)
    assert t.path == os.path.abspath(PRESET)


def test_ws_preset_differs_only_in_dataflow():
    os_, ws = load_target("rain-sim").to_dict(), load_target("rain-sim-ws").to_dict()
    assert ws["matrix"]["dataflow"] == "weight-stationary"
    for d in (os_, ws):
        del d["name"], d["description"], d["matrix"]["dataflow"]
    assert os_ == ws


def test_every_preset_loads_and_is_listed():
    names = [n for n, _ in list_targets()]
    assert names == sorted(f[:-5] for f in os.listdir(preset_dir()) if f.endswith(".toml"))
    assert {"rain-sim", "rain-sim-ws"} <= set(names)
    for name, summary in list_targets():
        assert load_target(name).name == name
        assert "32x32" in summary and "\n" not in summary


def test_energy_figures_follow_design_md():
    """DESIGN.md: int8 MAC 0.09 pJ, SRAM by size (interpolated), DRAM 120 pJ/byte; the
    narrower MACs scale the 0.2 pJ 8-bit multiply (45 nm) by width squared, keep the
    0.1 pJ int32 add, and scale both by 0.30."""
    t = load_target("rain-sim")
    e = t.energy
    assert e.mac_int8 == pytest.approx(0.09)
    for p, bits in (("int8", 8), ("int4", 4), ("int2", 2), ("binary", 1)):
        assert e.mac(p) == pytest.approx(0.30 * (0.2 * (bits / 8) ** 2 + 0.1))
    assert e.dram_pj_per_byte == 120.0
    for n in SRAM_BUFFERS:
        assert t.sram[n].pj_per_byte == pytest.approx(estimate_sram_pj_per_byte(t.sram[n].size_kib), rel=5e-3)
        assert "interpolated" in e.source(f"sram_{n}_pj_per_byte")
    for k in list(ENERGY_FIGURES) + ["static_power_mw"]:
        assert len(e.source(k)) > 20, k
    with pytest.raises(TargetError, match="no MAC energy for precision 'int3'"):
        e.mac("int3")


def test_sram_estimate_passes_through_design_points():
    for kib, pj in ((8, 0.375), (32, 0.75), (1024, 3.75)):
        assert estimate_sram_pj_per_byte(kib) == pytest.approx(pj)
    assert 0.75 < estimate_sram_pj_per_byte(64) < estimate_sram_pj_per_byte(256) < 3.75
    assert estimate_sram_pj_per_byte(2048) > 3.75 and estimate_sram_pj_per_byte(4) < 0.375


def test_target_is_immutable_and_hashable():
    t = load_target("rain-sim")
    with pytest.raises(AttributeError):
        t.clock_mhz = 1000
    with pytest.raises(TypeError):
        t.sram["weight"] = None
    assert len({t, load_target("rain-sim")}) == 1


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_16_bytes_and_stable_under_key_order(tmp_path):
    t = load_target("rain-sim")
    assert isinstance(t.fingerprint(), bytes) and len(t.fingerprint()) == 16
    # The same parameters written in another order, with inline tables, ints for floats.
    shuffled = """
[energy]
static_power_mw = { source = "s", mw = 17.5 }
dram_pj_per_byte = { source = "s", pj = 120 }
sram_accumulator_pj_per_byte = { pj = 1.03, source = "s" }
sram_weight_pj_per_byte = { pj = 1.97, source = "s" }
sram_activation_pj_per_byte = { pj = 1.97, source = "s" }
vector_op = { pj = 0.03, source = "s" }
mac_binary = { pj = 0.0309375, source = "s" }
mac_int2 = { pj = 0.03375, source = "s" }
mac_int4 = { pj = 0.045, source = "s" }
mac_int8 = { pj = 0.09, source = "s" }

[dram]
latency_ns = 100.0
bandwidth_gb_s = 16.0

[sram]
accumulator = { size_kib = 64 }
weight = { size_kib = 256.0 }
activation = { size_kib = 256 }

[vector]
lut_entries = 256
width = 32

[matrix]
skip_zero_cycles = false
sparsity = ["2:4", "1:4", "4:8"]
precisions = ["binary", "int2", "int4", "int8"]
dataflow = "output-stationary"
cols = 32
rows = 32
"""
    other = load_target(write(tmp_path, 'clock_mhz = 800.0\nname = "rain-sim"\n' + shuffled))
    assert other.fingerprint() == t.fingerprint()
    assert other.to_dict()["matrix"] == t.to_dict()["matrix"]  # precisions in canonical order


def mutations():
    """(label, function changing one parameter of a to_dict() copy)."""
    def setter(*keys, value):
        def f(d):
            for k in keys[:-1]:
                d = d[k]
            d[keys[-1]] = value
        return f
    yield "name", setter("name", value="rain-sim-2")
    yield "clock", setter("clock_mhz", value=801)
    yield "rows", setter("matrix", "rows", value=16)
    yield "cols", setter("matrix", "cols", value=64)
    yield "dataflow", setter("matrix", "dataflow", value="weight-stationary")
    yield "precisions", setter("matrix", "precisions", value=["int8"])
    yield "vector width", setter("vector", "width", value=16)
    yield "lut", setter("vector", "lut_entries", value=512)
    for n in SRAM_BUFFERS:
        yield f"sram {n}", setter("sram", n, "size_kib", value=128)
    yield "bandwidth", setter("dram", "bandwidth_gb_s", value=8)
    yield "latency", setter("dram", "latency_ns", value=101)
    for k in ENERGY_FIGURES:
        yield f"energy {k}", setter("energy", k, "pj", value=9.5)
    yield "static power", setter("energy", "static_power_mw", "mw", value=1.0)


@pytest.mark.parametrize("label,mutate", list(mutations()), ids=[m[0] for m in mutations()])
def test_every_parameter_changes_the_fingerprint(label, mutate):
    t = load_target("rain-sim")
    d = t.to_dict()
    mutate(d)
    changed = Target.from_dict(d)
    assert changed != t
    assert changed.fingerprint() != t.fingerprint(), label


def test_description_and_sources_do_not_change_the_fingerprint():
    t = load_target("rain-sim")
    d = t.to_dict()
    d["description"] = "another text"
    d["energy"]["mac_int8"]["source"] = "another citation"
    assert Target.from_dict(d).fingerprint() == t.fingerprint()


def test_to_dict_round_trips():
    for name, _ in list_targets():
        t = load_target(name)
        again = Target.from_dict(t.to_dict())
        assert again == t and again.energy.sources == t.energy.sources and again.description == t.description


# --------------------------------------------------------------------------- bad files

BAD_FILES = [
    # (id, pattern, replacement, fragments the one-line message must contain)
    ("bad dataflow", r'^dataflow = .*$', 'dataflow = "row-stationary"',
     ["matrix.dataflow", "'row-stationary'", "allowed: 'output-stationary', 'weight-stationary'"]),
    ("close dataflow", r'^dataflow = .*$', 'dataflow = "output-stationery"',
     ["matrix.dataflow", "did you mean 'output-stationary'"]),
    ("unknown key", r'^cols = 32', 'colums = 32',
     ["unknown key 'matrix.colums'", "did you mean 'matrix.cols'", "allowed in [matrix]: rows, cols"]),
    ("unknown top key", r'^clock_mhz = 800', 'clock_mhz = 800\nvoltage = 0.8',
     ["unknown key 'voltage'", "allowed in the top level"]),
    ("unknown section", r'^\[dram\]', '[flash]\nsize_kib = 1\n\n[dram]', ["unknown key 'flash'"]),
    ("unknown sram buffer", r'^\[sram.weight\]', '[sram.weights]\nsize_kib = 1\n\n[sram.weight]',
     ["unknown key 'sram.weights'", "did you mean 'sram.weight'"]),
    ("missing key", r'^rows = 32\n', '', ["missing key 'matrix.rows'", "positive integer"]),
    ("missing section", r'^\[vector\]\nwidth = 32.*\nlut_entries = 256.*\n', '', ["missing key 'vector'"]),
    ("missing energy figure", r'^mac_int2 = .*\n', '', ["missing key 'energy.mac_int2'"]),
    ("string for int", r'^rows = 32', 'rows = "32"', ["matrix.rows", "expected an integer", "'32' (string)"]),
    ("float for int", r'^rows = 32', 'rows = 32.0', ["matrix.rows", "expected an integer"]),
    ("bool for int", r'^width = 32', 'width = true', ["vector.width", "expected an integer", "(boolean)"]),
    ("zero rows", r'^rows = 32', 'rows = 0', ["matrix.rows", "must be an integer >= 1, got 0"]),
    ("negative size", r'^size_kib = 64', 'size_kib = -64', ["sram.accumulator.size_kib", "> 0", "-64"]),
    ("zero clock", r'^clock_mhz = 800', 'clock_mhz = 0', ["clock_mhz", "> 0"]),
    ("nan bandwidth", r'^bandwidth_gb_s = 16', 'bandwidth_gb_s = nan', ["dram.bandwidth_gb_s", "finite"]),
    ("string bandwidth", r'^bandwidth_gb_s = 16', 'bandwidth_gb_s = "16 GB/s"',
     ["dram.bandwidth_gb_s", "expected a number"]),
    ("negative latency", r'^latency_ns = 100', 'latency_ns = -1', ["dram.latency_ns", ">= 0"]),
    ("bad precision", r'^precisions = .*$', 'precisions = ["int8", "int3"]',
     ["matrix.precisions[1]", "'int3'", "allowed: 'int8', 'int4', 'int2', 'binary'"]),
    ("duplicate precision", r'^precisions = .*$', 'precisions = ["int8", "int8"]',
     ["matrix.precisions[1]", "listed twice"]),
    ("empty precisions", r'^precisions = .*$', 'precisions = []', ["matrix.precisions", "non-empty list"]),
    ("precisions not a list", r'^precisions = .*$', 'precisions = "int8"', ["matrix.precisions", "list"]),
    ("lut not power of two", r'^lut_entries = 256', 'lut_entries = 200', ["vector.lut_entries", "power of two"]),
    ("energy as number", r'^mac_int8 = .*$', 'mac_int8 = 0.09',
     ["energy.mac_int8", "expected a table {pj = <number>, source"]),
    ("energy without source", r'^mac_int8 = .*$', 'mac_int8 = { pj = 0.09 }', ["missing key 'energy.mac_int8.source'"]),
    ("energy empty source", r'^mac_int8 = .*$', 'mac_int8 = { pj = 0.09, source = " " }',
     ["energy.mac_int8.source", "is empty"]),
    ("energy wrong unit", r'^static_power_mw = .*$', 'static_power_mw = { pj = 17.5, source = "x" }',
     ["unknown key 'energy.static_power_mw.pj'", "allowed in [energy.static_power_mw]: mw, source"]),
    ("negative energy", r'^dram_pj_per_byte = .*$', 'dram_pj_per_byte = { pj = -1, source = "x" }',
     ["energy.dram_pj_per_byte.pj", ">= 0"]),
    ("accumulator too small", r'^size_kib = 64', 'size_kib = 2',
     ["sram.accumulator.size_kib", "cannot hold one 32x32 tile (4096 bytes)"]),
    ("partial bytes", r'^size_kib = 64', 'size_kib = 64.0001', ["sram.accumulator.size_kib", "whole number"]),
    ("bad name", r'^name = .*$', 'name = "rain sim"', ["name", "not a usable name"]),
    ("name not string", r'^name = .*$', 'name = 3', ["name", "expected a string"]),
]


@pytest.mark.parametrize("case", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_names_file_and_key(tmp_path, case):
    _, pattern, replacement, fragments = case
    path = write(tmp_path, edited(pattern, replacement))
    with pytest.raises(TargetError) as info:
        load_target(path)
    message = str(info.value)
    assert isinstance(info.value, QCompileError)
    assert "\n" not in message and message.startswith(path + ": "), message
    for f in fragments:
        assert f in message, (f, message)


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, edited(r'^cols = 32', 'cols = = 32'))
    line = preset_text().splitlines().index("cols = 32") + 1
    with pytest.raises(TargetError, match=rf"^{re.escape(path)}: line {line}, column \d+: TOML syntax error: "):
        load_target(path)


def test_duplicate_key_is_a_syntax_error(tmp_path):
    path = write(tmp_path, edited(r'^rows = 32', 'rows = 32\nrows = 16'))
    with pytest.raises(TargetError, match="TOML syntax error"):
        load_target(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(TargetError, match="invalid UTF-8"):
        load_target(str(path))


def test_unknown_preset_and_missing_files(tmp_path):
    with pytest.raises(TargetError, match=r"unknown target 'rain-simm' \(did you mean 'rain-sim'\?\): give a preset"):
        load_target("rain-simm")
    with pytest.raises(TargetError, match="no such file"):
        load_target(str(tmp_path / "nope.toml"))
    with pytest.raises(TargetError, match="is a directory"):
        load_target(str(tmp_path))


def test_preset_name_wins_over_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rain-sim").write_text("not toml at all = = =")
    assert load_target("rain-sim").path == os.path.abspath(PRESET)
    with pytest.raises(TargetError, match=r"^\./rain-sim: line 1"):
        load_target("./rain-sim")


def test_user_file_and_target_passthrough(tmp_path):
    path = write(tmp_path, edited(r'^rows = 32', 'rows = 16').replace('name = "rain-sim"', 'name = "mine"'))
    t = load_target(path)
    assert (t.name, t.matrix.rows, t.path) == ("mine", 16, path)
    assert load_target(t) is t
    assert "target mine" in format_target(t)


# --------------------------------------------------------------------------- CLI


def test_cli_lists_presets(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    for column in ("name", "array", "dataflow", "SRAM", "clock", "file"):
        assert column in header
    by_name = {r.split()[0]: r for r in rows if r.startswith("rain-sim")}
    assert "32x32" in by_name["rain-sim"] and "output-stationary" in by_name["rain-sim"]
    assert "weight-stationary" in by_name["rain-sim-ws"]
    assert "256/256/64" in by_name["rain-sim"] and "800 MHz" in by_name["rain-sim"]
    assert by_name["rain-sim"].endswith(os.path.abspath(PRESET))


def test_cli_shows_one_target_with_sources(capsys, tmp_path):
    assert main(["targets", "rain-sim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("target rain-sim: ")
    assert load_target("rain-sim").fingerprint().hex() in out
    assert "20 bytes/cycle" in out and "80 cycles" in out
    for k in list(ENERGY_FIGURES) + ["static_power_mw"]:
        assert re.search(rf"^\s+{k}\s+\S+ \S+\s+\S", out, re.M), k
    assert "Horowitz ISSCC 2014" in out and "Stillmaker & Baas" in out
    path = write(tmp_path, preset_text().replace('name = "rain-sim"', 'name = "copy"'))
    assert main(["targets", path]) == 0
    assert capsys.readouterr().out.startswith("target copy: ")


@pytest.mark.parametrize("args,fragments", [
    (["targets", "nope"], ["unknown target 'nope'", "rain-sim"]),
    (["targets", "missing.toml"], ["target file missing.toml: no such file"]),
])
def test_cli_bad_target_is_one_line_exit_2(capsys, args, fragments):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error: ")
    for f in fragments:
        assert f in err[0]


def test_cli_bad_file_through_the_installed_command(tmp_path):
    """As a user runs it: exit 2, one line naming the file and the key, no traceback."""
    write(tmp_path, edited(r'^dataflow = .*$', 'dataflow = "diagonal"'), name="my.toml")
    exe = shutil.which("qcompile", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "qcompile"]
    r = subprocess.run(cmd + ["targets", "my.toml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("qcompile: error: my.toml: matrix.dataflow: 'diagonal' is not allowed; "
                                "allowed: 'output-stationary', 'weight-stationary'")
    r = subprocess.run(cmd + ["targets"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "rain-sim-ws" in r.stdout


def test_presets_are_package_data():
    """include_package_data is off, so setup.py must list the presets (a fresh
    non-editable install would otherwise ship no targets)."""
    import ast
    import fnmatch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    patterns = package_data["qcompile.backend"]
    presets = [f"targets/{f}" for f in os.listdir(os.path.join(root, "backend", "targets"))]
    assert presets and all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in presets), (patterns, presets)


def test_constants_match_docs():
    """docs/targets.md lists the same choices the validator accepts."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "targets.md")
    text = open(docs).read()
    for word in DATAFLOWS + PRECISIONS + ENERGY_FIGURES + ("static_power_mw", "size_kib", "lut_entries"):
        assert word in text, word
