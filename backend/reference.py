"""The integer reference evaluator: what an integer graph computes, bit for bit.

`run_integer_graph(model, feeds)` runs a graph produced by `lower-integer`: the ops of
the `qcompile.int` domain (defined, with the rounding rule, in qcompile.quant_math)
and the data-movement ops on integer tensors, in vectorised numpy. The simulator must
match it exactly.

Exactness: accumulations are sums of products of zero-point-corrected operands (each
at most 255 in magnitude for 8-bit types), computed as float64 matrix products, exact
while K * 255 * 255 < 2^53, far beyond any layer, then converted to int64; the
accumulator is int64 here (a layer whose sums leave int32 would wrap on hardware, and
lower-integer keeps K * 255 * 255 < 2^31 in practice). Requantization is int64.

Default-domain ops that are not data movement are float ops on the host (DESIGN:
"HOST"): they run in onnxruntime, one node at a time, between Dequantize and Quantize.

`integer_graph_shapes(model, inputs)` is the same evaluator without the data: the shape
and element type of every tensor from the input shapes alone, for the lowering (a
VGG-19 run on zeros spent seconds and gigabytes in its float64 matrix products to learn
shapes). Each op has a shape rule beside its arithmetic below; values that do not depend
on the data (constants, Shape, and ops on them) are computed exactly, by the same code
the full run uses. Where a shape would depend on data (NonZero, a Reshape to a computed
shape, ...) it raises `ShapesNeedValues` and the caller runs the full evaluator.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from qcompile.ir import Model, Node, TensorType
from qcompile.quant_math import (
    DEQUANTIZE, DOMAIN, QADD, QAVERAGEPOOL, QCONV, QGEMM, QMATMUL, QMUL, QUANTIZE, REQUANTIZE, requantize,
)

__all__ = ["run_integer_graph", "integer_graph_shapes", "IntegerGraphError", "ShapesNeedValues"]


class IntegerGraphError(RuntimeError):
    """The graph holds something the integer reference cannot run."""


class ShapesNeedValues(IntegerGraphError):
    """`integer_graph_shapes` cannot tell a shape without the data (or the graph is
    malformed there): run the full evaluator, which computes it or names the error."""


def run_integer_graph(model, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None
                      ) -> Dict[str, np.ndarray]:
    """Run an integer graph (a qcompile Model, ModelProto or path); returns
    {output name: array} for the graph outputs (or the named values)."""
    model = _as_model(model)
    g = model.graph
    env: Dict[int, np.ndarray] = {}
    for v in g.initializers.values():
        env[id(v)] = np.asarray(v.const_value)
    for v in g.inputs:
        if v.name in feeds:
            env[id(v)] = np.asarray(feeds[v.name])
        elif id(v) not in env:
            raise IntegerGraphError(f"no feed for graph input %{v.name}")
    host = _Host(model)
    for node in g.nodes:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        if node.domain == DOMAIN:
            fn = _OPS.get(node.op_type)
            if fn is None:
                raise IntegerGraphError(f"unknown op {DOMAIN}.{node.op_type} (node {node.label})")
            results = [fn(node, *args)]
        elif node.domain in ("", "ai.onnx") and node.op_type in _MOVES:
            results = [_MOVES[node.op_type](node, *args)]
        else:
            results = host.run(node, args)
        for v, r in zip(node.outputs, results):
            env[id(v)] = r
    if outputs is None:
        return {v.name: env[id(v)] for v in g.outputs}
    by_name = {v.name: v for v in g.values()}
    return {n: env[id(by_name[n])] for n in outputs}


def _as_model(model) -> Model:
    if isinstance(model, Model):
        return model
    from qcompile.onnx_io import from_proto, load

    return load(model) if isinstance(model, str) else from_proto(model)


# -- requantization and helpers -----------------------------------------------------
def _attr(node: Node, name: str, default=None):
    return node.attr(name, default)


def _out_dtype(node: Node) -> np.dtype:
    t = node.outputs[0].type
    return t.dtype.numpy_dtype if isinstance(t, TensorType) else np.dtype(np.int8)


def _finish(node: Node, acc, multiplier, shift) -> np.ndarray:
    y = requantize(acc, multiplier, shift, _attr(node, "out_zero_point", 0), _attr(node, "out_min", -128),
                   _attr(node, "out_max", 127))
    return y.astype(_out_dtype(node))


def _centered(x: np.ndarray, zp) -> np.ndarray:
    """x - zp as float64 (exact)."""
    return x.astype(np.float64) - np.float64(zp)


def _channel(a: Optional[np.ndarray], ndim: int, axis: int) -> np.ndarray:
    """Shape a per-channel vector to broadcast along `axis` of an `ndim` array."""
    a = np.asarray(a, dtype=np.int64)
    if a.ndim == 0 or a.size == 1:
        return a.reshape(())
    shape = [1] * ndim
    shape[axis] = a.size
    return a.reshape(shape)


def _exact_int(acc: np.ndarray) -> np.ndarray:
    return np.rint(acc).astype(np.int64)


# -- weighted ops -------------------------------------------------------------------
def _windows(xp: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """(N, C, *out, *kernel) windows of the padded input xp (a view where possible)."""
    d = len(kernel)
    eff = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=tuple(range(2, 2 + d)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, dl) for dl in dilations)
    return win[index]


def _pad(x: np.ndarray, pads, value) -> np.ndarray:
    d = x.ndim - 2
    if not any(pads):
        return x
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)]
    return np.pad(x, width, constant_values=value)


def _qconv(node: Node, x, w, bias=None, multiplier=None, shift=None, w_zp=None):
    d = x.ndim - 2
    kernel = list(_attr(node, "kernel_shape", None) or w.shape[2:])
    strides = list(_attr(node, "strides", None) or [1] * d)
    dilations = list(_attr(node, "dilations", None) or [1] * d)
    pads = list(_attr(node, "pads", None) or [0] * (2 * d))
    group = int(_attr(node, "group", 1))
    xc = _pad(_centered(x, _attr(node, "x_zero_point", 0)), pads, 0.0)
    win = _windows(xc, kernel, strides, dilations)  # N, C, *out, *k
    n, c = x.shape[:2]
    out_sp = win.shape[2:2 + d]
    m = w.shape[0]
    cols = np.moveaxis(win, 1, 1 + d)  # N, *out, C, *k
    kk = (c // group) * int(np.prod(kernel))
    cols = cols.reshape(n, int(np.prod(out_sp)), group, kk).transpose(0, 2, 1, 3)  # N, G, L, kk
    wc = w.astype(np.float64)
    if w_zp is not None:
        wc = wc - _channel(w_zp, w.ndim, 0)
    wg = wc.reshape(group, m // group, kk).transpose(0, 2, 1)  # G, kk, M/G
    acc = np.matmul(cols, wg)  # N, G, L, M/G
    acc = acc.transpose(0, 1, 3, 2).reshape(n, m, *out_sp)
    acc = _exact_int(acc)
    if bias is not None:
        acc = acc + _channel(bias, acc.ndim, 1)
    return _finish(node, acc, _channel(multiplier, acc.ndim, 1), _channel(shift, acc.ndim, 1))


def _qgemm(node: Node, x, w, bias=None, multiplier=None, shift=None, w_zp=None):
    wc = w.astype(np.float64)
    if int(_attr(node, "transB", 0)):
        if w_zp is not None:
            wc = wc - _channel(w_zp, 2, 0)
        wc = wc.T
    elif w_zp is not None:
        wc = wc - _channel(w_zp, 2, 1)
    acc = _exact_int(_centered(x, _attr(node, "x_zero_point", 0)) @ wc)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape(-1)
    return _finish(node, acc, _channel(multiplier, 2, 1), _channel(shift, 2, 1))


def _qmatmul(node: Node, x, w, multiplier=None, shift=None, w_zp=None):
    wc = w.astype(np.float64)
    if w_zp is not None:
        wc = wc - _channel(w_zp, 2, 1)
    acc = _exact_int(_centered(x, _attr(node, "x_zero_point", 0)) @ wc)
    return _finish(node, acc, _channel(multiplier, acc.ndim, acc.ndim - 1), _channel(shift, acc.ndim, acc.ndim - 1))


# -- elementwise and pooling --------------------------------------------------------
def _qadd(node: Node, a, b):
    acc = (a.astype(np.int64) - _attr(node, "a_zero_point", 0)) * np.int64(_attr(node, "a_multiplier")) + \
        (b.astype(np.int64) - _attr(node, "b_zero_point", 0)) * np.int64(_attr(node, "b_multiplier"))
    return _finish(node, acc, 1, _attr(node, "shift"))


def _qmul(node: Node, a, b):
    acc = (a.astype(np.int64) - _attr(node, "a_zero_point", 0)) * (b.astype(np.int64) - _attr(node, "b_zero_point", 0))
    return _finish(node, acc, _attr(node, "multiplier"), _attr(node, "shift"))


def _window_sums(xp: np.ndarray, kernel, strides) -> np.ndarray:
    """(N, C, *out) sums of the windows of xp (N, C, *spatial), one strided add per tap:
    numpy's sum over a sliding-window view walks the kernel axes for every output, a
    dozen times slower."""
    d = len(kernel)
    out = [(xp.shape[2 + i] - kernel[i]) // strides[i] + 1 for i in range(d)]
    acc = None
    for tap in np.ndindex(*kernel):
        view = xp[(slice(None), slice(None)) + tuple(slice(t, t + (o - 1) * s + 1, s)
                                                     for t, o, s in zip(tap, out, strides))]
        if acc is None:
            acc = view.copy()
        else:
            acc += view
    return acc


def ceil_mode_pads(pads, out, kernel, strides, spatial) -> List[int]:
    """`pads` (begins, then ends) with each end grown far enough for the last of `out`
    windows (ceil_mode): what a pool with a multiplier per output position sums over."""
    d = len(kernel)
    pads = list(pads)
    for i in range(d):
        need = (out[i] - 1) * strides[i] + kernel[i] - (spatial[i] + pads[i] + pads[i + d])
        pads[i + d] += max(need, 0)
    return pads


def _qavgpool(node: Node, x, multiplier=None, shift=None):
    d = x.ndim - 2
    taps = 1 if _attr(node, "global", 0) else int(np.prod(_attr(node, "kernel_shape")))
    # int32 sums where they cannot wrap (8- and 16-bit inputs), as the accumulator adds them
    wide = x.dtype.kind not in "iu" or x.dtype.itemsize > 2 or taps >= 2 ** 15
    xc = x.astype(np.int64 if wide else np.int32) - _attr(node, "x_zero_point", 0)
    if _attr(node, "global", 0):
        acc = xc.sum(axis=tuple(range(2, x.ndim)), keepdims=True)
    else:
        kernel = list(_attr(node, "kernel_shape"))
        strides = list(_attr(node, "strides", None) or [1] * d)
        pads = list(_attr(node, "pads", None) or [0] * (2 * d))
        if multiplier is not None and np.ndim(multiplier) == d:  # per position: its shape is the output's
            pads = ceil_mode_pads(pads, np.shape(multiplier), kernel, strides, x.shape[2:])
        acc = _window_sums(_pad(xc, pads, 0), kernel, strides)
        if multiplier is not None and np.ndim(multiplier) == d:
            acc = acc[(slice(None), slice(None)) + tuple(slice(0, n) for n in np.shape(multiplier))]
    if multiplier is None:
        multiplier, shift = _attr(node, "multiplier"), _attr(node, "shift")
    return _finish(node, acc, multiplier, shift)


def _requant(node: Node, x):
    return _finish(node, x.astype(np.int64) - _attr(node, "x_zero_point", 0), _attr(node, "multiplier"),
                   _attr(node, "shift"))


def _quantize(node: Node, x, scale, zp=None):
    axis = _attr(node, "axis", 1)
    s = np.asarray(scale, np.float32)
    z = np.zeros((), np.int64) if zp is None else np.asarray(zp)
    if s.ndim:
        s, zc = s.reshape(_bshape(x.ndim, axis, s.size)), z.reshape(_bshape(x.ndim, axis, s.size))
    else:
        zc = z
    dtype = np.dtype(np.uint8) if zp is None else np.asarray(zp).dtype
    info = np.iinfo(dtype)
    lo, hi = _attr(node, "out_min", info.min), _attr(node, "out_max", info.max)  # narrow types in a container
    y = np.rint(np.asarray(x, np.float32) / s) + zc.astype(np.float32)  # round half to even
    return np.clip(y, lo, hi).astype(dtype)


def _dequantize(node: Node, x, scale, zp=None):
    axis = _attr(node, "axis", 1)
    s = np.asarray(scale, np.float32)
    z = np.zeros((), np.int64) if zp is None else np.asarray(zp, np.int64)
    if s.ndim:
        s, z = s.reshape(_bshape(x.ndim, axis, s.size)), z.reshape(_bshape(x.ndim, axis, s.size))
    return ((x.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def _bshape(ndim: int, axis: int, size: int) -> List[int]:
    shape = [1] * ndim
    shape[axis % ndim] = size
    return shape


_OPS = {QCONV: _qconv, QGEMM: _qgemm, QMATMUL: _qmatmul, QADD: _qadd, QMUL: _qmul, QAVERAGEPOOL: _qavgpool,
        REQUANTIZE: _requant, QUANTIZE: _quantize, DEQUANTIZE: _dequantize}


# -- data movement on integer tensors -------------------------------------------------
def _maxpool(node: Node, x):
    d = x.ndim - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", None) or [1] * d)
    dilations = list(_attr(node, "dilations", None) or [1] * d)
    pads = list(_attr(node, "pads", None) or [0] * (2 * d))
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise IntegerGraphError(f"MaxPool auto_pad is not supported (node {node.label})")
    if _attr(node, "ceil_mode", 0):
        pads = list(pads)
        for i in range(d):
            eff = (kernel[i] - 1) * dilations[i] + 1
            span = x.shape[2 + i] + pads[i] + pads[i + d] - eff
            extra = (-span) % strides[i]
            pads[i + d] += extra
    low = np.iinfo(x.dtype).min
    win = _windows(_pad(x, pads, low), kernel, strides, dilations)
    return win.max(axis=tuple(range(2 + d, 2 + 2 * d)))


def _flatten(node: Node, x):
    axis = _attr(node, "axis", 1) % max(x.ndim, 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(node: Node, x, shape):
    shape = [int(s) for s in shape]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(node: Node, x):
    perm = _attr(node, "perm", None)
    return np.transpose(x, perm)


def _axes(node: Node, axes) -> Optional[List[int]]:
    if axes is not None:
        return [int(a) for a in np.asarray(axes).ravel()]
    a = _attr(node, "axes", None)
    return None if a is None else list(a)


def _squeeze(node: Node, x, axes=None):
    ax = _axes(node, axes)
    return np.squeeze(x, axis=None if ax is None else tuple(a % x.ndim for a in ax))


def _unsqueeze(node: Node, x, axes=None):
    ax = _axes(node, axes)
    rank = x.ndim + len(ax)
    for a in sorted(a % rank for a in ax):
        x = np.expand_dims(x, a)
    return x


def _concat(node: Node, *xs):
    return np.concatenate(xs, axis=_attr(node, "axis"))


_MOVES = {"MaxPool": _maxpool, "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose,
          "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat}


# -- host float ops ----------------------------------------------------------------
class _Host:
    """Float ops on the host: one onnxruntime session per node, built on first use."""

    def __init__(self, model: Model):
        self.model = model
        self.sessions: Dict[int, object] = {}
        self.proto = None

    def run(self, node: Node, args: List[Optional[np.ndarray]]) -> List[np.ndarray]:
        if any(True for _ in node.subgraphs()):
            raise IntegerGraphError(f"host op {node.label} has subgraphs: not supported by the integer reference")
        sess = self.sessions.get(id(node))
        if sess is None:
            sess = self.sessions[id(node)] = self._session(node, args)
        feeds = {f"i{i}": a for i, a in enumerate(args) if a is not None}
        return list(sess.run(None, feeds))

    def _session(self, node: Node, args):
        import onnxruntime as ort
        from onnx import helper

        from qcompile.onnx_io.exporter import to_proto

        # the node as exported, with its inputs renamed i0.., outputs o0..
        if self.proto is None:      # the nodes only: the weights stay out (VGG-19's are 137 MB)
            self.proto = to_proto(self.model, weights_as_inputs_over=0)
        proto = self.proto
        np_node = next((n for n in proto.graph.node if n.name == node.name and n.op_type == node.op_type
                        and list(n.output) == [v.name for v in node.outputs]), None)
        if np_node is None:
            raise IntegerGraphError(f"host op {node.label}: cannot export it")
        ins = [f"i{i}" if a is not None else "" for i, a in enumerate(args)]
        outs = [f"o{i}" for i in range(len(node.outputs))]
        n2 = helper.make_node(node.op_type, ins, outs, domain=node.domain, name=node.name)
        n2.attribute.extend(np_node.attribute)
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                  for n, a in zip(ins, args) if a is not None]
        # an output whose type the IR does not know gets none: onnxruntime infers it
        outputs = [helper.make_tensor_value_info(o, v.type.dtype.onnx_type, None) if isinstance(v.type, TensorType)
                   else helper.make_empty_tensor_value_info(o) for o, v in zip(outs, node.outputs)]
        graph = helper.make_graph([n2], "host", inputs, outputs)
        opsets = [helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items() if d != DOMAIN]
        m = helper.make_model(graph, opset_imports=opsets, ir_version=min(self.model.ir_version, 10))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# -- shapes only ---------------------------------------------------------------------
class _Spec(NamedTuple):
    """What the shapes-only evaluator knows of a tensor: its shape and element type,
    and its value where that does not depend on the data (else None)."""
    shape: Tuple[int, ...]
    dtype: np.dtype
    value: Optional[np.ndarray] = None


# ops whose output shape depends on the data itself
_DATA_SHAPED = frozenset({"NonZero", "Unique", "Compress"})
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli", "Dropout"})
# one input, one output of the same shape and type
_SAME_SHAPE = frozenset({
    "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Exp", "Log", "Erf", "Gelu", "Neg", "Abs", "Sqrt", "Reciprocal", "Mish", "Sin", "Cos", "Floor",
    "Ceil", "Round", "Sign", "Identity", "ThresholdedRelu", "Softmax", "LogSoftmax", "Hardmax", "Not"})
# two inputs of one type broadcast (numpy rules, as ONNX's multidirectional broadcasting)
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div"})


def integer_graph_shapes(model, inputs: Mapping[str, Tuple[Sequence[int], np.dtype]]
                         ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, np.dtype], Dict[str, np.ndarray]]:
    """Shapes and element types of every tensor of an integer graph, given the graph
    inputs' {name: (shape, dtype)}: ({name: shape}, {name: dtype}, {name: value}), the
    values for the tensors that do not depend on the data (initializers included).
    What `run_integer_graph` on inputs of those shapes would give, without computing
    the data; raises ShapesNeedValues where a shape needs the data."""
    model = _as_model(model)
    g = model.graph
    env: Dict[int, _Spec] = {}
    for v in g.initializers.values():
        a = np.asarray(v.const_value)
        env[id(v)] = _Spec(a.shape, a.dtype, a)
    for v in g.inputs:
        if v.name in inputs:
            shape, dtype = inputs[v.name]
            env[id(v)] = _Spec(tuple(int(d) for d in shape), np.dtype(dtype))
        elif id(v) not in env:
            raise IntegerGraphError(f"no feed for graph input %{v.name}")
    host = _Host(model)
    for node in g.nodes:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        try:
            results = _node_shapes(node, args, host)
        except IntegerGraphError:
            raise
        except Exception as e:  # noqa: BLE001 - the full run reports it properly
            raise ShapesNeedValues(f"node {node.label}: {type(e).__name__}: {e}") from None
        if len(results) < len(node.outputs):
            raise ShapesNeedValues(f"node {node.label}: {len(node.outputs)} outputs, {len(results)} known")
        for v, r in zip(node.outputs, results):
            env[id(v)] = r
    shapes, dtypes, values = {}, {}, {}
    for v in g.values():
        spec = env.get(id(v))
        if spec is None:
            continue
        shapes[v.name], dtypes[v.name] = spec.shape, spec.dtype
        if spec.value is not None:
            values[v.name] = spec.value
    return shapes, dtypes, values


def _node_shapes(node: Node, args: List[Optional[_Spec]], host: "_Host") -> List[_Spec]:
    present = [a for a in args if a is not None]
    if node.domain == DOMAIN:
        fn = _SHAPE_OPS.get(node.op_type)
        if fn is None:
            raise IntegerGraphError(f"unknown op {DOMAIN}.{node.op_type} (node {node.label})")
        return [fn(node, *args)]
    op = node.op_type
    known = all(a.value is not None for a in present)
    if node.domain in ("", "ai.onnx") and op in _MOVES:
        if known:
            return [_known(_MOVES[op](node, *[None if a is None else a.value for a in args]))]
        return [_MOVE_SHAPES[op](node, *args)]
    standard = node.domain in ("", "ai.onnx")
    if standard and op == "Shape" and present:
        rank = len(present[0].shape)
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return [_known(np.array(present[0].shape[slice(start, rank if end is None else end)], np.int64))]
    if standard and op == "Size" and present:
        return [_known(np.array(int(np.prod(present[0].shape, dtype=np.int64)), np.int64))]
    has_subgraphs = any(True for _ in node.subgraphs())
    if known and (present or op == "Constant") and op not in _NONDETERMINISTIC and not has_subgraphs:
        return [_known(r) for r in host.run(node, [None if a is None else a.value for a in args])]
    if op in _DATA_SHAPED or has_subgraphs:
        raise ShapesNeedValues(f"node {node.label}: the shape of a {op} depends on the data")
    if standard and op in _SAME_SHAPE and len(present) == 1 and len(node.outputs) == 1:
        return [_Spec(present[0].shape, present[0].dtype)]
    if standard and op in _BROADCAST and len(present) == 2 and len(node.outputs) == 1 and \
            present[0].dtype == present[1].dtype:
        return [_Spec(np.broadcast_shapes(present[0].shape, present[1].shape), present[0].dtype)]
    # any other host op: run it once on zeros of its input shapes (the shape of every
    # ONNX op but those above follows from its input shapes and constant operands)
    zeros = [None if a is None else a.value if a.value is not None else np.zeros(a.shape, a.dtype) for a in args]
    return [_Spec(np.shape(r), np.asarray(r).dtype) for r in host.run(node, zeros)]


def _known(a) -> _Spec:
    a = np.asarray(a)
    return _Spec(a.shape, a.dtype, a)


def _shape(x) -> Tuple[int, ...]:
    return np.shape(x)


def _finish_shape(node: Node, acc, multiplier, shift) -> _Spec:
    """`_finish`'s result: acc broadcast against the requantization parameters."""
    shape = np.broadcast_shapes(acc, multiplier, shift, *(np.shape(_attr(node, k, 0)) for k in
                                                          ("out_zero_point", "out_min", "out_max")))
    return _Spec(shape, np.dtype(_out_dtype(node)))


