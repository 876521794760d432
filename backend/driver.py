"""The jobs behind `qcompile MODEL --target T` and `qcompile run PROGRAM`: compile an
integer graph to a program, simulate samples, compare with the float model, and run
a `.rsim` file over a file of samples. The CLI parses arguments and calls these.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from qcompile._fileio import atomic_path
from qcompile.errors import QCompileError

from .isa import format_asm
from .lowering import compile_program
from .program import Program, ProgramError, load_program
from .simulator import check_feeds, simulate
from .target import load_target

__all__ = ["compile_model", "compare_with_float", "run_program_file", "describe_program", "stack_samples"]


def compile_model(model, target_spec, dump: Optional[Callable[[str, str], None]] = None) -> Tuple[Program, Any]:
    """Lower an integer graph for a target; returns (program, target)."""
    target = load_target(target_spec)
    return compile_program(model, target, dump=dump), target


def stack_samples(samples: List[Mapping[str, np.ndarray]], names: List[str]) -> Dict[str, np.ndarray]:
    """Per-sample feeds -> {name: (N, *shape)}."""
    return {n: np.stack([np.asarray(s[n]) for s in samples]) for n in names}


def compare_with_float(float_model_bytes: bytes, program: Program, outputs: Dict[str, np.ndarray],
                       feeds: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """Per output: SQNR (dB), cosine and top-1 agreement of the simulated outputs against
    onnxruntime running the float model on the same samples."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(float_model_bytes, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = next(iter(feeds.values())).shape[0]
    ref: Dict[str, List[np.ndarray]] = {k: [] for k in names}
    for i in range(n):
        res = sess.run(None, {k: v[i] for k, v in feeds.items()})
        for k, r in zip(names, res):
            ref[k].append(np.asarray(r))
    out = {}
    for k in names:
        if k not in outputs:
            continue
        f = np.stack(ref[k]).astype(np.float64)
        q = np.asarray(outputs[k], np.float64).reshape(f.shape)
        err = np.sum((f - q) ** 2)
        sqnr = float(10 * np.log10(np.sum(f ** 2) / err)) if err > 0 else float("inf")
        cos = float(np.sum(f * q) / (np.linalg.norm(f) * np.linalg.norm(q) + 1e-30))
        flat_f, flat_q = f.reshape(n, -1), q.reshape(n, -1)
        top1 = float(np.mean(flat_f.argmax(1) == flat_q.argmax(1)))
        out[k] = {"sqnr_db": sqnr, "cosine": cos, "top1_agreement": top1, "samples": n}
    return out


def _load_npz(path: str, what: str) -> Dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise QCompileError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise QCompileError(f"{what} {path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def run_program_file(program_path: str, input_path: str, target_spec: Optional[str] = None,
                     output_path: Optional[str] = None, batch: int = 64) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Simulate every sample of `input_path` through the program; write the outputs
    (float, N samples each) to `output_path` atomically. Returns (report, summary)."""
    program = load_program(program_path)
    try:
        target = load_target(target_spec or program.target_name)
    except QCompileError as e:
        raise ProgramError(f"{program_path}: compiled for target '{program.target_name}', which is not a preset: "
                           f"give --target FILE.toml ({e})") from None
    program.check_target(target, program_path)
    data = _load_npz(input_path, "--input")
    try:
        n = check_feeds(program, data)
    except ProgramError as e:
        raise ProgramError(f"--input {input_path}: {e}") from None
    feeds = {s["name"]: data[s["name"]] for s in program.inputs}
    outs: Dict[str, List[np.ndarray]] = {s["name"]: [] for s in program.outputs}
    report = None
    for start in range(0, n, batch):
        part = {k: v[start:start + batch] for k, v in feeds.items()}
        res = simulate(program, target, part, timing=report is None)
        if report is None:
            report = res.report
        for k, v in res.outputs.items():
            outs[k].append(v)
    arrays = {k: np.concatenate(v) for k, v in outs.items()}
    report["samples"] = n
    summary: Dict[str, Any] = {"samples": n}
    if "label" in data and len(arrays) >= 1:
        first = next(iter(arrays.values()))
        labels = np.asarray(data["label"]).reshape(-1)
        if labels.size == n:
            summary["accuracy"] = float(np.mean(first.reshape(n, -1).argmax(1) == labels))
    if output_path:
        with atomic_path(output_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    return report, summary


def describe_program(path: str) -> str:
    """Header, tables and disassembly of a `.rsim` file (`qcompile inspect`)."""
    program = load_program(path)
    lines = [f"{path}: rain-sim program, format v1, target {program.target_name} "
             f"(fingerprint {program.target_fingerprint.hex()})",
             f"  {len(program.instructions)} instructions ({program.code.size * 4} B), constants "
             f"{len(program.const)} B, activation arena {program.arena_size} B, {len(program.host_ops)} host ops"]
    for s in program.inputs:
        how = f"float, quantized with scale {s['scale'][:4]} zero point {s.get('zero_point')}" if s["float"] else \
            s.get("dtype", "")
        lines.append(f"  input  {s['name']} {s['shape']} -> t{s['tensor']} ({how})")
    for s in program.outputs:
        how = f"dequantized with scale {s['scale'][:4]}" if s["float"] else "raw"
        lines.append(f"  output {s['name']} {s['shape']} <- t{s['tensor']} ({how})")
    lines.append("  layers:")
    for i, l in enumerate(program.layers):
        extra = f"  ({l['reason']})" if l.get("reason") else ""
        lines.append(f"    {i:>3} {l['kind']:<9} {l['op']:<14} {l['name']:<30} {l['precision']}{extra}")
    lines.append("  tensors:")
    for i, t in enumerate(program.tensors):
        lines.append(f"    t{i:<4} 0x{t.addr:08x} {t.dtype.name:<7} {t.shape} %{t.name}")
    lines.append("  code:")
    lines.append(format_asm(program.instructions).rstrip("\n"))
    return "\n".join(lines) + "\n"
