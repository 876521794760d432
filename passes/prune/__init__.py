"""`prune` (this module) and `sparsify` (sparsify.py): fewer non-zero weights, and models
that record where the zeros are.

    qcompile model.onnx --passes "fold,prune{sparsity=0.5,mode=unstructured,scope=global},calibrate,quantize"
    qcompile model.onnx --passes "fold,prune{sparsity=0.3,mode=structured,norm=l1,sensitivity=true,data=calib.npz}"

See docs/sparsity.md for the options, the metadata record and the figures.
"""
from __future__ import annotations

import collections
import warnings
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from qcompile.analysis import infer_shapes
from qcompile.errors import QCompileError
from qcompile.ir import Model, Node
from qcompile.passmanager import Pass, PassResult, option, register_pass

from .allocate import Unit, allocate, measure
from .channels import ChannelGraph, analyse
from .common import (FloatRunner, Weighted, check_fraction, compile_regex, data_source, keep_mask, record,
                     set_weight, weighted)
from .sparsify import Sparsify

__all__ = ["Prune", "Sparsify"]


@register_pass("prune")
class Prune(Pass):
    """Magnitude pruning: zero the smallest weights, or remove whole channels by filter norm.

    Layers: Conv, Gemm and MatMul with a constant weight (common.weighted), minus those
    matched by `exclude`. `sparsity` is the fraction of those layers' weights removed.

    mode=unstructured (the graph keeps its shape):
      1. scope=layer: every layer loses exactly round(sparsity * size) weights, the
         smallest in magnitude (ties broken by position).
      2. scope=global: one ranking of |w| over all layers; exactly
         round(sparsity * total) weights go, wherever they are.
      3. sensitivity=true: per-layer ratios from the sensitivity analysis (allocate.py)
         whose total is the global target; each layer then as in 1.
      The zeroed weights get a new initializer (never writing into a shared one); the
      kept-weights mask is left in model.annotations['sparsity_masks'] so later passes
      can keep the zeros, and each weight is listed in the metadata record
      `qcompile.sparsity` (pattern unstructured, density).
    mode=structured (the graph gets smaller): output channels go by the L1 or L2 norm
      of their filter (`norm`), normalised by the layer's mean so layers compare.
      channels.py follows each channel to every reader: BatchNormalization,
      activations, pooling, depthwise convolutions are sliced with it; a residual Add ties
      the channels of its branches, which go in step; Concat offsets them; Flatten or a
      flattening Reshape into a Gemm/MatMul removes the matching feature blocks; the
      consumers' input channels go. `sparsity` is the fraction of each group of tied
      layers' filters removed (scope=layer), or of all of them (scope=global: lowest
      normalised norms first), or split by the sensitivity analysis. Every layer keeps
      at least one channel; shapes are inferred again; graph outputs keep their shape.
    `overrides=PATTERN:SPARSITY;...` gives matching layers (op type, or a regular
    expression over node names; later entries win) their own sparsity, outside the
    global allocation (0 leaves them alone).

    Bad input, checked before anything is changed (nothing half-written):
      * sparsity (or an override) outside [0, 1): an error naming the option;
      * a malformed override or regular expression: an error naming it;
      * sensitivity=true without calibration data: an error saying how to give it;
      * structured mode, a layer whose channels reach an op it cannot follow (Transpose,
        Split, Softmax, a Reshape that is not a flatten, a graph output, ...): that layer
        is skipped with a warning naming it and the op; the others are pruned.
    Left alone: layers without a constant weight, grouped (non-depthwise) convolutions
    as producers, Gemm with transA=1, subgraphs.
    """

    in_place = True
    sparsity: float = option(0.5, "fraction of the weights (unstructured) or filters (structured) to remove, in [0, 1)")
    mode: str = option("unstructured", "zero single weights, or remove whole output channels",
                       choices=("unstructured", "structured"))
    scope: str = option("layer", "the same sparsity in every layer, or one global ranking", choices=("layer", "global"))
    norm: str = option("l1", "filter norm ranking channels in structured mode", choices=("l1", "l2"))
    sensitivity: bool = option(False, "choose per-layer sparsities from measured output error (needs data)")
    levels: list[float] = option([0.25, 0.5, 0.75, 0.9], "sparsities the sensitivity analysis measures")
    exclude: str = option("", "regular expression over node names and op types to leave alone")
    overrides: list = option([], "per-layer sparsity, PATTERN:SPARSITY;...: PATTERN an op type or a regular "
                                 "expression over node names")
    data: str = option("", "calibration data for the sensitivity analysis (.npz file or folder)")
    num_samples: int = option(64, "calibration samples the sensitivity analysis runs", choices=range(1, 1 << 30))
    threads: int = option(2, "onnxruntime intra-op threads", choices=range(1, 257))

    def run(self, model: Model) -> PassResult:
        check_fraction("prune", "sparsity", self.sparsity)
        for r in self.levels:
            if not 0.0 < r < 1.0:
                raise QCompileError(f"prune: option levels: each level must be in (0, 1), got {r:g}")
        self._rules = _overrides(self.overrides)
        self._levels = sorted(set(self.levels))
        layers = weighted(model, self.exclude)
        if self.mode == "unstructured":
            return self._unstructured(model, layers)
        return self._structured(model, layers)

    # -- shared ---------------------------------------------------------------------
    def _override(self, node: Node) -> Optional[float]:
        ratio = None
        for pattern, regex, r in self._rules:
            if node.op_type == pattern or regex.search(node.name):
                ratio = r
        return ratio

    def _runner(self, model: Model, weights) -> FloatRunner:
        source = data_source(model, self.data, "prune", "sensitivity=true")
        return FloatRunner(model, source, self.num_samples, weights, threads=self.threads)

    # -- unstructured ---------------------------------------------------------------
    def _unstructured(self, model: Model, layers: List[Weighted]) -> PassResult:
        counts: Dict[int, int] = {}
        free = []
        for i, w in enumerate(layers):
            r = self._override(w.node)
            if r is None:
                free.append(i)
            else:
                counts[i] = int(round(r * w.array.size))
        total = sum(layers[i].array.size for i in free)
        want = int(round(self.sparsity * total))
        if self.sensitivity and free and want:
            runner = self._runner(model, [layers[i].weight.name for i in free])
            units = [Unit(str(i), layers[i].array.size) for i in free]
            measure(units, self._levels, lambda u, r: runner.error(
                {layers[int(u.name)].weight.name: _zero_smallest(layers[int(u.name)].array, r)[0]}))
            self._sensitivity_stats(units)
            ratios = allocate(units, self._levels, want)
            got = {i: int(np.floor(ratios[str(i)] * layers[i].array.size)) for i in free}
            _spread(got, want, {i: layers[i].array.size for i in free})
            counts.update(got)
        elif self.scope == "global" and free:
            counts.update(_global_counts([layers[i].array for i in free], want, free))
        else:
            counts.update({i: int(round(self.sparsity * layers[i].array.size)) for i in free})
        entries = {}
        modified = False
        for i, w in enumerate(layers):
            k = counts.get(i, 0)
            if k <= 0:
                continue
            pruned, mask = _zero_smallest(w.array, k / w.array.size, count=k)
            new = set_weight(model, w.node, 1, pruned, "pruned")
            keep_mask(model, new.name, mask)
            density = float(np.count_nonzero(pruned)) / pruned.size
            entries[new.name] = {"node": w.node.name, "op": w.node.op_type, "pattern": "unstructured",
                                 "density": round(density, 6)}
            self.stats["weights zeroed"] += int(pruned.size - np.count_nonzero(pruned))
            self.stats["layers pruned"] += 1
            modified = True
        self.stats["weights in pruned scope"] += sum(w.array.size for w in layers)
        if entries:
            record(model, weights=entries)
        return PassResult(model, modified)

    def _sensitivity_stats(self, units: List[Unit]) -> None:
        self.stats["sensitivity: units measured"] += len(units)
        self.stats["sensitivity: onnxruntime runs"] += len(units) * len(self._levels) + 1

    # -- structured -----------------------------------------------------------------
    def _structured(self, model: Model, layers: List[Weighted]) -> PassResult:
        infer_shapes(model)
        producers = [w for w in layers if _can_produce(w.node)]
        cg = analyse(model, {id(w.node) for w in producers})
        for w in producers:
            why = cg.frozen_reason(w.node)
            if why is not None:
                warnings.warn(f"prune: layer {w.node.label} skipped: its output channels reach {why}, which "
                              "structured pruning cannot follow", stacklevel=3)
                self.stats["layers skipped"] += 1
        plan = _Plan(cg, self.norm)
        if not plan.groups:
            return PassResult(model, False)
        fixed: Dict[int, float] = {}
        for gi, members in enumerate(plan.group_producers):
            rs = [r for r in (self._override(p) for p in members) if r is not None]
            if rs:
                fixed[gi] = rs[-1]
        free = [gi for gi in range(len(plan.groups)) if gi not in fixed]
        removed: Set[int] = set()
        for gi, r in fixed.items():
            removed |= plan.select(gi, r)
        if self.sensitivity and free and self.sparsity > 0:
            names = sorted({n.inputs[1].name for n, *_ in cg.consumer_slices(set(plan.roots))})
            runner = self._runner(model, names)
            units = [Unit(str(gi), plan.size(gi)) for gi in free]
            measure(units, self._levels, lambda u, r: runner.error(plan.zeroed(model, plan.select(int(u.name), r))))
            self._sensitivity_stats(units)
            ratios = allocate(units, self._levels, self.sparsity * sum(u.size for u in units))
            for gi in free:
                removed |= plan.select(gi, ratios[str(gi)])
        elif self.scope == "global" and free:
            removed |= plan.select_global(free, self.sparsity)
        else:
            for gi in free:
                removed |= plan.select(gi, self.sparsity)
        if not removed:
            return PassResult(model, False)
        before = {id(p): p.inputs[1].const_value.shape for p in cg.producers}
        self.stats["weights removed"] += cg.apply(model, removed)
        infer_shapes(model)
        entries = {}
        for p in cg.producers:
            old, new = before[id(p)], p.inputs[1].const_value.shape
            axis = 1 if p.op_type == "MatMul" or (p.op_type == "Gemm" and not p.attr("transB", 0)) else 0
            if old[axis] != new[axis]:
                self.stats["channels removed"] += old[axis] - new[axis]
                self.stats["layers pruned"] += 1
                entries[p.inputs[1].name] = {"node": p.name, "op": p.op_type, "pattern": "structured",
                                             "channels": int(new[axis]), "channels_before": int(old[axis]),
                                             "density": 1.0}
        record(model, weights=entries)
        return PassResult(model, True)


