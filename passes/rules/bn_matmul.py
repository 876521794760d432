"""BatchNormalization folded into a preceding Gemm or MatMul (inference).

Algebra: on a 2-D input [M, N] BatchNormalization normalises each column n:
    BN(Y)[:, n] = s[n] * (Y[:, n] - mean[n]) + beta[n],   s = gamma / sqrt(var + eps).
For `Y = alpha * A' @ B' + g * C` (Gemm; A' = A or A^T, B' = B or B^T, g = its beta):
    BN(Y) = alpha * A' @ (B' * s) + (s * (g * C - mean) + beta)
so B's output columns (its columns, or its rows when transB=1) are scaled by s and the
new C is `s * (g * C - mean) + beta` (C = 0 when absent), with Gemm's beta set to 1.
For `Y = X @ W` (MatMul, W [K, N]): `BN(Y) = X @ (W * s) + (beta - s * mean)`, written
as MatMul then Add (which fuse-matmul-add may turn into a Gemm).
Folded constants are computed in float64 and stored in the weight's dtype.

Rewrites:
  1. `BatchNormalization(Gemm(A, B, [C]))` with transB=0: B [K, N] scaled per column.
  2. The same with transB=1: B [N, K] scaled per row.
  3. Cases 1-2 keep transA and alpha; C may be absent or any constant that broadcasts
     to [M, N] (the new C has shape broadcast(C, [N])).
  4. `BatchNormalization(MatMul(X, W))`, X of rank 2, W a constant [K, N]
     -> `Add(MatMul(X, W'), b')`.

Left alone:
  5. B, C, W or a BatchNormalization parameter not a constant, or not float.
  6. MatMul whose input X has a rank other than 2 (or unknown): BatchNormalization's
     channel axis 1 is then not the product's last axis, so no weight column matches.
  7. The Gemm/MatMul output read by anything besides the BatchNormalization, or a
     graph output.
  8. BatchNormalization in training mode (training_mode=1, running statistics used,
     opsets 1-6 without is_test=1) or per-activation (`spatial=0`).
  9. Parameters not of shape [N], or var + eps <= 0.
"""
from __future__ import annotations

import dataclasses
from typing import List, Union

import numpy as np

from qcompile.ir import Graph, Node, Value
from qcompile.rewrite import Const, Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

from ._util import bn_inference_failure, only_user, rank

__all__ = ["BN_MATMUL", "FOLD_GEMM_BN", "FOLD_MATMUL_BN"]

_PARAMS = (Const("gamma"), Const("beta"), Const("mean"), Const("var"))
GEMM_PATTERN = Op("BatchNormalization", Op("Gemm", Var("a"), Const("b"), name="mm", extra_inputs=True),
                  *_PARAMS, name="bn")
MATMUL_PATTERN = Op("BatchNormalization", Op("MatMul", Var("a"), Const("b"), name="mm"), *_PARAMS, name="bn")


def _check_bn(m: Match, channels: int) -> Union[bool, Failure]:
    """BatchNormalization in inference mode, per channel, parameters float[channels]."""
    bn: Node = m["bn"]
    not_inference = bn_inference_failure(bn, m.opset)
    if not_inference is not None:
        return not_inference
    for name in ("gamma", "beta", "mean", "var"):
        data = m.const(name)
        if data.shape != (channels,) or data.dtype.kind != "f":
            return fail(f"{name} %{m[name].name} is {data.dtype}{list(data.shape)}, expected float[{channels}]",
                        m[name])
    if not np.all(m.const("var") + float(bn.attr("epsilon", 1e-5)) > 0):
        return fail(f"variance %{m['var'].name} + epsilon is not positive everywhere", m["var"])
    return only_user(m.value("mm"), f"{m['mm'].op_type} output")


def _scale_shift(m: Match):
    gamma, beta, mean, var = (m.const(k).astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    s = gamma / np.sqrt(var + float(m["bn"].attr("epsilon", 1e-5)))
    return s, beta - s * mean


def _check_gemm(m: Match) -> Union[bool, Failure]:
    gemm: Node = m["mm"]
    b = m.const("b")
    if b.ndim != 2 or b.dtype.kind != "f":
        return fail(f"B %{m['b'].name} is {b.dtype}[{b.ndim}-D], not a float matrix", m["b"])
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if c is not None and (constant_value(c) is None or constant_value(c).dtype.kind != "f"):
        return fail(f"the Gemm C %{c.name} is not a float constant", gemm, c)
    return _check_bn(m, b.shape[0] if gemm.attr("transB", 0) else b.shape[1])


def _rewrite_gemm(m: Match, graph: Graph) -> List[Value]:
    """Scale B's output columns and rebuild C: Gemm(A, B * s, s * (g * C - mean) + beta)."""
    gemm: Node = m["mm"]
    b = m.const("b")
    s, shift = _scale_shift(m)
    trans_b = bool(gemm.attr("transB", 0))
    b_new = (b.astype(np.float64) * (s[:, None] if trans_b else s[None, :])).astype(b.dtype)
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    g = float(gemm.attr("beta", 1.0))
    c_new = shift if c is None else s * (g * constant_value(c).astype(np.float64)) + shift
    attributes = {k: dataclasses.replace(a) for k, a in gemm.attributes.items() if k != "beta"}
    new = m.emit("Gemm", [m["a"], m.constant(b_new, f"{m['b'].name}_folded"),
                          m.constant(c_new.astype(b.dtype), f"{m['b'].name}_bias_folded")],
                 attributes, name=gemm.name)
    return [new.outputs[0]]


def _check_matmul(m: Match) -> Union[bool, Failure]:
    a_rank = rank(m["a"])
    if a_rank is None:
        return fail(f"the rank of %{m['a'].name} is unknown: run shape inference first", m["mm"], m["a"])
    if a_rank != 2:
        return fail(f"%{m['a'].name} has rank {a_rank}: BatchNormalization's channel axis is not the "
                    "product's last axis", m["mm"], m["a"])
    b = m.const("b")
    if b.ndim != 2 or b.dtype.kind != "f":
        return fail(f"W %{m['b'].name} is {b.dtype}[{b.ndim}-D], not a float matrix", m["b"])
    return _check_bn(m, b.shape[1])


def _rewrite_matmul(m: Match, graph: Graph) -> List[Value]:
    """Scale W's columns and add the shift: Add(MatMul(X, W * s), beta - s * mean)."""
    b = m.const("b")
    s, shift = _scale_shift(m)
    w = m.constant((b.astype(np.float64) * s[None, :]).astype(b.dtype), f"{m['b'].name}_folded")
    product = m.emit("MatMul", [m["a"], w], name=m["mm"].name).outputs[0]
    bias = m.constant(shift.astype(b.dtype), f"{m['b'].name}_bias_folded")
    return [m.emit("Add", [product, bias], name=m["bn"].name).outputs[0]]


FOLD_GEMM_BN = Rule("fold-gemm-bn", GEMM_PATTERN, _rewrite_gemm, check=_check_gemm,
                    doc="BatchNormalization(Gemm(A, B, C)) -> Gemm(A, B', C')")
FOLD_MATMUL_BN = Rule("fold-matmul-bn", MATMUL_PATTERN, _rewrite_matmul, check=_check_matmul,
                      doc="BatchNormalization(MatMul(X, W)) -> Add(MatMul(X, W'), b')")
BN_MATMUL = RuleSet("bn-matmul", [FOLD_GEMM_BN, FOLD_MATMUL_BN])
