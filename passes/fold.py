"""The `fold` pass: simplify a float graph before quantization, to a fixed point.

    qcompile model.onnx --passes fold{max_iterations=8,fold_limit_bytes=4194304,cse=false}

Each iteration runs, in order:
  1. shape inference (qcompile.analysis.infer_shapes), which later steps read;
  2. constant folding (constant_folding.py): maximal constant subgraphs evaluated by
     onnxruntime in one session, Shape/Size of static shapes, results as initializers;
  3. the FOLD rule set (passes/rules): Identity/Dropout, Conv+BatchNormalization,
     Gemm/MatMul+BatchNormalization, MatMul+Add -> Gemm, no-op Reshape, Transpose,
     Cast, Expand, Pad, Slice, Concat, Unsqueeze/Squeeze pairs, Sum -> Add;
  4. common-subexpression elimination (cse.py), unless `cse=false`;
  5. dead-code elimination (the `dce` pass: unused nodes and initializers).
It stops when an iteration changes nothing, or after `max_iterations` (with a warning),
and ends with shape inference so every value is typed. `stats` counts per component
(`constant-folding: nodes folded`, `rule fold-conv-bn`, `cse: nodes merged`,
`dce: nodes removed`, ...) and `nodes before` / `nodes after`.
"""
from __future__ import annotations

import warnings

from qcompile.analysis import infer_shapes
from qcompile.ir import Model
from qcompile.passmanager import Pass, PassResult, option, register_pass
from qcompile.rewrite import apply_rules

from .constant_folding import fold_constants
from .cse import eliminate_common_subexpressions
from .dce import DeadCodeElimination
from .rules import FOLD

__all__ = ["Fold"]


@register_pass("fold")
class Fold(Pass):
    """Fold constants and BatchNormalization, remove no-ops, dead code and duplicates, infer shapes.

    Repeats shape inference, constant folding (onnxruntime evaluates constant
    subgraphs), the FOLD rules (qcompile.passes.rules), common-subexpression
    elimination and dead-code elimination until nothing changes.
    """

    in_place = True
    max_iterations: int = option(10, "fixed-point iteration limit", choices=range(1, 1001))
    fold_limit_bytes: int = option(16 << 20, "never materialise a folded constant larger than this",
                                   choices=range(0, 1 << 50))
    cse: bool = option(True, "merge duplicate nodes and initializers")
    disable: list = option((), "rules not to run", choices=FOLD.names)

    def run(self, model: Model) -> PassResult:
        rules = FOLD.without(*self.disable)
        before = len(model.graph)
        modified = False
        converged = False
        for _ in range(self.max_iterations):
            self.stats["iterations"] += 1
            if self._iterate(model, rules):
                modified = True
            else:
                converged = True
                break
        if not converged:
            infer_shapes(model)
            warnings.warn(f"fold: still changing after {self.max_iterations} iterations; "
                          "raise max_iterations to reach a fixed point", stacklevel=2)
        self.stats["nodes before"] = before
        self.stats["nodes after"] = len(model.graph)
        return PassResult(model, modified)

    def _iterate(self, model: Model, rules) -> bool:
        """One round of the five steps; True when the graph changed."""
        infer_shapes(model)
        folded = fold_constants(model, self.fold_limit_bytes)
        if folded.error:
            warnings.warn(f"fold: onnxruntime could not evaluate the constant subgraphs, "
                          f"nothing folded this round: {folded.error}", stacklevel=3)
        self._count("constant-folding", nodes_folded=folded.nodes_folded,
                    values_folded=folded.values_folded, shapes_folded=folded.shapes_folded)
        report = apply_rules(model, rules, max_iterations=self.max_iterations)
        for rule, n in report.counts.items():
            self.stats[f"rule {rule}"] += n
        merged = eliminate_common_subexpressions(model) if self.cse else None
        if merged is not None:
            self._count("cse", nodes_merged=merged.nodes_merged, initializers_merged=merged.initializers_merged)
        dce = DeadCodeElimination()
        dead = dce(model).modified
        for key, n in dce.stats.items():
            self.stats[f"dce: {key}"] += n
        return folded.changed or bool(report.fired) or (merged is not None and merged.changed) or dead

    def _count(self, component: str, **counts: int) -> None:
        for key, n in counts.items():
            if n:
                self.stats[f"{component}: {key.replace('_', ' ')}"] += n
