"""Activation range search: choose each int8 activation's range by the error it causes
at the model's output, not by a per-tensor rule.

Why: a per-tensor rule weighs a tensor's clipping error against its rounding noise as
if both reached the output alike, and they do not: rounding noise is independent per
element and averages out in the sums of the next layers, while clipping hits the
largest activations, which carry the signal. Which rule wins differs from tensor to
tensor (benchmarks/ptq_vs_onnxruntime.py: min/max is best on the ResNet, the
99.999th percentile on some MobileNet tensors, MSE on none).

How (coordinate descent, one sweep in graph order):
  1. The QDQ model runs in onnxruntime as a user runs it, graph optimisations on: its
     fused u8s8 kernels saturate int16 pair sums on CPUs without VNNI, and a range
     that is best in exact arithmetic can lose 10 dB there (measured on the ResNet).
  2. Candidates per tensor: the ranges of min/max, the 99.999th and 99.99th percentile
     and the MSE search, from the calibration histogram (no new statistics).
  3. First each rule is tried for every int8 tensor at once, as onnxruntime applies
     one calibration method to all: many small cuts that no single tensor shows above
     the noise add up to one that does (the MobileNet's MSE ranges: 11% less output
     error, 0.5 dB). Then each tensor in turn tries every candidate with the other
     tensors at their current choice. Each trial gives each of the `samples`
     calibration samples its squared output error against the float model, and a
     candidate replaces the current range(s) only when its cut of that error is real:
     at least 1% of the total, and a mean per-sample cut z standard errors above zero
     (a one-sided paired t-test over the samples), z set so that the chance that any
     trial of the stage passes on noise alone stays under 5% (Bonferroni: the normal
     quantile of 1 - 0.05/trials; 2.1 for the 3 trials of the first stage, at least 3
     in the second, where about 3 candidates are tried per tensor). A fixed margin does
     not scale with the noise: "1% on both halves of the samples", an earlier rule, let
     two ranges of a GRU classifier's head through on 5-6% calibration cuts, and they
     lost 0.4% and 2.8% on new data (benchmarks/ptq_vs_onnxruntime.py, exact
     arithmetic). Where the fused kernels saturate, cuts are large and consistent and
     pass.
The sweep stops after `seconds` (the tensors left keep calibrate's range), so a large
model costs bounded time. Left alone: int4 tensors (their range is the MSE range at 4
bits, and a dropped Clip or a MaxPool's output scale depends on it) and int16 tensors
(rounding noise is already negligible); tensors whose Q/DQ parameters are shared or not
per-tensor constants.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.data import load_samples
from qcompile.ir import INT8, Model, QuantParams, TensorType
from qcompile.onnx_io import to_proto

from .activations import activation_params
from .weights import quantize_bias

__all__ = ["search_activation_ranges", "calibration_source"]

log = logging.getLogger(__name__)
_CANDIDATES = (("minmax", {}), ("percentile", {"percentile": 99.999}), ("percentile", {"percentile": 99.99}),
               ("mse", {"bits": 8}))


def calibration_source(model: Model) -> Optional[Any]:
    """The calibration samples `calibrate` read: its feed dicts, or its single .npz file."""
    if model.annotations.get("calibration_data") is not None:
        return model.annotations["calibration_data"]
    stats = model.annotations.get("calibration")
    ident = getattr(stats, "settings", {}).get("data") if stats is not None else None
    if isinstance(ident, list) and len(ident) == 1 and os.path.isfile(ident[0][0]):
        return ident[0][0]
    return None


# A new range must cut the squared output error on the search samples by this fraction
# and by this many standard errors of the mean per-sample cut (module docstring, step 3).
_MIN_GAIN = 0.01
_MIN_T = 3.0  # the least z of the second stage
_FAMILY_ALPHA = 0.05


def _z(trials: int) -> float:
    """Standard errors a cut needs so that `trials` trials pass on noise with chance under _FAMILY_ALPHA."""
    return statistics.NormalDist().inv_cdf(1.0 - _FAMILY_ALPHA / max(1, trials))


def search_activation_ranges(model: Model, stats, samples: int, seconds: float = 60.0) -> Dict[str, str]:
    """Re-choose the ranges of `model`'s int8 activations (a QDQ model made by quantize,
    with model.annotations['float_model']) within `seconds`; returns {tensor: chosen
    rule} for the tensors whose range changed."""
    source = calibration_source(model)
    if source is None or samples <= 0:
        log.info("quantize: no calibration samples at hand, activation ranges not searched")
        return {}
    g = model.graph
    params: Dict[str, Tuple[float, int]] = {}  # tensor -> current (scale, zero point)
    slots: Dict[str, Tuple[str, str]] = {}  # tensor -> (scale name, zero point name)
    quants = {}
    for n in g.nodes:
        if n.op_type != "QuantizeLinear" or n.domain not in ("", "ai.onnx") or n.inputs[0] is None:
            continue
        t = n.output.type
        s, z = n.inputs[1], n.inputs[2] if len(n.inputs) > 2 else None
        name = n.name[:-2] if n.name.endswith("_Q") and n.name[:-2] in stats.tensors else n.inputs[0].name
        if not isinstance(t, TensorType) or t.dtype != INT8 or z is None or name not in stats.tensors \
                or not s.is_initializer or not z.is_initializer or len(s.uses) != 2 or len(z.uses) != 2:
            continue
        params[name] = (float(s.const_value), int(z.const_value))
        slots[name] = (s.name, z.name)
        quants[name] = n
    if not params:
        return {}
    biases = {name: _dependent_biases(q) for name, q in quants.items()}
    proto = to_proto(model)
    inits = {i.name: i for i in proto.graph.initializer}
    fsess = qdq_session(model.annotations["float_model"])
    outputs = [o.name for o in fsess.get_outputs()]
    loaded = list(load_samples(source, model).batches(16, samples))
    batches, counts = [dict(b) for b in loaded], [b.samples for b in loaded]
    refs = [fsess.run(outputs, b) for b in batches]

    def error(chosen: Dict[str, Tuple[float, int]]) -> np.ndarray:
        """Squared output error of each sample, as onnxruntime runs the QDQ model (its
        fused kernels included)."""
        for name, (s, z) in chosen.items():
            inits[slots[name][0]].CopyFrom(numpy_helper.from_array(np.asarray(s, np.float32), slots[name][0]))
            inits[slots[name][1]].CopyFrom(numpy_helper.from_array(np.asarray(z, np.int8), slots[name][1]))
            for bias in biases[name]:
                for v, a in zip(bias.slots, bias.at(s)):
                    inits[v.name].CopyFrom(numpy_helper.from_array(a, v.name))
        sess = qdq_session(proto)
        return np.concatenate([_sample_errors(ref, sess.run(outputs, b), n)
                               for b, ref, n in zip(batches, refs, counts)])

    def candidate(name: str, method: str, extra: Dict[str, float]) -> Optional[Tuple[float, int]]:
        rng = stats.tensors[name].range(method, **{"percentile": 99.99, "bits": 8, **extra})
        return None if rng is None else activation_params(*rng, INT8)

    start = time.perf_counter()
    initial = dict(params)
    best_err = error(params)
    rule: Dict[str, str] = {}
    alternatives = len(_CANDIDATES) - 1  # the candidates other than a tensor's current range
    # stage 1: each rule for every tensor at once (module docstring, step 3)
    z = _z(alternatives)
    for method, extra in _CANDIDATES:
        cand = {name: candidate(name, method, extra) or params[name] for name in params}
        if cand == params:
            continue
        err = error(cand)
        log.debug("quantize: range search, %s for all tensors: squared output error %.4g -> %.4g (t = %.2f)",
                  _label(method, extra), best_err.sum(), err.sum(), _t(best_err, err))
        if _accept(best_err, err, z):
            best_err, params = err, cand
            rule = dict.fromkeys(params, _label(method, extra))
    # stage 2: each tensor in turn, the others at their current choice
    z = max(_MIN_T, _z(alternatives * len(params)))
    for done, name in enumerate(params):
        if time.perf_counter() - start > seconds:
            log.info("quantize: range search stopped after %d of %d tensors (%g s budget)", done, len(params), seconds)
            break
        for method, extra in _CANDIDATES:
            cand = candidate(name, method, extra)
            if cand is None or cand == params[name]:
                continue
            err = error({**params, name: cand})
            log.debug("quantize: range search, %s for %s: squared output error %.4g -> %.4g (t = %.2f)",
                      _label(method, extra), name, best_err.sum(), err.sum(), _t(best_err, err))
            if _accept(best_err, err, z):
                best_err, params[name] = err, cand
                rule[name] = _label(method, extra)
    changed = {name: rule[name] for name in params if params[name] != initial[name]}
    for name in changed:
        _write(g, quants[name], *params[name])
        for bias in biases[name]:
            for v, a in zip(bias.slots, bias.at(params[name][0])):
                v.const_value = a
    return changed


def _label(method: str, extra: Dict[str, float]) -> str:
    return method + (f" {extra['percentile']}" if "percentile" in extra else "")


def _sample_errors(refs: List[np.ndarray], got: List[np.ndarray], n: int) -> np.ndarray:
    """Squared error of each of a batch's `n` samples over the float outputs (one entry
    for the whole batch when an output's first axis is not the batch)."""
    pairs = [(np.asarray(r, np.float64), np.asarray(y, np.float64)) for r, y in zip(refs, got)
             if np.issubdtype(np.asarray(r).dtype, np.floating)]
    if all(r.ndim and r.shape[0] == n for r, _ in pairs):
        return sum((np.square(r - y).reshape(n, -1).sum(1) for r, y in pairs), np.zeros(n))
    return np.array([sum(float(np.square(r - y).sum()) for r, y in pairs)])


