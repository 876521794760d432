"""Conv + BatchNormalization folding (inference).

Algebra: BatchNormalization in inference mode is, per output channel c,
    y = gamma[c] * (z - mean[c]) / sqrt(var[c] + eps) + beta[c],   z = Conv(x, W) + b.
With s = gamma / sqrt(var + eps), that is Conv(x, W') + b' where
    W'[c, ...] = W[c, ...] * s[c]
    b'[c]      = (b[c] - mean[c]) * s[c] + beta[c]     (b = 0 when the Conv has no bias)
The folded constants are computed in float64 and stored in W's dtype.

Rewrites:
  1. `BatchNormalization(Conv(x, W), gamma, beta, mean, var)` -> `Conv(x, W', b')`.
  2. The same with a constant Conv bias `Conv(x, W, b)`.
  3. Cases 1-2 for 1-D, 2-D and 3-D convolutions, grouped and depthwise ones included
     (W's first axis is always the output channel).

Left alone:
  4. W, the Conv bias, or any BatchNormalization parameter not a constant.
  5. The Conv output read by anything besides the BatchNormalization, or a graph
     output (the unnormalised value would still be needed).
  6. BatchNormalization in training mode: `training_mode=1`, any of its running-stat
     outputs used, or an opset 1-6 node without `is_test=1`.
  7. Per-activation BatchNormalization (`spatial=0`, opsets 1-8).
  8. Non-float weights, parameter shapes other than [C_out], or var + eps <= 0.
  9. ConvTranspose, Gemm or MatMul followed by BatchNormalization.
"""
from __future__ import annotations

import dataclasses
from typing import List, Union

import numpy as np

from qcompile.ir import Graph, Node, Value
from qcompile.rewrite import Const, Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

from ._util import bn_inference_failure, conv_bias, only_user

__all__ = ["CONV_BN", "FOLD_CONV_BN"]

PATTERN = Op(
    "BatchNormalization",
    Op("Conv", Var("x"), Const("w"), name="conv", extra_inputs=True),
    Const("gamma"), Const("beta"), Const("mean"), Const("var"),
    name="bn",
)


def _check(m: Match) -> Union[bool, Failure]:
    bn: Node = m["bn"]
    conv: Node = m["conv"]
    not_inference = bn_inference_failure(bn, m.opset)
    if not_inference is not None:
        return not_inference
    bias = conv_bias(conv)
    if bias is not None and constant_value(bias) is None:
        return fail(f"the Conv bias %{bias.name} is not a constant", conv, bias)
    single = only_user(m.value("conv"), "conv output")
    if not single:
        return single
    w = m.const("w")
    if w.dtype.kind != "f" or w.ndim < 3:
        return fail(f"Conv weight %{m['w'].name} is {w.dtype}[{w.ndim}-D]; folding needs float weights of rank >= 3",
                    conv, m["w"])
    channels = w.shape[0]
    for name in ("gamma", "beta", "mean", "var") + (("bias",) if bias is not None else ()):
        value = bias if name == "bias" else m[name]
        data = constant_value(value)
        if data.shape != (channels,) or data.dtype.kind != "f":
            return fail(f"{name} %{value.name} is {data.dtype}{list(data.shape)}, expected float[{channels}] "
                        "(one per Conv output channel)", value)
    if not np.all(m.const("var") + float(bn.attr("epsilon", 1e-5)) > 0):
        return fail(f"variance %{m['var'].name} + epsilon is not positive everywhere", m["var"])
    return True


def _rewrite(m: Match, graph: Graph) -> List[Value]:
    """Fold the BatchNormalization's affine map into the Conv's weight and bias."""
    bn: Node = m["bn"]
    conv: Node = m["conv"]
    w = m.const("w")
    gamma, beta, mean, var = (m.const(k).astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    bias = conv_bias(conv)
    b = np.zeros_like(mean) if bias is None else constant_value(bias).astype(np.float64)
    s = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
    w_folded = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    b_folded = ((b - mean) * s + beta).astype(w.dtype)
    attributes = {k: dataclasses.replace(a) for k, a in conv.attributes.items()}
    bias_name = f"{m['w'].name}_bias" if bias is None else bias.name
    new = m.emit("Conv", [m["x"], m.constant(w_folded, f"{m['w'].name}_folded"),
                          m.constant(b_folded, f"{bias_name}_folded")],
                 attributes, name=conv.name)
    return [new.outputs[0]]


FOLD_CONV_BN = Rule("fold-conv-bn", PATTERN, _rewrite, check=_check,
                    doc="BatchNormalization(Conv(x, W, b)) -> Conv(x, W', b')")
CONV_BN = RuleSet("conv-bn", [FOLD_CONV_BN])
