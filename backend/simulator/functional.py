"""Functional simulation: executes a program's instructions bit-exactly.

All inferences of a machine run together (`simulate` gives a machine as many samples
as fit `CHUNK_BYTES`): every per-inference memory (the activation
arena, the activation and accumulator buffers) has a leading sample axis, so one
instruction is one vectorised numpy (or torch) operation over the whole batch. The
weight buffer has one copy while it holds constants and gets a sample axis the first
time a per-inference tensor is loaded into it (the second operand of attention's
activation x activation matmuls).

Each program is decoded once into a plan (cached on the `Program`): per instruction
the handler and its operands, every memory block resolved to a byte offset, shape and
byte strides and checked against its memory's true size, so running an instruction is
one view per operand and the arithmetic. Malformed instructions are refused while the
plan is made, with the same one-line errors. The SRAM arrays are only as large as the
program uses (bounds are still checked against the target's sizes). The plan also
finds work that steps can share without changing any result: MATMULs over one
activation tile with constant weights run as one wide GEMM (`_SharedA`), and a bias
LOAD is folded into the MATMUL that accumulates onto it (`_fold_bias_loads`).

Integer matrix work is exact: int8 x int8 products through `gemm.engine()` (torch._int_mm
or K-chunked float32, whichever is faster on this CPU; int32 accumulation, the
zero-point corrections added modulo 2^32, as the int32 accumulator does), or float64
products (exact below 2^53) when an operand is wider than 8 bits or varies per sample. Small
products with constant weights (digits' convolutions, classifier heads) skip the engine:
`_kernels.madd_gemm` gathers each row of A from its view and multiplies centred int16
pairs (`_direct_pays` says where that is faster). Until something per-inference is
loaded into the weight buffer, what a MATMUL reads from it is the same in every run,
so its decoded form and column sums are kept in the plan.

Requantization is `qcompile.quant_math.requantize` (the integer reference's rule),
computed in float64 where that is provably bit-identical (`_float_exact`), by a table
for bytes to bytes, else in int64 (`_Requant`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from qcompile._native import unpack_bits
from qcompile.errors import QCompileError
from qcompile.quant_math import requantize

from ..isa import Buf, DType, DTYPE_BITS, DTYPE_NUMPY, Instr, Op, PoolMode, Space, index_bits
from ..program import Program
from . import _kernels, gemm as _gemm
from .host import HostRunner

__all__ = ["Machine", "SimulationError", "exact_matmul"]

# memories, as indexed in Machine.mem and in blocks
ACT, WGT, ACC, CONST, ARENA = Buf.ACT, Buf.WGT, Buf.ACC, 3, 4
Block = Tuple[int, np.dtype, int, Tuple[int, ...], Tuple[int, ...]]   # memory, dtype, byte offset, dims, byte strides
_KERNEL_TYPES = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32)}   # what _kernels.requantize takes
_FLOAT_KERNEL_TYPES = _KERNEL_TYPES | {np.dtype(np.float64)}                       # sources of requantize_float
_CHUNK = 1 << 16        # float64 elements requantized at a time (512 KiB, in L2)


class SimulationError(QCompileError):
    """A program touched memory outside its buffers or is otherwise malformed."""


class Machine:
    """The memories of `n` inferences of one program on one target."""

    def __init__(self, program: Program, target, n: int, count: bool = True):
        self.program = program
        self.n = n
        self.count = count             # measure operand sparsity for the energy model (timing runs only)
        self.limits = (target.sram["activation"].size_bytes, target.sram["weight"].size_bytes,
                       target.sram["accumulator"].size_bytes // 4 * 4, len(program.const), program.arena_size)
        self.plan = _Plan.of(program, program.instructions, self.limits)
        self.arena = np.zeros((n, _round8(program.arena_size)), np.uint8)
        size = self.plan.size
        self.mem = [np.zeros((n, _round8(size[ACT])), np.uint8), np.zeros((1, _round8(size[WGT])), np.uint8),
                    np.zeros((n, _round8(size[ACC]) // 4), np.int32), self.plan.const, self.arena]
        self.scratch = np.empty(0, np.float64)   # float work space of _requant
        self.wgt_varies = False        # something per-inference was loaded into the weight buffer
        self.host = self.plan.host
        self.shared: dict = {}         # _SharedA leader index -> the group's product, until its last MATMUL
        self.counts: dict = {}         # MATMUL index -> [MACs with both operands nonzero, nonzero A, A size], all runs

    def _grow(self, size) -> None:
        for buf in (ACT, WGT, ACC):
            old = self.mem[buf]
            if old.nbytes // old.shape[0] < size[buf]:
                new = np.zeros((old.shape[0], _round8(size[buf]) // old.itemsize), old.dtype)
                new[:, :old.shape[1]] = old
                self.mem[buf] = new

    def _view(self, b: Block) -> np.ndarray:
        """(B, *dims) view of a block; B is the memory's sample axis (1 for constants)."""
        mem = self.mem[b[0]]
        return np.ndarray((mem.shape[0],) + b[3], b[1], mem, b[2], (mem.strides[0],) + b[4])

    def run(self, instrs: List[Instr]) -> None:
        plan = self.plan if instrs is self.plan.instrs else _Plan.of(self.program, instrs, self.limits)
        self._grow(plan.size)
        for fn, args in plan.steps:
            fn(self, *args)

    # -- the instructions (operands as decoded by _Plan) -----------------------------------
    def _copy(self, src: Block, dst: Block, into_wgt: bool):
        x = self._view(src)
        if into_wgt:                    # a per-inference tensor enters the weight buffer
            self.wgt_varies = True
            if self.mem[WGT].shape[0] == 1 and self.n > 1:
                self.mem[WGT] = np.repeat(self.mem[WGT], self.n, axis=0)
        self._view(dst)[...] = x

    def _copy_rows(self, src: Block, dst: Block, into_wgt: bool):
        """`_copy` of blocks whose rows are contiguous, given as byte blocks (`_Plan._rows`)."""
        if into_wgt:
            self._copy(src, dst, True)
            return
        x, d = self._view(src), self._view(dst)
        if x.shape[0] in (1, d.shape[0]):
            _kernels.copy_rows(x, d)
        else:
            d[...] = x

    def _copy_run(self, src: int, s0: int, dst: int, d0: int, n: int):
        """`_copy` of one run of `n` bytes in each sample (`_single_run`): a slice
        assignment, constants broadcast to every sample."""
        self.mem[dst].view(np.uint8)[:, d0:d0 + n] = self.mem[src].view(np.uint8)[:, s0:s0 + n]

    def _matmul(self, pc: int, a_blk: Block, planar, m: int, k: int, b, acc_blk: Block, za: int, zb: int):
        bias = self.plan.biases.get(pc)  # the accumulator starts from this row, not from what it held
        group = self.plan.groups.get(pc)
        if group is not None:           # A shared with the next MATMULs: one product for all (_SharedA)
            self._shared_matmul(pc, group, a_blk, planar, m, k, za, acc_blk, bias)
            return
        av = self._view(a_blk)          # (S, m0, m1, k0, k1, k2): A, an implicit im2col
        s = av.shape[0]
        constant = b[0] == WGT and not self.wgt_varies     # B is the same in every run (module doc)
        acc = self._view(acc_blk)
        gemm = _gemm.engine()
        how = (gemm.name, _gemm.direct_mode())
        decided = self.plan.cache.get(("direct", pc)) if constant else None
        if decided is not None and decided[0] == how and decided[1] is not None:    # decided below
            self._direct_matmul(pc, av, planar, k, decided[1], acc, za, bias)
            return
        cached = self.plan.cache.get(pc) if constant else None
        B = cached[0] if cached is not None and cached[0] is not None else self._weights(b, zb)
        if not (B.shape[0] == 1 and av.dtype.itemsize == 1 and B.dtype.itemsize == 1):
            if bias is not None:        # the folded LOAD, done here
                acc[...] = bias
            A = av.reshape(s, m, k)
            acc += np.rint(np.matmul(A.astype(np.float64) - za, B.astype(np.float64) - zb)
                           ).astype(np.int64).astype(np.int32)
            if not self.count:
                return
            col = np.not_equal(A, za).sum(axis=1)                                   # (S, K)
            self._count(pc, int((col * np.not_equal(B, zb).sum(axis=2)).sum()), int(col.sum()), A.size)
            return
        if constant and (decided is None or decided[0] != how):
            direct = None               # decided once: the direct kernel where it pays and fits
            if _direct_pays(gemm, how[1], s * m, k, B.shape[2]) and _bound(av.dtype, za) <= 255:
                direct = _direct_weights(B[0], zb)
            self.plan.cache[("direct", pc)] = (how, direct)
            if direct is not None:
                self._direct_matmul(pc, av, planar, k, direct, acc, za, bias)
                return
        if cached is None or cached[3] != gemm.name:
            b8, zb8 = _as_int8(B[0], zb)
            cached = _weight_sums(B if b[1] != "dense" else None, b8, np.not_equal(B[0], zb).sum(axis=1), gemm, zb8)
            if constant:
                self.plan.cache[pc] = cached
        _, colsum, cnt, _, prepared, zb8 = cached
        flip = 128 if av.dtype == np.uint8 else 0
        za8 = int(za) - flip
        corr = k * za8 * zb8 - za8 * colsum      # zero-point terms, added modulo 2^32 as the int32 accumulator
        corr = _column_terms(corr, bias)
        pairs = nonzero = 0
        channels = _channel_major(av)
        step = _samples_at_a_time(s, m, k, colsum.shape[0])
        for i in range(0, s, step):
            ai = acc[i:i + step]
            if gemm.operand is np.float32 and channels is not None:        # A's transposes: no im2col
                a = np.empty((ai.shape[0], k, m), np.float32)
                np.subtract(channels[i:i + step], flip, out=a, dtype=np.float32)
                sums = a.sum(axis=1, dtype=np.float64).astype(np.int64).reshape(-1) if zb8 else None
            elif gemm.operand is np.float32:
                sums = np.empty(ai.shape[0] * m, np.int64) if zb8 else None
                a = self._im2col_f32(av[i:i + step], planar, i, k, flip, sums)
            else:
                a, _ = _as_int8(self._im2col(av[i:i + step], planar, i, k), za)
                sums = a.sum(axis=1, dtype=np.int64) if zb8 else None
            row = (-zb8 * sums).astype(np.int32) if zb8 else None
            gemm.accumulate(ai, a, prepared, corr, row, bias is not None)
            if not self.count:
                continue
            # MACs whose two operands are both nonzero (the others skip their energy): per column of A
            # its nonzero count, times the column's nonzero weights
            col = np.not_equal(a, za8).sum(axis=(0, 2) if a.ndim == 3 else 0, dtype=np.int64)
            pairs, nonzero = pairs + int(col @ cnt), nonzero + int(col.sum())
        if self.count:
            self._count(pc, pairs, nonzero, s * m * k)

    def _direct_matmul(self, pc: int, av: np.ndarray, planar, k: int, direct: Tuple[np.ndarray, np.ndarray],
                       acc: np.ndarray, za: int, bias: Optional[np.ndarray]):
        """A MATMUL through `_kernels.madd_gemm`: each row of A gathered from its view (made
        pixel-major first where that turns channel runs contiguous), no im2col array,
        no zero-point terms (the kernel centres both operands), the bias as its start."""
        channels = _channel_major(av) if av.strides[5] != av.itemsize else None
        if channels is not None:        # a 1x1 window over channel planes: their pixel-major copy
            t = _pixels_first(channels)
            av = t.reshape(av.shape)
        else:
            av = self._pixel_major(av, planar, 0)
        w, nonzero_weights = direct
        counts = np.zeros(k, np.int64) if self.count else None
        _kernels.madd_gemm(av.view(np.uint8), av.dtype == np.int8, int(za), w, acc.shape[2], acc, bias,
                           bias is not None, counts)
        if counts is not None:
            self._count(pc, int(counts @ nonzero_weights), int(counts.sum()), av.shape[0] * av[0].size)

    def _shared_matmul(self, pc: int, group: "_SharedA", a_blk: Block, planar, m: int, k: int, za: int,
                       acc_blk: Block, bias: Optional[np.ndarray]):
        """One MATMUL of a `_SharedA` group: the first computes A [B_1 | B_2 | ...] for all of
        the group at once (A's im2col made once, one wide GEMM); each adds its columns and
        its zero-point terms to its accumulator (or starts it from them and `bias`)."""
        i = group.members.index(pc)
        if i == 0:
            self.shared[pc] = self._group_product(group, a_blk, planar, m, k, za)
        res, sums, col = self.shared[group.members[0]]
        w = self.plan.cache[("shared", group.members[0])]
        c0, c1 = w.cols[i], w.cols[i + 1]
        zb8, za8 = w.zb8[i], int(za) - w.flip
        corr = _column_terms(k * za8 * zb8 - za8 * w.colsum[c0:c1], bias)   # modulo 2^32, as the accumulator
        row = (-zb8 * sums).astype(np.int32) if zb8 else None
        _kernels.accumulate(self._view(acc_blk), res[:, c0:c1], corr, row, bias is not None)
        if col is not None:
            self._count(pc, int(col @ w.cnt[i]), int(col.sum()), res.shape[0] * k)
        if i == len(group.members) - 1:
            del self.shared[group.members[0]]

    def _group_product(self, group: "_SharedA", a_blk: Block, planar, m: int, k: int, za: int):
        """(A B as int32 (S m, sum n), A's int8 row sums or None, A's nonzero count per
        column or None) for a `_SharedA` group, B its MATMULs' weights side by side."""
        gemm = _gemm.engine()
        key = ("shared", group.members[0])
        w = self.plan.cache.get(key)
        if w is None or w.gemm != gemm.name:
            w = self.plan.cache[key] = group.weights(self.plan.const[0], gemm, self._view(a_blk).dtype)
        av = self._view(a_blk)
        s, ncols = av.shape[0], w.cols[-1]
        res = np.empty((s * m, ncols), np.int32)
        sums = np.empty(s * m, np.int64) if any(w.zb8) else None
        col = np.zeros(k, np.int64) if self.count else None
        za8 = int(za) - w.flip
        channels = _channel_major(av)
        step = _samples_at_a_time(s, m, k, ncols)
        for i in range(0, s, step):
            rows = slice(i * m, min(s, i + step) * m)
            if gemm.operand is np.float32:
                if channels is not None:                      # A's transposes: no im2col
                    a = np.empty((min(s, i + step) - i, k, m), np.float32)
                    np.subtract(channels[i:i + step], w.flip, out=a, dtype=np.float32)
                    if sums is not None:
                        sums[rows] = a.sum(axis=1, dtype=np.float64).astype(np.int64).reshape(-1)
                else:
                    a = self._im2col_f32(av[i:i + step], planar, i, k, w.flip, sums[rows] if sums is not None else None)
                gemm.accumulate(res[rows].reshape(-1, m, ncols), a, w.prepared, assign=True)
            else:
                a, _ = _as_int8(self._im2col(av[i:i + step], planar, i, k), za)
                if sums is not None:
                    sums[rows] = a.sum(axis=1, dtype=np.int64)
                gemm.product_into(a, w.prepared, res[rows])
            if col is not None:
                col += np.not_equal(a, za8).sum(axis=(0, 2) if a.ndim == 3 else 0, dtype=np.int64)
        return res, sums, col

    def _im2col_f32(self, a: np.ndarray, planar, i: int, k: int, flip: int, sums) -> np.ndarray:
        """(rows, K) float32 of A's samples `a` (from sample i), minus `flip`, in one pass
        (`_kernels.im2col_f32`); planar blocks read pixel-major as in `_im2col`."""
        a = self._pixel_major(a, planar, i)
        out = np.empty((a.size // k, k), np.float32)
        _kernels.im2col_f32(a, out, flip, sums)
        return out

    def _im2col(self, a: np.ndarray, planar, i: int, k: int) -> np.ndarray:
        """(rows, K) copy of A's samples `a` (starting at sample i). A block of channel planes
        read through a window (convolutions) is first turned pixel-major, so the gather
        copies runs of k1 * k2 elements instead of single ones."""
        a = self._pixel_major(a, planar, i)
        if a.itemsize == 1 and a.shape[3] == a.shape[4] == 1 and a.shape[5] > 1 and a.strides[5] != 1 and \
                (a.shape[2] == 1 or a.strides[2] == 1) and (a.shape[1] == 1 or a.strides[1] == a.shape[2]):
            # a 1x1 window over channel planes: the rows are the planes' pixels, one transpose
            s, p = a.shape[0], a.shape[1] * a.shape[2]
            planes = np.lib.stride_tricks.as_strided(a, (s, a.shape[5], p), (a.strides[0], a.strides[5], 1))
            return _pixels_first(planes).reshape(s * p, k)
        if a.itemsize == 1 and (a.strides[5] == 1 or a.shape[5] == 1) and not a.flags.c_contiguous and \
                (a.shape[5] >= 16 or a.strides[4] == a.shape[5]):
            out = np.empty((a.size // k, k), a.dtype)
            _kernels.gather_rows(a.view(np.uint8), out.view(np.uint8))     # runs of adjacent bytes, copied whole
            return out
        return a.reshape(-1, k)

    def _pixel_major(self, a: np.ndarray, planar, i: int) -> np.ndarray:
        """A's samples `a` (from sample i) read from a pixel-major copy of their channel
        planes when `_planar` found them (runs of channels become contiguous); else `a`."""
        if planar is None:
            return a
        region, strides = planar                                        # (S, k2, P) planes
        t = _pixels_first(self._view(region)[i:i + a.shape[0]])
        return np.ndarray(a.shape, a.dtype, t, 0, (t.strides[0],) + strides)

    def _count(self, pc: int, pairs: int, nonzero: int, size: int):
        """A MATMUL's operand counts over this machine's samples (`simulate` adds up chunks)."""
        self.counts[pc] = [pairs, nonzero, size]

    def _weights(self, b, zb: int) -> np.ndarray:
        """(Bw, K, n) int array of the B operand (decoded when packed or N:M-sparse)."""
        if b[1] == "dense":
            return self._view(b[2])
        _, _, blk, btype, k, n, rows, vbytes, sp_n, sp_m = b
        bits = DTYPE_BITS[btype]
        out = []
        for row in self._view(blk):
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
                dense = np.full((k // sp_m, sp_m, n), zb, vals.dtype)   # dropped weights are real zeros
                np.put_along_axis(dense, idx.astype(np.int64), vals.reshape(k // sp_m, sp_n, n), axis=1)
                vals = dense.reshape(k, n)
            out.append(vals)
        return np.stack(out)

    def _vfill(self, blk: Block, value: int):
        self._view(blk)[...] = value

    def _vreq(self, pc: int, src: Block, dst: Block, params: Optional[Block], per: int, mult: int, shift: int,
              x_zp: int, out_zp: int, lo: int, hi: int):
        x = self._view(src)
        d = self._view(dst)
        key = ("vreq", pc) if params is None or not self.wgt_varies else None    # the same operands every run
        rq = self.plan.cache.get(key)
        if rq is not None:
            rq.apply(self, d, x)
            return
        if params is not None:
            p = self._view(params)
            m, s = p[..., 0].astype(np.int64), p[..., 1].astype(np.int64)
            m = m[:, None, :] if per == 1 else m[:, :, None]
            s = s[:, None, :] if per == 1 else s[:, :, None]
        else:
            m, s = mult, shift
        self._requant(d, x, x_zp, _bound(x.dtype, x_zp), m, s, out_zp, lo, hi, key)

    def _vadd(self, pc: int, a: Block, b: Block, d: Block, a_zp, b_zp, ma, mb, shift, out_zp, lo, hi, fused):
        x, y = self._view(a), self._view(b)
        if fused is not None:           # 8-bit operands, the float form exact: one fused pass
            code, r = fused
            _kernels.vadd(x.view(np.uint8), y.view(np.uint8), self._view(d).view(np.uint8), code, a_zp, b_zp, ma,
                          mb, r, out_zp + 0.5, lo, hi)
            return
        bound = _bound(x.dtype, a_zp) * abs(ma) + _bound(y.dtype, b_zp) * abs(mb)
        t = np.float64 if bound < 2 ** 53 else np.int64          # exact either way
        acc = (x.astype(t) - a_zp) * ma + (y.astype(t) - b_zp) * mb
        self._requant(self._view(d), acc, 0, bound, 1, shift, out_zp, lo, hi, ("vadd", pc))

    def _vmul(self, pc: int, a: Block, b: Block, d: Block, a_zp, b_zp, mult, shift, out_zp, lo, hi):
        x, y = self._view(a), self._view(b)
        bound = _bound(x.dtype, a_zp) * _bound(y.dtype, b_zp)
        t = np.float64 if bound < 2 ** 53 else np.int64
        acc = (x.astype(t) - a_zp) * (y.astype(t) - b_zp)
        self._requant(self._view(d), acc, 0, bound, mult, shift, out_zp, lo, hi, ("vmul", pc))

    def _requant(self, dst: np.ndarray, x: np.ndarray, x_zp: int, bound: int, m, s, zp: int, lo: int, hi: int,
                 key=None):
        """dst = requantize(x - x_zp, m, s, zp, lo, hi) cast to dst's type, for integer-valued
        x with |x - x_zp| <= bound (`_Requant` decides how). `key` names a requantization
        whose operands are the same in every run (its plan is then kept)."""
        rq = self.plan.cache.get(key) if key is not None else None
        if rq is None:
            rq = _Requant(dst.dtype, x, x_zp, bound, m, s, zp, lo, hi)
            if key is not None:
                self.plan.cache[key] = rq
        rq.apply(self, dst, x)

    def _vlut(self, src: Block, tables: Block, dst: Block, signed: bool, nch: int, chan: Optional[np.ndarray],
              inner: int):
        x = self._view(src)
        if dst[1] in _FLOAT_KERNEL_TYPES and dst[1] != np.float64:     # one pass (_kernels.lut)
            t = self._view(tables)
            _kernels.lut(x.view(np.uint8), t.reshape(t.shape[0], -1), self._view(dst), signed, nch, inner)
            return
        idx = x.view(np.uint8) ^ np.uint8(0x80) if signed else x.view(np.uint8)     # x - min(dtype_in)
        t = self._view(tables)
        flat = t.reshape(t.shape[0], nch * 256)
        if chan is not None:
            idx = idx + chan
        d = self._view(dst)
        d[...] = flat[0][idx] if flat.shape[0] == 1 else np.take_along_axis(flat, idx.astype(np.intp), axis=1)

    def _vpool(self, pc: int, src: Block, dst: Block, win, mode: int, x_zp, mult, shift, out_zp, lo, hi):
        x = self._view(src)
        d = self._view(dst)
        one_byte = x.dtype.itemsize == 1 and x.dtype.kind in "iu"
        if mode == PoolMode.MAX:
            if one_byte:
                _kernels.maxpool(*_tall_planes(x, d, win), *win[:6])
            else:
                d[...] = _pool(x, win, np.maximum, x.dtype)
            return
        taps = win[0] * win[1]
        bound = taps * _bound(x.dtype, x_zp)
        if one_byte and win[6] * win[7] > 1 and bound < 2 ** 31:    # int32 window sums, one pass
            x, d = _tall_planes(x, d, win)
            acc = np.zeros(d.shape, np.int32)
            _kernels.window_sums(x, acc, int(x_zp), *win[:6])
            self._requant(d, acc, 0, bound, mult, shift, out_zp, lo, hi, ("vpool", pc))
            return
        acc = _pool(x, win, np.add, np.int32 if taps * _bound(x.dtype, 0) < 2 ** 31 else np.int64)
        self._requant(d, acc, x_zp * taps, bound, mult, shift, out_zp, lo, hi, ("vpool", pc))

    def _vdwconv(self, src: Block, wgt: Block, acc_blk: Block, x_zp: int, win):
        kh, kw, sh, sw, dh, dw, oh, ow = win
        x, w, acc = self._view(src), self._view(wgt), self._view(acc_blk)
        if x.dtype.itemsize == 1 and w.dtype == np.int8:                 # one fused pass
            _kernels.depthwise(x, w, acc, x_zp, sh, sw, dh, dw)
            return
        xc = x.astype(np.int32) - x_zp
        w = w.astype(np.int32)
        total = np.zeros(acc.shape, np.int32)
        tmp = np.empty(acc.shape, np.int32)
        for i in range(kh):
            for j in range(kw):
                r, q = i * dh, j * dw
                tap = xc[:, :, r:r + (oh - 1) * sh + 1:sh, q:q + (ow - 1) * sw + 1:sw]
                total += np.multiply(tap, w[:, :, i, j][:, :, None, None], out=tmp)
        acc += total

    def _host(self, index: int):
        self.host.run(index, self.arena)

    def _folded(self):
        """A LOAD whose bias the next MATMUL on its accumulator starts from (`_fold_bias_loads`)."""


_GEMM_BYTES = 1 << 20
"""Work of one GEMM call (about a core's L2): with 256 KiB, shufflenet's narrow 1x1
convolutions took 8 calls of 28 samples' rows each, and 20 us of overhead per call."""


def equal_chunks(total: int, per_item: int, budget: int) -> int:
    """Items per chunk when `total` items of `per_item` bytes go in chunks of at most
    `budget` bytes (at least one item each), the chunks of equal size."""
    fit = max(1, min(total, budget // max(1, per_item)))
    chunks = -(-total // fit)
    return -(-total // chunks)


def _samples_at_a_time(s: int, m: int, k: int, n: int) -> int:
    """Samples whose GEMM goes at once: their im2col (m K bytes each) or int32 product (4 m n
    bytes) within `_GEMM_BYTES`, so the work stays in cache."""
    return equal_chunks(s, m * max(k, 4 * n), _GEMM_BYTES)


_DIRECT_WEIGHT_BYTES = 256 << 10
_DIRECT_INT_MM_MACS = 1 << 21


def _direct_pays(gemm, mode: str, rows: int, k: int, n: int) -> bool:
    """Whether `Machine._direct_matmul` beats the GEMM engine on a rows x k x n product.
    Measured (AVX2 EPYC without VNNI, 1024 to 8192 rows, k 9 to 1152, n 8 to 256): the
    direct kernel ran at 16 to 50 GMAC/s, and 1.2 to 5 times faster than the float32
    engine's product alone while its packed weights (2 k n bytes) stayed within L2; past
    that it streams them per row. torch._int_mm, where oneDNN has VNNI kernels, runs at
    about 200 GMAC/s: the direct kernel then only takes products small enough that the
    engine's fixed costs (im2col, conversion, the accumulator pass) dominate (the bound
    `_DIRECT_INT_MM_MACS` is an estimate: no VNNI machine was at hand to time it). Without
    AVX2 its scalar loop is slower than either engine. `mode` (`gemm.direct_mode`) can
    force it on or off."""
    if mode != "auto":
        return mode == "on"
    if not _kernels.madd_simd() or 2 * k * n > _DIRECT_WEIGHT_BYTES:
        return False
    return gemm.name == "float32" or rows * k * n <= _DIRECT_INT_MM_MACS


def _direct_weights(b: np.ndarray, zb: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(B (K, n) packed for `_kernels.madd_gemm`, B's nonzero weights per K row), or None
    when a centred weight b - zb leaves [-255, 255] (the kernel's int16 pairs could overflow)."""
    if b.dtype.kind not in "iu" or b.size and max(abs(int(b.min()) - zb), abs(int(b.max()) - zb)) > 255:
        return None
    centred = b.astype(np.int16) - np.int16(zb)
    return _kernels.madd_pack(centred), np.not_equal(centred, 0).sum(axis=1, dtype=np.int64)


def _pixels_first(planes: np.ndarray) -> np.ndarray:
    """(S, K, P) channel planes as a contiguous (S, P, K) copy: in SIMD tiles
    (`_kernels.transpose_planes`) for bytes whose planes are contiguous, else numpy."""
    if planes.itemsize == 1 and (planes.shape[2] == 1 or planes.strides[2] == 1):
        t = np.empty((planes.shape[0], planes.shape[2], planes.shape[1]), np.uint8)
        _kernels.transpose_planes(planes.view(np.uint8), t)
        return t.view(planes.dtype)
    return np.ascontiguousarray(planes.transpose(0, 2, 1))


class _Requant:
    """How to requantize one instruction's values (`Machine._requant`), decided once:
    in float64 where `_float_exact` proves it bit-identical to the integer rule (fused in
    `_kernels.requantize_float` when the types and multiplier layout allow, else a few
    samples at a time so the float work stays in cache), else by the integer rule
    (`_kernels.requantize`, or int64 numpy). Bytes to bytes with one multiplier go through
    a 256-entry table of the integer rule (`_kernels.lut`) where the blocks are dense."""

    def __init__(self, dtype: np.dtype, x: np.ndarray, x_zp: int, bound: int, m, s, zp: int, lo: int, hi: int):
        m, s = np.asarray(m, np.int64), np.asarray(s, np.int64)
        info = np.iinfo(dtype)
        self.fits = info.min <= lo and hi <= info.max        # else the int32 result wraps in the cast
        self.x_zp, self.zp, self.lo, self.hi, self.m, self.s = x_zp, zp, lo, hi, m, s
        self.table = None               # (1, 256) results by source byte (x - min(dtype)), as VLUT's tables
        if x.dtype.itemsize == dtype.itemsize == 1 and x.dtype.kind in "iu" and dtype.kind in "iu" and \
                m.size == 1 and s.size == 1 and 0 <= int(s.reshape(())) < 63:
            src = np.iinfo(x.dtype)
            v = np.arange(src.min, src.max + 1, dtype=np.int64)
            self.table = requantize(v - x_zp, m.reshape(()), s.reshape(()), zp, lo, hi).astype(dtype).reshape(1, 256)
            self.signed = x.dtype.kind == "i"
        per = _per(m, s, x)
        flat = (lambda a: a.reshape(-1, 1)) if per == 0 else (lambda a: a.reshape(a.shape[0], -1))
        self.float_upto = -1            # the "int" kind: the float kernel is exact while |x - x_zp| <= this
        fused = per is not None and x.dtype in _FLOAT_KERNEL_TYPES and dtype in _KERNEL_TYPES
        exact = _float_exact(bound, m, s, zp, lo, hi)
        if fused or exact:
            r = np.ldexp(m.astype(np.float64), (-s).astype(np.int32))     # m * 2^-s, exact
        if not exact:
            if per is not None and x.dtype in _KERNEL_TYPES and dtype in _KERNEL_TYPES and \
                    0 <= s.min(initial=0) and s.max(initial=0) < 63:
                self.kind, self.args = "int", (flat(m), flat(s), per)       # the integer rule, one pass
                if fused:               # the float kernel where the values' actual bound allows it
                    self.float_upto, self.float_args = _float_bound(m, s, zp, lo, hi), (flat(r), per)
            else:
                self.kind, self.args = "int64", ()
            return
        if fused:
            self.kind, self.args = "float", (flat(r), per)                  # the same float steps, one pass
        else:
            self.kind, self.args = "chunks", (r,)

    def apply(self, machine: "Machine", dst: np.ndarray, x: np.ndarray) -> None:
        x_zp, zp, lo, hi = self.x_zp, self.zp, self.lo, self.hi
        if self.table is not None and x.ndim == 3 and _rows_dense(x) and _rows_dense(dst):
            n = x.shape[1] * x.shape[2]
            flat = np.lib.stride_tricks.as_strided
            _kernels.lut(flat(x.view(np.uint8), (x.shape[0], n), (x.strides[0], 1)), self.table,
                         flat(dst, (dst.shape[0], n), (dst.strides[0], 1)), self.signed, 1, max(1, n))
            return
        if self.kind == "float":
            _kernels.requantize_float(x, dst, self.args[0], self.args[1], x_zp, zp + 0.5, lo, hi)
            return
        if self.kind == "int":
            if self.float_upto >= 0 and x.size and \
                    max(abs(int(x.min()) - x_zp), abs(int(x.max()) - x_zp)) <= self.float_upto:
                _kernels.requantize_float(x, dst, self.float_args[0], self.float_args[1], x_zp, zp + 0.5, lo, hi)
            else:
                _kernels.requantize(x, dst, *self.args, x_zp, zp, lo, hi)
            return
        if self.kind == "int64":
            dst[...] = requantize(np.asarray(x).astype(np.int64) - x_zp, self.m, self.s, zp, lo, hi).astype(dst.dtype)
            return
        r = self.args[0]
        per = max(1, x[0].size)
        step = max(1, _CHUNK // per)
        if machine.scratch.size < step * per:
            machine.scratch = np.empty(step * per, np.float64)
        for i in range(0, x.shape[0], step):
            xi = x[i:i + step]
            t = machine.scratch[:xi.size].reshape(xi.shape)
            ri = r[i:i + step] if r.ndim == x.ndim and r.shape[0] > 1 else r
            if x_zp:
                np.subtract(xi, x_zp, out=t, dtype=np.float64)
                t *= ri
            else:
                np.multiply(xi, ri, out=t, dtype=np.float64)
            t += zp + 0.5
            np.floor(t, out=t)
            np.clip(t, lo, hi, out=t)
            dst[i:i + step] = t if self.fits else t.astype(np.int32).astype(dst.dtype)


def _rows_dense(a: np.ndarray) -> bool:
    """Whether an (S, rows, cols) array of bytes is, per sample, rows x cols consecutive bytes."""
    return (a.shape[2] <= 1 or a.strides[2] == 1) and (a.shape[1] <= 1 or a.strides[1] == a.shape[2])


def _tall_planes(x: np.ndarray, d: np.ndarray, win) -> Tuple[np.ndarray, np.ndarray]:
    """(S, C, H, W) planes and their (S, C, OH, OW) pooled planes as one plane of C H rows
    per sample, when that pools the same windows: H = OH sh (output row c OH + y reads
    input rows from c H + y sh) and the planes follow one another row after row. The
    kernels then set up one plane per sample instead of one per channel (digits'
    2x2 max pool over 16 planes of 8x8: most of its time was per-plane setup)."""
    kh, kw, sh, sw, dh, dw, oh, ow = win
    if x.ndim != 4 or d.ndim != 4 or x.shape[1] < 2 or x.shape[2] != oh * sh or (kh - 1) * dh >= sh or \
            not (_rows_follow(x) and _rows_follow(d)):
        return x, d
    s, c = x.shape[0], x.shape[1]
    tall = np.lib.stride_tricks.as_strided(x, (s, 1, c * x.shape[2], x.shape[3]),
                                           (x.strides[0], 0, x.strides[1] // x.shape[2], x.strides[3]))
    out = np.lib.stride_tricks.as_strided(d, (s, 1, c * d.shape[2], d.shape[3]),
                                          (d.strides[0], 0, d.strides[1] // d.shape[2], d.strides[3]))
    return tall, out


def _rows_follow(a: np.ndarray) -> bool:
    """Whether the rows of (S, C, H, W) planes follow one another at one stride, plane
    after plane (a one-row plane's row stride is the plane stride)."""
    return a.shape[2] == 1 or a.strides[1] == a.shape[2] * a.strides[2]


# -- exact arithmetic -----------------------------------------------------------------------
def _bound(dtype: np.dtype, zp: int) -> int:
    """The largest |x - zp| for x of `dtype` (beyond 2^53 for non-integer types: no float path)."""
    if dtype.kind not in "iu":
        return 2 ** 64
    info = np.iinfo(dtype)
    return max(abs(int(info.min) - int(zp)), abs(int(info.max) - int(zp)))


def _float_exact(bound: int, m: np.ndarray, s: np.ndarray, zp: int, lo: int, hi: int) -> bool:
    """Whether clip(floor(fl(fl(a * r) + (zp + 1/2))), lo, hi) in float64, r = m * 2^-s,
    equals requantize(a, m, s, zp, lo, hi) for every integer |a| <= bound. With
    Z = (2|zp| + 1) 2^(s-1): true when bound < 2^53 (a is exact), 1 <= s <= 52, |m| < 2^31
    (r is exact), and either (a) bound |m| + Z < 2^53, or (b) Z <= 2^52 and
    T = 2^(52 - s) >= max(hi - zp, zp - lo).
    Proof, with P = a m (the exact result is clip(floor(P 2^-s + 1/2) + zp, lo, hi)):
      |P| + Z < 2^53 (always under (a); under (b) whenever |P| < 2^52): a r = P 2^-s is
        representable, so fl(a r) is exact, and so is adding zp + 1/2 (the sum's numerator
        P + (2 zp + 1) 2^(s-1) stays below 2^53): the floors agree;
      (b) and |P| >= 2^52: |P 2^-s| >= T, rounding is monotonic and T, T + zp + 1/2 are
        representable, so both results are >= T + zp (or <= -T + zp) and saturate alike."""
    s_lo, s_hi = int(s.min(initial=1)), int(s.max(initial=1))
    m_max = int(np.abs(m).max(initial=0))
    if not (bound < 2 ** 53 and 1 <= s_lo and s_hi <= 52 and m_max < 2 ** 31):
        return False
    z = (2 * abs(zp) + 1) * 2 ** (s_hi - 1)
    return bound * m_max + z < 2 ** 53 or (z <= 2 ** 52 and 2 ** (52 - s_hi) >= max(hi - zp, zp - lo))


def _float_bound(m: np.ndarray, s: np.ndarray, zp: int, lo: int, hi: int) -> int:
    """The largest bound for which `_float_exact` holds by its case (a), or -1: an
    accumulator's values are far inside int32, so the float form often holds for the
    values at hand though not for every int32."""
    m_max = max(1, int(np.abs(m).max(initial=1)))
    z = (2 * abs(zp) + 1) * 2 ** (int(s.max(initial=1)) - 1)
    upto = (2 ** 53 - 1 - z) // m_max
    return upto if upto >= 0 and _float_exact(upto, m, s, zp, lo, hi) else -1


def _per(m: np.ndarray, s: np.ndarray, x: np.ndarray) -> Optional[int]:
    """How multipliers and shifts of the same shape vary over (S, rows, cols) values x, as
    `_kernels.requantize` takes them (0: one per sample or in all, 1: per column, 2: per
    row); None when the kernel cannot take them."""
    if x.ndim != 3 or m.shape != s.shape or m.ndim not in (0, 3):
        return None
    if m.ndim == 0 or m[0].size == 1:
        return 0
    if m.ndim == 3 and m.shape[1] == 1 and m.shape[2] == x.shape[2]:
        return 1
    if m.ndim == 3 and m.shape[2] == 1 and m.shape[1] == x.shape[1]:
        return 2
    return None


def _pool(x: np.ndarray, win, op, dtype) -> np.ndarray:
    """op-reduction (np.maximum or np.add, in `dtype`) of x's (S, C, H, W) planes over the windows."""
    kh, kw, sh, sw, dh, dw, oh, ow = win
    if oh == ow == 1:               # global: one reduction over the window
        w = x[:, :, :(kh - 1) * dh + 1:dh, :(kw - 1) * dw + 1:dw]
        return op.reduce(w.reshape(w.shape[0], w.shape[1], -1), axis=2, dtype=dtype).reshape(w.shape[:2] + (1, 1))
    y = None
    for i in range(kh):
        for j in range(kw):
            r, q = i * dh, j * dw
            tap = x[:, :, r:r + (oh - 1) * sh + 1:sh, q:q + (ow - 1) * sw + 1:sw]
            if y is None:
                y = tap.astype(dtype)
            else:
                op(y, tap, out=y)
    return y


def _weight_sums(decoded: Optional[np.ndarray], b8: np.ndarray, cnt: np.ndarray, gemm, zb8: int):
    """What the int8 GEMM needs of B, kept across runs while B is constant: the decoded B
    (when packed), the int8 form's column sums (for the zero-point terms), the nonzero
    weights per row, the GEMM engine's name and its form of B, and B's int8 zero point."""
    return decoded, b8.sum(axis=0, dtype=np.int64), cnt.astype(np.int64), gemm.name, gemm.prepare(b8), zb8


def exact_matmul(A: np.ndarray, za: int, B: np.ndarray, zb: int) -> np.ndarray:
    """sum_k (A - za) * (B - zb), exact, as int64: A is (N, M, K), B is (1 or N, K, n)."""
    n, m, k = A.shape
    if B.shape[0] == 1 and A.dtype.itemsize == 1 and B.dtype.itemsize == 1 and k < 2 ** 17:   # int32 cannot wrap
        a8, za8 = _as_int8(A, za)
        b8, zb8 = _as_int8(B[0], zb)
        gemm = _gemm.engine()
        acc = np.zeros((n, m, b8.shape[1]), np.int32)
        gemm.accumulate(acc, a8.reshape(n * m, k).astype(gemm.operand), gemm.prepare(b8))
        raw = acc.astype(np.int64)
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
    """(contiguous int8 array, zero point) with the same centred values x - zp."""
    if x.dtype == np.int8:
        return np.ascontiguousarray(x), int(zp)
    if x.dtype == np.uint8:
        return (x ^ np.uint8(0x80)).view(np.int8), int(zp) - 128
    xi = x.astype(np.int64)
    if xi.min(initial=0) < -128 or xi.max(initial=0) > 127:
        raise SimulationError("matrix operand does not fit 8 bits")
    return xi.astype(np.int8), int(zp)


def _round8(n: int) -> int:
    return max(8, (int(n) + 7) // 8 * 8)


# -- decoding -------------------------------------------------------------------------------
class _Plan:
    """A program's instructions decoded for one set of memory sizes (see the module doc)."""

    def __init__(self, program: Program, instrs: List[Instr], limits):
        self.instrs, self.limits = instrs, limits
        self.size = [8, 8, 8]                                  # bytes of ACT, WGT, ACC in use
        self.const = np.zeros((1, _round8(len(program.const))), np.uint8)
        self.const[0, :len(program.const)] = np.frombuffer(program.const, dtype=np.uint8)
        self.const.flags.writeable = False
        self.cache: Dict[object, object] = {}   # MATMUL index -> _weight_sums; (op, index) -> _Requant
        self.host = HostRunner(program)                         # its sessions serve every run
        self.steps = [(s[0], s[1:]) for s in (_DECODE[ins.op](self, ins.args, pc) for pc, ins in enumerate(instrs))]
        self.groups = _SharedA.find(self.steps)                 # MATMUL index -> its _SharedA group
        self.biases = _fold_bias_loads(self.steps, self.const[0])  # MATMUL index -> the bias its LOAD set
        self.steps = [_single_run(step) for step in self.steps]   # last: the analyses above read blocks

    @classmethod
    def of(cls, program: Program, instrs: List[Instr], limits) -> "_Plan":
        plan = program.__dict__.get("_rainsim_plan")
        if plan is None or plan.instrs is not instrs or plan.limits != limits:
            plan = cls(program, instrs, limits)
            program.__dict__["_rainsim_plan"] = plan
        return plan

    def block(self, mem: int, dtype: DType, addr_units: int, dims, strides, what: str) -> Block:
        """A bounds-checked block of `dims` elements at an address in the memory's units."""
        if dtype not in DTYPE_NUMPY:
            raise SimulationError(f"{what}: element type {dtype.name} cannot be addressed (sub-byte data moves as "
                                  "UINT8 bytes)")
        npt = np.dtype(DTYPE_NUMPY[dtype])
        isz = npt.itemsize
        start_bytes = addr_units * (4 if mem == ACC else 1)
        if start_bytes % isz:
            raise SimulationError(f"{what}: address {addr_units} is not aligned to {dtype.name}")
        start = start_bytes // isz
        last = start + sum((d - 1) * s for d, s in zip(dims, strides) if d > 0)
        low = start + sum((d - 1) * s for d, s in zip(dims, strides) if d > 0 and s < 0)
        limit = self.limits[mem] // isz
        if low < 0 or last >= limit or start >= limit:
            raise SimulationError(f"{what}: block at {addr_units} (dims {list(dims)}, strides {list(strides)}) "
                                  f"leaves its memory ({limit} {dtype.name} elements)")
        if mem < CONST and all(d > 0 for d in dims):
            self.size[mem] = max(self.size[mem], (last + 1) * isz)
        return mem, npt, start * isz, tuple(int(d) for d in dims), tuple(int(s) * isz for s in strides)

    def _load(self, a, pc):
        dims, s, t = (a["n0"], a["n1"], a["n2"]), (a["s0"], a["s1"], a["s2"]), (a["t0"], a["t1"], a["t2"])
        dtype = DType(a["dtype"])
        src = self.block(CONST if a["space"] == Space.CONST else ARENA, dtype, a["dram"], dims, s,
                         f"instruction {pc} LOAD source")
        dst = self.block(_buf(a["buf"], pc, "LOAD"), dtype, a["addr"], dims, t, f"instruction {pc} LOAD destination")
        return self._rows(src, dst, a["buf"] == Buf.WGT and a["space"] != Space.CONST)

    @staticmethod
    def _rows(src: Block, dst: Block, into_wgt: bool) -> tuple:
        """A LOAD or STORE step: `Machine._copy_rows` over byte blocks when both blocks' rows
        (innermost axis) are contiguous, else `Machine._copy`. Rows that follow each other
        in both memories become one longer row (a channel's rows of a tile, say)."""
        isz, dims = src[1].itemsize, src[3]
        if dims[2] > 1 and (src[4][2] != isz or dst[4][2] != isz) or 0 in dims:
            return Machine._copy, src, dst, into_wgt
        u8 = np.dtype(np.uint8)
        shape, st, dt = list(dims[:2]) + [dims[2] * isz], list(src[4][:2]), list(dst[4][:2])
        for axis in (1, 0):                 # merge an axis into the row when both sides are dense
            if st[axis] == dt[axis] == shape[2] and shape[axis] > 1:
                shape[2] *= shape[axis]
                shape[axis], st[axis], dt[axis] = 1, 0, 0
            elif shape[axis] > 1:
                break
        return (Machine._copy_rows, (src[0], u8, src[2], tuple(shape), tuple(st) + (1,)),
                (dst[0], u8, dst[2], tuple(shape), tuple(dt) + (1,)), into_wgt)

    def _store(self, a, pc):
        if a["space"] != Space.ACT:
            raise SimulationError(f"instruction {pc} STORE: space {a['space']}: only the activation arena (1) is "
                                  "writable")
        dims, s, t = (a["n0"], a["n1"], a["n2"]), (a["s0"], a["s1"], a["s2"]), (a["t0"], a["t1"], a["t2"])
        dtype = DType(a["dtype"])
        src = self.block(_buf(a["buf"], pc, "STORE"), dtype, a["addr"], dims, t, f"instruction {pc} STORE source")
        return self._rows(src, self.block(ARENA, dtype, a["dram"], dims, s, f"instruction {pc} STORE destination"),
                          False)

    def _matmul(self, a, pc):
        m0, m1, kd, n = a["m0"], a["m1"], (a["k0"], a["k1"], a["k2"]), a["n"]
        k = kd[0] * kd[1] * kd[2]
        av = self.block(ACT, DType(a["a_type"]), a["a_addr"], (m0, m1) + kd,
                        (a["ms0"], a["ms1"], a["ks0"], a["ks1"], a["ks2"]), f"instruction {pc} MATMUL A")
        if a["b_buf"] not in (Buf.WGT, Buf.ACT):
            raise SimulationError(f"instruction {pc} MATMUL: b_buf {a['b_buf']} must be WGT_BUF (1) or ACT_BUF (0)")
        btype, sp_n, sp_m = DType(a["b_type"]), a["sp_n"], a["sp_m"]
        bits = DTYPE_BITS[btype]
        what = f"instruction {pc} MATMUL B"
        if not sp_m and bits >= 8:
            b = (a["b_buf"], "dense", self.block(a["b_buf"], btype, a["b_addr"], (k, n), (n, 1), what))
        else:
            rows = k // sp_m * sp_n if sp_m else k
            vbytes = (rows * n * bits + 7) // 8
            ibytes = (rows * n * index_bits(sp_m) + 7) // 8 if sp_m else 0
            raw = self.block(a["b_buf"], DType.UINT8, a["b_addr"], (vbytes + ibytes,), (1,), what)
            b = (a["b_buf"], "packed", raw, btype, k, n, rows, vbytes, sp_n, sp_m)
        acc = self.block(ACC, DType.INT32, a["acc"], (m0 * m1, n), (n, 1), f"instruction {pc} MATMUL acc")
        return Machine._matmul, pc, av, _planar(av), m0 * m1, k, b, acc, a["a_zp"], a["b_zp"]

    def _vfill(self, a, pc):
        blk = self.block(_buf(a["buf"], pc, "VFILL"), DType(a["dtype"]), a["addr"], (a["count"],), (1,),
                         f"instruction {pc} VFILL")
        if blk[1].kind in "iu":
            info = np.iinfo(blk[1])
            if not info.min <= a["value"] <= info.max:
                raise SimulationError(f"instruction {pc} VFILL: value {a['value']} does not fit {blk[1]}")
        return Machine._vfill, blk, a["value"]

    def _vreq(self, a, pc):
        src = self.block(_buf(a["src_buf"], pc, "VREQ"), DType(a["dtype_in"]), a["src"], (a["rows"], a["cols"]),
                         (a["rs"], a["cs"]), f"instruction {pc} VREQ source")
        params = None
        if a["params"] >= 0:
            if a["per"] not in (1, 2):
                raise SimulationError(f"instruction {pc} VREQ: per={a['per']} (1: per column, 2: per row)")
            count = a["cols"] if a["per"] == 1 else a["rows"]
            params = self.block(WGT, DType.INT32, a["params"], (count, 2), (2, 1), f"instruction {pc} VREQ params")
        dst = self.block(ACT, DType(a["dtype_out"]), a["dst"], (a["rows"], a["cols"]), (a["drs"], a["dcs"]),
                         f"instruction {pc} VREQ destination")
        return (Machine._vreq, pc, src, dst, params, a["per"], a["mult"], a["shift"], a["x_zp"], a["out_zp"], a["lo"],
                a["hi"])

    def _operands(self, a, pc, what):
        c = a["count"]
        return [self.block(ACT, DType(a[f"dtype_{x}"]), a[x if x != "out" else "dst"], (c,), (1,),
                           f"instruction {pc} {what} {x if x != 'out' else 'dst'}") for x in ("a", "b", "out")]

    def _vadd(self, a, pc):
        ops = self._operands(a, pc, "VADD")
        return (Machine._vadd, pc, *ops, a["a_zp"], a["b_zp"], a["ma"], a["mb"], a["shift"], a["out_zp"], a["lo"],
                a["hi"], _fused_vadd(ops, a))

    def _vmul(self, a, pc):
        return (Machine._vmul, pc, *self._operands(a, pc, "VMUL"), a["a_zp"], a["b_zp"], a["mult"], a["shift"],
                a["out_zp"], a["lo"], a["hi"])

    def _vlut(self, a, pc):
        c, nch = a["count"], a["nch"]
        tin, tout = DType(a["dtype_in"]), DType(a["dtype_out"])
        if tin not in (DType.INT8, DType.UINT8):
            raise SimulationError(f"instruction {pc} VLUT: the index must be INT8 or UINT8, got {tin.name}")
        src = self.block(ACT, tin, a["src"], (c,), (1,), f"instruction {pc} VLUT source")
        tables = self.block(WGT, tout, a["table"], (nch, 256), (256, 1), f"instruction {pc} VLUT tables")
        dst = self.block(ACT, tout, a["dst"], (c,), (1,), f"instruction {pc} VLUT destination")
        chan = 256 * ((np.arange(c) // a["inner"]) % nch) if nch > 1 else None
        return Machine._vlut, src, tables, dst, tin == DType.INT8, nch, chan, max(1, a["inner"])

    def _window(self, a, pc, what):
        c, ih, iw = a["channels"], a["ih"], a["iw"]
        src = self.block(ACT, DType(a["dtype"]), a["src"], (c, ih, iw), (ih * iw, iw, 1),
                         f"instruction {pc} {what} source")
        win = tuple(a[f] for f in ("kh", "kw", "sh", "sw", "dh", "dw", "oh", "ow"))
        kh, kw, sh, sw, dh, dw, oh, ow = win
        if (oh - 1) * sh + (kh - 1) * dh + 1 > ih or (ow - 1) * sw + (kw - 1) * dw + 1 > iw:
            raise SimulationError(f"instruction {pc} {what}: {oh}x{ow} windows do not fit the {ih}x{iw} plane")
        return src, win

    def _vpool(self, a, pc):
        src, win = self._window(a, pc, "VPOOL")
        c, oh, ow = a["channels"], a["oh"], a["ow"]
        dst = self.block(ACT, DType(a["dtype"]), a["dst"], (c, oh, ow), (oh * ow, ow, 1), f"instruction {pc}")
        return (Machine._vpool, pc, src, dst, win, a["mode"], a["x_zp"], a["mult"], a["shift"], a["out_zp"], a["lo"],
                a["hi"])

    def _vdwconv(self, a, pc):
        src, win = self._window(a, pc, "VDWCONV")
        c, kh, kw, oh, ow = a["channels"], a["kh"], a["kw"], a["oh"], a["ow"]
        w = self.block(WGT, DType.INT8, a["wgt"], (c, kh, kw), (kh * kw, kw, 1), f"instruction {pc} weights")
        acc = self.block(ACC, DType.INT32, a["acc"], (c, oh, ow), (oh * ow, ow, 1), f"instruction {pc} acc")
        return Machine._vdwconv, src, w, acc, a["x_zp"], win

    def _host(self, a, pc):
        return Machine._host, a["index"]


def _planar(av: Block):
    """For an A block that reads k2 channel planes through a window (as a convolution does,
    its span of the planes no larger than A itself, so transposing the span costs less
    than the im2col it speeds up): the block of the planes' span P as (k2, P), and A's
    byte strides within that span made pixel-major (P, k2). None otherwise."""
    mem, npt, off, dims, strides = av
    m0, m1, k0, k1, k2 = dims
    isz = npt.itemsize
    if min(strides) < 0 or k2 < 2 or k0 * k1 < 2 or strides[4] == 0:
        return None
    span = sum((d - 1) * st for d, st in zip(dims[:4], strides[:4])) // isz + 1
    if span * k2 > m0 * m1 * k0 * k1 * k2:         # (shufflenet's 3x3 / 2 stem reads its span 2.25 times)
        return None
    return (mem, npt, off, (k2, span), (strides[4], isz)), tuple(st * k2 for st in strides[:4]) + (isz,)


def _channel_major(av: np.ndarray) -> Optional[np.ndarray]:
    """For an A operand (S, m0, m1, 1, 1, K) whose m0 m1 rows are consecutive elements of
    K channel planes (a 1x1 convolution over planar activations): the (S, K, m0 m1) view
    of those planes, each sample A's transpose, which the float32 GEMM takes as it is
    (no im2col). None otherwise."""
    s, m0, m1, k0, k1, k2 = av.shape
    isz = av.itemsize
    st = av.strides
    if k0 * k1 != 1 or k2 < 2 or (m1 > 1 and st[2] != isz) or (m0 > 1 and st[1] != m1 * isz) or \
            abs(st[5]) < m0 * m1 * isz:
        return None
    # a view: the checks above make the m0 m1 pixels consecutive, so the reshape merges them
    return av[:, :, :, 0, 0, :].transpose(0, 3, 1, 2).reshape(s, k2, m0 * m1)


def _fused_vadd(ops, a) -> Optional[Tuple[int, float]]:
    """(signedness code, 2^-shift) when `_kernels.vadd` computes this VADD exactly: 8-bit
    operands, the float form of its requantization proved exact (`_float_exact`) and
    [lo, hi] inside the destination type; None otherwise."""
    types = [blk[1] for blk in ops]
    if any(t not in (np.dtype(np.int8), np.dtype(np.uint8)) for t in types):
        return None
    bound = _bound(types[0], a["a_zp"]) * abs(a["ma"]) + _bound(types[1], a["b_zp"]) * abs(a["mb"])
    info = np.iinfo(types[2])
    one, shift = np.ones((), np.int64), np.asarray(a["shift"], np.int64)
    if not (info.min <= a["lo"] <= a["hi"] <= info.max and _float_exact(bound, one, shift, a["out_zp"], a["lo"], a["hi"])):
        return None
    code = 4 * (types[0] == np.int8) + 2 * (types[1] == np.int8) + (types[2] == np.int8)
    return int(code), float(np.ldexp(1.0, -int(a["shift"])))


class _SharedWeights:
    """What a `_SharedA` group's product needs of its weights, kept across runs: the int8
    forms side by side in the GEMM engine's form, each MATMUL's columns, int8 zero
    point, column sums and nonzero weights per row, and A's uint8 -> int8 flip."""

    def __init__(self, parts, gemm, a_dtype: np.dtype):
        b8s = [_as_int8(raw, zb) for raw, zb in parts]
        self.gemm, self.flip = gemm.name, 128 if a_dtype == np.uint8 else 0
        cat = np.concatenate([b for b, _ in b8s], axis=1)
        self.prepared = gemm.prepare(cat)
        self.cols = np.cumsum([0] + [b.shape[1] for b, _ in b8s]).tolist()
        self.zb8 = [zb8 for _, zb8 in b8s]
        self.colsum = cat.sum(axis=0, dtype=np.int64)
        self.cnt = [np.not_equal(raw, zb).sum(axis=1).astype(np.int64) for raw, zb in parts]


class _SharedA:
    """MATMULs that read the same A block (the same activation tile times successive
    weight tiles, as a convolution's output-channel tiles do) with nothing writing A's
    bytes between them, and whose B is, in every run, bytes of the constant segment: the
    last write to B's span before each is one LOAD of constants covering it. Their
    products A B_i are then known at the first of them, so A's im2col is made once and
    one wide GEMM does the work of many narrow ones; each MATMUL still adds its part at
    its own place in the program, so the accumulators see the same sequence of writes."""

    def __init__(self, members: List[int], sources: List[Tuple[int, np.dtype, int, int, int]]):
        self.members = members          # MATMUL indices, in program order
        self.sources = sources          # per MATMUL: (constant byte offset, dtype, K, n, zero point)

    def weights(self, const: np.ndarray, gemm, a_dtype: np.dtype) -> _SharedWeights:
        parts = [(np.frombuffer(const, dt, k * n, off).reshape(k, n), zb) for off, dt, k, n, zb in self.sources]
        return _SharedWeights(parts, gemm, a_dtype)

    @staticmethod
    def find(steps) -> Dict[int, "_SharedA"]:
        """The groups of a plan's steps (two MATMULs or more each), by member index."""
        open_: Dict[tuple, Tuple[int, int, List[int], list]] = {}   # A key -> (lo, hi, members, sources)
        wgt: List[Tuple[int, int, Optional[int]]] = []             # WGT writes: (lo, hi, constant offset or None)
        groups: Dict[int, _SharedA] = {}

        def close(key):
            _, _, members, sources = open_.pop(key)
            if len(members) > 1:
                g = _SharedA(members, sources)
                groups.update((pc, g) for pc in members)

        for fn, args in steps:
            if fn is Machine._matmul:
                pc, a_blk, planar, _, k, b, _, za, zb = args
                src = _constant_b(b, wgt) if a_blk[1].itemsize == 1 else None
                if src is not None:
                    key = (a_blk, planar, za)
                    if key not in open_:
                        open_[key] = _span(a_blk) + ([], [])
                    open_[key][2].append(pc)
                    open_[key][3].append(src + (int(zb),))
                continue
            dst = _written(fn, args)
            if dst is None:                 # a write we cannot place: nothing stays shared
                for key in list(open_):
                    close(key)
                wgt.clear()
                continue
            if dst[0] == ACT:
                lo, hi = _span(dst)
                for key in [key for key, g in open_.items() if g[0] < hi and lo < g[1]]:
                    close(key)
            elif dst[0] == WGT:
                src = args[0] if fn in (Machine._copy, Machine._copy_rows) else None
                const = src is not None and src[0] == CONST and _dense(src) and _dense(dst)
                wgt.append(_span(dst) + (src[2] if const else None,))
        for key in list(open_):
            close(key)
        return groups


def _column_terms(corr: np.ndarray, bias: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """A MATMUL's per-column int32 terms (modulo 2^32): the zero-point terms, plus the bias
    its accumulator starts from; None when there are none."""
    if bias is not None:
        return (corr + bias).astype(np.int32)
    return corr.astype(np.int32) if np.any(corr) else None


def _fold_bias_loads(steps, const: np.ndarray, reach: int = 64) -> Dict[int, np.ndarray]:
    """Bias LOADs folded into the MATMUL after them: a LOAD of constants that fills an
    accumulator tile with one row repeated, where the next step to touch those bytes
    (within `reach` steps) is a MATMUL accumulating into exactly that tile. The MATMUL then
    starts its sums from the row (`accumulate(..., assign=True)`), so the tile is written
    once instead of written and then read back; the LOAD's step does nothing. Returns
    {MATMUL index: the row, int32}."""
    biases: Dict[int, np.ndarray] = {}
    for i, (fn, args) in enumerate(steps):
        if fn not in (Machine._copy, Machine._copy_rows) or args[0][0] != CONST or args[1][0] != ACC or \
                not _dense(args[1]):
            continue
        lo, hi = _span(args[1])
        for j in range(i + 1, min(len(steps), i + 1 + reach)):
            fn2, args2 = steps[j]
            if fn2 is Machine._matmul and _span(args2[6]) == (lo, hi) and _dense(args2[6]):
                m, n = args2[6][3]
                src = args[0]
                data = np.ndarray(src[3], src[1], const, src[2], src[4]).reshape(-1).view(np.int32)
                row = data[:n]
                if data.size == m * n and np.array_equal(data.reshape(m, n), np.broadcast_to(row, (m, n))):
                    biases[args2[0]] = row.copy()
                    steps[i] = (Machine._folded, ())
                break
            if _touches(args2, ACC, lo, hi):
                break
    return biases


def _single_run(step):
    """A `_copy_rows` step of one run of bytes per sample as `Machine._copy_run` (a slice
    assignment, no block views); any other step as it is."""
    fn, args = step
    if fn is Machine._copy_rows and not args[2] and args[0][3][:2] == (1, 1):
        return Machine._copy_run, (args[0][0], args[0][2], args[1][0], args[1][2], args[0][3][2])
    return step


def _touches(args, mem: int, lo: int, hi: int) -> bool:
    """Whether any block among a step's arguments (nested ones included) overlaps bytes
    [lo, hi) of memory `mem`; HOST steps touch only the arena."""
    for x in args:
        if isinstance(x, tuple):
            if len(x) == 5 and isinstance(x[0], int) and isinstance(x[1], np.dtype):
                if x[0] == mem:
                    a, b = _span(x)
                    if a < hi and lo < b:
                        return True
            elif _touches(x, mem, lo, hi):
                return True
    return False


def _constant_b(b, wgt) -> Optional[Tuple[int, np.dtype, int, int]]:
    """(constant byte offset, dtype, K, n) of a dense one-byte B in WGT whose last writer
    (in `wgt`, the WGT writes so far) is one LOAD of constants covering all of it; else None."""
    if b[0] != WGT or b[1] != "dense" or b[2][1].itemsize != 1:
        return None
    lo, hi = _span(b[2])
    for w_lo, w_hi, off in reversed(wgt):
        if w_lo < hi and lo < w_hi:
            if off is None or w_lo > lo or w_hi < hi:
                return None
            k, n = b[2][3]
            return off + lo - w_lo, b[2][1], k, n
    return None


def _span(blk: Block) -> Tuple[int, int]:
    """[lo, hi): the bytes of its memory that a block touches."""
    _, npt, off, dims, strides = blk
    lo = off + sum((d - 1) * st for d, st in zip(dims, strides) if st < 0 and d > 0)
    hi = off + sum((d - 1) * st for d, st in zip(dims, strides) if st > 0 and d > 0) + npt.itemsize
    return lo, hi


def _dense(blk: Block) -> bool:
    """Whether a block's elements are consecutive in row-major order (no gaps, no repeats)."""
    expect = blk[1].itemsize
    for d, st in zip(reversed(blk[3]), reversed(blk[4])):
        if d == 1:
            continue
        if st != expect:
            return False
        expect *= d
    return True


def _written(fn, args) -> Optional[Block]:
    """The block a step writes (the arena for HOST), or None for a step of unknown kind."""
    at = _WRITES.get(fn)
    if at is None:
        return None
    return (ARENA, np.dtype(np.uint8), 0, (1,), (1,)) if at < 0 else args[at]


def _buf(buf: int, pc: int, what: str) -> int:
    if buf not in (Buf.ACT, Buf.WGT, Buf.ACC):
        raise SimulationError(f"instruction {pc} {what}: buffer {buf} (0: ACT_BUF, 1: WGT_BUF, 2: ACC_BUF)")
    return buf


_DECODE = {Op.LOAD: _Plan._load, Op.STORE: _Plan._store, Op.MATMUL: _Plan._matmul, Op.VFILL: _Plan._vfill,
           Op.VREQ: _Plan._vreq, Op.VADD: _Plan._vadd, Op.VMUL: _Plan._vmul, Op.VLUT: _Plan._vlut,
           Op.VPOOL: _Plan._vpool, Op.VDWCONV: _Plan._vdwconv, Op.HOST: _Plan._host}
_WRITES = {Machine._copy: 1, Machine._copy_rows: 1, Machine._vfill: 0, Machine._vreq: 2, Machine._vadd: 3,
           Machine._vmul: 3, Machine._vlut: 2, Machine._vpool: 2, Machine._vdwconv: 2, Machine._matmul: 6,
           Machine._host: -1}
"""Per handler, the index of the block it writes among its plan arguments (-1: the arena)."""
