"""`sparsify`: hardware-friendly zero patterns in weights, and zeros in activations.

    qcompile model.onnx --passes "fold,sparsify{weights=2:4},calibrate,quantize"
    qcompile model.onnx --passes "fold,sparsify{weights=4x4,sparsity=0.5,activations=0.6,data=calib.npz}"

Weights (Conv, Gemm, MatMul with a constant weight, common.weighted, minus `exclude`):
  1. N:M (`weights=2:4`, `1:4`, `4:8`, any 0 < N < M): in every group of M consecutive
     weights along the layer's reduction axis K (the input-channel axis 1 of a Conv
     weight, the K axis of a Gemm/MatMul weight) the N largest magnitudes stay (ties:
     the earlier one). Density is exactly N/M. A layer whose K is not a multiple of M
     (e.g. a first Conv with 1 or 3 input channels) is skipped with a warning naming it.
  2. Blocks (`weights=RxC`, e.g. 1x4, 4x4): the weight viewed as [outputs, K*...] (a
     [K, N] weight transposed) is cut into R x C blocks; the round(sparsity * blocks)
     blocks of least L2 norm per layer are zeroed. A layer whose view the block does
     not tile is skipped with a warning naming it.
  3. `overrides=PATTERN:TYPE;...` gives layers (op type or regular expression over node
     names; later entries win) another pattern, or `none`.
  Each changed weight gets a new initializer, its kept-mask in
  model.annotations['sparsity_masks'], and an entry in the metadata record
  `qcompile.sparsity` (pattern "n:m" with n, m and the K axis, or "block" with the block
  shape; density), so the backend can store N:M weights compressed.
Activations (need calibration data: `data=PATH` or model.annotations['calibration_data']):
  4. Natural zeros: the zero fraction of every Relu output and of every weighted layer's
     activation input is measured on the data and recorded (`natural_zero_fraction`).
  5. `activations=F` (0 < F < 1): each weighted layer's activation input (not a graph
     input) gets a threshold t, calibrated so that a fraction F of its values become zero;
     a tensor already that sparse is left alone. Non-negative tensors (a Relu's output,
     or never negative on the data) get ThresholdedRelu(alpha=t) (y = x where x > t, else
     0); signed ones Where(Less(Abs(x), t), 0, x). Only the weighted readers read the
     thresholded tensor. The zero fraction reached is measured again on the data
     (`zero_fraction`, with `threshold` and `target`).
Bad input, checked before anything changes (nothing half-written): sparsity or
activations outside [0, 1), N:M with N >= M or N < 1, an unknown pattern, activation
thresholds without data: errors naming the option. Left alone: weights that are not
constant, subgraphs, graph inputs as activations.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from qcompile.analysis import infer_shapes
from qcompile.errors import QCompileError
from qcompile.ir import FLOAT, BOOL, Model, Node, TensorType, Value
from qcompile.passmanager import Pass, PassResult, option, register_pass

from .common import FloatRunner, Weighted, check_fraction, compile_regex, data_source, keep_mask, record, \
    set_weight, weighted

__all__ = ["Sparsify", "nm_sparsify", "block_sparsify", "parse_pattern"]

log = logging.getLogger(__name__)
_PATTERN = re.compile(r"^(?:(?P<n>\d+):(?P<m>\d+)|(?P<r>\d+)x(?P<c>\d+)|none)$")


def parse_pattern(text: str, option_name: str) -> Optional[Tuple[str, int, int]]:
    """('n:m', N, M) or ('block', R, C), or None for 'none'."""
    match = _PATTERN.match(text.strip())
    if match is None:
        raise QCompileError(f"sparsify option {option_name}: {text!r} is not a pattern: use N:M (2:4, 1:4, 4:8), "
                            "a block RxC (1x4, 4x4) or none")
    if match["n"] is not None:
        n, m = int(match["n"]), int(match["m"])
        if not 1 <= n < m:
            raise QCompileError(f"sparsify option {option_name}: N:M needs 1 <= N < M (N kept of every M), "
                                f"got {n}:{m}")
        return "n:m", n, m
    if match["r"] is not None:
        r, c = int(match["r"]), int(match["c"])
        if r < 1 or c < 1 or r * c < 2:
            raise QCompileError(f"sparsify option {option_name}: a block needs at least 2 elements, got {r}x{c}")
        return "block", r, c
    return None


def nm_sparsify(w: np.ndarray, n: int, m: int, k_axis: int) -> np.ndarray:
    """The kept-mask of `w` with the N largest magnitudes kept in each group of M
    consecutive weights along `k_axis` (whose size must be a multiple of M)."""
    moved = np.moveaxis(np.abs(w), k_axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    order = np.argsort(-groups, axis=-1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return np.moveaxis(mask.reshape(moved.shape), -1, k_axis)


def block_sparsify(w2: np.ndarray, r: int, c: int, sparsity: float) -> np.ndarray:
    """The kept-mask of the 2-D `w2` [outputs, K] with the round(sparsity * blocks) R x C
    blocks of least L2 norm zeroed (ties: the earlier block)."""
    rows, cols = w2.shape
    blocks = w2.reshape(rows // r, r, cols // c, c).astype(np.float64)
    norms = np.sqrt(np.square(blocks).sum(axis=(1, 3))).ravel()
    k = int(round(sparsity * norms.size))
    keep = np.ones(norms.size, dtype=bool)
    keep[np.argsort(norms, kind="stable")[:k]] = False
    keep = keep.reshape(rows // r, cols // c)
    return np.repeat(np.repeat(keep, r, axis=0), c, axis=1)


@register_pass("sparsify")
class Sparsify(Pass):
    """Impose N:M or block sparsity on weights; measure and threshold activation zeros."""

    in_place = True
    weights: str = option("2:4", "weight pattern: N:M (2:4, 1:4, 4:8), a block RxC (1x4, 4x4), or none")
    sparsity: float = option(0.5, "fraction of blocks zeroed per layer for block patterns, in [0, 1)")
    activations: float = option(0.0, "target zero fraction of each weighted layer's activation input, reached "
                                      "with calibrated thresholds (0: no thresholds, zeros only measured)")
    exclude: str = option("", "regular expression over node names and op types to leave alone")
    overrides: list = option([], "per-layer patterns, PATTERN:TYPE;...: PATTERN an op type or a regular expression "
                                 "over node names, TYPE N:M, RxC or none")
    data: str = option("", "calibration data for activations (.npz file or folder)")
    num_samples: int = option(64, "calibration samples used for activations", choices=range(1, 1 << 30))
    threads: int = option(2, "onnxruntime intra-op threads", choices=range(1, 257))

    def run(self, model: Model) -> PassResult:
        check_fraction("sparsify", "sparsity", self.sparsity)
        check_fraction("sparsify", "activations", self.activations)
        default = parse_pattern(self.weights, "weights")
        rules = []
        for entry in self.overrides:
            match = re.match(r"^(.*):(none|\d+:\d+|\d+x\d+)$", entry)
            if match is None or not match[1]:
                raise QCompileError(f"sparsify option overrides: {entry!r} is not PATTERN:TYPE (e.g. /fc/Gemm:none)")
            rules.append((match[1], compile_regex(match[1], "overrides"), parse_pattern(match[2], "overrides")))
        layers = weighted(model, self.exclude)
        source = None
        if self.activations > 0:
            source = data_source(model, self.data, "sparsify", f"activations={self.activations:g}")
        else:
            source = self.data or model.annotations.get("calibration_data")
        # checks done: from here on the model changes
        entries = {}
        for w in layers:
            pattern = default
            for text, regex, p in rules:
                if w.node.op_type == text or regex.search(w.node.name):
                    pattern = p
            if pattern is not None:
                entry = self._weight(model, w, pattern)
                if entry is not None:
                    entries.update(entry)
        if entries:
            record(model, weights=entries)
        changed = bool(entries)
        if source is not None:
            changed |= self._activations(model, source, layers)
        else:
            log.info("sparsify: no calibration data, activation zeros not measured")
        return PassResult(model, changed)

    # -- weights --------------------------------------------------------------------
    def _weight(self, model: Model, w: Weighted, pattern) -> Optional[Dict[str, dict]]:
        kind, a, b = pattern
        arr = w.array
        if kind == "n:m":
            k = arr.shape[w.k_axis]
            if k % b:
                self._skip(w, f"its K axis ({k}) is not a multiple of M={b}")
                return None
            mask = nm_sparsify(arr, a, b, w.k_axis)
            info = {"pattern": "n:m", "n": a, "m": b, "axis": w.k_axis}
        else:
            w2 = np.moveaxis(arr, w.out_axis, 0).reshape(arr.shape[w.out_axis], -1)
            if w2.shape[0] % a or w2.shape[1] % b:
                self._skip(w, f"its {w2.shape[0]}x{w2.shape[1]} weight is not tiled by {a}x{b} blocks")
                return None
            m2 = block_sparsify(w2, a, b, self.sparsity)
            moved_shape = (arr.shape[w.out_axis],) + tuple(np.delete(arr.shape, w.out_axis))
            mask = np.moveaxis(m2.reshape(moved_shape), 0, w.out_axis)
            info = {"pattern": "block", "block": [a, b], "layout": "outputs x K"}
        new = set_weight(model, w.node, 1, np.where(mask, arr, 0).astype(arr.dtype), "sparse")
        keep_mask(model, new.name, mask)
        self.stats["layers sparsified"] += 1
        self.stats["weights zeroed"] += int(arr.size - np.count_nonzero(new.const_value))
        info.update(node=w.node.name, op=w.node.op_type, density=round(float(np.count_nonzero(mask)) / mask.size, 6))
        return {new.name: info}

    def _skip(self, w: Weighted, why: str) -> None:
        warnings.warn(f"sparsify: layer {w.label} skipped: {why}", stacklevel=4)
        self.stats["layers skipped"] += 1

    # -- activations ----------------------------------------------------------------
    def _activations(self, model: Model, source, layers: List[Weighted]) -> bool:
        g = model.graph
        infer_shapes(model)
        inputs = {id(v) for v in g.inputs}
        acts: Dict[str, Value] = {}
        for w in layers:
            x = w.node.inputs[0]
            if x is not None and id(x) not in inputs and not x.is_initializer and _is_float(x):
                acts.setdefault(x.name, x)
        relus = {n.outputs[0].name: n.outputs[0] for n in g.nodes if n.op_type == "Relu"}
        names = list(dict.fromkeys(list(acts) + list(relus)))
        runner = FloatRunner(model, source, self.num_samples, tensors=names, threads=self.threads)
        zeros, total = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        samples: Dict[str, List[np.ndarray]] = {n: [] for n in acts}
        negative = dict.fromkeys(acts, False)
        for batch in runner.activations():
            for name in names:
                x = batch[name]
                zeros[name] += int(np.count_nonzero(x == 0))
                total[name] += x.size
                if name in acts:
                    samples[name].append(np.abs(x).ravel())
                    negative[name] |= bool((x < 0).any())
        natural = {n: zeros[n] / max(total[n], 1) for n in names}
        entries = {n: {"node": (v.producer.name if v.producer else ""), "natural_zero_fraction": round(natural[n], 6)}
                   for n, v in {**relus, **acts}.items()}
        self.stats["activation tensors measured"] += len(names)
        thresholds: Dict[str, Tuple[Value, float, bool]] = {}
        if self.activations > 0:
            for name, x in acts.items():
                if natural[name] >= self.activations:
                    entries[name].update(threshold=0.0, target=self.activations, zero_fraction=entries[name][
                        "natural_zero_fraction"])
                    continue
                mags = np.sort(np.concatenate(samples[name]))
                k = min(int(np.ceil(self.activations * mags.size)), mags.size - 1)
                nonneg = not negative[name] or (x.producer is not None and x.producer.op_type == "Relu")
                t = float(mags[k - 1]) if nonneg else float(mags[k])
                thresholds[name] = (x, t, nonneg)
        del samples
        new_names = {}
        for name, (x, t, nonneg) in thresholds.items():
            y = _insert_threshold(model, x, t, nonneg, [w.node for w in layers])
            new_names[name] = y.name
            self.stats["activation thresholds inserted"] += 1
        if new_names:
            model.graph.sort()
            after = FloatRunner(model, source, self.num_samples, tensors=list(new_names.values()), threads=self.threads)
            z, tot = dict.fromkeys(new_names.values(), 0), dict.fromkeys(new_names.values(), 0)
            for batch in after.activations():
                for n in z:
                    z[n] += int(np.count_nonzero(batch[n] == 0))
                    tot[n] += batch[n].size
            for name, new in new_names.items():
                e = dict(entries.pop(name))
                e.update(source=name, threshold=thresholds[name][1], target=self.activations,
                         zero_fraction=round(z[new] / max(tot[new], 1), 6))
                entries[new] = e
        record(model, activations=entries)
        return bool(new_names)


def _is_float(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.dtype == FLOAT


def _insert_threshold(model: Model, x: Value, t: float, nonneg: bool, readers: List[Node]) -> Value:
    """A thresholded copy of `x` read by those of `readers` that read `x`."""
    g = model.graph
    anchor = x.producer
    base = x.name.strip("/").replace("/", "_") or "act"
    if nonneg:
        node = Node("ThresholdedRelu", [x], {"alpha": float(t)}, name=f"{base}/sparsify_threshold")
        nodes = [node]
    else:
        thr = g.make_constant(np.array(t, dtype=np.float32), f"{base}_threshold")
        zero = g.make_constant(np.array(0.0, dtype=np.float32), f"{base}_zero")
        ab = Node("Abs", [x], name=f"{base}/sparsify_abs")
        less = Node("Less", [ab.outputs[0], thr], name=f"{base}/sparsify_less")
        node = Node("Where", [less.outputs[0], zero, x], name=f"{base}/sparsify_threshold")
        nodes = [ab, less, node]
        ab.outputs[0].type = x.type
        less.outputs[0].type = TensorType(BOOL, x.type.shape)
    for n in nodes:
        if anchor is not None:
            g.insert_after(anchor, n)
            anchor = n
        else:
            g.insert_before(g.nodes[0], n)
    y = node.outputs[0]
    y.type = x.type
    for r in readers:
        r.replace_input_with(x, y)
    return y
