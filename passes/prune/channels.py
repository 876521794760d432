"""Channel dependencies for structured pruning: which output channels can be removed
together, and the graph rewrite that removes them.

Every output channel of a prunable layer is an *atom*. Walking the graph in order, each
tensor that carries channels gets the list of atoms along its channel axis (and a block
size: a Flatten turns one channel into H*W consecutive features). Ops either carry the
list through, join lists, or end it:
  1. Producers (atoms made): Conv with group=1, Gemm with transA=0, MatMul with a rank-2
     constant weight; their weight (and bias) must be initializers.
  2. Consumers (the list ends; their input channels/features are removed): the same ops
     reading the tensor as data input; Gemm/MatMul need the channels on the last axis.
  3. Carried unchanged: elementwise activations (Relu, Clip, LeakyRelu, Sigmoid, ...),
     Identity/Dropout, BatchNormalization and InstanceNormalization (their per-channel
     parameters sliced), pooling, Reduce* and Squeeze over other axes, depthwise Conv
     (group = channels, one filter each: its filters, bias and group are sliced).
  4. Joined: Add/Sub/Mul/Div/Max/Min/Sum/Mean/PRelu of two channel tensors (a residual
     Add): atom i of each branch is tied to atom i of the other, so they are removed in
     step; a constant operand either broadcasts over channels or is per channel (sliced).
  5. Concat along the channel axis: the lists are concatenated (offsets follow).
  6. Flatten at the channel axis, and a Reshape that is such a Flatten: channels become
     blocks of consecutive features, removed from the following Gemm/MatMul as blocks
     (a Reshape's constant target shape is rewritten when it names the size).
Ends the list and *freezes* its channels (never removed): graph outputs, values read
inside subgraphs, and any other op (Transpose, Split, Softmax, a Reshape that is not a
Flatten, Concat on another axis, ...). A layer all of whose channels are frozen is
skipped, with a warning that names it and the op that stopped it.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from qcompile.ir import Model, Node, TensorType, Value

from .common import set_weight

__all__ = ["ChannelGraph", "analyse"]

UNARY = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
         "Softsign", "Gelu", "Mish", "Identity", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Erf", "Celu", "ThresholdedRelu",
         "Round", "Floor", "Ceil", "Sign"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceProd", "ReduceSumSquare"}


@dataclasses.dataclass
class Info:
    """The channels a tensor carries: atom ids along `axis` (rank `rank`), each `block` elements wide."""

    atoms: np.ndarray
    axis: int
    rank: int
    block: int = 1


@dataclasses.dataclass
class Edit:
    """One tensor to slice at rewrite time: input `index` of `node`, along `axis`,
    keeping the positions of `source`'s channels that remain (expanded by its block)."""

    node: Node
    index: int
    axis: int
    source: Value
    kind: str = "slice"  # slice | shape (a Reshape's target shape entry)


