"""The command line, driven through subprocess as a user would.

Commands run with the temporary folder as working directory, so they exercise the
installed package, not the source tree.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qcompile(*args, cwd):
    exe = shutil.which("qcompile", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "qcompile"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True)


def assert_user_error(r, *fragments):
    """Exit code 2, one line on stderr naming the culprit, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def mlp_model(path):
    """x[2,4] -> MatMul -> Add -> Identity -> Relu -> y; real weights."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.standard_normal((4, 3)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], rng.standard_normal(3).astype(np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["add"], name="add"),
        helper.make_node("Identity", ["add"], ["id"], name="identity"),
        helper.make_node("Relu", ["id"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def run_ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture
def mlp(tmp_path):
    return mlp_model(tmp_path / "mlp.onnx")


def test_help_and_version(tmp_path):
    r = qcompile("--help", cwd=tmp_path)
    assert r.returncode == 0
    for word in ("inspect", "passes", "PIPELINE"):
        assert word in r.stdout
    r = subprocess.run([sys.executable, "-m", "qcompile", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("qcompile ")


def test_round_trip_without_passes(tmp_path, mlp):
    out = tmp_path / "out.onnx"
    r = qcompile(mlp, "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "round trip" in r.stdout
    x = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    assert np.array_equal(run_ort(mlp, x)[0], run_ort(out, x)[0])


def test_pipeline_runs_and_rewrites(tmp_path, mlp):
    out = tmp_path / "out.onnx"
    r = qcompile(mlp, "--passes", "canonicalize,dce", "-o", out, "--timing", "--print-ir-after", "canonicalize",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["Gemm", "Relu"]
    assert "IR after canonicalize" in r.stderr and "Gemm(" in r.stderr
    assert "canonicalize" in r.stderr and "dce" in r.stderr  # timing table
    x = {"x": np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(mlp, x)[0], run_ort(out, x)[0], rtol=1e-6, atol=1e-6)


def test_print_ir_after_all_without_output_prints_ir(tmp_path, mlp):
    r = qcompile(mlp, "--passes", "dce", "--print-ir-after-all", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "IR after dce" in r.stderr
    assert r.stdout.startswith("model ir_version=") and "MatMul(%x, %w)" in r.stdout


def test_passes_lists_builtin_passes_with_options(tmp_path):
    r = qcompile("passes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("canonicalize", "dce", "infer-shapes", "upgrade-opset"):
        assert name in r.stdout
    assert "version" in r.stdout  # upgrade-opset's option


def test_inspect_text_json_and_dot(tmp_path, mlp):
    r = qcompile("inspect", mlp, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "MatMul" in r.stdout and "24" in r.stdout  # 2x4x3 MACs
    r = qcompile("inspect", mlp, "--format", "json", "--dot", tmp_path / "g.dot", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["total_macs"] == 24
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and "MatMul" in dot


def test_plugin_passes_are_listed_and_bad_plugins_are_user_errors(tmp_path):
    """Running the example plugin's pass is tested in test_examples.py."""
    plugin = os.path.join(ROOT, "examples", "custom_pass.py")
    r = qcompile("passes", "--plugin", plugin, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name-nodes" in r.stdout and "name-nodes" not in qcompile("passes", cwd=tmp_path).stdout
    assert_user_error(qcompile("passes", "--plugin", tmp_path / "none.py", cwd=tmp_path), "none.py", "no such file")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert_user_error(qcompile("passes", "--plugin", broken, cwd=tmp_path), "broken.py", "RuntimeError: boom")


# -- bad input: one line, exit 2, nothing written ----------------------------------------
def test_missing_file(tmp_path):
    assert_user_error(qcompile(tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", cwd=tmp_path), "nope.onnx",
                      "no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_not_onnx_and_truncated(tmp_path, mlp):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    assert_user_error(qcompile(text, "-o", tmp_path / "o.onnx", cwd=tmp_path), "notes.onnx")
    data = open(mlp, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_user_error(qcompile(cut, "-o", tmp_path / "o.onnx", cwd=tmp_path), "cut.onnx")
    assert not (tmp_path / "o.onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["cut.onnx", "mlp.onnx", "notes.onnx"]


def _save_graph(path, nodes):
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cycle_and_undefined_input(tmp_path):
    cyc = _save_graph(tmp_path / "cycle.onnx", [helper.make_node("Add", ["x", "b"], ["a"], name="A"),
                                                helper.make_node("Relu", ["a"], ["b"], name="B")])
    assert_user_error(qcompile(cyc, "-o", tmp_path / "o.onnx", cwd=tmp_path), "cycle.onnx", "cycle", "'A' (Add)")
    undef = _save_graph(tmp_path / "undef.onnx", [helper.make_node("Add", ["x", "ghost"], ["b"], name="adder")])
    assert_user_error(qcompile(undef, "-o", tmp_path / "o.onnx", cwd=tmp_path), "undef.onnx", "'adder' (Add)",
                      "'ghost'")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_pass_and_option(tmp_path, mlp):
    r = qcompile(mlp, "--passes", "canonicalise", "-o", tmp_path / "o.onnx", cwd=tmp_path)
    assert_user_error(r, "canonicalise", "canonicalize", "dce")
    r = qcompile(mlp, "--passes", "upgrade-opset{versoin=13}", "-o", tmp_path / "o.onnx", cwd=tmp_path)
    assert_user_error(r, "versoin", "version")
    assert not (tmp_path / "o.onnx").exists()


def test_bad_output_folder_and_debug_traceback(tmp_path, mlp):
    assert_user_error(qcompile(mlp, "-o", tmp_path / "no" / "o.onnx", cwd=tmp_path), "does not exist")
    r = qcompile(tmp_path / "nope.onnx", "--debug", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_quantize_fallbacks_and_the_error_report_are_printed(tmp_path):
    """The layers kept at higher precision, with the reason, and the error-report table
    reach the user on stderr (stdout stays for the model when there is no -o)."""
    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
    r = qcompile(os.path.join(examples, "digits_cnn.onnx"), "--passes",
                 "fold,calibrate,quantize{weights=int2,min_weight_sqnr=20},error-report{samples=8}",
                 "--calib", os.path.join(examples, "digits_calib.npz"), "-o", tmp_path / "q.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kept = [l for l in r.stderr.splitlines() if l.startswith("qcompile: quantize: ")]
    assert kept and all("dB SQNR < 20 dB: kept at int8" in l for l in kept)
    assert "qcompile: quantize: Gemm '/8/Gemm': i2 weights give" in r.stderr
    assert "quantization error over 8 samples: model output SQNR" in r.stderr
    assert "layer (only it quantized)" in r.stderr and "/0/Conv" in r.stderr


def test_warnings_are_one_line_without_debug(tmp_path):
    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
    args = (os.path.join(examples, "digits_cnn.onnx"), "--passes", "fold,sparsify{activations=0.5},calibrate",
            "--calib", os.path.join(examples, "digits_calib.npz"), "-o", tmp_path / "s.onnx")
    r = qcompile(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "qcompile: warning: sparsify: layer '/0/Conv' (Conv) skipped" in r.stderr
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr
    r = qcompile(*args, "--debug", cwd=tmp_path)
    assert "UserWarning: sparsify: layer '/0/Conv'" in r.stderr
