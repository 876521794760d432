"""Quantization error analysis: which tensor and which layer hurts.

    report = analyze_quantization_error(float_model, qdq_model, samples)
    print(report.format_table())
    json.dump(report.to_dict(), f)

or in a pipeline, after `quantize`:

    fold,calibrate,quantize{weights=int4},error-report{output=errors.json,samples=64}

Two measurements, both as signal-to-quantization-noise ratios in dB
(10 log10(sum x^2 / sum (x - x_q)^2), summed over all samples; inf when exact):
  1. Per quantized tensor: the QDQ model's tensor against the float model's same tensor.
     Activations: each QuantizeLinear's input names the float tensor, its
     DequantizeLinear's output is the quantized copy (both models run in onnxruntime with
     the tensors exposed as outputs, graph optimisations off so names survive). Weights
     and biases: the dequantized constant against the float constant (a bias that
     quantize's bias correction moved by more than its rounding is marked `corrected`:
     its SQNR counts the deliberate move, not only rounding). The activation
     error is end to end (the error of everything before the tensor included).
  2. Per quantized layer (Conv, Gemm, MatMul): the model-output SQNR when only that
     layer is quantized -- its weight, bias, input activation and output activation
     (after a fused Relu/Clip) keep their QDQ; every other DequantizeLinear becomes an
     Identity of the float tensor. Layers are listed worst first.
The float model must be the one `quantize` saw (after `fold`): constants are matched by
the name of the node that reads them. The pass stores it in
model.annotations["float_model"].
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile._fileio import atomic_write
from qcompile.data import load_samples
from qcompile.errors import QCompileError
from qcompile.ir import Model
from qcompile.onnx_io import from_proto, to_proto
from qcompile.passmanager import Pass, PassResult, option, register_pass

__all__ = ["ErrorReport", "LayerError", "TensorError", "analyze_quantization_error", "ErrorReportPass"]

log = logging.getLogger(__name__)
_LAYERS = ("Conv", "Gemm", "MatMul")
_FUSED = ("Relu", "Clip")
ModelLike = Union[Model, onnx.ModelProto, str]


@dataclass
class TensorError:
    """One quantized tensor: SQNR (dB) of its QDQ value against the float value."""
    name: str
    kind: str  # activation | weight | bias
    dtype: str
    sqnr_db: float
    scale: Optional[float] = None  # per-tensor scale (activations); None when per channel
    corrected: bool = False  # a bias moved by bias correction (beyond rounding): its SQNR counts the move


@dataclass
class LayerError:
    """One quantized layer: model-output SQNR (dB) when only it is quantized."""
    name: str
    op_type: str
    weight_type: str
    output_sqnr_db: float
    output_cosine: float
    weight_sqnr_db: Optional[float] = None


@dataclass
class ErrorReport:
    """Per-tensor and per-layer quantization error; layers worst first."""
    tensors: List[TensorError] = field(default_factory=list)
    layers: List[LayerError] = field(default_factory=list)
    output_sqnr_db: float = math.inf  # the whole QDQ model
    output_cosine: float = 1.0
    samples: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: inf (no error at all) is written as null."""
        return _finite({"samples": self.samples, "output_sqnr_db": self.output_sqnr_db,
                        "output_cosine": self.output_cosine,
                        "layers": [asdict(l) for l in self.layers],
                        "tensors": [asdict(t) for t in self.tensors]})

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ErrorReport":
        def inf(x):
            return math.inf if x is None else x
        layers = [LayerError(**{**l, "output_sqnr_db": inf(l["output_sqnr_db"])}) for l in d["layers"]]
        tensors = [TensorError(**{**t, "sqnr_db": inf(t["sqnr_db"])}) for t in d["tensors"]]
        return cls(tensors, layers, inf(d["output_sqnr_db"]), d["output_cosine"], d["samples"])

    @property
    def worst_layer(self) -> Optional[LayerError]:
        return self.layers[0] if self.layers else None

    def format_table(self) -> str:
        """Two plain-text tables: layers (worst first) and tensors (graph order)."""
        lines = [f"quantization error over {self.samples} samples: model output SQNR "
                 f"{_db(self.output_sqnr_db)} dB, cosine {self.output_cosine:.5f}", ""]
        rows = [(l.name, l.op_type, l.weight_type, _db(l.weight_sqnr_db), _db(l.output_sqnr_db),
                 f"{l.output_cosine:.5f}") for l in self.layers]
        lines += _table(("layer (only it quantized)", "op", "weights", "weight SQNR dB", "output SQNR dB",
                         "output cosine"), rows)
        lines.append("")
        rows = [(t.name, t.kind + (" (corrected)" if t.corrected else ""), t.dtype,
                 "per-channel" if t.scale is None else f"{t.scale:.4g}", _db(t.sqnr_db))
                for t in self.tensors]
        lines += _table(("tensor", "kind", "type", "scale", "SQNR dB"), rows)
        return "\n".join(lines)


