"""Graphs: inputs, outputs, initializers and nodes kept in topological order.

Mutation is safe by construction: `remove` refuses a node whose outputs are still used
(and names the users), `Value.replace_all_uses_with` moves every use in one call, and
new values get unique names. Graph algorithms go through networkx (`to_networkx`).
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Optional, Set

import networkx as nx

from .node import Node
from .tensor import Tensor
from .value import Value

__all__ = ["Graph", "CycleError"]


class CycleError(ValueError):
    """The graph has a cycle, so no topological order exists."""


class Graph:
    """A (sub)graph. Subgraphs (If/Loop/Scan bodies) have `parent` set to their node."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.doc_string = ""
        self.metadata_props: Dict[str, str] = {}
        self.inputs: List[Value] = []
        self.outputs: List[Value] = []
        self.initializers: Dict[str, Value] = {}
        # name -> (Value, SparseTensorProto): sparse constants, kept as imported
        self.sparse_initializers: Dict[str, tuple] = {}
        self.quantization_annotation: list = []  # TensorAnnotation, kept as is
        # How the imported GraphProto declared its values (value_info order, repeated
        # declarations), kept by qcompile.onnx_io so export writes them back; None for
        # graphs built in Python. Passes need not maintain it.
        self.onnx_declarations = None
        self.parent: Optional[Node] = None
        self._nodes: List[Node] = []
        self._names: Optional[Set[str]] = None
        self._counter = itertools.count()

    # -- nodes -----------------------------------------------------------------------
    @property
    def nodes(self) -> tuple:
        """Nodes in order (a snapshot: safe to mutate the graph while iterating it)."""
        return tuple(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(tuple(self._nodes))

    def append(self, node: Node) -> Node:
        """Add `node` at the end."""
        self._adopt(node)
        self._nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        """Insert `node` just before `anchor`."""
        index = self._position(anchor)
        self._adopt(node)
        self._nodes.insert(index, node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        """Insert `node` just after `anchor`."""
        index = self._position(anchor)
        self._adopt(node)
        self._nodes.insert(index + 1, node)
        return node

    def remove(self, node: Node, safe: bool = True) -> None:
        """Remove `node`. With `safe` (the default) a node whose outputs are still used
        by other nodes or are graph outputs is refused, naming those users."""
        if node._graph is not self:
            raise ValueError(f"node {node.label} is not in graph '{self.name}'")
        if safe:
            users = [u for v in node.outputs for u in v.users if u is not node]
            outs = [v.name for v in node.outputs if any(o is v for o in self.outputs)]
            if users or outs:
                parts = []
                if users:
                    parts.append("used by " + ", ".join(u.label for u in users))
                if outs:
                    parts.append("its outputs " + ", ".join(f"%{n}" for n in outs) + " are graph outputs")
                raise ValueError(
                    f"cannot remove node {node.label}: {'; '.join(parts)}; "
                    "redirect them first with Value.replace_all_uses_with"
                )
        node.clear_inputs()
        self._set_captured_uses(node, present=False)
        self._nodes.remove(node)
        node._graph = None

    @staticmethod
    def _set_captured_uses(node: Node, present: bool) -> None:
        """Add or drop the uses that nodes inside `node`'s subgraphs hold on values of
        enclosing graphs, so a removed If/Loop body no longer keeps outer values alive
        (and re-inserting the node restores them). The inner input lists stay as they are."""
        inner_graphs = {id(g) for sub in node.subgraphs() for g in sub.walk()}
        for sub in node.subgraphs():
            for inner in sub.all_nodes():
                for i, v in enumerate(inner.inputs):
                    if v is None:
                        continue
                    owner = v.owning_graph()
                    if owner is None or id(owner) not in inner_graphs:
                        if present:
                            v._add_use(inner, i)
                        else:
                            v._remove_use(inner, i)

    def _position(self, anchor: Node) -> int:
        if anchor._graph is not self:
            raise ValueError(f"node {anchor.label} is not in graph '{self.name}'")
        return self._nodes.index(anchor)

    def _adopt(self, node: Node) -> None:
        if node._graph is not None:
            raise ValueError(f"node {node.label} already belongs to graph '{node._graph.name}'")
        node._graph = self
        for v in node.outputs:
            if not v.name:
                v.name = self.unique_name(node.op_type.lower())
            else:
                self._root()._known_names().add(v.name)
        for g in node.subgraphs():
            g.parent = node
        self._set_captured_uses(node, present=True)

    # -- values ----------------------------------------------------------------------
    def add_input(self, value: Value) -> Value:
        value._graph = self
        self.inputs.append(value)
        self._root()._known_names().add(value.name)
        return value

    def add_initializer(self, value: Value) -> Value:
        """Register a constant value; its `const` must be set."""
        if value.const is None:
            raise ValueError(f"initializer %{value.name} has no constant data")
        if value.name in self.initializers and self.initializers[value.name] is not value:
            raise ValueError(f"graph '{self.name}' already has an initializer named {value.name!r}")
        value._graph = self
        self.initializers[value.name] = value
        self._root()._known_names().add(value.name)
        return value

    def make_constant(self, array, name: str = "const") -> Value:
        """A new initializer holding `array`, with a unique name based on `name`."""
        value = Value(self.unique_name(name), const=Tensor(array))
        from .types import TensorType

        value.type = TensorType(value.const.dtype, value.const.shape)
        return self.add_initializer(value)

    def remove_initializer(self, name: str) -> None:
        value = self.initializers.get(name)
        if value is None:
            raise KeyError(f"graph '{self.name}' has no initializer {name!r}")
        if value.uses:
            raise ValueError(
                f"cannot remove initializer %{name}: used by " + ", ".join(u.label for u in value.users)
            )
        del self.initializers[name]
        if not value.is_graph_input:
            value._graph = None

    def add_output(self, value: Value) -> None:
        self.outputs.append(value)

    def replace_output(self, old: Value, new: Value) -> None:
        """Make graph outputs that are `old` be `new`."""
        self.outputs = [new if v is old else v for v in self.outputs]

    def values(self) -> Iterator[Value]:
        """Every value defined in this graph: inputs, initializers, node outputs."""
        seen: Set[int] = set()
        sparse = (v for v, _ in self.sparse_initializers.values())
        for v in itertools.chain(self.inputs, self.initializers.values(), sparse):
            if id(v) not in seen:
                seen.add(id(v))
                yield v
        for n in self._nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        """The value called `name` (KeyError naming near misses when absent)."""
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"graph '{self.name}' has no value named {name!r}")

    def unique_name(self, prefix: str) -> str:
        """A value name not used anywhere in this graph or its sub/parent graphs."""
        names = self._root()._known_names()
        prefix = prefix or "v"
        while True:
            candidate = f"{prefix}_{next(self._counter)}"
            if candidate not in names:
                names.add(candidate)
                return candidate

    def _root(self) -> "Graph":
        g = self
        while g.parent is not None and g.parent.graph is not None:
            g = g.parent.graph
        return g

    def _known_names(self) -> Set[str]:
        if self._names is None:
            self._names = {v.name for g in self.walk() for v in g.values()}
        return self._names

    # -- traversal -------------------------------------------------------------------
    def walk(self) -> Iterator["Graph"]:
        """This graph and all its subgraphs, depth first."""
        yield self
        for n in self._nodes:
            for g in n.subgraphs():
                yield from g.walk()

    def all_nodes(self) -> Iterator[Node]:
        """Nodes of this graph and of every subgraph."""
        for g in self.walk():
            yield from g._nodes

    def captured_values(self, node: Node) -> List[Value]:
        """Values of this graph that `node`'s subgraphs read from the outer scope."""
        found: Dict[int, Value] = {}
        for sub in node.subgraphs():
            for inner in sub.all_nodes():
                for v in inner.inputs:
                    if v is not None and v.owning_graph() is self:
                        found[id(v)] = v
        return list(found.values())

    def to_networkx(self) -> nx.DiGraph:
        """Data-dependence graph of this graph's nodes (edge producer -> consumer),
        including reads from inside subgraphs. Nodes are indexed by position."""
        index = {id(n): i for i, n in enumerate(self._nodes)}
        g = nx.DiGraph()
        for i, n in enumerate(self._nodes):
            g.add_node(i, node=n)
        for i, n in enumerate(self._nodes):
            sources = [v for v in n.inputs if v is not None]
            if n.attributes:
                sources += self.captured_values(n)
            for v in sources:
                p = v.producer
                if p is not None and id(p) in index:
                    g.add_edge(index[id(p)], i, value=v.name)
        return g

    def find_cycle(self) -> Optional[List[Node]]:
        """The nodes of one cycle, or None when the graph is acyclic."""
        g = self.to_networkx()
        try:
            edges = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            return None
        return [g.nodes[u]["node"] for u, _ in edges]

    def is_sorted(self) -> bool:
        """True when every node comes after the producers of its inputs."""
        pos = {id(n): i for i, n in enumerate(self._nodes)}
        g = self.to_networkx()
        return all(u < v for u, v in g.edges) and len(pos) == len(self._nodes)

    def sort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is free
        (stable). Raises CycleError naming the nodes of a cycle."""
        g = self.to_networkx()
        try:
            order = list(nx.lexicographical_topological_sort(g))
        except nx.NetworkXUnfeasible:
            cycle = self.find_cycle() or []
            raise CycleError(
                f"graph '{self.name}' has a cycle: " + " -> ".join(n.label for n in cycle + cycle[:1])
            ) from None
        self._nodes = [self._nodes[i] for i in order]

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self._nodes)} nodes)"

