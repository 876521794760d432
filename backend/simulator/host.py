"""The host side of a program: its HOST operations and the interface conversions.

HOST operations are one-node ONNX models; default-domain ops run in onnxruntime and
`qcompile.int` ops in the integer reference, as the reference evaluator runs them. An op
whose tensors all have a leading dimension of 1 and that treats that dimension as the
batch (elementwise ops, pooling, LRN, Softmax or Concat over another axis...: `_BATCHED`)
runs once for all inferences, their tensors stacked along it; any other op runs one
inference at a time. The interface quantizes float inputs and dequantizes outputs with
ONNX QuantizeLinear / DequantizeLinear arithmetic (round half to even, float32).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ..program import Program
from . import _kernels

__all__ = ["HostRunner", "quantize_input", "dequantize_output"]

# Ops that compute each index of a leading batch dimension independently (elementwise,
# with constants broadcast; per-sample windows or normalisations), by domain.
_ELEMENTWISE = {
    "": {"Relu", "LeakyRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign",
         "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Clip", "Identity",
         "Cast", "Gelu", "Mish", "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu", "Where"},
    "qcompile.int": {"Quantize", "Dequantize", "Requantize", "QAdd", "QMul"},
}
_BATCHED = {
    "": {"LRN", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
         "InstanceNormalization", "Softmax", "LogSoftmax", "Hardmax", "Concat", "Flatten", "LayerNormalization",
         "Transpose"},
    "qcompile.int": {"QAveragePool"},
}
_CHUNK_BYTES = 1 << 19     # tensor bytes of the inferences run together (they stay in cache)
_AXIS_DEFAULT = {"Concat": None, "Flatten": 1, "LayerNormalization": -1}


def _batchable(proto) -> bool:
    """Whether the one-node model `proto` may run on N inferences stacked along dimension 0."""
    g = proto.graph
    if len(g.node) != 1:
        return False
    node = g.node[0]
    domain = node.domain if node.domain != "ai.onnx" else ""
    if node.op_type not in _ELEMENTWISE.get(domain, ()) | _BATCHED.get(domain, ()):
        return False
    constants = {t.name for t in g.initializer}
    if all(v.name in constants for v in g.input):
        return False                                  # nothing fed: its output has no batch dimension
    ranks = set()
    for v in list(g.input) + list(g.output):
        if v.name in constants:
            continue
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
            return False
        if node.op_type != "Flatten" or v in g.input:   # Flatten changes the rank, by its definition
            ranks.add(len(dims))
    if len(ranks) != 1:      # a fed tensor of lower rank would broadcast the stacked batch onto another axis
        return False
    rank = ranks.pop()
    attrs = {a.name: a for a in node.attribute}
    if node.op_type in _ELEMENTWISE.get(domain, ()):   # constants broadcast, but must not span dimension 0
        return all(len(t.dims) < rank or t.dims[0] == 1 for t in g.initializer)
    if any(len(t.dims) >= rank for t in g.initializer):
        return False                                  # e.g. a Concat with a constant operand
    if node.op_type in ("MaxPool", "BatchNormalization") and len(node.output) > 1:
        return False                                  # indices / training statistics span the batch
    if node.op_type == "Transpose":
        return "perm" in attrs and list(attrs["perm"].ints)[:1] == [0]
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        default = -1 if opset >= 13 else 1
        return (attrs["axis"].i if "axis" in attrs else default) % rank != 0
    if node.op_type in _AXIS_DEFAULT:
        axis = attrs["axis"].i if "axis" in attrs else _AXIS_DEFAULT[node.op_type]
        return axis is not None and axis % rank != 0
    return True


def _symbolic_batch(proto):
    """`proto` with dimension 0 of its inputs and outputs symbolic."""
    for v in list(proto.graph.input) + list(proto.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_param = "N"
    return proto


class HostRunner:
    def __init__(self, program: Program):
        self.program = program
        self._runners: Dict[int, Any] = {}

    def _runner(self, index: int):
        r = self._runners.get(index)
        if r is None:
            import onnx

            op = self.program.host_ops[index]
            proto = onnx.load_from_string(op.model)
            batched = _batchable(proto)
            if op.kind == "onnx":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                model = _symbolic_batch(proto).SerializeToString() if batched else op.model
                sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
                names = [i.name for i in sess.get_inputs()]
                r = ("onnx", sess, names, batched)
            else:
                from ..reference import _as_model

                model = _as_model(proto)
                names = [v.name for v in model.graph.inputs if v.const_value is None]
                pool = _AveragePool.of(model)
                r = ("pool", pool, names, batched) if pool is not None else ("integer", model, names, batched)
            self._runners[index] = r
        return r

    def run(self, index: int, arena: np.ndarray) -> None:
        op = self.program.host_ops[index]
        kind, engine, names, batched = self._runner(index)
        ins = [self.program.tensor_array(arena, t) for t in op.inputs]
        outs = [self.program.tensor_array(arena, t) for t in op.outputs]
        n = arena.shape[0]
        # batched: (k, 1, ...) -> (k, ...), k inferences along dimension 0, as many as fit in cache
        step = max(1, _CHUNK_BYTES // max(1, sum(x[0].nbytes for x in ins + outs))) if batched else 1
        for s in range(0, n, step):
            feeds = {name: np.ascontiguousarray(x[s:s + step].reshape((-1,) + x.shape[2:])) for name, x in
                     zip(names, ins)} if batched else {name: np.ascontiguousarray(x[s]) for name, x in zip(names, ins)}
            for o, r in zip(outs, self._call(kind, engine, feeds)):
                o[s:s + step] = np.asarray(r).reshape(o[s:s + step].shape)

    @staticmethod
    def _call(kind: str, engine, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        if kind == "onnx":
            return engine.run(None, feeds)
        if kind == "pool":
            return [engine(*feeds.values())]
        from ..reference import run_integer_graph

        res = run_integer_graph(engine, feeds)
        return [res[v.name] for v in engine.graph.outputs]


class _AveragePool:
    """A 2-D QAveragePool whose divisor varies by position (padding excluded, ceil mode),
    which rain-sim runs on the host: the integer reference's arithmetic (backend.reference
    `_qavgpool`: int32 window sums of x - x_zp over zero padding, then the rounding rule
    with a multiplier and shift per output position) through the simulator's kernels (the
    sums as a depthwise convolution with weights of 1 over x padded with x_zp, then the
    one-pass requantization), ten times faster than the reference's numpy steps."""

    def __init__(self, node, multiplier: np.ndarray, shift: np.ndarray):
        self.x_zp = int(node.attr("x_zero_point", 0))
        self.kernel = [int(k) for k in node.attr("kernel_shape")]
        self.strides = [int(v) for v in node.attr("strides", None) or [1, 1]]
        self.pads = [int(v) for v in node.attr("pads", None) or [0, 0, 0, 0]]
        self.out = multiplier.shape                                    # (OH, OW)
        self.mult = multiplier.reshape(1, -1).astype(np.int64)
        self.shift = shift.reshape(1, -1).astype(np.int64)
        self.zp = int(node.attr("out_zero_point", 0))
        self.lo, self.hi = int(node.attr("out_min", -128)), int(node.attr("out_max", 127))
        self.dtype = node.outputs[0].type.dtype.numpy_dtype

    @classmethod
    def of(cls, model) -> "_AveragePool | None":
        """The fast form of a one-node QAveragePool model, None when it does not apply."""
        from qcompile.quant_math import DOMAIN

        nodes = model.graph.nodes
        if len(nodes) != 1 or nodes[0].domain != DOMAIN or nodes[0].op_type != "QAveragePool":
            return None
        node = nodes[0]
        if node.attr("global", 0) or len(node.inputs) != 3 or any(v.const_value is None for v in node.inputs[1:]):
            return None
        m, sh = (np.asarray(v.const_value) for v in node.inputs[1:])
        x = node.inputs[0].type
        bytes_ = (np.dtype(np.int8), np.dtype(np.uint8))
        if m.ndim != 2 or m.shape != sh.shape or len(node.attr("kernel_shape")) != 2 or \
                getattr(x, "dtype", None) is None or x.dtype.numpy_dtype not in bytes_ or \
                node.outputs[0].type.dtype.numpy_dtype not in bytes_ or sh.min(initial=0) < 0 or \
                sh.max(initial=0) >= 63:
            return None
        info = np.iinfo(x.dtype.numpy_dtype)
        if not info.min <= int(node.attr("x_zero_point", 0)) <= info.max:     # the padding value must fit x
            return None
        return cls(node, m, sh)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from ..reference import ceil_mode_pads

        n, c, h, w = x.shape
        (oh, ow), (sh, sw) = self.out, self.strides
        top, left, bottom, right = ceil_mode_pads(self.pads, self.out, self.kernel, self.strides, (h, w))
        xp = np.full((n, c, top + h + bottom, left + w + right), self.x_zp, x.dtype)   # x_zp: a centred 0
        xp[:, :, top:top + h, left:left + w] = x
        acc = np.zeros((n, c, oh, ow), np.int32)
        _kernels.window_sums(xp, acc, self.x_zp, *self.kernel, sh, sw, 1, 1)
        y = np.empty((n, c, oh, ow), self.dtype)
        _kernels.requantize(acc.reshape(n, c, oh * ow), y.reshape(n, c, oh * ow), self.mult, self.shift, 1, 0,
                            self.zp, self.lo, self.hi)
        return y


