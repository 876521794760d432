"""Energy and traffic per instruction, from the target's energy table.

  MACs        M x K x N per MATMUL at its weight precision (int8/int4/int2/binary),
              K counting only the kept rows of N:M-compressed weights, and only the
              MACs whose operands are both nonzero (zeros gate the multiplier);
              depthwise MACs on the vector unit at the int8 figure
  vector      lane operations x `vector_op`: a requantization counts 4 (multiply,
              round, shift, clamp), a rescaled add 6, a product 5, a lookup 1, a pool
              window element 1
  SRAM        bytes read and written in each buffer x its pJ per byte; the matrix unit
              re-reads A once per column fold and B once per row fold (output-
              stationary) or B once and the accumulators once per K fold (weight-
              stationary), as a systolic array streams them
  DRAM        bytes moved by LOAD and STORE x pJ per byte
  static      static power x run time (added by the report)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from ..isa import Buf, DTYPE_BITS, DType, Instr, Op
from .timing import dma_bytes, dram_bytes, streamed_rows, vector_elements

__all__ = ["Cost", "instruction_cost"]

_BUF_KEY = {Buf.ACT: "activation", Buf.WGT: "weight", Buf.ACC: "accumulator"}
_PRECISION = {DType.INT8: "int8", DType.UINT8: "int8", DType.INT4: "int4", DType.INT2: "int2",
              DType.BINARY: "binary"}
_OPS_PER_ELEMENT = {Op.VREQ: 4, Op.VADD: 6, Op.VMUL: 5, Op.VLUT: 1, Op.VPOOL: 1, Op.VFILL: 0}


@dataclass
class Cost:
    macs: int = 0                  # MACs the array performs (N:M-compressed weights: only the kept ones)
    macs_effective: float = 0.0    # of those, the ones whose operands are both nonzero (the rest skip energy)
    sram_bytes: Dict[str, int] = field(default_factory=dict)
    dram_bytes: int = 0
    energy: Dict[str, float] = field(default_factory=dict)   # pJ: mac, vector, sram, dram


def _sram(cost: Cost, target, buf: int, nbytes: int) -> None:
    key = _BUF_KEY[Buf(buf)]
    cost.sram_bytes[key] = cost.sram_bytes.get(key, 0) + int(nbytes)
    cost.energy["sram"] = cost.energy.get("sram", 0.0) + nbytes * target.sram[key].pj_per_byte


def instruction_cost(ins: Instr, target, nonzero_pairs: Optional[float] = None) -> Cost:
    """`nonzero_pairs`: a MATMUL's MACs with both operands nonzero (measured by the
    functional simulation); zero operands gate the multiplier and cost no MAC energy."""
    c = Cost()
    a = ins.args
    op = ins.op
    e = target.energy
    if op in (Op.LOAD, Op.STORE):
        c.dram_bytes = dram_bytes(ins)
        c.energy["dram"] = c.dram_bytes * e.dram_pj_per_byte
        _sram(c, target, a["buf"], dma_bytes(ins))
    elif op == Op.MATMUL:
        m, k, n = a["m0"] * a["m1"], streamed_rows(ins), a["n"]
        rows, cols = target.matrix.rows, target.matrix.cols
        bt = DType(a["b_type"])
        c.macs = m * k * n
        c.macs_effective = float(c.macs if nonzero_pairs is None else min(nonzero_pairs, c.macs))
        c.energy["mac"] = c.macs_effective * e.mac(_PRECISION.get(bt, "int8"))
        b_bytes = math.ceil(k * n * DTYPE_BITS[bt] / 8)
        _sram(c, target, Buf.ACT, m * k * math.ceil(n / cols))
        if target.matrix.dataflow == "output-stationary":
            _sram(c, target, a["b_buf"], b_bytes * math.ceil(m / rows))
            _sram(c, target, Buf.ACC, 8 * m * n)
        else:
            _sram(c, target, a["b_buf"], b_bytes)
            _sram(c, target, Buf.ACC, 8 * m * n * math.ceil(k / rows))
    elif op == Op.VDWCONV:
        macs = vector_elements(ins)
        c.macs = macs
        c.macs_effective = float(macs)
        c.energy["mac"] = macs * e.mac("int8")
        _sram(c, target, Buf.ACT, a["channels"] * a["ih"] * a["iw"])
        _sram(c, target, Buf.WGT, a["channels"] * a["kh"] * a["kw"])
        _sram(c, target, Buf.ACC, 8 * a["channels"] * a["oh"] * a["ow"])
    elif op != Op.HOST:
        elems = vector_elements(ins)
        c.energy["vector"] = elems * _OPS_PER_ELEMENT.get(op, 1) * e.vector_op
        if op == Op.VFILL:
            _sram(c, target, a["buf"], elems * max(1, DTYPE_BITS[DType(a["dtype"])] // 8))
        elif op == Op.VREQ:
            src = 4 if a["src_buf"] == Buf.ACC else max(1, DTYPE_BITS[DType(a["dtype_in"])] // 8)
            _sram(c, target, a["src_buf"], elems * src)
            _sram(c, target, Buf.ACT, elems * max(1, DTYPE_BITS[DType(a["dtype_out"])] // 8))
        elif op in (Op.VADD, Op.VMUL):
            _sram(c, target, Buf.ACT, 3 * elems)
        elif op == Op.VLUT:
            _sram(c, target, Buf.ACT, 2 * elems)
            _sram(c, target, Buf.WGT, elems)
        elif op == Op.VPOOL:
            _sram(c, target, Buf.ACT, a["channels"] * (a["ih"] * a["iw"] + a["oh"] * a["ow"]))
    return c
