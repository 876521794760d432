"""Instruments: hooks the PassManager calls around every pass, to time it, print the IR
after it, or count what it changed. Any number can be used together.

Order around each pass: `before_pass`, the pass, `after_pass`, then the verifier (so a
PrintIRInstrument shows the graph a buggy pass left, before the verifier rejects it).
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import IO, Dict, Iterable, List, Optional, Tuple

from ..ir.model import Model
from ..ir.printer import print_model
from .base import Pass, PassResult

__all__ = ["Instrument", "TimingInstrument", "PrintIRInstrument", "StatisticsInstrument", "PassStatistics"]


class Instrument:
    """Base class: override the hooks you need; each does nothing by default."""

    def before_pipeline(self, model: Model) -> None:
        """Called once, before the first pass."""

    def before_pass(self, pass_: Pass, model: Model) -> None:
        """Called before each pass with the model it will run on."""

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        """Called after each pass that returned, before the verifier runs."""

    def after_pipeline(self, result: PassResult) -> None:
        """Called once, after the last pass (not when a pass failed)."""


class TimingInstrument(Instrument):
    """Wall-clock time per pass; `report()` is a table with the share of each pass and
    of the rest (verifier, other instruments). Running the same manager again adds up."""

    def __init__(self) -> None:
        self._rows: Dict[int, List] = {}  # id(pass) -> [label, seconds]
        self._started = 0.0
        self._pipeline_started: Optional[float] = None
        self.total = 0.0

    @property
    def timings(self) -> List[Tuple[str, float]]:
        """(pass text, seconds) per pass, in pipeline order."""
        return [(label, seconds) for label, seconds in self._rows.values()]

    def before_pipeline(self, model: Model) -> None:
        self._pipeline_started = time.perf_counter()

    def before_pass(self, pass_: Pass, model: Model) -> None:
        self._started = time.perf_counter()

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        elapsed = time.perf_counter() - self._started
        self._rows.setdefault(id(pass_), [str(pass_), 0.0])[1] += elapsed

    def after_pipeline(self, result: PassResult) -> None:
        if self._pipeline_started is not None:
            self.total += time.perf_counter() - self._pipeline_started
            self._pipeline_started = None

    def report(self) -> str:
        rows = self.timings
        in_passes = sum(s for _, s in rows)
        total = max(self.total, in_passes)
        if total - in_passes > 0:
            rows = rows + [("(verifier and instruments)", total - in_passes)]
        lines = ["pass timing (wall clock):", f"  {'ms':>10}  {'%':>6}  pass"]
        for label, seconds in rows + [("total", total)]:
            share = 100.0 * seconds / total if total > 0 else 0.0
            lines.append(f"  {seconds * 1e3:10.3f}  {share:5.1f}%  {label}")
        return "\n".join(lines)


class PrintIRInstrument(Instrument):
    """Print the IR after (or before) the named passes, or after every pass with
    `all=True`; each dump starts with `// IR after <name>`. Backs the CLI's
    --print-ir-after=NAME and --print-ir-after-all. `stream` defaults to stderr."""

    def __init__(self, after: Iterable[str] = (), all: bool = False, stream: Optional[IO[str]] = None,
                 before: Iterable[str] = ()) -> None:
        self.after = set(after)
        self.before = set(before)
        self.all = all
        self.stream = stream

    def before_pass(self, pass_: Pass, model: Model) -> None:
        if pass_.name in self.before:
            self._dump(f"// IR before {pass_.name}", model)

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        if self.all or pass_.name in self.after:
            self._dump(f"// IR after {pass_.name}", result.model)

    def _dump(self, header: str, model: Model) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(header, file=stream)
        print(print_model(model), file=stream)


@dataclasses.dataclass
class PassStatistics:
    """What one pass run changed: node counts, op-count deltas and the pass's counters."""

    pass_text: str
    nodes_before: int
    nodes_after: int
    op_delta: Dict[str, int]
    counters: Dict[str, int]
    modified: bool


class StatisticsInstrument(Instrument):
    """Node counts and op histograms before and after each pass (subgraphs included),
    plus the counters each pass bumped in `self.stats`. `entries` holds one
    PassStatistics per pass run; `report()` formats them."""

    def __init__(self) -> None:
        self.entries: List[PassStatistics] = []
        self._before: collections.Counter = collections.Counter()

    def before_pass(self, pass_: Pass, model: Model) -> None:
        self._before = op_histogram(model)

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        after = op_histogram(result.model)
        delta = {op: after[op] - self._before[op] for op in sorted(set(after) | set(self._before))}
        self.entries.append(PassStatistics(
            pass_text=str(pass_),
            nodes_before=sum(self._before.values()),
            nodes_after=sum(after.values()),
            op_delta={op: d for op, d in delta.items() if d},
            counters=dict(pass_.stats),
            modified=bool(result.modified),
        ))

    def report(self) -> str:
        lines = ["pass statistics:"]
        for e in self.entries:
            change = e.nodes_after - e.nodes_before
            lines.append(f"  {e.pass_text}: nodes {e.nodes_before} -> {e.nodes_after} ({change:+d})"
                         + ("" if e.modified else ", not modified"))
            if e.op_delta:
                lines.append("    ops: " + ", ".join(f"{op} {d:+d}" for op, d in e.op_delta.items()))
            for key, count in e.counters.items():
                lines.append(f"    {key}: {count}")
        return "\n".join(lines)


def op_histogram(model: Model) -> collections.Counter:
    """Count of nodes per op (`domain::Op` outside the ONNX domain), subgraphs included."""
    counts: collections.Counter = collections.Counter()
    for n in model.graph.all_nodes():
        counts[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
    return counts
