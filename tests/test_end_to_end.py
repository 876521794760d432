"""End to end through the command line, as a user runs it:

    qcompile MODEL.onnx --target rain-sim --calib calib.npz -o model.rsim --report-json r.json
    qcompile run model.rsim --input x.npz -o y.npz

on each of the onnx package's light models (seeded random weights), a transformer
encoder with a padding mask and an LSTM classifier exported from torch. The outputs of
`run` (dequantized to float, N samples along the leading axis) are checked against the
float model in onnxruntime on samples that calibration never saw, and the compile report
against what the model holds (MACs, host ops). Bit-exactness against the integer
reference is tested op by op and per model in test_rainsim.py; this is the user's path.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, os.path.dirname(__file__))
from onnx_models import light_random_weights  # noqa: E402

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
# model -> least SQNR (dB) of `run`'s outputs against the float model; each is several dB
# under what a run measured (benchmarks/ptq_vs_onnxruntime.py has the per-model figures)
LIGHT = {"squeezenet": 25, "shufflenet": 15, "bvlc_alexnet": 25, "zfnet512": 25, "inception_v1": 20,
         "inception_v2": 15, "resnet50": 15, "densenet121": 15, "vgg19": 20}
FAST_PIPELINE = "fold,calibrate{progress=false},quantize{search_samples=0},lower-integer"


def _qcompile(*args):
    """The CLI as `python -m qcompile`, run outside the source tree (the installed package)."""
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.square(ref).sum() / max(np.square(ref - got).sum(), 1e-30)))


def _compile_and_run(tmp_path, model_path, calib, feeds, extra=()):
    """Both commands (`extra`: more compile options); returns (the outputs of `run`, the compile report)."""
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "x.npz", **feeds)
    r = _qcompile(model_path, "--target", "rain-sim", "--calib", tmp_path / "calib.npz", "--samples", 1,
                  "-o", tmp_path / "m.rsim", "--report-json", tmp_path / "r.json", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cycles" in r.stdout and "energy" in r.stdout.lower()
    r = _qcompile("run", tmp_path / "m.rsim", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "y.npz") as y:
        outputs = dict(y)
    return outputs, json.loads((tmp_path / "r.json").read_text())


def _float_outputs(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    per_sample = [sess.run(names, {k: v[i] for k, v in feeds.items()}) for i in range(n)]
    return {name: np.stack([s[j] for s in per_sample]) for j, name in enumerate(names)}


def _light_model(name, path):
    """The light model with seeded random weights, its generators' shape constants dropped."""
    proto = light_random_weights(onnx.load(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))
    used = {i for n in proto.graph.node for i in n.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save(proto, str(path))
    inp = proto.graph.input[0]
    return inp.name, [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_model_compiles_and_runs_from_the_command_line(tmp_path, name):
    if not os.path.isdir(LIGHT_DIR):
        pytest.skip("the onnx package ships no light models here")
    path = tmp_path / f"{name}.onnx"
    input_name, shape = _light_model(name, path)
    rng = np.random.default_rng(0)
    calib = {input_name: rng.standard_normal([4] + shape).astype(np.float32)}
    feeds = {input_name: rng.standard_normal([2] + shape).astype(np.float32)}  # not in the calibration data
    # the default pipeline on squeezenet; the others without the activation range search,
    # which costs up to its time budget (60 s) on 4 calibration samples of a large model
    extra = () if name == "squeezenet" else ("--passes", FAST_PIPELINE)
    outputs, report = _compile_and_run(tmp_path, path, calib, feeds, extra)

    ref = _float_outputs(path, feeds)
    assert outputs.keys() == ref.keys()
    for k, want in ref.items():
        got = outputs[k]
        assert got.dtype == np.float32 and got.shape[0] == 2 and got.size == want.size
        got = got.reshape(want.shape)
        assert _sqnr(want, got) >= LIGHT[name], (k, _sqnr(want, got))
        assert (got.reshape(2, -1).argmax(1) == want.reshape(2, -1).argmax(1)).all()
    total = report["total"]
    assert total["cycles"] > 0 and total["energy_pj"]["total"] > 0
    assert sum(layer["macs"] for layer in report["layers"]) == total["macs"]
    # the MACs the simulator counted are the model's, as `qcompile inspect` counts them
    r = _qcompile("inspect", path, "--format", "json")
    assert r.returncode == 0 and total["macs"] == json.loads(r.stdout)["total_macs"] > 5e7
    # real models still run end to end: what the accelerator lacks runs as HOST work, listed with a reason
    assert all(h["reason"] for h in report["host_ops"])


def _torch_model(tmp_path, name):
    pytest.importorskip("torch")
    from torch_models import exported, sample_feeds

    import qcompile

    model, args = exported(name)
    path = tmp_path / f"{name}.onnx"
    qcompile.save(model, str(path))
    data = sample_feeds(args, sample_axis=True)
    return path, data(16), data(4)


@pytest.mark.filterwarnings("ignore:calibrate. non-finite")
@pytest.mark.parametrize("name, least_sqnr", [("transformer", 25), ("lstm", 25)])
def test_torch_model_compiles_and_runs_from_the_command_line(tmp_path, name, least_sqnr):
    path, calib, feeds = _torch_model(tmp_path, name)
    outputs, report = _compile_and_run(tmp_path, path, calib, feeds)
    ref = _float_outputs(path, feeds)
    got = outputs["y"].reshape(ref["y"].shape)
    assert _sqnr(ref["y"], got) >= least_sqnr
    ops = [layer["op"] for layer in report["layers"]]
    if name == "transformer":  # attention on the matrix unit, Softmax/LayerNorm on the host or as tables
        assert sum(op in ("QMatMul", "QGemm") for op in ops) >= 10
    if name == "lstm":
        assert "LSTM" in {h["op"] for h in report["host_ops"]}
