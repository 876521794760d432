"""ONNX -> IR.

Every opset the installed onnx knows is accepted and kept as it is. Whatever the IR
does not model (local functions, training info, sparse initializers, non-tensor types)
is kept as the proto it came as, so export gives back an equivalent model. Initializers
stay lazily-decoded TensorProtos; external data is read only when a pass asks.

The IR shares sub-messages (initializers, kept types) with the ModelProto it was built
from: `load` owns its proto, but a caller of `from_proto` must not change the proto
afterwards.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Set, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError
from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.node import Attr, Node
from ..ir.tensor import Tensor
from ..ir.types import OpaqueType, QuantParams, TensorType, Type, by_name, from_onnx
from ..ir.value import Value

__all__ = ["load", "from_proto", "type_from_proto", "DTYPE_KEY", "QUANT_KEY", "Declarations", "KeptInfo"]

AttrType = onnx.AttributeProto  # its AttributeType values as class attributes: plain ints, fast to read

# ValueInfo metadata keys through which integer types ONNX lacks (int3, ternary, ...)
# and quantization parameters survive the trip through an ONNX file.
DTYPE_KEY = "qcompile.dtype"
QUANT_KEY = "qcompile.quant"


@dataclasses.dataclass
class KeptInfo:
    """A ValueInfoProto that no Value can hold (a second declaration of a name, an
    outer-scope or unknown name): written back as it is while `value` still exists with
    the type it had after import, else regenerated from `value`."""

    proto: onnx.ValueInfoProto
    value: Optional[Value]
    type: Optional[Type] = None


@dataclasses.dataclass
class Declarations:
    """How a GraphProto declared its values (Graph.onnx_declarations): the value_info
    list in order (a value's name, whose Value holds the declaration, or a KeptInfo) and
    the graph outputs, by position, whose ValueInfoProto is kept."""

    value_info: List[Union[str, KeptInfo]] = dataclasses.field(default_factory=list)
    outputs: Dict[int, KeptInfo] = dataclasses.field(default_factory=dict)


def load(path: str) -> Model:
    """Read an ONNX file into the IR. External data stays on disk until needed."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError):
        if _looks_like_text(data):
            raise ModelLoadError(f"{path}: is a text file, not a binary ONNX model") from None
        raise ModelLoadError(
            f"{path}: not a valid ONNX model (protobuf parse failed): the file is truncated or corrupt"
        ) from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or IR version found)")
    model = from_proto(proto, base_dir=os.path.dirname(os.path.abspath(path)), source=path)
    model.path = path
    return model


def _looks_like_text(data: bytes) -> bool:
    """True when the start of `data` is UTF-8 text without control bytes."""
    text = data[:4096].decode("utf-8", errors="replace").rstrip("\ufffd")  # a character cut at the end
    return bool(text) and all(c != "\ufffd" and (c.isprintable() or c in "\t\r\n") for c in text)


def from_proto(proto: onnx.ModelProto, base_dir: str = "", source: str = "<model>") -> Model:
    """Build a Model from a ModelProto. `base_dir` resolves external-data paths."""
    opsets: Dict[str, int] = {}
    for op in proto.opset_import:
        opsets[op.domain] = int(op.version)
    importer = _GraphImporter(base_dir, source)
    graph = importer.run(proto.graph, collections.ChainMap())
    for kept in importer.kept:  # types are final only once every graph is read
        kept.type = None if kept.value is None else kept.value.type
    model = Model(graph, opsets, ir_version=int(proto.ir_version))
    model.opset_imports = opsets  # even when empty (Model would default it)
    model.producer_name = proto.producer_name
    model.producer_version = proto.producer_version
    model.domain = proto.domain
    model.model_version = int(proto.model_version)
    model.doc_string = proto.doc_string
    model.metadata_props = {p.key: p.value for p in proto.metadata_props}
    model.functions = list(proto.functions)
    model.training_info = list(proto.training_info)
    model.configuration = list(proto.configuration)
    return model