def _accept(best: np.ndarray, err: np.ndarray, z: float = _MIN_T) -> bool:
    """Whether a candidate's per-sample squared output errors `err` improve on the
    current ones, `best`, beyond noise: the total falls by _MIN_GAIN at least, and the
    mean per-sample fall is `z` standard errors above zero (a one-sided paired t-test;
    with a single sample, the first test alone)."""
    if not err.sum() < best.sum() * (1 - _MIN_GAIN):
        return False
    if len(best) < 2:
        return True
    return bool(_t(best, err) >= z)


def _t(best: np.ndarray, err: np.ndarray) -> float:
    """The paired t statistic of the per-sample cuts best - err (inf when they are all equal and positive)."""
    cut = best - err
    if len(cut) < 2:
        return float("nan")
    spread = cut.std(ddof=1)
    if spread == 0:
        return float("inf") if cut.mean() > 0 else 0.0
    return float(cut.mean() / (spread / np.sqrt(len(cut))))


def qdq_session(proto: onnx.ModelProto):
    """An onnxruntime session of `proto` as a user runs it (graph optimisations on, so
    the fused QDQ kernels are the ones measured), two threads."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class _Bias:
    """An int32 bias quantized at s_x * s_w for an input x whose scale s_x the search
    may change: its float values and the weight scale s_w, to requantize it at a new
    s_x. Without this the bias keeps the old s_x; onnxruntime's fused QLinearConv and
    lower-integer add the int32 bias to the accumulator as is, so every new range of a
    Conv's input was judged with a bias off by s_x_old / s_x_new (on the MobileNet a
    6% smaller range looked 4x worse)."""

    def __init__(self, q_bias, bias_scale, w_scale: np.ndarray):
        self.slots = (q_bias, bias_scale)
        self.values = q_bias.const_value.astype(np.float64) * bias_scale.const_value.astype(np.float64)
        self.w_scale = w_scale

    def at(self, s_x: float) -> Tuple[np.ndarray, np.ndarray]:
        """(int32 bias, its scale) for input scale s_x, as quantize computes them."""
        return quantize_bias(self.values, s_x, self.w_scale)


def _dependent_biases(quant) -> List[_Bias]:
    """The int32 biases of the Conv/Gemm nodes that read `quant`'s tensor through its
    DequantizeLinear, each with a weight and bias scale of its own (constants)."""
    out = []
    for dq in quant.output.users:
        if dq.op_type != "DequantizeLinear":
            continue
        for node, index in dq.output.uses:
            if node.op_type not in ("Conv", "Gemm") or index != 0 or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            bdq, wdq = node.inputs[2].producer, node.inputs[1].producer
            if bdq is None or wdq is None or bdq.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
                continue
            qb, sb, ws = bdq.inputs[0], bdq.inputs[1], wdq.inputs[1]
            if not (qb.is_initializer and sb.is_initializer and ws.is_initializer) or len(qb.uses) != 1 \
                    or len(sb.uses) != 1 or qb.const_value.dtype != np.int32:
                continue
            out.append(_Bias(qb, sb, ws.const_value.astype(np.float32)))
    return out


def _write(g, quant, scale: float, zp: int) -> None:
    """Set the scale and zero point that `quant` and its DequantizeLinear share."""
    quant.inputs[1].const_value = np.float32(scale)
    quant.inputs[2].const_value = np.int8(zp)
    t = quant.output.type
    quant.output.type = TensorType(t.dtype, t.shape, QuantParams(np.float32(scale), np.int64(zp)))
