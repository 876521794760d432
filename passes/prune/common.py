"""What `prune` and `sparsify` share: which weights they touch, option checks, the
`qcompile.sparsity` metadata record, and running the float model in onnxruntime on
calibration data.

Weights (the `weighted` list), per node with a constant weight initializer:
  1. Conv: W [O, I/g, kh, kw]; output channels on axis 0, the reduction (K) axis for
     N:M groups is the input-channel axis 1.
  2. Gemm: B [N, K] with transB=1 (K axis 1), [K, N] with transB=0 (K axis 0).
  3. MatMul: a rank-2 constant second input W [K, N] (K axis 0).
Left alone: weights that are not initializers (computed or fed at run time), MatMul
weights of rank other than 2, everything inside subgraphs.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from qcompile.data import load_samples
from qcompile.errors import QCompileError
from qcompile.ir import Model, Node, Value
from qcompile.onnx_io import to_proto

__all__ = ["Weighted", "weighted", "set_weight", "record", "read_record", "SPARSITY_KEY", "MASKS",
           "check_fraction", "compile_regex", "data_source", "FloatRunner"]

SPARSITY_KEY = "qcompile.sparsity"  # model.metadata_props: JSON {"weights": {...}, "activations": {...}}
MASKS = "sparsity_masks"  # model.annotations: {weight name: bool array, True where the weight is kept}


@dataclasses.dataclass
class Weighted:
    """A node with a constant weight: where its output channels and its K axis lie."""

    node: Node
    weight: Value
    out_axis: int  # axis of W holding the output channels
    k_axis: int  # axis of W that the layer sums over (input channels / features)

    @property
    def array(self) -> np.ndarray:
        return self.weight.const_value

    @property
    def label(self) -> str:
        return self.node.label


def weighted(model: Model, exclude: str = "", option_name: str = "exclude") -> List[Weighted]:
    """The Conv/Gemm/MatMul nodes of the main graph with a constant float weight, in
    graph order, without those whose name or op type `exclude` (a regex) matches."""
    regex = compile_regex(exclude, option_name) if exclude else None
    found = []
    for node in model.graph.nodes:
        if regex is not None and (regex.search(node.name) or regex.search(node.op_type)):
            continue
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if w is None or not w.is_initializer or w.const_value is None:
            continue
        arr = w.const_value
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        if node.op_type == "Conv" and arr.ndim >= 3:
            found.append(Weighted(node, w, 0, 1))
        elif node.op_type == "Gemm" and arr.ndim == 2:
            trans = int(node.attr("transB", 0))
            found.append(Weighted(node, w, 0 if trans else 1, 1 if trans else 0))
        elif node.op_type == "MatMul" and arr.ndim == 2:
            found.append(Weighted(node, w, 1, 0))
    return found


def set_weight(model: Model, node: Node, index: int, array: np.ndarray, suffix: str) -> Value:
    """Give `node` input `index` a new initializer holding `array` (never writing into a
    weight other nodes may share); the old initializer goes when nothing reads it."""
    g = model.graph
    old = node.inputs[index]
    new = g.make_constant(np.ascontiguousarray(array), f"{old.name}_{suffix}" if old is not None else suffix)
    node.set_input(index, new)
    if old is not None and old.is_initializer and not old.uses and not old.is_graph_input:
        if all(o is not old for o in g.outputs):
            g.remove_initializer(old.name)
    return new


def check_fraction(pass_name: str, option_name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise QCompileError(f"{pass_name}: option {option_name} must be in [0, 1), got {value:g} "
                            "(the fraction of weights to zero; 0.5 zeroes half)")


def compile_regex(text: str, option_name: str):
    try:
        return re.compile(text)
    except re.error as e:
        raise QCompileError(f"option {option_name}: {text!r} is not a valid regular expression: {e}") from None


# -- the metadata record ---------------------------------------------------------------
def read_record(model: Model) -> Dict[str, Dict[str, Any]]:
    text = model.metadata_props.get(SPARSITY_KEY)
    record_ = json.loads(text) if text else {}
    record_.setdefault("weights", {})
    record_.setdefault("activations", {})
    return record_


def record(model: Model, weights: Optional[Dict[str, dict]] = None, activations: Optional[Dict[str, dict]] = None,
           drop: Iterable[str] = ()) -> None:
    """Merge entries into model.metadata_props['qcompile.sparsity'] (later passes win
    per tensor); `drop` removes weight entries of tensors that no longer exist."""
    rec = read_record(model)
    for name in drop:
        rec["weights"].pop(name, None)
    rec["weights"].update(weights or {})
    rec["activations"].update(activations or {})
    model.metadata_props[SPARSITY_KEY] = json.dumps(rec, sort_keys=True)


def keep_mask(model: Model, name: str, mask: np.ndarray) -> None:
    """Remember which weights are kept (True) so later passes can keep the rest zero."""
    masks = model.annotations.setdefault(MASKS, {})
    old = masks.get(name)
    masks[name] = mask if old is None or old.shape != mask.shape else (old & mask)


# -- running the float model ------------------------------------------------------------
def data_source(model: Model, data: str, pass_name: str, why: str) -> Any:
    if data:
        return data
    source = model.annotations.get("calibration_data")
    if source is None:
        raise QCompileError(f"{pass_name}: {why} needs calibration data: give the pass option data=PATH "
                            "(an .npz whose keys are the model's input names) or set "
                            "model.annotations['calibration_data'] = [feed dicts]")
    return source


class FloatRunner:
    """The model in onnxruntime (graph optimisations off) with chosen weights as graph
    inputs, so each run can feed other weights without building a new session, and
    chosen intermediate tensors exposed as outputs. Holds up to `num_samples` samples."""

    def __init__(self, model: Model, source: Any, num_samples: int, weights: Iterable[str] = (),
                 tensors: Iterable[str] = (), threads: int = 2):
        import onnx
        import onnxruntime as ort

        samples = load_samples(source, model)
        batches = list(samples.batches(16, num_samples or None))
        if not batches:
            raise QCompileError(f"{samples.label} holds no samples")
        self.samples = sum(b.samples for b in batches)
        self.feeds: List[Dict[str, np.ndarray]] = [dict(b) for b in batches]
        proto = to_proto(model)
        weights = set(weights)
        inits = [t for t in proto.graph.initializer if t.name in weights]
        for t in inits:
            proto.graph.initializer.remove(t)
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        self.weights = {n: np.ascontiguousarray(model.graph.initializers[n].const_value) for n in weights}
        self.outputs = [o.name for o in proto.graph.output]
        self.tensors = [t for t in tensors if t not in self.outputs]
        for name in self.tensors:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise QCompileError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
        self.reference = self.run_outputs()

    def run_outputs(self, weights: Optional[Dict[str, np.ndarray]] = None) -> List[List[np.ndarray]]:
        """The graph outputs per batch, with `weights` replacing some weights."""
        feed_w = {**self.weights, **(weights or {})}
        return [self.session.run(self.outputs, {**f, **feed_w}) for f in self.feeds]

    def error(self, weights: Dict[str, np.ndarray]) -> float:
        """Output error against the unpruned model: squared error over squared signal,
        summed over the graph outputs and the samples (0 = identical)."""
        noise = signal = 0.0
        for got, ref in zip(self.run_outputs(weights), self.reference):
            for a, b in zip(got, ref):
                noise += float(np.square(a.astype(np.float64) - b).sum())
                signal += float(np.square(b.astype(np.float64)).sum())
        return noise / max(signal, 1e-30)

    def activations(self) -> Iterable[Dict[str, np.ndarray]]:
        """Per batch, {tensor: array} of the exposed intermediate tensors."""
        for f in self.feeds:
            outs = self.session.run(self.tensors, {**f, **self.weights})
            yield dict(zip(self.tensors, outs))
