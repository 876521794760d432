"""Choosing per-layer sparsities that meet a global target with the least output error.

A *unit* is what gets one ratio: a weight tensor (unstructured pruning) or a group of
layers whose channels are tied (structured pruning). The sensitivity analysis measures,
for each unit alone, the model's output error (onnxruntime on calibration data, see
common.FloatRunner) at each level of `levels`, and the cost removed there (weight
elements). Errors of different units are assumed to add up.

`allocate` is greedy on the error/parameter trade-off: starting from nothing pruned, it
repeatedly moves the unit whose next move (to any higher measured level) costs the least
error per parameter removed, until the removed parameters reach the target. The last
move stops part way between two levels, so the target is met exactly (up to rounding
inside layers), not overshot by a whole level.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Sequence

__all__ = ["Unit", "allocate", "measure"]


@dataclasses.dataclass
class Unit:
    """One pruning unit: its name, its size (parameters removable at ratio 1), and,
    once measured, the output error at each level (level 0 first, error 0)."""

    name: str
    size: int
    errors: List[float] = dataclasses.field(default_factory=list)


def measure(units: Sequence[Unit], levels: Sequence[float], error_at: Callable[[Unit, float], float]) -> None:
    """Fill each unit's errors at 0 and at every level in `levels`."""
    for u in units:
        u.errors = [0.0] + [float(error_at(u, r)) for r in levels]


def allocate(units: Sequence[Unit], levels: Sequence[float], target: float) -> Dict[str, float]:
    """Per-unit ratios whose removed parameters sum to `target` (or everything the
    levels allow, when that is less), chosen greedily by error per parameter."""
    grid = [0.0] + list(levels)
    state = {u.name: 0 for u in units}
    ratios = {u.name: 0.0 for u in units}
    removed = 0.0
    while removed < target - 1e-9:
        best = None
        for u in units:
            j = state[u.name]
            for k in range(j + 1, len(grid)):
                cost = (grid[k] - grid[j]) * u.size
                if cost <= 0:
                    continue
                slope = max(u.errors[k] - u.errors[j], 0.0) / cost
                if best is None or slope < best[0] - 1e-15:
                    best = (slope, u, j, k, cost)
        if best is None:
            break
        _, u, j, k, cost = best
        if removed + cost >= target:
            part = (target - removed) / cost
            ratios[u.name] = grid[j] + part * (grid[k] - grid[j])
            removed = target
            break
        state[u.name] = k
        ratios[u.name] = grid[k]
        removed += cost
    return ratios
