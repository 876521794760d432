"""IR -> ONNX.

The inverse of the importer: untouched initializers are written as the protos they were
read as, types the ONNX type system lacks travel in ValueInfo metadata, and files are
written atomically (model and external-data files appear together or not at all).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import external_data_helper

from .._fileio import atomic_path
from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.node import Attr
from ..ir.tensor import Tensor
from ..ir.types import OpaqueType, TensorType, Type
from ..ir.value import Value
from .importer import DTYPE_KEY, QUANT_KEY

__all__ = ["to_proto", "save", "type_to_proto"]

AttrType = onnx.AttributeProto.AttributeType


def to_proto(model: Model) -> onnx.ModelProto:
    """The ModelProto of `model`. External initializers keep their external reference
    (relative to the model's original folder)."""
    mp = onnx.ModelProto()
    mp.ir_version = model.ir_version
    for domain, version in model.opset_imports.items():
        op = mp.opset_import.add()
        op.domain = domain
        op.version = version
    if model.producer_name:
        mp.producer_name = model.producer_name
    if model.producer_version:
        mp.producer_version = model.producer_version
    if model.domain:
        mp.domain = model.domain
    if model.model_version:
        mp.model_version = model.model_version
    if model.doc_string:
        mp.doc_string = model.doc_string
    _set_props(mp.metadata_props, model.metadata_props)
    mp.graph.CopyFrom(_export_graph(model.graph))
    mp.functions.extend(model.functions)
    mp.training_info.extend(model.training_info)
    mp.configuration.extend(model.configuration)
    return mp


def type_to_proto(t: Optional[Type]) -> Optional[onnx.TypeProto]:
    """The TypeProto of an IR type (None for an unknown type)."""
    if t is None:
        return None
    if isinstance(t, OpaqueType):
        return t.proto
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = t.dtype.onnx_type
    if t.shape is not None:
        shape = tp.tensor_type.shape
        shape.SetInParent()
        for d in t.shape:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
    return tp


def save(model: Model, path: str) -> None:
    """Write `model` to `path` atomically. Initializers stored as external data are
    written to external-data files beside `path` (same relative locations)."""
    proto = to_proto(model)
    external = _external_tensors(proto)
    out_dir = os.path.dirname(os.path.abspath(path))
    with contextlib.ExitStack() as stack:
        if external:
            _write_external(external, _external_sources(model), out_dir, stack)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())


# -- graphs --------------------------------------------------------------------------
def _export_graph(g: Graph) -> onnx.GraphProto:
    gp = onnx.GraphProto()
    gp.name = g.name
    if g.doc_string:
        gp.doc_string = g.doc_string
    _set_props(gp.metadata_props, g.metadata_props)
    for v in g.inputs:
        gp.input.append(_value_info(v))
    for name, v in g.initializers.items():
        gp.initializer.append(v.const.to_proto(name))
    for _, sp in g.sparse_initializers.values():
        gp.sparse_initializer.append(sp)
    outputs = {id(v) for v in g.outputs}
    for n in g.nodes:
        npb = gp.node.add()
        npb.input.extend("" if v is None else v.name for v in n.inputs)
        npb.output.extend(v.name for v in n.outputs)
        if n.name:
            npb.name = n.name
        npb.op_type = n.op_type
        if n.domain:
            npb.domain = n.domain
        if n.overload:
            npb.overload = n.overload
        if n.doc_string:
            npb.doc_string = n.doc_string
        for a in n.attributes.values():
            npb.attribute.append(_attr(a))
        _set_props(npb.metadata_props, n.metadata_props)
        npb.device_configurations.extend(n.device_configurations)
        for v in n.outputs:
            if v.name and v.type is not None and id(v) not in outputs:
                gp.value_info.append(_value_info(v))
    for v in g.outputs:
        gp.output.append(_value_info(v))
    gp.quantization_annotation.extend(g.quantization_annotation)
    return gp


