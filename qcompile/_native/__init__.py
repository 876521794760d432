"""Compiled helpers (Cython). Each module has a thin, checked Python wrapper here."""
from __future__ import annotations

import numpy as np

from . import bitpack as _bitpack

__all__ = ["pack_bits", "unpack_bits"]


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack integers of width `bits` (1-8) into bytes, first element in the lowest bits.

    Values must already lie in the range of a `bits`-wide integer (signed or unsigned);
    only their low `bits` bits are stored.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    flat = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=np.int32)
    out = np.zeros((flat.size * bits + 7) // 8, dtype=np.uint8)
    _bitpack.pack_into(flat, bits, out)
    return out.tobytes()


def unpack_bits(data: bytes, bits: int, count: int, signed: bool) -> np.ndarray:
    """Inverse of pack_bits: `count` integers of width `bits` as an int32 array."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in 1..8, got {bits}")
    buf = np.frombuffer(data, dtype=np.uint8)
    need = (count * bits + 7) // 8
    if buf.size < need:
        raise ValueError(f"unpack_bits: {count} values of {bits} bits need {need} bytes, got {buf.size}")
    out = np.empty(count, dtype=np.int32)
    _bitpack.unpack_into(np.ascontiguousarray(buf), bits, signed, out)
    return out
