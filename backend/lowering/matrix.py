"""Stage 2 for the matrix unit: tiled schedules of QConv and QGemm / QMatMul.

A convolution is a GEMM without an im2col copy: the MATMUL instruction reads its A
operand through a 2-D row pattern (output rows and columns at the stride) and a 3-D
column pattern (kernel row and column at the dilation, then input channel innermost, so
that groups of consecutive K elements run along channels, as N:M sparsity groups do) over an input
tile held in SRAM with its padding filled with the input zero point. The weights are
stored in the constant segment tile by tile, already in the K x N order the array reads
(sub-byte types packed), so each weight load is one contiguous DMA.

Tiles: output channels (N), output rows (M = rows x width), and input-channel chunks
(K). The candidates are the largest tiles for which two of each fit the SRAM buffers
(double buffering), with M rounded to multiples of the array's rows; they are ranked by
estimated cycles (`_tiling.pyx`: the matrix unit's closed forms against the DMA time the
loop order implies), the liveness allocator places the cheapest, and a layer that still
does not fit is retried with the next. Loop order: output-channel tiles outside
(weights stay resident) or output rows outside (inputs stay resident), whichever moves
fewer DRAM bytes.

Each output tile: bias preloaded into the accumulators by a broadcasting DMA, one
MATMUL per K chunk, VREQ (per-channel multiplier and shift) into an output tile, and a
store that is emitted after the next tile's loads so that DMA, matrix and vector work
overlap.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from qcompile.quant_math import QGEMM

from ..isa import Buf, DType, DTYPE_BITS, Space
from ._tiling import estimate_grid
from .context import Context, compressed_bytes, encode_weights, nm_pattern, weight_type
from .emitter import OutOfSram, Ref
from .plan import Layer, LoweringError

__all__ = ["lower_conv", "lower_gemm"]


def _halvings(n: int) -> List[int]:
    out = [n]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def _n_candidates(total: int, cols: int) -> List[int]:
    out = [total]
    k = total // cols
    while k >= 1 and len(out) < 6:
        if k * cols < total:
            out.append(k * cols)
        k //= 2
    out += [c for c in _halvings(min(total, cols)) if c < out[-1]]
    return sorted(set(out), reverse=True)


def _streamed(k: int, nm) -> int:
    """Rows of B the array streams: all K, or N/M of them for N:M-compressed weights."""
    return k if nm is None else k // nm[1] * nm[0]


def _sparsity_attrs(w: np.ndarray, nm) -> dict:
    """What the report says about a layer's weights: density and the N:M pattern used."""
    return {"weight_density": float(np.count_nonzero(w)) / max(w.size, 1),
            "nm": None if nm is None else f"{nm[0]}:{nm[1]}"}


def _count_weight_load(layer: Layer, stored: int, dense: int) -> None:
    layer.attrs["weight_dram_bytes"] += stored
    layer.attrs["weight_dram_bytes_dense"] += dense


def _requant_params(node, count: int, mi: int = 3, si: int = 4) -> np.ndarray:
    """(count, 2) int32 (M, s) pairs per output channel (scalars broadcast), from the
    node's multiplier and shift inputs; a tile's are rows n0..n0+nt, contiguous. Built
    once per layer, not from the whole vectors again for every tile."""
    m = np.asarray(node.inputs[mi].const_value, np.int64).reshape(-1)
    s = np.asarray(node.inputs[si].const_value, np.int64).reshape(-1)
    m = np.broadcast_to(m, (count,)) if m.size == 1 else m
    s = np.broadcast_to(s, (count,)) if s.size == 1 else s
    return np.stack([m, s], axis=1).astype(np.int32)


def _fits(ctx: Context, act: int, wgt: int, acc: int) -> bool:
    cap = ctx.emitter.capacity
    return 2 * act <= cap[Buf.ACT] and 2 * wgt <= cap[Buf.WGT] and 2 * acc <= cap[Buf.ACC]


class _Pipeline:
    """Tile bookkeeping shared by conv and GEMM: a one-entry cache per operand kind
    and the deferred store."""

    def __init__(self):
        self.cache: Dict[str, Tuple[object, Ref]] = {}
        self.pending: Optional[Callable[[], None]] = None
        self.last_b: Optional[Ref] = None

    def get(self, kind: str, key, make: Callable[[], Ref]) -> Ref:
        hit = self.cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        ref = make()
        self.cache[kind] = (key, ref)
        return ref

    def flush(self) -> None:
        if self.pending is not None:
            self.pending()
            self.pending = None