def _value_info(v: Value) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = v.name
    tp = type_to_proto(v.type)
    if tp is not None:
        vi.type.CopyFrom(tp)
    if v.doc_string:
        vi.doc_string = v.doc_string
    props = dict(v.metadata_props)
    if isinstance(v.type, TensorType):
        if not v.type.dtype.is_onnx_native:
            props[DTYPE_KEY] = v.type.dtype.name
        q = v.type.quant
        if q is not None:
            props[QUANT_KEY] = json.dumps(
                {"scale": q.scale.tolist(), "zero_point": q.zero_point.tolist(), "axis": q.axis}
            )
    _set_props(vi.metadata_props, props)
    return vi


def _set_props(field, props: Dict[str, str]) -> None:
    for k, val in props.items():
        e = field.add()
        e.key = k
        e.value = val


def _attr(a: Attr) -> onnx.AttributeProto:
    ap = onnx.AttributeProto()
    ap.name = a.name
    ap.type = a.type
    if a.doc_string:
        ap.doc_string = a.doc_string
    if a.ref_attr_name:
        ap.ref_attr_name = a.ref_attr_name
    v, t = a.value, a.type
    if t == AttrType.FLOAT:
        ap.f = v
    elif t == AttrType.INT:
        ap.i = v
    elif t == AttrType.STRING:
        ap.s = _encode(v)
    elif t == AttrType.TENSOR:
        ap.t.CopyFrom(_tensor(v))
    elif t == AttrType.GRAPH:
        ap.g.CopyFrom(_export_graph(v))
    elif t == AttrType.SPARSE_TENSOR:
        ap.sparse_tensor.CopyFrom(v)
    elif t == AttrType.TYPE_PROTO:
        ap.tp.CopyFrom(v)
    elif t == AttrType.FLOATS:
        ap.floats.extend(v)
    elif t == AttrType.INTS:
        ap.ints.extend(v)
    elif t == AttrType.STRINGS:
        ap.strings.extend(_encode(s) for s in v)
    elif t == AttrType.TENSORS:
        ap.tensors.extend(_tensor(x) for x in v)
    elif t == AttrType.GRAPHS:
        ap.graphs.extend(_export_graph(x) for x in v)
    elif t == AttrType.SPARSE_TENSORS:
        ap.sparse_tensors.extend(v)
    elif t == AttrType.TYPE_PROTOS:
        ap.type_protos.extend(v)
    return ap


def _tensor(t: Tensor) -> onnx.TensorProto:
    return t.to_proto(t.proto.name if t.proto is not None else "")


def _encode(s) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8")


# -- external data -------------------------------------------------------------------
def _external_tensors(proto: onnx.ModelProto) -> List[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(proto) if external_data_helper.uses_external_data(t)]


def _external_sources(model: Model) -> Dict[str, str]:
    """Folder each external-data location is read from, from the IR's tensors."""
    sources: Dict[str, str] = {}
    for g in model.graph.walk():
        tensors = [v.const for v in g.initializers.values()]
        for n in g.nodes:
            for a in n.attributes.values():
                vals = a.value if isinstance(a.value, list) else [a.value]
                tensors += [t for t in vals if isinstance(t, Tensor)]
        for t in tensors:
            if t.is_external:
                sources.setdefault(external_data_helper.ExternalDataInfo(t.proto).location, t.base_dir)
    return sources


def _write_external(tensors: List[onnx.TensorProto], sources: Dict[str, str], out_dir: str,
                    stack: contextlib.ExitStack) -> None:
    """Copy each external tensor's bytes into files under `out_dir` with the same
    relative locations, updating offsets; the files are renamed into place only when
    the whole save succeeds."""
    blobs = []
    for t in tensors:
        info = external_data_helper.ExternalDataInfo(t)
        path = os.path.join(sources.get(info.location, out_dir), info.location)
        with open(path, "rb") as f:
            f.seek(int(info.offset or 0))
            blobs.append(f.read(int(info.length)) if info.length else f.read())
    files: Dict[str, object] = {}
    for t, data in zip(tensors, blobs):
        location = external_data_helper.ExternalDataInfo(t).location
        if location not in files:
            target = os.path.join(out_dir, location)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = stack.enter_context(atomic_path(target))
            files[location] = stack.enter_context(open(tmp, "wb"))
        f = files[location]
        offset = f.tell()
        f.write(data)
        del t.external_data[:]
        external_data_helper.set_external_data(t, location, offset=offset, length=len(data))