def _can_produce(node: Node) -> bool:
    """A layer whose output channels structured pruning may remove."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not bias.is_initializer:
        return False
    if node.op_type == "Conv":
        return int(node.attr("group", 1)) == 1
    if node.op_type == "Gemm":
        return not node.attr("transA", 0)
    return True


class _Plan:
    """Classes of tied channels, their scores and costs, grouped by the layers they tie."""

    def __init__(self, cg: ChannelGraph, norm: str):
        self.cg = cg
        classes = cg.classes()
        scores, fan_in = {}, {}
        for p in cg.producers:
            w = p.inputs[1].const_value
            axis = 1 if p.op_type == "MatMul" or (p.op_type == "Gemm" and not p.attr("transB", 0)) else 0
            flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
            n = np.abs(flat).sum(1) if norm == "l1" else np.sqrt(np.square(flat).sum(1))
            scores[id(p)] = n / max(float(n.mean()), 1e-30)
            fan_in[id(p)] = flat.shape[1]
        parent: Dict[int, int] = {}

        def find(x):
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        self.score: Dict[int, float] = {}
        self.cost: Dict[int, int] = {}
        for root, atoms in classes.items():
            owners = [cg.owner[a] for a in atoms]
            self.score[root] = float(np.mean([scores[id(p)][c] for p, c in owners]))
            self.cost[root] = sum(fan_in[id(p)] for p, _ in owners)
            for p, _ in owners[1:]:
                parent[find(id(p))] = find(id(owners[0][0]))
        by_group: Dict[int, List[int]] = collections.defaultdict(list)
        for root, atoms in classes.items():
            by_group[find(id(cg.owner[atoms[0]][0]))].append(root)
        self.groups = [sorted(rs, key=lambda r: (self.score[r], r)) for rs in by_group.values()]
        self.group_producers = [list({id(cg.owner[a][0]): cg.owner[a][0] for r in rs for a in classes[r]}.values())
                                for rs in self.groups]
        self.classes = classes
        self.roots = list(classes)

    def size(self, gi: int) -> int:
        return sum(self.cost[r] for r in self.groups[gi])

    def select(self, gi: int, ratio: float) -> Set[int]:
        """The lowest-scoring classes of group `gi`, round(ratio * classes) of them, each
        layer keeping at least one channel."""
        roots = self.groups[gi]
        return self._take(roots, int(round(ratio * len(roots))))

    def select_global(self, groups: List[int], ratio: float) -> Set[int]:
        roots = sorted((r for gi in groups for r in self.groups[gi]), key=lambda r: (self.score[r], r))
        budget = ratio * sum(self.cost[r] for r in roots)
        taken, spent = [], 0
        for r in roots:
            if spent >= budget - 1e-9:
                break
            taken.append(r)
            spent += self.cost[r]
        return self._take(taken, len(taken))

    def _take(self, roots: List[int], k: int) -> Set[int]:
        left = collections.Counter(id(p) for p, _ in self.cg.owner)  # channels each layer still has
        out: Set[int] = set()
        for r in roots:
            if len(out) >= k:
                break
            owners = [id(self.cg.owner[a][0]) for a in self.classes[r]]
            need = collections.Counter(owners)
            if any(left[o] - n < 1 for o, n in need.items()):
                continue
            left.subtract(need)
            out.add(r)
        return out

    def zeroed(self, model: Model, removed: Set[int]) -> Dict[str, np.ndarray]:
        """Consumer weights with the input slices of `removed` zeroed: what removing them
        computes, without rewriting the graph."""
        out: Dict[str, np.ndarray] = {}
        for node, index, axis, gone in self.cg.consumer_slices(removed):
            name = node.inputs[index].name
            arr = out.get(name)
            if arr is None:
                arr = node.inputs[index].const_value.copy()
            idx = [slice(None)] * arr.ndim
            idx[axis] = gone
            arr[tuple(idx)] = 0
            out[name] = arr
        return out


def _zero_smallest(w: np.ndarray, ratio: float, count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """`w` with its `count` (default round(ratio * size)) smallest magnitudes zeroed, and
    the mask of the weights kept."""
    k = int(round(ratio * w.size)) if count is None else count
    mask = np.ones(w.size, dtype=bool)
    if k > 0:
        mask[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = False
    mask = mask.reshape(w.shape)
    return np.where(mask, w, 0).astype(w.dtype), mask


def _global_counts(arrays: List[np.ndarray], want: int, ids: List[int]) -> Dict[int, int]:
    """How many weights each array loses when the `want` smallest magnitudes overall go."""
    if want <= 0:
        return {}
    mags = np.concatenate([np.abs(a).ravel() for a in arrays])
    owner = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)])
    chosen = np.argsort(mags, kind="stable")[:want]
    per = np.bincount(owner[chosen], minlength=len(arrays))
    return {ids[i]: int(per[i]) for i in range(len(arrays))}


def _spread(counts: Dict[int, int], want: int, sizes: Dict[int, int]) -> None:
    """Adjust per-layer counts (floors of ratio * size) so they sum to `want` exactly."""
    diff = want - sum(counts.values())
    for i in sorted(counts, key=lambda i: sizes[i] - counts[i], reverse=True):
        if diff <= 0:
            break
        step = min(diff, sizes[i] - counts[i])
        counts[i] += step
        diff -= step


def _overrides(entries: List[str]) -> List[Tuple[str, object, float]]:
    rules = []
    for entry in entries:
        pattern, sep, text = entry.rpartition(":")
        try:
            ratio = float(text)
        except ValueError:
            ratio = None
        if not sep or not pattern or ratio is None:
            raise QCompileError(f"prune option overrides: {entry!r} is not PATTERN:SPARSITY (e.g. /0/Conv:0.3)")
        check_fraction("prune", f"overrides ({entry})", ratio)
        rules.append((pattern, compile_regex(pattern, "overrides"), ratio))
    return rules
