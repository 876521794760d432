"""`quantize`: insert QuantizeLinear/DequantizeLinear (QDQ), the ONNX convention that
onnxruntime runs and that `lower-integer` will turn into integer ops.

What it rewrites, for every Conv, Gemm and MatMul whose weight is a constant:
  1. The weight W becomes DequantizeLinear(W_q, scale, zero_point) with W_q integers
     chosen by passes/quantize/weights.py (per output channel by default; bit-widths
     2-8, ternary, binary). Storage: widths of 4 bits and under are packed ONNX
     INT4/UINT4 tensors (`packed`, the model upgraded to opset 21; onnxruntime runs
     them); wider ones, and all of them with packed=false or when the upgrade fails, an
     int8 container with a clipped range. Exception: a Conv whose input is a 4-bit
     activation keeps wider weights in an int16 container, because onnxruntime 1.32
     fuses DQ(int4)/DQ(int8) -> Conv -> Q(int4) into a QLinearConv that rejects int4.
     The true width is recorded in the model's metadata (`qcompile.weight_bits`:
     {tensor: type}).
  2. A constant bias b becomes DequantizeLinear(b_q, s_x * s_w, 0) with b_q int32, the
     scale of the accumulator, as integer hardware adds it.
  3. The activation input and the output get a Q->DQ pair on the tensor (one pair per
     tensor, shared by all its readers), with a per-tensor scale and zero point from the
     calibration range: asymmetric int8, 0.0 exactly representable. When the output's
     only reader is a Relu (or Clip), the pair goes after that activation instead, as a
     fused activation would be quantized.
  4. Activations are int8 by default; activations.py says which tensor gets which type
     and range (`activations=int4|int16`, `activation_overrides`, and
     `min_activation_sqnr=DB`, which widens tensors whose estimated SQNR is under DB).
     int16 uses com.microsoft QuantizeLinear/DequantizeLinear (onnxruntime runs them at
     opset 13+); int4 the ONNX INT4 type (opset 21, the model is upgraded). A Clip
     fused before a 4-bit Q is dropped when it is redundant at the tensor's scale
     (Q(clip_min) = qmin and Q(clip_max) = qmax: the QDQ model computes the same), since
     onnxruntime 1.32's ClipQuantFusion throws on INT4 zero points; a Clip that is not
     redundant keeps its tensor at int8. Each widening is listed with its reason.
  4b. A MatMul of two activations (attention's Q.K^T and P.V) gets Q->DQ pairs on both
     inputs and its output.
  4b'. With `bias_correction=N` (default 256), each Conv/Gemm's int32 bias then absorbs
     the mean output shift its weight rounding causes, E[(W - W~) * x~] measured on N
     calibration samples (bias_correction.py; a layer without a bias gets one).
  4b''. With `search_samples=N` (default 256), each int8 activation's range is then
     re-chosen among the calibration rules by the output error it causes on N
     calibration samples (range_search.py).
  4c. Inputs and outputs of the data-movement and elementwise ops between them (Add, Mul,
     Concat, pooling, reductions, Flatten, Reshape, Transpose, Slice, Relu) get Q->DQ
     pairs too, so the integer graph needs no float tensors between quantized ops; pure
     data movement (Flatten, Reshape, Transpose, Slice) only when its input is already
     quantized or it leads to an op that is, so float tensors moved between float ops
     (an LSTM's transposes) stay float, as onnxruntime leaves them.
Per layer:
  5. `overrides=PATTERN:TYPE;...` gives layers another weight type, or `float`; PATTERN
     is an op type or a regular expression searched in node names; later entries win.
     `config=FILE` (.json or .toml) holds the same options, overrides as a table.
  6. Automatic precision fallback, two error budgets. `min_weight_sqnr=DB`: a layer
     whose weights, at the chosen type, have an SQNR under DB decibels is kept at int8
     (or in float when int8 falls short too). `min_layer_sqnr=DB`: after quantizing, each
     layer quantized alone is measured (error_analysis: the model output's SQNR against
     float on the calibration samples); a layer under DB is raised one step (to int8,
     from int8 to float) and the model is quantized again from float, up to three
     rounds. Each decision, with its reason, is listed in
     model.annotations["quantization_decisions"], logged, and printed by the CLI.
Left alone: tensors that held non-finite values during calibration (attention masks
filled with -inf: no integer grid holds them), nodes matched by `exclude` (a regular expression over node names and op
types), ops whose weight is not constant, tensors without a calibration range (integer
tensors, shapes), and everything inside subgraphs.
The float model, as it was before quantization, is kept as a ModelProto in
model.annotations["float_model"] for error analysis.
Needs `calibrate` first (a CalibrationStats in model.annotations["calibration"]) and
opset 13 (per-axis DequantizeLinear); an older model is upgraded, and the log says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from qcompile.errors import QCompileError
from qcompile.ir import INT8, INT16, UINT8, DataType, Graph, Model, Node, QuantParams, TensorType, Value, int_type
from qcompile.onnx_io import from_proto, to_proto, upgrade_opset
from qcompile.passmanager import Pass, PassResult, option, register_pass

from .activations import ACTIVATION_TYPES, ActivationPlan, activation_params
from .bias_correction import correct_biases
from .range_search import calibration_source, search_activation_ranges
from .weights import WeightFormat, dequantize, quantize_bias, quantize_weight, weight_format

__all__ = ["Quantize"]

_WEIGHTED = {"Conv": 0, "Gemm": None, "MatMul": 1}  # op -> weight channel axis (Gemm: from transB)
_FLOW = {"Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
         "Relu", "Slice", "ReduceMean", "ReduceSum", "ReduceMax"}
_FUSED = {"Relu", "Clip"}
# pure data movement: quantized only when its input already is (as onnxruntime does), so a
# float tensor moved between float ops (an LSTM's input and output transposes) is not
# quantized twice for nothing
_MOVEMENT = {"Flatten", "Reshape", "Transpose", "Slice"}
BITS_KEY = "qcompile.weight_bits"
_WIDE_DOMAIN = "com.microsoft"  # QuantizeLinear/DequantizeLinear with int16 below opset 21 (onnxruntime's)
_PACKED_OPSET = 21  # ONNX INT4/UINT4 in QuantizeLinear/DequantizeLinear
log = logging.getLogger(__name__)


@register_pass("quantize")
class Quantize(Pass):
    """Insert QuantizeLinear/DequantizeLinear: weights per channel, activations per tensor."""

    weights: str = option("int8", "weight type: int8, int4, int3, int2, ternary or binary",
                          choices=("int8", "int4", "int3", "int2", "ternary", "binary"))
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    symmetric: bool = option(True, "symmetric weights (zero point 0)")
    weight_search: str = option("auto", "weight range: mse-optimal clipping, plain min/max, or auto "
                                        "(mse below 8 bits, min/max at 8 bits and above)",
                                choices=("auto", "mse", "minmax"))
    exclude: str = option("", "regular expression over node names and op types to keep in float")
    overrides: list = option([], "per-layer weight types, PATTERN:TYPE;...: PATTERN is an op type or a regular "
                                 "expression over node names, TYPE a weight type or 'float'")
    min_weight_sqnr: float = option(0.0, "precision fallback: a layer whose weight SQNR (dB) falls below this "
                                         "at the chosen type is kept at int8, or float if int8 falls short too")
    activations: str = option("int8", "activation type (int16 quantizes through com.microsoft QDQ ops, int4 "
                                      "through ONNX INT4 at opset 21)", choices=tuple(ACTIVATION_TYPES))
    activation_overrides: list = option([], "per-tensor activation types, PATTERN:TYPE;...: PATTERN is an op type or "
                                            "a regular expression over the producing node's name or the tensor's "
                                            "name, TYPE int4, int8 or int16")
    min_layer_sqnr: float = option(0.0, "precision fallback by output error: a layer that, quantized alone, "
                                   "leaves the model output under this SQNR (dB) against float on the calibration "
                                   "data is kept at int8, or in float if it is int8 already (0: off)")
    min_activation_sqnr: float = option(0.0, "sensitive tensors: an activation whose SQNR, estimated from its "
                                             "calibration histogram, falls below this many dB gets a wider type "
                                             "(int4 -> int8 -> int16)")
    search_samples: int = option(256, "activation range search: each int8 activation takes the calibration rule "
                                     "(min/max, percentile, MSE) that least hurts the model's output on this many "
                                     "calibration samples; 0 keeps calibrate's method", choices=range(0, 1 << 30))
    search_seconds: float = option(60.0, "time budget of the activation range search (seconds)")
    bias_correction: int = option(256, "empirical bias correction: each Conv/Gemm's bias absorbs the mean output "
                                       "shift its weight rounding causes, measured on this many calibration "
                                       "samples (bias_correction.py); 0: off", choices=range(0, 1 << 30))
    packed: bool = option(True, "store 4-bit and narrower weights as packed ONNX INT4/UINT4 (the model is "
                                "upgraded to opset 21); false keeps them in int8 containers at opset 13")
    config: str = option("", "a .json or .toml file with these options (overrides as a table PATTERN = TYPE); "
                             "options given in the pipeline win")

    def requires(self, model: Model) -> None:
        if "calibration" not in model.annotations:
            raise QCompileError(
                "quantize needs calibration statistics: run 'calibrate' before it "
                "(e.g. --passes fold,calibrate,quantize --calib data.npz)"
            )

    def run(self, model: Model) -> PassResult:
        if self.config:
            self._apply_config(self.config)
        if self.min_layer_sqnr > 0:
            return self._run_with_output_budget(model)
        return self._quantize(model)

    def _run_with_output_budget(self, model: Model) -> PassResult:
        """Quantize, measure each layer's output error alone (error_analysis), raise the
        layers under `min_layer_sqnr` one step (to int8, then to float) and quantize again
        from the float model, until every layer meets the budget (three rounds at most)."""
        from .error_analysis import analyze_quantization_error

        source = calibration_source(model)
        if source is None:
            raise QCompileError("quantize option min_layer_sqnr measures each layer's output error on the "
                                "calibration samples: run calibrate with data (e.g. --calib data.npz)")
        float_proto = to_proto(model)
        annotations = dict(model.annotations)
        options = {k: getattr(self, k) for k in self._options if k not in ("config", "min_layer_sqnr")}
        raised: List[str] = []
        decisions: List[dict] = []
        for round_ in range(3):
            inner = type(self)(**{**options, "overrides": list(self.overrides) + raised})
            fresh = from_proto(float_proto)
            fresh.annotations.update(annotations)
            result = inner._quantize(fresh)
            final_stats = inner.stats
            report = analyze_quantization_error(result.model.annotations["float_model"], result.model, source,
                                                max_samples=self.search_samples or 64, per_layer=True)
            low = [l for l in report.layers if l.output_sqnr_db < self.min_layer_sqnr and l.name]
            if not low:
                break
            if round_ == 2:
                log.warning("quantize: after three rounds %s still under min_layer_sqnr=%g dB",
                            ", ".join(l.name for l in low), self.min_layer_sqnr)
                break
            for l in low:
                to = "float" if l.weight_type in ("i8", "int8") else "int8"
                raised.append(f"^{re.escape(l.name)}$:{to}")
                why = (f"quantized alone at {l.weight_type} it leaves the output at {l.output_sqnr_db:.1f} dB SQNR "
                       f"< {self.min_layer_sqnr:g} dB: kept at {to}")
                decisions.append({"node": l.name, "op": l.op_type, "reason": why, "kept_at": to})
                log.info("quantize: %s %s", l.name, why)
        self.stats.update(final_stats)
        self.stats["layers kept at higher precision (output budget)"] += len({d["node"] for d in decisions})
        out = result.model
        out.annotations["quantization_decisions"] = decisions + list(out.annotations.get("quantization_decisions", []))
        out.annotations["error_budget_report"] = report
        return PassResult(out, modified=result.modified)

    def _quantize(self, model: Model) -> PassResult:
        plan = _LayerPlan(self)
        acts = ActivationPlan(self.activations, self.activation_overrides, model.annotations["calibration"],
                              self.min_activation_sqnr)
        model = self._upgrade(model, plan, acts)
        model.annotations["float_model"] = to_proto(model)
        q = _Inserter(model.graph, model.annotations["calibration"], acts, packed=model.opset >= _PACKED_OPSET)
        bits: Dict[str, str] = {}
        decisions: List[dict] = []
        for node in model.graph.nodes:
            fmt = plan.format_for(node)
            if fmt is None:
                self.stats["nodes kept in float"] += 1
                continue
            if node.op_type in _WEIGHTED and _weight(node) is not None:
                fmt, why = plan.fallback(node, fmt, self.min_weight_sqnr)
                if why:
                    decisions.append({"node": node.name, "op": node.op_type, "reason": why,
                                      "kept_at": "float" if fmt is None else str(fmt.dtype)})
                    log.info("quantize: %s %s", node.label, why)
                    self.stats["layers kept at higher precision"] += 1
                if fmt is None:
                    continue
                name = q.weighted(node, fmt)
                if name is not None:
                    bits[name] = str(fmt.dtype)
                    self.stats[f"{node.op_type} quantized"] += 1
            elif node.op_type == "MatMul" or node.op_type in _FLOW:  # MatMul: two activations
                if node.op_type in _MOVEMENT and not q.is_quantized(node.inputs[0]) and \
                        not _feeds_quantized(node.outputs[0]):
                    self.stats["data movement of float tensors left in float"] += 1
                    continue
                for v in node.inputs:
                    if not _fused_away(v):
                        q.activation(v)
                q.activation(_fused_output(node))
        if bits:
            model.metadata_props[BITS_KEY] = json.dumps(bits, sort_keys=True)
        model.annotations["quantization_decisions"] = decisions
        self.stats["activation tensors quantized"] += len(q.done) // 2
        for name, dtype in q.types.items():
            self.stats[f"activation tensors at {dtype}"] += 1
        if any(t.bits == 16 for t in q.types.values()):
            model.opset_imports.setdefault(_WIDE_DOMAIN, 1)
        for name, (dtype, why) in q.wide.items():
            decisions.append({"tensor": name, "reason": why, "kept_at": str(dtype)})
        model.graph.sort()
        if q.layers and self.bias_correction:
            weight_errors = [(n, w - dequantize(qv.const_value, p), b) for n, w, qv, p, b in q.layers]
            corrected = correct_biases(model, weight_errors, calibration_source(model), self.bias_correction)
            self.stats["layers bias-corrected"] += corrected
        if q.done and self.search_samples:
            chosen = search_activation_ranges(model, model.annotations["calibration"], self.search_samples,
                                              self.search_seconds)
            model.annotations["activation_ranges"] = chosen
            self.stats["activation ranges changed by the range search"] += len(chosen)
        return PassResult(model, modified=bool(q.done or bits))

    def _upgrade(self, model: Model, plan: "_LayerPlan", acts: ActivationPlan) -> Model:
        """The model at the opset quantization needs: 13 (per-axis DequantizeLinear), 21
        where 4-bit types are packed (int4 activations must be; weights fall back to int8
        containers when the converter cannot reach 21)."""
        if acts.may_use_int4 and not self.packed:
            raise QCompileError("quantize option activations/activation_overrides: int4 activations need packed=true "
                                "(onnxruntime saturates an activation to 4 bits only with the ONNX INT4 type)")
        want = _PACKED_OPSET if acts.may_use_int4 or (self.packed and plan.narrow_weights) else 13
        if model.opset >= want:
            return model
        try:
            return upgrade_opset(model, want)
        except QCompileError as e:
            if acts.may_use_int4:
                raise QCompileError(f"quantize: int4 activations need opset {_PACKED_OPSET} (ONNX INT4 "
                                    f"QuantizeLinear): {e}") from None
            log.info("quantize: %s; 4-bit weights stay in int8 containers", e)
            return model if model.opset >= 13 else upgrade_opset(model, 13)


    def _apply_config(self, path: str) -> None:
        """Take options from a config file where the pipeline did not give them; the
        file's overrides come before the pipeline's (so the pipeline's win)."""
        settings = _read_config(path)
        given = self.given_options
        for key, value in settings.items():
            if key in ("overrides", "activation_overrides"):
                if not isinstance(value, dict):
                    raise QCompileError(f"{path}: '{key}' must be a table of PATTERN = TYPE")
                setattr(self, key, [f"{k}:{v}" for k, v in value.items()] + list(getattr(self, key)))
                continue
            if key == "config" or key not in self._options:
                valid = ", ".join(sorted(k for k in self._options if k != "config"))
                raise QCompileError(f"{path}: unknown quantize setting {key!r} (settings: {valid})")
            if key in given:
                continue
            try:
                setattr(self, key, type(self).option_spec(key).convert(value))
            except ValueError as e:
                raise QCompileError(f"{path}: setting {key!r}: {e}") from None


def _read_config(path: str) -> dict:
    """The settings in a .json or .toml file, as a dict; QCompileError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QCompileError(f"quantize config {path}: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            import tomllib

            settings = tomllib.loads(data.decode("utf-8"))
        else:
            settings = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise QCompileError(f"quantize config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}")
    if not isinstance(settings, dict):
        raise QCompileError(f"quantize config {path}: expected a table of settings at the top level")
    return settings


class _LayerPlan:
    """Which weight format each node gets: the pass's default, `exclude`, `overrides`
    (later entries win), and the SQNR fallback."""

    def __init__(self, p: "Quantize"):
        self.default = _format(p, p.weights, "weights")
        self.exclude = _regex(p.exclude, "exclude") if p.exclude else None
        self.rules: List[Tuple[str, object, Optional[WeightFormat]]] = []
        for entry in p.overrides:
            pattern, sep, kind = entry.rpartition(":")
            if not sep or not pattern:
                raise QCompileError(f"quantize option overrides: {entry!r} is not PATTERN:TYPE (e.g. /0/Conv:int8)")
            fmt = None if kind == "float" else _format(p, kind, "overrides")
            self.rules.append((pattern, _regex(pattern, "overrides"), fmt))
        self.p = p

    @property
    def narrow_weights(self) -> bool:
        """True when some layer may get weights of 4 bits or fewer."""
        return any(f is not None and f.dtype.bits <= 4 for f in [self.default] + [r[2] for r in self.rules])

    def format_for(self, node: Node) -> Optional[WeightFormat]:
        """The node's weight format; None keeps it in float."""
        if self.exclude is not None and (self.exclude.search(node.name) or self.exclude.search(node.op_type)):
            return None
        fmt = self.default
        for pattern, regex, rule_fmt in self.rules:
            if node.op_type == pattern or regex.search(node.name):
                fmt = rule_fmt
        return fmt

    def fallback(self, node: Node, fmt: WeightFormat, budget: float) -> Tuple[Optional[WeightFormat], str]:
        """Raise the precision of a layer whose weight SQNR is under `budget` dB."""
        if budget <= 0:
            return fmt, ""
        w = _weight(node).const_value.astype(np.float32)
        axis = _weight_axis(node)
        got = _weight_sqnr(w, fmt, axis)
        if got >= budget:
            return fmt, ""
        int8 = _format(self.p, "int8", "min_weight_sqnr")
        if fmt.dtype != int8.dtype and _weight_sqnr(w, int8, axis) >= budget:
            return int8, f"{fmt.dtype} weights give {got:.1f} dB SQNR < {budget:g} dB: kept at int8"
        return None, f"{fmt.dtype} weights give {got:.1f} dB SQNR < {budget:g} dB even at int8: kept in float"


def _format(p: "Quantize", kind: str, option_name: str) -> WeightFormat:
    try:
        fmt = weight_format(kind, symmetric=p.symmetric, per_channel=p.per_channel,
                            search="mse" if p.weight_search == "auto" else p.weight_search)
        if p.weight_search == "auto" and fmt.dtype.bits >= 8:
            # At 8 bits rounding noise is already small; clipping the largest weights to
            # shave it costs more output error than it saves (benchmarks/ptq_vs_onnxruntime.py).
            fmt = dataclasses.replace(fmt, search="minmax")
        return fmt
    except ValueError as e:
        raise QCompileError(f"quantize option {option_name}: {e}") from None


def _regex(text: str, option_name: str):
    try:
        return re.compile(text)
    except re.error as e:
        raise QCompileError(f"quantize option {option_name}: {text!r} is not a valid regular expression: {e}") from None


def _weight_axis(node: Node) -> int:
    if node.op_type == "Gemm":
        return 0 if node.attr("transB", 0) else 1
    return _WEIGHTED[node.op_type]


def _weight_sqnr(w: np.ndarray, fmt: WeightFormat, axis: int) -> float:
    """Signal-to-quantization-noise ratio (dB) of `w` in format `fmt`."""
    here = WeightFormat(fmt.dtype, fmt.symmetric, axis if fmt.axis is not None and w.ndim >= 2 else None, fmt.search)
    q, params = quantize_weight(w, here)
    noise = float(np.square(dequantize(q, params) - w).sum())
    signal = float(np.square(w).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def _weight(node: Node) -> Optional[Value]:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return w if w is not None and w.is_initializer else None


def _feeds_quantized(v: Value) -> bool:
    """Whether `v`, through more shape ops, reaches an op that quantize turns into an
    integer op (a Conv/Gemm/MatMul or a non-movement op of _FLOW): a graph input moved
    into a Conv is quantized with the move, one moved into an LSTM is not."""
    stack, seen = [v], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        for user, _ in x.uses:
            if user.op_type in _WEIGHTED or user.op_type == "MatMul" or user.op_type in _FLOW - _MOVEMENT:
                return True
            if user.op_type in _MOVEMENT | {"Squeeze", "Unsqueeze"} and user.outputs:
                stack.append(user.outputs[0])
    return False


def _fused_output(node: Node) -> Value:
    """The tensor to quantize after `node`: its output, or the output of a Relu/Clip that
    is its only reader."""
    out = node.outputs[0]
    users = out.users
    if len(users) == 1 and users[0].op_type in _FUSED and len(out.uses) == 1:
        return users[0].outputs[0]
    return out


def _fused_away(v: Optional[Value]) -> bool:
    """True for an op's output whose quantization moves past the Relu/Clip reading it."""
    p = v.producer if v is not None else None
    return p is not None and p.op_type not in _FUSED and _fused_output(p) is not v


class _Inserter:
    """Inserts Q->DQ pairs and quantized weights into one graph."""

    def __init__(self, graph: Graph, stats, acts: ActivationPlan, packed: bool = False):
        self.graph = graph
        self.stats = stats
        self.acts = acts
        self.packed = packed
        self.wide: Dict[str, Tuple[DataType, str]] = {}  # tensors given a wider type than asked, and why
        self.types: Dict[str, DataType] = {}  # tensor -> activation type
        self.done: Dict[int, Tuple[float, Value, DataType]] = {}  # id(float value or DQ output) -> (scale, DQ output, type)
        self.nonfinite = set(stats.nonfinite())
        self.weights: Dict[tuple, tuple] = {}  # (id(float weight), format, container) -> (params, DQ output, name)
        self.layers: List[tuple] = []  # quantized Conv/Gemm: (node, float weight, integer weight, params, float bias)

    def is_quantized(self, v: Optional[Value]) -> bool:
        """Whether `v` already went through a Q -> DQ pair (or is the DQ's output), or is
        moved from such a tensor by shape ops (Unsqueeze, Reshape, ...: quantizing what
        they give keeps the Q next to them, rather than leaving onnxruntime's QDQ
        propagation to move the DQ through them, which fails at opset 21)."""
        while v is not None:
            if id(v) in self.done:
                return True
            p = v.producer
            if p is None:
                return False
            if p.op_type == "DequantizeLinear":
                return True
            if p.op_type not in _MOVEMENT | {"Squeeze", "Unsqueeze"} or not p.inputs:
                return False
            v = p.inputs[0]
        return False

    def activation(self, v: Optional[Value]) -> Optional[float]:
        """Put a Q->DQ pair on `v`; returns its scale (None when it has no range)."""
        if v is None or v.is_initializer:
            return None
        if id(v) in self.done:
            return self.done[id(v)][0]
        if not isinstance(v.type, TensorType) or not v.type.dtype.is_float:
            return None
        if v.name not in self.stats.tensors or v.name in self.nonfinite:
            return None  # not calibrated, or a mask: -inf fills cannot be quantized, keep it float
        dtype, why = self.acts.type_for(v)
        rng = self.acts.range_for(v.name, dtype)
        if rng is None:
            return None
        if dtype.bits == 16:
            why = why or f"activations=int{self.acts.chosen(v).bits}"
        scale, zp = activation_params(*rng, dtype)
        source = v
        if dtype.bits < 8 and v.producer is not None and v.producer.op_type == "Clip":
            if _clip_redundant(v.producer, scale, zp, dtype):
                source = v.producer.inputs[0]  # Q(Clip(x)) == Q(x) at this scale
            else:
                why = f"the Clip before it is not redundant at int{dtype.bits} and onnxruntime cannot fuse it " \
                      f"with a 4-bit QuantizeLinear"
                dtype = INT8
                scale, zp = activation_params(*self.acts.range_for(v.name, dtype), dtype)
        if dtype.bits == 4 and v.producer is not None and v.producer.op_type == "MaxPool":
            scale = self._unlike_input(v.producer.inputs[0], scale, zp, dtype)
        if why:
            self.wide[v.name] = (dtype, why)
        self.types[v.name] = dtype
        domain = _WIDE_DOMAIN if dtype.bits == 16 else ""
        g = self.graph
        s_v = g.make_constant(np.float32(scale), v.name + "_scale")
        z_v = g.make_constant(np.asarray(zp, dtype.numpy_dtype), v.name + "_zero_point")
        readers = v.uses
        quant = Node("QuantizeLinear", [source, s_v, z_v], name=v.name + "_Q", domain=domain)
        deq = Node("DequantizeLinear", [None, s_v, z_v], name=v.name + "_DQ", domain=domain)
        if v.producer is not None and v.producer.graph is g:
            g.insert_after(v.producer, quant)
        else:
            g.insert_before(g.nodes[0], quant)
        g.insert_after(quant, deq)
        deq.set_input(0, quant.output)
        shape = v.type.shape
        quant.output.type = TensorType(dtype, shape, QuantParams(np.float32(scale), np.int64(zp)))
        deq.output.type = TensorType(v.type.dtype, shape)
        for node, i in readers:
            node.set_input(i, deq.output)
        if any(o is v for o in g.outputs):  # keep the model's output names
            name = v.name
            v.name = g.unique_name(name + "_float")
            deq.output.name = name
            g.replace_output(v, deq.output)
        if source is not v and not v.uses:
            clip = v.producer
            bounds = [b for b in clip.inputs[1:] if b is not None]
            g.remove(clip)  # redundant: see _clip_redundant
            for b in bounds:
                if b.is_initializer and not b.uses and not b.is_graph_input:
                    g.remove_initializer(b.name)
        self.done[id(v)] = self.done[id(deq.output)] = (scale, deq.output, dtype)
        return scale

    def _unlike_input(self, x: Optional[Value], scale: float, zp: int, dtype: DataType) -> float:
        """The output scale of a 4-bit MaxPool, one float32 step above the input's when
        they would be equal: onnxruntime 1.32 drops a DQ -> MaxPool -> Q whose two sides
        match and then finds no int4 MaxPool kernel. Every code maps to itself (|q| < 2^4,
        relative change 2^-23), and lower-integer emits no Requantize for such a map."""
        prev = self.done.get(id(x)) if x is not None else None
        if prev is None or prev[2] != dtype or np.float32(prev[0]) != np.float32(scale):
            return scale
        dq = prev[1].producer
        if dq is None or int(dq.inputs[2].const_value.astype(np.int64)) != zp:
            return scale
        return float(np.nextafter(np.float32(scale), np.float32(np.inf)))

    def bits_of(self, v: Optional[Value]) -> int:
        """Width of the activation type `v` was quantized to (0 when it was not)."""
        return self.done[id(v)][2].bits if v is not None and id(v) in self.done else 0

    def weighted(self, node: Node, fmt: WeightFormat) -> Optional[str]:
        """Quantize a Conv/Gemm/MatMul: activation in, weight, bias, output."""
        x, w = node.inputs[0], _weight(node)
        s_x = self.activation(x)
        if s_x is None:
            return None
        axis = _weight_axis(node)
        array = w.const_value.astype(np.float32)
        if array.ndim < 2 and node.op_type != "Conv":
            return None
        fmt_here = WeightFormat(fmt.dtype, fmt.symmetric, axis if fmt.axis is not None else None, fmt.search)
        container = self._container(fmt.dtype, node.op_type == "Conv" and self.bits_of(x) == 4)
        params, dq_out, q_name = self._weight_dq(node, w, array, fmt_here, container)
        node.set_input(1, dq_out)
        g = self.graph
        replaced = [w]
        float_bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].is_initializer:
            b = node.inputs[2]
            float_bias = b.const_value
            b_q, bias_scale = quantize_bias(b.const_value, s_x, params.scale)
            qb = g.make_constant(b_q, b.name + "_quantized")
            sb = g.make_constant(bias_scale, b.name + "_scale")
            zb = g.make_constant(np.zeros_like(b_q) if bias_scale.ndim else np.int32(0), b.name + "_zero_point")
            battrs = {"axis": 0} if bias_scale.ndim else {}
            dq_b = g.insert_before(node, Node("DequantizeLinear", [qb, sb, zb], battrs,
                                              name=f"{node.name or b.name}_bias_DQ"))
            dq_b.output.type = b.type
            node.set_input(2, dq_b.output)
            replaced.append(b)
        for old in replaced:
            if not old.uses and old.is_initializer and not old.is_graph_input:
                g.remove_initializer(old.name)
        if node.op_type in ("Conv", "Gemm"):
            self.layers.append((node, array, dq_out.producer.inputs[0], params, float_bias))
        self.activation(_fused_output(node))
        return q_name

    def _container(self, dtype: DataType, conv_of_int4: bool) -> DataType:
        """The ONNX type that stores weights of `dtype` (see the module docstring, case 1)."""
        if dtype.bits <= 4 and self.packed:
            return int_type(4, dtype.signed)
        if conv_of_int4:
            return int_type(16, dtype.signed)
        return INT8 if dtype.signed else UINT8

    def _weight_dq(self, node: Node, w: Value, array: np.ndarray, fmt: WeightFormat, container: DataType):
        """(params, DQ output, integer tensor name) of weight `w` in `fmt`; one DQ per
        weight, format and container, shared by every layer that reads the weight."""
        key = (id(w), fmt, container)
        if key in self.weights:
            return self.weights[key]
        q, params = quantize_weight(array, fmt)
        g = self.graph
        q_v = g.make_constant(np.asarray(q, dtype=np.int32).astype(container.numpy_dtype), w.name + "_quantized")
        q_v.type = TensorType(container, q_v.type.shape, params)
        s_w = g.make_constant(params.scale, w.name + "_scale")
        z_w = g.make_constant(params.zero_point.astype(container.numpy_dtype), w.name + "_zero_point")
        attrs = {"axis": int(params.axis)} if params.axis is not None else {}
        dq_w = g.insert_before(node, Node("DequantizeLinear", [q_v, s_w, z_w], attrs, name=w.name + "_DQ"))
        dq_w.output.type = TensorType(w.type.dtype, w.type.shape)
        self.weights[key] = (params, dq_w.output, q_v.name)
        return self.weights[key]


def _clip_redundant(clip: Node, scale: float, zp: int, dtype: DataType) -> bool:
    """True when quantizing after `clip` equals quantizing before it: its bounds
    quantize to the ends of `dtype` (or are absent). Constant bounds only."""
    bounds = []
    for i, name in ((1, "min"), (2, "max")):
        if len(clip.inputs) > i and clip.inputs[i] is not None:
            c = clip.inputs[i].const_value
            if c is None:
                return False
            bounds.append(float(c))
        else:
            bounds.append(clip.attr(name))
    lo, hi = bounds

    def q(x: float) -> float:
        return float(np.rint(np.float32(x) / np.float32(scale))) + zp

    return (lo is None or q(lo) <= dtype.min) and (hi is None or q(hi) >= dtype.max)
