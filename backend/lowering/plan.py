"""Stage 1 of the lowering, `partition`: the integer graph as a list of layers.

Each node of the integer graph becomes one of:
  1. an accelerator layer, by kind: `conv` (QConv on the matrix unit, groups included),
     `dwconv` (depthwise QConv on the vector unit), `gemm` (QGemm, QMatMul with constant
     weights, and QMatMul of two activations), `pointwise` (QAdd, QMul, Requantize, and
     8-bit lookup tables), `pool` (MaxPool, QAveragePool), `move` (Transpose, Concat, Slice);
  2. an alias: Reshape, Flatten, Squeeze and Unsqueeze of a dense row-major tensor move
     no data, the output shares the input's DRAM slot;
  3. a lookup table: a chain of elementwise float ops (Sigmoid, Tanh, GELU, Exp, ...)
     between an 8-bit Dequantize and an 8-bit Quantize is a function of 256 values,
     tabulated at compile time by the integer reference itself, so it stays exact;
  4. the interface: the graph inputs' Quantize and the outputs' Dequantize are the
     host's conversions around the program (`Program.inputs` / `outputs`);
  5. a HOST op: everything else (Softmax, LayerNorm, LSTM, an operand precision the
     target lacks, ...), run on the host between DRAM tensors and listed in the report.

Shapes are those of one inference: a symbolic leading (batch) dimension is 1. They come
from the integer reference's shapes-only pass (`integer_graph_shapes`: shape rules per
op, exact values for shape computations), and from one run of the reference on zeros
only where a shape depends on the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from qcompile.errors import QCompileError
from qcompile.ir import Model, Node, TensorType, Value
from qcompile.quant_math import (
    DEQUANTIZE, DOMAIN, QADD, QAVERAGEPOOL, QCONV, QGEMM, QMATMUL, QMUL, QUANTIZE, REQUANTIZE,
)

__all__ = ["Layer", "Plan", "plan_layers", "LoweringError", "ELEMENTWISE_FLOAT_OPS"]

WEIGHT_BITS_KEY = "qcompile.weight_bits"
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# float ops that act element by element (constants of one element broadcast): a chain of
# them between 8-bit Dequantize and Quantize is a 256-entry table
ELEMENTWISE_FLOAT_OPS = frozenset({
    "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Exp", "Log", "Erf", "Gelu", "Neg", "Abs", "Sqrt", "Reciprocal", "Clip", "Add", "Sub", "Mul",
    "Div", "Pow", "Mish", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Identity", "BatchNormalization",
    # activation-sparsity thresholds (the sparsify pass): ThresholdedRelu, Where(Less(Abs(x), t), 0, x)
    "ThresholdedRelu", "Where", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Not",
})


class LoweringError(QCompileError):
    """The integer graph cannot be lowered for this target (names the node)."""


@dataclass
class Layer:
    """One unit of lowering: a node (or LUT chain) and how it runs."""
    kind: str                      # conv dwconv gemm pointwise pool move host alias
    name: str
    op_type: str
    node: Optional[Node]
    inputs: List[Value]
    outputs: List[Value]
    attrs: Dict[str, Any] = field(default_factory=dict)
    reason: str = ""               # why a layer runs on the host


@dataclass
class Plan:
    layers: List[Layer]
    shapes: Dict[int, tuple]        # id(value) -> per-inference shape
    dtypes: Dict[int, np.dtype]
    inputs: List[Dict[str, Any]]    # interface: graph input -> quantized tensor
    outputs: List[Dict[str, Any]]
    weight_bits: Dict[str, int]
    static: Dict[int, np.ndarray] = field(default_factory=dict)  # shape computations folded at compile time

    def is_const(self, v: Optional[Value]) -> bool:
        return v is not None and (v.const_value is not None or id(v) in self.static)

    def const(self, v: Value) -> np.ndarray:
        return np.asarray(v.const_value) if v.const_value is not None else self.static[id(v)]


def _is_const(v: Optional[Value]) -> bool:
    return v is not None and v.const_value is not None


def _const(v: Optional[Value]) -> Optional[np.ndarray]:
    return None if v is None or v.const_value is None else np.asarray(v.const_value)


def _bits_of(name: str, table: Dict[str, Any], dtype) -> int:
    """True bit width of a weight tensor (the quantize pass records it)."""
    t = str(table.get(name, "")).lower()
    import re

    m = re.fullmatch(r"u?int(\d+)|[iu](\d+)", t)
    if m:
        return int(m.group(1) or m.group(2))
    widths = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int3": 3, "int2": 2, "ternary": 2, "binary": 1,
              "bipolar": 1}
    for k, b in widths.items():
        if t == k or t.startswith(k):
            return b
    return 8 * np.dtype(dtype).itemsize


def plan_layers(model: Model) -> Plan:
    import json

    g = model.graph
    feeds = {}
    for v in g.inputs:
        if v.const_value is not None:
            continue
        t = v.type
        if not isinstance(t, TensorType) or t.shape is None:
            raise LoweringError(f"graph input %{v.name} has no known shape")
        shape = []
        for i, d in enumerate(t.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(1)
            else:
                raise LoweringError(f"graph input %{v.name} has a symbolic dimension {d!r} at axis {i}: export the "
                                    "model with static shapes (only a leading batch dimension may be symbolic)")
        feeds[v.name] = (tuple(shape), np.dtype(t.dtype.numpy_dtype))
    shapes, dtypes, values = _tensor_shapes(model, feeds)
    meta = dict(model.metadata_props)
    try:
        raw_bits = json.loads(meta.get(WEIGHT_BITS_KEY, "{}"))
    except ValueError:
        raw_bits = {}
    weight_bits = {k: _bits_of(k, raw_bits, np.int8) for k in raw_bits}

    static = _static_values(g, values)
    layers: List[Layer] = []
    consumed: Set[int] = {id(n) for n in g.nodes if all(id(o) in static for o in n.outputs)}
    inputs_spec, outputs_spec = [], []
    graph_outputs = {id(v) for v in g.outputs}

    # interface quantize: a float graph input whose only use is one Quantize
    for v in g.inputs:
        uses = [u[0] for u in v.uses]
        if len(uses) == 1 and uses[0].domain == DOMAIN and uses[0].op_type == QUANTIZE and \
                uses[0].inputs[0] is v and id(v) not in graph_outputs:
            q = uses[0]
            inputs_spec.append({"name": v.name, "value": q.outputs[0], "shape": list(shapes[id(v)]), "float": True,
                                "scale": _const(q.inputs[1]), "zero_point": _const(_opt(q, 2)),
                                "axis": int(q.attr("axis", 1)), "dtype": str(dtypes[id(v)]),
                                "out_min": q.attr("out_min", None), "out_max": q.attr("out_max", None)})
            consumed.add(id(q))
        else:
            inputs_spec.append({"name": v.name, "value": v, "shape": list(shapes[id(v)]), "float": False,
                                "dtype": str(dtypes[id(v)])})
    for v in g.outputs:
        p = v.producer
        if p is not None and p.domain == DOMAIN and p.op_type == DEQUANTIZE and id(p) not in consumed and \
                len(v.uses) == 0 and not _is_const(p.inputs[0]):
            outputs_spec.append({"name": v.name, "value": p.inputs[0], "shape": list(shapes[id(v)]), "float": True,
                                 "scale": _const(p.inputs[1]), "zero_point": _const(_opt(p, 2)),
                                 "axis": int(p.attr("axis", 1))})
            consumed.add(id(p))
        else:
            outputs_spec.append({"name": v.name, "value": v, "shape": list(shapes[id(v)]), "float": False})

    luts = _find_luts(g, dtypes, shapes, consumed, graph_outputs)
    lut_at = {id(info["quantize"]): info for info in luts}
    for info in luts:
        for n in info["nodes"]:
            consumed.add(id(n))
    for info in luts:  # a Dequantize that only fed tables is gone with them
        dq = info["dequantize"]
        if all(id(u[0]) in consumed for u in dq.outputs[0].uses) and id(dq.outputs[0]) not in graph_outputs:
            consumed.add(id(dq))

    for node in g.nodes:
        if id(node) in lut_at:
            info = lut_at[id(node)]
            layers.append(Layer("pointwise", node.name or info["quantize"].outputs[0].name, "LUT:" + "+".join(
                n.op_type for n in info["float_nodes"]), None, [info["source"]], [node.outputs[0]],
                {"op": "lut", "info": info}))
            continue
        if id(node) in consumed:
            continue
        layers.append(_classify(node, shapes, dtypes, weight_bits, static))
    return Plan(layers, shapes, dtypes, inputs_spec, outputs_spec, weight_bits, static)


_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                               "Bernoulli", "Dropout"})


def _tensor_shapes(model: Model, inputs: Dict[str, Tuple[tuple, np.dtype]]):
    """({id: shape}, {id: dtype}, {id: value}) of every tensor: the values for those
    that do not depend on the data. From the reference's shapes-only pass; where a shape
    depends on the data, from one run of the reference on zeros (which also reports a
    graph that does not run)."""
    from ..reference import ShapesNeedValues, integer_graph_shapes, run_integer_graph

    g = model.graph
    by_name = {v.name: v for v in g.values()}
    try:
        shapes, dtypes, values = integer_graph_shapes(model, inputs)
        names = [v.name for v in g.values() if v.const_value is None]
        missing = [n for n in names if n not in shapes]
        if missing:
            raise ShapesNeedValues(f"no shape for %{missing[0]}")
    except ShapesNeedValues:
        feeds = {k: np.zeros(shape, dtype) for k, (shape, dtype) in inputs.items()}
        names = [v.name for v in g.values() if v.const_value is None]
        try:
            env = run_integer_graph(model, feeds, outputs=names)
        except QCompileError:
            raise
        except Exception as e:  # noqa: BLE001 - the graph itself is at fault
            raise LoweringError(f"the integer graph does not run: {e}") from None
        shapes = {n: np.shape(a) for n, a in env.items()}
        dtypes = {n: np.asarray(a).dtype for n, a in env.items()}
        values = dict(env)
    except QCompileError:
        raise
    except Exception as e:  # noqa: BLE001 - the graph itself is at fault
        raise LoweringError(f"the integer graph does not run: {e}") from None
    out_shapes = {id(by_name[n]): tuple(int(s) for s in shapes[n]) for n in names}
    out_dtypes = {id(by_name[n]): np.dtype(dtypes[n]) for n in names}
    out_values = {id(by_name[n]): np.asarray(values[n]) for n in names if n in values}
    for v in g.initializers.values():
        out_shapes[id(v)] = tuple(np.shape(v.const_value))
        out_dtypes[id(v)] = np.asarray(v.const_value).dtype
    return out_shapes, out_dtypes, out_values


def _static_values(g, values: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
    """Values that do not depend on the data: shape computations (Shape, Size, and ops
    on constants and shapes) are fixed once shapes are static; folded at compile time
    with the values the reference computed."""
    static: Dict[int, np.ndarray] = {}
    outputs = {id(v) for v in g.outputs}
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC or any(True for _ in node.subgraphs()):
            continue
        if node.op_type in ("Shape", "Size"):
            ok = True
        else:
            ins = [v for v in node.inputs if v is not None]
            ok = all(v.const_value is not None or id(v) in static for v in ins) and (ins or node.op_type == "Constant")
        if ok and all(id(o) in values and id(o) not in outputs for o in node.outputs):
            for o in node.outputs:
                static[id(o)] = values[id(o)]
    return static


def _opt(node: Node, i: int) -> Optional[Value]:
    return node.inputs[i] if len(node.inputs) > i else None


def _classify(node: Node, shapes, dtypes, weight_bits, static) -> Layer:
    name = node.name or node.outputs[0].name
    ins, outs = list(node.inputs), list(node.outputs)
    if any(id(v) in static for v in ins if v is not None) and node.domain == DOMAIN:
        return _host(node, "an operand computed from shapes")
    if node.domain == DOMAIN:
        op = node.op_type
        if op == QCONV:
            x, w = ins[0], ins[1]
            if not _is_const(w):
                return _host(node, "convolution weights are not constant")
            if len(ins) > 5 and ins[5] is not None and np.any(_const(ins[5]) != 0):
                return _host(node, "asymmetric (nonzero) weight zero points")
            if len(shapes[id(x)]) != 4:
                return _host(node, f"{len(shapes[id(x)]) - 2}-D convolution (rain-sim runs 2-D)")
            group = int(node.attr("group", 1))
            c_in, c_out = shapes[id(x)][1], shapes[id(w)][0]
            bits = weight_bits.get(w.name, 8)
            kind = "dwconv" if group == c_in == c_out and group > 1 else "conv"
            return Layer(kind, name, op, node, ins, outs, {"bits": bits})
        if op in (QGEMM, QMATMUL):
            w = ins[1]
            zp_at = 5 if op == QGEMM else 4
            wzp = _const(_opt(node, zp_at))
            if wzp is not None and wzp.size > 1 and np.any(wzp != wzp.reshape(-1)[0]):
                return _host(node, "per-channel weight zero points")
            if _is_const(w) and wzp is not None and np.any(wzp != 0):
                return _host(node, "asymmetric (nonzero) weight zero points")
            bits = weight_bits.get(w.name, 8) if _is_const(w) else 8
            return Layer("gemm", name, op, node, ins, outs, {"bits": bits, "w_const": _is_const(w)})
        if op in (QADD, QMUL, REQUANTIZE):
            return Layer("pointwise", name, op, node, ins, outs, {"op": op})
        if op == QAVERAGEPOOL:
            if len(ins) > 1:
                return _host(node, "average pool whose divisor varies by position (padding excluded or ceil mode)")
            return Layer("pool", name, op, node, ins, outs, {"mode": "avg"})
        return _host(node, "interface conversion inside the graph")
    if node.domain in ("", "ai.onnx"):
        x = ins[0] if ins else None
        integer = x is not None and np.issubdtype(dtypes.get(id(x), np.float32), np.integer) and \
            np.dtype(dtypes[id(x)]).itemsize <= 2
        if integer and node.op_type in ALIAS_OPS:
            return Layer("alias", name, node.op_type, node, ins, outs)
        if integer and node.op_type == "MaxPool" and len(outs) == 1 and len(shapes[id(x)]) == 4:
            if node.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                return _host(node, "MaxPool auto_pad")
            return Layer("pool", name, "MaxPool", node, ins, outs, {"mode": "max"})
        if integer and node.op_type in ("Transpose", "Concat", "Slice"):
            if node.op_type == "Concat" and any(_is_const(v) or id(v) in static for v in ins):
                return _host(node, "Concat of a constant")
            if node.op_type == "Slice":
                if _is_const(x) or id(x) in static:
                    return _host(node, "Slice of a constant")
                if any(v is not None and _const(v) is None for v in ins[1:]):
                    return _host(node, "Slice with starts, ends, axes or steps that are not constants")
                steps = _const(_opt(node, 4))
                if steps is not None and np.any(np.asarray(steps) <= 0):
                    return _host(node, "Slice with a negative step")
            return Layer("move", name, node.op_type, node, ins, outs)
    return _host(node, "no rain-sim unit runs this op")


def _host(node: Node, reason: str) -> Layer:
    return Layer("host", node.name or node.outputs[0].name, node.op_type, node, list(node.inputs),
                 list(node.outputs), {}, reason)


def _channel_axis(p: Node, rank: int) -> Optional[Tuple[int, int]]:
    """(axis, size) along which the constant operands of an elementwise op vary, None
    if they are all single values; ValueError if they vary along more than one axis."""
    found: Set[Tuple[int, int]] = set()
    if p.op_type == "BatchNormalization":
        params = [np.asarray(v.const_value) for v in p.inputs[1:] if v is not None]
        return (1, int(params[0].size)) if params and params[0].size > 1 else None
    for v in p.inputs:
        if v is None or v.const_value is None or np.size(v.const_value) == 1:
            continue
        shape = [1] * (rank - np.ndim(v.const_value)) + list(np.shape(v.const_value))
        axes = [(a, d) for a, d in enumerate(shape) if d != 1]
        if len(axes) != 1 or len(shape) != rank:
            raise ValueError("constants vary along several axes")
        found.add(axes[0])
    if len(found) > 1:
        raise ValueError("constants vary along different axes")
    return found.pop() if found else None


def _find_luts(g, dtypes, shapes, consumed, graph_outputs) -> List[Dict[str, Any]]:
    """Chains 8-bit Dequantize -> elementwise float ops -> 8-bit Quantize (see module
    doc). Constants may vary along one axis (a per-channel affine, a bias add): then the
    chain is one table per index of that axis."""
    found = []
    for q in g.nodes:
        if not (q.domain == DOMAIN and q.op_type == QUANTIZE) or id(q) in consumed:
            continue
        if np.dtype(dtypes.get(id(q.outputs[0]), np.int32)).itemsize != 1:
            continue
        if _const(q.inputs[1]) is None or np.size(_const(q.inputs[1])) != 1:
            continue
        region: List[Node] = []
        source: Optional[Value] = None
        dq_node: Optional[Node] = None
        ok = True
        axis: Optional[Tuple[int, int]] = None
        stack = [q.inputs[0]]
        seen: Set[int] = set()
        while stack and ok:
            v = stack.pop()
            if id(v) in seen or _is_const(v):
                continue
            seen.add(id(v))
            p = v.producer
            if p is None:
                ok = False
                break
            if p.domain == DOMAIN and p.op_type == DEQUANTIZE:
                src = p.inputs[0]
                if np.dtype(dtypes.get(id(src), np.int32)).itemsize != 1 or \
                        np.size(_const(p.inputs[1]) if _const(p.inputs[1]) is not None else [0, 0]) != 1:
                    ok = False
                elif dq_node is not None and dq_node is not p:
                    ok = False
                else:
                    dq_node, source = p, src
                continue
            if p.domain not in ("", "ai.onnx") or p.op_type not in ELEMENTWISE_FLOAT_OPS or len(p.outputs) != 1:
                ok = False
                break
            if p.op_type == "BatchNormalization" and not all(_is_const(i) for i in p.inputs[1:]):
                ok = False
                break
            rank = len(shapes.get(id(v), ()))
            try:
                ax = _channel_axis(p, rank)
            except ValueError:
                ok = False
                break
            if ax is not None:
                if axis is not None and axis != ax:
                    ok = False
                    break
                axis = ax
            region.append(p)
            stack.extend(i for i in p.inputs if i is not None)
        if not ok or dq_node is None or not region:
            continue
        # internal values must not escape the chain
        members = {id(n) for n in region} | {id(q)}
        if any(id(o) in graph_outputs or any(id(u[0]) not in members for u in o.uses)
               for n in region for o in n.outputs):
            continue
        if axis is not None:
            src_shape = shapes.get(id(source), ())
            if len(src_shape) < 2 or src_shape[axis[0]] != axis[1] or \
                    tuple(shapes.get(id(q.outputs[0]), ())) != tuple(src_shape):
                continue
        ordered = [n for n in g.nodes if id(n) in {id(r) for r in region}]
        found.append({"quantize": q, "dequantize": dq_node, "source": source, "float_nodes": ordered,
                      "nodes": ordered + [q], "axis": axis})
    return found
