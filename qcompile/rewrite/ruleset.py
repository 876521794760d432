"""Rule sets: named, ordered collections of rules, composed with `+`.

    CANONICALIZE = IDENTITY + CONV_BN + MATMUL_ADD
    CANONICALIZE.without("fold-conv-bn")

A rule set is plain data. It indexes its rules by root op type, so the driver only
tries, at each node, the rules whose pattern can be rooted there.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, Iterator, List, Tuple, Union

from .rule import Rule

__all__ = ["RuleSet"]


class RuleSet:
    """An ordered set of rules with unique names. Earlier rules are tried first."""

    def __init__(self, name: str, rules: Iterable[Rule] = ()):
        self.name = name
        unique: List[Rule] = []
        by_name: Dict[str, Rule] = {}
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rule set {name!r}: {rule!r} is not a Rule")
            old = by_name.get(rule.name)
            if old is rule:
                continue
            if old is not None:
                raise ValueError(f"rule set {name!r}: two different rules are named {rule.name!r}; rename one")
            by_name[rule.name] = rule
            unique.append(rule)
        self.rules: Tuple[Rule, ...] = tuple(unique)
        self._by_name = by_name
        index: Dict[str, List[Rule]] = {}
        for rule in unique:
            for op in rule.root_types:
                index.setdefault(op, []).append(rule)
        self._index = {op: tuple(rs) for op, rs in index.items()}

    def for_op(self, op_type: str) -> Tuple[Rule, ...]:
        """The rules whose pattern can be rooted at a node of `op_type`, in order."""
        return self._index.get(op_type, ())

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def __add__(self, other: Union["RuleSet", Rule]) -> "RuleSet":
        if isinstance(other, Rule):
            return RuleSet(f"{self.name}+{other.name}", self.rules + (other,))
        if isinstance(other, RuleSet):
            return RuleSet(f"{self.name}+{other.name}", self.rules + other.rules)
        return NotImplemented

    def without(self, *names: str) -> "RuleSet":
        """This set less the named rules (a KeyError names the valid ones)."""
        for n in names:
            self[n]  # raises for an unknown name
        kept = [r for r in self.rules if r.name not in names]
        return RuleSet(f"{self.name} without {', '.join(names)}" if names else self.name, kept)

    def __getitem__(self, name: str) -> Rule:
        rule = self._by_name.get(name)
        if rule is None:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"rule set {self.name!r} has no rule {name!r}{hint} (rules: {', '.join(self.names)})")
        return rule

    def __contains__(self, item: Union[str, Rule]) -> bool:
        if isinstance(item, Rule):
            return self._by_name.get(item.name) is item
        return item in self._by_name

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __str__(self) -> str:
        """One line per rule: `name: pattern`."""
        return "\n".join([f"rule set {self.name} ({len(self)} rules)"] + [f"  {r}" for r in self.rules])

    def __repr__(self) -> str:
        return f"<RuleSet {self.name}: {', '.join(self.names)}>"
