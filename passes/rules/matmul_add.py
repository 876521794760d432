"""MatMul + Add -> Gemm.

Algebra: `Gemm(A, B, C) = alpha * A @ B + beta * C` with alpha = beta = 1 and C
broadcast (one way) to [M, N]; for A of shape [M, K] and B of shape [K, N] that is
exactly `Add(MatMul(A, B), C)` whenever Add's result has shape [M, N].

Rewrites:
  1. `Add(MatMul(A, B), C)` -> `Gemm(A, B, C)`, A of rank 2 [M, K], B a constant
     [K, N], C a constant of shape [], [1], [N], [1, 1], [1, N], [M, 1] or [M, N].
  2. `Add(C, MatMul(A, B))`, the same (Add commutes).
  3. B and C may be initializers or Constant node outputs.

Left alone:
  4. A of rank other than 2 (batched products such as [batch, seq, K] in
     transformers) or of unknown rank (run the infer-shapes pass first).
  5. B not a constant or not 2-D.
  6. C not a constant (a residual connection, say), or shaped so that Add's result
     is not [M, N] (C with more rows than a symbolic or different M).
  7. The MatMul output read by anything besides the Add, or a graph output (the
     product would be computed twice).
  8. Non-float types (integer products are the quantizer's business) and opsets
     before 7 (where Gemm broadcast through an attribute).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

from qcompile.ir import Graph, Node, TensorType, Value
from qcompile.rewrite import Const, Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

from ._util import only_user, rank

__all__ = ["FUSE_MATMUL_ADD", "MATMUL_ADD"]

PATTERN = Op(
    "Add",
    Op("MatMul", Var("a"), Const("b"), name="matmul"),
    Const("c"),
    name="add", commutative=True,
)


def _rows(a: Value) -> Optional[Union[int, str]]:
    """M, the first dimension of A (an int, a symbolic name, or None)."""
    data = constant_value(a)
    if data is not None:
        return data.shape[0]
    return a.type.shape[0] if isinstance(a.type, TensorType) and a.type.shape else None


def _gemm_broadcastable(c_shape: Tuple[int, ...], m: Optional[Union[int, str]], n: int) -> bool:
    """True when C broadcasts one way to [M, N] (Gemm's rule for its C input)."""
    if len(c_shape) > 2:
        return False
    rows, cols = (1,) * (2 - len(c_shape)) + tuple(c_shape)
    return cols in (1, n) and (rows == 1 or (isinstance(m, int) and rows == m))


def _check(m: Match) -> Union[bool, Failure]:
    matmul: Node = m["matmul"]
    if m.opset is not None and m.opset < 7:
        return fail(f"opset {m.opset} Gemm broadcasts C through an attribute; not rewritten", m["add"])
    single = only_user(m.value("matmul"), "MatMul output")
    if not single:
        return single
    a = m["a"]
    a_rank = rank(a)
    if a_rank is None:
        return fail(f"the rank of %{a.name} is unknown: run shape inference first (the infer-shapes pass)",
                    matmul, a)
    if a_rank != 2:
        return fail(f"%{a.name} has rank {a_rank}; Gemm multiplies 2-D matrices", matmul, a)
    b, c = m.const("b"), m.const("c")
    if b.ndim != 2:
        return fail(f"B %{m['b'].name} has rank {b.ndim}, not 2", matmul, m["b"])
    if b.dtype.kind != "f" or c.dtype != b.dtype:
        return fail(f"B and C are {b.dtype} and {c.dtype}; only float products are rewritten", m["b"], m["c"])
    rows = _rows(a)
    if not _gemm_broadcastable(c.shape, rows, b.shape[1]):
        return fail(f"C %{m['c'].name} of shape {list(c.shape)} does not broadcast one way to "
                    f"[M, N] = [{rows if rows is not None else '?'}, {b.shape[1]}]", m["c"])
    return True


def _rewrite(m: Match, graph: Graph) -> List[Value]:
    """Compute A @ B + C in one Gemm."""
    name = m["add"].name or m["matmul"].name
    return [m.emit("Gemm", [m["a"], m["b"], m["c"]], name=name).outputs[0]]


FUSE_MATMUL_ADD = Rule("fuse-matmul-add", PATTERN, _rewrite, check=_check,
                       doc="Add(MatMul(A, B), C) -> Gemm(A, B, C)")
MATMUL_ADD = RuleSet("matmul-add", [FUSE_MATMUL_ADD])
