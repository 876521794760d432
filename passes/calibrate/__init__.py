"""`calibrate`: per-tensor ranges from running the float model over calibration data.

    qcompile model.onnx --calib calib.npz --passes "calibrate{method=entropy,stats_file=model.calib.json}"

The model runs in onnxruntime (graph optimisations off, so every tensor keeps its name)
with each float activation added as an extra graph output; batch by batch, a
TensorObserver per tensor keeps min/max, moving-average min/max and a bounded
histogram, never the activations. See observers.py for the methods and stats.py for
what is kept and how the JSON sidecar is reused.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import onnx

from qcompile._progress import progress as progress_bar
from qcompile.data import SampleSet, load_samples
from qcompile.errors import QCompileError
from qcompile.ir import Model
from qcompile.ir.types import TensorType
from qcompile.analysis import infer_shapes
from qcompile.onnx_io import to_proto
from qcompile.passmanager import Pass, PassResult, option, register_pass

from .observers import TensorObserver
from .stats import METHODS, CalibrationStats, TensorStats, model_fingerprint

__all__ = ["Calibrate", "CalibrationStats", "TensorStats", "METHODS"]

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
ANNOTATION = "calibration"
DATA_ANNOTATION = "calibration_data"


@register_pass("calibrate")
class Calibrate(Pass):
    """Run the float model in onnxruntime over calibration data and record per-tensor ranges.

    Leaves the graph unchanged (modified=False): the result is a CalibrationStats in
    `model.annotations["calibration"]`, read by `quantize`.

    1. Data: the `data` option (an .npz file or a folder of them, see qcompile.data),
       else `model.annotations["calibration_data"]` (any iterable of feed dicts, for
       Python callers). No data is an error.
    2. Tensors: graph inputs and node outputs of float type that depend on a graph
       input (constant subgraphs are weights, not activations), main graph only.
    3. Memory: batches shrink below `batch_size` so that one batch's activations fit in
       `memory_mb`; when a single sample does not fit, activations are fetched in groups
       (one onnxruntime run per group).
    4. Non-finite values (NaN, +-inf, and |x| >= mask_threshold: the fills of attention
       masks) are excluded from every statistic, counted, and reported in a warning.
    5. `stats_file=FILE`: a sidecar made for this model with the same data and settings is
       loaded instead of running; otherwise calibration runs and writes it.

    Default method `minmax`: on every model of benchmarks/ptq_vs_onnxruntime.py (the
    digits CNN, ResNet- and MobileNet-style CNNs, a transformer encoder) it gives the
    best int8 output SQNR (mse 0.1-1.5 dB lower, entropy over-clips small CNNs by tens
    of dB), and masks' -inf fills never reach it (non-finite values are excluded). `mse`
    and `percentile` are the choice when real data has rare outliers.
    """

    in_place = True
    method: str = option("minmax", "range rule stored as the default for quantize", choices=METHODS)
    percentile: float = option(99.99, "percentile for method=percentile (two-sided)")
    bits: int = option(8, "target bit-width for the entropy and mse searches", choices=range(2, 17))
    bins: int = option(2048, "histogram bins per tensor", choices=range(16, 1 << 20))
    momentum: float = option(0.9, "weight of the past in the moving-average method")
    batch_size: int = option(16, "samples per onnxruntime run (at most)", choices=range(1, 1 << 20))
    data: str = option("", "calibration data: an .npz file or a folder of .npz files")
    num_samples: int = option(0, "use the first N samples (0: all)", choices=range(0, 1 << 40))
    # (`stats` is taken by Pass.stats, the counters)
    stats_file: str = option("", "JSON sidecar: reused when it matches, else written")
    progress: bool = option(True, "show a progress bar on stderr")
    threads: int = option(2, "onnxruntime intra-op threads", choices=range(1, 257))
    memory_mb: int = option(256, "budget for the activations of one batch", choices=range(1, 1 << 20))
    mask_threshold: float = option(1e9, "values with |x| at or above this count as non-finite (mask fills)")

    def run(self, model: Model) -> PassResult:
        if not 0.0 < self.percentile <= 100.0:
            raise QCompileError(f"calibrate: option percentile must be in (0, 100], got {self.percentile}")
        if not 0.0 <= self.momentum < 1.0:
            raise QCompileError(f"calibrate: option momentum must be in [0, 1), got {self.momentum}")
        source = self._source(model)
        settings = self._settings(source)
        stats = self._reuse(model, settings)
        if stats is None:
            samples = load_samples(source, model)
            for note in samples.notes:
                warnings.warn(f"calibrate: {note}", stacklevel=2)
            stats = self._collect(model, samples, settings)
            if self.stats_file:
                stats.save(self.stats_file)
        stats.method, stats.percentile, stats.bits = self.method, self.percentile, self.bits
        self._report(stats)
        model.annotations[ANNOTATION] = stats
        return PassResult(model, modified=False)

    # -- data and sidecar ------------------------------------------------------------
    def _source(self, model: Model) -> Any:
        if self.data:
            return self.data
        source = model.annotations.get(DATA_ANNOTATION)
        if source is None:
            raise QCompileError("calibrate needs calibration data: give --calib FILE (an .npz whose keys are the "
                                "model's input names), the pass option data=PATH, or "
                                "model.annotations['calibration_data'] = [feed dicts]")
        return source

    def _settings(self, source: Any) -> Dict[str, Any]:
        """What shapes the statistics themselves (not which range is chosen from them)."""
        return {"data": _source_id(source), "num_samples": self.num_samples, "batch_size": self.batch_size,
                "bins": self.bins, "momentum": self.momentum, "mask_threshold": self.mask_threshold}

    def _reuse(self, model: Model, settings: Dict[str, Any]) -> Optional[CalibrationStats]:
        if not self.stats_file or not os.path.exists(self.stats_file):
            return None
        try:
            stats = CalibrationStats.load(self.stats_file, model)
        except QCompileError as e:
            warnings.warn(f"calibrate: not reusing {e}; calibrating again", stacklevel=3)
            return None
        if stats.settings != settings:
            changed = sorted(k for k in settings if stats.settings.get(k) != settings[k])
            warnings.warn(f"calibrate: {self.stats_file} was made with other settings ({', '.join(changed)}); "
                          "calibrating again", stacklevel=3)
            return None
        self.stats["sidecar reused"] += 1
        return stats

    # -- running ---------------------------------------------------------------------
    def _collect(self, model: Model, samples: SampleSet, settings: Dict[str, Any]) -> CalibrationStats:
        proto, names, sizes = _prepare(model, weights_as_inputs=True)
        session = _session(proto, self.threads)
        del proto
        weights = _weight_feeds(model, session)
        observers = {n: TensorObserver(self.bins, self.momentum, self.mask_threshold) for n in names}
        limit = self.num_samples or None
        total = samples.count if limit is None else (limit if samples.count is None else min(limit, samples.count))
        budget = self.memory_mb << 20
        per_sample = sum(sizes.values()) if sizes else None
        groups = _groups(names, sizes, budget) if sizes else [names]

        def next_size() -> int:
            return 1 if per_sample is None else max(1, min(self.batch_size, budget // max(per_sample, 1)))

        seen = batches = 0
        with progress_bar(total, "calibrate", "sample", self.progress) as bar:
            for batch in samples.batches(next_size, limit):
                measured: Dict[str, int] = {}
                for group in groups:
                    outs = session.run(group, {**batch, **weights})
                    for i, name in enumerate(group):
                        arr, outs[i] = outs[i], None  # free each activation once observed
                        measured[name] = arr.nbytes // batch.samples
                        observers[name].update(arr)
                        del arr
                if per_sample is None:  # learned from the first (single-sample) batch
                    sizes, per_sample = measured, max(1, sum(measured.values()))
                    groups = _groups(names, sizes, budget)
                seen += batch.samples
                batches += 1
                bar.update(batch.samples)
        if seen == 0:
            raise QCompileError(f"calibrate: {samples.label} holds no samples")
        self.stats["samples"] += seen
        self.stats["batches"] += batches
        self.stats["onnxruntime runs"] += batches * len(groups)
        self.stats["tensors observed"] += len(names)
        self._check_enough(seen, batches)
        tensors = {n: TensorStats.from_observer(o) for n, o in observers.items()}
        return CalibrationStats(tensors, self.method, self.percentile, self.bits, model_fingerprint(model),
                                seen, settings)

    def _check_enough(self, seen: int, batches: int) -> None:
        if seen < self.batch_size:
            warnings.warn(f"calibrate: only {seen} calibration samples, fewer than batch_size {self.batch_size}; "
                          "ranges from so few samples are unreliable", stacklevel=4)
        if self.method == "moving-average" and batches < 1 / (1 - self.momentum):
            warnings.warn(f"calibrate: moving-average with momentum {self.momentum} needs about "
                          f"{round(1 / (1 - self.momentum))} batches, got {batches}; "
                          "its ranges lean on the first batch", stacklevel=4)

    def _report(self, stats: CalibrationStats) -> None:
        bad = stats.nonfinite()
        self.stats["tensors with non-finite values"] += len(bad)
        if bad:
            listing = ", ".join(f"{n} ({c} of {c + stats.tensors[n].count})" for n, c in list(bad.items())[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            warnings.warn(f"calibrate: non-finite values (NaN, inf, or |x| >= {self.mask_threshold:g}) were excluded "
                          f"from the ranges of {len(bad)} tensors: {listing}{more}", stacklevel=3)
        if self.method == "percentile":
            tail = 1.0 - self.percentile / 100.0
            few = [n for n, t in stats.tensors.items() if t.count and t.count * tail < 1]
            if few and tail > 0:
                warnings.warn(f"calibrate: the {self.percentile} percentile needs over {int(np.ceil(1 / tail))} values "
                              f"per tensor; {len(few)} tensors have fewer (e.g. {few[0]}), so their range is the max",
                              stacklevel=3)


def calibration_proto(model: Model):
    """(ModelProto, names): `model` with every float activation as an extra output.
    Activations: graph inputs and node outputs of float type that depend on a graph input."""
    proto, names, _ = _prepare(model)
    return proto, names


_WEIGHTS_AS_INPUTS_OVER = 16384  # elements


def _prepare(model: Model, weights_as_inputs: bool = False):
    """calibration_proto plus the per-sample bytes of each activation (None if unknown).
    With `weights_as_inputs`, large weights are graph inputs without data, to be fed
    from the IR's own arrays (see _weight_feeds)."""
    proto = to_proto(model, weights_as_inputs_over=_WEIGHTS_AS_INPUTS_OVER if weights_as_inputs else None)
    if model.path and any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        onnx.external_data_helper.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(model.path)))
    g = model.graph
    dynamic = {v.name for v in g.inputs if not v.is_initializer}
    for node in g:
        if any(v is not None and v.name in dynamic for v in node.inputs) or any(
                _captures(sub, dynamic) for sub in node.subgraphs()):
            dynamic.update(v.name for v in node.outputs if v.name)
    infer_shapes(model)  # types on the IR's values; weights never copied through onnx's inference
    elem = _elem_types(model)
    order = [v.name for v in g.inputs] + [v.name for n in g for v in n.outputs]
    names = [n for n in dict.fromkeys(order) if n in dynamic and elem.get(n) in _FLOATS]
    present = {o.name for o in proto.graph.output}
    for n in names:
        if n not in present:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(n, elem[n], None))
    return proto, names, _static_sizes(model, names)


