"""`lower-integer`: rewrite a QDQ graph into integer ops with explicit requantization.

The ops, their attributes and the rounding rule are defined once in qcompile.quant_math
(domain `qcompile.int`); the integer reference evaluator (qcompile.backend.reference)
computes them. Every integer tensor is typed with its QuantParams.

What it rewrites (DQ = DequantizeLinear with constant per-tensor scale/zero point of an
activation, W/B = DequantizeLinear of a constant int weight/int32 bias, Q = a per-tensor
QuantizeLinear that is the only reader of the op's output, or of a Relu/Clip that is):
  1. DQ -> Conv(W, B?) [-> Relu|Clip] -> Q         =>  QConv (per-channel multiplier/shift,
     the Relu/Clip as saturation bounds).
  2. DQ -> Gemm(W, B?) [-> Relu|Clip] -> Q          =>  QGemm (alpha = beta = 1, transA = 0).
  3. DQ -> MatMul(W) [-> Relu|Clip] -> Q            =>  QMatMul (W is [K, N]).
  4. DQ, DQ -> Add|Mul [-> Relu|Clip] -> Q          =>  QAdd | QMul.
  5. DQ -> AveragePool|GlobalAveragePool [-> Relu|Clip] -> Q  =>  QAveragePool; where the
     divisor varies with the position (padding excluded by count_include_pad=0, or
     windows that ceil_mode=1 runs past the input), one multiplier and shift per output
     position r = s_x / (s_y * count), so the division stays exact integer arithmetic.
  6. DQ -> MaxPool|Flatten|Reshape|Transpose|Squeeze|Unsqueeze|Slice [-> Relu|Clip] -> Q  =>  the
     same op on the integer tensor, then a Requantize when the scale, zero point or
     bounds change.
  7. DQ.. -> Concat [-> Relu|Clip] -> Q            =>  a Requantize per input whose scale
     differs from the output's (every input when a Relu/Clip narrows the bounds: it
     commutes with Concat), then Concat.
  8. DQ -> Relu|Clip -> Q                           =>  Requantize with narrowed bounds.
  8b. DQ -> ReduceMean|ReduceSum|ReduceMax [-> Relu|Clip] -> Q  =>  [Transpose, the reduced
     axes last], Reshape to [1 or the kept first axis, outer, 1, inner], a global QAveragePool (r = s_x / (s_y *
     count), count = inner for the mean, 1 for the sum) or a [1, inner] MaxPool
     [+ Requantize], Reshape to the output's shape.
  9. What is left of the QDQ convention becomes the interface: each remaining
     QuantizeLinear becomes `Quantize` (float -> int, graph inputs and host float ops),
     each remaining DequantizeLinear `Dequantize` (graph outputs, host float ops).
Left alone (they stay float ops, run on the host between Dequantize and Quantize):
anything else (Softmax, LayerNorm, LSTM, ...), ops whose output is also read
by something other than its Q (or is a graph output), per-channel activation scales,
Gemm with alpha/beta != 1 or transA, AveragePool with auto_pad or dilations, and
subgraphs. A rewrite whose rescale factor is outside (0, 2^30) is skipped and counted.
Checked: a QConv/QGemm/QMatMul whose int32 accumulator can overflow (max|x - x_zp| *
sum_k |w_k - w_zp| + |bias| > 2^31 - 1 for some channel) is still lowered, with a
warning naming the node (the reference evaluator accumulates in int64).
This pass computes no tensors: it never imports the backend.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from qcompile.ir import Graph, Model, Node, QuantParams, TensorType, Value
from qcompile.passmanager import Pass, PassResult, register_pass
from qcompile.quant_math import (
    DEQUANTIZE, DOMAIN, QADD, QAVERAGEPOOL, QCONV, QGEMM, QMATMUL, QMUL, QUANTIZE, REQUANTIZE,
    quantize_multiplier, quantize_multiplier_pair, requantize,
)

from .narrow_types import widen_narrow_types

__all__ = ["LowerInteger"]

_MOVE = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"}
_FUSE = {"Relu", "Clip"}
_INT32_MAX = 2 ** 31 - 1


class _Act:
    """An activation DQ: the integer tensor it reads and its per-tensor parameters."""

    def __init__(self, q: Value, scale: float, zp: int):
        self.q, self.scale, self.zp = q, float(scale), int(zp)


class _Out:
    """Where an op's result is quantized: the Q node, its parameters, saturation bounds
    and the nodes (op's Relu/Clip, Q) that the rewrite replaces."""

    def __init__(self, q: Node, scale: float, zp: int, dtype, lo: int, hi: int, chain: List[Node]):
        self.q, self.scale, self.zp, self.dtype, self.lo, self.hi, self.chain = q, scale, zp, dtype, lo, hi, chain


@register_pass("lower-integer")
class LowerInteger(Pass):
    """Rewrite DQ->op->Q patterns into integer ops (domain qcompile.int) with
    int32 multiplier/shift requantization."""

    def run(self, model: Model) -> PassResult:
        g = model.graph
        lowered = 0
        for node in g.nodes:
            if node.graph is not g:
                continue
            rule = _RULES.get(node.op_type)
            if rule is None or node.domain not in ("", "ai.onnx"):
                continue
            try:
                new = rule(self, g, node)
            except _Skip as why:
                self.stats[f"{node.op_type} left in float: {why}"] += 1
                continue
            if new is not None:
                lowered += 1
                self.stats[f"{node.op_type} lowered"] += 1
        converted = _convert_interface(g)
        self.stats["Quantize/Dequantize at the float interface"] += converted
        _sweep(g)
        widened = widen_narrow_types(model)
        if widened:
            self.stats["narrow tensors moved into int8/uint8 containers"] += widened
        if lowered or converted:
            model.opset_imports.setdefault(DOMAIN, 1)
        g.sort()
        return PassResult(model, modified=bool(lowered or converted))

    # -- rules ----------------------------------------------------------------------
    def _weighted(self, g: Graph, node: Node) -> Optional[Node]:
        op = node.op_type
        x = _act(node.inputs[0])
        w = _const_dq(node.inputs[1] if len(node.inputs) > 1 else None)
        if op == "MatMul" and x is not None and w is None:
            b = _act(node.inputs[1])
            if b is not None:
                return self._activation_matmul(g, node, x, b)
        if x is None or w is None:
            raise _Skip("inputs are not dequantized integers")
        out = _out(g, node)
        w_q, w_scale, w_zp, w_axis = w
        attrs: Dict[str, object] = {}
        if op == "Conv":
            channel_axis, channels = 0, w_q.const_value.shape[0]
            for key in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad"):
                if key in node.attributes:
                    attrs[key] = node.attributes[key]
            if node.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                raise _Skip("auto_pad")
        elif op == "Gemm":
            if node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0 or node.attr("transA", 0):
                raise _Skip("alpha/beta/transA")
            trans_b = int(node.attr("transB", 0))
            channel_axis = 0 if trans_b else 1
            channels = w_q.const_value.shape[channel_axis]
            attrs["transB"] = trans_b
        else:  # MatMul
            if w_q.const_value.ndim != 2:
                raise _Skip("weight is not 2-D")
            channel_axis, channels = 1, w_q.const_value.shape[1]
        if w_axis is not None and w_axis % w_q.const_value.ndim != channel_axis:
            raise _Skip("weight scale is not per output channel")
        w_scale = np.broadcast_to(np.asarray(w_scale, np.float64).ravel(), (channels,)) if np.size(w_scale) in (1, channels) else None
        if w_scale is None:
            raise _Skip("weight scale shape")
        acc_scale = np.float64(x.scale) * w_scale
        real = acc_scale / out.scale
        m, s = _multiplier(real)
        inputs: List[Optional[Value]] = [x.q, w_q]
        if op != "MatMul":
            inputs.append(_bias(g, node, acc_scale, channels))
        inputs += [g.make_constant(m.astype(np.int32), node.name + "_multiplier"),
                   g.make_constant(s.astype(np.int8), node.name + "_shift")]
        w_zp = np.asarray(w_zp)
        if np.any(w_zp != 0):
            inputs.append(g.make_constant(np.broadcast_to(w_zp.astype(np.int32).ravel(), (channels,)).copy(),
                                          node.name + "_w_zero_point"))
        attrs.update(x_zero_point=x.zp, out_zero_point=out.zp, out_min=out.lo, out_max=out.hi)
        name = {"Conv": QCONV, "Gemm": QGEMM, "MatMul": QMATMUL}[op]
        w = w_q.const_value.astype(np.int64) - _channel_shape(w_zp, w_q.const_value.ndim, channel_axis)
        per_channel = np.abs(np.moveaxis(w, channel_axis, 0)).reshape(channels, -1).sum(axis=1)
        bias = inputs[2].const_value if op != "MatMul" and inputs[2] is not None else None
        self._check_accumulator(node, _largest(x), per_channel, bias)
        return _replace(g, node, out, Node(name, inputs, attrs, domain=DOMAIN, name=node.name))

    def _activation_matmul(self, g: Graph, node: Node, a: "_Act", b: "_Act") -> Node:
        """MatMul of two quantized activations (attention's Q.K^T and P.V): QMatMul with
        a per-tensor multiplier and b's zero point."""
        out = _out(g, node)
        m, s = _multiplier(np.array([np.float64(a.scale) * b.scale / out.scale]))
        inputs: List[Optional[Value]] = [a.q, b.q, g.make_constant(m.astype(np.int32), node.name + "_multiplier"),
                                         g.make_constant(s.astype(np.int8), node.name + "_shift")]
        if b.zp != 0:
            inputs.append(g.make_constant(np.array([b.zp], np.int32), node.name + "_w_zero_point"))
        attrs = dict(x_zero_point=a.zp, out_zero_point=out.zp, out_min=out.lo, out_max=out.hi)
        shape = b.q.type.shape
        k = shape[-2] if shape is not None and len(shape) >= 2 and isinstance(shape[-2], int) else None
        if k is not None:
            self._check_accumulator(node, _largest(a), np.array([k * _largest(b)]), None)
        return _replace(g, node, out, Node(QMATMUL, inputs, attrs, domain=DOMAIN, name=node.name))

    def _check_accumulator(self, node: Node, x_max: int, w_sums: np.ndarray, bias) -> None:
        """Warn when the int32 accumulator of `node` can overflow: for some output channel
        max|x - x_zp| * sum_k |w_k - w_zp| + |bias| > 2^31 - 1 (K * max|x - x_zp| *
        max|w - w_zp| bounds the sum). The graph is still lowered: the integer reference
        accumulates in int64, hardware with int32 accumulators would wrap."""
        bound = np.asarray(w_sums, np.float64) * float(x_max)
        if bias is not None:
            bound = bound + np.abs(np.asarray(bias, np.float64)).reshape(-1)
        worst = float(bound.max()) if bound.size else 0.0
        if worst > _INT32_MAX:
            self.stats["int32 accumulator may overflow"] += 1
            warnings.warn(f"lower-integer: node {node.label}: its int32 accumulator can reach {worst:.4g} > 2^31-1 "
                          f"(max|x - x_zp| = {x_max}, channel {int(bound.argmax())}): it may overflow on int32 "
                          f"hardware; quantize this layer with fewer bits or split its reduction", stacklevel=2)

    def _binary(self, g: Graph, node: Node) -> Optional[Node]:
        a, b = (_act(v) for v in node.inputs[:2])
        if a is None or b is None or len(node.inputs) != 2:
            raise _Skip("inputs are not dequantized integers")
        out = _out(g, node)
        attrs: Dict[str, object] = dict(a_zero_point=a.zp, b_zero_point=b.zp, out_zero_point=out.zp,
                                        out_min=out.lo, out_max=out.hi)
        if node.op_type == "Add":
            ra, rb = a.scale / out.scale, b.scale / out.scale
            _check_real([ra, rb])
            ma, mb, s = quantize_multiplier_pair(ra, rb)
            attrs.update(a_multiplier=ma, b_multiplier=mb, shift=s)
            op = QADD
        else:
            m, s = _multiplier(a.scale * b.scale / out.scale)
            attrs.update(multiplier=int(m), shift=int(s))
            op = QMUL
        return _replace(g, node, out, Node(op, [a.q, b.q], attrs, domain=DOMAIN, name=node.name))

    def _avgpool(self, g: Graph, node: Node) -> Optional[Node]:
        x = _act(node.inputs[0])
        if x is None:
            raise _Skip("input is not a dequantized integer")
        shape = x.q.type.shape if isinstance(x.q.type, TensorType) else None
        attrs: Dict[str, object] = {}
        inputs: List[Optional[Value]] = [x.q]
        if node.op_type == "GlobalAveragePool":
            if shape is None or not all(isinstance(d, int) for d in shape[2:]):
                raise _Skip("spatial shape unknown")
            window = int(np.prod(shape[2:]))
            attrs["global"] = 1
        else:
            if node.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or any(
                    d != 1 for d in (node.attr("dilations") or [])):
                raise _Skip("auto_pad/dilations")
            kernel = list(node.attr("kernel_shape"))
            strides = list(node.attr("strides", [1] * len(kernel)))
            pads = list(node.attr("pads", []) or [0] * (2 * len(kernel)))
            attrs.update(kernel_shape=kernel, strides=strides, pads=pads, **{"global": 0})
            window = int(np.prod(kernel))
            counts = np.array(window)
            if any(pads) or node.attr("ceil_mode", 0):
                counts = _window_counts(shape, node.outputs[0].type, kernel, strides, pads,
                                        bool(node.attr("count_include_pad", 0)))
            if counts is None:
                raise _Skip("spatial shapes unknown")
            if np.any(counts <= 0):
                raise _Skip("a window lies wholly in the padding")
        out = _out(g, node)
        if node.op_type == "AveragePool" and np.any(counts != window):
            # the divisor varies with the position (padding excluded, ceil_mode): one
            # multiplier and shift per output position
            m, s = _multiplier(x.scale / (out.scale * counts.astype(np.float64)))
            inputs += [g.make_constant(m.astype(np.int32), node.name + "_multiplier"),
                       g.make_constant(s.astype(np.int8), node.name + "_shift")]
        else:
            m, s = _multiplier(x.scale / (out.scale * window))
            attrs.update(multiplier=int(m), shift=int(s))
        attrs.update(x_zero_point=x.zp, out_zero_point=out.zp, out_min=out.lo, out_max=out.hi)
        return _replace(g, node, out, Node(QAVERAGEPOOL, inputs, attrs, domain=DOMAIN, name=node.name))

    def _reduce(self, g: Graph, node: Node) -> Optional[Node]:
        """ReduceMean/ReduceSum/ReduceMax over any axes: the reduced axes moved last
        (Transpose) and the tensor viewed as [1 or the first axis when it is kept,
        outer, 1, inner] (Reshape), then one
        global average pool (sum times s_x / (s_y * count), count = inner for the mean
        and 1 for the sum) or a [1, inner] MaxPool (then a Requantize if the parameters
        change), reshaped to the output's shape."""
        x = _act(node.inputs[0])
        if x is None:
            raise _Skip("input is not a dequantized integer")
        shape = x.q.type.shape
        if shape is None or not shape or not all(isinstance(d, int) for d in shape[1:]):
            raise _Skip("input shape unknown")
        rank = len(shape)
        axes = node.attr("axes", None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _const(node.inputs[1])
            if axes is None:
                raise _Skip("axes are not a constant")
        if axes is None or len(axes) == 0:
            if node.attr("noop_with_empty_axes", 0):
                raise _Skip("empty axes with noop_with_empty_axes")
            axes = range(rank)
        axes = sorted({int(a) % rank for a in np.asarray(axes).reshape(-1)})
        kept = [a for a in range(rank) if a not in axes]
        batch = 0 in kept            # the first axis stays first: Reshape copies it (0), symbolic or not
        if not batch and not isinstance(shape[0], int):
            raise _Skip("a symbolic first axis is reduced")
        out_shape = [1 if a in axes else shape[a] for a in range(rank)] if node.attr("keepdims", 1) else \
            [shape[a] for a in kept]
        outer = int(np.prod([shape[a] for a in kept if a != 0 or not batch]))
        inner = int(np.prod([shape[a] for a in axes]))
        lead = shape[0] if batch else 1
        out = _out(g, node)
        # the rescale factor first: a _Skip after nodes were inserted would leave them behind
        if node.op_type == "ReduceMax":
            _multiplier(x.scale / out.scale)             # the Requantize after the MaxPool
        else:
            m, s = _multiplier(x.scale / (out.scale * (inner if node.op_type == "ReduceMean" else 1)))
        params = QuantParams(np.float32(x.scale), np.int64(x.zp))
        extra: List[Node] = []

        def add(n: Node, dims, params=params, dtype=x.q.type.dtype) -> Value:
            n.output.type = TensorType(dtype, tuple(dims), params)
            g.insert_before(out.q, n)
            extra.append(n)
            return n.output

        v = x.q
        if kept + axes != list(range(rank)):
            v = add(Node("Transpose", [v], {"perm": kept + axes}, name=node.name + "_transpose"),
                    [shape[a] for a in kept + axes])
        rows = g.make_constant(np.array([0 if batch else 1, outer, 1, inner], np.int64), node.name + "_rows")
        v = add(Node("Reshape", [v, rows], name=node.name + "_rows"), [lead, outer, 1, inner])
        if node.op_type == "ReduceMax":
            v = add(Node("MaxPool", [v], {"kernel_shape": [1, inner]}, name=node.name + "_max"), [lead, outer, 1, 1])
            r = _requantize(g, v, x.scale, x.zp, out, node.name)
            if r is not v.producer:
                r.output.type = TensorType(out.dtype, (lead, outer, 1, 1), QuantParams(np.float32(out.scale),
                                                                                      np.int64(out.zp)))
                g.insert_before(out.q, r)
                extra.append(r)
                v = r.output
        else:
            attrs = {"global": 1, "multiplier": int(m), "shift": int(s), "x_zero_point": x.zp,
                     "out_zero_point": out.zp, "out_min": out.lo, "out_max": out.hi}
            v = add(Node(QAVERAGEPOOL, [v], attrs, domain=DOMAIN, name=node.name), [lead, outer, 1, 1],
                    QuantParams(np.float32(out.scale), np.int64(out.zp)), out.dtype)
        final = g.make_constant(np.array([0 if batch else out_shape[0]] + out_shape[1:] if out_shape else [],
                                         np.int64), node.name + "_shape")
        return _replace(g, node, out, Node("Reshape", [v, final], name=node.name + "_reshape"), extra=extra)

    def _move(self, g: Graph, node: Node) -> Optional[Node]:
        x = _act(node.inputs[0])
        if x is None or any(_act(v) is not None for v in node.inputs[1:]):
            raise _Skip("input is not a dequantized integer")
        out = _out(g, node)
        moved = Node(node.op_type, [x.q, *node.inputs[1:]], dict(node.attributes), name=node.name)
        moved.output.type = _retype(node.output, x.q.type.dtype, x.scale, x.zp)
        g.insert_before(out.q, moved)
        return _replace(g, node, out, _requantize(g, moved.output, x.scale, x.zp, out, node.name), extra=[moved])

    def _relu(self, g: Graph, node: Node) -> Optional[Node]:
        x = _act(node.inputs[0])
        if x is None:
            raise _Skip("input is not a dequantized integer")
        out = _out(g, node, fuse=False)
        lo, hi = _bounds(g, node, out.scale, out.zp, out.lo, out.hi)
        out.lo, out.hi = lo, hi
        return _replace(g, node, out, _requantize(g, x.q, x.scale, x.zp, out, node.name, force=True))

    def _concat(self, g: Graph, node: Node) -> Optional[Node]:
        acts = [_act(v) for v in node.inputs]
        if any(a is None for a in acts):
            raise _Skip("inputs are not dequantized integers")
        out = _out(g, node)     # through a Relu/Clip: elementwise, so it bounds each input's requantization
        ins = []
        extra = []
        for i, a in enumerate(acts):
            same = np.float32(a.scale) == np.float32(out.scale) and a.zp == out.zp and a.q.type.dtype == out.dtype \
                and out.lo == out.dtype.min and out.hi == out.dtype.max
            if same:
                ins.append(a.q)
                continue
            bounded = _Out(out.q, out.scale, out.zp, out.dtype, out.lo, out.hi, [])
            r = _requantize(g, a.q, a.scale, a.zp, bounded, f"{node.name}_in{i}", force=True)
            r.output.type = _retype(a.q, out.dtype, out.scale, out.zp)
            g.insert_before(out.q, r)
            extra.append(r)
            ins.append(r.output)
        cat = Node("Concat", ins, dict(node.attributes), name=node.name)
        return _replace(g, node, out, cat, extra=extra)


_RULES = {
    "Conv": LowerInteger._weighted, "Gemm": LowerInteger._weighted, "MatMul": LowerInteger._weighted,
    "Add": LowerInteger._binary, "Mul": LowerInteger._binary,
    "AveragePool": LowerInteger._avgpool, "GlobalAveragePool": LowerInteger._avgpool,
    "Relu": LowerInteger._relu, "Clip": LowerInteger._relu, "Concat": LowerInteger._concat,
    "ReduceMean": LowerInteger._reduce, "ReduceSum": LowerInteger._reduce, "ReduceMax": LowerInteger._reduce,
    **{op: LowerInteger._move for op in _MOVE},
}


class _Skip(Exception):
    """The pattern does not match here; the message says why (counted in stats)."""


# -- matching helpers -------------------------------------------------------------
def _const(v: Optional[Value]) -> Optional[np.ndarray]:
    return None if v is None or v.const_value is None else np.asarray(v.const_value)


def _dq_parts(v: Optional[Value]):
    p = v.producer if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or p.domain not in ("", "ai.onnx"):
        return None
    scale = _const(p.inputs[1])
    zp = _const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else np.zeros((), np.int64)
    if scale is None or zp is None:
        return None
    axis = p.attr("axis", 1) if scale.ndim else None
    return p.inputs[0], scale, zp, axis


def _act(v: Optional[Value]) -> Optional[_Act]:
    """The integer activation behind `v` = DQ(q) with per-tensor parameters."""
    parts = _dq_parts(v)
    if parts is None:
        return None
    q, scale, zp, _ = parts
    if scale.size != 1 or q.const_value is not None or not isinstance(q.type, TensorType):
        return None
    if q.type.dtype.bits > 8:
        return None
    return _Act(q, float(scale.reshape(())), int(zp.reshape(())))


def _const_dq(v: Optional[Value]):
    """(int weight, scale, zero point, axis) of a DQ of a constant integer tensor."""
    parts = _dq_parts(v)
    if parts is None or parts[0].const_value is None:
        return None
    return parts


def _out(g: Graph, node: Node, fuse: bool = True) -> _Out:
    """The Q that quantizes `node`'s result (through a fused Relu/Clip)."""
    chain = [node]
    v = node.outputs[0]
    lo_hi_node = None
    if fuse and _sole_reader(g, v) is not None and _sole_reader(g, v).op_type in _FUSE:
        lo_hi_node = _sole_reader(g, v)
        chain.append(lo_hi_node)
        v = lo_hi_node.outputs[0]
    q = _sole_reader(g, v)
    if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is not v:
        raise _Skip("result is not quantized by a single QuantizeLinear")
    scale, zp = _const(q.inputs[1]), _const(q.inputs[2]) if len(q.inputs) > 2 else None
    if scale is None or scale.size != 1 or (zp is not None and zp.size != 1):
        raise _Skip("output quantization is not per-tensor")
    dtype = q.output.type.dtype if isinstance(q.output.type, TensorType) else None
    if dtype is None or not dtype.is_integer or dtype.bits > 8:
        raise _Skip("output type is not an 8-bit integer")
    zp_i = int(zp.reshape(())) if zp is not None else 0
    out = _Out(q, float(scale.reshape(())), zp_i, dtype, dtype.min, dtype.max, chain + [q])
    if lo_hi_node is not None:
        out.lo, out.hi = _bounds(g, lo_hi_node, out.scale, out.zp, out.lo, out.hi)
    return out


def _sole_reader(g: Graph, v: Value) -> Optional[Node]:
    if len(v.uses) != 1 or any(o is v for o in g.outputs):
        return None
    return v.uses[0][0]


def _bounds(g: Graph, act: Node, scale: float, zp: int, lo: int, hi: int) -> Tuple[int, int]:
    """Saturation bounds of a Relu/Clip folded into the output quantization."""
    if act.op_type == "Relu":
        return max(lo, zp), hi
    if len(act.inputs) > 1 or act.attr("min") is None and act.attr("max") is None:
        vmin = _const(act.inputs[1]) if len(act.inputs) > 1 and act.inputs[1] is not None else None
        vmax = _const(act.inputs[2]) if len(act.inputs) > 2 and act.inputs[2] is not None else None
        if (len(act.inputs) > 1 and act.inputs[1] is not None and vmin is None) or \
                (len(act.inputs) > 2 and act.inputs[2] is not None and vmax is None):
            raise _Skip("Clip bounds are not constant")
    else:
        vmin, vmax = act.attr("min"), act.attr("max")
    if vmin is not None:
        lo = max(lo, min(hi, int(np.rint(np.float32(vmin) / np.float32(scale))) + zp))
    if vmax is not None:
        hi = min(hi, max(lo, int(np.rint(np.float32(vmax) / np.float32(scale))) + zp))
    return lo, hi


def _check_real(real) -> None:
    r = np.asarray(real, dtype=np.float64)
    if np.any(~np.isfinite(r)) or np.any(r <= 0) or np.any(r >= 2.0 ** 30):
        raise _Skip("rescale factor outside (0, 2^30)")


def _multiplier(real) -> Tuple[np.ndarray, np.ndarray]:
    _check_real(real)
    return quantize_multiplier(real)


def _bias(g: Graph, node: Node, acc_scale: np.ndarray, channels: int) -> Optional[Value]:
    """The int32 bias at the accumulator's scale (None when there is none)."""
    v = node.inputs[2] if len(node.inputs) > 2 else None
    if v is None:
        return None
    parts = _const_dq(v)
    if parts is not None:
        b_q, b_scale, b_zp, _ = parts
        b = (b_q.const_value.astype(np.float64) - b_zp.astype(np.float64)) * b_scale.astype(np.float64)
        exact = b_q.const_value.dtype == np.int32 and not np.any(b_zp) and \
            np.allclose(np.broadcast_to(b_scale, (channels,)), acc_scale, rtol=1e-6, atol=0)
        if exact and b_q.const_value.size == channels:
            return b_q
    elif v.const_value is not None:
        b = v.const_value.astype(np.float64)
    else:
        raise _Skip("bias is not constant")
    b = np.broadcast_to(np.asarray(b).ravel(), (channels,)) if np.size(b) in (1, channels) else None
    if b is None:
        raise _Skip("bias shape")
    q = np.clip(np.rint(b / acc_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    return g.make_constant(q, node.name + "_bias_acc")


def _retype(like: Value, dtype, scale: float, zp: int) -> TensorType:
    shape = like.type.shape if isinstance(like.type, TensorType) else None
    return TensorType(dtype, shape, QuantParams(np.float32(scale), np.int64(zp)))


def _requantize(g: Graph, x: Value, scale: float, zp: int, out: _Out, name: str, force: bool = False) -> Node:
    """Requantize `x` (scale, zp) to `out`'s parameters; with nothing to change and not
    `force`, an Identity-free pass-through is expressed by returning the producer."""
    same = (np.float32(scale) == np.float32(out.scale) and zp == out.zp and x.type.dtype == out.dtype
            and out.lo == out.dtype.min and out.hi == out.dtype.max)
    m, s = _multiplier(scale / out.scale)
    if (same or _identity(x.type.dtype, zp, m, s, out)) and not force and x.producer is not None:
        return x.producer
    attrs = dict(x_zero_point=int(zp), multiplier=int(m), shift=int(s), out_zero_point=out.zp,
                 out_min=out.lo, out_max=out.hi)
    return Node(REQUANTIZE, [x], attrs, domain=DOMAIN, name=name + "_requantize")


def _window_counts(in_shape, out_type, kernel, strides, pads, include_pad: bool) -> Optional[np.ndarray]:
    """Per output position, how many elements an ONNX AveragePool divides by: the window
    cut to the padded input (count_include_pad) or to the input; windows that ceil_mode
    adds run past the padding and are cut too. None when a spatial size is unknown."""
    out_shape = out_type.shape if isinstance(out_type, TensorType) else None
    d = len(kernel)
    if in_shape is None or out_shape is None or len(in_shape) != d + 2 or len(out_shape) != d + 2:
        return None
    sizes, outs = in_shape[2:], out_shape[2:]
    if not all(isinstance(v, int) for v in list(sizes) + list(outs)):
        return None
    per_dim = []
    for i in range(d):
        start = np.arange(outs[i]) * strides[i] - pads[i]
        end = start + kernel[i]
        lo, hi = (-pads[i], sizes[i] + pads[i + d]) if include_pad else (0, sizes[i])
        per_dim.append(np.minimum(end, hi) - np.maximum(start, lo))
    counts = per_dim[0]
    for c in per_dim[1:]:
        counts = np.multiply.outer(counts, c)
    return np.asarray(counts, np.int64)


def _largest(a: "_Act") -> int:
    """max |x - x_zp| over the codes of the activation's type."""
    t = a.q.type.dtype
    return max(a.zp - t.min, t.max - a.zp)


def _channel_shape(zp, ndim: int, axis: int) -> np.ndarray:
    z = np.asarray(zp, np.int64)
    if z.size <= 1:
        return z.reshape(())
    shape = [1] * ndim
    shape[axis] = z.size
    return z.reshape(shape)


def _identity(dtype, zp: int, m, s, out: _Out) -> bool:
    """True when requantizing maps every code of `dtype` to itself (scales a float32
    step apart, as `quantize` makes them around a 4-bit MaxPool)."""
    if dtype != out.dtype or zp != out.zp or dtype.bits > 16:
        return False
    codes = np.arange(dtype.min, dtype.max + 1, dtype=np.int64)
    return bool(np.array_equal(requantize(codes - zp, m, s, out.zp, out.lo, out.hi), codes))


def _replace(g: Graph, node: Node, out: _Out, new: Node, extra: Sequence[Node] = ()) -> Node:
    """Put `new` in place of the chain node [-> Relu/Clip] -> Q; the Q's output keeps
    its name and now comes from `new`."""
    q_out = out.q.output
    if new.graph is None:
        g.insert_before(out.q, new)
    new.output.type = TensorType(out.dtype, q_out.type.shape if isinstance(q_out.type, TensorType) else None,
                                 QuantParams(np.float32(out.scale), np.int64(out.zp)))
    name = q_out.name
    q_out.replace_all_uses_with(new.output)
    if any(o is q_out for o in g.outputs):
        g.replace_output(q_out, new.output)
    q_out.name = g.unique_name(name + "_replaced")
    new.output.name = name
    for dead in reversed(out.chain):
        g.remove(dead)
    return new


def _convert_interface(g: Graph) -> int:
    """Remaining QuantizeLinear/DequantizeLinear become Quantize/Dequantize."""
    count = 0
    for node in g.nodes:
        if node.domain in ("", "ai.onnx") and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if not node.outputs[0].uses and not any(o is node.outputs[0] for o in g.outputs):
                continue  # dead; swept below
            node.op_type = QUANTIZE if node.op_type == "QuantizeLinear" else DEQUANTIZE
            node.domain = DOMAIN
            count += 1
    return count


def _sweep(g: Graph) -> None:
    """Remove the QDQ nodes and constants the rewrites left without readers."""
    changed = True
    while changed:
        changed = False
        for node in reversed(g.nodes):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", QUANTIZE, DEQUANTIZE, "Constant") and \
                    all(not v.uses and not any(o is v for o in g.outputs) for v in node.outputs):
                g.remove(node)
                changed = True
    outs = {id(v) for v in g.outputs}
    ins = {id(v) for v in g.inputs}
    for name, v in list(g.initializers.items()):
        if not v.uses and id(v) not in outs and id(v) not in ins:
            g.remove_initializer(name)
