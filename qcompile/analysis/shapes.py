"""Shape inference: give values their types and shapes with ONNX's own inference.

The model is exported (qcompile.onnx_io.to_proto) and run through
`onnx.shape_inference.infer_shapes(..., data_prop=True)`, which also folds shape
arithmetic such as Shape -> Gather -> Reshape; the inferred types are copied back by
value name, subgraphs included. The graph's structure is never changed.

What inference is given differs from a plain export in two ways, neither of which
changes a result:
  * initializers with more than `_DATA_LIMIT` elements go in as typed graph inputs, not
    as data: shapes never depend on large weights, and this keeps multi-GB models under
    protobuf's 2 GB limit and avoids copying their weights four times;
  * custom domains that nodes use without an opset import get one (version 1), since
    ONNX otherwise refuses the whole model instead of skipping those nodes.
When whole-model inference still raises, it falls back to one node at a time in graph
order: a node whose inference fails is skipped and everything else is still typed.

Merging an inferred type with the type a value already has:
  1. no type yet: the inferred one;
  2. same ONNX element type: the existing element type and quantization parameters are
     kept (an int4 stored as int8 stays int4) and the shape is merged dimension by
     dimension (a number beats a symbol beats unknown); a different rank takes the
     inferred shape;
  3. a different element type: the inferred type (ONNX's op schemas are the authority);
  4. nothing inferred (custom-domain ops, non-tensor values) or an undefined element
     type: the value is left alone.
Symbols that ONNX invents for unknown dimensions (`unk__0`, ...) become unknown (None),
unless the model itself uses that name.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Optional, Set, Tuple

import numpy as np
import onnx

from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.types import TensorType, Type
from ..ir.value import Value
from ..onnx_io import to_proto, type_from_proto, type_to_proto

__all__ = ["infer_shapes"]

_INVENTED = re.compile(r"unk__\d+")
_DATA_LIMIT = 1024  # initializers up to this many elements are given to inference as data


def infer_shapes(model: Model) -> int:
    """Set the type of every value that ONNX shape inference can type, in place.

    Returns how many values gained a type or a more precise one. Never raises for a
    model that inference cannot (fully) handle: what cannot be inferred keeps the type
    it had.
    """
    symbols = _symbols(model)
    proto = to_proto(model, weights_as_inputs_over=_DATA_LIMIT)
    _import_missing_domains(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # onnx raises InferenceError, ValidationError, ValueError, ...
        return _infer_node_by_node(model, proto, symbols)
    changed = 0
    for graph, gp in _pair_graphs(model.graph, inferred.graph):
        types = {vi.name: vi.type for vi in _declared(gp) if vi.name}
        for v in graph.values():
            tp = types.get(v.name)
            if tp is not None and _assign(v, tp, symbols):
                changed += 1
    return changed


def _import_missing_domains(proto: onnx.ModelProto) -> None:
    """Import the custom domains nodes use without an opset import (else onnx rejects
    the whole model)."""
    imported = {op.domain for op in proto.opset_import}
    if "ai.onnx" in imported:
        imported.add("")
    for domain in sorted({n.domain for g in _graph_protos(proto.graph) for n in g.node} - imported):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def _graph_protos(gp: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield gp
    for np_ in gp.node:
        for _, sub in _subgraph_protos(np_):
            yield from _graph_protos(sub)


def _subgraph_protos(np_: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    for a in np_.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                yield a.name, g


def _declared(gp: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from gp.input
    yield from gp.value_info
    yield from gp.output


def _pair_graphs(graph: Graph, gp: onnx.GraphProto) -> Iterator[Tuple[Graph, onnx.GraphProto]]:
    """(Graph, GraphProto) pairs of a graph and its subgraphs: the exporter writes nodes
    and attributes in IR order, and inference keeps that order."""
    yield graph, gp
    for node, np_ in zip(graph.nodes, gp.node):
        for sub, (_, sub_proto) in zip(node.subgraphs(), _subgraph_protos(np_)):
            yield from _pair_graphs(sub, sub_proto)


def _assign(value: Value, tp: onnx.TypeProto, symbols: Set[str]) -> bool:
    """Merge the inferred `tp` into `value.type`; True when the type changed."""
    if tp.WhichOneof("value") == "tensor_type" and tp.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
        return False  # inference knew nothing about this tensor
    try:
        new = type_from_proto(tp, value.metadata_props)
    except ValueError:  # unreadable qcompile type metadata: the verifier reports it
        return False
    if isinstance(new, TensorType) and new.shape is not None:
        new = new.with_shape([None if isinstance(d, str) and d not in symbols and _INVENTED.fullmatch(d) else d
                              for d in new.shape])
    merged = _merge(value.type, new)
    if merged is None or merged == value.type:
        return False
    value.type = merged
    return True


def _merge(old: Optional[Type], new: Optional[Type]) -> Optional[Type]:
    if new is None or old is None:
        return old if new is None else new
    if not (isinstance(old, TensorType) and isinstance(new, TensorType)):
        return old
    if old.dtype.onnx_type != new.dtype.onnx_type:
        return new
    if new.shape is None or old.shape is None:
        return old if new.shape is None else old.with_shape(new.shape)
    if len(old.shape) != len(new.shape):
        return old.with_shape(new.shape)
    return old.with_shape([_better_dim(a, b) for a, b in zip(old.shape, new.shape)])


def _better_dim(old, new):
    """A known size beats a symbol beats unknown; a different known size wins."""
    rank = {int: 2, str: 1}
    if rank.get(type(new), 0) > rank.get(type(old), 0) or (type(new) is int and new != old):
        return new
    return old


def _symbols(model: Model) -> Set[str]:
    """The dimension names the model itself uses."""
    return {d for g in model.graph.walk() for v in g.values()
            if isinstance(v.type, TensorType) and v.type.shape is not None
            for d in v.type.shape if isinstance(d, str)}


# -- fallback: one node at a time ------------------------------------------------------
def _infer_node_by_node(model: Model, proto: onnx.ModelProto, symbols: Set[str]) -> int:
    """Infer each main-graph node from its inputs' current types and the data of small
    constants (initializers, Constant nodes), so Reshape targets still resolve. Nodes
    that fail, have no schema, or hold subgraphs are skipped."""
    opsets = list(proto.opset_import)
    versions = {op.domain: op.version for op in opsets}
    data: Dict[str, onnx.TensorProto] = {t.name: t for t in proto.graph.initializer
                                         if int(np.prod(t.dims, dtype=np.int64)) <= _DATA_LIMIT}
    changed = 0
    for node, np_ in zip(model.graph.nodes, proto.graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in np_.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    data[np_.output[0]] = a.t
        if any(True for _ in _subgraph_protos(np_)):
            continue
        schema = _schema(np_.op_type, np_.domain, versions)
        types = {v.name: type_to_proto(v.type) for v in node.inputs if v is not None and v.type is not None}
        if schema is None or any(v is not None and v.name not in types for v in node.inputs):
            continue
        try:
            out = onnx.shape_inference.infer_node_outputs(
                schema, np_, types, {k: data[k] for k in np_.input if k in data},
                opset_imports=opsets, ir_version=proto.ir_version)
        except Exception:  # this node cannot be inferred: go on with the others
            continue
        for v in node.outputs:
            if v.name in out and _assign(v, out[v.name], symbols):
                changed += 1
    return changed


def _schema(op_type: str, domain: str, versions: Dict[str, int]) -> Optional[onnx.defs.OpSchema]:
    version = versions.get(domain)
    if version is None and domain in ("", "ai.onnx"):
        version = versions.get("ai.onnx" if domain == "" else "")
    if version is None:
        return None
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None
