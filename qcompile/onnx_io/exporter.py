"""IR -> ONNX.

The inverse of the importer: untouched initializers are written as the protos they were
read as, value_info and output declarations come back in their imported order, types the
ONNX type system lacks travel in ValueInfo metadata, and files are written atomically
(model and external-data files appear together or not at all).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Dict, Optional, Set

import onnx
from onnx import external_data_helper

from .._fileio import atomic_path
from ..errors import QCompileError
from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.node import Attr
from ..ir.tensor import Tensor
from ..ir.types import OpaqueType, TensorType, Type, from_onnx
from ..ir.value import Value
from .importer import DTYPE_KEY, QUANT_KEY, Declarations, KeptInfo

__all__ = ["to_proto", "save", "type_to_proto"]

AttrType = onnx.AttributeProto  # its AttributeType values as class attributes: plain ints, fast to read


def to_proto(model: Model, weights_as_inputs_over: Optional[int] = None) -> onnx.ModelProto:
    """The ModelProto of `model`. External initializers keep their external reference
    (relative to the folder the model was loaded from): write files with `save`.

    With `weights_as_inputs_over=N`, main-graph initializers of more than N elements are
    written as typed graph inputs without their data: a light model for shape inference,
    or for running with the weights fed from the IR's own arrays (no copy is made)."""
    return _to_proto(model, {}, weights_as_inputs_over)


def _to_proto(model: Model, external: Dict[str, str], inputs_over: Optional[int] = None) -> onnx.ModelProto:
    """to_proto, also filling `external` with {location: file it is read from now} for
    every external-data file the model's tensors refer to."""
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
    _export_graph(model.graph, mp.graph, external, inputs_over)
    mp.functions.extend(model.functions)
    mp.training_info.extend(model.training_info)
    mp.configuration.extend(model.configuration)
    return mp


def type_to_proto(t: Optional[Type]) -> Optional[onnx.TypeProto]:
    """The TypeProto of an IR type (None for an unknown type)."""
    if t is None:
        return None
    tp = onnx.TypeProto()
    _write_type(t, tp)
    return tp


def _write_type(t: Type, tp: onnx.TypeProto) -> None:
    """Fill the empty TypeProto `tp` with `t`."""
    if isinstance(t, OpaqueType):
        tp.CopyFrom(t.proto)
        return
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


def save(model: Model, path: str) -> None:
    """Write `model` to `path` atomically. The external-data files its initializers
    read from are copied byte for byte beside `path`, at the same relative locations,
    so every external reference stays valid unchanged."""
    external: Dict[str, str] = {}
    proto = _to_proto(model, external)
    out_dir = os.path.dirname(os.path.abspath(path))
    with contextlib.ExitStack() as stack:
        for location, source in external.items():
            target = os.path.join(out_dir, location)
            if os.path.abspath(source) == os.path.abspath(target):
                continue  # saving beside the original: the file is already there
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = stack.enter_context(atomic_path(target))
            try:
                shutil.copyfile(source, tmp)
            except OSError as e:
                raise QCompileError(f"cannot copy external data {source} to {target}: {e.strerror}") from None
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())


# -- graphs --------------------------------------------------------------------------
def _export_graph(g: Graph, gp: onnx.GraphProto, external: Dict[str, str], inputs_over: Optional[int] = None) -> None:
    """Fill the empty GraphProto `gp` from `g` (in place, so nothing is copied twice),
    noting external-data files in `external`; initializers of more than `inputs_over`
    elements become typed inputs without data."""
    gp.name = g.name
    if g.doc_string:
        gp.doc_string = g.doc_string
    _set_props(gp.metadata_props, g.metadata_props)
    for v in g.inputs:
        gp.input.append(_value_info(v))
    for name, v in g.initializers.items():
        if inputs_over is not None and v.const.numel > inputs_over:
            if not v.is_graph_input:
                gp.input.append(onnx.helper.make_tensor_value_info(name, v.const.dtype.onnx_type, list(v.const.shape)))
            continue
        gp.initializer.append(_tensor(v.const, name, external))
    for _, sp in g.sparse_initializers.values():
        gp.sparse_initializer.append(sp)
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
            _attr(a, npb.attribute.add(), external)
        _set_props(npb.metadata_props, n.metadata_props)
        npb.device_configurations.extend(n.device_configurations)
    _export_value_info(g, gp)
    decls = g.onnx_declarations or Declarations()
    for i, v in enumerate(g.outputs):
        kept = decls.outputs.get(i)
        if kept is not None and kept.proto.name == v.name and _unchanged(kept):
            gp.output.append(kept.proto)
        else:
            gp.output.append(_value_info(v))
    gp.quantization_annotation.extend(g.quantization_annotation)


