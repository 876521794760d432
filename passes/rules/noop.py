"""No-op elimination: shape and type operations that return their input unchanged.

Algebra: each op below is the identity map `y = x` (same element type, same shape,
same elements in the same order) under the condition given; the users of `y` then
read `x`.

Rewrites:
  1. `Reshape(x, s)` (or the `shape` attribute, opsets 1-4) where the target shape,
     resolved against x's static shape (0 copies a dimension unless `allowzero=1`,
     -1 is inferred), equals x's shape.
  2. `Transpose(x)` whose `perm` is 0, 1, ..., r-1, or that has no `perm` and r <= 1.
  3. `Cast(x)` to x's own element type (x's type a native ONNX type).
  4. `Expand(x, s)` where broadcasting x's static shape with s gives x's shape.
  5. `Squeeze(Unsqueeze(x, a), a)`: the same axes (attribute or constant input,
     negative axes resolved with the rank of the Unsqueeze output, x's rank known).
  6. `Pad(x, pads)` (or the `pads` attribute, opsets 1-10) with every pad 0, any mode.
  7. `Slice(x, starts, ends, [axes], [steps])` (or attributes, opsets 1-9) whose every
     sliced axis has step 1 and, clamped to x's static shape, starts at 0 and ends at
     the dimension.
  8. `Concat(x)` with a single input.
The driver keeps graph output names (renaming x, or an Identity when x is a graph
input, an initializer or already an output).

Left alone:
  9. Anything needing a shape that is not static (run infer-shapes first), or a shape,
     axes, pads, starts, ends or steps operand that is not a constant.
 10. `Squeeze` without axes (squeezes every 1 of an unknown shape); Unsqueeze/Squeeze
     with different axes; `Unsqueeze(Squeeze(x))` (x's squeezed dims must be 1).
 11. Pad with a non-zero pad; Slice with a step other than 1 (reversal) or that drops
     elements; Cast between different types (even int4 stored as int8 to int8).
 12. Ops of non-ONNX domains.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import numpy as np

from qcompile.ir import Graph, Node, TensorType, Value
from qcompile.rewrite import Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

__all__ = [
    "ELIMINATE_NOOP_CAST", "ELIMINATE_NOOP_CONCAT", "ELIMINATE_NOOP_EXPAND", "ELIMINATE_NOOP_PAD",
    "ELIMINATE_NOOP_RESHAPE", "ELIMINATE_NOOP_SLICE", "ELIMINATE_NOOP_TRANSPOSE", "ELIMINATE_UNSQUEEZE_SQUEEZE",
    "NOOP",
]


def _shape(v: Value) -> Optional[Tuple[int, ...]]:
    """x's static shape, from its constant data or its type; None when not static."""
    data = constant_value(v)
    if data is not None:
        return tuple(data.shape)
    return tuple(v.type.shape) if isinstance(v.type, TensorType) and v.type.is_static else None


def _static(m: Match, what: str = "x") -> Union[Tuple[int, ...], Failure]:
    shape = _shape(m[what])
    if shape is None:
        return fail(f"the shape of %{m[what].name} is not static: run infer-shapes first", m[what])
    return shape


def _operand(node: Node, index: int, attr: str) -> Union[np.ndarray, None, Failure]:
    """An operand given as constant input `index` or attribute `attr`: its data, None
    when absent, a Failure when it is an input that is not constant."""
    if attr in node.attributes:
        return np.asarray(node.attr(attr), dtype=np.int64)
    v = node.inputs[index] if len(node.inputs) > index else None
    if v is None:
        return None
    data = constant_value(v)
    if data is None:
        return fail(f"{attr} %{v.name} of {node.op_type} is not a constant", node, v)
    return data.astype(np.int64).reshape(-1)


def _same(m: Match, shape: Iterable[int], x_shape: Tuple[int, ...], what: str) -> Union[bool, Failure]:
    shape = tuple(int(d) for d in shape)
    if shape != x_shape:
        return fail(f"{what} gives shape {list(shape)}, not x's {list(x_shape)}", m["node"])
    return True


def _forward(m: Match, graph: Graph) -> List[Value]:
    """Replace the no-op's output by its input."""
    return [m["x"]]


