"""Model summaries for `qcompile inspect`: op histogram, parameters, MACs, shapes, and a
per-node table; as a dataclass, a JSON-ready dict, or text.

Run `infer_shapes(model)` first for MACs and shapes of intermediate values; without
shapes the counts that need them are reported as unknown, never guessed.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Dict, List, Optional

import numpy as np

from ..ir import Model, Node, Tensor, TensorType, Value
from .macs import node_macs

__all__ = ["ModelSummary", "NodeRow", "summarize", "format_summary"]


@dataclasses.dataclass
class NodeRow:
    """One node of the per-node table."""

    name: str
    op: str
    inputs: List[str]
    outputs: List[str]
    params: int
    macs: Optional[int]


@dataclasses.dataclass
class ModelSummary:
    """What `qcompile inspect` reports about a model."""

    name: str
    opsets: Dict[str, int]
    producer: str
    inputs: List[Dict[str, str]]
    outputs: List[Dict[str, str]]
    op_histogram: Dict[str, int]
    num_nodes: int
    params: int
    param_bytes: int
    params_by_dtype: Dict[str, Dict[str, int]]
    total_macs: int
    unknown_macs: List[str]
    symbolic_dims: List[str]
    nodes: List[NodeRow]
    quantized: List[Dict[str, object]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)


def _type_text(v: Optional[Value], true_types: Optional[Dict[str, str]] = None) -> str:
    """The value's type; ' as i4' added when the metadata says its values are narrower."""
    if v is None:
        return "-"
    text = str(v.type) if v.type is not None else "?"
    true = (true_types or {}).get(v.name)
    if true and isinstance(v.type, TensorType) and str(v.type.dtype) != true:
        text += f" as {true}"
    return text


def _io(v: Value) -> Dict[str, str]:
    t = v.type
    if isinstance(t, TensorType):
        shape = None if t.shape is None else ["?" if d is None else d for d in t.shape]
        return {"name": v.name, "dtype": str(t.dtype), "shape": shape}
    return {"name": v.name, "dtype": str(t) if t is not None else "?", "shape": None}


def _node_tensors(node: Node) -> List[Tensor]:
    found = []
    for a in node.attributes.values():
        vals = a.value if isinstance(a.value, list) else [a.value]
        found += [t for t in vals if isinstance(t, Tensor)]
    return found


def summarize(model: Model) -> ModelSummary:
    """Summarise `model` (all graphs, subgraphs included)."""
    graph = model.graph
    hist: Dict[str, int] = collections.Counter()
    by_dtype: Dict[str, Dict[str, int]] = {}
    rows: List[NodeRow] = []
    total = 0
    unknown: List[str] = []
    symbolic = sorted({d for g in graph.walk() for v in g.values()
                       if isinstance(v.type, TensorType) and v.type.shape
                       for d in v.type.shape if isinstance(d, str)})

    true_types = _true_types(model)

    def add_params(t: Tensor) -> None:
        entry = by_dtype.setdefault(str(t.dtype), {"count": 0, "bytes": 0})
        entry["count"] += t.numel
        entry["bytes"] += t.nbytes

    for g in graph.walk():
        for v in g.initializers.values():
            add_params(v.const)
        for n in g.nodes:
            hist[n.op_type] += 1
            tensors = _node_tensors(n)
            for t in tensors:
                add_params(t)
            params = sum(v.const.numel for v in n.inputs if v is not None and v.is_initializer)
            params += sum(t.numel for t in tensors)
            macs = node_macs(n)
            if macs is None:
                unknown.append(n.name or n.op_type)
            else:
                total += macs
            rows.append(NodeRow(
                name=n.name, op=n.op_type if not n.domain else f"{n.domain}::{n.op_type}",
                inputs=[_type_text(v, true_types) for v in n.inputs],
                outputs=[_type_text(v, true_types) for v in n.outputs],
                params=params, macs=macs,
            ))
    return ModelSummary(
        name=graph.name,
        opsets=dict(model.opset_imports),
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        inputs=[_io(v) for v in graph.inputs if v.name not in graph.initializers],
        outputs=[_io(v) for v in graph.outputs],
        op_histogram=dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        num_nodes=len(rows),
        params=sum(e["count"] for e in by_dtype.values()),
        param_bytes=sum(e["bytes"] for e in by_dtype.values()),
        params_by_dtype=by_dtype,
        total_macs=total,
        unknown_macs=unknown,
        symbolic_dims=symbolic,
        nodes=rows,
        quantized=_quantized_tensors(model),
    )


# {tensor: true type} for tensors narrower than their container: weights (quantize,
# lower-integer) and activations (lower-integer)
_BITS_KEYS = ("qcompile.weight_bits", "qcompile.activation_bits")


