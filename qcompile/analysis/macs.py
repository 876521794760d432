"""Multiply-accumulate counts per node, from value shapes.

Counted (each MAC is one multiply and one add of the op's inner product):
  1. Conv / ConvInteger / QLinearConv: N * M * prod(out spatial) * (C / group) * prod(kernel).
  2. ConvTranspose: N * C * prod(in spatial) * (M / group) * prod(kernel).
  3. Gemm: M * N * K (transA/transB respected).
  4. MatMul / MatMulInteger / QLinearMatMul: prod(output shape) * K, any batch broadcast.
  5. RNN / GRU / LSTM: seq * directions * batch * gates * hidden * (input + hidden),
     gates = 1, 3, 4.
  6. Attention (opset 23): Q @ K^T and P @ V over the total key length (past keys
     included): key length * (numel(Q) + numel(Y)), for 3-D and 4-D layouts alike.
     Attention written out as MatMuls (what exporters emit) is case 4.
  7. Einsum: numel(output) * the product of the contracted (summed-out) index sizes,
     the naive loop nest's multiply-adds; ellipses are handled.
Everything else counts 0 MACs (elementwise ops, pooling, normalisation, softmax).
Symbolic dimensions (a dynamic batch "N") are taken as 1, so counts are per inference; a
shape that is unknown gives None.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .. import quant_math
from ..ir import Node, TensorType, Value

__all__ = ["node_macs", "static_shape"]

_CONV = {"Conv", "ConvInteger", "QLinearConv"}
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul"}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_INTEGER_TWINS = {quant_math.QCONV: "Conv", quant_math.QGEMM: "Gemm", quant_math.QMATMUL: "MatMul"}


def static_shape(v: Optional[Value]) -> Optional[tuple]:
    """The value's shape with symbolic dims taken as 1; None when the rank or a dim is
    unknown."""
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    dims = []
    for d in v.type.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, str):
            dims.append(1)
        else:
            return None
    return tuple(dims)


def _prod(xs: Sequence[int]) -> int:
    return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


def node_macs(node: Node) -> Optional[int]:
    """MACs of one node per inference; 0 for ops without inner products; None when
    shapes needed for the count are unknown."""
    op = node.op_type
    if node.domain == quant_math.DOMAIN:  # the integer ops count as their float twins
        op = _INTEGER_TWINS.get(op, "")
    elif node.domain not in ("", "ai.onnx"):
        return 0
    if op in _CONV:
        weight = node.inputs[3] if op == "QLinearConv" else node.inputs[1]
        w, y = static_shape(weight), static_shape(node.outputs[0])
        if w is None or y is None:
            return None
        return y[0] * y[1] * _prod(y[2:]) * w[1] * _prod(w[2:])
    if op == "ConvTranspose":
        x, w = static_shape(node.inputs[0]), static_shape(node.inputs[1])
        if x is None or w is None:
            return None
        return x[0] * x[1] * _prod(x[2:]) * w[1] * _prod(w[2:])  # w: [C, M/group, k...]
    if op == "Gemm":
        a, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if a is None or y is None:
            return None
        k = a[0] if node.attr("transA", 0) else a[1]
        return y[0] * y[1] * k
    if op in _MATMUL:
        a, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if a is None or y is None:
            return None
        return _prod(y) * a[-1]
    if op in _GATES:
        x, w = static_shape(node.inputs[0]), static_shape(node.inputs[1])
        if x is None or w is None:
            return None
        hidden = node.attr("hidden_size") or w[1] // _GATES[op]
        layout = node.attr("layout", 0)
        seq, batch = (x[1], x[0]) if layout else (x[0], x[1])
        return seq * w[0] * batch * _GATES[op] * hidden * (x[2] + hidden)
    if op == "Attention":
        return _attention_macs(node)
    if op == "Einsum":
        return _einsum_macs(node)
    return 0


def _attention_macs(node: Node) -> Optional[int]:
    q, k, y = (static_shape(v) for v in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if q is None or k is None or y is None or len(q) not in (3, 4) or len(k) != len(q):
        return None
    keys = k[-2] if len(k) == 4 else k[1]
    past = node.inputs[4] if len(node.inputs) > 4 else None
    if past is not None:
        p = static_shape(past)
        if p is None or len(p) != 4:
            return None
        keys += p[2]
    return keys * (_prod(q) + _prod(y))


def _einsum_macs(node: Node) -> Optional[int]:
    equation = str(node.attr("equation", "")).replace(" ", "")
    terms, _, out = equation.partition("->")
    terms = terms.split(",")
    shapes = [static_shape(v) for v in node.inputs]
    y = static_shape(node.outputs[0])
    if y is None or any(s is None for s in shapes) or len(shapes) != len(terms):
        return None
    sizes = {}
    for term, shape in zip(terms, shapes):
        left, dots, right = term.partition("...")
        if len(left) + len(right) > len(shape) or (not dots and len(term) != len(shape)):
            return None  # malformed equation: the verifier or onnxruntime says why
        sizes.update(zip(left, shape[:len(left)]))
        sizes.update(zip(right, shape[len(shape) - len(right):]))
    letters = "".join(terms).replace(".", "")
    if "->" in equation:
        kept = set(out.replace(".", ""))
    else:  # implicit output: the indices that occur once
        kept = {c for c in letters if letters.count(c) == 1}
    contracted = [sizes[c] for c in set(letters) - kept]
    return _prod(y) * _prod(contracted)
