"""Conv followed by a per-channel constant Mul or Add: folded into the Conv.

Algebra: for z = Conv(x, W) + b (b = 0 without a bias), with a constant c that is the
same at every spatial position (one value per output channel, or one for all),
    z * c[k] = Conv(x, W') + b'    with W'[k, ...] = W[k, ...] * c[k],  b'[k] = b[k] * c[k]
    z + d[k] = Conv(x, W) + b''    with b''[k] = b[k] + d[k]
since each output channel k of a convolution is linear in its own filter W[k] and adds
its own bias b[k]. Models exported with BatchNormalization spelled out as Mul and Add
(the onnx package's inception_v2, Caffe2 exports) then keep one Conv per layer, and
the quantizer one rounding per layer instead of three. Constants are combined in
float64 and stored in W's dtype.

Rewrites:
  1. `Mul(Conv(x, W[, b]), c)` and `Mul(c, Conv(...))` -> `Conv(x, W', b')`.
  2. `Add(Conv(x, W[, b]), d)` and `Add(d, Conv(...))` -> `Conv(x, W, b'')`.
  3. c, d of shape [] or [1] (one value), or of rank <= the Conv output's rank with
     every axis 1 except the channel axis (axis 1 counted from the output's rank:
     [C, 1, 1], [1, C, 1, 1], [1, C, 1]); C equal to W's first dimension or 1.

Left alone:
  4. W, the Conv bias or c/d not a constant; non-float W.
  5. The Conv output read by anything else, or a graph output.
  6. c/d that vary along the batch or a spatial axis, or would broadcast the output to
     a larger shape (a [C, 1, 1, 1] against a 3-D output); an unknown output rank.
"""
from __future__ import annotations

import dataclasses
from typing import List, Union

import numpy as np

from qcompile.ir import Graph, Node, Value
from qcompile.rewrite import Const, Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

from ._util import conv_bias, only_user, rank

__all__ = ["CONV_AFFINE", "FOLD_CONV_ADD", "FOLD_CONV_MUL"]


def _pattern(op: str) -> Op:
    return Op(op, Op("Conv", Var("x"), Const("w"), name="conv", extra_inputs=True), Const("c"),
              name="affine", commutative=True)


def _per_channel(m: Match) -> Union[np.ndarray, Failure]:
    """c as a float64 vector of one value per output channel, or a Failure."""
    w, c = m.const("w"), m.const("c")
    out_rank = rank(m.value("conv"))
    if out_rank is None:
        out_rank = w.ndim  # a Conv's output has the rank of its weight
    channels = w.shape[0]
    if c.dtype.kind != "f":
        return fail(f"constant %{m['c'].name} is {c.dtype}, not float", m["c"])
    if c.size == 1 and c.ndim <= out_rank:
        return np.full(channels, float(c.reshape(())), np.float64)
    if c.ndim > out_rank:
        return fail(f"constant %{m['c'].name} of rank {c.ndim} would broadcast the rank-{out_rank} Conv output",
                    m["c"])
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return fail(f"constant %{m['c'].name} {list(c.shape)} is not one value per output channel "
                    f"(expected [{channels}, 1, ...] against the output's channel axis)", m["c"])
    return np.broadcast_to(c.reshape(shape)[0].reshape(-1).astype(np.float64), (channels,)).copy()


def _check(m: Match) -> Union[bool, Failure]:
    conv: Node = m["conv"]
    bias = conv_bias(conv)
    if bias is not None and constant_value(bias) is None:
        return fail(f"the Conv bias %{bias.name} is not a constant", conv, bias)
    if m.const("w").dtype.kind != "f":
        return fail(f"Conv weight %{m['w'].name} is {m.const('w').dtype}; folding needs float weights", m["w"])
    single = only_user(m.value("conv"), "conv output")
    if not single:
        return single
    per_channel = _per_channel(m)
    return per_channel if isinstance(per_channel, Failure) else True


def _rewrite(m: Match, graph: Graph) -> List[Value]:
    """Fold the per-channel scale or shift into the Conv's weight and bias."""
    conv: Node = m["conv"]
    w = m.const("w")
    c = _per_channel(m)
    bias = conv_bias(conv)
    b = np.zeros(w.shape[0]) if bias is None else constant_value(bias).astype(np.float64)
    bias_name = f"{m['w'].name}_bias" if bias is None else bias.name
    inputs = [m["x"], m["w"]]
    if m["affine"].op_type == "Mul":
        inputs[1] = m.constant((w.astype(np.float64) * c.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype),
                               f"{m['w'].name}_scaled")
        b = b * c
    else:
        b = b + c
    inputs.append(m.constant(b.astype(w.dtype), f"{bias_name}_folded"))
    attributes = {k: dataclasses.replace(a) for k, a in conv.attributes.items()}
    return [m.emit("Conv", inputs, attributes, name=conv.name).outputs[0]]


FOLD_CONV_MUL = Rule("fold-conv-mul", _pattern("Mul"), _rewrite, check=_check,
                     doc="Mul(Conv(x, W, b), c) -> Conv(x, W*c, b*c), c per output channel")
FOLD_CONV_ADD = Rule("fold-conv-add", _pattern("Add"), _rewrite, check=_check,
                     doc="Add(Conv(x, W, b), d) -> Conv(x, W, b+d), d per output channel")
CONV_AFFINE = RuleSet("conv-affine", [FOLD_CONV_MUL, FOLD_CONV_ADD])