def _export_value_info(g: Graph, gp: onnx.GraphProto) -> None:
    """value_info: the imported entries in their order (kept ones while they still
    describe their value, or name nothing known); then the initializers whose type says
    more than their tensor (an int4 or quantized type, a doc string); then every other
    typed node output. Graph inputs and outputs carry their own declarations."""
    outputs = {id(v) for v in g.outputs}
    local: Dict[str, Value] = {v.name: v for v in g.initializers.values()}
    local.update((v.name, v) for n in g.nodes for v in n.outputs if v.name)
    written: Set[str] = set()
    for entry in (g.onnx_declarations or Declarations()).value_info:
        if isinstance(entry, KeptInfo):
            if entry.value is None or _unchanged(entry):
                gp.value_info.append(entry.proto)
            continue
        v = local.get(entry)
        if v is not None and id(v) not in outputs and entry not in written:
            written.add(entry)
            gp.value_info.append(_value_info(v))
    inputs = {id(v) for v in g.inputs}
    for name, v in g.initializers.items():
        if id(v) not in inputs and id(v) not in outputs and name not in written and _says_more(v):
            gp.value_info.append(_value_info(v))
    for n in g.nodes:
        for v in n.outputs:
            if v.name and v.type is not None and id(v) not in outputs and v.name not in written:
                gp.value_info.append(_value_info(v))


def _says_more(v: Value) -> bool:
    """True when an initializer's declaration holds more than the TensorProto written
    for it (whose element type is the ONNX container of an int3 or ternary tensor)."""
    return bool(v.doc_string or v.metadata_props) or (
        v.type is not None and v.type != TensorType(from_onnx(v.const.dtype.onnx_type), v.const.shape))


def _unchanged(kept: KeptInfo) -> bool:
    """True while the kept declaration still describes its value: the value exists under
    the same name with the type it had after import."""
    v = kept.value
    return v is not None and v.owning_graph() is not None and v.name == kept.proto.name and v.type == kept.type


def _value_info(v: Value) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = v.name
    if v.type is not None:
        _write_type(v.type, vi.type)
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


def _attr(a: Attr, ap: onnx.AttributeProto, external: Dict[str, str]) -> None:
    """Fill the empty AttributeProto `ap` from `a`."""
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
        ap.t.CopyFrom(_tensor(v, v.proto.name if v.proto is not None else "", external))
    elif t == AttrType.GRAPH:
        _export_graph(v, ap.g, external)
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
        ap.tensors.extend(_tensor(x, x.proto.name if x.proto is not None else "", external) for x in v)
    elif t == AttrType.GRAPHS:
        for x in v:
            _export_graph(x, ap.graphs.add(), external)
    elif t == AttrType.SPARSE_TENSORS:
        ap.sparse_tensors.extend(v)
    elif t == AttrType.TYPE_PROTOS:
        ap.type_protos.extend(v)


def _tensor(t: Tensor, name: str, external: Dict[str, str]) -> onnx.TensorProto:
    """The TensorProto of `t` named `name`, noting its external-data file if it has one."""
    if t.is_external:
        location = external_data_helper.ExternalDataInfo(t.proto).location
        source = os.path.abspath(t.external_path())
        if external.setdefault(location, source) != source:
            raise QCompileError(
                f"external data location {location!r} is read from two files, {external[location]} and {source}: "
                "give the tensors from one of them a new location before saving"
            )
    return t.to_proto(name)


def _encode(s) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8")
