"""Sum of two or more tensors -> a chain of Adds.

Algebra: `Sum(x1, x2, ..., xn) = (...((x1 + x2) + x3) ... + xn)`, each `+` with
multidirectional broadcasting, which is what Add does from opset 7 and Sum from opset
8. The sum is the same (to float rounding of the order of the terms, which onnxruntime's
Sum also adds left to right); as Adds, a residual join such as ShuffleNet's gets
quantized, fused with the Relu that follows and lowered to integer ops like any other
Add.

Rewrites:
  1. `Sum(a, b)` -> `Add(a, b)`.
  2. `Sum(x1, ..., xn)`, n > 2 -> `Add(...Add(Add(x1, x2), x3)..., xn)`.

Left alone:
  3. `Sum(x)` of one input (a copy, left as it is).
  4. Opsets before 8 (Sum without broadcasting, Add with its `broadcast` attribute).
  5. Sum of a domain other than ONNX's.
"""
from __future__ import annotations

from typing import List, Union

from qcompile.ir import Graph, Value
from qcompile.rewrite import Failure, Match, Op, Rule, RuleSet, Var, fail

__all__ = ["SUM_TO_ADD", "SUM_ADD"]


def _check(m: Match) -> Union[bool, Failure]:
    node = m["sum"]
    if len(node.inputs) < 2:
        return fail("a Sum of one input is a copy", node)
    if m.opset is not None and m.opset < 8:
        return fail(f"opset {m.opset}: Sum does not broadcast before opset 8", node)
    if any(x is None for x in node.inputs):
        return fail("an input is missing", node)
    return True


def _rewrite(m: Match, graph: Graph) -> List[Value]:
    """Add the inputs left to right; the last Add takes the Sum's name."""
    node = m["sum"]
    acc = node.inputs[0]
    last = len(node.inputs) - 1
    base = node.name or graph.unique_name("sum")  # unnamed Sums must not give their Adds the same names
    for i, x in enumerate(node.inputs[1:], start=1):
        name = node.name if i == last else f"{base}/add{i}"
        acc = m.emit("Add", [acc, x], name=name).outputs[0]
    return [acc]


SUM_TO_ADD = Rule("sum-to-add", Op("Sum", Var("x"), name="sum", extra_inputs=True), _rewrite, check=_check,
                  doc="Sum(x1, ..., xn) -> Add(...Add(x1, x2)..., xn)")
SUM_ADD = RuleSet("sum-add", [SUM_TO_ADD])
