"""Empirical bias correction: remove the mean output shift that rounding a layer's
weights causes (Nagel et al., "Data-Free Quantization", 2019, section 4.2, measured on
calibration data rather than derived from BatchNorm statistics).

Algebra. A Conv/Gemm computes y = W * x + b; quantized it computes
y~ = W~ * x~ + b, with W~ the dequantized weights and x~ its (quantized) input. The
weight error dW = W - W~ shifts each output channel's mean by

    E[y - y~ | x~] = E[dW * x~] = dW * E[x~]     (the layer is linear in x~)

which is no rounding noise that later sums average out but an offset each sample
carries alike; at 4 bits it is the largest error of many layers. Adding
c = E[dW * x~] (per output channel, the mean over samples and positions) to the bias
removes it: E[y~ + c] = E[W * x~ + b]. c is measured by onnxruntime runs of the QDQ
model over calibration samples, a side branch per layer computing
ReduceMean(Conv(x~, dW)) with the layer's own attributes (pads, strides, groups), so
zero padding is counted exactly as the layer sees it. Only the weights' own error is
corrected, not the shift the input carries from earlier layers, so corrections of
successive layers do not add up; but a corrected layer moves the mean of the inputs
after it, so c is measured twice, the second time with the first corrections in place.
The corrected bias is stored as quantize stores every bias, int32 at scale s_x * s_w
(a layer without a bias gets one). A Gemm's bias is C scaled by beta: c / beta is added
to C. Left alone: MatMul (no bias input), layers whose bias is not a per-channel
constant, and layers whose input is not quantized.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.data import load_samples
from qcompile.ir import FLOAT, Model, Node, TensorType
from qcompile.onnx_io import to_proto

from .range_search import qdq_session
from .weights import quantize_bias

__all__ = ["correct_biases"]

log = logging.getLogger(__name__)


def correct_biases(model: Model, layers: List[Tuple[Node, np.ndarray, Optional[np.ndarray]]],
                   source: Any, samples: int, rounds: int = 2) -> int:
    """Set each layer's int32 bias to its float bias b plus the weight-error mean
    c = E[(W - W~) * x~], in place (b + c rounded once, not the rounded b plus c).
    `layers`: (Conv/Gemm node of the QDQ model, weight error dW = W - W~, float bias b
    or None); `source`: the calibration samples. Correcting a layer moves the mean of the
    inputs x~ after it, so c is measured again with the corrections in place, `rounds`
    times in all (each round leaves the error of the one before times |dW| / |W|).
    Returns how many layers were corrected."""
    todo = [(node, dw.astype(np.float32)) for node, dw, b in layers if _correctable(node, b)]
    biases = {id(node): b for node, _, b in layers}
    if not todo or source is None or samples <= 0:
        return 0
    for _ in range(rounds):
        shifts = _measure(model, todo, source, samples)
        if shifts is None:
            return 0
        for (node, _), shift in zip(todo, shifts):
            b = biases[id(node)]
            _set_bias(model, node, shift if b is None else np.asarray(b, np.float64).reshape(-1) + shift)
    log.info("quantize: bias correction of %d layers on %d calibration samples", len(todo), samples)
    return len(todo)


def _measure(model: Model, todo: List[Tuple[Node, np.ndarray]], source: Any, samples: int):
    """c = E[dW * x~] of each layer (divided by a Gemm's beta), from one onnxruntime run
    of the QDQ model with a side branch per layer; None without samples."""
    proto = to_proto(model)
    produced = {o: n for n in proto.graph.node for o in n.output}
    outputs = [_side_branch(proto, produced[node.outputs[0].name], k, dw) for k, (node, dw) in enumerate(todo)]
    sess = qdq_session(proto)
    sums: List[Optional[np.ndarray]] = [None] * len(outputs)
    seen = 0
    for batch in load_samples(source, model).batches(16, samples):
        got = sess.run(outputs, dict(batch))
        sums = [g.astype(np.float64) * batch.samples if s is None else s + g * batch.samples
                for s, g in zip(sums, got)]
        seen += batch.samples
    if not seen:
        return None
    return [total / seen / ((float(node.attr("beta", 1.0)) or 1.0) if node.op_type == "Gemm" else 1.0)
            for (node, _), total in zip(todo, sums)]


def _side_branch(proto: onnx.ModelProto, layer: onnx.NodeProto, k: int, dw: np.ndarray) -> str:
    """Append ReduceMean(op(x~, dW)) beside `layer` (same op, same attributes, no bias)
    to `proto`; returns the name of its per-channel output."""
    g = proto.graph
    prefix = f"__bias_correction_{k}"
    g.initializer.append(numpy_helper.from_array(dw, prefix + "_dW"))
    conv = helper.make_node(layer.op_type, [layer.input[0], prefix + "_dW"], [prefix + "_y"], name=prefix + "_op")
    conv.attribute.extend(a for a in layer.attribute if a.name != "beta")
    axes = [0] if layer.op_type == "Gemm" else [0] + list(range(2, dw.ndim))
    out = prefix + "_mean"
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 18:
        g.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), prefix + "_axes"))
        mean = helper.make_node("ReduceMean", [prefix + "_y", prefix + "_axes"], [out], keepdims=0)
    else:
        mean = helper.make_node("ReduceMean", [prefix + "_y"], [out], axes=axes, keepdims=0)
    g.node.extend([conv, mean])
    g.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    return out


def _input_scale(node: Node) -> Optional[float]:
    """s_x of the layer's quantized input (None when it reads a float tensor)."""
    dq = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or not dq.inputs[1].is_initializer:
        return None
    s = np.asarray(dq.inputs[1].const_value)
    return float(s) if s.size == 1 else None


def _weight_scale(node: Node) -> np.ndarray:
    return np.asarray(node.inputs[1].producer.inputs[1].const_value, np.float32)


def _correctable(node: Node, b: Optional[np.ndarray]) -> bool:
    """Whether the layer reads a quantized input and has no bias, or a float bias b that
    quantize stored as a per-channel int32 constant."""
    if _input_scale(node) is None:
        return False
    slot = _bias_slot(node)
    return slot is None or (b is not None and slot != "bad")


def _bias_slot(node: Node):
    """The bias DequantizeLinear of `node`, None when it has no bias, "bad" when its
    bias is not a per-channel int32 constant this pass can rewrite."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    dq = node.inputs[2].producer
    if dq is None or dq.op_type != "DequantizeLinear" or not all(v.is_initializer for v in dq.inputs[:2]):
        return "bad"
    qb = dq.inputs[0]
    if qb.const_value.dtype != np.int32 or qb.const_value.ndim != 1 or len(qb.uses) != 1:
        return "bad"
    return dq


def _set_bias(model: Model, node: Node, values: np.ndarray) -> None:
    """The layer's bias := `values` (float), quantized to int32 at s_x * s_w; a layer
    without a bias gets one."""
    g = model.graph
    s_x, s_w = _input_scale(node), _weight_scale(node)
    q, scale = quantize_bias(values, s_x, s_w)
    dq = _bias_slot(node)
    if dq is None:
        name = (node.name or node.outputs[0].name) + "_bias"
        qb = g.make_constant(q, g.unique_name(name + "_quantized"))
        sb = g.make_constant(scale, g.unique_name(name + "_scale"))
        zb = g.make_constant(np.zeros_like(q) if scale.ndim else np.int32(0), g.unique_name(name + "_zero_point"))
        dq = g.insert_before(node, Node("DequantizeLinear", [qb, sb, zb], {"axis": 0} if scale.ndim else {},
                                        name=g.unique_name(name + "_DQ")))
        dq.output.type = TensorType(FLOAT, (len(values),))
        while len(node.inputs) < 3:
            node.append_input(None)
        node.set_input(2, dq.output)
        return
    dq.inputs[0].const_value = q
    dq.inputs[1].const_value = scale