def _fill_flag(ctx: Context, pipe: _Pipeline, b: Ref, first_k: bool, k: int, n: int) -> bool:
    """Output-stationary: the first K chunk of an output tile fills the array.
    Weight-stationary: new weights fill it, unless one fold stays loaded."""
    if ctx.target.matrix.dataflow == "output-stationary":
        return first_k
    rows, cols = ctx.target.matrix.rows, ctx.target.matrix.cols
    same = pipe.last_b == b and math.ceil(k / rows) * math.ceil(n / cols) == 1
    pipe.last_b = b
    return not same


def _estimate(ctx: Context, m: Tuple[int, int, int], n: Tuple[int, int], k: Tuple[int, int, int], nm,
              a_bytes: int, w_bytes: int, out_bytes: int) -> float:
    """Estimated cycles of a tiling (`_tiling.estimate_grid`: the matrix unit's closed
    forms against the DMA time, which overlap). m = (M units, units per tile, rows per
    unit), n = (N, tile), k = (K units, units per tile, columns per unit)."""
    t = ctx.target
    sp_n, sp_m = nm if nm is not None else (0, 0)
    return estimate_grid(m[0], m[1], m[2], n[0], n[1], k[0], k[1], k[2], sp_n, sp_m, t.matrix.rows, t.matrix.cols,
                         t.matrix.dataflow == "output-stationary", int(a_bytes), int(w_bytes), int(out_bytes),
                         float(t.dram_bytes_per_cycle), int(t.dram_latency_cycles))


def _ranked(candidates: List[tuple], cost: Callable[[tuple], float], keep: int = 12) -> List[tuple]:
    """Distinct candidates, cheapest first (the first that fits SRAM is emitted)."""
    unique = list(dict.fromkeys(candidates))
    return sorted(unique, key=cost)[:keep] + [c for c in unique if c[-1] == 1][:2]


def _schedule(ctx: Context, layer: Layer, candidates: Iterator[tuple], emit: Callable[[tuple], str]) -> None:
    em = ctx.emitter
    tried = 0
    for cand in candidates:
        tried += 1
        em.begin_layer()
        try:
            text = emit(cand)
            em.finish_layer()
            ctx.note(f"{layer.name}: {text}")
            return
        except OutOfSram:
            em.rollback()
            if tried > 40:
                break
    raise NoTilingError(f"no tiling of {layer.name} fits the target's SRAM buffers (even 1 x 1 tiles)")


class NoTilingError(LoweringError):
    """No tiling of a layer fits the SRAM buffers: the layer then runs on the host
    (compile_program), so a model is never refused for its size."""