# 1. Reshape -----------------------------------------------------------------------------
def _check_reshape(m: Match) -> Union[bool, Failure]:
    x_shape = _static(m)
    if not x_shape:
        return x_shape
    node: Node = m["node"]
    target = _operand(node, 1, "shape")
    if target is None or isinstance(target, Failure):
        return target or fail("Reshape has no shape operand", node)
    if len(target) != len(x_shape):
        return fail(f"Reshape changes the rank {len(x_shape)} to {len(target)}", node)
    allowzero = node.attr("allowzero", 0)
    resolved = [x_shape[i] if d == 0 and not allowzero else int(d) for i, d in enumerate(target)]
    if resolved.count(-1) == 1:
        known = int(np.prod([d for d in resolved if d != -1], dtype=np.int64))
        total = int(np.prod(x_shape, dtype=np.int64))
        resolved[resolved.index(-1)] = total // known if known else -1
    return _same(m, resolved, x_shape, "Reshape")


# 2. Transpose ---------------------------------------------------------------------------
def _check_transpose(m: Match) -> Union[bool, Failure]:
    node: Node = m["node"]
    perm = node.attr("perm")
    if perm is None:
        x = m["x"]
        r = len(_shape(x)) if _shape(x) is not None else (x.type.rank if isinstance(x.type, TensorType) else None)
        return True if r is not None and r <= 1 else fail("Transpose without perm reverses the axes", node)
    return True if list(perm) == list(range(len(perm))) else fail(f"perm {list(perm)} is not the identity", node)


# 3. Cast ---------------------------------------------------------------------------------
def _check_cast(m: Match) -> Union[bool, Failure]:
    x, node = m["x"], m["node"]
    if not isinstance(x.type, TensorType):
        return fail(f"the element type of %{x.name} is unknown", x)
    dtype = x.type.dtype
    if not dtype.is_onnx_native:
        return fail(f"%{x.name} has no native ONNX element type", x)
    if dtype.onnx_type != node.attr("to"):
        return fail(f"Cast changes the element type of %{x.name}", node)
    return True


# 4. Expand -------------------------------------------------------------------------------
def _check_expand(m: Match) -> Union[bool, Failure]:
    x_shape = _static(m)
    if not x_shape:
        return x_shape
    target = _operand(m["node"], 1, "shape")
    if target is None or isinstance(target, Failure):
        return target or fail("Expand has no shape operand", m["node"])
    try:
        out = np.broadcast_shapes(x_shape, tuple(int(d) for d in target))
    except ValueError:
        return fail(f"shapes {list(x_shape)} and {target.tolist()} do not broadcast", m["node"])
    return _same(m, out, x_shape, "Expand")


# 5. Squeeze(Unsqueeze) -------------------------------------------------------------------
def _axes(node: Node, rank: Optional[int]) -> Union[Tuple[int, ...], Failure]:
    axes = _operand(node, 1, "axes")
    if axes is None:
        return fail(f"{node.op_type} without axes", node)
    if isinstance(axes, Failure):
        return axes
    if np.any(axes < 0):
        if rank is None:
            return fail(f"{node.op_type} has negative axes and the rank is unknown", node)
        axes = np.where(axes < 0, axes + rank, axes)
    return tuple(sorted(int(a) for a in axes))


def _check_unsqueeze_squeeze(m: Match) -> Union[bool, Failure]:
    x = m["x"]
    shape = _shape(x)
    rank = len(shape) if shape is not None else (x.type.rank if isinstance(x.type, TensorType) else None)
    given = _operand(m["unsq"], 1, "axes")
    if given is None or isinstance(given, Failure):
        return given or fail("Unsqueeze without axes", m["unsq"])
    unsq = _axes(m["unsq"], None if rank is None else rank + len(given))
    if isinstance(unsq, Failure):
        return unsq
    sq = _axes(m["node"], None if rank is None else rank + len(unsq))
    if isinstance(sq, Failure):
        return sq
    return True if sq == unsq else fail(f"Squeeze axes {list(sq)} differ from Unsqueeze axes {list(unsq)}", m["node"])