def _channel_shape(ndim: int, axis: int, size: int) -> List[int]:
    shape = [1] * ndim
    shape[axis % ndim] = size
    return shape


def quantize_input(x: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """Float samples (N, *shape) to the program's integer input, as ONNX QuantizeLinear."""
    s = np.asarray(spec["scale"], np.float32).reshape(spec.get("scale_shape", [len(spec["scale"])]))
    zdt = np.dtype(spec.get("zero_point_dtype") or np.uint8)
    z = np.zeros((), np.int64) if spec["zero_point"] is None else np.asarray(spec["zero_point"], np.int64)
    x = np.asarray(x, np.float32)
    if s.ndim and s.size > 1:
        shape = [1] + _channel_shape(x.ndim - 1, spec["axis"], s.size)
        s, z = s.reshape(shape), z.reshape(shape)
    elif s.ndim:
        s, z = s.reshape(()), z.reshape(())
    info = np.iinfo(zdt)
    lo, hi = spec.get("out_min", info.min), spec.get("out_max", info.max)   # narrow types in a container
    y = np.divide(x, s, dtype=np.float32)
    np.rint(y, out=y)
    y += z.astype(np.float32)
    return np.clip(y, lo, hi, out=y).astype(zdt)


def dequantize_output(q: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """The program's integer output (N, *shape) to float, as ONNX DequantizeLinear."""
    s = np.asarray(spec["scale"], np.float32).reshape(spec.get("scale_shape", [len(spec["scale"])]))
    z = np.zeros((), np.int64) if spec["zero_point"] is None else np.asarray(spec["zero_point"], np.int64)
    if s.ndim and s.size > 1:
        shape = [1] + _channel_shape(q.ndim - 1, spec["axis"], s.size)
        s, z = s.reshape(shape), z.reshape(shape)
    elif s.ndim:
        s, z = s.reshape(()), z.reshape(())
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)
