"""calibrate: streaming observers against numpy, non-finite exclusion, the JSON
sidecar, warnings, and the pass on the digits example and a masked transformer."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper

import qcompile
import qcompile.passes.calibrate as calibrate_pkg  # registers `calibrate`
from qcompile.errors import QCompileError
from qcompile.onnx_io import from_proto
from qcompile.passes.calibrate import Calibrate, CalibrationStats
from qcompile.passes.calibrate.observers import (
    EntropyObserver, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver,
    PercentileObserver, TensorObserver)

HERE = os.path.dirname(__file__)
DIGITS = os.path.join(HERE, "..", "examples", "digits_cnn.onnx")
CALIB = os.path.join(HERE, "..", "examples", "digits_calib.npz")


def _chunks(x, n):
    return np.array_split(x, n)


# -- observers ----------------------------------------------------------------------

def test_minmax_streaming_is_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * np.linspace(0.1, 5, 10_000, dtype=np.float32)
    obs = MinMaxObserver()
    for c in _chunks(x, 7):
        obs.update(c)
    assert obs.range() == (float(x.min()), float(x.max()))


def test_moving_average():
    obs = MovingAverageMinMaxObserver(momentum=0.5)
    obs.update(np.array([0.0, 4.0]))
    obs.update(np.array([-2.0, 2.0]))
    assert obs.range() == (-1.0, 3.0)


def test_histogram_grows_and_keeps_every_count():
    rng = np.random.default_rng(1)
    obs = HistogramObserver(bins=256)
    parts = [rng.uniform(0, 1, 1000), rng.uniform(-3, 0.5, 1000), rng.uniform(2, 50, 1000), np.full(10, 7.0)]
    for p in parts:
        obs.update(p)
    h = obs.hist
    assert h.total == 3010 and len(h.counts) == 256
    edges = h.edges
    assert edges[0] <= -3 and edges[-1] > 50
    allx = np.concatenate(parts)
    ref, _ = np.histogram(allx, bins=edges)
    assert np.abs(ref - h.counts).sum() <= 4  # only values exactly on an edge may differ


@pytest.mark.parametrize("p", [99.0, 99.9])
def test_percentile_within_one_bin_of_numpy_streaming_and_one_shot(p):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(20_000) * s for s in (0.5, 1.0, 3.0)]).astype(np.float32)
    streamed, oneshot = PercentileObserver(p, bins=2048), PercentileObserver(p, bins=2048)
    for c in _chunks(x, 9):
        streamed.update(c)
    oneshot.update(x)
    for obs in (streamed, oneshot):
        lo, hi = obs.range()
        w = obs.hist.width
        assert abs(hi - np.percentile(x, p)) <= w and abs(lo - np.percentile(x, 100 - p)) <= w
    assert np.allclose(streamed.range(), oneshot.range(), atol=2 * streamed.hist.width)


def test_mse_clips_gaussian_below_max():
    x = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    obs = MSEObserver(bits=8)
    for c in _chunks(x, 4):
        obs.update(c)
    lo, hi = obs.range()
    assert abs(lo + hi) < 0.1 * hi and 2.5 < hi < np.abs(x).max()  # symmetric data, a near-symmetric range
    lo4, hi4 = MSEObserver(bits=4), None
    lo4.update(x)
    hi4 = lo4.range()[1]
    assert hi4 < hi  # fewer bits: more clipping pays


def _quantization_mse(x, lo, hi, bits=8):
    scale = (hi - lo) / (2 ** bits - 1)
    zp = np.rint(-lo / scale)
    q = np.clip(np.rint(x / scale) + zp, 0, 2 ** bits - 1)
    return float(np.mean(np.square((q - zp) * scale - x)))


def test_mse_range_is_asymmetric_on_skewed_data_and_beats_min_max_and_symmetric():
    """Activations are quantized with a zero point, so the MSE range follows the data's
    skew (a residual sum: mostly positive, a short negative tail) and its real
    quantization error is lower than min/max's and than the best symmetric range's."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.exponential(1.0, 190_000), -rng.exponential(0.1, 10_000)]).astype(np.float32)
    obs = MSEObserver(bits=8)
    obs.update(x)
    lo, hi = obs.range()
    assert -1.0 < lo < 0 and 5.0 < hi < x.max()
    err = _quantization_mse(x, lo, hi)
    assert err < _quantization_mse(x, x.min(), x.max())
    assert err < min(_quantization_mse(x, -t, t) for t in np.linspace(1.0, float(x.max()), 200))


