"""ONNX -> IR.

Every opset the installed onnx knows is accepted and kept as it is. Whatever the IR
does not model (local functions, training info, sparse initializers, non-tensor types)
is kept as the proto it came as, so export gives back an equivalent model. Initializers
stay lazily-decoded TensorProtos; external data is read only when a pass asks.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, Mapping, Optional

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

__all__ = ["load", "from_proto", "type_from_proto", "DTYPE_KEY", "QUANT_KEY"]

AttrType = onnx.AttributeProto.AttributeType

# ValueInfo metadata keys through which integer types ONNX lacks (int3, ternary, ...)
# and quantization parameters survive the trip through an ONNX file.
DTYPE_KEY = "qcompile.dtype"
QUANT_KEY = "qcompile.quant"


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
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: {e}); is the file truncated?") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or IR version found)")
    model = from_proto(proto, base_dir=os.path.dirname(os.path.abspath(path)), source=path)
    model.path = path
    return model


def from_proto(proto: onnx.ModelProto, base_dir: str = "", source: str = "<model>") -> Model:
    """Build a Model from a ModelProto. `base_dir` resolves external-data paths."""
    opsets: Dict[str, int] = {}
    for op in proto.opset_import:
        opsets[op.domain] = int(op.version)
    graph = _GraphImporter(base_dir, source).run(proto.graph, collections.ChainMap())
    model = Model(graph, opsets, ir_version=int(proto.ir_version))
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
    else an OpaqueType keeping the proto; None when no type is given."""
    which = tp.WhichOneof("value")
    if which is None and not tp.denotation:
        return None
    if which == "tensor_type" and tp.tensor_type.elem_type and not tp.denotation:
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
                q = json.loads(metadata[QUANT_KEY])
                quant = QuantParams(np.asarray(q["scale"], np.float32), np.asarray(q["zero_point"], np.int64), q.get("axis"))
        return TensorType(dtype, shape, quant)
    return OpaqueType(_copy(tp))


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


class _GraphImporter:
    def __init__(self, base_dir: str, source: str):
        self.base_dir = base_dir
        self.source = source

    def run(self, gp: onnx.GraphProto, outer: collections.ChainMap) -> Graph:
        g = Graph(gp.name)
        g.doc_string = gp.doc_string
        g.metadata_props = {p.key: p.value for p in gp.metadata_props}
        g.quantization_annotation = list(gp.quantization_annotation)
        local: Dict[str, Value] = {}
        scope = outer.new_child(local)

        for vi in gp.input:
            v = self._value_from_info(vi)
            v._graph = g
            g.inputs.append(v)
            local[vi.name] = v
        for tp in gp.initializer:
            v = local.get(tp.name)
            if v is None or not any(x is v for x in g.inputs):
                v = Value(tp.name, TensorType(from_onnx(tp.data_type), tuple(int(d) for d in tp.dims)))
                local[tp.name] = v
            v.const = Tensor.from_proto(tp, self.base_dir)
            v._graph = g
            g.initializers[tp.name] = v
        for sp in gp.sparse_initializer:
            name = sp.values.name
            v = local.get(name) or Value(name, TensorType(from_onnx(sp.values.data_type), tuple(int(d) for d in sp.dims)))
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

        for vi in gp.value_info:
            v = local.get(vi.name)
            if v is not None and v.producer is None and v.name not in g.initializers and not v.is_graph_input:
                self._apply_info(v, vi)
        for np_, outs in zip(gp.node, outputs_of):
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
                        f"initializer or node output in graph '{gp.name}'"
                    )
                inputs.append(v)
            attrs = {a.name: self._attr(a, scope) for a in np_.attribute}
            node = Node(np_.op_type, inputs, attrs, outputs=outs, domain=np_.domain, name=np_.name)
            node.overload = np_.overload
            node.doc_string = np_.doc_string
            node.metadata_props = {p.key: p.value for p in np_.metadata_props}
            node.device_configurations = list(np_.device_configurations)
            node._graph = g
            for sub in node.subgraphs():
                sub.parent = node
            g._nodes.append(node)

        value_info = {vi.name: vi for vi in gp.value_info}
        for vi in value_info.values():
            v = local.get(vi.name)
            if v is not None and v.producer is not None:
                self._apply_info(v, vi)
        for vi in gp.output:
            v = scope.get(vi.name)
            if v is None:
                raise ModelLoadError(
                    f"{self.source}: graph '{gp.name}' output {vi.name!r} is not defined by any input, initializer or node"
                )
            self._apply_info(v, vi)
            g.outputs.append(v)
        return g

    def _value_from_info(self, vi: onnx.ValueInfoProto) -> Value:
        v = Value(vi.name)
        self._apply_info(v, vi)
        return v

    @staticmethod
    def _apply_info(v: Value, vi: onnx.ValueInfoProto) -> None:
        meta = {p.key: p.value for p in vi.metadata_props}
        v.type = type_from_proto(vi.type, meta)
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
