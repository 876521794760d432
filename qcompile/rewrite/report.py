"""What a run of the rewrite driver did: which rules fired where, and (on request) why
the rules that were tried did not match."""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Tuple

__all__ = ["Firing", "Miss", "RewriteReport"]


@dataclasses.dataclass(frozen=True)
class Firing:
    """Rule `rule` rewrote the node described as `node` in `graph`, in sweep `iteration`."""

    rule: str
    node: str
    graph: str
    iteration: int

    def __str__(self) -> str:
        return f"{self.rule} rewrote {self.node}"


@dataclasses.dataclass(frozen=True)
class Miss:
    """Rule `rule` was tried at `node` and did not match. `stage` is "pattern" (the
    graph differs from the pattern) or "check" (the rule's check refused);
    `node` describes the node, `node_name` and `outputs` are its name and output names;
    `culprits` names the nodes and values at fault."""

    rule: str
    node: str
    node_name: str
    outputs: Tuple[str, ...]
    graph: str
    stage: str
    reason: str
    culprits: Tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.rule} did not match {self.node}: {self.reason}"


@dataclasses.dataclass
class RewriteReport:
    """The result of `apply_rules`. `fired` lists every rewrite in order; `misses` (with
    `explain=True`) the non-matches of the last sweep, which is the final state when
    the run converged. `converged` is False when `max_iterations` sweeps still fired."""

    ruleset: str
    fired: List[Firing] = dataclasses.field(default_factory=list)
    misses: List[Miss] = dataclasses.field(default_factory=list)
    iterations: int = 0
    converged: bool = False

    @property
    def counts(self) -> Dict[str, int]:
        """Rewrites per rule name, most frequent first."""
        return dict(collections.Counter(f.rule for f in self.fired).most_common())

    def count(self, rule: str) -> int:
        return sum(1 for f in self.fired if f.rule == rule)

    def why_not(self, rule: Optional[str] = None, node: Optional[str] = None) -> List[Miss]:
        """The misses of `rule` (any when None) at nodes whose name or an output's name
        is `node` (any when None)."""
        return [
            m for m in self.misses
            if (rule is None or m.rule == rule)
            and (node is None or node == m.node_name or node in m.outputs)
        ]

    def __str__(self) -> str:
        state = "converged" if self.converged else "stopped at the iteration limit"
        lines = [f"{self.ruleset}: {len(self.fired)} rewrites in {self.iterations} sweeps ({state})"]
        lines += [f"  {rule:<24} {n}" for rule, n in self.counts.items()]
        if self.misses:
            lines.append("not matched:")
            lines += [f"  {m}" for m in self.misses]
        return "\n".join(lines)