def analyze_quantization_error(float_model: ModelLike, qdq_model: ModelLike, samples: Any, *,
                               max_samples: Optional[int] = None, batch_size: int = 16,
                               per_layer: bool = True, threads: int = 2) -> ErrorReport:
    """Compare `qdq_model` (the output of `quantize`) with `float_model` (the model it
    quantized) on `samples`: an .npz path or folder, or an iterable of feed dicts.
    See the module docstring for what is measured."""
    fp, qp = _proto(float_model), _proto(qdq_model)
    q_ir = qdq_model if isinstance(qdq_model, Model) else from_proto(qp)
    bits = json.loads(_meta(qp).get("qcompile.weight_bits", "{}"))
    graph = _QdqGraph(qp, fp)

    float_names = _tensor_names(fp)
    acts = []  # (float name, DQ output name, Q node)
    for dq in graph.activation_dqs:
        q = graph.producer[dq.input[0]]
        fname = q.input[0] if q.input[0] in float_names else dq.output[0]
        if fname in float_names:
            acts.append((fname, dq.output[0], q))
    outputs = [o.name for o in fp.graph.output if o.type.tensor_type.elem_type in _FLOAT_TYPES]
    missing = [o for o in outputs if o not in {v.name for v in qp.graph.output}]
    if missing:
        raise QCompileError(f"error analysis: the quantized model lacks the float model's outputs {missing}")
    inputs = {i.name for i in fp.graph.input}

    f_sess = _session(_with_outputs(fp, [a[0] for a in acts if a[0] not in inputs] + outputs), threads)
    q_sess = _session(_with_outputs(qp, [a[1] for a in acts] + outputs), threads)
    variants = [(layer, _session(graph.only(layer), threads)) for layer in graph.layers] if per_layer else []

    act_acc = {a[1]: _Acc() for a in acts}
    out_acc = _Acc()
    layer_acc = [_Acc() for _ in variants]
    n = 0
    for feed, count in _feeds(samples, q_ir, max_samples, batch_size):
        f_vals = dict(zip([o.name for o in f_sess.get_outputs()], f_sess.run(None, feed)))
        f_vals.update({k: v for k, v in feed.items()})
        q_vals = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed)))
        for fname, dname, _ in acts:
            act_acc[dname].add(f_vals[fname], q_vals[dname])
        for o in outputs:
            out_acc.add(f_vals[o], q_vals[o])
        for (layer, sess), acc in zip(variants, layer_acc):
            vals = dict(zip([o.name for o in sess.get_outputs()], sess.run(outputs, feed)))
            for o in outputs:
                acc.add(f_vals[o], vals[o])
        n += count
    if n == 0:
        raise QCompileError("error analysis: no samples")

    tensors: List[TensorError] = []
    weight_sqnr: Dict[str, float] = {}
    for node in qp.graph.node:  # graph order
        if node.op_type == "QuantizeLinear":
            for fname, dname, q in acts:
                if q is node:
                    scale = graph.const(q.input[1])
                    tensors.append(TensorError(fname, "activation", _act_type(graph, q), act_acc[dname].sqnr(),
                                               float(scale) if scale is not None and scale.size == 1 else None))
        elif node is not None and id(node) in graph.const_dqs:
            kind, consumer, index = graph.const_dqs[id(node)]
            fvalue = graph.float_const(node)
            if fvalue is None:
                continue
            qvalue = graph.dequantized(node)
            acc = _Acc()
            acc.add(fvalue, qvalue)
            name = graph.float_name(node) or node.output[0]
            dtype = bits.get(node.input[0], str(graph.const(node.input[0]).dtype)) if kind == "weight" else "int32"
            scale = graph.const(node.input[1])
            moved = kind == "bias" and bool(np.any(np.abs(qvalue - fvalue) > 0.5001 * np.abs(scale.astype(np.float64))))
            tensors.append(TensorError(name, kind, dtype, acc.sqnr(), _scalar(scale), moved))
            if kind == "weight":
                weight_sqnr[consumer.name] = acc.sqnr()
    layers = []
    for (layer, _), acc in zip(variants, layer_acc):
        wdq = graph.producer.get(layer.input[1]) if len(layer.input) > 1 else None
        wtype = bits.get(wdq.input[0], "?") if wdq is not None else "?"
        layers.append(LayerError(layer.name, layer.op_type, wtype, acc.sqnr(), acc.cosine(),
                                 weight_sqnr.get(layer.name)))
    layers.sort(key=lambda l: l.output_sqnr_db)
    return ErrorReport(tensors, layers, out_acc.sqnr(), out_acc.cosine(), n)