def _channel_shape(a: Optional[_Spec], ndim: int, axis: int) -> Tuple[int, ...]:
    """The shape `_channel` gives a per-channel vector."""
    size = int(np.prod(a.shape, dtype=np.int64))
    if len(a.shape) == 0 or size == 1:
        return ()
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def _window_counts(sizes, kernel, strides, dilations, least: int = 1) -> Tuple[int, ...]:
    """Output positions of a sliding window over (padded) `sizes`, as `_windows` slices
    them (a window larger than the input is an error there; `_window_sums` with
    least=0 gives no positions for a window one longer)."""
    out = []
    for n, k, s, dl in zip(sizes, kernel, strides, dilations):
        span = n - ((k - 1) * dl + 1) + 1
        if span < least or s <= 0:
            raise ValueError(f"window {k} (dilation {dl}) over {n} elements")
        out.append(len(range(0, span, s)))
    return tuple(out)


def _matmul_shape(a: Tuple[int, ...], b: Tuple[int, ...]) -> Tuple[int, ...]:
    """np.matmul's result shape."""
    if not a or not b:
        raise ValueError("matmul of a scalar")
    a2 = (1,) + tuple(a) if len(a) == 1 else tuple(a)
    b2 = tuple(b) + (1,) if len(b) == 1 else tuple(b)
    if a2[-1] != b2[-2]:
        raise ValueError(f"matmul of {a} and {b}")
    out = np.broadcast_shapes(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(b) == 1:
        out = out[:-1]
    if len(a) == 1:
        out = out[:-2] + out[-1:] if len(b) > 1 else out[:-1]
    return tuple(out)


def _qconv_shape(node: Node, x, w, bias=None, multiplier=None, shift=None, w_zp=None) -> _Spec:
    d = len(x.shape) - 2
    kernel = list(_attr(node, "kernel_shape", None) or w.shape[2:])
    strides = list(_attr(node, "strides", None) or [1] * d)
    dilations = list(_attr(node, "dilations", None) or [1] * d)
    pads = list(_attr(node, "pads", None) or [0] * (2 * d))
    group = int(_attr(node, "group", 1))
    n, c = x.shape[:2]
    m = w.shape[0]
    kk = (c // group) * int(np.prod(kernel))
    if d < 1 or c != group * (c // group) or m % group or int(np.prod(w.shape[1:])) != kk:
        raise ValueError(f"convolution of {x.shape} by {w.shape} in {group} groups")
    padded = [x.shape[2 + i] + (pads[i] + pads[i + d] if any(pads) else 0) for i in range(d)]
    acc = (n, m) + _window_counts(padded, kernel, strides, dilations)
    if bias is not None:
        acc = np.broadcast_shapes(acc, _channel_shape(bias, len(acc), 1))
    return _finish_shape(node, acc, _channel_shape(multiplier, len(acc), 1), _channel_shape(shift, len(acc), 1))


def _qgemm_shape(node: Node, x, w, bias=None, multiplier=None, shift=None, w_zp=None) -> _Spec:
    wshape = w.shape[::-1] if int(_attr(node, "transB", 0)) else w.shape
    acc = _matmul_shape(x.shape, wshape)
    if bias is not None:
        acc = np.broadcast_shapes(acc, (int(np.prod(bias.shape, dtype=np.int64)),))
    return _finish_shape(node, acc, _channel_shape(multiplier, 2, 1), _channel_shape(shift, 2, 1))


def _qmatmul_shape(node: Node, x, w, multiplier=None, shift=None, w_zp=None) -> _Spec:
    acc = _matmul_shape(x.shape, w.shape)
    nd = len(acc)
    return _finish_shape(node, acc, _channel_shape(multiplier, nd, nd - 1), _channel_shape(shift, nd, nd - 1))


def _qadd_shape(node: Node, a, b) -> _Spec:
    return _finish_shape(node, np.broadcast_shapes(a.shape, b.shape), (), np.shape(_attr(node, "shift")))


def _qmul_shape(node: Node, a, b) -> _Spec:
    return _finish_shape(node, np.broadcast_shapes(a.shape, b.shape), np.shape(_attr(node, "multiplier")),
                         np.shape(_attr(node, "shift")))


def _qavgpool_shape(node: Node, x, multiplier=None, shift=None) -> _Spec:
    d = len(x.shape) - 2
    if _attr(node, "global", 0):
        acc = tuple(x.shape[:2]) + (1,) * d
    else:
        kernel = list(_attr(node, "kernel_shape"))
        strides = list(_attr(node, "strides", None) or [1] * d)
        pads = list(_attr(node, "pads", None) or [0] * (2 * d))
        per_position = multiplier is not None and len(multiplier.shape) == d
        if per_position:
            out = multiplier.shape
            for i in range(d):
                need = (out[i] - 1) * strides[i] + kernel[i] - (x.shape[2 + i] + pads[i] + pads[i + d])
                pads[i + d] += max(need, 0)
        padded = [x.shape[2 + i] + (pads[i] + pads[i + d] if any(pads) else 0) for i in range(d)]
        sums = _window_counts(padded, kernel, strides, [1] * d, least=0)
        if per_position:
            sums = tuple(min(s, m) for s, m in zip(sums, multiplier.shape))
        acc = tuple(x.shape[:2]) + sums
    if multiplier is None:
        return _finish_shape(node, acc, np.shape(_attr(node, "multiplier")), np.shape(_attr(node, "shift")))
    if shift is None:
        raise ValueError("a multiplier input without a shift")
    return _finish_shape(node, acc, multiplier.shape, shift.shape)


def _requant_shape(node: Node, x) -> _Spec:
    return _finish_shape(node, x.shape, np.shape(_attr(node, "multiplier")), np.shape(_attr(node, "shift")))


def _scaled_shape(node: Node, x, scale, zp) -> Tuple[int, ...]:
    """The broadcast of x against the scale and zero point as Quantize and Dequantize
    reshape them."""
    axis = _attr(node, "axis", 1)
    size = int(np.prod(scale.shape, dtype=np.int64))
    z = () if zp is None else zp.shape
    if len(scale.shape):
        if int(np.prod(z, dtype=np.int64)) != size:
            raise ValueError(f"zero point of shape {z} for a scale of {size}")
        s = z = tuple(_bshape(len(x.shape), axis, size))
    else:
        s = ()
    return np.broadcast_shapes(x.shape, s, z)


def _quantize_shape(node: Node, x, scale, zp=None) -> _Spec:
    return _Spec(_scaled_shape(node, x, scale, zp), np.dtype(np.uint8) if zp is None else zp.dtype)


def _dequantize_shape(node: Node, x, scale, zp=None) -> _Spec:
    return _Spec(_scaled_shape(node, x, scale, zp), np.dtype(np.float32))


_SHAPE_OPS = {QCONV: _qconv_shape, QGEMM: _qgemm_shape, QMATMUL: _qmatmul_shape, QADD: _qadd_shape,
              QMUL: _qmul_shape, QAVERAGEPOOL: _qavgpool_shape, REQUANTIZE: _requant_shape,
              QUANTIZE: _quantize_shape, DEQUANTIZE: _dequantize_shape}


def _maxpool_shape(node: Node, x) -> _Spec:
    d = len(x.shape) - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", None) or [1] * d)
    dilations = list(_attr(node, "dilations", None) or [1] * d)
    pads = list(_attr(node, "pads", None) or [0] * (2 * d))
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or x.dtype.kind not in "iu" or d < 1:
        raise ValueError("MaxPool the reference refuses")
    if _attr(node, "ceil_mode", 0):
        for i in range(d):
            eff = (kernel[i] - 1) * dilations[i] + 1
            span = x.shape[2 + i] + pads[i] + pads[i + d] - eff
            pads[i + d] += (-span) % strides[i]
    padded = [x.shape[2 + i] + (pads[i] + pads[i + d] if any(pads) else 0) for i in range(d)]
    return _Spec(tuple(x.shape[:2]) + _window_counts(padded, kernel, strides, dilations), x.dtype)


def _phantom(spec: _Spec) -> np.ndarray:
    """An array of the spec's shape that occupies one element (all strides 0): views
    of it (reshape, transpose, squeeze) give numpy's own shapes and errors for free."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, spec.dtype), spec.shape, (0,) * len(spec.shape))


def _view_shape(fn):
    def rule(node: Node, x, *rest) -> _Spec:
        if any(r is not None and r.value is None for r in rest):
            raise ShapesNeedValues(f"node {node.label}: {node.op_type} with an operand computed from the data")
        y = fn(node, _phantom(x), *[None if r is None else r.value for r in rest])
        return _Spec(y.shape, x.dtype)
    return rule


def _concat_shape(node: Node, *xs) -> _Spec:
    rank = len(xs[0].shape)
    axis = _attr(node, "axis")
    if not -rank <= axis < rank or any(len(x.shape) != rank for x in xs):
        raise ValueError("Concat of tensors of different ranks")
    axis %= rank
    rest = {x.shape[:axis] + x.shape[axis + 1:] for x in xs}
    if len(rest) != 1:
        raise ValueError("Concat of tensors of different shapes")
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return _Spec(tuple(shape), np.result_type(*[x.dtype for x in xs]))


_MOVE_SHAPES = {"MaxPool": _maxpool_shape, "Flatten": _view_shape(_flatten), "Reshape": _view_shape(_reshape),
                "Transpose": _view_shape(_transpose), "Squeeze": _view_shape(_squeeze),
                "Unsqueeze": _view_shape(_unsqueeze), "Concat": _concat_shape}
