"""The fixed-point driver: sweep the graph, rewrite where a rule matches, repeat until
a sweep changes nothing.

Each sweep walks a snapshot of the nodes in order and skips nodes removed meanwhile.
At each node it tries the rules indexed under the node's op type, in rule-set order;
the first that matches and passes its check rewrites, and the sweep moves on. After a
rewrite the driver
  * moves every use of the root's outputs to the replacements;
  * keeps the graph's interface: a graph output keeps its name (the replacement is
    renamed, or fed through an Identity when it is an input, an initializer, a value
    of an enclosing graph or already another output);
  * removes the matched nodes nobody uses any more (a matched node with other users
    stays), then the initializers only they used.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Union

from ..ir.graph import Graph
from ..ir.model import Model
from ..ir.node import Node
from ..ir.value import Value
from .match import Failure, Match, describe
from .report import Firing, Miss, RewriteReport
from .rule import Rule
from .ruleset import RuleSet

__all__ = ["apply_rules"]


def apply_rules(ir: Union[Model, Graph], rules: Union[RuleSet, Rule, Iterable[Rule]], *,
                max_iterations: int = 10, explain: bool = False, subgraphs: bool = True) -> RewriteReport:
    """Rewrite `ir` (a Model, or a Graph) in place with `rules` until nothing matches or
    `max_iterations` sweeps have run. With `subgraphs`, If/Loop/Scan bodies are
    rewritten too. With `explain`, the report lists why each rule tried in the last
    sweep did not match. Rules see the model's default opset (None for a bare Graph)."""
    if isinstance(ir, Model):
        graph, opset = ir.graph, ir.opset
    elif isinstance(ir, Graph):
        graph, opset = ir, None
    else:
        raise TypeError(f"apply_rules rewrites a qcompile Model or Graph, not {type(ir).__name__}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    ruleset = _as_ruleset(rules)
    report = RewriteReport(ruleset.name)
    touched: List[Graph] = []
    for iteration in range(1, max_iterations + 1):
        report.iterations = iteration
        before = len(report.fired)
        misses: List[Miss] = []
        for g in (list(graph.walk()) if subgraphs else [graph]):
            if _alive(g, graph) and _sweep(g, ruleset, opset, iteration, report, misses if explain else None):
                if g not in touched:
                    touched.append(g)
        report.misses = misses
        if len(report.fired) == before:
            report.converged = True
            break
    for g in touched:
        if _alive(g, graph) and not g.is_sorted():
            g.sort()
    return report


def _as_ruleset(rules) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Rule):
        return RuleSet(rules.name, [rules])
    try:
        items = list(rules)
    except TypeError:
        raise TypeError(f"apply_rules takes a RuleSet, a Rule or Rules, not {type(rules).__name__}") from None
    return RuleSet("rules", items)


def _alive(g: Graph, top: Graph) -> bool:
    """False when `g` hangs off a node that has been removed."""
    while g is not top:
        if g.parent is None or g.parent.graph is None:
            return False
        g = g.parent.graph
    return True


def _sweep(g: Graph, ruleset: RuleSet, opset: Optional[int], iteration: int, report: RewriteReport,
           misses: Optional[List[Miss]]) -> bool:
    """One pass over a snapshot of `g`'s nodes; True when a rule fired."""
    fired = False
    for node in g.nodes:
        if node.graph is not g:  # removed by an earlier rewrite of this sweep
            continue
        for rule in ruleset.for_op(node.op_type):
            result = rule.match(node, opset)
            if isinstance(result, Failure):
                if misses is not None:
                    misses.append(_miss(rule, node, g, result))
                continue
            where = describe(node)
            _apply(rule, result)
            report.fired.append(Firing(rule.name, where, g.name, iteration))
            fired = True
            break
    return fired


def _miss(rule: Rule, node: Node, g: Graph, failure: Failure) -> Miss:
    return Miss(rule.name, describe(node), node.name, tuple(v.name for v in node.outputs), g.name,
                failure.stage, failure.reason, tuple(describe(c) for c in failure.culprits))


def _apply(rule: Rule, match: Match) -> None:
    """Rewrite one match: replace the root's outputs, keep output names, clean up."""
    root, g = match.root, match.graph
    for old, new in zip(root.outputs, rule.replacements(match)):
        positions = [i for i, o in enumerate(g.outputs) if o is old]
        if new is None:
            if old.uses or positions:
                raise RuntimeError(f"bug in rule {rule.name!r}: it replaced %{old.name} of {describe(root)} "
                                   "with nothing, but the value is still used")
            continue
        if new is old:
            raise RuntimeError(f"bug in rule {rule.name!r}: it replaced %{old.name} with itself")
        if new.type is None:
            new.type = old.type
        old.replace_all_uses_with(new)
        if positions:
            _keep_output_name(g, old, new, positions, match)
    _remove_dead(match)


def _keep_output_name(g: Graph, old: Value, new: Value, positions: List[int], match: Match) -> None:
    """Graph outputs at `positions` now hold `new`; give them `old`'s name back."""
    name = old.name
    old.name = g.unique_name(name)
    only_here = sum(1 for o in g.outputs if o is new) == len(positions)
    if new.producer is not None and new.producer.graph is g and only_here:
        new.name = name
        return
    out = match.emit("Identity", [new]).outputs[0]
    out.name, out.type = name, old.type
    g.outputs = [out if i in positions else o for i, o in enumerate(g.outputs)]


def _remove_dead(match: Match) -> None:
    """Remove the matched nodes (and Constant nodes) that no one uses any more, then
    the initializers that only they read."""
    g = match.graph
    candidates = list(match.nodes) + list(match.constant_nodes)
    read: List[Value] = []
    changed = True
    while changed:
        changed = False
        for n in candidates:
            if n.graph is g and not any(v.uses or any(o is v for o in g.outputs) for v in n.outputs):
                read += [v for v in n.inputs if v is not None]
                g.remove(n)
                changed = True
    for v in dict.fromkeys(read):
        owner = v.owning_graph()
        if (v.is_initializer and not v.uses and not v.is_graph_input
                and not any(o is v for o in owner.outputs)):
            owner.remove_initializer(v.name)
