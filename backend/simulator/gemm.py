"""The simulator's exact int8 GEMM: acc += A B for int8 A (rows, K) and B (K, n), int32 accumulation.

Two exact ways, picked per process by speed (their results are identical):

- `int_mm`: `torch._int_mm`, int8 x int8 -> int32. Fast where oneDNN has an int8 kernel
  for the CPU (VNNI); on others (AVX2-only x86, for one) it falls back to a loop that runs
  at a few GOP/s.
- `float32`: float32 products (torch's BLAS, or numpy's without torch) over K in chunks of
  at most `K_CHUNK` = 1024. Every |product| is at most 128 * 128 = 2^14, so every partial
  sum of a chunk, in whatever order the BLAS adds, is an integer of magnitude at most
  2^24, which float32 holds exactly; each chunk's sum then goes into the int32
  accumulator (wrapping modulo 2^32, as the hardware's does).

`engine()` times both once on a small problem and keeps the faster; the environment
variable QCOMPILE_GEMM=int_mm or float32 forces one (tests run both).

Small products with constant weights skip both where that is faster: the functional
simulator's direct kernel (`_kernels.madd_gemm`, chosen by `functional._direct_pays`)
gathers A's rows from their view and multiplies int16 pairs. QCOMPILE_GEMM=direct
forces it wherever it applies (the float32 engine elsewhere); naming another engine
turns it off.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from . import _kernels

try:  # optional: without torch, numpy's float32 GEMM does the work
    import torch as _torch
except ImportError:  # pragma: no cover - exercised by the torch-less CI step
    _torch = None

__all__ = ["engine", "direct_mode", "ENGINES", "K_CHUNK", "Float32Gemm", "IntMmGemm"]

K_CHUNK = 1024                     # 1024 * 2^14 = 2^24: float32 sums of a chunk are exact
ENGINES = ("int_mm", "float32")
DIRECT = "direct"                  # QCOMPILE_GEMM's third choice (module doc)


class Float32Gemm:
    """Exact int8 GEMM through float32 products, K in chunks of `K_CHUNK` (module doc)."""

    name = "float32"
    operand = np.float32              # the dtype im2col should produce for A

    def prepare(self, b8: np.ndarray):
        """B's form kept across runs: float32 (K, n), contiguous."""
        b = np.ascontiguousarray(b8, np.float32)
        return _torch.from_numpy(b) if _torch is not None else b

    def product(self, a: np.ndarray, b, k0: int, k1: int, out: np.ndarray) -> np.ndarray:
        """out = A[:, k0:k1] B[k0:k1] in float32 (exact for k1 - k0 <= K_CHUNK); A (rows, K),
        or channel-major (S, K, m) for the rows of S samples (out (S m, n))."""
        if a.ndim == 3:                   # one batched product of the samples' transposes
            outs = out.reshape(a.shape[0], a.shape[2], out.shape[1])
            if _torch is not None:
                at = _torch.from_numpy(a)[:, k0:k1].transpose(1, 2)
                _torch.bmm(at, b[k0:k1].expand(a.shape[0], -1, -1), out=_torch.from_numpy(outs))
            else:
                np.matmul(a[:, k0:k1].transpose(0, 2, 1), b[k0:k1], out=outs)
            return out
        if _torch is not None:
            _torch.mm(_torch.from_numpy(a)[:, k0:k1], b[k0:k1], out=_torch.from_numpy(out))
        else:
            np.matmul(a[:, k0:k1], b[k0:k1], out=out)
        return out

    def accumulate(self, acc: np.ndarray, a: np.ndarray, b, col: Optional[np.ndarray] = None,
                   row: Optional[np.ndarray] = None, assign: bool = False) -> None:
        """acc (S, m, n) int32 += A B [+ col[j]] [+ row[r]] (`assign`: = instead), rows r of A
        (S m, K), or of channel-major A (S, K, m) whose samples are A's transposes, in acc's
        order, modulo 2^32."""
        k = a.shape[1]
        out = np.empty((acc.shape[0] * acc.shape[1], acc.shape[2]), np.float32)
        for k0 in range(0, max(k, 1), K_CHUNK):
            self.product(a, b, k0, min(k, k0 + K_CHUNK), out)
            _kernels.accumulate(acc, out, col if k0 == 0 else None, row if k0 == 0 else None, assign and k0 == 0)


class IntMmGemm:
    """Exact int8 GEMM through `torch._int_mm` (module doc)."""

    name = "int_mm"
    operand = np.int8

    def prepare(self, b8: np.ndarray):
        """B's form kept across runs: an int8 (K, n) copy (b8 may view the weight buffer,
        which later loads overwrite)."""
        return _torch.from_numpy(np.array(b8, np.int8, order="C", copy=True))

    def product_into(self, a: np.ndarray, b, out: np.ndarray) -> None:
        """out (rows, n) int32, contiguous = A B (no accumulator pass: `_SharedA`'s products)."""
        _torch._int_mm(_torch.from_numpy(a), b, out=_torch.from_numpy(out))

    def accumulate(self, acc: np.ndarray, a: np.ndarray, b, col: Optional[np.ndarray] = None,
                   row: Optional[np.ndarray] = None, assign: bool = False) -> None:
        res = _torch._int_mm(_torch.from_numpy(a), b).numpy()
        _kernels.accumulate(acc, res, col, row, assign)      # one pass: product and zero-point terms


_ENGINE = None


def engine():
    """The GEMM engine of this process: forced by QCOMPILE_GEMM, else the faster one here."""
    global _ENGINE
    choice = _choice()
    if choice == DIRECT:
        choice = "float32"
    if _ENGINE is not None and (not choice or _ENGINE.name == choice):
        return _ENGINE
    if choice == "int_mm" and not _has_int_mm():
        raise ValueError("QCOMPILE_GEMM=int_mm needs torch with torch._int_mm")
    if choice:
        _ENGINE = IntMmGemm() if choice == "int_mm" else Float32Gemm()
    else:
        _ENGINE = IntMmGemm() if _has_int_mm() and _int_mm_faster() else Float32Gemm()
    return _ENGINE


def direct_mode() -> str:
    """"on" (QCOMPILE_GEMM=direct), "off" (another engine forced) or "auto" (by size)."""
    choice = _choice()
    return "auto" if not choice else "on" if choice == DIRECT else "off"


def _choice() -> str:
    choice = os.environ.get("QCOMPILE_GEMM", "").strip().lower()
    if choice and choice not in ENGINES + (DIRECT,):
        raise ValueError(f"QCOMPILE_GEMM={choice!r}: choose one of {', '.join(ENGINES + (DIRECT,))}")
    return choice


def _has_int_mm() -> bool:
    return _torch is not None and hasattr(_torch, "_int_mm")


def _int_mm_faster() -> bool:
    """Whether torch._int_mm beats float32 on a (512, 512) x (512, 64) product here
    (a few milliseconds, once per process)."""
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (512, 512), dtype=np.int8)
    b = rng.integers(-128, 128, (512, 64), dtype=np.int8)
    acc = np.zeros((1, 512, 64), np.int32)
    best = {}
    for gemm in (IntMmGemm(), Float32Gemm()):
        operand, prepared = a.astype(gemm.operand), gemm.prepare(b)
        gemm.accumulate(acc, operand, prepared)          # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            gemm.accumulate(acc, operand, prepared)
        best[gemm.name] = time.perf_counter() - t0
    return best["int_mm"] < best["float32"]