def _true_types(model: Model) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for key in _BITS_KEYS:
        try:
            found.update(json.loads(model.metadata_props.get(key, "{}")))
        except ValueError:
            pass
    return found


def _quantized_tensors(model: Model) -> List[Dict[str, object]]:
    """One row per DequantizeLinear of the main graph: which float tensor it stands for,
    its role, integer type (the true width when narrower than its container), scale,
    zero point and axis."""
    true_types = _true_types(model)
    rows = []
    for n in model.graph.nodes:
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        q = n.inputs[0]
        scale = n.inputs[1].const_value if n.inputs[1] is not None else None
        zp = n.inputs[2].const_value if len(n.inputs) > 2 and n.inputs[2] is not None else None
        if q.is_initializer:
            readers = [(u.op_type, i) for u, i in n.outputs[0].uses]
            role = "bias" if readers and all(i == 2 for _, i in readers) else "weight"
            tensor = q.name
        else:
            role = "activation"
            source = q.producer.inputs[0] if q.producer is not None and q.producer.op_type == "QuantizeLinear" else q
            tensor = source.name
        dtype = true_types.get(q.name) or (str(q.type.dtype) if isinstance(q.type, TensorType) else "?")
        rows.append({
            "tensor": tensor, "role": role, "type": dtype,
            "scale": None if scale is None else [float(x) for x in np.ravel(scale)],
            "zero_point": None if zp is None else [int(x) for x in np.ravel(zp)],
            "axis": n.attr("axis") if scale is not None and np.ndim(scale) == 1 else None,
        })
    return rows


def _range_text(values) -> str:
    if values is None:
        return "-"
    lo, hi = min(values), max(values)
    if len(values) == 1 or lo == hi:
        return f"{values[0]:.6g}"
    return f"{lo:.4g}..{hi:.4g} ({len(values)} ch)"


def _format_quantized(rows: List[Dict[str, object]]) -> List[str]:
    if not rows:
        return []
    table = [["quantized tensor", "role", "type", "scale", "zero point", "axis"]] + [
        [r["tensor"], r["role"], r["type"], _range_text(r["scale"]),
         "-" if r["zero_point"] is None else (str(r["zero_point"][0]) if len(set(r["zero_point"])) == 1
                                               else f"{min(r['zero_point'])}..{max(r['zero_point'])}"),
         "-" if r["axis"] is None else str(r["axis"])]
        for r in rows
    ]
    return [""] + _align(table, right=set())


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{int(n)} {unit}".rstrip()


def _bytes(n: int) -> str:
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _shape_text(d: Dict[str, str]) -> str:
    shape = d["shape"]
    return f"{d['dtype']}" + ("" if shape is None else "[" + ",".join(str(x) for x in shape) + "]")


def format_summary(s: ModelSummary) -> str:
    """Readable text: the summary block, then the per-node table."""
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in sorted(s.opsets.items()))
    lines = [f"graph {s.name}  (opsets {opsets}{'; producer ' + s.producer if s.producer else ''})"]
    for label, items in (("inputs", s.inputs), ("outputs", s.outputs)):
        lines.append(f"{label:<8} " + ", ".join(f"{d['name']}: {_shape_text(d)}" for d in items))
    lines.append(f"nodes    {s.num_nodes}")
    dtypes = ", ".join(f"{k} {v['count']:,}" for k, v in sorted(s.params_by_dtype.items()))
    lines.append(f"params   {s.params:,} ({_bytes(s.param_bytes)}{'; ' + dtypes if dtypes else ''})")
    macs = f"{s.total_macs:,} ({_human(s.total_macs, 'MAC')})"
    if s.symbolic_dims:
        macs += f" per inference, symbolic dims {', '.join(s.symbolic_dims)} taken as 1"
    if s.unknown_macs:
        macs += f"; unknown for {len(s.unknown_macs)} nodes lacking shapes"
    lines.append(f"MACs     {macs}")
    lines.append("ops      " + ", ".join(f"{op} {n}" for op, n in s.op_histogram.items()))
    lines.append("")
    header = ["#", "name", "op", "inputs", "outputs", "params", "MACs"]
    table = [header] + [
        [str(i), r.name or "-", r.op, " ".join(r.inputs), " ".join(r.outputs), f"{r.params:,}",
         "?" if r.macs is None else f"{r.macs:,}"]
        for i, r in enumerate(s.nodes)
    ]
    lines += _align(table, right={0, 5, 6})
    lines += _format_quantized(s.quantized)
    return "\n".join(lines)


def _align(table: List[List[str]], right: set) -> List[str]:
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return ["  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table]
