"""The pattern rewriter: rules as pattern + check + rewrite, rule sets that compose with
`+`, and a fixed-point driver that reports which rules fired and why others did not.

    from qcompile.rewrite import Const, Op, Rule, RuleSet, Var, apply_rules, fail

    PATTERN = Op("Add", Op("MatMul", Var("a"), Const("b"), name="mm"), Const("c"), name="add")

    def check(m):
        return len(m.value("mm").uses) == 1 or fail("the product has other users", m["mm"])

    def rewrite(m, graph):
        return m.emit("Gemm", [m["a"], m["b"], m["c"]]).output

    rules = RuleSet("mine", [Rule("fuse-matmul-add", PATTERN, rewrite, check=check)])
    report = apply_rules(model, rules, explain=True)
    print(report)          # which rules fired where; why the others did not match
"""
from .driver import apply_rules
from .match import Failure, Match, constant_value, fail
from .pattern import Const, Op, Pattern, Var
from .report import Firing, Miss, RewriteReport
from .rule import Rule
from .ruleset import RuleSet

__all__ = [
    "Const", "Failure", "Firing", "Match", "Miss", "Op", "Pattern", "RewriteReport", "Rule", "RuleSet", "Var",
    "apply_rules", "constant_value", "fail",
]