class ChannelGraph:
    """The result of `analyse`: atoms, the classes that must go together, the layers
    that own them, what freezes them, and the edits that remove them."""

    def __init__(self):
        self.owner: List[Tuple[Node, int]] = []  # atom -> (producer, output channel)
        self.parent: List[int] = []
        self.infos: Dict[int, Tuple[Value, Info]] = {}
        self.frozen: Dict[int, str] = {}  # atom -> why
        self.edits: List[Edit] = []
        self.producers: List[Node] = []
        self.groups_touched: Dict[int, Node] = {}  # depthwise Conv nodes whose group changes

    # -- union-find ------------------------------------------------------------------
    def new_atoms(self, node: Node, count: int) -> np.ndarray:
        start = len(self.owner)
        self.owner.extend((node, i) for i in range(count))
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def root(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def info(self, v: Optional[Value]) -> Optional[Info]:
        hit = self.infos.get(id(v)) if v is not None else None
        return hit[1] if hit is not None else None

    def set_info(self, v: Value, info: Info) -> None:
        self.infos[id(v)] = (v, info)

    def freeze(self, info: Info, why: str) -> None:
        for a in info.atoms:
            self.frozen.setdefault(int(a), why)

    # -- classes ---------------------------------------------------------------------
    def classes(self) -> Dict[int, List[int]]:
        """Root atom -> member atoms, for the classes with no frozen member."""
        frozen_roots = {self.root(a) for a in self.frozen}
        out: Dict[int, List[int]] = collections.defaultdict(list)
        for a in range(len(self.owner)):
            r = self.root(a)
            if r not in frozen_roots:
                out[r].append(a)
        return dict(out)

    def frozen_reason(self, producer: Node) -> Optional[str]:
        """Why every channel of `producer` is frozen (None when some can go)."""
        frozen_roots = {self.root(a): why for a, why in self.frozen.items()}
        reasons = []
        for a, (p, _) in enumerate(self.owner):
            if p is producer:
                r = self.root(a)
                if r not in frozen_roots:
                    return None
                reasons.append(self.frozen.get(a) or frozen_roots[r])
        return reasons[0] if reasons else "it has no output channels"

    def keep_positions(self, v: Value, removed: Set[int]) -> np.ndarray:
        """Element indices along `v`'s channel axis that stay when classes `removed` go."""
        info = self.info(v)
        keep = np.array([self.root(int(a)) not in removed for a in info.atoms], dtype=bool)
        return np.flatnonzero(np.repeat(keep, info.block))

    def consumer_slices(self, removed: Set[int]) -> List[Tuple[Node, int, int, np.ndarray]]:
        """(consumer, weight input, K axis, removed element indices) for every consumer
        reading channels of the classes `removed`: zeroing those weight slices computes
        exactly what removing the channels does."""
        out = []
        for e in self.edits:
            if e.kind == "consumer":
                keep = self.keep_positions(e.source, removed)
                info = self.info(e.source)
                gone = np.setdiff1d(np.arange(len(info.atoms) * info.block), keep)
                if gone.size:
                    out.append((e.node, e.index, e.axis, gone))
        return out

    # -- the rewrite -----------------------------------------------------------------
    def apply(self, model: Model, removed: Set[int]) -> int:
        """Remove the channels of the classes `removed` from every tensor that carries
        them; returns the number of weight elements removed."""
        before = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
        new_group: Dict[int, int] = {}
        for e in self.edits:
            keep = self.keep_positions(e.source, removed)
            info = self.info(e.source)
            if keep.size == len(info.atoms) * info.block:
                continue
            if e.kind == "shape":
                shape = e.node.inputs[1].const_value.copy()
                if shape[e.axis] > 0:
                    shape[e.axis] = keep.size
                    set_weight(model, e.node, 1, shape, "pruned")
                continue
            arr = e.node.inputs[e.index].const_value
            set_weight(model, e.node, e.index, np.take(arr, keep, axis=e.axis), "pruned")
            if e.kind == "depthwise":
                new_group[id(e.node)] = keep.size
        for node in model.graph.nodes:
            if id(node) in new_group:
                node.set_attr("group", new_group[id(node)])
        outputs = {id(v) for v in model.graph.outputs}
        for v, _ in self.infos.values():
            if id(v) not in outputs and isinstance(v.type, TensorType) and not v.is_initializer:
                v.type = TensorType(v.type.dtype, None)
        after = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
        return before - after


def _const(v: Optional[Value]) -> Optional[np.ndarray]:
    return None if v is None or not v.is_initializer else v.const_value


def _shape(v: Optional[Value]):
    t = v.type if v is not None else None
    return t.shape if isinstance(t, TensorType) else None


def analyse(model: Model, prunable: Set[int]) -> ChannelGraph:
    """Walk the main graph once. `prunable` holds id() of the producer nodes whose
    output channels may be removed (the others carry no atoms)."""
    cg = ChannelGraph()
    g = model.graph
    for node in g.nodes:
        ins = [(i, v, cg.info(v)) for i, v in enumerate(node.inputs) if cg.info(v) is not None]
        try:
            _visit(cg, node, ins)
        except _Stop as stop:
            for _, _, info in ins:
                cg.freeze(info, f"{node.label} ({stop})" if str(stop) else node.label)
        if id(node) in prunable and node.outputs and node.outputs[0] is not None:
            _produce(cg, node)
    for v in g.outputs:
        info = cg.info(v)
        if info is not None:
            cg.freeze(info, f"graph output %{v.name}")
    for v, info in list(cg.infos.values()):
        inner = [u for u in v.users if u.graph is not g]
        if inner:
            cg.freeze(info, f"{inner[0].label} inside a subgraph")
    return cg


class _Stop(Exception):
    """This node cannot carry the channels of its inputs: freeze them."""


def _produce(cg: ChannelGraph, node: Node) -> None:
    w = node.inputs[1].const_value
    out = node.outputs[0]
    rank = len(_shape(out)) if _shape(out) is not None else None
    if node.op_type == "Conv":
        count, axis, rank = w.shape[0], 1, rank or w.ndim
        bias_axis = 0
    elif node.op_type == "Gemm":
        count, axis, rank = w.shape[0 if node.attr("transB", 0) else 1], 1, 2
        bias_axis = -1
    else:  # MatMul
        if rank is None:
            return
        count, axis, bias_axis = w.shape[1], rank - 1, None
    cg.producers.append(node)
    atoms = cg.new_atoms(node, count)
    cg.set_info(out, Info(atoms, axis, rank))
    out_axis = 0 if node.op_type == "Conv" else (0 if node.op_type == "Gemm" and node.attr("transB", 0) else 1)
    cg.edits.append(Edit(node, 1, out_axis, out, "producer"))
    bias = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None and bias_axis is not None and bias.ndim >= 1 and bias.shape[bias_axis] == count:
        cg.edits.append(Edit(node, 2, bias.ndim - 1 if bias_axis == -1 else 0, out, "bias"))


def _visit(cg: ChannelGraph, node: Node, ins) -> None:
    if not ins:
        return
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise _Stop("custom op")
    first_i, first_v, info = ins[0]
    out = node.outputs[0] if node.outputs else None
    if op in ("Conv", "Gemm", "MatMul"):
        _consume(cg, node, ins)
    elif op in UNARY or (op == "Cast" and len(ins) == 1):
        _only_data(node, ins)
        if any(v is not None and _const(v) is None for v in node.inputs[1:]):
            raise _Stop("non-constant parameter")
        if any(o.uses for o in node.outputs[1:]):
            raise _Stop("its mask output is used")
        cg.set_info(out, info)
    elif op in ("BatchNormalization", "InstanceNormalization"):
        _only_data(node, ins)
        _channel_axis(info, 1)
        for i in range(1, len(node.inputs)):
            if _const(node.inputs[i]) is None:
                raise _Stop("parameters are not constant")
            cg.edits.append(Edit(node, i, 0, first_v))
        if any(o.uses for o in node.outputs[1:]):
            raise _Stop("training outputs are used")
        cg.set_info(out, info)
    elif op in POOLS:
        _only_data(node, ins)
        _channel_axis(info, 1)
        if any(o.uses for o in node.outputs[1:]):
            raise _Stop("its indices output is used")
        cg.set_info(out, info)
    elif op in REDUCE or op == "Squeeze":
        _only_data(node, ins)
        cg.set_info(out, _reduce(node, info))
    elif op == "Flatten":
        cg.set_info(out, _flatten(node, info, int(node.attr("axis", 1)), first_v))
    elif op == "Reshape":
        _only_data(node, ins)
        cg.set_info(out, _reshape(cg, node, info, first_v))
    elif op in BINARY:
        cg.set_info(out, _join(cg, node, ins))
    elif op == "Concat":
        cg.set_info(out, _concat(node, ins))
    else:
        raise _Stop("")


def _only_data(node: Node, ins) -> None:
    if any(i != 0 for i, _, _ in ins):
        raise _Stop("channels reach a parameter input")


def _channel_axis(info: Info, axis: int) -> None:
    if info.axis != axis or info.block != 1:
        raise _Stop(f"channels on axis {info.axis}, not {axis}")


def _consume(cg: ChannelGraph, node: Node, ins) -> None:
    _only_data(node, ins)
    _, v, info = ins[0]
    w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        raise _Stop("its weight is not constant")
    if node.op_type == "Conv":
        _channel_axis(info, 1)
        group = int(node.attr("group", 1))
        if group == 1:
            cg.edits.append(Edit(node, 1, 1, v, "consumer"))
            return
        if group == len(info.atoms) and w.shape[0] == group and w.shape[1] == 1:  # depthwise
            cg.edits.append(Edit(node, 1, 0, v, "depthwise"))
            bias = _const(node.inputs[2]) if len(node.inputs) > 2 else None
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                if bias is None:
                    raise _Stop("its bias is not constant")
                cg.edits.append(Edit(node, 2, 0, v))
            cg.set_info(node.outputs[0], info)
            return
        raise _Stop(f"grouped convolution (group={group})")
    if info.axis != info.rank - 1 or w.ndim != 2:
        raise _Stop("features not on the last axis")
    if node.op_type == "Gemm":
        if node.attr("transA", 0):
            raise _Stop("transA=1")
        cg.edits.append(Edit(node, 1, 1 if node.attr("transB", 0) else 0, v, "consumer"))
    else:
        cg.edits.append(Edit(node, 1, 0, v, "consumer"))


def _axes(node: Node) -> Optional[List[int]]:
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        if c is None:
            raise _Stop("axes not constant")
        axes = c.tolist()
    return None if axes is None else list(axes)


def _reduce(node: Node, info: Info) -> Info:
    axes = _axes(node)
    if axes is None or info.block != 1:
        raise _Stop("reduces every axis")
    axes = [a % info.rank for a in axes]
    if info.axis in axes or 0 in axes:
        raise _Stop("reduces the channel or batch axis")
    drops = node.op_type == "Squeeze" or int(node.attr("keepdims", 1)) == 0
    if not drops:
        return info
    return Info(info.atoms, info.axis - sum(a < info.axis for a in axes), info.rank - len(axes), info.block)


def _static_tail(v: Value, axis: int) -> int:
    shape = _shape(v)
    if shape is None or not all(isinstance(d, int) for d in shape[axis + 1:]):
        raise _Stop("shape after the channel axis unknown")
    return int(np.prod(shape[axis + 1:], dtype=np.int64))


def _flatten(node: Node, info: Info, axis: int, v: Value) -> Info:
    if axis < 0:
        axis += info.rank
    if axis != info.axis:
        raise _Stop(f"flattens at axis {axis}, channels on axis {info.axis}")
    return Info(info.atoms, 1, 2, info.block * _static_tail(v, info.axis))


def _reshape(cg: ChannelGraph, node: Node, info: Info, v: Value) -> Info:
    """A Reshape that keeps the axes before the channel axis and merges it with all
    later ones (a Flatten)."""
    src, dst = _shape(v), _shape(node.outputs[0])
    target = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if src is None or dst is None or target is None:
        raise _Stop("shapes unknown")
    a = info.axis
    if len(dst) != a + 1 or list(dst[:a]) != list(src[:a]) or target.size != a + 1:
        raise _Stop("not a flatten of the channel axis")
    tail = _static_tail(v, a)
    if not isinstance(dst[a], int) or dst[a] != len(info.atoms) * info.block * tail:
        raise _Stop("not a flatten of the channel axis")
    out = Info(info.atoms, a, a + 1, info.block * tail)
    cg.set_info(node.outputs[0], out)  # the edit below reads it
    cg.edits.append(Edit(node, 1, a, node.outputs[0], "shape"))
    return out


def _join(cg: ChannelGraph, node: Node, ins) -> Info:
    out_shape = _shape(node.outputs[0])
    ranks = [len(_shape(v)) if _shape(v) is not None else None for v in node.inputs]
    if out_shape is None or None in ranks:
        raise _Stop("shapes unknown")
    rank = len(out_shape)
    _, _, first = ins[0]
    neg = first.axis - first.rank  # the channel axis counted from the end
    for _, _, info in ins[1:]:
        if info.axis - info.rank != neg or len(info.atoms) != len(first.atoms) or info.block != first.block:
            raise _Stop("operands carry different channels")
        for a, b in zip(first.atoms, info.atoms):
            cg.union(int(a), int(b))
    width = len(first.atoms) * first.block
    with_info = {i for i, _, _ in ins}
    for i, v in enumerate(node.inputs):
        if i in with_info or v is None:
            continue
        shape = _shape(v)
        pos = len(shape) + neg
        size = 1 if pos < 0 else shape[pos]
        if size == 1:
            continue
        if size != width or _const(v) is None:
            raise _Stop(f"operand %{v.name} has {size} channels and is not a per-channel constant")
        cg.edits.append(Edit(node, i, pos, ins[0][1]))
    return Info(first.atoms, rank + neg, rank, first.block)


def _concat(node: Node, ins) -> Info:
    if len(ins) != len([v for v in node.inputs if v is not None]):
        raise _Stop("some inputs carry no prunable channels")
    first = ins[0][2]
    axis = int(node.attr("axis", 0)) % first.rank
    for _, _, info in ins:
        if info.axis != axis or info.rank != first.rank or info.block != first.block:
            raise _Stop(f"concatenates on axis {axis}, not the channel axis")
    return Info(np.concatenate([info.atoms for _, _, info in ins]), axis, first.rank, first.block)
