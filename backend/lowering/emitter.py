"""Instruction emission with virtual SRAM buffers, then allocation and dependency tokens.

Layer schedulers (`matrix.py`, `vector.py`, `host.py`) emit instructions whose SRAM
addresses are `Ref(vbuf, offset)`: places in virtual buffers that do not have an
address yet. At the end of each layer, `finish_layer` gives every virtual buffer an
address by liveness (`_alloc.allocate`): it fails (`OutOfSram`) when the layer's tiles
do not fit, and the scheduler retries with smaller tiles. `finish` then derives the
dependency tokens from each instruction's memory footprint (`_deps.insert_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..isa import Buf, DType, DTYPE_BITS, Instr, Op, SPECS, Space, Unit
from ._alloc import allocate
from ._deps import insert_tokens

__all__ = ["Ref", "Emitter", "OutOfSram", "MEM_DRAM", "verify_tokens"]

MEM_DRAM = 3                   # footprint memory id of the DRAM activation arena
_LINE = (64, 64, 16, 64)       # dependency tracking granularity per memory (units)
_ALIGN = (64, 64, 16)          # SRAM allocation alignment per buffer (units)


class OutOfSram(Exception):
    """A layer's tiles do not fit the SRAM buffers (the scheduler shrinks them)."""


@dataclass(frozen=True)
class Ref:
    vbuf: int
    offset: int = 0

    def __add__(self, k: int) -> "Ref":
        return Ref(self.vbuf, self.offset + int(k))


