"""Rewrite rules: a name, a pattern, a check and a rewrite, three small things.

    PATTERN = Op("Identity", Var("x"), name="identity")

    def check(m: Match):
        return True                      # or fail("why not", *culprits)

    def rewrite(m: Match, graph: Graph):
        return m["x"]                    # what replaces the root's outputs

    RULE = Rule("eliminate-identity", PATTERN, rewrite, check=check)

`rewrite` builds any new nodes with `m.emit(...)` (inserted before the root) and returns
the values that replace the root's outputs: one Value, or a sequence with one entry per
output, None for an output nobody uses. The driver moves the uses, keeps graph output
names, and removes the matched nodes nobody uses any more.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..ir.graph import Graph
from ..ir.node import Node
from ..ir.value import Value
from .match import Failure, Match, describe
from .pattern import Op

__all__ = ["Rule"]

CheckFn = Callable[[Match], Union[bool, Failure]]
RewriteFn = Callable[[Match, Graph], Union[Value, Sequence[Optional[Value]]]]


class Rule:
    """A named rewrite: `pattern` (an Op rooted at the node to replace), `check`
    (optional; True or a Failure), `rewrite` (builds the replacement). `doc` defaults
    to the first line of the rewrite function's docstring."""

    def __init__(self, name: str, pattern: Op, rewrite: RewriteFn, check: Optional[CheckFn] = None,
                 doc: Optional[str] = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a rule needs a non-empty name, got {name!r}")
        if not isinstance(pattern, Op):
            raise TypeError(f"rule {name!r}: the pattern must be rooted at an Op, got {pattern!r}")
        if not callable(rewrite) or (check is not None and not callable(check)):
            raise TypeError(f"rule {name!r}: rewrite and check must be functions")
        _check_captures(name, pattern)
        self.name = name
        self.pattern = pattern
        self.check = check
        self.rewrite = rewrite
        if doc is None:
            text = inspect.cleandoc(rewrite.__doc__ or "")
            doc = text.splitlines()[0] if text else ""
        self.doc = doc

    @property
    def root_types(self) -> Tuple[str, ...]:
        """The op types a root node can have (what rule sets index by)."""
        return self.pattern.op_types

    def match(self, node: Node, opset: Optional[int] = None) -> Union[Match, Failure]:
        """Match the pattern at `node` and run the check: a Match, or a Failure whose
        `stage` says which of the two refused."""
        found = self.pattern.match(node, opset)
        if isinstance(found, Failure):
            return dataclasses.replace(found, stage="pattern")
        verdict = True if self.check is None else self.check(found)
        if isinstance(verdict, np.bool_):
            verdict = bool(verdict)
        if isinstance(verdict, Failure):
            return dataclasses.replace(verdict, stage="check")
        if verdict is False:
            return Failure(f"the check of rule {self.name!r} refused {describe(node)}", (node,), "check")
        if verdict is not True:
            raise TypeError(f"bug in rule {self.name!r}: check returned {verdict!r}; return True or fail(reason)")
        return found

    def replacements(self, match: Match) -> List[Optional[Value]]:
        """Run the rewrite; one replacement per root output (None: output unused)."""
        result = self.rewrite(match, match.graph)
        n = len(match.root.outputs)
        if isinstance(result, Value):
            result = [result]
        elif isinstance(result, (list, tuple)):
            result = list(result)
        else:
            raise TypeError(f"bug in rule {self.name!r}: rewrite returned {result!r}; return a Value "
                            "or a list of Values (None for unused outputs)")
        if len(result) > n:
            raise TypeError(f"bug in rule {self.name!r}: rewrite returned {len(result)} values for "
                            f"{describe(match.root)}, which has {n} outputs")
        return result + [None] * (n - len(result))

    def __str__(self) -> str:
        return f"{self.name}: {self.pattern}"

    def __repr__(self) -> str:
        return f"<Rule {self.name}>"


def _check_captures(rule: str, pattern: Op) -> None:
    """A name captures either values (Var/Const, repeats meaning the same value) or
    one node (a single Op)."""
    kinds = {}
    for name, kind in pattern.capture_names():
        if kinds.setdefault(name, kind) != kind:
            raise ValueError(f"rule {rule!r}: {name!r} names both a node and a value in the pattern; rename one")
    ops = [name for name, kind in pattern.capture_names() if kind == "node"]
    for name in set(ops):
        if ops.count(name) > 1:
            raise ValueError(f"rule {rule!r}: two Op patterns are both named {name!r}; rename one")
