"""A small pattern language over the IR: a DAG of operations rooted at one node.

    Op("Add", Op("MatMul", Var("a"), Const("b"), name="matmul"), Const("c"),
       name="add", commutative=True)

* `Op(op_type, *inputs, name=, domain=, extra_inputs=, commutative=, output=)` matches a
  node of that type (a tuple gives alternatives) in the default ONNX domain unless
  `domain` says otherwise (None: any domain). Its input patterns match the node's
  inputs by position; trailing absent inputs do not count, and more inputs than
  patterns are accepted only with `extra_inputs=True`. `commutative=True` (two inputs)
  also tries them swapped; the first order that matches is kept (no backtracking
  into it when a later sibling fails). As an input pattern it matches a value
  computed by such a node in the same graph, through output `output` (0 by default).
* `Var(name)` matches any present value; the same name twice must be the same value.
* `Const(name)` matches a constant value (see `constant_value`).

A name captures what was matched (`match["add"]`); `Var()` and `Const()` without a name
match without capturing. Matching returns a `Match`, or a `Failure` saying where and
why the graph differs from the pattern.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..ir.node import Node
from ..ir.value import Value
from .match import Failure, Match, constant_value, describe, fail

__all__ = ["Const", "Op", "Pattern", "Var"]


class _State:
    """Bindings made so far while matching (copied where matching branches)."""

    __slots__ = ("captures", "outputs", "nodes", "constants")

    def __init__(self) -> None:
        self.captures: Dict[str, object] = {}
        self.outputs: Dict[str, Value] = {}
        self.nodes: List[Node] = []
        self.constants: List[Node] = []

    def copy(self) -> "_State":
        new = _State()
        new.captures, new.outputs = dict(self.captures), dict(self.outputs)
        new.nodes, new.constants = list(self.nodes), list(self.constants)
        return new

    def bind(self, name: Optional[str], thing: object, what: str) -> Optional[Failure]:
        if name is None:
            return None
        old = self.captures.get(name)
        if old is None:
            self.captures[name] = thing
            return None
        if old is not thing:
            return fail(f"{what}: {name!r} must be {describe(old)}, found {describe(thing)}", old, thing)
        return None


class Pattern:
    """Base class of patterns. `name` is the capture name (None: no capture)."""

    name: Optional[str] = None

    def _match_value(self, value: Optional[Value], state: _State, where: str, root: Node) -> Optional[Failure]:
        raise NotImplementedError

    def capture_names(self) -> List[Tuple[str, str]]:
        """(name, kind) of every capture in this pattern, kind being "node" or "value"."""
        return [(self.name, "value")] if self.name else []


class Var(Pattern):
    """Any value that is present (not an omitted optional input)."""

    def __init__(self, name: Optional[str] = None):
        self.name = name

    def _match_value(self, value, state, where, root):
        if value is None:
            return fail(f"{where} is absent")
        return state.bind(self.name, value, where)

    def __str__(self) -> str:
        return self.name or "_"


class Const(Pattern):
    """A value with known constant data: an initializer or a Constant node's output."""

    def __init__(self, name: Optional[str] = None):
        self.name = name

    def _match_value(self, value, state, where, root):
        if value is None:
            return fail(f"{where} is absent, expected a constant")
        if constant_value(value) is None:
            if value.producer is not None:
                source = f"it comes from {describe(value.producer)}"
            elif value.const is not None:
                source = "it is a graph input whose initializer is only a default"
            else:
                source = "it is a graph input"
            return fail(f"{where} %{value.name} is not a constant ({source})", value)
        producer = value.producer
        if producer is not None and producer not in state.constants:
            state.constants.append(producer)
        return state.bind(self.name, value, where)

    def __str__(self) -> str:
        return f"const {self.name or '_'}"


