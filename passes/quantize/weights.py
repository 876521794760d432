"""Weight quantization: choose scales and zero points, and round weights to integers.

    real ~= scale * (q - zero_point),   q in [qmin, qmax] of the target integer type

Cases:
  1. Symmetric signed b-bit (b = 2..8, 16): zero point 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1]
     (the most negative code is left out so the grid is symmetric: -x quantizes to -q).
  2. Asymmetric unsigned b-bit: q in [0, 2^b - 1], zero point chosen so that 0.0 is
     exactly representable (padding and ReLU zeros stay exact).
  3. Ternary: q in {-1, 0, 1}, zero point 0; the scale doubles as the threshold
     (|w| < scale / 2 rounds to 0).
  4. Binary (bipolar): q in {-1, +1}, scale = mean |w| (per channel), the L2-optimal
     scale for sign(w) (Rastegari et al., XNOR-Net, 2016).
Scales are per tensor or per channel along `axis`. With `search="mse"` (the default)
the clipping range is searched: for each channel, the scale among `steps` candidates
r * absmax / qmax, r in [0.2, 1], that minimises the squared rounding-plus-clipping
error; `search="minmax"` uses the full range (r = 1). Rounding is half to even, as
ONNX QuantizeLinear does, so onnxruntime reproduces the integers exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import numpy as np

from qcompile.ir import BIPOLAR, TERNARY, DataType, QuantParams, int_type

__all__ = ["WeightFormat", "quantize_weight", "dequantize", "weight_format"]

_TINY = np.float32(1e-12)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How to quantize a weight tensor."""

    dtype: DataType
    symmetric: bool = True
    axis: Optional[int] = 0  # None: per tensor
    search: str = "mse"  # or "minmax"
    steps: int = 80

    def __post_init__(self) -> None:
        if self.search not in ("mse", "minmax"):
            raise ValueError(f"weight scale search must be 'mse' or 'minmax', not {self.search!r}")
        if self.dtype.kind in ("ternary", "bipolar") and not self.symmetric:
            raise ValueError(f"{self.dtype} weights are symmetric by definition")

    @property
    def qmin(self) -> int:
        if self.symmetric and self.dtype.kind == "int":
            return -self.dtype.max
        return self.dtype.min

    @property
    def qmax(self) -> int:
        return self.dtype.max


def weight_format(bits: str, symmetric: bool = True, per_channel: bool = True, axis: int = 0,
                  search: str = "mse") -> WeightFormat:
    """A WeightFormat from option text: '8', '4', '3', '2', 'int4', 'ternary', 'binary'."""
    text = str(bits).lower().removeprefix("int")
    if text == "ternary":
        dtype = TERNARY
    elif text in ("binary", "bipolar", "1"):
        dtype = BIPOLAR
    elif text.isdigit() and 2 <= int(text) <= 16:
        dtype = int_type(int(text), signed=symmetric)
    else:
        raise ValueError(f"weight bit-width {bits!r} is not one of 2..16, ternary, binary")
    return WeightFormat(dtype, symmetric, axis if per_channel else None, search)


_BLOCK = 1 << 16  # elements per block of rows in the scale search


