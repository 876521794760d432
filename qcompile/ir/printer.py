"""Stable text form of the IR, for golden tests, `--print-ir-after-all` and humans.

    graph main (%x: f32[1,3,8,8]) -> (%y: f32[1,4]) {
      init %w: f32[4,3,3,3]
      %conv_0 = Conv(%x, %w) {pads=[1,1,1,1]}  # conv1
      return %y
    }

Attributes are sorted by name, constants are summarised (their values shown when they
have at most 8 elements), and the output is deterministic for a given graph.
"""
from __future__ import annotations

from typing import Any, List

import numpy as np
import onnx

from .graph import Graph
from .model import Model
from .node import Attr, Node
from .tensor import Tensor
from .value import Value

__all__ = ["print_graph", "print_model", "format_value", "format_node"]

_SMALL = 8


def format_value(v: Value) -> str:
    return f"%{v.name}: {v.type}" if v.type is not None else f"%{v.name}"


def _format_tensor(t: Tensor) -> str:
    text = f"{t.dtype}[{','.join(str(d) for d in t.shape)}]"
    if not t.is_external and int(np.prod(t.shape, dtype=np.int64)) <= _SMALL and t.dtype.kind != "string":
        try:
            flat = t.numpy().reshape(-1)
            text += " <" + ", ".join(_scalar(x) for x in flat) + ">"
        except Exception:  # undecodable exotic types print without values
            pass
    return text


def _scalar(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        return str(np.float32(x)) if isinstance(x, float) else str(x)
    return str(x)


def _format_attr_value(a: Attr, indent: str) -> str:
    v = a.value
    if isinstance(v, Graph):
        return _graph_lines_text(v, indent)
    if isinstance(v, Tensor):
        return _format_tensor(v)
    if isinstance(v, float):
        return str(np.float32(v))
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(
            _graph_lines_text(x, indent) if isinstance(x, Graph)
            else _format_tensor(x) if isinstance(x, Tensor)
            else str(np.float32(x)) if isinstance(x, float)
            else repr(x) if isinstance(x, str)
            else str(x)
            for x in v
        ) + "]"
    if isinstance(v, onnx.TypeProto):
        from .types import OpaqueType

        return str(OpaqueType(v))
    if a.ref_attr_name:
        return f"@{a.ref_attr_name}"
    return str(v)


def format_node(n: Node, indent: str = "") -> str:
    outs = ", ".join(f"%{v.name}" for v in n.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in n.inputs)
    op = n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
    text = f"{outs} = {op}({ins})"
    if n.attributes:
        attrs = ", ".join(
            f"{k}={_format_attr_value(n.attributes[k], indent + '  ')}" for k in sorted(n.attributes)
        )
        text += " {" + attrs + "}"
    if n.name:
        text += f"  # {n.name}"
    return text


def _graph_lines(g: Graph, indent: str) -> List[str]:
    ins = ", ".join(format_value(v) for v in g.inputs if v.name not in g.initializers)
    outs = ", ".join(format_value(v) for v in g.outputs)
    lines = [f"graph {g.name} ({ins}) -> ({outs}) {{"]
    inner = indent + "  "
    for name in g.initializers:
        v = g.initializers[name]
        lines.append(f"{inner}init %{name}: {_format_tensor(v.const)}")
    for n in g.nodes:
        lines.append(inner + format_node(n, inner))
    lines.append(inner + "return " + ", ".join(f"%{v.name}" for v in g.outputs))
    lines.append(indent + "}")
    return lines


def _graph_lines_text(g: Graph, indent: str) -> str:
    return "\n".join(_graph_lines(g, indent))


def print_graph(g: Graph) -> str:
    """The text form of a graph (and its subgraphs, nested in attributes)."""
    return _graph_lines_text(g, "")


def print_model(m: Model) -> str:
    """The text form of a model: a header line with the opsets, then the graph."""
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in sorted(m.opset_imports.items()))
    return f"model ir_version={m.ir_version} opsets=[{opsets}]\n" + print_graph(m.graph)
