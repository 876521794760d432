"""State shared by the layer schedulers: the emitter, the constant segment, the DRAM
tensors, and the schedule record that `--dump schedule` prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from qcompile._native import pack_bits

from ..isa import DType, DTYPE_BITS, index_bits
from ..program import TensorSlot
from ._weights import ConstSegment, groups_within, row_major_bytes
from .emitter import Emitter
from .plan import LoweringError

__all__ = ["Context", "Slot", "weight_type", "encode_weights", "nm_pattern", "compressed_bytes"]


@dataclass
class Slot:
    """A tensor in DRAM as the schedulers see it."""
    index: int
    addr: int
    dtype: DType
    shape: Tuple[int, ...]

    @property
    def esize(self) -> int:
        return max(1, DTYPE_BITS[self.dtype] // 8)


@dataclass
class Context:
    target: Any
    model: Any
    plan: Any
    emitter: Emitter
    slots: Dict[int, Slot]                      # id(value) -> DRAM slot
    tensors: List[TensorSlot]
    const: ConstSegment = field(default_factory=ConstSegment)   # `finish()` gives the bytes
    schedule: List[str] = field(default_factory=list)
    layer: int = 0
    _const_cache: Dict[Any, int] = field(default_factory=dict)

    def slot(self, value) -> Slot:
        try:
            return self.slots[id(value)]
        except KeyError:
            raise LoweringError(f"tensor %{value.name} has no DRAM slot (internal error: lowering order)") from None

    def add_const(self, data: bytes, key: Any = None, align: int = 64) -> int:
        """Append `data` to the constant segment (once per key); returns its address."""
        if key is not None and key in self._const_cache:
            return self._const_cache[key]
        addr = self.const.append(data, align)
        if key is not None:
            self._const_cache[key] = addr
        return addr

    def note(self, text: str) -> None:
        self.schedule.append(text)


def weight_type(values: np.ndarray, bits: int, precisions) -> DType:
    """The smallest operand type the target supports that holds the weights exactly."""
    v = np.asarray(values)
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    prec = {p.lower() for p in precisions}
    if bits <= 1 and "binary" in prec and set(np.unique(v).tolist()) <= {-1, 1}:
        return DType.BINARY
    if bits <= 2 and "int2" in prec and lo >= -2 and hi <= 1:
        return DType.INT2
    if bits <= 4 and "int4" in prec and lo >= -8 and hi <= 7:
        return DType.INT4
    if v.dtype == np.uint8:
        return DType.UINT8
    if lo < -128 or hi > 127:
        raise LoweringError(f"weights in [{lo}, {hi}] do not fit an 8-bit operand")
    return DType.INT8


def nm_pattern(matrix: np.ndarray, patterns, group_divides: int) -> Optional[Tuple[int, int]]:
    """The sparsest supported (N, M) such that every group of M consecutive rows (K) of
    every column holds at most N nonzero weights; groups must not straddle a block of
    `group_divides` rows (a conv's channels per kernel position). None: dense."""
    w = np.asarray(matrix)
    k = w.shape[0]
    if w.dtype == np.uint8:   # N:M applies to signed (symmetric) weights only
        return None
    if w.ndim != 2:
        w = w.reshape(k, -1)
    if w.dtype not in _SCANNED:
        w = (w != 0).view(np.uint8)
    for n, m in patterns:
        if k % m or group_divides % m:
            continue
        if groups_within(w, m, n):
            return n, m
    return None


_SCANNED = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32, np.int64)}


def compressed_bytes(k: int, n: int, wtype: DType, nm: Optional[Tuple[int, int]]) -> int:
    """Bytes of a K x n weight tile as stored (values, then N:M indices)."""
    if nm is None:
        return (k * n * DTYPE_BITS[wtype] + 7) // 8
    kept = k // nm[1] * nm[0] * n
    return (kept * DTYPE_BITS[wtype] + 7) // 8 + (kept * index_bits(nm[1]) + 7) // 8


def encode_weights(matrix: np.ndarray, wtype: DType, nm: Optional[Tuple[int, int]] = None) -> bytes:
    """The bytes of a K x N weight tile as the matrix unit reads it (row-major; sub-byte
    types packed LSB first; BINARY stores bit 1 for +1 and bit 0 for -1). With an N:M
    pattern (n, m): for every group of m rows, the n kept values of each column (K/m*n x N,
    row-major), then their row indices within the group (same order, log2(m) bits each)."""
    if nm is not None:
        n, m = nm
        k, cols = matrix.shape
        groups = np.asarray(matrix).reshape(k // m, m, cols)
        # kept positions: nonzeros first, then the lowest zero rows, in increasing row order
        order = np.argsort(groups == 0, axis=1, kind="stable")[:, :n, :]
        order = np.sort(order, axis=1)
        values = np.take_along_axis(groups, order, axis=1).reshape(k // m * n, cols)
        return encode_weights(values, wtype) + pack_bits(order.reshape(-1).astype(np.int32), index_bits(m))
    if wtype == DType.BINARY:
        return pack_bits((np.asarray(matrix) > 0).astype(np.int32).reshape(-1), 1)
    if wtype in (DType.INT4, DType.INT2):
        return pack_bits(np.asarray(matrix).astype(np.int32).reshape(-1), 4 if wtype == DType.INT4 else 2)
    arr = np.asarray(matrix)
    byte_type = np.dtype(np.uint8 if wtype == DType.UINT8 else np.int8)
    if arr.ndim == 2 and arr.dtype == byte_type and not arr.flags.c_contiguous:
        return row_major_bytes(arr.view(np.uint8))      # a transposed view: a blocked copy
    return arr.astype(byte_type, copy=False).tobytes()