def type_from_proto(tp: onnx.TypeProto, metadata: Optional[Mapping[str, str]] = None) -> Optional[Type]:
    """The IR type of a TypeProto: a TensorType when the IR models everything in it,
    else an OpaqueType keeping the proto; None when no type is given. Raises ValueError
    for unreadable qcompile type metadata."""
    which = tp.WhichOneof("value")
    if which is None and not tp.denotation:
        return None
    if which == "tensor_type" and tp.tensor_type.elem_type in _KNOWN_ELEM_TYPES and not tp.denotation:
        tt = tp.tensor_type
        shape = None
        if tt.HasField("shape"):
            dims = []
            for d in tt.shape.dim:
                if d.denotation:
                    return OpaqueType(_copy(tp))
                kind = d.WhichOneof("value")
                dims.append(int(d.dim_value) if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
            shape = tuple(dims)
        dtype = from_onnx(tt.elem_type)
        quant = None
        if metadata:
            if DTYPE_KEY in metadata:
                dtype = by_name(metadata[DTYPE_KEY])
            if QUANT_KEY in metadata:
                try:
                    q = json.loads(metadata[QUANT_KEY])
                    quant = QuantParams(np.asarray(q["scale"], np.float32), np.asarray(q["zero_point"], np.int64),
                                        q.get("axis"))
                except (TypeError, KeyError, json.JSONDecodeError) as e:
                    raise ValueError(f"unreadable {QUANT_KEY} metadata ({e})") from None
        return TensorType(dtype, shape, quant)
    return OpaqueType(_copy(tp))


# Element types this onnx knows (others, from newer files, keep their TypeProto).
_KNOWN_ELEM_TYPES = frozenset(code for code in onnx.TensorProto.DataType.values() if code != onnx.TensorProto.UNDEFINED)


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


class _GraphImporter:
    """Builds a Graph from a GraphProto, subgraphs included, resolving names through the
    enclosing scopes so that captured outer values list their inner uses."""

    def __init__(self, base_dir: str, source: str):
        self.base_dir = base_dir
        self.source = source
        self.kept: List[KeptInfo] = []

    def run(self, gp: onnx.GraphProto, outer: collections.ChainMap) -> Graph:
        g = Graph(gp.name)
        g.doc_string = gp.doc_string
        g.metadata_props = {p.key: p.value for p in gp.metadata_props}
        g.quantization_annotation = list(gp.quantization_annotation)
        local: Dict[str, Value] = {}
        scope = outer.new_child(local)

        for vi in gp.input:
            v = Value(vi.name)
            self._apply_info(v, vi)
            v._graph = g
            g.inputs.append(v)
            local[vi.name] = v
        inputs = dict(local)
        for tp in gp.initializer:
            v = inputs.get(tp.name)
            if v is None:
                v = Value(tp.name, _tensor_type(tp.data_type, tp.dims))
                local[tp.name] = v
            v.const = Tensor.from_proto(tp, self.base_dir)
            v._graph = g
            g.initializers[tp.name] = v
        for sp in gp.sparse_initializer:
            name = sp.values.name
            v = local.get(name) or Value(name, _tensor_type(sp.values.data_type, sp.dims))
            v._graph = g
            local[name] = v
            g.sparse_initializers[name] = (v, sp)

        # Declare every node output first, so inputs can be resolved even in an
        # unsorted graph (the verifier reports the order problem, with a fix).
        outputs_of = []
        for np_ in gp.node:
            outs = []
            for name in np_.output:
                v = Value(name)
                if name:
                    local[name] = v
                outs.append(v)
            outputs_of.append(outs)

        for np_, outs in zip(gp.node, outputs_of):
            g._nodes.append(self._node(np_, outs, scope, g, gp.name))

        self._declarations(gp, g, local, scope, declared={id(v) for v in g.inputs})
        return g

    def _node(self, np_: onnx.NodeProto, outs: List[Value], scope: collections.ChainMap, g: Graph,
              graph_name: str) -> Node:
        inputs = []
        for i, name in enumerate(np_.input):
            if not name:
                inputs.append(None)
                continue
            v = scope.get(name)
            if v is None:
                label = f"'{np_.name}' ({np_.op_type})" if np_.name else f"<unnamed {np_.op_type}>"
                raise ModelLoadError(
                    f"{self.source}: node {label} input {i} {name!r} is not defined by any graph input, "
                    f"initializer or node output in graph '{graph_name}'"
                )
            inputs.append(v)
        attrs = {a.name: self._attr(a, scope) for a in np_.attribute}
        node = Node(np_.op_type, inputs, attrs, outputs=outs, domain=np_.domain, name=np_.name)
        node.overload = np_.overload
        node.doc_string = np_.doc_string
        node.metadata_props = {p.key: p.value for p in np_.metadata_props}
        node.device_configurations = list(np_.device_configurations)
        node._graph = g
        if any(a.type in (AttrType.GRAPH, AttrType.GRAPHS) for a in attrs.values()):
            for sub in node.subgraphs():
                sub.parent = node
        return node

    def _declarations(self, gp: onnx.GraphProto, g: Graph, local: Dict[str, Value], scope: collections.ChainMap,
                      declared: Set[int]) -> None:
        """Apply the outputs' and value_info's ValueInfoProtos to the values they declare.

        A graph output declares its value when that is a node output or a non-input
        initializer of this graph not declared before; a value_info entry likewise,
        when its value is not also a graph output. Every other entry (a graph input
        repeated as output, an outer-scope or unknown name, a repeat) is kept as it is.
        """
        decls = Declarations()
        for i, vi in enumerate(gp.output):
            v = scope.get(vi.name)
            if v is None:
                raise ModelLoadError(
                    f"{self.source}: graph '{gp.name}' output {vi.name!r} is not defined by any input, initializer or node"
                )
            g.outputs.append(v)
            if vi.name in local and id(v) not in declared:
                declared.add(id(v))
                self._apply_info(v, vi)
            else:
                decls.outputs[i] = self._keep(vi, v)
        for vi in gp.value_info:
            v = scope.get(vi.name)
            if vi.name in local and id(v) not in declared:
                declared.add(id(v))
                self._apply_info(v, vi)
                decls.value_info.append(vi.name)
            else:
                decls.value_info.append(self._keep(vi, v))
        g.onnx_declarations = decls

    def _keep(self, vi: onnx.ValueInfoProto, v: Optional[Value]) -> KeptInfo:
        kept = KeptInfo(vi, v)
        self.kept.append(kept)
        return kept

    def _apply_info(self, v: Value, vi: onnx.ValueInfoProto) -> None:
        meta = {p.key: p.value for p in vi.metadata_props}
        try:
            v.type = type_from_proto(vi.type, meta)
        except ValueError as e:
            raise ModelLoadError(f"{self.source}: value {vi.name!r}: {e}") from None
        v.doc_string = vi.doc_string
        v.metadata_props = {k: x for k, x in meta.items() if k not in (DTYPE_KEY, QUANT_KEY)}

    def _attr(self, a: onnx.AttributeProto, scope: collections.ChainMap) -> Attr:
        t = a.type or _infer_type(a)
        if t == AttrType.FLOAT:
            value = a.f
        elif t == AttrType.INT:
            value = a.i
        elif t == AttrType.STRING:
            value = _decode(a.s)
        elif t == AttrType.TENSOR:
            value = Tensor.from_proto(a.t, self.base_dir)
        elif t == AttrType.GRAPH:
            value = self.run(a.g, scope)
        elif t == AttrType.SPARSE_TENSOR:
            value = _copy(a.sparse_tensor)
        elif t == AttrType.TYPE_PROTO:
            value = _copy(a.tp)
        elif t == AttrType.FLOATS:
            value = list(a.floats)
        elif t == AttrType.INTS:
            value = list(a.ints)
        elif t == AttrType.STRINGS:
            value = [_decode(s) for s in a.strings]
        elif t == AttrType.TENSORS:
            value = [Tensor.from_proto(x, self.base_dir) for x in a.tensors]
        elif t == AttrType.GRAPHS:
            value = [self.run(x, scope) for x in a.graphs]
        elif t == AttrType.SPARSE_TENSORS:
            value = [_copy(x) for x in a.sparse_tensors]
        elif t == AttrType.TYPE_PROTOS:
            value = [_copy(x) for x in a.type_protos]
        else:
            value = None
        return Attr(a.name, t, value, a.doc_string, a.ref_attr_name)


def _tensor_type(elem_type: int, dims) -> Optional[TensorType]:
    """The type of an initializer (None for an element type this onnx does not know)."""
    if elem_type not in _KNOWN_ELEM_TYPES:
        return None
    return TensorType(from_onnx(elem_type), tuple(int(d) for d in dims))


def _decode(s: bytes):
    try:
        return s.decode("utf-8")
    except UnicodeDecodeError:
        return s


def _infer_type(a: onnx.AttributeProto) -> int:
    """Old models leave AttributeProto.type unset; tell it from the field in use."""
    for field, t in (("f", AttrType.FLOAT), ("i", AttrType.INT), ("s", AttrType.STRING), ("t", AttrType.TENSOR),
                     ("g", AttrType.GRAPH), ("sparse_tensor", AttrType.SPARSE_TENSOR), ("tp", AttrType.TYPE_PROTO)):
        if a.HasField(field):
            return t
    for field, t in (("floats", AttrType.FLOATS), ("ints", AttrType.INTS), ("strings", AttrType.STRINGS),
                     ("tensors", AttrType.TENSORS), ("graphs", AttrType.GRAPHS)):
        if len(getattr(a, field)):
            return t
    return AttrType.UNDEFINED
