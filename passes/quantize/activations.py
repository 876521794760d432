"""Activation types and ranges for `quantize`: which integer type each activation
tensor gets, and which range its scale and zero point cover.

  1. Type: the pass's `activations` (int8, int4 or int16), then `activation_overrides`
     (PATTERN:TYPE, later entries win). PATTERN is an op type, or a regular expression
     searched in the name of the node that produces the tensor (for a fused Relu/Clip
     also the op before it) and in the tensor's own name (graph inputs have no node).
  2. Sensitive tensors (`min_activation_sqnr=DB`): when the SQNR at that width,
     estimated from the calibration histogram (signal power against step^2/12 plus the
     clipped mass), is under DB, the tensor gets the next width (4 -> 8 -> 16) that
     meets the budget, or int16; the reason is recorded.
  3. Range: the calibration method's. A tensor under 8 bits whose method is minmax or
     moving-average gets the MSE-optimal range at its width instead: with 16 levels,
     stretching the step over rare outliers costs more than clipping them.
  4. Scale and zero point: asymmetric over the range widened to include 0, so 0.0 (ReLU
     zeros, padding) is exact; an all-zero tensor gets scale 1 and zero point qmin.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

import numpy as np

from qcompile.errors import QCompileError
from qcompile.ir import INT8, INT16, DataType, Node, Value, int_type

__all__ = ["ACTIVATION_TYPES", "ActivationPlan", "activation_params", "estimated_sqnr"]

INT4 = int_type(4)
ACTIVATION_TYPES = {"int4": INT4, "int8": INT8, "int16": INT16}
_FUSED = {"Relu", "Clip"}
_WIDER = {4: INT8, 8: INT16}


class ActivationPlan:
    """The type and range of each activation tensor (see the module docstring)."""

    def __init__(self, default: str, overrides: List[str], stats, min_sqnr: float = 0.0):
        self.default = ACTIVATION_TYPES[default]
        self.stats = stats
        self.min_sqnr = min_sqnr
        self.rules: List[Tuple[str, object, DataType]] = []
        for entry in overrides:
            pattern, sep, kind = entry.rpartition(":")
            if not sep or not pattern:
                raise QCompileError(f"quantize option activation_overrides: {entry!r} is not PATTERN:TYPE "
                                    f"(e.g. Conv:int4)")
            if kind not in ACTIVATION_TYPES:
                raise QCompileError(f"quantize option activation_overrides: {kind!r} in {entry!r} is not one of "
                                    f"{', '.join(ACTIVATION_TYPES)}")
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise QCompileError(f"quantize option activation_overrides: {pattern!r} is not a valid regular "
                                    f"expression: {e}") from None
            self.rules.append((pattern, regex, ACTIVATION_TYPES[kind]))

    @property
    def may_use_int4(self) -> bool:
        return self.default.bits == 4 or any(t.bits == 4 for _, _, t in self.rules)

    def chosen(self, v: Value) -> DataType:
        """The type `activations` and `activation_overrides` give tensor `v`."""
        dtype = self.default
        nodes = _producers(v)
        for pattern, regex, kind in self.rules:
            if regex.search(v.name) or any(n.op_type == pattern or regex.search(n.name) for n in nodes):
                dtype = kind
        return dtype

    def type_for(self, v: Value) -> Tuple[DataType, str]:
        """(type, why it is wider than chosen: '' when it is not)."""
        dtype = self.chosen(v)
        if self.min_sqnr <= 0 or v.name not in self.stats.tensors:
            return dtype, ""
        first = dtype
        while dtype.bits in _WIDER:
            sqnr = estimated_sqnr(self.stats.tensors[v.name], self.range_for(v.name, dtype), dtype)
            if sqnr >= self.min_sqnr:
                break
            why = f"estimated int{dtype.bits} SQNR {sqnr:.1f} dB < {self.min_sqnr:g} dB"
            dtype = _WIDER[dtype.bits]
        return dtype, (why if dtype is not first else "")

    def range_for(self, name: str, dtype: DataType) -> Optional[Tuple[float, float]]:
        """The calibration range of tensor `name` for `dtype` (KeyError when uncalibrated)."""
        method = self.stats.method
        if dtype.bits < 8 and method in ("minmax", "moving-average"):
            return self.stats.range(name, "mse", bits=dtype.bits)
        if method in ("mse", "entropy") and dtype.bits != 8:  # at 8 bits: calibrate's own `bits`
            return self.stats.range(name, bits=dtype.bits)
        return self.stats.range(name)


def _producers(v: Value) -> List[Node]:
    """The node that writes `v`, and the op before it when that node is a fused Relu/Clip."""
    p = v.producer
    if p is None:
        return []
    if p.op_type in _FUSED and p.inputs and p.inputs[0] is not None and p.inputs[0].producer is not None:
        return [p, p.inputs[0].producer]
    return [p]


def activation_params(lo: float, hi: float, dtype: DataType = INT8) -> Tuple[float, int]:
    """Asymmetric scale and zero point of `dtype` for [lo, hi] widened to include 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (dtype.max - dtype.min)
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, dtype.min
    zp = int(np.clip(np.rint(dtype.min - lo / scale), dtype.min, dtype.max))
    return float(np.float32(scale)), zp


def estimated_sqnr(tensor_stats, rng: Tuple[float, float], dtype: DataType = INT8) -> float:
    """Estimated SQNR (dB) of quantizing a calibrated tensor to `dtype` over [lo, hi]:
    signal power from its histogram, noise step^2 / 12 inside the range plus the squared
    clipping error of the histogram mass outside it."""
    hist = tensor_stats.hist
    if hist is None or hist.counts.sum() == 0:
        return float("inf")
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    p = hist.counts / hist.counts.sum()
    power = float((p * centers ** 2).sum())
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    step = (hi - lo) / (dtype.max - dtype.min)
    clipped = np.clip(centers, lo, hi)
    noise = step ** 2 / 12 + float((p * (centers - clipped) ** 2).sum())
    if noise <= 0:
        return float("inf")
    return 10.0 * np.log10(max(power, 1e-30) / noise)
