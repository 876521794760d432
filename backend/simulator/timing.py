"""Timing: per-instruction cycles from closed forms, units overlapped through tokens.

Each unit (DMA, MATRIX, VECTOR, HOST) runs its instructions in program order. An
instruction starts when its unit is free and every token it waits for has been pushed;
the wait beyond the unit's free time is a stall. One pass in program order computes
every start and end time (no cycle-by-cycle stepping): producers precede consumers.

Durations (cycles):
  LOAD/STORE  DRAM latency + ceil(DRAM bytes / DRAM bytes per cycle)
  MATMUL      on an R x C array for an M x K by K x N tile (SCALE-Sim 3.0's model; K is
              the rows of B streamed: K N/M for N:M-compressed weights, and only the
              nonzero operand pairs' share of them on a target with skip_zero_cycles):
              output-stationary: ceil(M/R) ceil(N/C) K, plus ceil(M/R) ceil(N/C) (R + C - 2)
                for the instruction that starts an output tile (fill = 1);
              weight-stationary: ceil(K/R) ceil(N/C) M, plus ceil(K/R) ceil(N/C) (2R + C - 2)
                when it loads new weights (fill = 1).
              A layer run as one tile takes ceil(M/R) ceil(N/C) (K + R + C - 2) (OS) or
              ceil(K/R) ceil(N/C) (M + 2R + C - 2) (WS) cycles: SCALE-Sim's figures + 1
              (SCALE-Sim reports the index of the last cycle, counting from 0).
  vector ops  ceil(element operations / lanes)
  HOST        0 accelerator cycles (the host's time is not modelled; HOST ops are
              listed separately in the report)
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

from ..isa import DTYPE_BITS, DType, Instr, Op, SPECS, Unit

__all__ = ["Timeline", "instruction_cycles", "schedule", "matmul_cycles", "vector_elements", "dma_bytes", "dram_bytes",
           "streamed_rows"]


def matmul_cycles(m: int, k: int, n: int, rows: int, cols: int, dataflow: str, fill: bool) -> int:
    if dataflow == "output-stationary":
        folds = math.ceil(m / rows) * math.ceil(n / cols)
        return folds * k + (folds * (rows + cols - 2) if fill else 0)
    folds = math.ceil(k / rows) * math.ceil(n / cols)
    return folds * m + (folds * (2 * rows + cols - 2) if fill else 0)


def vector_elements(ins: Instr) -> int:
    """Element operations of a vector instruction (one per lane per cycle)."""
    a = ins.args
    op = ins.op
    if op == Op.VFILL:
        return a["count"]
    if op == Op.VREQ:
        return a["rows"] * a["cols"]
    if op in (Op.VADD, Op.VMUL, Op.VLUT):
        return a["count"]
    if op in (Op.VPOOL, Op.VDWCONV):
        return a["channels"] * a["oh"] * a["ow"] * a["kh"] * a["kw"]
    return 0


def dma_bytes(ins: Instr) -> int:
    """Bytes a LOAD or STORE writes into SRAM or DRAM."""
    a = ins.args
    return a["n0"] * a["n1"] * a["n2"] * max(1, DTYPE_BITS[DType(a["dtype"])] // 8)


def dram_bytes(ins: Instr) -> int:
    """DRAM bytes a LOAD or STORE moves: a broadcasting LOAD (stride 0) reads each
    source element once."""
    a = ins.args
    if ins.op == Op.STORE:
        return dma_bytes(ins)
    count = 1
    for d, s in ((a["n0"], a["s0"]), (a["n1"], a["s1"]), (a["n2"], a["s2"])):
        if s != 0:
            count *= d
    return count * max(1, DTYPE_BITS[DType(a["dtype"])] // 8)


def streamed_rows(ins: Instr) -> int:
    """Rows of B a MATMUL streams through the array: K, or K N/M when N:M-compressed."""
    a = ins.args
    k = a["k0"] * a["k1"] * a["k2"]
    return k // a["sp_m"] * a["sp_n"] if a["sp_m"] else k


def instruction_cycles(ins: Instr, target, density: float = 1.0) -> int:
    """Cycles of one instruction. `density`: the fraction of a MATMUL's MACs whose
    operands are both nonzero; a target with skip_zero_cycles streams only those."""
    op = ins.op
    if op in (Op.LOAD, Op.STORE):
        return target.dram_latency_cycles + math.ceil(dram_bytes(ins) / target.dram_bytes_per_cycle)
    if op == Op.MATMUL:
        a = ins.args
        k = streamed_rows(ins)
        if target.matrix.skip_zero_cycles and density < 1.0:
            k = max(1, math.ceil(k * density))
        return matmul_cycles(a["m0"] * a["m1"], k, a["n"], target.matrix.rows, target.matrix.cols,
                             target.matrix.dataflow, bool(a["fill"]))
    if op == Op.HOST:
        return 0
    return math.ceil(vector_elements(ins) / target.vector.width)


@dataclass
class Timeline:
    start: np.ndarray    # cycle each instruction starts
    end: np.ndarray
    stall: np.ndarray    # cycles it waited for tokens beyond its unit being free
    units: np.ndarray    # unit of each instruction

    @property
    def total(self) -> int:
        return int(self.end.max()) if self.end.size else 0

    def busy(self, unit: Unit) -> int:
        sel = self.units == int(unit)
        return int((self.end[sel] - self.start[sel]).sum())


def schedule(instrs: List[Instr], target, density: Optional[Dict[int, float]] = None) -> Timeline:
    """Start and end cycles of every instruction (see the module docstring)."""
    n = len(instrs)
    start = np.zeros(n, np.int64)
    end = np.zeros(n, np.int64)
    stall = np.zeros(n, np.int64)
    units = np.zeros(n, np.int8)
    free = [0, 0, 0, 0]
    queues: Dict[Tuple[int, int], Deque[int]] = {(a, b): deque() for a in range(4) for b in range(4)}
    for i, ins in enumerate(instrs):
        u = int(SPECS[ins.op].unit)
        units[i] = u
        ready = free[u]
        for v in range(4):
            if ins.wait >> v & 1:
                q = queues[(v, u)]
                if not q:
                    from .functional import SimulationError

                    raise SimulationError(f"instruction {i} ({ins.op.name}) waits for a token from "
                                          f"{Unit(v).name} that was never pushed: malformed program")
                ready = max(ready, q.popleft())
        dur = instruction_cycles(ins, target, density.get(i, 1.0) if density else 1.0)
        start[i] = ready
        stall[i] = ready - free[u] if u != Unit.HOST else 0  # the host idles, it does not stall
        end[i] = ready + dur
        free[u] = end[i]
        for v in range(4):
            if ins.signal >> v & 1:
                queues[(u, v)].append(int(end[i]))
    return Timeline(start, end, stall, units)