# -- the pass ---------------------------------------------------------------------------
@register_pass("error-report")
class ErrorReportPass(Pass):
    """After `quantize`: measure per-tensor SQNR and per-layer output error against the
    float model `quantize` saw, on calibration data; the ErrorReport goes to
    model.annotations["error_report"] and, with `output`, to a JSON file. The graph is
    left unchanged.

    Data: the `data` option, else model.annotations["calibration_data"], else the .npz
    file the `calibrate` pass read.
    """

    in_place = True
    output: str = option("", "write the report as JSON to this file")
    samples: int = option(32, "number of samples to run (0: all)", choices=range(0, 1 << 40))
    data: str = option("", "sample data (.npz file or folder); default: the calibration data")
    per_layer: bool = option(True, "also measure each layer quantized alone (one extra model run per layer)")

    def requires(self, model: Model) -> None:
        if "float_model" not in model.annotations:
            raise QCompileError("error-report needs the float model that 'quantize' stores: run it after "
                                "quantize (e.g. fold,calibrate,quantize,error-report)")

    def run(self, model: Model) -> PassResult:
        source = self._source(model)
        report = analyze_quantization_error(model.annotations["float_model"], model, source,
                                            max_samples=self.samples or None, per_layer=self.per_layer)
        model.annotations["error_report"] = report
        self.stats["tensors analyzed"] += len(report.tensors)
        self.stats["layers analyzed"] += len(report.layers)
        if self.output:
            atomic_write(self.output, report.to_json() + "\n", "w")
        log.info("%s", report.format_table())
        return PassResult(model, modified=False)

    def _source(self, model: Model) -> Any:
        if self.data:
            return self.data
        if model.annotations.get("calibration_data") is not None:
            return model.annotations["calibration_data"]
        stats = model.annotations.get("calibration")
        ident = getattr(stats, "settings", {}).get("data") if stats is not None else None
        if isinstance(ident, list) and len(ident) == 1 and os.path.isfile(ident[0][0]):
            return ident[0][0]
        raise QCompileError("error-report needs sample data: give the option data=FILE.npz or set "
                            "model.annotations['calibration_data'] = [feed dicts]")


