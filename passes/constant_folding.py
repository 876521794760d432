"""Constant folding: evaluate the maximal constant subgraphs of a graph with onnxruntime.

A value is constant when it is an initializer that is not also a graph input (those
can be overridden at run time), or an output of a *foldable* node all of whose inputs
are constant (or absent). Per sweep, every foldable node is copied into one small
model whose graph outputs are the constant values that something non-constant reads;
onnxruntime runs it once, and each such value is replaced by an initializer holding
its result (`Graph.make_constant`, then `Value.replace_all_uses_with`). The evaluated
nodes nobody reads any more are removed.

Folded:
  1. Nodes of the standard ONNX domain with constant inputs (Constant nodes included,
     which become initializers).
  2. `Shape(x)` and `Size(x)` of a value whose static shape is known (computed from
     the type, not by onnxruntime), even though `x` itself is not constant.

Left alone:
  3. Nondeterministic ops (RandomNormal, RandomUniform, their *Like forms,
     Multinomial, Bernoulli): every run must draw fresh numbers.
  4. Ops of other domains (their semantics are unknown here) and nodes with
     subgraphs (If, Loop, Scan); If/Loop/Scan bodies themselves are not folded.
  5. A node whose outputs are not all typed tensors of a static shape, or any of
     whose outputs is larger than `limit_bytes`: materialising a 400 MB
     ConstantOfShape weight would only swell the model. What depends on it is not
     constant either.
  6. A node one of whose outputs is a graph output: the output keeps being computed
     by its node, so its name and its place in the interface stay (its constant
     inputs are still folded).
  7. Graph inputs, even with an initializer (they are overridable).
When onnxruntime cannot run the constant model, nothing is folded in that sweep and
the reason is returned (the caller warns).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set

import numpy as np

from qcompile.ir import Graph, Model, Node, Value
from qcompile.ir.types import TensorType
from qcompile.onnx_io import to_proto

__all__ = ["FoldResult", "NONDETERMINISTIC", "fold_constants"]

NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
_DOMAINS = frozenset({"", "ai.onnx"})


@dataclasses.dataclass
class FoldResult:
    """What one sweep did: nodes evaluated and removed, values replaced by
    initializers, shapes folded from types, and an error message when onnxruntime
    refused the constant model."""

    nodes_folded: int = 0
    values_folded: int = 0
    shapes_folded: int = 0
    error: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.nodes_folded or self.values_folded or self.shapes_folded)


def fold_constants(model: Model, limit_bytes: int = 16 << 20) -> FoldResult:
    """One folding sweep over `model`'s main graph, in place."""
    graph = model.graph
    result = FoldResult()
    result.shapes_folded = _fold_static_shapes(graph)
    outputs = {id(v) for v in graph.outputs}
    constant: Set[int] = {id(v) for v in graph.initializers.values()
                          if not v.is_graph_input and id(v) not in outputs}
    foldable: List[Node] = []
    for node in graph.nodes:
        if _foldable(node, constant, outputs, limit_bytes):
            foldable.append(node)
            constant.update(id(v) for v in node.outputs)
    members = {id(n) for n in foldable}
    needed = [v for n in foldable for v in n.outputs
              if v.name and any(id(u) not in members for u in v.users)]
    if not needed:
        return result
    try:
        arrays = _evaluate(model, foldable, needed)
    except Exception as e:  # onnxruntime's own errors (unsupported op, bad data, ...)
        lines = str(e).strip().splitlines()
        result.error = lines[0] if lines else type(e).__name__
        return result
    for v, array in zip(needed, arrays):
        c = graph.make_constant(array, v.name)
        c.type = _keep_declared(v.type, c.type)
        v.replace_all_uses_with(c)
        result.values_folded += 1
    for node in reversed(foldable):
        if not any(v.uses for v in node.outputs):
            graph.remove(node)
            result.nodes_folded += 1
    return result


def _foldable(node: Node, constant: Set[int], outputs: Set[int], limit_bytes: int) -> bool:
    if node.domain not in _DOMAINS or node.op_type in NONDETERMINISTIC or not node.outputs:
        return False
    if any(True for _ in node.subgraphs()):
        return False
    if any(v is not None and id(v) not in constant for v in node.inputs):
        return False
    for v in node.outputs:
        if id(v) in outputs:
            return False
        if not v.name:
            continue
        size = _static_nbytes(v)
        if size is None or size > limit_bytes:
            return False
    return True


def _static_nbytes(v: Value) -> Optional[int]:
    t = v.type
    if not isinstance(t, TensorType) or not t.is_static or t.dtype.kind == "string":
        return None
    return (t.numel() * t.dtype.bits + 7) // 8


def _keep_declared(declared, made):
    """Keep a declared type (an int4 stored as int8, say) when it agrees with the data."""
    if isinstance(declared, TensorType) and declared.dtype.onnx_type == made.dtype.onnx_type \
            and declared.is_static and tuple(declared.shape) == tuple(made.shape):
        return declared
    return made


def _evaluate(model: Model, nodes: List[Node], needed: List[Value]) -> List[np.ndarray]:
    """Run copies of `nodes` in one onnxruntime session; the arrays of `needed`."""
    import onnxruntime as ort

    tmp = Graph("constant_folding")
    copies: Dict[int, Value] = {}

    def copy_of(v: Optional[Value]) -> Optional[Value]:
        if v is None:
            return None
        if id(v) not in copies:  # an initializer
            c = Value(v.name, v.type, const=v.const)
            tmp.add_initializer(c)
            copies[id(v)] = c
        return copies[id(v)]

    for n in nodes:
        outs = [Value(v.name, v.type) for v in n.outputs]
        tmp.append(Node(n.op_type, [copy_of(v) for v in n.inputs], dict(n.attributes), outputs=outs,
                        domain=n.domain, name=n.name))
        copies.update((id(v), c) for v, c in zip(n.outputs, outs))
    for v in needed:
        tmp.add_output(copies[id(v)])
    proto = to_proto(Model(tmp, dict(model.opset_imports), ir_version=max(model.ir_version, 8)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in needed], {})


def _fold_static_shapes(graph: Graph) -> int:
    """Case 2: Shape/Size of a statically shaped value become initializers."""
    count = 0
    outputs = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        if node.op_type not in ("Shape", "Size") or node.domain not in _DOMAINS or not node.inputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or not isinstance(x.type, TensorType) or not x.type.is_static or id(y) in outputs:
            continue
        if x.const is not None and not x.is_graph_input:
            continue  # plain constant folding handles it
        shape = np.array(x.type.shape, dtype=np.int64)
        if node.op_type == "Shape":
            rank = len(shape)
            start, end = int(node.attr("start", 0)), node.attr("end", None)
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
            data = shape[start:end]
        else:
            data = np.array(int(np.prod(shape)), dtype=np.int64)
        y.replace_all_uses_with(graph.make_constant(data, y.name))
        graph.remove(node)
        count += 1
    return count
