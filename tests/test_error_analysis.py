"""Quantization error analysis (passes/quantize/error_analysis.py): per-tensor SQNR and
per-layer output error on the digits example, the JSON form, and the error-report pass."""
import json
import math
import os

import numpy as np
import pytest

import qcompile
import qcompile.passes  # noqa: F401  (registers the passes)
from qcompile.errors import PassFailedError
from qcompile.passes.quantize.error_analysis import ErrorReport, analyze_quantization_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "examples", "digits_cnn.onnx")
CALIB = os.path.join(ROOT, "examples", "digits_calib.npz")
EVAL = os.path.join(ROOT, "examples", "digits_eval.npz")


def quantized(weights):
    model = qcompile.load(MODEL)
    text = f"fold,calibrate{{data={CALIB},progress=false}},quantize{{weights={weights}}}"
    return qcompile.PassManager.parse(text).run(model).model


def eval_feeds(n=48):
    x = np.load(EVAL)["input"][:n]
    return [{"input": s} for s in x]


@pytest.fixture(scope="module")
def reports():
    out = {}
    for weights in ("int8", "int2"):
        m = quantized(weights)
        out[weights] = (m, analyze_quantization_error(m.annotations["float_model"], m, eval_feeds()))
    return out


def test_every_quantized_tensor_is_listed(reports):
    model, report = reports["int8"]
    g = model.graph
    outputs = {v.name for v in g.outputs}
    activations = set()
    for q in (n for n in g.nodes if n.op_type == "QuantizeLinear"):
        dq = q.outputs[0].users[0]
        activations.add(dq.outputs[0].name if dq.outputs[0].name in outputs else q.inputs[0].name)
    constants = [n for n in g.nodes if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer]
    listed = {t.name for t in report.tensors if t.kind == "activation"}
    assert listed == activations
    assert sum(t.kind in ("weight", "bias") for t in report.tensors) == len(constants)
    table = report.format_table()
    for t in report.tensors:
        assert t.name in table
    layers = {n.name for n in g.nodes if n.op_type in ("Conv", "Gemm")}
    assert {l.name for l in report.layers} == layers
    assert report.samples == 48


def test_int8_error_is_small_and_int2_larger(reports):
    _, r8 = reports["int8"]
    _, r2 = reports["int2"]
    for t in r8.tensors:
        assert math.isfinite(t.sqnr_db) and (t.sqnr_db > 20 or t.corrected), t
    # bias correction moves some biases on purpose; the table says which
    moved = [t for t in r8.tensors if t.corrected]
    assert moved and all(t.kind == "bias" for t in moved)
    assert r8.format_table().count("bias (corrected)") == len(moved)
    assert r8.output_sqnr_db > 30 and r8.output_cosine > 0.999
    for l in r8.layers:
        assert math.isfinite(l.output_sqnr_db) and l.output_sqnr_db > 30
    assert r2.output_sqnr_db < r8.output_sqnr_db - 15
    by_name = {l.name: l for l in r8.layers}
    for l in r2.layers:
        assert l.output_sqnr_db < by_name[l.name].output_sqnr_db
        assert l.weight_type == "i2"


def test_worst_layer_first(reports):
    _, r2 = reports["int2"]
    sqnr = [l.output_sqnr_db for l in r2.layers]
    assert sqnr == sorted(sqnr)
    assert r2.worst_layer is r2.layers[0]
    table = r2.format_table()
    assert table.index(r2.layers[0].name) < table.index(r2.layers[-1].name)


def test_only_one_layer_quantized_matches_full_model_when_single_layer():
    """With every layer but one excluded, the full QDQ model's output error equals that
    layer's 'only it quantized' variant up to the flow-op activations."""
    m = qcompile.load(MODEL)
    text = f"fold,calibrate{{data={CALIB},progress=false}},quantize{{weights=int2,exclude=Gemm|/0/Conv}}"
    m = qcompile.PassManager.parse(text).run(m).model
    r = analyze_quantization_error(m.annotations["float_model"], m, eval_feeds(16))
    assert [l.name for l in r.layers] == ["/3/Conv"]
    assert r.layers[0].output_sqnr_db == pytest.approx(r.output_sqnr_db, abs=3.0)


def test_json_round_trip(reports, tmp_path):
    _, report = reports["int2"]
    text = json.dumps(report.to_dict())
    back = ErrorReport.from_dict(json.loads(text))
    assert back == report
    # exact tensors (inf SQNR) are written as null and read back as inf
    r = ErrorReport.from_dict({**report.to_dict(), "output_sqnr_db": None})
    assert r.output_sqnr_db == math.inf and json.loads(json.dumps(r.to_dict()))["output_sqnr_db"] is None


def test_error_report_pass_writes_json(tmp_path):
    out = tmp_path / "errors.json"
    m = qcompile.load(MODEL)
    text = f"fold,calibrate{{data={CALIB},progress=false}},quantize{{weights=int4}},error-report{{output={out},samples=16}}"
    result = qcompile.PassManager.parse(text).run(m)
    report = result.model.annotations["error_report"]
    data = json.loads(out.read_text())
    assert data["samples"] == 16 == report.samples
    assert ErrorReport.from_dict(data) == report
    assert [l["name"] for l in data["layers"]] == [l.name for l in report.layers]


def test_error_report_pass_needs_quantize():
    m = qcompile.load(MODEL)
    with pytest.raises(PassFailedError, match="after quantize"):
        qcompile.PassManager.parse(f"fold,error-report{{data={CALIB}}}").run(m)
