"""`infer-shapes`: give every value a type and shape with ONNX shape inference.

The model is exported (qcompile.onnx_io.to_proto), run through
`onnx.shape_inference.infer_shapes(..., data_prop=True)` (which also folds shape
arithmetic such as Shape -> Gather -> Reshape), and the inferred types are copied back
by value name, subgraphs included. Merging with a type a value already has:
  1. no type yet: the inferred one;
  2. same ONNX element type: the existing element type and quantization parameters are
     kept (an int4 stored as int8 stays int4), the shape merged dimension by dimension
     (a number beats a symbol beats unknown); a different rank takes the inferred shape;
  3. a different element type: the inferred type (ONNX's op schemas are the authority);
  4. nothing inferred (custom-domain ops, non-tensor values): the value is left alone.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import onnx

from qcompile.errors import QCompileError
from qcompile.ir import Model, TensorType
from qcompile.onnx_io import to_proto, type_from_proto
from qcompile.passmanager import Pass, PassResult, register_pass

__all__ = ["InferShapes", "infer_types"]


@register_pass("infer-shapes")
class InferShapes(Pass):
    """Set the type and shape of every value with ONNX shape inference."""

    in_place = True

    def run(self, model: Model) -> PassResult:
        changed = infer_types(model)
        if changed:
            self.stats["values typed"] += changed
        return PassResult(model, modified=changed > 0)


def infer_types(model: Model) -> int:
    """Infer and set value types in place; returns how many values changed type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(to_proto(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as e:  # inference rejects the model: say so instead of crashing
        raise QCompileError(f"ONNX shape inference failed: {type(e).__name__}: {e}") from e
    types: Dict[str, onnx.TypeProto] = {}
    for gp in _graph_protos(inferred.graph):
        for vi in list(gp.input) + list(gp.value_info) + list(gp.output):
            if vi.name and vi.type.WhichOneof("value") is not None:
                types[vi.name] = vi.type
    changed = 0
    for g in model.graph.walk():
        for v in g.values():
            tp = types.get(v.name)
            if tp is None:
                continue
            new = _merge(v.type, type_from_proto(tp, v.metadata_props))
            if new is not None and new != v.type:
                v.type = new
                changed += 1
    return changed


def _graph_protos(gp: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield gp
    for node in gp.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graph_protos(sub)


def _merge(old, new):
    if new is None or old is None:
        return old if new is None else new
    if not (isinstance(old, TensorType) and isinstance(new, TensorType)):
        return old
    if old.dtype.onnx_type != new.dtype.onnx_type:
        return new
    return old.with_shape(_merge_shape(old.shape, new.shape))


def _merge_shape(old: Optional[tuple], new: Optional[tuple]) -> Optional[tuple]:
    if new is None or old is None:
        return old if new is None else new
    if len(old) != len(new):
        return new
    return tuple(_better_dim(a, b) for a, b in zip(old, new))


def _better_dim(old, new):
    rank = {int: 2, str: 1}
    return new if rank.get(type(new), 0) > rank.get(type(old), 0) or (type(new) is int and new != old) else old
