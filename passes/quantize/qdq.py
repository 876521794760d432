"""`quantize`: insert QuantizeLinear/DequantizeLinear (QDQ), the ONNX convention that
onnxruntime runs and that `lower-integer` will turn into integer ops.

What it rewrites, for every Conv, Gemm and MatMul whose weight is a constant:
  1. The weight W becomes DequantizeLinear(W_q, scale, zero_point) with W_q integers
     chosen by passes/quantize/weights.py (per output channel by default; bit-widths
     2-8, ternary, binary). Widths under 8 bits are stored in an int8 container with a
     clipped range; the true width is recorded in the model's metadata
     (`qcompile.weight_bits`: {tensor: type}) and in the value's type.
  2. A constant bias b becomes DequantizeLinear(b_q, s_x * s_w, 0) with b_q int32, the
     scale of the accumulator, as integer hardware adds it.
  3. The activation input and the output get a Q->DQ pair on the tensor (one pair per
     tensor, shared by all its readers), with a per-tensor scale and zero point from the
     calibration range: asymmetric int8, 0.0 exactly representable. When the output's
     only reader is a Relu (or Clip), the pair goes after that activation instead, as a
     fused activation would be quantized.
  4. Inputs and outputs of the data-movement and elementwise ops between them (Add, Mul,
     Concat, pooling, Flatten, Reshape, Transpose, Relu) get Q->DQ pairs too, so the
     integer graph needs no float tensors between quantized ops.
Left alone: nodes matched by `exclude` (a regular expression over node names and op
types), ops whose weight is not constant, tensors without a calibration range (integer
tensors, shapes), and everything inside subgraphs.
Needs `calibrate` first (a CalibrationStats in model.annotations["calibration"]) and
opset 13 (per-axis DequantizeLinear); an older model is upgraded, and the log says so.
"""
from __future__ import annotations

import json
import re
from typing import Dict, Optional, Tuple

import numpy as np

from qcompile.errors import QCompileError
from qcompile.ir import INT8, INT32, Graph, Model, Node, QuantParams, Tensor, TensorType, Value
from qcompile.onnx_io import upgrade_opset
from qcompile.passmanager import Pass, PassResult, option, register_pass

from .weights import WeightFormat, quantize_weight, weight_format

__all__ = ["Quantize"]

_WEIGHTED = {"Conv": 0, "Gemm": None, "MatMul": 1}  # op -> weight channel axis (Gemm: from transB)
_FLOW = {"Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
         "Relu"}
_FUSED = {"Relu", "Clip"}
BITS_KEY = "qcompile.weight_bits"


@register_pass("quantize")
class Quantize(Pass):
    """Insert QuantizeLinear/DequantizeLinear: weights per channel, activations per tensor."""

    weights: str = option("int8", "weight type: int8, int4, int3, int2, ternary or binary",
                          choices=("int8", "int4", "int3", "int2", "ternary", "binary"))
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    symmetric: bool = option(True, "symmetric weights (zero point 0)")
    weight_search: str = option("mse", "weight range: mse-optimal clipping or plain min/max",
                                choices=("mse", "minmax"))
    exclude: str = option("", "regular expression over node names and op types to keep in float")

    def requires(self, model: Model) -> None:
        if "calibration" not in model.annotations:
            raise QCompileError(
                "quantize needs calibration statistics: run 'calibrate' before it "
                "(e.g. --passes fold,calibrate,quantize --calib data.npz)"
            )

    def run(self, model: Model) -> PassResult:
        if model.opset < 13:
            model = upgrade_opset(model, 13)
        try:
            exclude = re.compile(self.exclude) if self.exclude else None
        except re.error as e:
            raise QCompileError(f"quantize option exclude={self.exclude!r} is not a valid regular expression: {e}")
        try:
            fmt = weight_format(self.weights, symmetric=self.symmetric, per_channel=self.per_channel,
                                search=self.weight_search)
        except ValueError as e:
            raise QCompileError(f"quantize: {e}") from None
        q = _Inserter(model.graph, model.annotations["calibration"])
        bits: Dict[str, str] = {}
        for node in model.graph.nodes:
            if exclude is not None and (exclude.search(node.name) or exclude.search(node.op_type)):
                self.stats["nodes kept in float"] += 1
                continue
            if node.op_type in _WEIGHTED and _weight(node) is not None:
                name = q.weighted(node, fmt)
                if name is not None:
                    bits[name] = str(fmt.dtype)
                    self.stats[f"{node.op_type} quantized"] += 1
            elif node.op_type in _FLOW:
                for v in node.inputs:
                    if not _fused_away(v):
                        q.activation(v)
                q.activation(_fused_output(node))
        if bits:
            model.metadata_props[BITS_KEY] = json.dumps(bits, sort_keys=True)
        self.stats["activation tensors quantized"] += len(q.done) // 2
        model.graph.sort()
        return PassResult(model, modified=bool(q.done or bits))


def _weight(node: Node) -> Optional[Value]:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return w if w is not None and w.is_initializer else None


def _fused_output(node: Node) -> Value:
    """The tensor to quantize after `node`: its output, or the output of a Relu/Clip that
    is its only reader."""
    out = node.outputs[0]
    users = out.users
    if len(users) == 1 and users[0].op_type in _FUSED and len(out.uses) == 1:
        return users[0].outputs[0]
    return out


