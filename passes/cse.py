"""Common-subexpression elimination, hash-based (one dictionary lookup per node).

Algebra: a deterministic op applied twice to the same inputs with the same attributes
computes the same values, so the second node's users can read the first node's
outputs; two constants with the same element type, shape and bytes are the same value.

Merged, in every graph (If/Loop/Scan bodies included, each on its own):
  1. Initializers (not graph inputs, not graph outputs) with equal element type,
     shape and bytes: the users of the later ones read the first. Only initializers
     sharing a type and shape are hashed, so unique weights are never read.
  2. Nodes with the same domain, op type, attributes and the very same input values
     (in order), and the same number of outputs, visited in graph order so chains of
     duplicates merge in one sweep. Attributes compare by value: numbers, strings and
     lists by value (floats by their bits, so NaN equals NaN and -0.0 differs from 0.0),
     tensors by element type, shape and bytes.

Left alone:
  3. Nondeterministic ops (RandomNormal, Bernoulli, ...), ops of non-standard domains
     (they may have side effects), and nodes without outputs.
  4. Nodes with subgraph attributes (If, Loop, Scan): comparing bodies is not worth it.
  5. A duplicate whose outputs include a graph output, and a duplicate initializer
     that is a graph output: the interface keeps its names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np

from qcompile.ir import Graph, Model, Node, Tensor, Value

from .constant_folding import NONDETERMINISTIC
from .dce import STANDARD_DOMAINS

__all__ = ["CSEResult", "eliminate_common_subexpressions"]


@dataclasses.dataclass
class CSEResult:
    nodes_merged: int = 0
    initializers_merged: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.nodes_merged or self.initializers_merged)


class _Unhashable(Exception):
    """An attribute value CSE does not compare (a subgraph)."""


def eliminate_common_subexpressions(model: Model) -> CSEResult:
    """Merge duplicate initializers and nodes in every graph of `model`, in place.
    Merged nodes lose all their users; removing them is DCE's job."""
    result = CSEResult()
    for g in list(model.graph.walk()):
        result.initializers_merged += _merge_initializers(g)
        result.nodes_merged += _merge_nodes(g)
    return result


def _merge_initializers(graph: Graph) -> int:
    outputs = {id(v) for v in graph.outputs}
    by_type: Dict[Tuple, List[Value]] = {}
    for v in graph.initializers.values():
        if v.is_graph_input or id(v) in outputs or not v.uses:
            continue
        by_type.setdefault((str(v.const.dtype), v.const.shape), []).append(v)
    merged = 0
    for group in by_type.values():
        if len(group) < 2:
            continue
        first: Dict[bytes, Value] = {}
        for v in group:
            data = np.ascontiguousarray(v.const_value)
            if data.dtype.kind == "O":  # strings: not compared
                continue
            digest = hashlib.blake2b(data.tobytes(), digest_size=16).digest()
            kept = first.get(digest)
            if kept is None:
                first[digest] = v
            elif np.array_equal(_bytes(kept.const_value), _bytes(data)):
                v.replace_all_uses_with(kept)
                merged += 1
    return merged


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _merge_nodes(graph: Graph) -> int:
    outputs = {id(v) for v in graph.outputs}
    seen: Dict[Hashable, Node] = {}
    merged = 0
    for node in graph.nodes:
        key = _key(node)
        if key is None:
            continue
        kept = seen.get(key)
        if kept is None:
            seen[key] = node
            continue
        if any(id(v) in outputs for v in node.outputs):
            continue
        for old, new in zip(node.outputs, kept.outputs):
            if old.uses and not new.name:  # an optional output the kept node omits
                break
        else:
            for old, new in zip(node.outputs, kept.outputs):
                old.replace_all_uses_with(new)
            merged += 1
    return merged


def _key(node: Node) -> Optional[Hashable]:
    if (node.domain not in STANDARD_DOMAINS or node.op_type in NONDETERMINISTIC or not node.outputs
            or any(True for _ in node.subgraphs())):
        return None
    try:
        attrs = tuple(sorted((name, a.type, a.ref_attr_name, _attr_key(a.value))
                             for name, a in node.attributes.items()))
    except _Unhashable:
        return None
    ins = tuple(None if v is None else id(v) for v in node.inputs)
    outs = tuple(bool(v.name) for v in node.outputs)
    return (node.domain or "", node.op_type, node.overload, ins, outs, attrs)


def _attr_key(value) -> Hashable:
    if isinstance(value, bool) or isinstance(value, int):
        return ("i", int(value))
    if isinstance(value, float):
        return ("f", struct.pack("<d", value))
    if isinstance(value, (str, bytes)):
        return ("s", value)
    if isinstance(value, Tensor):
        data = np.ascontiguousarray(value.numpy())
        return ("t", str(value.dtype), value.shape, data.tobytes())
    if isinstance(value, (list, tuple)):
        return ("l",) + tuple(_attr_key(x) for x in value)
    raise _Unhashable(type(value).__name__)