def _channels_first(w: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """A 2-D view [channels, rest] (one channel for per-tensor)."""
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _restore(flat: np.ndarray, shape: tuple, axis: Optional[int]) -> np.ndarray:
    if axis is None:
        return flat.reshape(shape)
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(flat.reshape(moved), 0, axis)


def _round_clip(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.rint(x / scale[:, None]) + zp[:, None], qmin, qmax)


def _blocks(n: int, k: int) -> Iterator[Tuple[slice, slice]]:
    """(rows, columns) blocks of about _BLOCK elements covering an [n, k] array."""
    rows = max(1, _BLOCK // max(1, k))
    cols = max(1, k if rows > 1 or k <= _BLOCK else _BLOCK)
    for i in range(0, n, rows):
        for j in range(0, max(k, 1), cols):
            yield slice(i, i + rows), slice(j, j + cols)


def _quantized(w2: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int, dtype) -> np.ndarray:
    """_round_clip of float32 `w2`, in float64 as the scale search computes it, one block at
    a time into `dtype` (a whole-weight float64 copy and its temporaries cost vgg19 several
    GB of page faults)."""
    out = np.empty(w2.shape, dtype)
    for r, c in _blocks(*w2.shape):
        out[r, c] = _round_clip(w2[r, c].astype(np.float64), scale[r], zp[r], qmin, qmax)
    return out


def _symmetric_scales(w2: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    absmax = np.maximum(np.abs(w2).max(axis=1).astype(np.float64), _TINY)
    qmax = fmt.qmax
    best = (absmax / qmax).astype(np.float32)
    if fmt.search == "minmax":
        return best
    ratios = np.linspace(0.2, 1.0, fmt.steps)
    # all steps on a block of rows at a time, in preallocated buffers: the block stays in
    # cache (a 4096x9216 Gemm weight at int4 took 47 s, now about 4x less; same scales)
    rows = max(1, _BLOCK // max(1, w2.shape[1]))
    for i in range(0, len(w2), rows):
        x, top = w2[i:i + rows].astype(np.float64), absmax[i:i + rows]
        q = np.empty(x.shape, np.result_type(x.dtype, np.float32))
        diff = np.empty(x.shape, np.float64)
        best_err = np.full(len(x), np.inf)
        for r in ratios:
            scale = (r * top / qmax).astype(np.float32)
            np.divide(x, scale[:, None], out=q)
            np.rint(q, out=q)
            np.clip(q, fmt.qmin, qmax, out=q)
            np.multiply(q, scale[:, None], out=diff)
            diff -= x
            np.square(diff, out=diff)
            err = diff.sum(axis=1)
            better = err < best_err
            best[i:i + rows][better], best_err[better] = scale[better], err[better]
    return best


def _asymmetric_params(w2: np.ndarray, fmt: WeightFormat) -> Tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(w2.min(axis=1), 0.0)
    hi = np.maximum(w2.max(axis=1), 0.0)
    span = fmt.qmax - fmt.qmin
    ratios = [1.0] if fmt.search == "minmax" else np.linspace(0.2, 1.0, fmt.steps)
    best_s = best_z = None
    best_err = np.full(len(lo), np.inf)
    for r in ratios:
        scale = np.maximum((r * (hi - lo)) / span, _TINY).astype(np.float32)
        zp = np.clip(np.rint(fmt.qmin - r * lo / scale), fmt.qmin, fmt.qmax)
        q = _round_clip(w2, scale, zp, fmt.qmin, fmt.qmax)
        err = np.square((q - zp[:, None]) * scale[:, None] - w2).sum(axis=1)
        if best_s is None:
            best_s, best_z, best_err = scale, zp, err
            continue
        better = err < best_err
        best_s[better], best_z[better], best_err[better] = scale[better], zp[better], err[better]
    return best_s, best_z


def quantize_weight(w: np.ndarray, fmt: WeightFormat) -> Tuple[np.ndarray, QuantParams]:
    """Quantize `w`: the integers (in the dtype's numpy container) and their
    QuantParams (scalar for per-tensor, 1-D along fmt.axis for per-channel)."""
    w = np.asarray(w, dtype=np.float32)
    axis = fmt.axis
    if axis is not None:
        if w.ndim == 0:
            axis = None
        elif not -w.ndim <= axis < w.ndim:
            raise ValueError(f"quantization axis {axis} is out of range for a weight of shape {w.shape}")
        else:
            axis = axis % w.ndim
    w2 = _channels_first(w, axis)  # float32; blocks are widened to float64 where it matters
    channels = w2.shape[0]
    if fmt.dtype.kind == "bipolar":
        scale = np.maximum(np.abs(w2.astype(np.float64)).mean(axis=1), _TINY).astype(np.float32)
        zp = np.zeros(channels)
        q = np.where(w2 >= 0, 1.0, -1.0)
    elif fmt.symmetric:
        scale = _symmetric_scales(w2, fmt)
        zp = np.zeros(channels)
        q = _quantized(w2, scale, zp, fmt.qmin, fmt.qmax, fmt.dtype.numpy_dtype)
    else:
        scale, zp = _asymmetric_params(w2.astype(np.float64), fmt)
        q = _quantized(w2, scale, zp, fmt.qmin, fmt.qmax, fmt.dtype.numpy_dtype)
    if fmt.dtype.kind != "bipolar":
        # an all-zero channel (a pruned filter) is exact at any scale: give it a typical
        # one, not the tiny floor, so that its int32 bias (scale s_in * s_w) does not
        # saturate and the channel keeps its bias
        empty = ~np.any(w2 != 0, axis=1)
        if empty.any() and channels > 1:
            scale = np.asarray(scale, np.float32).copy()
            scale[empty] = np.float32(np.median(scale[~empty])) if (~empty).any() else np.float32(1.0)
    q = _restore(q, w.shape, axis).astype(fmt.dtype.numpy_dtype)
    zp = zp.astype(np.int64)
    if axis is None:
        params = QuantParams(np.float32(scale[0]), np.int64(zp[0]), None)
    else:
        params = QuantParams(scale.astype(np.float32), zp, axis)
    return q, params


def quantize_bias(values: np.ndarray, s_x: float, w_scale: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A bias as int32 at scale s_x * s_w (per output channel with per-channel weights),
    the scale integer arithmetic adds it at: (int32 values, float32 scale)."""
    scale = (np.float32(s_x) * w_scale).astype(np.float32)
    q = np.clip(np.rint(np.asarray(values, np.float64) / scale), -2**31, 2**31 - 1).astype(np.int32)
    return q, scale


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """scale * (q - zero_point), broadcast along the quantization axis."""
    q = np.asarray(q, dtype=np.float32)
    if params.axis is None:
        return (q - np.float32(params.zero_point)) * params.scale
    shape = [1] * q.ndim
    shape[params.axis] = -1
    zp = params.zero_point.reshape(shape).astype(np.float32)
    return (q - zp) * params.scale.reshape(shape)
