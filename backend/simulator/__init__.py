"""rain-sim: runs a program bit-exactly and reports cycles, traffic and energy.

The simulator knows programs and targets, not graphs: `simulate(program, target, feeds)`
needs nothing but a `Program` (or a `.rsim` path) and the target it was compiled for.
Feeds follow the calibration-data convention: {input name: array of N samples, each of
the input's shape}. Outputs come back in the same convention, dequantized to float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..program import Program, ProgramError, load_program
from .functional import Machine, SimulationError, equal_chunks, exact_matmul
from .host import dequantize_output, quantize_input
from .report import build_report, format_report
from .timing import Timeline, schedule

__all__ = ["simulate", "SimResult", "SimulationError", "format_report", "check_feeds", "exact_matmul"]


@dataclass
class SimResult:
    outputs: Dict[str, np.ndarray]          # float (dequantized) or raw, N samples each
    raw_outputs: Dict[str, np.ndarray]      # the integer tensors before dequantization
    report: Dict[str, Any]
    timeline: Optional[Timeline]            # None for a functional run (timing=False)


def check_feeds(program: Program, feeds: Mapping[str, np.ndarray]) -> int:
    """The number of samples; errors name the input and the shape it needs."""
    n = None
    for spec in program.inputs:
        name = spec["name"]
        if name not in feeds:
            raise ProgramError(f"missing input '{name}' (shape {spec['shape']} per sample); the file has "
                               f"{', '.join(sorted(feeds)) or 'nothing'}")
        x = np.asarray(feeds[name])
        want = tuple(spec["shape"])
        if x.shape[1:] != want:
            raise ProgramError(f"input '{name}': expected N samples of shape {list(want)}, i.e. an array of shape "
                               f"[N, {', '.join(map(str, want))}], got {list(x.shape)}")
        if spec["float"] and not np.issubdtype(x.dtype, np.floating):
            raise ProgramError(f"input '{name}': expected float samples, got {x.dtype}")
        if not spec["float"] and x.dtype != np.dtype(spec["dtype"]):
            raise ProgramError(f"input '{name}': expected {spec['dtype']} samples, got {x.dtype}")
        if spec["float"] and not np.all(np.isfinite(x)):
            raise ProgramError(f"input '{name}': contains NaN or infinity")
        if n is not None and x.shape[0] != n:
            raise ProgramError(f"input '{name}': {x.shape[0]} samples, but other inputs have {n}")
        n = x.shape[0]
    return n or 1


CHUNK_BYTES = 64 << 20
"""Memory of the samples simulated together (their arenas and buffers): more samples at a
time share each instruction's dispatch, but past this their data no longer stays in the
caches (vgg19, 7 MB a sample: 182 ms a sample in chunks of 8, 227 ms all 64 at once;
shufflenet, 1.3 MB: 9.9 ms in chunks of 32, 10.8 ms all at once)."""


def chunk_size(program: Program, target, n: int) -> int:
    """Samples per chunk for `n` samples: within `CHUNK_BYTES`, chunks of equal size."""
    per_sample = program.arena_size + target.sram["activation"].size_bytes + target.sram["accumulator"].size_bytes
    return equal_chunks(n, per_sample, CHUNK_BYTES)


def simulate(program, target, feeds: Mapping[str, np.ndarray], timing: bool = True) -> SimResult:
    """Run every sample of `feeds` through `program` on `target`, in chunks of samples
    (`chunk_size`). With `timing=False` only the outputs are computed: no timeline, no
    report, no operand-sparsity counts."""
    if isinstance(program, str):
        program = load_program(program)
    program.check_target(target)
    n = check_feeds(program, feeds)
    step = chunk_size(program, target, n)
    parts: Dict[str, list] = {spec["name"]: [] for spec in program.outputs}
    counts: Dict[int, list] = {}
    for start in range(0, n, step):
        m = min(n, start + step) - start
        machine = Machine(program, target, m, count=timing)
        for spec in program.inputs:
            x = np.asarray(feeds[spec["name"]][start:start + m])
            q = quantize_input(x, spec) if spec["float"] else x
            program.tensor_array(machine.arena, spec["tensor"])[...] = q.reshape((m,) + tuple(
                program.tensors[spec["tensor"]].shape))
        machine.run(program.instructions)
        for spec in program.outputs:
            parts[spec["name"]].append(program.tensor_array(machine.arena, spec["tensor"]).copy())
        for pc, c in machine.counts.items():
            total = counts.setdefault(pc, [0, 0, 0])
            for i in range(3):
                total[i] += c[i]
    outputs, raw = {}, {}
    for spec in program.outputs:
        t = parts[spec["name"]][0] if len(parts[spec["name"]]) == 1 else np.concatenate(parts[spec["name"]])
        raw[spec["name"]] = t
        y = dequantize_output(t, spec) if spec["float"] else t
        outputs[spec["name"]] = y.reshape((n,) + tuple(spec["shape"]))
    if not timing:
        return SimResult(outputs, raw, {}, None)
    instrs = program.instructions
    mac_pairs = {pc: c[0] / n for pc, c in counts.items()}           # per inference
    act_nonzero = {pc: c[1] / c[2] if c[2] else 1.0 for pc, c in counts.items()}
    density = {}
    for pc, pairs in mac_pairs.items():
        from .timing import streamed_rows

        a = instrs[pc].args
        performed = a["m0"] * a["m1"] * streamed_rows(instrs[pc]) * a["n"]
        density[pc] = pairs / performed if performed else 1.0
    timeline = schedule(instrs, target, density)
    measured = {"mac_pairs": mac_pairs, "act_nonzero": act_nonzero}
    report = build_report(program, target, timeline, n, measured)
    return SimResult(outputs, raw, report, timeline)
