"""The `canonicalize` pass: run the CANONICALIZE rule set to a fixed point.

    qcompile model.onnx --passes canonicalize{max_iterations=20,disable=fold-conv-bn}
"""
from __future__ import annotations

import warnings

from qcompile.ir import Model
from qcompile.passmanager import Pass, PassResult, option, register_pass
from qcompile.rewrite import apply_rules

from .rules import CANONICALIZE

__all__ = ["Canonicalize"]


@register_pass("canonicalize")
class Canonicalize(Pass):
    """Remove Identity/inference Dropout, fold Conv+BatchNormalization, fuse MatMul+Add into Gemm.

    Runs the rules of qcompile.passes.rules.CANONICALIZE (each module's docstring lists
    the cases it rewrites and the ones it leaves alone) until none matches, in the main
    graph and in If/Loop/Scan bodies. `stats` counts the rewrites per rule.
    """

    in_place = True
    max_iterations: int = option(10, "fixed-point iteration limit", choices=range(1, 10_001))
    disable: list = option((), "rules not to run", choices=CANONICALIZE.names)

    def run(self, model: Model) -> PassResult:
        rules = CANONICALIZE.without(*self.disable)
        report = apply_rules(model, rules, max_iterations=self.max_iterations)
        for rule, n in report.counts.items():
            self.stats[rule] += n
        if not report.converged:
            warnings.warn(f"canonicalize: rules still fired after {report.iterations} sweeps; "
                          "raise max_iterations to reach a fixed point", stacklevel=2)
        return PassResult(model, modified=bool(report.fired))
