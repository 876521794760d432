"""Functional simulation: executes a program's instructions bit-exactly.

All inferences of a batch run together: every per-inference memory (the activation
arena, the activation and accumulator buffers) has a leading sample axis, so one
instruction is one vectorised numpy (or torch) operation over the whole batch. The
weight buffer has one copy while it holds constants and gets a sample axis the first
time a per-inference tensor is loaded into it (the second operand of attention's
activation x activation matmuls).

Integer matrix work is exact: int8 x int8 products through `torch._int_mm` (int32
accumulation) with the zero-point corrections added in int64, or float64 products
(exact below 2^53) when torch is absent or an operand varies per sample. The
requantization is `qcompile.quant_math.requantize`, the same function the integer
reference uses.
"""
from __future__ import annotations

from typing import List

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from qcompile._native import unpack_bits
from qcompile.errors import QCompileError
from qcompile.quant_math import requantize

from ..isa import Buf, DType, DTYPE_BITS, DTYPE_NUMPY, Instr, Op, PoolMode, Space, index_bits
from ..program import Program
from .host import HostRunner

__all__ = ["Machine", "SimulationError"]

try:  # the exact int8 GEMM; optional
    import torch as _torch
    _HAS_INT_MM = hasattr(_torch, "_int_mm")
except ImportError:  # pragma: no cover - exercised by the torch-less CI step
    _torch = None
    _HAS_INT_MM = False


class SimulationError(QCompileError):
    """A program touched memory outside its buffers or is otherwise malformed."""


