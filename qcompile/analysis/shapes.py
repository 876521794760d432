"""Shape inference: give values their types and shapes with ONNX's own inference.

The model is exported (qcompile.onnx_io.to_proto) and run through
`onnx.shape_inference.infer_shapes(..., data_prop=True)`, which also folds shape
arithmetic such as Shape -> Gather -> Reshape; the inferred types are copied back by
value name, subgraphs included. The graph's structure is never changed.

When whole-model inference raises (an op of a domain without opset import, a model too
large to serialise, a broken node), inference falls back to one node at a time in graph
order: a node whose inference fails is skipped and everything else is still typed.

Merging an inferred type with the type a value already has:
  1. no type yet: the inferred one;
  2. same ONNX element type: the existing element type and quantization parameters are
     kept (an int4 stored as int8 stays int4) and the shape is merged dimension by
     dimension (a number beats a symbol beats unknown); a different rank takes the
     inferred shape;
  3. a different element type: the inferred type (ONNX's op schemas are the authority);
  4. nothing inferred (custom-domain ops, non-tensor values): the value is left alone.
Symbols that ONNX invents for unknown dimensions (`unk__0`, ...) become unknown (None),
unless the model itself uses that name.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Set

import onnx

from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.types import TensorType, Type
from ..onnx_io import to_proto, type_from_proto, type_to_proto

__all__ = ["infer_shapes"]

_INVENTED = re.compile(r"unk__\d+")


def infer_shapes(model: Model) -> int:
    """Set the type of every value that ONNX shape inference can type, in place.

    Returns how many values gained a type or a more precise one. Never raises for
    models that inference cannot (fully) handle: what cannot be inferred keeps the type
    it had.
    """
    symbols = _symbols(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            to_proto(model), check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # onnx raises several types (InferenceError, ValueError, ...)
        return _infer_node_by_node(model, symbols)
    changed = 0
    for graph, gp in _pair_graphs(model.graph, inferred.graph):
        types = {vi.name: vi.type for vi in _declared(gp) if vi.name}
        for v in graph.values():
            tp = types.get(v.name)
            if tp is not None and _assign(v, tp, symbols):
                changed += 1
    return changed


def _declared(gp: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from gp.input
    yield from gp.value_info
    yield from gp.output


def _pair_graphs(graph: Graph, gp: onnx.GraphProto) -> Iterator[tuple]:
    """(Graph, GraphProto) pairs of a graph and its subgraphs: the exporter writes
    nodes and attributes in IR order and inference keeps that order."""
    yield graph, gp
    for node, np_ in zip(graph.nodes, gp.node):
        protos = [a.g for a in np_.attribute if a.type == onnx.AttributeProto.GRAPH]
        protos += [g for a in np_.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
        for sub, sub_proto in zip(node.subgraphs(), protos):
            yield from _pair_graphs(sub, sub_proto)


def _assign(value, tp: onnx.TypeProto, symbols: Set[str]) -> bool:
    """Merge the inferred `tp` into `value.type`; True when the type changed."""
    try:
        new = type_from_proto(tp, value.metadata_props)
    except ValueError:  # unreadable qcompile metadata: the verifier reports it
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
    rank = {int: 2, str: 1}
    if rank.get(type(new), 0) > rank.get(type(old), 0) or (type(new) is int and new != old):
        return new
    return old


def _symbols(model: Model) -> Set[str]:
    """The dimension names the model itself uses."""
    found: Set[str] = set()
    for g in model.graph.walk():
        for v in g.values():
            if isinstance(v.type, TensorType) and v.type.shape is not None:
                found.update(d for d in v.type.shape if isinstance(d, str))
    return found


# -- fallback: one node at a time ------------------------------------------------------
def _infer_node_by_node(model: Model, symbols: Set[str]) -> int:
    """Infer each node of the main graph from its inputs' types (and constant inputs'
    data, so Reshape targets held in initializers still resolve); nodes whose inference
    fails, or that have subgraphs, are skipped."""
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    versions = dict(model.opset_imports)
    graph = model.graph
    changed = 0
    for node in graph.nodes:
        if any(True for _ in node.subgraphs()):
            continue
        schema = _schema(node.op_type, node.domain, versions)
        if schema is None:
            continue
        types: Dict[str, onnx.TypeProto] = {}
        data: Dict[str, onnx.TensorProto] = {}
        for v in node.inputs:
            if v is None or not v.name:
                continue
            tp = type_to_proto(v.type)
            if tp is None:
                break  # an untyped input: the node cannot be inferred
            types[v.name] = tp
            if v.const is not None and _small(v.const.shape):
                data[v.name] = v.const.to_proto(v.name)
        else:
            try:
                out = onnx.shape_inference.infer_node_outputs(
                    schema, _node_proto(node), types, data, opset_imports=opsets, ir_version=model.ir_version)
            except Exception:  # this node cannot be inferred; go on with the others
                continue
            for v in node.outputs:
                if v.name in out and _assign(v, out[v.name], symbols):
                    changed += 1
    return changed


def _schema(op_type: str, domain: str, versions: Dict[str, int]):
    version = versions.get(domain, versions.get("ai.onnx") if domain == "" else None)
    if version is None:
        return None
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def _small(shape: tuple) -> bool:
    n = 1
    for d in shape:
        n *= d
    return n <= 1024


def _node_proto(node) -> onnx.NodeProto:
    """The NodeProto of one subgraph-free node (attributes through a one-node model)."""
    from ..ir.model import Model as _Model

    tiny = Graph("node")
    proto_model = _Model(tiny)
    proto = to_proto(proto_model)
    np_ = proto.graph.node.add()
    np_.op_type = node.op_type
    np_.domain = node.domain
    np_.name = node.name
    np_.input.extend("" if v is None else v.name for v in node.inputs)
    np_.output.extend(v.name for v in node.outputs)
    for a in node.attributes.values():
        np_.attribute.append(_attr_proto(a))
    return np_


def _attr_proto(a) -> onnx.AttributeProto:
    from ..onnx_io import exporter

    ap = onnx.AttributeProto()
    exporter._attr(a, ap, {})
    return ap


def _unused(_: List) -> None:  # pragma: no cover
    pass