def _fused_away(v: Optional[Value]) -> bool:
    """True for a weighted op's output whose quantization moves past its activation."""
    p = v.producer if v is not None else None
    return p is not None and p.op_type in _WEIGHTED and _fused_output(p) is not v


class _Inserter:
    """Inserts Q->DQ pairs and quantized weights into one graph."""

    def __init__(self, graph: Graph, stats):
        self.graph = graph
        self.stats = stats
        self.done: Dict[int, Tuple[float, Value]] = {}  # id(float value) -> (scale, DQ output)

    def activation(self, v: Optional[Value]) -> Optional[float]:
        """Put a Q->DQ pair on `v`; returns its scale (None when it has no range)."""
        if v is None or v.is_initializer:
            return None
        if id(v) in self.done:
            return self.done[id(v)][0]
        if not isinstance(v.type, TensorType) or not v.type.dtype.is_float:
            return None
        try:
            rng = self.stats.range(v.name)
        except KeyError:
            return None
        if rng is None:
            return None
        scale, zp = _activation_params(*rng)
        g = self.graph
        s_v = g.make_constant(np.float32(scale), v.name + "_scale")
        z_v = g.make_constant(np.int8(zp), v.name + "_zero_point")
        readers = v.uses
        quant = Node("QuantizeLinear", [v, s_v, z_v], name=v.name + "_Q")
        deq = Node("DequantizeLinear", [None, s_v, z_v], name=v.name + "_DQ")
        if v.producer is not None and v.producer.graph is g:
            g.insert_after(v.producer, quant)
        else:
            g.insert_before(g.nodes[0], quant)
        g.insert_after(quant, deq)
        deq.set_input(0, quant.output)
        shape = v.type.shape
        quant.output.type = TensorType(INT8, shape, QuantParams(np.float32(scale), np.int64(zp)))
        deq.output.type = TensorType(v.type.dtype, shape)
        for node, i in readers:
            node.set_input(i, deq.output)
        if any(o is v for o in g.outputs):  # keep the model's output names
            name = v.name
            v.name = g.unique_name(name + "_float")
            deq.output.name = name
            g.replace_output(v, deq.output)
        self.done[id(v)] = self.done[id(deq.output)] = (scale, deq.output)
        return scale

    def weighted(self, node: Node, fmt: WeightFormat) -> Optional[str]:
        """Quantize a Conv/Gemm/MatMul: activation in, weight, bias, output."""
        x, w = node.inputs[0], _weight(node)
        s_x = self.activation(x)
        if s_x is None:
            return None
        axis = _WEIGHTED[node.op_type]
        if node.op_type == "Gemm":
            axis = 0 if node.attr("transB", 0) else 1
        array = w.const_value.astype(np.float32)
        if array.ndim < 2 and node.op_type != "Conv":
            return None
        fmt_here = WeightFormat(fmt.dtype, fmt.symmetric, axis if fmt.axis is not None else None, fmt.search)
        q, params = quantize_weight(array, fmt_here)
        g = self.graph
        q_v = g.make_constant(np.asarray(q, dtype=np.int32).astype(np.int8 if fmt.dtype.signed else np.uint8),
                              w.name + "_quantized")
        q_v.type = TensorType(q_v.type.dtype, q_v.type.shape, params)
        s_w = g.make_constant(params.scale, w.name + "_scale")
        z_w = g.make_constant(params.zero_point.astype(q_v.const.numpy().dtype), w.name + "_zero_point")
        attrs = {"axis": int(params.axis)} if params.axis is not None else {}
        dq_w = g.insert_before(node, Node("DequantizeLinear", [q_v, s_w, z_w], attrs, name=w.name + "_DQ"))
        dq_w.output.type = TensorType(w.type.dtype, w.type.shape)
        node.set_input(1, dq_w.output)
        replaced = [w]
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].is_initializer:
            b = node.inputs[2]
            bias_scale = (np.float32(s_x) * params.scale).astype(np.float32)
            b_q = np.clip(np.rint(b.const_value.astype(np.float64) / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
            qb = g.make_constant(b_q, b.name + "_quantized")
            sb = g.make_constant(bias_scale, b.name + "_scale")
            zb = g.make_constant(np.zeros_like(b_q) if bias_scale.ndim else np.int32(0), b.name + "_zero_point")
            battrs = {"axis": 0} if bias_scale.ndim else {}
            dq_b = g.insert_before(node, Node("DequantizeLinear", [qb, sb, zb], battrs, name=b.name + "_DQ"))
            dq_b.output.type = b.type
            node.set_input(2, dq_b.output)
            replaced.append(b)
        for old in replaced:
            if not old.uses and old.is_initializer and not old.is_graph_input:
                g.remove_initializer(old.name)
        self.activation(_fused_output(node))
        return q_v.name


def _activation_params(lo: float, hi: float) -> Tuple[float, int]:
    """Asymmetric int8 scale and zero point for [lo, hi] widened to include 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, 0
    zp = int(np.clip(np.rint(-128 - lo / scale), -128, 127))
    return float(np.float32(scale)), zp
