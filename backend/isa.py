"""The rain-sim instruction set, defined once: units, opcodes, fields, element types,
binary encoding and the text assembly form.

The lowering writes instructions through `encode`, the simulator reads them through
`decode`, the assembler and disassembler (`parse_asm`, `format_asm`) use the same
table; `docs/isa.md` documents it. Changing a field here changes every user at once.

Encoding: an instruction is a little-endian header word followed by one signed 32-bit
word per field of its opcode (so lengths differ by opcode):

    header bits 0-7   opcode
           bits 8-11  wait   (one bit per unit: pop one dependency token from that unit)
           bits 12-15 signal (one bit per unit: push one token to that unit when done)
           bits 16-31 layer  (index into the program's layer table, for reports)

Dependency tokens (decoupled access/execute, as in VTA): the DMA, MATRIX, VECTOR and
HOST units each run their own instructions in program order; an instruction first pops
one token from every unit named in `wait` (blocking until that unit has pushed it),
runs, then pushes one token to every unit named in `signal`. Tokens between two units
are matched first-in first-out. The lowering inserts them from the buffers each
instruction reads and writes, so loads, compute and stores overlap exactly as far as
the data allows.

Memories: DRAM has two segments, CONST (the program's constant segment, shared by all
runs) and ACT (the per-inference activation arena); the SRAM buffers are ACT_BUF
(activation scratchpad, bytes), WGT_BUF (weights and per-channel parameters, bytes)
and ACC_BUF (int32 accumulators, addressed in 4-byte words). DRAM addresses count bytes;
SRAM addresses count the buffer's unit (bytes, or words for ACC_BUF); strides and
counts count elements of the instruction's element type. Packed sub-byte weights move
as bytes (UINT8); the MATMUL's b_type says how to read them.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ._codec import Codec as _Codec

__all__ = [
    "Unit", "Op", "Buf", "Space", "DType", "OpSpec", "SPECS", "Instr", "encode", "decode", "format_asm",
    "parse_asm", "IsaError", "DTYPE_BITS", "DTYPE_NUMPY", "dtype_code", "PoolMode", "index_bits",
]


class IsaError(ValueError):
    """A malformed instruction, binary or assembly line."""


class Unit(enum.IntEnum):
    DMA = 0
    MATRIX = 1
    VECTOR = 2
    HOST = 3


class Buf(enum.IntEnum):
    ACT = 0   # activation scratchpad (bytes)
    WGT = 1   # weight and parameter scratchpad (bytes)
    ACC = 2   # int32 accumulators (words)


class Space(enum.IntEnum):
    CONST = 0  # the program's constant segment
    ACT = 1    # the per-inference activation arena


class DType(enum.IntEnum):
    """Element types. Sub-byte types are packed LSB first (ONNX INT4 layout); BINARY
    is bipolar: bit 0 means -1, bit 1 means +1."""
    INT8 = 0
    UINT8 = 1
    INT16 = 2
    UINT16 = 3
    INT32 = 4
    INT4 = 5
    INT2 = 6
    BINARY = 7
    FLOAT32 = 8
    INT64 = 9      # host-side tensors only (shapes, indices)
    BOOL = 10
    FLOAT64 = 11
    FLOAT16 = 12


DTYPE_BITS = {DType.INT8: 8, DType.UINT8: 8, DType.INT16: 16, DType.UINT16: 16, DType.INT32: 32, DType.INT4: 4,
              DType.INT2: 2, DType.BINARY: 1, DType.FLOAT32: 32, DType.INT64: 64, DType.BOOL: 8,
              DType.FLOAT64: 64, DType.FLOAT16: 16}
DTYPE_NUMPY = {DType.INT8: np.int8, DType.UINT8: np.uint8, DType.INT16: np.int16, DType.UINT16: np.uint16,
               DType.INT32: np.int32, DType.FLOAT32: np.float32, DType.INT64: np.int64, DType.BOOL: np.bool_,
               DType.FLOAT64: np.float64, DType.FLOAT16: np.float16}


def index_bits(m: int) -> int:
    """Bits of one row index inside an N:M group of m rows (MATMUL sp_m)."""
    return max(1, (m - 1).bit_length())


def dtype_code(dtype) -> DType:
    """The element type of a numpy dtype (byte-sized and larger types only)."""
    dt = np.dtype(dtype)
    for code, npt in DTYPE_NUMPY.items():
        if np.dtype(npt) == dt:
            return code
    raise IsaError(f"no rain-sim element type for numpy dtype {dt}")


class PoolMode(enum.IntEnum):
    MAX = 0
    AVG = 1


class Op(enum.IntEnum):
    LOAD = 0x01     # DRAM -> SRAM strided 3-D block
    STORE = 0x02    # SRAM -> DRAM strided 3-D block
    MATMUL = 0x10   # acc[m, n] += sum_k (A[m, k] - a_zp) * (B[k, n] - b_zp)
    VFILL = 0x20    # fill a block of a buffer with one value
    VREQ = 0x21     # requantize: saturate(((x - x_zp) * M + 2^(s-1)) >> s + out_zp)
    VADD = 0x22     # two-input rescaled add, one rounding
    VMUL = 0x23     # product of two zero-point-corrected inputs, requantized
    VLUT = 0x24     # 8-bit table lookup (sigmoid, tanh, GELU, exp, ...)
    VPOOL = 0x25    # max or average pooling over channel planes
    VDWCONV = 0x26  # depthwise convolution over channel planes into accumulators
    HOST = 0x30     # run host operation number `index` of the program's host table


@dataclass(frozen=True)
class OpSpec:
    op: Op
    unit: Unit
    fields: Tuple[str, ...]
    doc: str


def _spec(op: Op, unit: Unit, fields: str, doc: str) -> OpSpec:
    return OpSpec(op, unit, tuple(fields.split()), doc)


# The field lists: the binary layout (in order) and the assembly operands.
_BLOCK = "n0 n1 n2 s0 s1 s2 t0 t1 t2"
SPECS: Dict[Op, OpSpec] = {s.op: s for s in (
    _spec(Op.LOAD, Unit.DMA, f"buf addr space dram dtype {_BLOCK}",
          "copy an n0 x n1 x n2 block of `dtype` elements from DRAM `space`:`dram` (element strides s0 s1 s2; "
          "0 broadcasts) to SRAM `buf`:`addr` (element strides t0 t1 t2)"),
    _spec(Op.STORE, Unit.DMA, f"buf addr space dram dtype {_BLOCK}",
          "copy an n0 x n1 x n2 block from SRAM `buf`:`addr` (strides t0 t1 t2) to DRAM (strides s0 s1 s2); "
          "space must be ACT (the constant segment is read-only)"),
    _spec(Op.MATMUL, Unit.MATRIX,
          "a_addr a_type a_zp m0 m1 ms0 ms1 k0 k1 k2 ks0 ks1 ks2 b_addr b_buf b_type b_zp n acc fill sp_n sp_m",
          "acc[m, n] += sum_k (A[m, k] - a_zp) * (B[k, n] - b_zp): A in ACT_BUF at a_addr, its m0 x m1 rows "
          "at strides ms0 ms1 and its k0 x k1 x k2 columns at strides ks0 ks1 ks2 (an implicit im2col); B a "
          "dense K x n matrix (K = k0*k1*k2, packed for sub-byte b_type) in b_buf at b_addr; acc an (m0*m1) x n "
          "row-major int32 tile in ACC_BUF. `fill`=1 marks the first instruction on a new output tile "
          "(output-stationary) or new weights (weight-stationary): it pays the array's fill and drain. "
          "sp_m > 0: B is stored N:M-compressed (N = sp_n kept values per group of sp_m rows, then their "
          "row indices) and streams in sp_n/sp_m of the cycles. b_addr counts bytes of b_buf (WGT_BUF or "
          "ACT_BUF)"),
    _spec(Op.VFILL, Unit.VECTOR, "buf addr dtype count value", "set `count` elements of `buf` from `addr` to value"),
    _spec(Op.VREQ, Unit.VECTOR,
          "src_buf src dtype_in rows cols rs cs dst dtype_out drs dcs x_zp params per mult shift out_zp lo hi",
          "y[r, c] = saturate(((x[r, c] - x_zp) * M + 2^(s-1)) >> s + out_zp, lo, hi) (s = 0: no rounding, "
          "no shift); x in src_buf "
          "(ACC_BUF or ACT_BUF) at strides rs cs, y in ACT_BUF at strides drs dcs; M and s are the immediates "
          "mult/shift when params < 0, otherwise int32 pairs (M, s) in WGT_BUF at params, one per column "
          "(per=1) or per row (per=2)"),
    _spec(Op.VADD, Unit.VECTOR, "a b dst count dtype_a dtype_b dtype_out a_zp b_zp ma mb shift out_zp lo hi",
          "y = saturate((((a - a_zp) * ma + (b - b_zp) * mb + 2^(shift-1)) >> shift) + out_zp, lo, hi) over "
          "`count` contiguous elements of ACT_BUF"),
    _spec(Op.VMUL, Unit.VECTOR, "a b dst count dtype_a dtype_b dtype_out a_zp b_zp mult shift out_zp lo hi",
          "y = saturate((((a - a_zp) * (b - b_zp) * mult + 2^(shift-1)) >> shift) + out_zp, lo, hi)"),
    _spec(Op.VLUT, Unit.VECTOR, "src dst count dtype_in dtype_out table inner nch",
          "y[e] = T_c[x[e] - min(dtype_in)] over `count` contiguous elements, with 256-entry tables (dtype_out "
          "elements) in WGT_BUF: element e uses table c = (e // inner) % nch at table + 256 c (one table: "
          "nch = 1; per-channel tables for per-channel float ops such as BatchNormalization or a bias add)"),
    _spec(Op.VPOOL, Unit.VECTOR,
          "src dst dtype channels ih iw kh kw sh sw dh dw oh ow mode x_zp mult shift out_zp lo hi",
          "per channel plane (ih x iw in, oh x ow out, contiguous planes in ACT_BUF): max (mode 0) or the "
          "requantized sum of x - x_zp (mode 1) over each kh x kw window (strides sh sw, dilations dh dw)"),
    _spec(Op.VDWCONV, Unit.VECTOR, "src dtype x_zp channels ih iw kh kw sh sw dh dw oh ow wgt acc",
          "per channel c: acc[c, oh, ow] += sum over the window of (x - x_zp) * w[c, kh, kw], x planes in "
          "ACT_BUF, int8 weights (channels x kh x kw) in WGT_BUF, int32 planes in ACC_BUF"),
    _spec(Op.HOST, Unit.HOST, "index", "run the program's host operation `index` on DRAM tensors (an op rain-sim lacks)"),
)}

_HEADER_OP = 0xFF
_WAIT_SHIFT, _SIGNAL_SHIFT, _LAYER_SHIFT = 8, 12, 16
_TOKEN_MASK = 0xF                # wait and signal: one bit per unit
MAX_LAYERS = 1 << 16


@dataclass
class Instr:
    """One decoded instruction: opcode, dependency-token masks, layer and fields."""
    op: Op
    args: Dict[str, int]
    wait: int = 0
    signal: int = 0
    layer: int = 0

    @property
    def unit(self) -> Unit:
        return SPECS[self.op].unit

    def __getattr__(self, name: str) -> int:
        try:
            return self.__dict__["args"][name]
        except KeyError:
            raise AttributeError(name) from None


def encode(instrs: Sequence[Instr]) -> np.ndarray:
    """The binary form of `instrs` as an int32 array."""
    return _CODEC.encode(instrs)


def decode(code: np.ndarray) -> List[Instr]:
    """Instructions from their binary form (`encode`'s inverse)."""
    return _CODEC.decode(code)


# The encoder and decoder are compiled (`_codec.pyx`) and take the layout from here.
_CODEC = _Codec({op: spec.fields for op, spec in SPECS.items()}, {op: op for op in Op}, Instr, IsaError,
                _HEADER_OP, _TOKEN_MASK, _WAIT_SHIFT, _SIGNAL_SHIFT, _LAYER_SHIFT, MAX_LAYERS)


# -- assembly ------------------------------------------------------------------------
_UNIT_LETTER = {Unit.DMA: "d", Unit.MATRIX: "m", Unit.VECTOR: "v", Unit.HOST: "h"}
_LETTER_UNIT = {v: k for k, v in _UNIT_LETTER.items()}


def _mask_text(mask: int) -> str:
    return "".join(_UNIT_LETTER[u] for u in Unit if mask >> u & 1) or "-"


def _mask_parse(text: str, line: int) -> int:
    if text == "-":
        return 0
    mask = 0
    for ch in text:
        if ch not in _LETTER_UNIT:
            raise IsaError(f"line {line}: unknown unit letter {ch!r} in token mask {text!r} (use d, m, v, h)")
        mask |= 1 << _LETTER_UNIT[ch]
    return mask


def format_asm(instrs: Sequence[Instr]) -> str:
    """Text assembly, one instruction per line:
    `OPCODE wait=UNITS signal=UNITS layer=L field=value ...` (units: d m v h)."""
    lines = []
    for ins in instrs:
        spec = SPECS[ins.op]
        operands = " ".join(f"{f}={ins.args[f]}" for f in spec.fields)
        lines.append(f"{ins.op.name:<8} wait={_mask_text(ins.wait)} signal={_mask_text(ins.signal)} "
                     f"layer={ins.layer} {operands}")
    return "\n".join(lines) + ("\n" if lines else "")


_TOKEN = re.compile(r"^([a-z_0-9]+)=(-|-?\w+)$")


def parse_asm(text: str) -> List[Instr]:
    """Instructions from `format_asm` text (comments start with `;` or `#`)."""
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = re.split(r"[;#]", raw, 1)[0].strip()
        if not line:
            continue
        name, *tokens = line.split()
        try:
            op = Op[name.upper()]
        except KeyError:
            raise IsaError(f"line {lineno}: unknown opcode {name!r}") from None
        spec = SPECS[op]
        values: Dict[str, str] = {}
        for tok in tokens:
            m = _TOKEN.match(tok)
            if not m:
                raise IsaError(f"line {lineno}: expected field=value, got {tok!r}")
            values[m.group(1)] = m.group(2)
        wait = _mask_parse(values.pop("wait", "-"), lineno)
        signal = _mask_parse(values.pop("signal", "-"), lineno)
        layer = values.pop("layer", "0")
        unknown = sorted(set(values) - set(spec.fields))
        if unknown:
            raise IsaError(f"line {lineno}: {op.name} has no field {unknown[0]!r} (fields: {' '.join(spec.fields)})")
        missing = [f for f in spec.fields if f not in values]
        if missing:
            raise IsaError(f"line {lineno}: {op.name} needs field {missing[0]!r}")
        try:
            args = {f: int(values[f], 0) for f in spec.fields}
            layer = int(layer, 0)
        except ValueError as e:
            raise IsaError(f"line {lineno}: {e}") from None
        out.append(Instr(op, args, wait, signal, layer))
    return out
