"""Graphviz DOT of a graph: nodes labelled with op and name, edges with the value's name
and type; graph inputs and outputs drawn as ellipses; initializers folded into the
label of the node that reads them unless asked for as nodes of their own."""
from __future__ import annotations

from typing import Dict, List

from ..ir import Graph, Value

__all__ = ["to_dot"]


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _typed(v: Value) -> str:
    return v.name if v.type is None else f"{v.name}\n{v.type}"


def to_dot(graph: Graph, show_initializers: bool = False) -> str:
    """The DOT text of `graph` (subgraphs are summarised in their node's label)."""
    lines: List[str] = [
        f"digraph {_q(graph.name)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    source: Dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        if v.name in graph.initializers:
            continue
        ident = f"input{i}"
        source[id(v)] = ident
        lines.append(f'  {ident} [shape=ellipse, fillcolor="#cfe8ff", label={_q(_typed(v))}];')
    if show_initializers:
        for i, v in enumerate(graph.initializers.values()):
            ident = f"init{i}"
            source[id(v)] = ident
            lines.append(f'  {ident} [shape=note, fillcolor="#fff7d6", label={_q(_typed(v))}];')
    for i, n in enumerate(graph.nodes):
        ident = f"node{i}"
        label = n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
        if n.name:
            label += f"\n{n.name}"
        weights = [v for v in n.inputs if v is not None and v.is_initializer and not show_initializers]
        for w in weights:
            label += f"\n{w.name}: {w.type}"
        subs = list(n.subgraphs())
        if subs:
            label += "\n" + ", ".join(f"{g.name} ({len(g)} nodes)" for g in subs)
        lines.append(f"  {ident} [label={_q(label)}];")
        for v in n.outputs:
            source[id(v)] = ident
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v is not None and id(v) in source:
                lines.append(f"  {source[id(v)]} -> node{i} [label={_q(_typed(v))}];")
    for i, v in enumerate(graph.outputs):
        ident = f"output{i}"
        lines.append(f'  {ident} [shape=ellipse, fillcolor="#d6f5d6", label={_q(_typed(v))}];')
        if id(v) in source:
            lines.append(f"  {source[id(v)]} -> {ident};")
    lines.append("}")
    return "\n".join(lines) + "\n"