class Machine:
    """The memories of `n` inferences of one program on one target."""

    def __init__(self, program: Program, target, n: int):
        self.program = program
        self.n = n
        self.const = np.zeros((1, _round8(len(program.const))), np.uint8)
        self.const[0, :len(program.const)] = np.frombuffer(program.const, dtype=np.uint8)
        self.arena = np.zeros((n, _round8(program.arena_size)), np.uint8)
        self.act = np.zeros((n, _round8(target.sram["activation"].size_bytes)), np.uint8)
        self.wgt = np.zeros((1, _round8(target.sram["weight"].size_bytes)), np.uint8)
        self.acc = np.zeros((n, target.sram["accumulator"].size_bytes // 4), np.int32)
        self.host = HostRunner(program)
        # bytes each memory really has (the arrays are rounded up to whole words)
        self.limit = {id(self.const): len(program.const), id(self.arena): program.arena_size,
                      id(self.act): target.sram["activation"].size_bytes, id(self.acc): self.acc.shape[1] * 4}
        self.wgt_limit = target.sram["weight"].size_bytes
        self.mac_pairs: dict = {}      # MATMUL index -> MACs with both operands nonzero, per inference
        self.act_nonzero: dict = {}    # MATMUL index -> fraction of A operands that are nonzero

    # -- memory views -------------------------------------------------------------
    def _mem(self, buf: int) -> np.ndarray:
        return (self.act, self.wgt, self.acc)[buf]

    def _typed(self, mem: np.ndarray, dtype: DType) -> np.ndarray:
        npt = np.dtype(DTYPE_NUMPY[dtype])
        return mem if mem.dtype == npt else mem.view(npt)

    def _block(self, mem: np.ndarray, dtype: DType, addr_units: int, unit_bytes: int, dims, strides, what: str
               ) -> np.ndarray:
        """(B, *dims) view of `mem` at an address counted in `unit_bytes` units."""
        if dtype not in DTYPE_NUMPY:
            raise SimulationError(f"{what}: element type {dtype.name} cannot be addressed (sub-byte data moves as "
                                  "UINT8 bytes)")
        typed = self._typed(mem, dtype)
        isz = typed.itemsize
        start_bytes = addr_units * unit_bytes
        if start_bytes % isz:
            raise SimulationError(f"{what}: address {addr_units} is not aligned to {dtype.name}")
        start = start_bytes // isz
        last = start + sum((d - 1) * s for d, s in zip(dims, strides) if d > 0)
        low = start + sum((d - 1) * s for d, s in zip(dims, strides) if d > 0 and s < 0)
        limit = self.limit.get(id(mem), self.wgt_limit if mem is self.wgt else mem.shape[1] * mem.itemsize) // isz
        if low < 0 or last >= limit or start >= limit:
            raise SimulationError(f"{what}: block at {addr_units} (dims {list(dims)}, strides {list(strides)}) "
                                  f"leaves its memory ({limit} {dtype.name} elements)")
        base = typed[:, start:]
        return as_strided(base, shape=(typed.shape[0],) + tuple(dims),
                          strides=(typed.strides[0],) + tuple(s * isz for s in strides), writeable=True)

    def _sram(self, buf: int, dtype: DType, addr: int, dims, strides, what: str) -> np.ndarray:
        unit = 4 if buf == Buf.ACC else 1
        return self._block(self._mem(buf), dtype, addr, unit, dims, strides, what)

    def _promote_wgt(self) -> None:
        if self.wgt.shape[0] == 1 and self.n > 1:
            self.wgt = np.repeat(self.wgt, self.n, axis=0)

    # -- execution ------------------------------------------------------------------
    def run(self, instrs: List[Instr]) -> None:
        table = {Op.LOAD: self._load, Op.STORE: self._store, Op.MATMUL: self._matmul, Op.VFILL: self._vfill,
                 Op.VREQ: self._vreq, Op.VADD: self._vadd, Op.VMUL: self._vmul, Op.VLUT: self._vlut,
                 Op.VPOOL: self._vpool, Op.VDWCONV: self._vdwconv, Op.HOST: self._host}
        for pc, ins in enumerate(instrs):
            table[ins.op](ins.args, pc)

    def _load(self, a, pc):
        dtype = DType(a["dtype"])
        dims, s, t = (a["n0"], a["n1"], a["n2"]), (a["s0"], a["s1"], a["s2"]), (a["t0"], a["t1"], a["t2"])
        src_mem = self.const if a["space"] == Space.CONST else self.arena
        src = self._block(src_mem, dtype, a["dram"], 1, dims, s, f"instruction {pc} LOAD source")
        if a["buf"] == Buf.WGT and src.shape[0] > 1:
            self._promote_wgt()
        dst = self._sram(a["buf"], dtype, a["addr"], dims, t, f"instruction {pc} LOAD destination")
        dst[...] = src

    def _store(self, a, pc):
        if a["space"] != Space.ACT:
            raise SimulationError(f"instruction {pc} STORE: space {a['space']}: only the activation arena (1) is "
                                  "writable")
        dtype = DType(a["dtype"])
        dims, s, t = (a["n0"], a["n1"], a["n2"]), (a["s0"], a["s1"], a["s2"]), (a["t0"], a["t1"], a["t2"])
        src = self._sram(a["buf"], dtype, a["addr"], dims, t, f"instruction {pc} STORE source")
        dst = self._block(self.arena, dtype, a["dram"], 1, dims, s, f"instruction {pc} STORE destination")
        dst[...] = src

    def _weights(self, a, k: int, n: int, pc: int) -> np.ndarray:
        """(Bw, K, n) int array of the B operand (decompressed when N:M-sparse)."""
        btype = DType(a["b_type"])
        if a["b_buf"] not in (Buf.WGT, Buf.ACT):
            raise SimulationError(f"instruction {pc} MATMUL: b_buf {a['b_buf']} must be WGT_BUF (1) or ACT_BUF (0)")
        mem = self._mem(a["b_buf"])
        sp_n, sp_m = a["sp_n"], a["sp_m"]
        bits = DTYPE_BITS[btype]
        if not sp_m and bits >= 8:
            return self._block(mem, btype, a["b_addr"], 1, (k, n), (n, 1), f"instruction {pc} MATMUL B")
        rows = k // sp_m * sp_n if sp_m else k
        vbytes = (rows * n * bits + 7) // 8
        ibytes = (rows * n * index_bits(sp_m) + 7) // 8 if sp_m else 0
        raw = self._block(mem, DType.UINT8, a["b_addr"], 1, (vbytes + ibytes,), (1,), f"instruction {pc} MATMUL B")
        out = []
        for row in raw:
            data = np.ascontiguousarray(row).tobytes()
            if bits >= 8:
                vals = np.frombuffer(data[:vbytes], DTYPE_NUMPY[btype])
            else:
                vals = unpack_bits(data[:vbytes], bits, rows * n, btype != DType.BINARY).astype(np.int8)
                if btype == DType.BINARY:
                    vals = (2 * vals - 1).astype(np.int8)
            vals = vals.reshape(rows, n)
            if sp_m:
                idx = unpack_bits(data[vbytes:], index_bits(sp_m), rows * n, False).reshape(k // sp_m, sp_n, n)
                dense = np.full((k // sp_m, sp_m, n), a["b_zp"], vals.dtype)   # dropped weights are real zeros
                np.put_along_axis(dense, idx.astype(np.int64), vals.reshape(k // sp_m, sp_n, n), axis=1)
                vals = dense.reshape(k, n)
            out.append(vals)
        return np.stack(out)

    def _matmul(self, a, pc):
        m0, m1 = a["m0"], a["m1"]
        kd = (a["k0"], a["k1"], a["k2"])
        k = kd[0] * kd[1] * kd[2]
        n = a["n"]
        atype = DType(a["a_type"])
        av = self._sram(Buf.ACT, atype, a["a_addr"], (m0, m1) + kd,
                        (a["ms0"], a["ms1"], a["ks0"], a["ks1"], a["ks2"]), f"instruction {pc} MATMUL A")
        A = av.reshape(av.shape[0], m0 * m1, k)
        B = self._weights(a, k, n, pc)
        acc = self._sram(Buf.ACC, DType.INT32, a["acc"], (m0 * m1, n), (n, 1), f"instruction {pc} MATMUL acc")
        acc += exact_matmul(A, a["a_zp"], B, a["b_zp"]).astype(np.int32)
        # MACs whose two operands are both nonzero (the others skip their energy)
        nz_a = (A != a["a_zp"]).reshape(-1, k).astype(np.float32)
        nz_b = (B != a["b_zp"]).sum(axis=2, dtype=np.float32)                 # (Bw, K)
        pairs = nz_a @ nz_b[0] if nz_b.shape[0] == 1 else np.einsum("smk,sk->sm", nz_a.reshape(A.shape), nz_b)
        self.mac_pairs[pc] = float(pairs.sum()) / A.shape[0]
        self.act_nonzero[pc] = float(nz_a.mean()) if nz_a.size else 1.0

    def _vfill(self, a, pc):
        v = self._sram(a["buf"], DType(a["dtype"]), a["addr"], (a["count"],), (1,), f"instruction {pc} VFILL")
        if np.issubdtype(v.dtype, np.integer):
            info = np.iinfo(v.dtype)
            if not info.min <= a["value"] <= info.max:
                raise SimulationError(f"instruction {pc} VFILL: value {a['value']} does not fit {v.dtype}")
        v[...] = a["value"]

    def _vreq(self, a, pc):
        x = self._sram(a["src_buf"], DType(a["dtype_in"]), a["src"], (a["rows"], a["cols"]), (a["rs"], a["cs"]),
                       f"instruction {pc} VREQ source")
        if a["params"] >= 0:
            if a["per"] not in (1, 2):
                raise SimulationError(f"instruction {pc} VREQ: per={a['per']} (1: per column, 2: per row)")
            count = a["cols"] if a["per"] == 1 else a["rows"]
            p = self._block(self.wgt, DType.INT32, a["params"], 1, (count, 2), (2, 1), f"instruction {pc} VREQ params")
            m, s = p[..., 0].astype(np.int64), p[..., 1].astype(np.int64)
            m = m[:, None, :] if a["per"] == 1 else m[:, :, None]
            s = s[:, None, :] if a["per"] == 1 else s[:, :, None]
        else:
            m, s = a["mult"], a["shift"]
        y = requantize(x.astype(np.int64) - a["x_zp"], m, s, a["out_zp"], a["lo"], a["hi"])
        dst = self._sram(Buf.ACT, DType(a["dtype_out"]), a["dst"], (a["rows"], a["cols"]), (a["drs"], a["dcs"]),
                         f"instruction {pc} VREQ destination")
        dst[...] = y.astype(dst.dtype)

    def _operands(self, a, pc, what):
        c = a["count"]
        x = self._sram(Buf.ACT, DType(a["dtype_a"]), a["a"], (c,), (1,), f"instruction {pc} {what} a")
        y = self._sram(Buf.ACT, DType(a["dtype_b"]), a["b"], (c,), (1,), f"instruction {pc} {what} b")
        d = self._sram(Buf.ACT, DType(a["dtype_out"]), a["dst"], (c,), (1,), f"instruction {pc} {what} dst")
        return x.astype(np.int64) - a["a_zp"], y.astype(np.int64) - a["b_zp"], d

    def _vadd(self, a, pc):
        x, y, d = self._operands(a, pc, "VADD")
        acc = x * a["ma"] + y * a["mb"]
        d[...] = requantize(acc, 1, a["shift"], a["out_zp"], a["lo"], a["hi"]).astype(d.dtype)

    def _vmul(self, a, pc):
        x, y, d = self._operands(a, pc, "VMUL")
        d[...] = requantize(x * y, a["mult"], a["shift"], a["out_zp"], a["lo"], a["hi"]).astype(d.dtype)

    def _vlut(self, a, pc):
        c, nch = a["count"], a["nch"]
        tin, tout = DType(a["dtype_in"]), DType(a["dtype_out"])
        if tin not in (DType.INT8, DType.UINT8):
            raise SimulationError(f"instruction {pc} VLUT: the index must be INT8 or UINT8, got {tin.name}")
        x = self._sram(Buf.ACT, tin, a["src"], (c,), (1,), f"instruction {pc} VLUT source")
        tables = self._block(self.wgt, tout, a["table"], 1, (nch, 256), (256, 1), f"instruction {pc} VLUT tables")
        lo = -128 if tin == DType.INT8 else 0
        idx = x.astype(np.int64) - lo
        if nch > 1:
            idx = idx + 256 * ((np.arange(c) // a["inner"]) % nch)
        flat = tables.reshape(tables.shape[0], nch * 256)
        d = self._sram(Buf.ACT, tout, a["dst"], (c,), (1,), f"instruction {pc} VLUT destination")
        if flat.shape[0] == 1:
            d[...] = flat[0][idx]
        else:
            d[...] = np.take_along_axis(flat, idx, axis=1)

    def _planes(self, a, pc, what):
        dtype = DType(a["dtype"])
        c, ih, iw = a["channels"], a["ih"], a["iw"]
        x = self._sram(Buf.ACT, dtype, a["src"], (c, ih, iw), (ih * iw, iw, 1), f"instruction {pc} {what} source")
        kh, kw, sh, sw, dh, dw = a["kh"], a["kw"], a["sh"], a["sw"], a["dh"], a["dw"]
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        if (a["oh"] - 1) * sh + eh > ih or (a["ow"] - 1) * sw + ew > iw:
            raise SimulationError(f"instruction {pc} {what}: {a['oh']}x{a['ow']} windows do not fit the {ih}x{iw} plane")
        win = sliding_window_view(x, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        return win[:, :, :a["oh"], :a["ow"]]

    def _vpool(self, a, pc):
        win = self._planes(a, pc, "VPOOL")
        dtype = DType(a["dtype"])
        shape = (a["channels"], a["oh"], a["ow"])
        if a["mode"] == PoolMode.MAX:
            y = win.max(axis=(4, 5))
            dst = self._sram(Buf.ACT, dtype, a["dst"], shape, (a["oh"] * a["ow"], a["ow"], 1), f"instruction {pc}")
            dst[...] = y
            return
        acc = win.astype(np.int64).sum(axis=(4, 5)) - a["x_zp"] * (a["kh"] * a["kw"])
        y = requantize(acc, a["mult"], a["shift"], a["out_zp"], a["lo"], a["hi"])
        dst = self._sram(Buf.ACT, dtype, a["dst"], shape, (a["oh"] * a["ow"], a["ow"], 1), f"instruction {pc}")
        dst[...] = y.astype(dst.dtype)

    def _vdwconv(self, a, pc):
        dtype = DType(a["dtype"])
        c, ih, iw, oh, ow = a["channels"], a["ih"], a["iw"], a["oh"], a["ow"]
        kh, kw, sh, sw, dh, dw = a["kh"], a["kw"], a["sh"], a["sw"], a["dh"], a["dw"]
        x = self._sram(Buf.ACT, dtype, a["src"], (c, ih, iw), (ih * iw, iw, 1), f"instruction {pc} VDWCONV source")
        w = self._block(self.wgt, DType.INT8, a["wgt"], 1, (c, kh, kw), (kh * kw, kw, 1), f"instruction {pc} weights")
        acc = self._sram(Buf.ACC, DType.INT32, a["acc"], (c, oh, ow), (oh * ow, ow, 1), f"instruction {pc} acc")
        xc = x.astype(np.int32) - a["x_zp"]
        total = np.zeros(acc.shape, np.int32)
        for i in range(kh):
            for j in range(kw):
                r, q = i * dh, j * dw
                tap = xc[:, :, r:r + (oh - 1) * sh + 1:sh, q:q + (ow - 1) * sw + 1:sw]
                total += tap * w[:, :, i, j].astype(np.int32)[:, :, None, None]
        acc += total

    def _host(self, a, pc):
        self.host.run(a["index"], self.arena)


def exact_matmul(A: np.ndarray, za: int, B: np.ndarray, zb: int) -> np.ndarray:
    """sum_k (A - za) * (B - zb), exact, as int64: A is (N, M, K), B is (1 or N, K, n)."""
    n, m, k = A.shape
    if _HAS_INT_MM and B.shape[0] == 1 and A.dtype.itemsize == 1 and B.dtype.itemsize <= 1 and m * n >= 16:
        a8, za8 = _as_int8(A, za)
        b8, zb8 = _as_int8(B[0], zb)
        raw = _torch._int_mm(_torch.from_numpy(np.ascontiguousarray(a8.reshape(n * m, k))),
                             _torch.from_numpy(np.ascontiguousarray(b8))).numpy().astype(np.int64)
        raw = raw.reshape(n, m, -1)
        if zb8:
            raw -= zb8 * a8.astype(np.int64).sum(axis=2, keepdims=True)
        if za8:
            raw -= za8 * b8.astype(np.int64).sum(axis=0)[None, None, :]
        if za8 and zb8:
            raw += k * za8 * zb8
        return raw
    ac = A.astype(np.float64) - za
    bc = B.astype(np.float64) - zb
    return np.rint(np.matmul(ac, bc)).astype(np.int64)


def _as_int8(x: np.ndarray, zp: int):
    """(int8 array, zero point) with the same centred values x - zp."""
    if x.dtype == np.int8:
        return x, int(zp)
    if x.dtype == np.uint8:
        return (x.astype(np.int16) - 128).astype(np.int8), int(zp) - 128
    xi = x.astype(np.int64)
    if xi.min(initial=0) < -128 or xi.max(initial=0) > 127:
        raise SimulationError("matrix operand does not fit 8 bits")
    return xi.astype(np.int8), int(zp)


def _round8(n: int) -> int:
    return max(8, (int(n) + 7) // 8 * 8)