# -- the QDQ graph, read as ONNX ----------------------------------------------------------
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class _QdqGraph:
    """The QDQ model's QuantizeLinear/DequantizeLinear structure, and how to undo it."""

    def __init__(self, qp: onnx.ModelProto, fp: onnx.ModelProto):
        self.qp, self.fp = qp, fp
        g = qp.graph
        self.inits = {i.name: i for i in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.users: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for i, x in enumerate(n.input):
                self.users.setdefault(x, []).append((n, i))
        self.activation_dqs: List[onnx.NodeProto] = []
        self.const_dqs: Dict[int, Tuple[str, onnx.NodeProto, int]] = {}  # id -> (kind, reader, input index)
        for n in g.node:
            if n.op_type != "DequantizeLinear":
                continue
            p = self.producer.get(n.input[0])
            if p is not None and p.op_type == "QuantizeLinear":
                self.activation_dqs.append(n)
            elif self.const(n.input[0]) is not None:
                readers = self.users.get(n.output[0], [])
                reader, index = readers[0] if readers else (None, -1)
                self.const_dqs[id(n)] = ("bias" if index == 2 else "weight", reader, index)
        self.layers = [n for n in g.node if n.op_type in _LAYERS and len(n.input) > 1
                       and id(self.producer.get(n.input[1])) in self.const_dqs]
        self.f_nodes = {n.name: n for n in fp.graph.node if n.name}
        self.f_consts = {i.name: i for i in fp.graph.initializer}
        self.f_consts.update({n.output[0]: n for n in fp.graph.node if n.op_type == "Constant"})

    def const(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.consts:
            return _constant_value(self.consts[name])
        return None

    def float_name(self, dq: onnx.NodeProto) -> Optional[str]:
        """The float model's name of the constant that `dq` stands for."""
        _, reader, index = self.const_dqs[id(dq)]
        f = self.f_nodes.get(reader.name) if reader is not None else None
        if f is not None and index < len(f.input) and f.input[index] in self.f_consts:
            return f.input[index]
        for suffix in ("_quantized",):
            base = dq.input[0][:-len(suffix)] if dq.input[0].endswith(suffix) else None
            if base and base in self.f_consts:
                return base
        return None

    def float_const(self, dq: onnx.NodeProto) -> Optional[np.ndarray]:
        name = self.float_name(dq)
        if name is None:
            return None
        c = self.f_consts[name]
        return numpy_helper.to_array(c) if isinstance(c, onnx.TensorProto) else _constant_value(c)

    def dequantized(self, dq: onnx.NodeProto) -> np.ndarray:
        x = self.const(dq.input[0]).astype(np.float64)
        s = self.const(dq.input[1]).astype(np.float64)
        z = self.const(dq.input[2]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(s)
        if s.ndim:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return (x - z) * s

    def owned_by(self, layer: onnx.NodeProto) -> set:
        """ids of the DequantizeLinear nodes that quantize `layer`: weight, bias, input
        activation, output activation (after a fused Relu/Clip)."""
        keep = set()
        for x in layer.input:
            dq = self.producer.get(x)
            if dq is not None and dq.op_type == "DequantizeLinear":
                keep.add(id(dq))
        out = layer.output[0]
        readers = self.users.get(out, [])
        if len(readers) == 1 and readers[0][0].op_type in _FUSED:
            out = readers[0][0].output[0]
            readers = self.users.get(out, [])
        for q, _ in readers:
            if q.op_type == "QuantizeLinear":
                keep.update(id(dq) for dq, _ in self.users.get(q.output[0], []) if dq.op_type == "DequantizeLinear")
        return keep

    def only(self, layer: onnx.NodeProto) -> onnx.ModelProto:
        """A copy in which only `layer` is quantized: every other DequantizeLinear is an
        Identity of the float tensor (activations: the QuantizeLinear's input; constants:
        the float model's constant)."""
        keep = self.owned_by(layer)
        model = onnx.ModelProto()
        model.CopyFrom(self.qp)
        g = model.graph
        nodes = list(g.node)
        extra = []
        del g.node[:]
        originals = list(self.qp.graph.node)
        for orig, n in zip(originals, nodes):
            if orig.op_type == "DequantizeLinear" and id(orig) not in keep:
                if id(orig) in self.const_dqs:
                    value = self.float_const(orig)
                    if value is None:
                        raise QCompileError(f"error analysis: no float constant for {orig.input[0]!r} in the float "
                                            "model; pass the model quantize saw (annotations['float_model'])")
                    src = orig.output[0] + "_float_const"
                    extra.append(numpy_helper.from_array(np.asarray(value), src))
                else:
                    src = self.producer[orig.input[0]].input[0]
                g.node.append(onnx.helper.make_node("Identity", [src], [orig.output[0]], name=orig.name + "_bypass"))
            else:
                g.node.append(n)
        g.initializer.extend(extra)
        return model


# -- helpers ------------------------------------------------------------------------------
class _Acc:
    """Running sums for SQNR and cosine (float64)."""

    def __init__(self):
        self.signal = self.noise = self.dot = self.qq = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y) & (np.abs(x) < 1e9)  # attention-mask fills are not signal
        x, y = x[ok], y[ok]
        self.signal += float(np.dot(x, x))
        self.noise += float(np.dot(x - y, x - y))
        self.dot += float(np.dot(x, y))
        self.qq += float(np.dot(y, y))

    def sqnr(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)

    def cosine(self) -> float:
        if self.signal == 0.0 or self.qq == 0.0:
            return 1.0 if self.signal == self.qq else 0.0
        return self.dot / math.sqrt(self.signal * self.qq)


def _proto(m: ModelLike) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    if isinstance(m, Model):
        return to_proto(m)
    if isinstance(m, (str, os.PathLike)):
        return onnx.load(os.fspath(m))
    raise QCompileError(f"error analysis: expected a Model, ModelProto or path, not {type(m).__name__}")


def _meta(p: onnx.ModelProto) -> Dict[str, str]:
    return {e.key: e.value for e in p.metadata_props}


def _tensor_names(p: onnx.ModelProto) -> set:
    names = {i.name for i in p.graph.input}
    names.update(o for n in p.graph.node for o in n.output)
    return names


def _constant_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def _scalar(a: Optional[np.ndarray]) -> Optional[float]:
    return float(a) if a is not None and a.size == 1 else None


def _act_type(graph: _QdqGraph, q: onnx.NodeProto) -> str:
    z = graph.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    return str(z.dtype) if z is not None else "uint8"


def _with_outputs(p: onnx.ModelProto, names: List[str]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(p)
    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


def _session(p: onnx.ModelProto, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(source: Any, model: Model, limit: Optional[int],
           batch_size: int) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
    samples = load_samples(source, model)
    for batch in samples.batches(batch_size, limit):
        yield dict(batch), batch.samples


def _db(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _table(header: Tuple[str, ...], rows: Iterable[Tuple[str, ...]]) -> List[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
