"""The integer op set of `lower-integer`, defined once, and its fixed-point arithmetic.

The integer graph uses ops of the custom ONNX domain `qcompile.int` (below), on integer
tensors whose `TensorType.quant` says what they mean (real = scale * (q - zero_point)).
`passes/lower_integer.py` writes these ops; the integer reference evaluator
(`qcompile.backend.reference`) defines how they compute; both read the names and the
requantization rule from this module, so they cannot drift apart.

The rounding rule (what integer hardware does, and the README states):

    A real rescale factor r > 0 (e.g. s_x * s_w / s_y) is held as an int32 multiplier
    M and a right shift s with M in [2^30, 2^31) and r ~= M * 2^-s (relative error
    below 2^-31; `quantize_multiplier`). An int32 accumulator `acc` is requantized as

        y = saturate(((acc * M + 2^(s-1)) >> s) + zero_point_out, lo, hi)

    computed in int64 (|acc| < 2^31 and M < 2^31, so the product fits), `>>` the
    arithmetic (flooring) shift: one rounding, to nearest with ties rounded up (toward
    +infinity). lo..hi is the output type's range, narrowed by a fused Relu/Clip.
    When s would exceed 62 (r < 2^-32) M is shifted down with it, keeping s = 62.

Graph-interface conversions are float and follow ONNX: Quantize rounds half to even
(as QuantizeLinear), Dequantize computes scale * (q - zero_point) in float32.

Ops of the domain (inputs in order; `?` optional; int32 accumulators):

  QConv(x, w, bias?, multiplier, shift, w_zero_point?)
      attrs: strides, pads, dilations, group, kernel_shape (as ONNX Conv), x_zero_point,
      out_zero_point, out_min, out_max.
      acc[n, m, ...] = sum (x - x_zp) * (w - w_zp) + bias[m]; padding is x_zp (real 0).
      multiplier and shift have one entry per output channel (or one in all).
  QGemm(x, w, bias?, multiplier, shift, w_zero_point?)
      attrs: transB, x_zero_point, out_zero_point, out_min, out_max. acc = (x - x_zp)
      @ (w - w_zp)(^T) + bias; channel = output column.
  QMatMul(x, w, multiplier, shift, w_zero_point?)
      attrs: x_zero_point, out_zero_point, out_min, out_max. x is [..., K], w [K, N].
  QAdd(a, b) / QMul(a, b)
      attrs: a_zero_point, b_zero_point, out_zero_point, out_min, out_max and
      QAdd: a_multiplier, b_multiplier, shift: y = ((a - a_zp) * Ma + (b - b_zp) * Mb
            + 2^(s-1)) >> s + out_zp, both rescales sharing one shift, so one rounding.
      QMul: multiplier, shift: y = requant((a - a_zp) * (b - b_zp)). Numpy broadcasting.
  QAveragePool(x, multiplier?, shift?)
      attrs: kernel_shape, strides, pads, global (0/1), x_zero_point, out_zero_point,
      out_min, out_max, and multiplier, shift when the inputs are absent:
      y = requant(sum over the window of (x - x_zp)), padding contributing 0; the
      divisor is folded into the multiplier (r = s_x / (s_y * count)). With one count
      for every window the multiplier and shift are attributes; where the count varies
      (count_include_pad=0 with padding, ceil_mode=1) they are int32/int8 tensors shaped
      like the output's spatial dims, one per position. The output's spatial size is
      the multiplier's shape when given (ceil_mode), else floor-mode pooling's.
  Requantize(x)
      attrs: x_zero_point, multiplier, shift, out_zero_point, out_min, out_max:
      y = requant(x - x_zp). A Relu/Clip on a quantized tensor is a Requantize with
      narrowed out_min/out_max.
  Quantize(x, scale, zero_point) {axis?, out_min?, out_max?}   float -> integer, as ONNX
      QuantizeLinear, saturating to out_min..out_max when given (a 4-bit tensor in an
      int8 container).
  Dequantize(x, scale, zero_point) {axis?} integer -> float, as ONNX DequantizeLinear.

Data-movement ops keep their ONNX (default-domain) op on integer tensors, the scale
unchanged: MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Concat (inputs
first requantized to the output's scale). Any other default-domain op left in an
integer graph is a float op on the host, between Dequantize and Quantize.

Narrow types: every integer tensor is held in an int8/uint8 (or wider) container; a
tensor of fewer than 8 bits is one whose producer saturates to its range (out_min,
out_max), and the model metadata `qcompile.activation_bits` / `qcompile.weight_bits`
({tensor: type}) records its true width for the backend to pack.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = [
    "DOMAIN", "QCONV", "QGEMM", "QMATMUL", "QADD", "QMUL", "QAVERAGEPOOL", "REQUANTIZE", "QUANTIZE",
    "DEQUANTIZE", "INTEGER_OPS", "DATA_MOVEMENT_OPS", "MAX_SHIFT", "quantize_multiplier", "quantize_multiplier_pair", "requantize",
    "rounding_rule",
]

DOMAIN = "qcompile.int"
QCONV = "QConv"
QGEMM = "QGemm"
QMATMUL = "QMatMul"
QADD = "QAdd"
QMUL = "QMul"
QAVERAGEPOOL = "QAveragePool"
REQUANTIZE = "Requantize"
QUANTIZE = "Quantize"
DEQUANTIZE = "Dequantize"
INTEGER_OPS = frozenset({QCONV, QGEMM, QMATMUL, QADD, QMUL, QAVERAGEPOOL, REQUANTIZE, QUANTIZE, DEQUANTIZE})
# default-domain ops that integer tensors go through unchanged (one scale in, same out)
DATA_MOVEMENT_OPS = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat"})
MAX_SHIFT = 62


def rounding_rule() -> str:
    """The rounding rule in one sentence (for reports and the README)."""
    return ("requantization multiplies the int32 accumulator by an int32 multiplier M in [2^30, 2^31) in int64, "
            "adds 2^(s-1) and shifts right arithmetically by s (round to nearest, ties toward +infinity), adds "
            "the output zero point and saturates to the output range (narrowed by a fused Relu/Clip)")


def quantize_multiplier(real) -> Tuple[np.ndarray, np.ndarray]:
    """(M, s), int64 arrays shaped like `real`, with M in [2^30, 2^31) and
    real ~= M * 2^-s to a relative error under 2^-31 (s <= MAX_SHIFT; for tiny factors
    M is smaller). `real` must be positive, finite and below 2^30."""
    r = np.asarray(real, dtype=np.float64)
    if r.size and (not np.all(np.isfinite(r)) or np.any(r <= 0) or np.any(r >= 2.0 ** 30)):
        raise ValueError(f"rescale factors must be finite and in (0, 2^30), got {r.ravel()[:8]}")
    mant, exp = np.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    m = np.rint(mant * 2.0 ** 31).astype(np.int64)
    s = (31 - exp).astype(np.int64)
    carry = m == 2 ** 31  # mantissa rounded up to 1.0
    m = np.where(carry, 2 ** 30, m)
    s = np.where(carry, s - 1, s)
    over = np.maximum(s - MAX_SHIFT, 0)
    m = np.where(over > 0, _round_shift(m, np.minimum(over, 63)), m)
    s = np.minimum(s, MAX_SHIFT)
    return m.astype(np.int64), s.astype(np.int64)


def _round_shift(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(v + 2^(s-1)) >> s in int64 (s >= 1), round half up."""
    s = np.asarray(s, dtype=np.int64)
    return (v + (np.int64(1) << (s - 1))) >> s


def requantize(acc, multiplier, shift, out_zero_point: int, lo: int, hi: int) -> np.ndarray:
    """The rounding rule, vectorised: saturate(((acc * M + 2^(s-1)) >> s) + zp, lo, hi).
    `multiplier` and `shift` broadcast against `acc` (int64 arithmetic; int32 result)."""
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    prod = acc * m
    r = np.where(s > 0, (prod + (np.int64(1) << np.maximum(s - 1, 0))) >> s, prod)
    return np.clip(r + np.int64(out_zero_point), lo, hi).astype(np.int32)


def quantize_multiplier_pair(real_a, real_b) -> Tuple[int, int, int]:
    """(Ma, Mb, s): two rescale factors sharing one shift s, the larger multiplier in
    [2^30, 2^31) (QAdd rescales both inputs before its single rounding)."""
    big = max(float(real_a), float(real_b))
    _, s = quantize_multiplier(big)
    s = int(s)
    ma = int(np.rint(float(real_a) * 2.0 ** s))
    mb = int(np.rint(float(real_b) * 2.0 ** s))
    return min(ma, 2 ** 31 - 1), min(mb, 2 ** 31 - 1), s