def test_entropy_on_relu_like_data():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(200_000), 0).astype(np.float32)
    obs = EntropyObserver(bits=8)
    for c in _chunks(x, 5):
        obs.update(c)
    lo, hi = obs.range()
    assert lo == 0.0 and 1.0 < hi <= x.max() + obs.hist.width
    sym = EntropyObserver()
    sym.update(rng.standard_normal(100_000).astype(np.float32))
    lo, hi = sym.range()
    assert lo == -hi and 2.0 < hi <= 5.0


def test_tensor_observer_excludes_and_counts_nonfinite():
    obs = TensorObserver(bins=128)
    obs.update(np.array([1.0, -np.inf, np.nan, 2.0, np.inf, -3.4e38, -1e9, -0.5], np.float32))
    assert obs.count == 3 and obs.nonfinite == 5
    assert obs.hist.range() == (-0.5, 2.0)


# -- the pass -----------------------------------------------------------------------

def _where_inf_model():
    """y = Softmax(Where(x < 0, -inf, x)): its Where output holds -inf."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    ninf = helper.make_tensor("ninf", TensorProto.FLOAT, [], [-np.inf])
    nodes = [helper.make_node("Less", ["x", "zero"], ["neg"]),
             helper.make_node("Where", ["neg", "ninf", "x"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[zero, ninf])
    return from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_digits_every_method(recwarn):
    model = qcompile.load(DIGITS)
    result = Calibrate(data=CALIB, progress=False)(model)
    assert result.modified is False and result.model is model
    stats = model.annotations["calibration"]
    assert isinstance(stats, CalibrationStats) and stats.num_samples == 200 and stats.method == "minmax"
    expected = ["input"] + [v.name for n in model.graph for v in n.outputs]
    assert list(stats.tensors) == expected
    relu = "/2/Relu_output_0"
    mn, mx = stats.range(relu, "minmax")
    assert mn == 0.0 and mx > 0
    for method in calibrate_pkg.METHODS:
        lo, hi = stats.range(relu, method)
        assert 0.0 <= lo <= hi <= mx + 1e-6, method
    assert stats.range("input", "minmax") == (0.0, 1.0)
    # against the numbers onnxruntime gives for the whole set at once
    proto, names = calibrate_pkg.calibration_proto(model)
    sess = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    data = np.load(CALIB)["input"].reshape(200, 1, 8, 8)
    outs = dict(zip(names, sess.run(names, {"input": data})))
    for name in names:
        assert np.allclose(stats.range(name, "minmax"), (outs[name].min(), outs[name].max()), rtol=1e-5, atol=1e-6)
        assert stats.tensors[name].count == outs[name].size


def test_pipeline_text_and_num_samples():
    model = qcompile.load(DIGITS)
    pm = qcompile.PassManager.parse(f"calibrate{{method=entropy,num_samples=40,batch_size=8,progress=false,data={CALIB}}}")
    pm.run(model)
    stats = model.annotations["calibration"]
    assert stats.num_samples == 40 and stats.method == "entropy"


def test_nonfinite_values_excluded_and_reported():
    model = _where_inf_model()
    feeds = _feeds(10, (2, 8))
    model.annotations["calibration_data"] = feeds
    with pytest.warns(UserWarning, match=r"excluded from the ranges of 1 tensors: masked \("):
        Calibrate(progress=False, batch_size=4)(model)
    stats = model.annotations["calibration"]
    xs = np.concatenate([f["x"] for f in feeds])
    masked = stats.tensors["masked"]
    assert masked.nonfinite == int((xs < 0).sum()) and masked.count == int((xs >= 0).sum())
    assert masked.min >= 0 and masked.max == pytest.approx(xs.max())
    for method in calibrate_pkg.METHODS:
        assert all(np.isfinite(stats.range("masked", method))), method
    assert "neg" not in stats.tensors  # bool tensors are not calibrated


def test_transformer_with_padding_mask():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, HERE)
    try:
        import torch_models
    finally:
        sys.path.remove(HERE)
    module, (x, mask) = torch_models.transformer()
    model = qcompile.from_torch(module, (x, mask), input_names=["x", "mask"],
                                dynamic_axes={"x": {0: "N"}, "mask": {0: "N"}})
    rng = np.random.default_rng(5)
    feeds = []
    for i in range(6):
        m = np.zeros((1, 6), bool)
        m[0, 6 - i % 3:] = True
        feeds.append({"x": rng.standard_normal((1, 6, 32)).astype(np.float32), "mask": m})
    model.annotations["calibration_data"] = feeds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Calibrate(progress=False, batch_size=3, method="percentile")(model)
    stats = model.annotations["calibration"]
    assert stats.nonfinite(), "the additive -inf mask should have been seen"
    assert any("excluded" in str(w.message) for w in caught)
    for name in stats.tensors:
        r = stats.range(name)
        assert r is None or all(np.isfinite(r)), name
    assert torch  # used by the builder


def test_json_round_trip_and_sidecar_reuse(tmp_path, monkeypatch):
    model = qcompile.load(DIGITS)
    sidecar = str(tmp_path / "digits.calib.json")
    Calibrate(data=CALIB, stats_file=sidecar, progress=False)(model)
    first = model.annotations["calibration"]
    again = CalibrationStats.from_json(first.to_json())
    for method in calibrate_pkg.METHODS:
        assert again.ranges(method) == first.ranges(method), method
    assert again.tensors["input"].hist.counts.tolist() == first.tensors["input"].hist.counts.tolist()

    sessions = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    model2 = qcompile.load(DIGITS)
    p = Calibrate(data=CALIB, stats_file=sidecar, progress=False, method="entropy")
    p(model2)
    assert sessions == [] and p.stats["sidecar reused"] == 1
    assert model2.annotations["calibration"].ranges() == first.ranges("entropy")
    with pytest.warns(UserWarning, match="other settings"):  # other settings: calibrate again
        Calibrate(data=CALIB, stats_file=sidecar, progress=False, bins=512)(model2)
    assert sessions == [1]


def test_sidecar_for_another_model_and_bad_files(tmp_path):
    sidecar = str(tmp_path / "s.json")
    model = qcompile.load(DIGITS)
    Calibrate(data=CALIB, stats_file=sidecar, progress=False, num_samples=16)(model)
    other = _where_inf_model()
    with pytest.raises(QCompileError, match="made for another model"):
        CalibrationStats.load(sidecar, other)
    other.annotations["calibration_data"] = _feeds(16, (1, 8))
    with pytest.warns(UserWarning, match="not reusing"):
        Calibrate(stats_file=sidecar, progress=False)(other)
    assert CalibrationStats.load(sidecar, other).matches(other)  # rewritten for the new model
    (tmp_path / "bad.json").write_text("{\"format\": \"something else\"}")
    with pytest.raises(QCompileError, match="bad.json: not a qcompile calibration file"):
        CalibrationStats.load(str(tmp_path / "bad.json"))
    (tmp_path / "junk.json").write_text("{oops")
    with pytest.raises(QCompileError, match="junk.json: not valid JSON"):
        CalibrationStats.load(str(tmp_path / "junk.json"))


def test_warnings_for_too_few_samples_and_errors():
    model = _where_inf_model()
    model.annotations["calibration_data"] = _feeds(3, (1, 8))
    with pytest.warns(UserWarning, match="only 3 calibration samples, fewer than batch_size 16"):
        Calibrate(progress=False)(model)
    with pytest.warns(UserWarning, match="moving-average with momentum 0.9 needs about 10 batches"):
        Calibrate(progress=False, method="moving-average")(model)
    with pytest.warns(UserWarning, match="the 99.99 percentile needs over 10000 values"):
        Calibrate(progress=False, method="percentile")(model)
    with pytest.raises(QCompileError, match="calibrate needs calibration data"):
        Calibrate(progress=False)(_where_inf_model())
    with pytest.raises(qcompile.PipelineError, match="method"):
        Calibrate(method="kl")
    with pytest.raises(QCompileError, match="percentile must be in"):
        Calibrate(progress=False, percentile=120.0)(model)


def test_memory_budget_splits_batches_and_output_groups():
    model = _where_inf_model()
    model.annotations["calibration_data"] = _feeds(8, (1, 8))
    p = Calibrate(progress=False, batch_size=4)
    p(model)
    assert p.stats["batches"] == 2 and p.stats["onnxruntime runs"] == 2
    ref = model.annotations["calibration"].ranges("minmax")
    assert calibrate_pkg._groups(["a", "b", "c"], {"a": 10, "b": 10, "c": 10}, 20) == [["a", "b"], ["c"]]
    # 3 activations of 1.2 MB per sample, budget 1 MB: one sample per batch, one run per tensor
    big = _where_inf_model()
    big.graph.inputs[0].type = big.graph.inputs[0].type.with_shape(("N", 300_000))
    big.annotations["calibration_data"] = _feeds(2, (1, 300_000))
    p = Calibrate(progress=False, memory_mb=1, batch_size=4)
    p(big)
    assert p.stats["batches"] == 2 and p.stats["onnxruntime runs"] == 6
    assert ref  # the small model's ranges exist