def _captures(graph, names) -> bool:
    return any(v is not None and v.name in names for n in graph.all_nodes() for v in n.inputs)


def _elem_types(model: Model) -> Dict[str, int]:
    """ONNX element type per tensor name of the main graph, where the IR knows it."""
    g = model.graph
    return {v.name: v.type.dtype.onnx_type for v in list(g.inputs) + [v for n in g for v in n.outputs]
            if isinstance(v.type, TensorType)}


def _static_sizes(model: Model, names: List[str]) -> Optional[Dict[str, int]]:
    """Bytes per sample of each tensor when every shape is known (a symbolic first dim
    counts as 1), else None (the first batch measures them)."""
    g = model.graph
    types = {v.name: v.type for v in list(g.inputs) + [v for n in g for v in n.outputs]}
    sizes = {}
    for n in names:
        t = types.get(n)
        if not isinstance(t, TensorType) or t.shape is None:
            return None
        dims = [1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(t.shape)]
        if not all(isinstance(d, int) for d in dims):
            return None
        sizes[n] = int(np.prod(dims, dtype=np.int64)) * t.dtype.numpy_dtype.itemsize
    return sizes


def _groups(names: List[str], sizes: Dict[str, int], budget: int) -> List[List[str]]:
    """Tensor names in graph order, split so that each group's per-sample bytes fit the budget."""
    groups: List[List[str]] = [[]]
    used = 0
    for n in names:
        size = sizes.get(n, 0)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return groups


def _weight_feeds(model: Model, session) -> Dict[str, np.ndarray]:
    """The weights the session takes as inputs, as the IR's own arrays: onnxruntime
    reads contiguous numpy inputs in place, so the weights exist once in memory instead
    of also as a serialised model and as onnxruntime's parse of it."""
    inits = model.graph.initializers
    return {i.name: np.ascontiguousarray(inits[i.name].const_value)
            for i in session.get_inputs() if i.name in inits}


def _session(proto: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QCompileError(f"calibrate: onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None


def _source_id(source: Any) -> Any:
    """What identifies a data source in the sidecar: path, size and mtime of each file."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        files = [path] if not os.path.isdir(path) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
        ident = []
        for f in files:
            try:
                st = os.stat(f)
                ident.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
            except OSError:
                ident.append([os.path.abspath(f)])
        return ident
    return f"in-memory feeds ({len(source)})" if hasattr(source, "__len__") else "in-memory feeds"