class Op(Pattern):
    """A node of type `op_type` (or one of several) whose inputs match `inputs`."""

    def __init__(self, op_type: Union[str, Sequence[str]], *inputs: Pattern, name: Optional[str] = None,
                 domain: Optional[str] = "", extra_inputs: bool = False, commutative: bool = False,
                 output: int = 0):
        self.op_types: Tuple[str, ...] = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        if not self.op_types or not all(isinstance(t, str) and t for t in self.op_types):
            raise ValueError(f"Op pattern needs one or more op type names, got {op_type!r}")
        for p in inputs:
            if not isinstance(p, Pattern):
                raise TypeError(f"inputs of Op({self.op_text}) must be patterns (Op, Var, Const), got {p!r}")
        if commutative and len(inputs) != 2:
            raise ValueError(f"commutative Op({self.op_text}) needs exactly 2 input patterns, got {len(inputs)}")
        self.inputs = tuple(inputs)
        self.name = name
        self.domain = domain
        self.extra_inputs = extra_inputs
        self.commutative = commutative
        self.output = output

    @property
    def op_text(self) -> str:
        return "|".join(self.op_types)

    def capture_names(self) -> List[Tuple[str, str]]:
        own = [(self.name, "node")] if self.name else []
        return own + [c for p in self.inputs for c in p.capture_names()]

    # -- matching --------------------------------------------------------------------
    def match(self, node: Node, opset: Optional[int] = None) -> Union[Match, Failure]:
        """Match this pattern rooted at `node`: a Match, or a Failure saying why not."""
        state = _State()
        failure = self._match_node(node, state, root=node)
        if failure is not None:
            return failure
        if self.name:
            state.outputs[self.name] = node.outputs[0] if node.outputs else None
        return Match(node, state.captures, state.outputs, state.nodes, state.constants, opset)

    def _match_value(self, value, state, where, root):
        if value is None:
            return fail(f"{where} is absent, expected the output of {self.op_text}")
        producer = value.producer
        if producer is None:
            kind = "an initializer" if value.const is not None else "a graph input"
            return fail(f"{where} %{value.name} is {kind}, not computed by {self.op_text}", value)
        if producer.graph is not root.graph:
            return fail(f"{where} %{value.name} comes from an enclosing graph", value)
        if producer.op_type not in self.op_types:
            return fail(f"{where} comes from {describe(producer)}, not {self.op_text}", producer)
        if value.index != self.output:
            return fail(f"{where} %{value.name} is output {value.index} of {describe(producer)}, "
                        f"expected output {self.output}", value)
        failure = self._match_node(producer, state, root)
        if failure is None and self.name:
            state.outputs[self.name] = value
        return failure

    def _match_node(self, node: Node, state: _State, root: Node) -> Optional[Failure]:
        if node.op_type not in self.op_types:
            return fail(f"{describe(node)} is not {self.op_text}", node)
        if self.domain is not None and _domain(node.domain) != _domain(self.domain):
            return fail(f"{describe(node)} is in domain {node.domain!r}, expected {self.domain or 'ai.onnx'!r}", node)
        failure = state.bind(self.name, node, describe(node))
        if failure is not None:
            return failure
        if node not in state.nodes:
            state.nodes.append(node)
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if len(inputs) < len(self.inputs) or (len(inputs) > len(self.inputs) and not self.extra_inputs):
            return fail(f"{describe(node)} has {_count(len(inputs), 'input')}, "
                        f"the pattern {self} takes {len(self.inputs)}", node)
        if not self.commutative:
            return self._match_inputs(node, inputs, self.inputs, state, root)
        trial = state.copy()
        first = self._match_inputs(node, inputs, self.inputs, trial, root)
        if first is None:
            _adopt(state, trial)
            return None
        trial = state.copy()
        if self._match_inputs(node, inputs, self.inputs[::-1], trial, root) is None:
            _adopt(state, trial)
            return None
        return first

    def _match_inputs(self, node, inputs, patterns, state, root) -> Optional[Failure]:
        for i, p in enumerate(patterns):
            failure = p._match_value(inputs[i], state, f"input {i} of {describe(node)}", root)
            if failure is not None:
                return failure
        return None

    def __str__(self) -> str:
        args = ", ".join(str(p) for p in self.inputs)
        if self.extra_inputs:
            args += ", ..." if args else "..."
        label = f"{self.name}=" if self.name else ""
        return f"{label}{self.op_text}({args})"

    def __repr__(self) -> str:
        return f"<pattern {self}>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _adopt(state: _State, trial: _State) -> None:
    state.captures, state.outputs = trial.captures, trial.outputs
    state.nodes, state.constants = trial.nodes, trial.constants
