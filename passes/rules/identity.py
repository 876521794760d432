"""Identity elimination, and Dropout elimination in inference mode.

Algebra: `Identity(x) = x`; in inference mode `Dropout(x) = x` (ONNX scales during
training, so nothing is left to do at inference).

Rewrites (the users of the output read `x` instead):
  1. `y = Identity(x)`.
  2. `y, [mask] = Dropout(x)` of opsets 7-11 (always inference-mode at run time).
  3. `y, [mask] = Dropout(x, [ratio], [training_mode])` of opsets 12+ with
     `training_mode` absent, empty, or a constant false.
  4. `y, [mask] = Dropout(x) {is_test=1}` of opsets 1-6.
  5. In cases 1-4, when `y` is a graph output and `x` is computed by a node of the same
     graph, `x` takes the name `y`, so the model's interface is unchanged.

Left alone:
  6. `y` is a graph output and `x` is a graph input, an initializer, a value of an
     enclosing graph, or itself a graph output: removing the node would rename or
     merge the model's outputs (and would only be put back as an Identity).
  7. Dropout whose mask output is used or is a graph output (it would have to become
     a constant all-true tensor of `x`'s shape).
  8. Dropout in training mode: `training_mode` true or not a constant; opsets 1-6
     without `is_test=1`.
  9. Identity or Dropout of a domain other than ONNX's.
"""
from __future__ import annotations

from typing import List, Union

import numpy as np

from qcompile.ir import Graph, Node, Value
from qcompile.rewrite import Failure, Match, Op, Rule, RuleSet, Var, constant_value, fail

from ._util import is_graph_output

__all__ = ["ELIMINATE_DROPOUT", "ELIMINATE_IDENTITY", "IDENTITY"]


def _interface_kept(node: Node, x: Value) -> Union[bool, Failure]:
    """Case 6: True when replacing `node`'s first output by `x` keeps the model's
    outputs as they are, else why not."""
    y = node.outputs[0]
    if not is_graph_output(y):
        return True
    if is_graph_output(x):
        return fail(f"%{y.name} and its input %{x.name} are both graph outputs", node, x)
    if x.producer is None or x.producer.graph is not node.graph:
        kind = ("a graph input" if x.is_graph_input else "an initializer" if x.is_initializer
                else "a value of an enclosing graph")
        return fail(f"%{y.name} is a graph output and its input %{x.name} is {kind}: "
                    "the node keeps the model's interface", node, x)
    return True


def _check_identity(m: Match) -> Union[bool, Failure]:
    return _interface_kept(m["identity"], m["x"])


def _eliminate(m: Match, graph: Graph) -> List[Value]:
    """Replace the node's output by its input."""
    return [m["x"]]


def _check_dropout(m: Match) -> Union[bool, Failure]:
    node: Node = m["dropout"]
    for mask in node.outputs[1:]:
        if mask.uses or is_graph_output(mask):
            return fail(f"the mask output %{mask.name} is used", node, mask)
    if "is_test" in node.attributes or (m.opset is not None and m.opset < 7):
        if not node.attr("is_test", 0):
            return fail("an opset 1-6 Dropout without is_test=1 runs in training mode", node)
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        flag = constant_value(training)
        if flag is None:
            return fail(f"training_mode %{training.name} is not a constant", node, training)
        if np.any(flag):
            return fail(f"training_mode %{training.name} is true", node, training)
    return _interface_kept(node, m["x"])


ELIMINATE_IDENTITY = Rule(
    "eliminate-identity", Op("Identity", Var("x"), name="identity"), _eliminate, check=_check_identity,
    doc="Identity(x) -> x",
)
ELIMINATE_DROPOUT = Rule(
    "eliminate-dropout", Op("Dropout", Var("x"), name="dropout", extra_inputs=True), _eliminate,
    check=_check_dropout, doc="Dropout(x) -> x in inference mode",
)
IDENTITY = RuleSet("identity", [ELIMINATE_IDENTITY, ELIMINATE_DROPOUT])
