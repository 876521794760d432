"""The IR verifier: an ordinary function run after every pass by default.

Each problem is reported with what is wrong, where, and how to fix it. `verify`
returns the list of problems; `check` raises VerificationError listing them all.
"""
from __future__ import annotations

import collections
from typing import Dict, List, MutableMapping, Set

from .graph import Graph
from .model import Model
from .node import Node
from .value import Value

__all__ = ["VerificationError", "verify", "check"]


class VerificationError(ValueError):
    """The IR is malformed. `problems` holds one message per problem."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems[:5])
        if len(problems) > 5:
            head += f"; ... and {len(problems) - 5} more"
        super().__init__(head)


def verify(ir) -> List[str]:
    """Check a Model or Graph; return one message per problem (empty when well formed)."""
    problems: List[str] = []
    if isinstance(ir, Model):
        graph = ir.graph
        _check_domains(ir, problems)
    else:
        graph = ir
    names: Dict[str, Value] = {}
    _check_graph(graph, [], names, problems)
    return problems


def check(ir) -> None:
    """Raise VerificationError when `verify` finds problems."""
    problems = verify(ir)
    if problems:
        raise VerificationError(problems)


def _check_domains(model: Model, problems: List[str]) -> None:
    missing: Dict[str, str] = {}
    imported = set(model.opset_imports) | ({""} if "ai.onnx" in model.opset_imports else set())
    for n in model.graph.all_nodes():
        domain = "" if n.domain == "ai.onnx" else n.domain
        if domain not in imported:
            missing.setdefault(domain, n.label)
    for domain, label in missing.items():
        problems.append(
            f"node {label} uses domain {domain or 'ai.onnx'!r}, which the model does not import: "
            f"add it to model.opset_imports"
        )


def _check_graph(g: Graph, outer: List[Set[int]], names: MutableMapping[str, Value],
                 problems: List[str]) -> None:
    where = f"graph '{g.name}'"
    defined: Set[int] = set()

    def define(v: Value, what: str, may_be_absent: bool = False) -> None:
        if not v.name:
            if may_be_absent and not v.uses and not any(o is v for o in g.outputs):
                return  # an omitted optional output
            problems.append(f"{where}: {what} has an empty name: give it one with graph.unique_name()")
        elif v.name in names and names[v.name] is not v:
            problems.append(
                f"{where}: the name %{v.name} is defined twice ({what} and an earlier value): "
                "a name may be defined once in a graph and not again in its subgraphs; rename one"
            )
        names[v.name] = v
        defined.add(id(v))

    for v in g.inputs:
        define(v, f"input %{v.name}")
    for name, v in g.initializers.items():
        if v.name != name:
            problems.append(f"{where}: initializer registered as {name!r} is named %{v.name}: keep the two equal")
        if v.const is None:
            problems.append(f"{where}: initializer %{name} has no constant data: set value.const")
        if id(v) not in defined:
            define(v, f"initializer %{name}")

    for name, (v, _) in g.sparse_initializers.items():
        define(v, f"sparse initializer %{name}")

    later: Dict[int, Node] = {id(v): n for n in g.nodes for v in n.outputs}
    scopes = outer + [defined]
    cycle_reported = False
    for n in g.nodes:
        if n.graph is not g:
            problems.append(f"{where}: node {n.label} is listed but belongs to another graph: insert it with graph.append")
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if (n, i) not in v._uses:
                problems.append(f"node {n.label}: input {i} %{v.name} does not list the node among its uses: set inputs with node.set_input (internal bug if a pass did so)")
            if not any(id(v) in s for s in scopes):
                producer = later.get(id(v))
                if producer is not None:
                    if not cycle_reported and g.find_cycle() is not None:
                        cycle = g.find_cycle()
                        problems.append(
                            f"{where} has a cycle: " + " -> ".join(c.label for c in cycle + cycle[:1])
                            + ": break it; no order can satisfy these nodes"
                        )
                        cycle_reported = True
                    elif not cycle_reported:
                        problems.append(
                            f"node {n.label}: input {i} %{v.name} is used before node {producer.label} defines it: "
                            "call graph.sort() to restore topological order"
                        )
                else:
                    problems.append(
                        f"node {n.label}: input {i} %{v.name} is not defined in {where} or an enclosing graph: "
                        "add it as a graph input or initializer, or connect it to the node that computes it"
                    )
        for j, v in enumerate(n.outputs):
            if v.producer is not n or v.index != j:
                problems.append(f"node {n.label}: output {j} %{v.name} names another producer (internal bug)")
            define(v, f"output {j} of node {n.label}", may_be_absent=True)
            for user, k in v.uses:
                if k >= len(user.inputs) or user.inputs[k] is not v:
                    problems.append(f"value %{v.name}: stale use by node {user.label} input {k} (internal bug: a use list was edited by hand)")
        for sub in n.subgraphs():
            if sub.parent is not n:
                problems.append(f"node {n.label}: subgraph '{sub.name}' does not point back to its node (internal bug)")
            # a subgraph sees the names defined so far; sibling subgraphs may reuse names, as in ONNX
            _check_graph(sub, scopes, collections.ChainMap({}, names), problems)
    for i, v in enumerate(g.outputs):
        if not any(id(v) in s for s in scopes):
            problems.append(
                f"{where}: output {i} %{v.name} is not defined by any input, initializer or node: "
                "connect it to the value that computes it"
            )
