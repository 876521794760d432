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
  3. For each int8 tensor in turn, every candidate is tried with the other tensors at
     their current choice; a candidate replaces the current range only when it lowers
     the squared output error against the float model by at least 1% on both halves of
     the `samples` calibration samples (even and odd batches): a range that helps on
     one half only, or barely, is fitted to those samples and loses on new data.
The sweep stops after `seconds` (the tensors left keep calibrate's range), so a large
model costs bounded time. Left alone: int4 tensors (their range is the MSE range at 4 bits, and a dropped Clip or
a MaxPool's output scale depends on it) and int16 tensors (rounding noise is already
negligible); tensors whose Q/DQ parameters are shared or not per-tensor constants.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.data import load_samples
from qcompile.ir import INT8, Model, QuantParams, TensorType
from qcompile.onnx_io import to_proto

from .activations import activation_params

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


# a new range must cut the output error by this fraction on both halves of the samples:
# smaller gains are sampling noise that does not carry to other data (on the PTQ
# benchmark's transformer, 1e-6 accepted ranges that cost 0.3 dB on the evaluation split)
_MIN_GAIN = 0.01


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
    proto = to_proto(model)
    inits = {i.name: i for i in proto.graph.initializer}
    fsess = _session(model.annotations["float_model"])
    outputs = [o.name for o in fsess.get_outputs()]
    batches = [dict(b) for b in load_samples(source, model).batches(16, samples)]
    refs = [fsess.run(outputs, b) for b in batches]

    def error(chosen: Dict[str, Tuple[float, int]]) -> np.ndarray:
        """Squared output error on the even and on the odd batches, as onnxruntime runs
        the QDQ model (its fused kernels included)."""
        for name, (s, z) in chosen.items():
            inits[slots[name][0]].CopyFrom(numpy_helper.from_array(np.asarray(s, np.float32), slots[name][0]))
            inits[slots[name][1]].CopyFrom(numpy_helper.from_array(np.asarray(z, np.int8), slots[name][1]))
        sess = _session(proto)
        halves = np.zeros(2)
        for i, (b, ref) in enumerate(zip(batches, refs)):
            got = sess.run(outputs, b)
            halves[i % 2] += sum(float(np.square(np.asarray(r, np.float64) - y).sum()) for r, y in zip(ref, got)
                                 if np.issubdtype(np.asarray(r).dtype, np.floating))
        return halves

    start = time.perf_counter()
    best_err = error(params)
    changed: Dict[str, str] = {}
    for done, name in enumerate(params):
        if time.perf_counter() - start > seconds:
            log.info("quantize: range search stopped after %d of %d tensors (%g s budget)", done, len(params), seconds)
            break
        current = params[name]
        for method, extra in _CANDIDATES:
            rng = stats.tensors[name].range(method, **{"percentile": 99.99, "bits": 8, **extra})
            if rng is None:
                continue
            cand = activation_params(*rng, INT8)
            if cand == params[name]:
                continue
            err = error({**params, name: cand})
            if np.all(err < best_err * (1 - _MIN_GAIN)) or \
                    len(batches) == 1 and err[0] < best_err[0] * (1 - _MIN_GAIN):
                best_err, params[name] = err, cand
                changed[name] = method + (f" {extra['percentile']}" if "percentile" in extra else "")
        if params[name] != current:
            _write(g, quants[name], *params[name])
    return changed


def _session(proto: onnx.ModelProto):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _write(g, quant, scale: float, zp: int) -> None:
    """Set the scale and zero point that `quant` and its DequantizeLinear share."""
    quant.inputs[1].const_value = np.float32(scale)
    quant.inputs[2].const_value = np.int8(zp)
    t = quant.output.type
    quant.output.type = TensorType(t.dtype, t.shape, QuantParams(np.float32(scale), np.int64(zp)))