# -- convolution ----------------------------------------------------------------------
def lower_conv(ctx: Context, layer: Layer) -> None:
    node = layer.node
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    xs, ys = ctx.slot(x), ctx.slot(node.outputs[0])
    n_batch, c_in, h, wd = xs.shape
    _, c_out, oh, ow = ys.shape
    wv = np.asarray(w.const_value)
    _, cg, kh, kw = wv.shape
    group = int(node.attr("group", 1))
    mg = c_out // group
    sh, sw = (list(node.attr("strides", None) or [1, 1]) + [1, 1])[:2]
    dh, dw = (list(node.attr("dilations", None) or [1, 1]) + [1, 1])[:2]
    pt, pl, pb, pr = (list(node.attr("pads", None) or [0, 0, 0, 0]) + [0] * 4)[:4]
    x_zp = int(node.attr("x_zero_point", 0))
    a_type, o_type = xs.dtype, ys.dtype
    if a_type not in (DType.INT8, DType.UINT8):
        raise LoweringError(f"node {layer.name}: {a_type.name} activations on the matrix unit")
    wtype = weight_type(wv, layer.attrs.get("bits", 8), ctx.target.matrix.precisions)
    wbits = DTYPE_BITS[wtype]
    nm = nm_pattern(wv.transpose(2, 3, 1, 0).reshape(kh * kw * cg, c_out), ctx.target.matrix.nm_patterns(), cg)
    step = nm[1] if nm else 1       # K chunks keep whole N:M groups
    iwp = wd + pl + pr
    osz = ys.esize
    rows = ctx.target.matrix.rows
    bias_v = None if bias is None else np.asarray(bias.const_value, np.int32).reshape(-1)
    out_zp, lo, hi = int(node.attr("out_zero_point", 0)), int(node.attr("out_min", -128)), int(node.attr("out_max", 127))
    param_table = _requant_params(node, c_out)
    layer.attrs.update(precision=f"a{DTYPE_BITS[a_type]}w{wbits}", weight_type=wtype.name,
                       macs=int(n_batch * c_out * oh * ow * cg * kh * kw), **_sparsity_attrs(wv, nm))

    def in_rows(r: int) -> int:
        return (r - 1) * sh + (kh - 1) * dh + 1

    def candidates():
        for kc in sorted({step * h for h in _halvings(cg // step)}, reverse=True):
            for nt in _n_candidates(mg, ctx.target.matrix.cols):
                wbytes = compressed_bytes(kc * kh * kw, nt, wtype, nm) + 8 * nt
                best = 0
                for r in range(oh, 0, -1):
                    if _fits(ctx, kc * in_rows(r) * iwp + nt * r * ow * osz, wbytes, r * ow * nt):
                        best = r
                        break
                if not best:
                    continue
                aligned = [r for r in range(best, 0, -1) if (r * ow) % rows == 0][:1]
                for r in [best] + aligned + _halvings(best)[1:]:
                    yield kc, nt, r

    def cost(cand) -> float:
        kc, nt, r = cand
        tiles = -(-oh // r)
        a_rows = (oh - tiles) * sh + tiles * ((kh - 1) * dh + 1)   # in_rows summed over the row tiles
        return group * n_batch * _estimate(ctx, (oh, r, ow), (mg, nt), (cg, kc, kh * kw), nm, a_rows * iwp * cg,
                                           compressed_bytes(cg * kh * kw, mg, wtype, nm), mg * oh * ow * osz)

    def emit(cand) -> str:
        kc, nt, oht = cand
        em = ctx.emitter
        pipe = _Pipeline()
        layer.attrs.update(weight_dram_bytes=0, weight_dram_bytes_dense=0)
        m_tiles = [(r0, min(oht, oh - r0)) for r0 in range(0, oh, oht)]
        n_tiles = [(c0, min(nt, mg - c0)) for c0 in range(0, mg, nt)]
        k_tiles = [(c0, min(kc, cg - c0)) for c0 in range(0, cg, kc)]
        in_bytes = sum(kcc * in_rows(r) * iwp for _, r in m_tiles for _, kcc in k_tiles)
        w_bytes = compressed_bytes(cg * kh * kw, mg, wtype, nm)
        n_outer = len(k_tiles) > 1 or in_bytes * len(n_tiles) + w_bytes <= in_bytes + w_bytes * len(m_tiles)

        def load_input(b, g, m, k) -> Ref:
            (r0, rn), (c0, cn) = m, k
            ih_t = in_rows(rn)
            ref = em.vbuf(Buf.ACT, cn * ih_t * iwp)
            top = r0 * sh - pt                       # input row of the tile's first row
            v0, v1 = max(0, top), min(h, top + ih_t)
            if top < 0 or top + ih_t > h or pl or pr:
                em.vfill(ctx.layer, ref, a_type, cn * ih_t * iwp, x_zp)
            if v1 > v0:
                src = xs.addr + ((b * c_in + g * cg + c0) * h * wd + v0 * wd)
                em.load(ctx.layer, ref + ((v0 - top) * iwp + pl), Space.ACT, src, a_type, (cn, v1 - v0, wd),
                        (h * wd, wd, 1), (ih_t * iwp, iwp, 1))
            return ref

        def load_weights(g, n, k) -> Ref:
            (n0, nn), (c0, cn) = n, k
            co = g * mg + n0
            tile = wv[co:co + nn, c0:c0 + cn].transpose(2, 3, 1, 0).reshape(kh * kw * cn, nn)  # K = (kh, kw, c)
            data = encode_weights(tile, wtype, nm)
            _count_weight_load(layer, len(data), compressed_bytes(tile.shape[0], nn, wtype, None))
            addr = ctx.add_const(data, key=("w", id(node), g, n0, c0))
            ref = em.vbuf(Buf.WGT, len(data))
            em.load(ctx.layer, ref, Space.CONST, addr, DType.UINT8, (1, 1, len(data)), (0, 0, 1), (0, 0, 1))
            return ref

        def load_params(g, n) -> Ref:
            n0, nn = n
            data = param_table[g * mg + n0:g * mg + n0 + nn].tobytes()
            addr = ctx.add_const(data, key=("p", id(node), g, n0))
            ref = em.vbuf(Buf.WGT, len(data))
            em.load(ctx.layer, ref, Space.CONST, addr, DType.INT32, (1, 1, 2 * nn), (0, 0, 1), (0, 0, 1))
            return ref

        def tile(b, g, m, n):
            (r0, rn), (n0, nn) = m, n
            mrows = rn * ow
            acc = em.vbuf(Buf.ACC, mrows * nn)
            co = g * mg + n0
            if bias_v is not None:
                addr = ctx.add_const(bias_v[co:co + nn].tobytes(), key=("b", id(node), co, nn))
                em.load(ctx.layer, acc, Space.CONST, addr, DType.INT32, (1, mrows, nn), (0, 0, 1), (0, nn, 1))
            else:
                em.vfill(ctx.layer, acc, DType.INT32, mrows * nn, 0)
            params = pipe.get("p", (g, n), lambda: load_params(g, n))
            for ki, k in enumerate(k_tiles):
                a = pipe.get("a", (b, g, m, k), lambda: load_input(b, g, m, k))
                wref = pipe.get("w", (g, n, k), lambda: load_weights(g, n, k))
                pipe.flush()
                cn = k[1]
                ih_t = in_rows(rn)
                em.matmul(ctx.layer, a, a_type, x_zp, (rn, ow), (sh * iwp, sw), (kh, kw, cn),
                          (dh * iwp, dw, ih_t * iwp), wref, wtype, 0, nn, acc,
                          _fill_flag(ctx, pipe, wref, ki == 0, _streamed(cn * kh * kw, nm), nn), nm)
            out = em.vbuf(Buf.ACT, nn * mrows * osz)
            em.vreq(ctx.layer, acc, DType.INT32, mrows, nn, nn, 1, out, o_type, 1, mrows, 0, params, 1, 0, 0,
                    out_zp, lo, hi)
            dst = ys.addr + ((b * c_out + co) * oh * ow + r0 * ow) * osz

            def store():
                em.store(ctx.layer, out, dst, o_type, (1, nn, mrows), (0, oh * ow, 1), (0, mrows, 1))
            pipe.pending = store

        for b in range(n_batch):
            for g in range(group):
                if n_outer:
                    for n in n_tiles:
                        for m in m_tiles:
                            tile(b, g, m, n)
                else:
                    for m in m_tiles:
                        for n in n_tiles:
                            tile(b, g, m, n)
        pipe.flush()
        return (f"conv {c_in}x{h}x{wd} -> {c_out}x{oh}x{ow} k{kh}x{kw} s{sh}x{sw} g{group} {wtype.name}"
                f"{f' {nm[0]}:{nm[1]}-sparse' if nm else ''}: tiles "
                f"out-channels {nt} x rows {oht} ({oht * ow} px) x in-channels {kc}; "
                f"{len(n_tiles)}x{len(m_tiles)}x{len(k_tiles)} tiles, "
                f"{'channel tiles outer (weights resident)' if n_outer else 'row tiles outer (inputs resident)'}")

    _schedule(ctx, layer, iter(_ranked(list(candidates()), cost)), emit)


# -- GEMM and MatMul ------------------------------------------------------------------
def lower_gemm(ctx: Context, layer: Layer) -> None:
    node = layer.node
    is_gemm = node.op_type == QGEMM
    x, w = node.inputs[0], node.inputs[1]
    xs, ys = ctx.slot(x), ctx.slot(node.outputs[0])
    w_const = w.const_value is not None
    bias = node.inputs[2] if is_gemm and len(node.inputs) > 2 and node.inputs[2] is not None else None
    mi, si = (3, 4) if is_gemm else (2, 3)
    zp_in = node.inputs[5] if is_gemm and len(node.inputs) > 5 else (node.inputs[4] if not is_gemm and
                                                                    len(node.inputs) > 4 else None)
    b_zp = 0 if zp_in is None or zp_in.const_value is None else int(np.asarray(zp_in.const_value).reshape(-1)[0])
    x_zp = int(node.attr("x_zero_point", 0))
    a_type, o_type = xs.dtype, ys.dtype
    if a_type not in (DType.INT8, DType.UINT8):
        raise LoweringError(f"node {layer.name}: {a_type.name} activations on the matrix unit")
    osz = ys.esize
    out_shape = ys.shape
    k_dim = xs.shape[-1]
    n_dim = out_shape[-1]
    m_dim = out_shape[-2] if len(out_shape) >= 2 else 1
    batch_shape = out_shape[:-2]
    if w_const:
        wv = np.asarray(w.const_value)
        if is_gemm and int(node.attr("transB", 0)):
            wv = wv.T
        if is_gemm and int(node.attr("transA", 0)):
            raise LoweringError(f"node {layer.name}: QGemm with transA")
        wtype = weight_type(wv, layer.attrs.get("bits", 8), ctx.target.matrix.precisions)
        m_dim = int(np.prod(out_shape[:-1], dtype=np.int64))   # all leading dims are rows
        batch_shape = ()
    else:
        ws = ctx.slot(w)
        wtype = ws.dtype
        if wtype not in (DType.INT8, DType.UINT8):
            raise LoweringError(f"node {layer.name}: {wtype.name} second operand on the matrix unit")
    wbits = DTYPE_BITS[wtype]
    nm = nm_pattern(wv, ctx.target.matrix.nm_patterns(), k_dim) if w_const else None
    step = nm[1] if nm else 1
    n_batch = int(np.prod(batch_shape, dtype=np.int64)) if batch_shape else 1
    param_table = _requant_params(node, n_dim, mi, si)
    out_zp, lo, hi = int(node.attr("out_zero_point", 0)), int(node.attr("out_min", -128)), int(node.attr("out_max", 127))
    bias_v = None if bias is None else np.asarray(bias.const_value, np.int32).reshape(-1)
    layer.attrs.update(precision=f"a{DTYPE_BITS[a_type]}w{wbits}", weight_type=wtype.name,
                       macs=int(n_batch * m_dim * k_dim * n_dim), **(_sparsity_attrs(wv, nm) if w_const else {}))

    def batch_offset(slot, shape, b) -> int:
        """Element offset of batch index b in a [..., R, C] tensor broadcast to batch_shape."""
        if not batch_shape:
            return 0
        lead = list(shape[:-2])
        lead = [1] * (len(batch_shape) - len(lead)) + lead
        idx = np.unravel_index(b, batch_shape)
        strides, acc = [], shape[-1] * shape[-2]
        for d in reversed(lead):
            strides.append(acc if d > 1 else 0)
            acc *= d
        strides.reverse()
        return int(sum(i * s for i, s in zip(idx, strides)))

    def candidates():
        for kc in sorted({step * h for h in _halvings(k_dim // step)}, reverse=True):
            for nt in _n_candidates(n_dim, ctx.target.matrix.cols):
                wbytes = compressed_bytes(kc, nt, wtype, nm) + 8 * nt
                for mt in _halvings(m_dim):
                    if _fits(ctx, mt * kc + mt * nt * osz, wbytes, mt * nt):
                        yield kc, nt, mt
                        if mt < m_dim and mt > ctx.target.matrix.rows:
                            yield kc, nt, mt - mt % ctx.target.matrix.rows
                        break

    def cost(cand) -> float:
        kc, nt, mt = cand
        return n_batch * _estimate(ctx, (m_dim, mt, 1), (n_dim, nt), (k_dim, kc, 1), nm, m_dim * k_dim,
                                   compressed_bytes(k_dim, n_dim, wtype, nm), m_dim * n_dim * osz)

    def emit(cand) -> str:
        kc, nt, mt = cand
        em = ctx.emitter
        pipe = _Pipeline()
        layer.attrs.update(weight_dram_bytes=0, weight_dram_bytes_dense=0)
        m_tiles = [(r0, min(mt, m_dim - r0)) for r0 in range(0, m_dim, mt)]
        n_tiles = [(c0, min(nt, n_dim - c0)) for c0 in range(0, n_dim, nt)]
        k_tiles = [(c0, min(kc, k_dim - c0)) for c0 in range(0, k_dim, kc)]
        a_bytes = m_dim * k_dim
        w_bytes = compressed_bytes(k_dim, n_dim, wtype, nm)
        n_outer = len(k_tiles) > 1 or a_bytes * len(n_tiles) + w_bytes <= a_bytes + w_bytes * len(m_tiles)

        def load_a(b, m, k) -> Ref:
            (r0, rn), (c0, cn) = m, k
            ref = em.vbuf(Buf.ACT, rn * cn)
            src = xs.addr + batch_offset(xs, xs.shape, b) + r0 * k_dim + c0
            em.load(ctx.layer, ref, Space.ACT, src, a_type, (1, rn, cn), (0, k_dim, 1), (0, cn, 1))
            return ref

        def load_b(b, n, k) -> Ref:
            (n0, nn), (c0, cn) = n, k
            if w_const:
                data = encode_weights(wv[c0:c0 + cn, n0:n0 + nn], wtype, nm)
                _count_weight_load(layer, len(data), compressed_bytes(cn, nn, wtype, None))
                addr = ctx.add_const(data, key=("w", id(node), n0, c0))
                ref = em.vbuf(Buf.WGT, len(data))
                em.load(ctx.layer, ref, Space.CONST, addr, DType.UINT8, (1, 1, len(data)), (0, 0, 1), (0, 0, 1))
                return ref
            ws = ctx.slot(w)
            ref = em.vbuf(Buf.WGT, cn * nn)
            src = ws.addr + batch_offset(ws, ws.shape, b) + c0 * n_dim + n0
            em.load(ctx.layer, ref, Space.ACT, src, wtype, (1, cn, nn), (0, n_dim, 1), (0, nn, 1))
            return ref

        def load_params(n) -> Ref:
            n0, nn = n
            data = param_table[n0:n0 + nn].tobytes()
            addr = ctx.add_const(data, key=("p", id(node), n0))
            ref = em.vbuf(Buf.WGT, len(data))
            em.load(ctx.layer, ref, Space.CONST, addr, DType.INT32, (1, 1, 2 * nn), (0, 0, 1), (0, 0, 1))
            return ref

        def tile(b, m, n):
            (r0, rn), (n0, nn) = m, n
            acc = em.vbuf(Buf.ACC, rn * nn)
            if bias_v is not None:
                addr = ctx.add_const(bias_v[n0:n0 + nn].tobytes(), key=("b", id(node), n0, nn))
                em.load(ctx.layer, acc, Space.CONST, addr, DType.INT32, (1, rn, nn), (0, 0, 1), (0, nn, 1))
            else:
                em.vfill(ctx.layer, acc, DType.INT32, rn * nn, 0)
            params = pipe.get("p", n, lambda: load_params(n))
            for ki, k in enumerate(k_tiles):
                a = pipe.get("a", (b, m, k), lambda: load_a(b, m, k))
                bref = pipe.get("w", (b if not w_const else 0, n, k), lambda: load_b(b, n, k))
                pipe.flush()
                cn = k[1]
                em.matmul(ctx.layer, a, a_type, x_zp, (1, rn), (0, cn), (1, 1, cn), (0, 0, 1), bref, wtype, b_zp, nn,
                          acc, _fill_flag(ctx, pipe, bref, ki == 0, _streamed(cn, nm), nn), nm)
            out = em.vbuf(Buf.ACT, rn * nn * osz)
            em.vreq(ctx.layer, acc, DType.INT32, rn, nn, nn, 1, out, o_type, nn, 1, 0, params, 1, 0, 0, out_zp, lo,
                    hi)
            dst = ys.addr + (b * m_dim * n_dim + r0 * n_dim + n0) * osz

            def store():
                em.store(ctx.layer, out, dst, o_type, (1, rn, nn), (0, n_dim, 1), (0, nn, 1))
            pipe.pending = store

        for b in range(n_batch):
            if n_outer:
                for n in n_tiles:
                    for m in m_tiles:
                        tile(b, m, n)
            else:
                for m in m_tiles:
                    for n in n_tiles:
                        tile(b, m, n)
        pipe.flush()
        what = "weights" if w_const else "activations"
        return (f"{node.op_type} {n_batch} x [{m_dim}x{k_dim}] @ [{k_dim}x{n_dim}] ({what}, {wtype.name}): tiles "
                f"rows {mt} x cols {nt} x K {kc}; {len(m_tiles)}x{len(n_tiles)}x{len(k_tiles)} tiles")

    _schedule(ctx, layer, iter(_ranked(list(candidates()), cost)), emit)