def elem_units(buf: Buf, dtype: DType) -> int:
    """Size of one element in the buffer's address unit (bytes, or words for ACC)."""
    if buf == Buf.ACC:
        return 1
    return max(1, DTYPE_BITS[dtype] // 8)


def span(dims: Sequence[int], strides: Sequence[int]) -> int:
    """Number of elements from the first to the last one touched, inclusive."""
    return 1 + sum((d - 1) * abs(s) for d, s in zip(dims, strides) if d > 0)


class Emitter:
    def __init__(self, target):
        self.target = target
        self.capacity = {Buf.ACT: target.sram["activation"].size_bytes,
                         Buf.WGT: target.sram["weight"].size_bytes,
                         Buf.ACC: target.sram["accumulator"].size_bytes // 4}
        self.instrs: List[Instr] = []
        self.foot: List[List[Tuple[int, object, int, int, bool]]] = []  # (mem, base, lo, hi, write)
        self.vbufs: List[Tuple[Buf, int]] = []
        self.layer_start = 0
        self.vbuf_start = 0
        self.peak: Dict[Buf, int] = {b: 0 for b in Buf}

    # -- virtual buffers and layers ----------------------------------------------------
    def vbuf(self, buf: Buf, size: int) -> Ref:
        if size > self.capacity[buf]:
            raise OutOfSram(f"{buf.name} tile of {size} exceeds the buffer ({self.capacity[buf]})")
        self.vbufs.append((buf, int(size)))
        return Ref(len(self.vbufs) - 1)

    def begin_layer(self) -> None:
        self.layer_start = len(self.instrs)
        self.vbuf_start = len(self.vbufs)

    def rollback(self) -> None:
        del self.instrs[self.layer_start:]
        del self.foot[self.layer_start:]
        del self.vbufs[self.vbuf_start:]

    def finish_layer(self) -> None:
        """Give the layer's virtual buffers addresses by liveness; OutOfSram if they do not fit."""
        first: Dict[int, int] = {}
        last: Dict[int, int] = {}
        for i in range(self.layer_start, len(self.instrs)):
            for mem, base, lo, hi, w in self.foot[i]:
                if isinstance(base, Ref):
                    first.setdefault(base.vbuf, i)
                    last[base.vbuf] = i
        address: Dict[int, int] = {}
        for buf in (Buf.ACT, Buf.WGT, Buf.ACC):
            ids = [v for v in range(self.vbuf_start, len(self.vbufs)) if self.vbufs[v][0] == buf and v in first]
            if not ids:
                continue
            starts = np.array([first[v] for v in ids], np.int64)
            ends = np.array([last[v] for v in ids], np.int64)
            sizes = np.array([self.vbufs[v][1] for v in ids], np.int64)
            offsets, peak = allocate(starts, ends, sizes, self.capacity[buf], _ALIGN[buf])
            if np.any(offsets < 0):
                raise OutOfSram(f"{buf.name} tiles need more than {self.capacity[buf]}")
            self.peak[buf] = max(self.peak[buf], int(peak))
            address.update(zip(ids, offsets.tolist()))
        for i in range(self.layer_start, len(self.instrs)):
            ins = self.instrs[i]
            for k, val in ins.args.items():
                if isinstance(val, Ref):
                    ins.args[k] = address.get(val.vbuf, 0) + val.offset
            self.foot[i] = [(mem, (address.get(b.vbuf, 0) + b.offset) if isinstance(b, Ref) else b, lo, hi, w)
                            for mem, b, lo, hi, w in self.foot[i]]
        self.layer_start = len(self.instrs)
        self.vbuf_start = len(self.vbufs)

    def finish(self, arena_size: int) -> List[Instr]:
        """Insert the dependency tokens; returns the instructions."""
        n = len(self.instrs)
        units = np.array([int(SPECS[i.op].unit) for i in self.instrs], np.int8)
        rows = [(j, mem, base + lo, base + hi, w) for j, fp in enumerate(self.foot) for mem, base, lo, hi, w in fp
                if hi > lo]
        arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
        sizes = [self.capacity[Buf.ACT], self.capacity[Buf.WGT], self.capacity[Buf.ACC], max(arena_size, 1)]
        lines = np.array([(s + _LINE[m] - 1) // _LINE[m] for m, s in enumerate(sizes)], np.int64)
        wait, signal = insert_tokens(units, np.ascontiguousarray(arr[:, 0]), arr[:, 1].astype(np.int8),
                                     np.ascontiguousarray(arr[:, 2]), np.ascontiguousarray(arr[:, 3]),
                                     arr[:, 4].astype(np.int8), lines, np.array(_LINE, np.int64))
        for j in range(n):
            self.instrs[j].wait = int(wait[j])
            self.instrs[j].signal = int(signal[j])
        self.physical = arr
        return self.instrs


    # -- instructions ---------------------------------------------------------------
    def _add(self, op: Op, layer: int, foot, **args) -> Instr:
        ins = Instr(op, args, layer=layer)
        self.instrs.append(ins)
        self.foot.append(foot)
        return ins

    def load(self, layer: int, dst: Ref, space: Space, dram: int, dtype: DType, dims, src_strides, dst_strides
             ) -> None:
        buf = self.vbufs[dst.vbuf][0]
        self._dma(Op.LOAD, layer, buf, dst, space, dram, dtype, dims, src_strides, dst_strides)

    def store(self, layer: int, src: Ref, dram: int, dtype: DType, dims, dram_strides, sram_strides) -> None:
        buf = self.vbufs[src.vbuf][0]
        self._dma(Op.STORE, layer, buf, src, Space.ACT, dram, dtype, dims, dram_strides, sram_strides)

    def _dma(self, op, layer, buf, ref, space, dram, dtype, dims, s, t):
        dims = [int(d) for d in dims]
        dims = [1] * (3 - len(dims)) + dims
        s = [0] * (3 - len(s)) + [int(x) for x in s]
        t = [0] * (3 - len(t)) + [int(x) for x in t]
        esz = DTYPE_BITS[dtype] // 8
        sram_hi = span(dims, t) * elem_units(buf, dtype)
        foot = [(int(buf), ref, 0, sram_hi, op == Op.LOAD)]
        if space == Space.ACT:
            foot.append((MEM_DRAM, 0, dram, dram + span(dims, s) * esz, op == Op.STORE))
        self._add(op, layer, foot, buf=int(buf), addr=ref, space=int(space), dram=int(dram), dtype=int(dtype),
                  n0=dims[0], n1=dims[1], n2=dims[2], s0=s[0], s1=s[1], s2=s[2], t0=t[0], t1=t[1], t2=t[2])

    def matmul(self, layer: int, a: Ref, a_type: DType, a_zp: int, mdims, mstrides, kdims, kstrides, b: Ref,
               b_type: DType, b_zp: int, n: int, acc: Ref, fill: bool, nm=None) -> None:
        from .context import compressed_bytes

        m = mdims[0] * mdims[1]
        k = kdims[0] * kdims[1] * kdims[2]
        b_buf = self.vbufs[b.vbuf][0]
        b_bytes = compressed_bytes(k, n, b_type, nm)
        foot = [(int(Buf.ACT), a, 0, span(list(mdims) + list(kdims), list(mstrides) + list(kstrides))),
                (int(b_buf), b, 0, b_bytes), (int(Buf.ACC), acc, 0, m * n)]
        foot = [(mem, base, lo, hi, False) for mem, base, lo, hi in foot] + [(int(Buf.ACC), acc, 0, m * n, True)]
        self._add(Op.MATMUL, layer, foot, a_addr=a, a_type=int(a_type), a_zp=int(a_zp), m0=mdims[0], m1=mdims[1],
                  ms0=mstrides[0], ms1=mstrides[1], k0=kdims[0], k1=kdims[1], k2=kdims[2], ks0=kstrides[0],
                  ks1=kstrides[1], ks2=kstrides[2], b_addr=b, b_buf=int(b_buf), b_type=int(b_type), b_zp=int(b_zp),
                  n=n, acc=acc, fill=int(bool(fill)), sp_n=nm[0] if nm else 0, sp_m=nm[1] if nm else 0)

    def vfill(self, layer: int, dst: Ref, dtype: DType, count: int, value: int) -> None:
        buf = self.vbufs[dst.vbuf][0]
        self._add(Op.VFILL, layer, [(int(buf), dst, 0, count * elem_units(buf, dtype), True)], buf=int(buf),
                  addr=dst, dtype=int(dtype), count=int(count), value=int(value))

    def vreq(self, layer: int, src: Ref, dtype_in: DType, rows: int, cols: int, rs: int, cs: int, dst: Ref,
             dtype_out: DType, drs: int, dcs: int, x_zp: int, params, per: int, mult: int, shift: int,
             out_zp: int, lo: int, hi: int) -> None:
        src_buf = self.vbufs[src.vbuf][0]
        foot = [(int(src_buf), src, 0, span([rows, cols], [rs, cs]) * elem_units(src_buf, dtype_in), False),
                (int(Buf.ACT), dst, 0, span([rows, cols], [drs, dcs]) * elem_units(Buf.ACT, dtype_out), True)]
        if isinstance(params, Ref):
            n = cols if per == 1 else rows
            foot.append((int(Buf.WGT), params, 0, 8 * n, False))
        self._add(Op.VREQ, layer, foot, src_buf=int(src_buf), src=src, dtype_in=int(dtype_in), rows=rows,
                  cols=cols, rs=rs, cs=cs, dst=dst, dtype_out=int(dtype_out), drs=drs, dcs=dcs, x_zp=x_zp,
                  params=params if isinstance(params, Ref) else -1, per=per, mult=mult, shift=shift,
                  out_zp=out_zp, lo=lo, hi=hi)

    def vbinary(self, layer: int, op: Op, a: Ref, b: Ref, dst: Ref, count: int, types, **imm) -> None:
        ta, tb, to = types
        foot = [(int(Buf.ACT), a, 0, count * elem_units(Buf.ACT, ta), False),
                (int(Buf.ACT), b, 0, count * elem_units(Buf.ACT, tb), False),
                (int(Buf.ACT), dst, 0, count * elem_units(Buf.ACT, to), True)]
        self._add(op, layer, foot, a=a, b=b, dst=dst, count=count, dtype_a=int(ta), dtype_b=int(tb),
                  dtype_out=int(to), **imm)

    def vlut(self, layer: int, src: Ref, dst: Ref, count: int, tin: DType, tout: DType, table: Ref, inner: int = 0,
             nch: int = 1) -> None:
        foot = [(int(Buf.ACT), src, 0, count, False), (int(Buf.WGT), table, 0, 256 * nch, False),
                (int(Buf.ACT), dst, 0, count, True)]
        self._add(Op.VLUT, layer, foot, src=src, dst=dst, count=count, dtype_in=int(tin), dtype_out=int(tout),
                  table=table, inner=int(inner or count), nch=int(nch))

    def vpool(self, layer: int, src: Ref, dst: Ref, dtype: DType, channels: int, ih: int, iw: int, kh: int,
              kw: int, sh: int, sw: int, dh: int, dw: int, oh: int, ow: int, mode: int, x_zp=0, mult=0,
              shift=0, out_zp=0, lo=-128, hi=127) -> None:
        e = elem_units(Buf.ACT, dtype)
        foot = [(int(Buf.ACT), src, 0, channels * ih * iw * e, False),
                (int(Buf.ACT), dst, 0, channels * oh * ow * e, True)]
        self._add(Op.VPOOL, layer, foot, src=src, dst=dst, dtype=int(dtype), channels=channels, ih=ih, iw=iw,
                  kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, oh=oh, ow=ow, mode=mode, x_zp=x_zp, mult=mult,
                  shift=shift, out_zp=out_zp, lo=lo, hi=hi)

    def vdwconv(self, layer: int, src: Ref, dtype: DType, x_zp: int, channels: int, ih: int, iw: int, kh: int,
                kw: int, sh: int, sw: int, dh: int, dw: int, oh: int, ow: int, wgt: Ref, acc: Ref) -> None:
        foot = [(int(Buf.ACT), src, 0, channels * ih * iw, False), (int(Buf.WGT), wgt, 0, channels * kh * kw, False),
                (int(Buf.ACC), acc, 0, channels * oh * ow, False), (int(Buf.ACC), acc, 0, channels * oh * ow, True)]
        self._add(Op.VDWCONV, layer, foot, src=src, dtype=int(dtype), x_zp=x_zp, channels=channels, ih=ih, iw=iw,
                  kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, oh=oh, ow=ow, wgt=wgt, acc=acc)

    def host(self, layer: int, index: int, reads: Sequence[Tuple[int, int]], writes: Sequence[Tuple[int, int]]
             ) -> None:
        foot = [(MEM_DRAM, 0, a, a + n, False) for a, n in reads] + [(MEM_DRAM, 0, a, a + n, True) for a, n in writes]
        self._add(Op.HOST, layer, foot, index=index)

    @property
    def units(self) -> List[Unit]:
        return [SPECS[i.op].unit for i in self.instrs]


def verify_tokens(instrs: Sequence[Instr], footprints: np.ndarray) -> List[str]:
    """Independent check of the dependency tokens: every pair of instructions on
    different units that touch the same memory line, one of them writing, must be
    ordered by program order on one unit plus FIFO-matched tokens (vector clocks).
    `footprints` rows are (instr, mem, lo, hi, write). Returns the violations."""
    n = len(instrs)
    units = [int(SPECS[i.op].unit) for i in instrs]
    seq = [0] * n
    count = [0, 0, 0, 0]
    clock = np.zeros((n, 4), np.int64)          # clock[j][u]: unit u's instructions known done, +1
    last_on = [-1, -1, -1, -1]
    queues = {(a, b): [] for a in range(4) for b in range(4)}
    problems: List[str] = []
    for j, ins in enumerate(instrs):
        u = units[j]
        count[u] += 1
        seq[j] = count[u]
        c = clock[last_on[u]].copy() if last_on[u] >= 0 else np.zeros(4, np.int64)
        for v in range(4):
            if ins.wait >> v & 1:
                if not queues[(v, u)]:
                    problems.append(f"instruction {j} waits for a token {Unit(v).name} never pushed")
                    continue
                c = np.maximum(c, clock[queues[(v, u)].pop(0)])
        c[u] = seq[j]
        clock[j] = c
        last_on[u] = j
        for v in range(4):
            if ins.signal >> v & 1:
                queues[(u, v)].append(j)
    by_instr: Dict[int, List[Tuple[int, int, int, bool]]] = {}
    for j, mem, lo, hi, w in footprints.tolist():
        by_instr.setdefault(j, []).append((mem, lo // _LINE[mem], (hi - 1) // _LINE[mem], bool(w)))
    last_write: Dict[Tuple[int, int], int] = {}
    reads: Dict[Tuple[int, int], List[int]] = {}
    for j in range(n):
        for mem, l0, l1, w in by_instr.get(j, []):
            for line in range(l0, l1 + 1):
                key = (mem, line)
                before = [last_write[key]] if key in last_write else []
                if w:
                    before += reads.get(key, [])
                for i in before:
                    if units[i] != units[j] and clock[j][units[i]] < seq[i]:
                        problems.append(f"instruction {j} ({instrs[j].op.name}) is not ordered after {i} "
                                        f"({instrs[i].op.name}) on memory {mem} line {line}")
        for mem, l0, l1, w in by_instr.get(j, []):
            for line in range(l0, l1 + 1):
                if w:
                    last_write[(mem, line)] = j
                    reads[(mem, line)] = []
                else:
                    reads.setdefault((mem, line), []).append(j)
    return problems
