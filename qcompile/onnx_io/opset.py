"""Opset upgrades through onnx's version converter.

qcompile keeps every model at the opset it was written for. A pass that needs newer
op definitions (per-axis QuantizeLinear needs opset 13, int4 QDQ 21) upgrades the model
with `upgrade_opset`, which logs what it did; nothing upgrades a model silently.
"""
from __future__ import annotations

import logging

import onnx
from onnx import helper, version_converter

from ..errors import QCompileError
from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.tensor import Tensor
from ..ir.types import TensorType
from ..ir.value import Value
from .exporter import to_proto
from .importer import from_proto

__all__ = ["upgrade_opset"]

log = logging.getLogger(__name__)


def upgrade_opset(model: Model, version: int) -> Model:
    """A new model: `model` converted to opset `version` of the ONNX domain by onnx's
    version converter (`model` itself is left as it is). The IR version is raised only
    as far as the new opset requires. Raises QCompileError when `version` is older than
    the model's opset or newer than the installed onnx knows, or when the converter
    cannot convert an op of the model."""
    name = model.path or f"model '{model.graph.name}'"
    before = model.opset
    latest = onnx.defs.onnx_opset_version()
    if version < before:
        raise QCompileError(f"{name}: cannot upgrade from opset {before} to the older opset {version}")
    if version > latest:
        raise QCompileError(
            f"{name}: cannot upgrade to opset {version}: the installed onnx knows opsets up to {latest}"
        )
    # the converter copies the whole model, weights included (8 of vgg19's 9 s): it gets
    # the large weights as typed inputs without data, and they come back afterwards
    carried = {v.name: v for v in model.graph.initializers.values() if v.const.numel > _WEIGHTS_OVER} \
        if version > before else {}
    proto = to_proto(model, weights_as_inputs_over=_WEIGHTS_OVER if carried else None)
    if version > before:
        _check_ops_known(proto.graph, name)
        try:
            converted = version_converter.convert_version(proto, version)
        except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors from C++ asserts
            raise QCompileError(
                f"{name}: onnx's version converter cannot bring it from opset {before} to {version}: {_reason(e)}"
            ) from None
        needed = helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
        converted.ir_version = max(proto.ir_version, needed)
        proto = converted
    result = from_proto(proto, base_dir=_base_dir(model), source=name)
    _restore_weights(result.graph, carried)
    result.path = model.path
    result.annotations = dict(model.annotations)
    if version > before:
        _restore_annotations(model.graph, result.graph)
        if result.ir_version >= 4:  # older IR versions need initializers listed as inputs too
            _lift_new_constants(result, {v.name for g in model.graph.walk() for v in g.values()})
        log.info("upgraded %s from opset %d to %d", name, before, version)
    return result


_WEIGHTS_OVER = 4096  # elements: shapes, axes, pads and scales, which adapters may read, stay in the proto


def _restore_weights(graph: Graph, carried: dict) -> None:
    """Make the typed inputs that stood in for `carried` initializers initializers again,
    holding the original tensors (not copied); an IR<4 initializer that is also a graph
    input stays one."""
    placeholders = {v.name: v for v in graph.inputs}
    for name, old in carried.items():
        v = placeholders.get(name)
        if v is None:  # the converter dropped it (no longer used)
            continue
        v.const = old.const
        graph.add_initializer(v)
        if not old.is_graph_input:
            graph.inputs.remove(v)


def _restore_annotations(old: Graph, new: Graph) -> None:
    """Give back what the converter drops: metadata of graphs, nodes and values, value
    doc strings, and with them the integer types ONNX lacks and quantization parameters.
    Values match by name, nodes by their first output, subgraphs by attribute name."""
    new.metadata_props = new.metadata_props or dict(old.metadata_props)
    old_values = {v.name: v for v in old.values()}
    for v in new.values():
        o = old_values.get(v.name)
        if o is None:
            continue
        v.metadata_props = v.metadata_props or dict(o.metadata_props)
        v.doc_string = v.doc_string or o.doc_string
        if _carries_qcompile_type(o.type) and isinstance(v.type, TensorType) \
                and v.type.dtype.onnx_type == o.type.dtype.onnx_type:
            v.type = TensorType(o.type.dtype, v.type.shape, o.type.quant)
    old_nodes = {n.outputs[0].name: n for n in old.nodes if n.outputs and n.outputs[0].name}
    for n in new.nodes:
        o = old_nodes.get(n.outputs[0].name) if n.outputs else None
        if o is None or o.op_type != n.op_type:
            continue
        n.metadata_props = n.metadata_props or dict(o.metadata_props)
        for key, attr in n.attributes.items():
            old_attr = o.attributes.get(key)
            if old_attr is not None:
                for sub, old_sub in zip(_graphs(attr.value), _graphs(old_attr.value)):
                    _restore_annotations(old_sub, sub)


def _graphs(value) -> list:
    """The graphs an attribute value holds."""
    values = value if isinstance(value, list) else [value]
    return [g for g in values if isinstance(g, Graph)]


def _carries_qcompile_type(t) -> bool:
    """True for a type only ValueInfo metadata can carry: an odd integer type or quant."""
    return isinstance(t, TensorType) and (t.quant is not None or not t.dtype.is_onnx_native)


def _check_ops_known(graph: onnx.GraphProto, name: str) -> None:
    """Refuse ONNX-domain ops the installed onnx has no schema for (the converter's own
    message for them is garbled)."""
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise QCompileError(f"{name}: cannot upgrade: {node.op_type!r} is not an ONNX op the installed onnx knows")
        for a in node.attribute:
            for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                _check_ops_known(sub, name)


def _lift_new_constants(model: Model, old_names: set) -> None:
    """Turn the Constant nodes the converter added (axes that became inputs, say) into
    initializers, so passes find them as constants the way exporters write them."""
    for g in list(model.graph.walk()):
        for node in g.nodes:
            value = node.attr("value")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not isinstance(value, Tensor):
                continue
            out = node.outputs[0]
            if out.name in old_names or out.name in g.initializers:
                continue
            init = Value(out.name, TensorType(value.dtype, value.shape), const=value)
            out.replace_all_uses_with(init)
            g.remove(node)
            g.add_initializer(init)


def _base_dir(model: Model) -> str:
    """The folder external-data locations are relative to (the original model's)."""
    for g in model.graph.walk():
        for v in g.initializers.values():
            if v.const.is_external:
                return v.const.base_dir
    return ""


def _reason(e: Exception) -> str:
    """The converter's message without the C++ file and assertion text around it."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("failed: ", 1)[-1]
