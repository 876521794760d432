"""`dce`: dead-code elimination.

Removes, in every graph (subgraphs of If/Loop/Scan included):
  1. nodes none of whose outputs is read by any node (of this graph or of a subgraph
     that captures it) or is an output of the graph; repeated until nothing changes,
     so whole dead chains go;
  2. initializers (dense and sparse) that nothing reads and that are not graph outputs.

Deliberately kept:
  * nodes of custom domains (not ai.onnx / ai.onnx.ml): their semantics are unknown
     and might have side effects; `aggressive=true` removes them too;
  * nodes without outputs (they exist only for a side effect), unless aggressive;
  * graph inputs, even unused ones (they are the model's interface, and subgraph
     inputs are fixed by their op), and initializers that are also graph inputs;
  * unused outputs of a live multi-output node (the node is needed anyway).
"""
from __future__ import annotations

from typing import List

from qcompile.ir import Graph, Model, Node
from qcompile.passmanager import Pass, PassResult, option, register_pass

__all__ = ["DeadCodeElimination", "STANDARD_DOMAINS"]

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and unused initializers."""

    in_place = True
    aggressive: bool = option(False, "also remove unused nodes of custom domains and nodes without outputs")

    def run(self, model: Model) -> PassResult:
        changed = True
        while changed:  # a fixpoint; one post-order sweep usually gets there
            changed = self._sweep(model.graph)
        for g in list(model.graph.walk()):
            self._drop_initializers(g)
        modified = bool(self.stats["nodes removed"] or self.stats["initializers removed"])
        return PassResult(model, modified)

    def _sweep(self, graph: Graph) -> bool:
        """Remove dead nodes of `graph`, subgraphs first (their dead nodes may be the
        last readers of values of this graph), then this graph's nodes last to first."""
        changed = False
        for node in graph.nodes:
            for sub in node.subgraphs():
                changed |= self._sweep(sub)
        for node in reversed(graph.nodes):
            if self._is_dead(node, graph):
                graph.remove(node)
                self.stats["nodes removed"] += 1
                changed = True
        return changed

    def _is_dead(self, node: Node, graph: Graph) -> bool:
        if not self.aggressive and (node.domain not in STANDARD_DOMAINS or not node.outputs):
            return False
        outputs = {id(v) for v in graph.outputs}
        return all(not v.uses and id(v) not in outputs for v in node.outputs)

    def _drop_initializers(self, graph: Graph) -> None:
        outputs = {id(v) for v in graph.outputs}
        inputs = {id(v) for v in graph.inputs}
        dead: List[str] = [
            name for name, v in graph.initializers.items()
            if not v.uses and id(v) not in outputs and id(v) not in inputs
        ]
        for name in dead:
            graph.remove_initializer(name)
        sparse_dead = [
            name for name, (v, _) in graph.sparse_initializers.items()
            if not v.uses and id(v) not in outputs and id(v) not in inputs
        ]
        for name in sparse_dead:
            del graph.sparse_initializers[name]
        if dead or sparse_dead:
            self.stats["initializers removed"] += len(dead) + len(sparse_dead)