# 6. Pad ----------------------------------------------------------------------------------
def _check_pad(m: Match) -> Union[bool, Failure]:
    pads = _operand(m["node"], 1, "pads")
    if pads is None or isinstance(pads, Failure):
        return pads or fail("Pad has no pads", m["node"])
    return True if not np.any(pads) else fail(f"pads {pads.tolist()} are not all 0", m["node"])


# 7. Slice --------------------------------------------------------------------------------
def _check_slice(m: Match) -> Union[bool, Failure]:
    x_shape = _static(m)
    if not x_shape:
        return x_shape
    node: Node = m["node"]
    parts = [_operand(node, i, a) for i, a in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
    for p in parts:
        if isinstance(p, Failure):
            return p
    starts, ends, axes, steps = parts
    if starts is None or ends is None:
        return fail("Slice has no starts or ends", node)
    rank = len(x_shape)
    axes = np.arange(len(starts)) if axes is None else np.where(axes < 0, axes + rank, axes)
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    if np.any(steps != 1):
        return fail(f"Slice steps {steps.tolist()} are not all 1", node)
    dims = np.array(x_shape, dtype=np.int64)[axes]
    # clip before adding the dimension: INT64_MIN/MAX stand for "from the start/to the end"
    starts = np.clip(starts, -dims, dims)
    ends = np.clip(ends, -dims, dims)
    starts, ends = np.where(starts < 0, starts + dims, starts), np.where(ends < 0, ends + dims, ends)
    if np.any(starts != 0) or np.any(ends != dims):
        return fail("Slice drops elements", node)
    return True


# 8. Concat -------------------------------------------------------------------------------
def _check_concat(m: Match) -> Union[bool, Failure]:
    return True


def _rule(name: str, pattern: Op, check, doc: str) -> Rule:
    return Rule(name, pattern, _forward, check=check, doc=doc)


ELIMINATE_NOOP_RESHAPE = _rule("eliminate-noop-reshape", Op("Reshape", Var("x"), name="node", extra_inputs=True),
                               _check_reshape, "Reshape(x, shape(x)) -> x")
ELIMINATE_NOOP_TRANSPOSE = _rule("eliminate-noop-transpose", Op("Transpose", Var("x"), name="node"),
                                 _check_transpose, "Transpose(x, perm=identity) -> x")
ELIMINATE_NOOP_CAST = _rule("eliminate-noop-cast", Op("Cast", Var("x"), name="node"), _check_cast,
                            "Cast(x, to=type(x)) -> x")
ELIMINATE_NOOP_EXPAND = _rule("eliminate-noop-expand", Op("Expand", Var("x"), Var(), name="node"),
                              _check_expand, "Expand(x, s) -> x when broadcasting keeps x's shape")
ELIMINATE_UNSQUEEZE_SQUEEZE = _rule(
    "eliminate-unsqueeze-squeeze",
    Op("Squeeze", Op("Unsqueeze", Var("x"), name="unsq", extra_inputs=True), name="node", extra_inputs=True),
    _check_unsqueeze_squeeze, "Squeeze(Unsqueeze(x, a), a) -> x")
ELIMINATE_NOOP_PAD = _rule("eliminate-noop-pad", Op("Pad", Var("x"), name="node", extra_inputs=True),
                           _check_pad, "Pad(x, 0) -> x")
ELIMINATE_NOOP_SLICE = _rule("eliminate-noop-slice", Op("Slice", Var("x"), name="node", extra_inputs=True),
                             _check_slice, "Slice(x) covering all of x -> x")
ELIMINATE_NOOP_CONCAT = _rule("eliminate-noop-concat", Op("Concat", Var("x"), name="node"), _check_concat,
                              "Concat(x) -> x")
NOOP = RuleSet("noop", [
    ELIMINATE_NOOP_RESHAPE, ELIMINATE_NOOP_TRANSPOSE, ELIMINATE_NOOP_CAST, ELIMINATE_NOOP_EXPAND,
    ELIMINATE_UNSQUEEZE_SQUEEZE, ELIMINATE_NOOP_PAD, ELIMINATE_NOOP_SLICE, ELIMINATE_NOOP_CONCAT,
])
