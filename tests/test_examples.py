"""The committed examples: the digits model and its data files follow the conventions
and still classify, and the custom pass works from Python and from the CLI."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qcompile
from qcompile.onnx_io import to_proto

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
MODEL = os.path.join(EXAMPLES, "digits_cnn.onnx")
PLUGIN = os.path.join(EXAMPLES, "custom_pass.py")


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _eval_batch():
    """The eval set as one batch: (N, 1, 1, 8, 8) samples -> (N, 1, 8, 8) via the
    model's dynamic batch dimension."""
    data = np.load(os.path.join(EXAMPLES, "digits_eval.npz"))
    x = data["input"]
    return x.reshape((x.shape[0],) + x.shape[2:]), data["label"]


def _load_plugin():
    spec = importlib.util.spec_from_file_location("qcompile_example_custom_pass", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_model_loads_verifies_and_classifies():
    model = qcompile.load(MODEL)
    qcompile.check(model)
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    ops = [n.op_type for n in model.graph.nodes]
    assert ops.count("BatchNormalization") == 2, "the example keeps BN for canonicalize to fold"
    x, labels = _eval_batch()
    (logits,) = _session(to_proto(model)).run(None, {"input": x})
    assert logits.shape == (len(labels), 10)
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy >= 0.95, f"eval accuracy {accuracy:.3f}"


@pytest.mark.parametrize("name, n", [("digits_calib.npz", 200), ("digits_eval.npz", 300)])
def test_npz_follow_the_convention(name, n):
    """One key per input name holding N samples of the input shape [1,1,8,8]; eval
    files add int64 labels."""
    data = np.load(os.path.join(EXAMPLES, name))
    expected = {"input", "label"} if "eval" in name else {"input"}
    assert set(data.files) == expected
    x = data["input"]
    assert x.shape == (n, 1, 1, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    if "label" in expected:
        y = data["label"]
        assert y.shape == (n,) and y.dtype == np.int64
        assert set(np.unique(y)) <= set(range(10))


def test_custom_pass_through_pass_manager():
    _load_plugin()
    model = qcompile.load(MODEL)
    x, _ = _eval_batch()
    before = _session(to_proto(model)).run(None, {"input": x})[0]
    manager = qcompile.PassManager.parse("name-nodes{prefix=layer}")
    result = manager.run(model)
    assert result.modified
    names = [n.name for n in result.model.graph.nodes]
    assert all(name.startswith("layer_") for name in names) and len(set(names)) == len(names)
    assert names[:2] == ["layer_Conv_0", "layer_BatchNormalization_0"]
    after = _session(to_proto(result.model)).run(None, {"input": x})[0]
    assert np.array_equal(before, after)
    again = qcompile.PassManager.parse("name-nodes{prefix=layer}").run(result.model)
    assert not again.modified, "renaming is idempotent"


def test_custom_pass_keep_names_only_unnamed():
    module = _load_plugin()
    model = qcompile.load(MODEL)
    first, second = model.graph.nodes[:2]
    first.name = ""
    second.name = "layer_Conv_0"  # a taken name the generator must skip
    result = module.NameNodes(prefix="layer", keep=True)(model)
    assert result.modified
    assert first.name == "layer_Conv_1" and second.name == "layer_Conv_0"
    assert model.graph.nodes[2].name.startswith("/")  # exporter names kept


def test_custom_pass_through_cli(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "qcompile")
    out = tmp_path / "out.onnx"
    r = subprocess.run(
        [exe, "--plugin", PLUGIN, MODEL, "--passes", "name-nodes{prefix=layer}", "-o", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert names and all(name.startswith("layer_") for name in names)


def test_training_script_runs_and_reproduces_the_data(tmp_path):
    """A 2-epoch run writes all three files; the seeded split gives the committed data."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    r = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train_digits.py"), "--out", str(tmp_path), "--epochs", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "eval accuracy" in r.stdout
    qcompile.check(qcompile.load(str(tmp_path / "digits_cnn.onnx")))
    for name in ("digits_calib.npz", "digits_eval.npz"):
        new, committed = np.load(tmp_path / name), np.load(os.path.join(EXAMPLES, name))
        assert new.files == committed.files
        for key in new.files:
            assert np.array_equal(new[key], committed[key]), f"{name}[{key!r}] differs from the committed file"
