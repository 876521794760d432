"""What a pattern matched (`Match`), and why something did not match (`Failure`).

A rule's `check` returns True or `fail(reason, *culprits)`; the pattern matcher reports
its own mismatches the same way, so the driver can explain every non-match alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..ir.graph import Graph
from ..ir.node import Node
from ..ir.value import Value

__all__ = ["Failure", "Match", "constant_value", "describe", "fail"]

Culprit = Union[Node, Value]


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a pattern or a check did not match: a sentence, and the nodes or values at
    fault. `stage` is "pattern" or "check" once a Rule has reported it.

    A Failure is falsy, so `if not result: return result` passes it on. Helpers that
    checks call should also return True or a Failure (not None for success), so that
    their result can be returned as is: `helper() or True` would swallow a Failure."""

    reason: str
    culprits: Tuple[Culprit, ...] = ()
    stage: str = ""

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


def fail(reason: str, *culprits: Culprit) -> Failure:
    """Explain a non-match: `return fail("conv output has 2 users", conv, *users)`."""
    return Failure(reason, tuple(culprits))


def describe(x: Optional[Culprit]) -> str:
    """How messages name a node or value: `'conv1' (Conv)` or `%x`."""
    if x is None:
        return "<absent>"
    if isinstance(x, Value):
        return f"%{x.name}"
    if x.name:
        return x.label
    outs = ", ".join(f"%{v.name}" for v in x.outputs)
    return f"{x.op_type} -> {outs}" if outs else x.label


def constant_value(value: Optional[Value]) -> Optional[np.ndarray]:
    """The data of `value` when it is a known constant, else None: an initializer that
    is not also a graph input (those can be overridden at run time), or the output of a
    Constant node holding a tensor, float(s) or int(s)."""
    if value is None:
        return None
    producer = value.producer
    if producer is None:
        if value.const is None or value.is_graph_input:
            return None
        return value.const_value
    if producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        attr = producer.attributes.get(key)
        if attr is None or attr.ref_attr_name:
            continue
        if dtype is None:
            return attr.value.numpy() if hasattr(attr.value, "numpy") else None
        return np.asarray(attr.value, dtype=dtype)
    return None


class Match:
    """A successful pattern match at `root`: the captured nodes and values by name,
    every node the pattern matched (root first), and helpers for the rewrite.

        m["conv"]        the Node captured by Op(..., name="conv")
        m["w"]           the Value captured by Var("w") or Const("w")
        m.value("conv")  the output of the captured node that the pattern went through
        m.const("w")     the constant data of a captured value (numpy)
        m.emit("Gemm", [a, b, c])   a new node, inserted just before the root
    """

    def __init__(self, root: Node, captures: Dict[str, Any], outputs: Dict[str, Value],
                 nodes: Sequence[Node], constants: Sequence[Node], opset: Optional[int] = None):
        self.root = root
        self.graph: Graph = root.graph
        self.nodes: Tuple[Node, ...] = tuple(nodes)
        self.constant_nodes: Tuple[Node, ...] = tuple(constants)
        self.opset = opset
        self.new_nodes: List[Node] = []
        self._captures = dict(captures)
        self._outputs = dict(outputs)

    # -- captures --------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        try:
            return self._captures[name]
        except KeyError:
            raise KeyError(f"the pattern captured no {name!r}; captures: {', '.join(sorted(self._captures))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._captures

    def get(self, name: str, default: Any = None) -> Any:
        return self._captures.get(name, default)

    @property
    def captures(self) -> Dict[str, Any]:
        return dict(self._captures)

    def value(self, name: str) -> Value:
        """The value captured as `name`; for a captured node, its matched output."""
        if name in self._outputs:
            return self._outputs[name]
        captured = self[name]
        if not isinstance(captured, Value):
            raise TypeError(f"capture {name!r} is a node with no matched output")
        return captured

    def const(self, name: str) -> np.ndarray:
        """The constant data of the value captured as `name` (a Const capture)."""
        data = constant_value(self.value(name))
        if data is None:
            raise ValueError(f"capture {name!r} (%{self.value(name).name}) is not a constant")
        return data

    # -- building the replacement ----------------------------------------------------
    def emit(self, op_type: str, inputs: Sequence[Optional[Value]], attributes: Optional[Dict[str, Any]] = None,
             *, num_outputs: int = 1, name: str = "", domain: str = "") -> Node:
        """Create a node and insert it just before the root, where every value the
        pattern saw is already defined and no user of the root has run yet."""
        node = Node(op_type, inputs, attributes, num_outputs=num_outputs, name=name, domain=domain)
        self.graph.insert_before(self.root, node)
        self.new_nodes.append(node)
        return node

    def constant(self, array: np.ndarray, name: str = "const") -> Value:
        """A new initializer holding `array`, named after `name` (made unique)."""
        return self.graph.make_constant(np.asarray(array), name)

    def __repr__(self) -> str:
        return f"Match(root={describe(self.root)}, captures={sorted(self._captures)})"
