"""Stage 2 for the vector unit and the DMA: depthwise convolution, pooling, pointwise
ops (QAdd, QMul, Requantize, lookup tables) and data movement (Transpose, Concat).

Windowed ops (depthwise convolution, MaxPool, QAveragePool) tile channel planes by
channels and output rows; the input tile carries its halo and is pre-filled with the
padding value (the zero point, or the type's minimum for MaxPool).

Pointwise ops and data movement share one tiler over an iteration space: every operand
is described by its element strides over that space (0 where it broadcasts, permuted
for a Transpose, a slice of the output for a Concat), dimensions that stay contiguous
for every operand are merged, and the DMA gathers each operand's tile into contiguous
SRAM (broadcasting and transposing on the way), so the vector op itself always runs
over contiguous elements.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from qcompile.quant_math import QADD, QMUL, REQUANTIZE

from ..isa import Buf, DType, DTYPE_BITS, Op, PoolMode, Space
from .context import Context, Slot
from .matrix import _halvings, _schedule
from .plan import Layer, LoweringError

__all__ = ["lower_dwconv", "lower_pool", "lower_pointwise", "lower_move"]


# -- windowed ops -------------------------------------------------------------------
def _window_attrs(node, kernel_default=None):
    kernel = list(node.attr("kernel_shape", None) or kernel_default)
    sh, sw = (list(node.attr("strides", None) or [1, 1]) + [1, 1])[:2]
    dh, dw = (list(node.attr("dilations", None) or [1, 1]) + [1, 1])[:2]
    pads = (list(node.attr("pads", None) or [0, 0, 0, 0]) + [0] * 4)[:4]
    return kernel, (sh, sw), (dh, dw), pads


def _windowed(ctx: Context, layer: Layer, xs: Slot, ys: Slot, kernel, strides, dil, pads, fill: int,
              wgt_bytes_per_channel: int, acc_per_out: int, body: Callable, what: str) -> None:
    """Tile (batch, channel, output rows); `body(b, c0, cn, r0, rn, in_ref, ih_t, iwp)` emits the compute."""
    n_batch, c, h, w = xs.shape
    _, _, oh, ow = ys.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dil
    pt, pl, pb, pr = pads
    iwp = w + pl + pr
    esz, osz = xs.esize, ys.esize
    a_type = xs.dtype

    def in_rows(r):
        return (r - 1) * sh + (kh - 1) * dh + 1

    def candidates():
        cap = ctx.emitter.capacity
        for ct in _halvings(c):
            for r in range(oh, 0, -1):
                act = ct * in_rows(r) * iwp * esz + ct * r * ow * osz
                if 2 * act <= cap[Buf.ACT] and 2 * ct * wgt_bytes_per_channel <= cap[Buf.WGT] and \
                        2 * ct * r * ow * acc_per_out <= cap[Buf.ACC]:
                    for rr in _halvings(r):
                        yield ct, rr
                    break

    def emit(cand):
        ct, oht = cand
        em = ctx.emitter
        pending: List[Callable] = []
        for b in range(n_batch):
            for c0 in range(0, c, ct):
                cn = min(ct, c - c0)
                for r0 in range(0, oh, oht):
                    rn = min(oht, oh - r0)
                    ih_t = in_rows(rn)
                    ref = em.vbuf(Buf.ACT, cn * ih_t * iwp * esz)
                    top = r0 * sh - pt
                    v0, v1 = max(0, top), min(h, top + ih_t)
                    if top < 0 or top + ih_t > h or pl or pr:
                        em.vfill(ctx.layer, ref, a_type, cn * ih_t * iwp, fill)
                    if v1 > v0:
                        src = xs.addr + ((b * c + c0) * h * w + v0 * w) * esz
                        em.load(ctx.layer, ref + ((v0 - top) * iwp + pl) * esz, Space.ACT, src, a_type,
                                (cn, v1 - v0, w), (h * w, w, 1), (ih_t * iwp, iwp, 1))
                    for p in pending:
                        p()
                    pending.clear()
                    out = body(b, c0, cn, r0, rn, ref, ih_t, iwp)
                    dst = ys.addr + ((b * ys.shape[1] + c0) * oh * ow + r0 * ow) * osz

                    def store(out=out, dst=dst, cn=cn, rn=rn):
                        em.store(ctx.layer, out, dst, ys.dtype, (1, cn, rn * ow), (0, oh * ow, 1), (0, rn * ow, 1))
                    pending.append(store)
        for p in pending:
            p()
        return f"{what} {c}x{h}x{w} -> {ys.shape[1]}x{oh}x{ow}: tiles channels {ct} x rows {oht}"

    _schedule(ctx, layer, candidates(), emit)


def lower_dwconv(ctx: Context, layer: Layer) -> None:
    node = layer.node
    xs, ys = ctx.slot(node.inputs[0]), ctx.slot(node.outputs[0])
    wv = np.asarray(node.inputs[1].const_value)
    c = xs.shape[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias_v = None if bias is None else np.asarray(bias.const_value, np.int32).reshape(-1)
    kernel, strides, dil, pads = _window_attrs(node, wv.shape[2:])
    kh, kw = kernel
    x_zp = int(node.attr("x_zero_point", 0))
    if xs.dtype not in (DType.INT8, DType.UINT8):
        raise LoweringError(f"node {layer.name}: {xs.dtype.name} activations on the vector unit")
    if wv.min() < -128 or wv.max() > 127:
        raise LoweringError(f"node {layer.name}: depthwise weights do not fit int8")
    from .matrix import _requant_params

    param_table = _requant_params(node, c)
    oh, ow = ys.shape[2:]
    out_zp, lo, hi = int(node.attr("out_zero_point", 0)), int(node.attr("out_min", -128)), int(node.attr("out_max", 127))
    layer.attrs.update(precision=f"a8w{layer.attrs.get('bits', 8)}", weight_type="INT8",
                       macs=int(xs.shape[0] * c * oh * ow * kh * kw))

    def body(b, c0, cn, r0, rn, ref, ih_t, iwp):
        em = ctx.emitter
        m = rn * ow
        wdata = wv[c0:c0 + cn, 0].astype(np.int8).tobytes()
        waddr = ctx.add_const(wdata, key=("dw", id(node), c0, cn))
        wref = em.vbuf(Buf.WGT, len(wdata))
        em.load(ctx.layer, wref, Space.CONST, waddr, DType.INT8, (1, 1, len(wdata)), (0, 0, 1), (0, 0, 1))
        pdata = param_table[c0:c0 + cn].tobytes()
        paddr = ctx.add_const(pdata, key=("p", id(node), c0, cn))
        pref = em.vbuf(Buf.WGT, len(pdata))
        em.load(ctx.layer, pref, Space.CONST, paddr, DType.INT32, (1, 1, 2 * cn), (0, 0, 1), (0, 0, 1))
        acc = em.vbuf(Buf.ACC, cn * m)
        if bias_v is not None:
            baddr = ctx.add_const(bias_v[c0:c0 + cn].tobytes(), key=("b", id(node), c0, cn))
            em.load(ctx.layer, acc, Space.CONST, baddr, DType.INT32, (1, cn, m), (0, 1, 0), (0, m, 1))
        else:
            em.vfill(ctx.layer, acc, DType.INT32, cn * m, 0)
        em.vdwconv(ctx.layer, ref, xs.dtype, x_zp, cn, ih_t, iwp, kh, kw, strides[0], strides[1], dil[0], dil[1],
                   rn, ow, wref, acc)
        out = em.vbuf(Buf.ACT, cn * m * ys.esize)
        em.vreq(ctx.layer, acc, DType.INT32, cn, m, m, 1, out, ys.dtype, m, 1, 0, pref, 2, 0, 0, out_zp, lo, hi)
        return out

    _windowed(ctx, layer, xs, ys, kernel, strides, dil, pads, x_zp, kh * kw + 8, 1, body,
              f"depthwise conv k{kh}x{kw}")


def lower_pool(ctx: Context, layer: Layer) -> None:
    node = layer.node
    xs, ys = ctx.slot(node.inputs[0]), ctx.slot(node.outputs[0])
    h, w = xs.shape[2:]
    oh, ow = ys.shape[2:]
    is_max = layer.attrs["mode"] == "max"
    if is_max:
        kernel, strides, dil, pads = _window_attrs(node)
        if int(node.attr("ceil_mode", 0)):
            # the extra bottom/right rows ceil_mode needs: same padding as the reference
            pads = list(pads)
            for i, (size, k, s, d) in enumerate(zip((h, w), kernel, strides, dil)):
                span = size + pads[i] + pads[i + 2] - ((k - 1) * d + 1)
                pads[i + 2] += (-span) % s
        fill = int(np.iinfo(np.int8 if xs.dtype == DType.INT8 else np.uint8).min)
        imm = dict(mode=int(PoolMode.MAX))
        what = f"max pool k{kernel[0]}x{kernel[1]}"
    else:
        if int(node.attr("global", 0)):
            kernel, strides, dil, pads = [h, w], (1, 1), (1, 1), [0, 0, 0, 0]
        else:
            kernel, strides, dil, pads = _window_attrs(node)
        fill = int(node.attr("x_zero_point", 0))
        imm = dict(mode=int(PoolMode.AVG), x_zp=fill, mult=int(node.attr("multiplier")), shift=int(node.attr("shift")),
                   out_zp=int(node.attr("out_zero_point", 0)), lo=int(node.attr("out_min", -128)),
                   hi=int(node.attr("out_max", 127)))
        what = f"average pool k{kernel[0]}x{kernel[1]}"
    if xs.dtype not in (DType.INT8, DType.UINT8):
        raise LoweringError(f"node {layer.name}: {xs.dtype.name} pooling on the vector unit")
    layer.attrs.update(precision="a8", macs=0, vector_ops=int(xs.shape[0] * ys.shape[1] * oh * ow *
                                                                kernel[0] * kernel[1]))

    def body(b, c0, cn, r0, rn, ref, ih_t, iwp):
        out = ctx.emitter.vbuf(Buf.ACT, cn * rn * ow * ys.esize)
        ctx.emitter.vpool(ctx.layer, ref, out, xs.dtype, cn, ih_t, iwp, kernel[0], kernel[1], strides[0], strides[1],
                          dil[0], dil[1], rn, ow, **imm)
        return out

    _windowed(ctx, layer, xs, ys, kernel, strides, dil, pads, fill, 0, 0, body, what)


# -- pointwise and data movement ------------------------------------------------------
def _dense_strides(shape: Sequence[int]) -> List[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return list(reversed(out))


def _broadcast_strides(shape: Sequence[int], space: Sequence[int]) -> List[int]:
    shape = [1] * (len(space) - len(shape)) + list(shape)
    return [0 if d == 1 and sd != 1 else s for d, sd, s in zip(shape, space, _dense_strides(shape))]


def _collapse(space: Sequence[int], strides: List[List[int]]) -> Tuple[List[int], List[List[int]]]:
    """Drop size-1 dims and merge neighbours that stay contiguous for every operand."""
    keep = [i for i, d in enumerate(space) if d != 1]
    dims = [space[i] for i in keep]
    st = [[s[i] for i in keep] for s in strides]
    i = len(dims) - 2
    while i >= 0:
        if all(s[i] == s[i + 1] * dims[i + 1] for s in st):
            dims[i] *= dims[i + 1]
            del dims[i + 1]
            for s in st:
                s[i] = s[i + 1]
                del s[i + 1]
        i -= 1
    if not dims:
        dims, st = [1], [[0] for _ in st]
    return dims, st


def _pointwise(ctx: Context, layer: Layer, space: Sequence[int], operands: List[Tuple[Slot, List[int], int]],
               out: Tuple[Slot, List[int], int], op: Optional[Callable], what: str,
               on_attempt: Optional[Callable[[], None]] = None, channel: Optional[List[int]] = None) -> None:
    """Tile an iteration space; operands = (slot, element strides over space, base element).
    `op(in_refs, count, where) -> out_ref` emits the vector op (None: a plain copy);
    `where` = (tile dims, index of `channel` at the tile start, `channel` strides over
    the tile dims) when `channel` (strides of a channel index over the space) is given."""
    extra = [channel] if channel is not None else []
    dims, strides = _collapse(space, [o[1] for o in operands] + [out[1]] + extra)
    if extra:
        chan = strides.pop()
    # at most three dims per DMA block: loop over the others
    outer_dims, dims3 = dims[:-3], dims[-3:]
    outer_strides = [s[:-3] for s in strides]
    st3 = [s[-3:] for s in strides]
    pad = 3 - len(dims3)
    dims3 = [1] * pad + dims3
    st3 = [[0] * pad + s for s in st3]
    if extra:
        chan_outer, chan3 = chan[:-3], [0] * pad + chan[-3:]
    sizes = [o[0].esize for o in operands] + [out[0].esize]
    per_elem = sum(sizes) if op is not None else max(sizes)
    cap = ctx.emitter.capacity[Buf.ACT] // 2

    def candidates():
        d0, d1, d2 = dims3
        budget = max(1, cap // per_elem)
        if d1 * d2 <= budget:
            t0 = min(d0, max(1, budget // (d1 * d2)))
            for t in _halvings(t0):
                yield t, d1, d2
            t1 = d1
        else:
            t1 = min(d1, max(1, budget // d2)) if d2 <= budget else 1
        for t in _halvings(t1):
            yield 1, t, d2 if d2 <= budget else min(d2, budget)
        for t in _halvings(min(d2, budget)):
            yield 1, 1, t

    def emit(cand):
        t0, t1, t2 = cand
        em = ctx.emitter
        d0, d1, d2 = dims3
        if on_attempt is not None:
            on_attempt()
        pending: List[Callable] = []
        for outer in np.ndindex(*outer_dims) if outer_dims else [()]:
            base = [sum(i * s for i, s in zip(outer, os)) for os in outer_strides]
            for i0 in range(0, d0, t0):
                for i1 in range(0, d1, t1):
                    for i2 in range(0, d2, t2):
                        n0, n1, n2 = min(t0, d0 - i0), min(t1, d1 - i1), min(t2, d2 - i2)
                        count = n0 * n1 * n2
                        refs = []
                        for k, (slot, _, b0) in enumerate(operands):
                            s = st3[k]
                            ref = em.vbuf(Buf.ACT, count * slot.esize)
                            src = slot.addr + (b0 + base[k] + i0 * s[0] + i1 * s[1] + i2 * s[2]) * slot.esize
                            em.load(ctx.layer, ref, Space.ACT, src, slot.dtype, (n0, n1, n2), s, (n1 * n2, n2, 1))
                            refs.append(ref)
                        for p in pending:
                            p()
                        pending.clear()
                        where = None
                        if extra:
                            c0 = sum(i * cs for i, cs in zip(outer, chan_outer)) + i0 * chan3[0] + i1 * chan3[1] + \
                                i2 * chan3[2]
                            where = ((n0, n1, n2), c0, chan3)
                        res = op(refs, count, where) if op is not None else refs[0]
                        oslot, _, ob = out
                        s = st3[-1]
                        dst = oslot.addr + (ob + base[-1] + i0 * s[0] + i1 * s[1] + i2 * s[2]) * oslot.esize

                        def store(res=res, dst=dst, dims=(n0, n1, n2), s=s):
                            em.store(ctx.layer, res, dst, oslot.dtype, dims, s, (dims[1] * dims[2], dims[2], 1))
                        pending.append(store)
        for p in pending:
            p()
        return f"{what} over {'x'.join(map(str, dims))}: tiles {t0}x{t1}x{t2}"

    _schedule(ctx, layer, candidates(), emit)


def lower_pointwise(ctx: Context, layer: Layer) -> None:
    op = layer.attrs["op"]
    ys = ctx.slot(layer.outputs[0])
    space = list(ys.shape)
    em = ctx.emitter
    ins = [ctx.slot(v) for v in layer.inputs[:2 if op in (QADD, QMUL) else 1]]
    operands = [(s, _broadcast_strides(s.shape, space), 0) for s in ins]
    out = (ys, _dense_strides(space), 0)
    node = layer.node
    n_elems = int(np.prod(space, dtype=np.int64))
    layer.attrs.update(precision=f"a{DTYPE_BITS[ins[0].dtype]}", macs=0, vector_ops=n_elems)

    def attr(name, default=0):
        return int(node.attr(name, default))

    if op == REQUANTIZE:
        def fn(refs, count, where=None):
            dst = em.vbuf(Buf.ACT, count * ys.esize)
            em.vreq(ctx.layer, refs[0], ins[0].dtype, 1, count, 0, 1, dst, ys.dtype, 0, 1, attr("x_zero_point"), None,
                    0, attr("multiplier"), attr("shift"), attr("out_zero_point"), attr("out_min", -128),
                    attr("out_max", 127))
            return dst
    elif op in (QADD, QMUL):
        if any(s.dtype not in (DType.INT8, DType.UINT8) for s in ins):
            raise LoweringError(f"node {layer.name}: {op} of {ins[0].dtype.name} tensors on the vector unit")
        common = dict(a_zp=attr("a_zero_point"), b_zp=attr("b_zero_point"), out_zp=attr("out_zero_point"),
                      lo=attr("out_min", -128), hi=attr("out_max", 127))
        if op == QADD:
            imm = dict(common, ma=attr("a_multiplier"), mb=attr("b_multiplier"), shift=attr("shift"))
            vop = Op.VADD
        else:
            imm = dict(common, mult=attr("multiplier"), shift=attr("shift"))
            vop = Op.VMUL

        def fn(refs, count, where=None):
            dst = em.vbuf(Buf.ACT, count * ys.esize)
            em.vbinary(ctx.layer, vop, refs[0], refs[1], dst, count, (ins[0].dtype, ins[1].dtype, ys.dtype), **imm)
            return dst
    elif op == "lut":
        info = layer.attrs["info"]
        tables = _lut_tables(ctx, layer, ins[0], ys)           # (channels, 256)
        taddr = ctx.add_const(tables.tobytes(), key=("lut", layer.name))
        state = {}
        channel = None
        if info["axis"] is not None:
            channel = [0] * len(space)
            channel[info["axis"][0]] = 1

        def fn(refs, count, where=None):
            nch, inner, c0 = 1, count, 0
            if where is not None:
                dims, c0, cstr = where
                moving = [k for k in range(3) if cstr[k]]
                if moving:
                    k = moving[0]
                    nch, inner = dims[k], int(np.prod(dims[k + 1:]))
            key = (c0, nch)
            if state.get("key") != key:  # a table (slice) stays loaded while tiles share it
                state["key"] = key
                state["ref"] = em.vbuf(Buf.WGT, 256 * nch)
                em.load(ctx.layer, state["ref"], Space.CONST, taddr + 256 * c0, DType.UINT8, (1, 1, 256 * nch),
                        (0, 0, 1), (0, 0, 1))
            dst = em.vbuf(Buf.ACT, count)
            em.vlut(ctx.layer, refs[0], dst, count, ins[0].dtype, ys.dtype, state["ref"], inner, nch)
            return dst

        layer.attrs["precision"] = "a8 (table)" if channel is None else f"a8 ({tables.shape[0]} tables)"
        _pointwise(ctx, layer, space, operands, out, fn, "lookup table", on_attempt=state.clear, channel=channel)
        return
    else:
        raise LoweringError(f"node {layer.name}: unknown pointwise op {op}")
    _pointwise(ctx, layer, space, operands, out, fn, f"{op}")


def _lut_tables(ctx: Context, layer: Layer, xs: Slot, ys: Slot) -> np.ndarray:
    """The chain's output for every 8-bit input (one row of 256 per channel when its
    constants vary along a channel axis), computed by the integer reference on the
    chain itself, so the tables equal what the reference computes."""
    from .host import run_chain

    info = layer.attrs["info"]
    lo = -128 if xs.dtype == DType.INT8 else 0
    values = np.arange(lo, lo + 256)
    if info["axis"] is None:
        x = values
    else:  # channels along their axis, the 256 values along a neighbouring one
        axis, channels = info["axis"]
        rank = len(xs.shape)
        other = axis + 1 if axis + 1 < rank else axis - 1
        shape = [1] * rank
        shape[axis], shape[other] = channels, 256
        x = np.broadcast_to(values.reshape([256 if d == other else 1 for d in range(rank)]), shape)
    x = np.ascontiguousarray(x).astype(np.int8 if xs.dtype == DType.INT8 else np.uint8)
    y = np.asarray(run_chain(ctx, info, x)).astype(np.int8 if ys.dtype == DType.INT8 else np.uint8)
    if info["axis"] is None:
        return y.reshape(1, 256)
    return np.moveaxis(y, (axis, other), (0, 1)).reshape(channels, 256)


def lower_move(ctx: Context, layer: Layer) -> None:
    node = layer.node
    ys = ctx.slot(node.outputs[0])
    layer.attrs.update(precision=f"a{DTYPE_BITS[ys.dtype]}", macs=0)
    if node.op_type == "Transpose":
        xs = ctx.slot(node.inputs[0])
        perm = list(node.attr("perm", None) or reversed(range(len(xs.shape))))
        xst = _dense_strides(xs.shape)
        _pointwise(ctx, layer, list(ys.shape), [(xs, [xst[p] for p in perm], 0)], (ys, _dense_strides(ys.shape), 0),
                   None, f"transpose perm={perm}")
        return
    if node.op_type == "Slice":
        xs = ctx.slot(node.inputs[0])
        starts, steps = _slice_starts(node, list(xs.shape), ctx.plan)
        xst = _dense_strides(xs.shape)
        base = sum(s * st for s, st in zip(starts, xst))
        _pointwise(ctx, layer, list(ys.shape), [(xs, [st * k for st, k in zip(xst, steps)], base)],
                   (ys, _dense_strides(ys.shape), 0), None, f"slice starts={starts} steps={steps}")
        return
    # Concat: copy every input into its slice of the output
    axis = int(node.attr("axis")) % len(ys.shape)
    yst = _dense_strides(ys.shape)
    offset = 0
    for v in node.inputs:
        xs = ctx.slot(v)
        if xs.dtype != ys.dtype:
            raise LoweringError(f"node {layer.name}: Concat of {xs.dtype.name} into {ys.dtype.name}")
        _pointwise(ctx, layer, list(xs.shape), [(xs, _dense_strides(xs.shape), 0)], (ys, yst, offset * yst[axis]),
                   None, f"concat input %{v.name} at {offset} on axis {axis}")
        offset += xs.shape[axis]


def _slice_starts(node, shape: List[int], plan) -> Tuple[List[int], List[int]]:
    """Per axis of the input, the first element a Slice (positive steps) reads and its
    step: ONNX's rule, negative starts counted from the end, clamped to [0, dim]."""
    if len(node.inputs) == 1:       # opsets 1-9: attributes, no steps
        starts_in, axes, steps_in = node.attr("starts"), node.attr("axes", None), None
    else:
        consts = [None if i >= len(node.inputs) or node.inputs[i] is None else plan.const(node.inputs[i])
                  for i in range(1, 5)]
        starts_in, _, axes, steps_in = consts
    rank = len(shape)
    axes = [int(a) % rank for a in (axes if axes is not None else range(len(starts_in)))]
    steps_in = steps_in if steps_in is not None else [1] * len(axes)
    starts, steps = [0] * rank, [1] * rank
    for a, s, k in zip(axes, starts_in, steps_in):
        s = int(s)
        s = s + shape[a] if s < 0 else s
        starts[a], steps[a] = min(max(s, 0), shape[a]), int(k)
    return starts, steps
