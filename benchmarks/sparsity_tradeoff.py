"""Sparsity against accuracy, cycles and energy on rain-sim: unstructured, N:M and
structured pruning of the digits CNN and of a transformer encoder.

    python benchmarks/sparsity_tradeoff.py [--models digits,transformer]
                                           [--out-dir benchmarks/results] [--no-plots] [--check 4]

Writes sparsity_tradeoff.md and sparsity_<model>.png to --out-dir and prints the same
tables. Run time: about 130 s of CPU, 2 to 5 minutes of wall time on 2 CPU cores (127 s
with the cores to itself, 248-282 s while other jobs shared them), nearly all of it
`quantize`'s activation range search on the transformer (about 8 s a point; digits takes
4 s in all). Results are deterministic (two runs give identical tables).

Every point is `fold`, then one pruning pass, then `calibrate,quantize,lower-integer`
(int8 weights and activations, qcompile's defaults), compiled for the `rain-sim` preset
and simulated on the evaluation samples. No fine-tuning anywhere: the pruned weights are
the trained (digits) or initial (transformer) weights with zeros put in.

Methods:
  - unstructured: `prune{mode=unstructured,sensitivity=true,sparsity=S}` (magnitude
    pruning with per-layer ratios from the sensitivity analysis on calibration data);
  - N:M: `sparsify{weights=2:4}`, `4:8` (50%) and `1:4` (75%), N:M along the reduction
    axis; rain-sim stores these weights compressed and streams them in N/M of the cycles;
  - structured: `prune{mode=structured,sensitivity=true,sparsity=S}`: whole output
    channels removed, the graph gets smaller (S is the fraction of the prunable layers'
    filters removed; layers whose channels reach an op pruning cannot follow are skipped
    with a warning, listed under each table).
Columns:
  - target: the pass option; weight sparsity: the fraction of the dense model's Conv /
    Gemm / MatMul weights that are zero or gone afterwards (what the plots use as x);
  - parameters: the float initializer elements after pruning, counted once per node
    that reads them (structured pruning shrinks it); non-zero: those not zero;
  - the metric: digits, top-1 accuracy against the labels of all 300 samples of
    examples/digits_eval.npz; transformer (untrained, random weights), output SQNR (dB)
    and top-1 agreement against the dense float model on 256 held-out random sequences.
    "float" is the pruned float model in onnxruntime, "rain-sim" the int8 program;
  - cycles, energy (uJ) and DRAM bytes per inference, from rain-sim's report (the
    report's totals are per inference; energy includes static power over the run).
`--check N` compares the first N samples of every program bit for bit with the integer
reference evaluator (0 skips it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # torch_models

Feeds = Dict[str, np.ndarray]  # {input name: N samples}

UNSTRUCTURED = [0.25, 0.5, 0.7, 0.9]
STRUCTURED = [0.25, 0.5, 0.7, 0.9]
NM = [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75)]


# -- models ----------------------------------------------------------------------------------
class Case:
    """A float model file, calibration samples, evaluation samples, and how to score."""

    def __init__(self, name: str, path: str, calib: Feeds, evals: Feeds, labels: Optional[np.ndarray], note: str):
        self.name, self.path, self.calib, self.evals, self.labels, self.note = name, path, calib, evals, labels, note
        self.reference: Optional[np.ndarray] = None  # the dense float model's outputs on evals

    @property
    def n_calib(self) -> int:
        return len(next(iter(self.calib.values())))

    @property
    def n_eval(self) -> int:
        return len(next(iter(self.evals.values())))


def digits(tmp: str) -> Case:
    calib = np.load(os.path.join(ROOT, "examples", "digits_calib.npz"))
    ev = np.load(os.path.join(ROOT, "examples", "digits_eval.npz"))
    return Case("digits", os.path.join(ROOT, "examples", "digits_cnn.onnx"), {"input": calib["input"]},
                {"input": ev["input"]}, ev["label"],
                f"examples/digits_cnn.onnx; calibration (and sensitivity analysis) on examples/digits_calib.npz "
                f"({len(calib['input'])} samples), top-1 accuracy on all {len(ev['input'])} samples of "
                "examples/digits_eval.npz")


def transformer(tmp: str) -> Case:
    """tests/torch_models.py's encoder, exported as tests/test_rainsim.py `_torch_integer`
    does; sequences with padding masks of lengths 2-6."""
    import qcompile
    from torch_models import BUILDERS

    module, args = BUILDERS["transformer"]()
    names = ["x", "mask"]
    model = qcompile.from_torch(module, args, input_names=names, output_names=["y"],
                                dynamic_axes={**{n: {0: "N"} for n in names}, "y": {0: "N"}})
    path = os.path.join(tmp, "transformer.onnx")
    qcompile.save(model, path)
    seq, width = args[0].shape[1:]

    def data(seed: int, n: int) -> Feeds:
        rng = np.random.default_rng(seed)
        x = rng.normal(0.0, 1.0, (n, 1, seq, width)).astype(np.float32)
        lengths = rng.integers(2, seq + 1, n)
        mask = (np.arange(seq)[None, :] >= lengths[:, None])[:, None, :]
        return {"x": x, "mask": mask}
    return Case("transformer", path, data(1000, 64), data(2000, 256), None,
                "tests/torch_models.py transformer encoder (2 layers, d_model 32, 4 heads, untrained), exported "
                "with qcompile.from_torch; calibration (and sensitivity analysis) on 64 random sequences 6x32 with "
                "padding masks (lengths 2-6, seed 1000), SQNR and top-1 agreement against the dense float model "
                "on 256 held-out sequences (seed 2000)")


MODELS = {"digits": digits, "transformer": transformer}


# -- running -----------------------------------------------------------------------------------
def _samples(feeds: Feeds) -> List[Dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i] for k, v in feeds.items()} for i in range(n)]


def ort_outputs(proto_bytes: bytes, feeds: Feeds) -> np.ndarray:
    """The float model in onnxruntime, all samples as one batch; [N, outputs]."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])
    batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in feeds.items()}  # samples carry a batch axis of 1
    return sess.run(None, batch)[0].reshape(len(next(iter(feeds.values()))), -1)


def score(case: Case, out: np.ndarray) -> Dict[str, float]:
    if case.labels is not None:
        return {"top1": float((out.argmax(1) == case.labels).mean()) * 100}
    ref = case.reference.astype(np.float64)
    noise = float(np.square(ref - out).sum())
    return {"sqnr": 10 * np.log10(float(np.square(ref).sum()) / noise) if noise else float("inf"),
            "agree": float((ref.argmax(1) == out.argmax(1)).mean()) * 100}


def weight_counts(model) -> tuple:
    """(elements, non-zeros) of the Conv/Gemm/MatMul constant weights."""
    from qcompile.passes.prune.common import weighted
    arrays = [w.array for w in weighted(model)]
    return sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)


def dead_channels(model) -> List[str]:
    """A note for each layer with output channels whose weights are all zero."""
    from qcompile.passes.prune.common import weighted
    out = []
    for w in weighted(model):
        a = np.moveaxis(w.array, w.out_axis, 0).reshape(w.array.shape[w.out_axis], -1)
        dead = np.flatnonzero(~a.any(axis=1))
        if dead.size:
            out.append(f"{w.node.name}: {dead.size} of {a.shape[0]} output channels have all weights zero "
                       f"(channels {', '.join(map(str, dead[:8]))}{' ...' if dead.size > 8 else ''})")
    return out


def param_counts(model) -> tuple:
    """(elements, non-zeros) of the float initializers, counted once per node that reads
    them: the transformer's two encoder layers start as copies of one layer
    (nn.TransformerEncoder clones it), so the export stores their equal weights once, and
    pruning gives each layer its own; counting per reader keeps the dense count honest."""
    total = nonzero = 0
    for node in model.graph.nodes:
        seen = set()
        for v in node.inputs:
            if v is None or not v.is_initializer or v.const_value is None or id(v) in seen:
                continue
            seen.add(id(v))
            a = np.asarray(v.const_value)
            if np.issubdtype(a.dtype, np.floating):
                total += a.size
                nonzero += int(np.count_nonzero(a))
    return total, nonzero


def run_point(case: Case, method: str, label: str, prune: str, target, dense_weights: int, check: int
              ) -> Dict[str, Any]:
    """One row: fold + `prune`, then calibrate,quantize,lower-integer, compile, simulate."""
    import qcompile
    from qcompile.backend.lowering import compile_program
    from qcompile.backend.reference import run_integer_graph
    from qcompile.backend.simulator import simulate
    from qcompile.onnx_io import to_proto

    row: Dict[str, Any] = {"method": method, "label": label, "pipeline": ",".join(p for p in ("fold", prune) if p),
                           "notes": []}
    t0 = time.perf_counter()
    stage = "prune"
    try:
        model = qcompile.load(case.path)
        model.annotations["calibration_data"] = _samples(case.calib)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = qcompile.PassManager.parse(row["pipeline"]).run(model).model
        row["notes"] += [str(w.message) for w in caught if str(w.message).startswith(("prune", "sparsify"))]
        total_w, nonzero_w = weight_counts(model)
        row["notes"] += dead_channels(model)
        row["weight_sparsity"] = 1.0 - nonzero_w / dense_weights
        row["params"], row["nonzero"] = param_counts(model)
        row["float"] = score(case, ort_outputs(to_proto(model).SerializeToString(), case.evals))
        stage = "calibrate,quantize,lower-integer"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            int_model = qcompile.PassManager.parse("calibrate{progress=false},quantize,lower-integer").run(model).model
        # calibrate's note on the attention mask's -inf fills is expected (README, Quantization)
        row["notes"] += [str(w.message) for w in caught if not str(w.message).startswith("calibrate: non-finite")]
        stage = "compile_program"
        prog = compile_program(int_model, target)
        stage = "simulate"
        res = simulate(prog, target, case.evals)
        out = next(iter(res.outputs.values())).reshape(case.n_eval, -1)
        row["sim"] = score(case, out)
        tot = res.report["total"]
        row["cycles"] = int(tot["cycles"])
        row["energy_uj"] = tot["energy_pj"]["total"] / 1e6
        row["dram"] = int(tot["dram_bytes"])
        row["nm_layers"] = sorted({l["sparsity"]["nm"] for l in res.report["layers"]
                                   if l.get("sparsity") and l["sparsity"]["nm"]})
        row["energy_parts"] = {k: v / 1e6 for k, v in tot["energy_pj"].items()}
        if method != "N:M" and row["nm_layers"]:
            found = [f"{l['name']} ({l['sparsity']['nm']})" for l in res.report["layers"]
                     if l.get("sparsity") and l["sparsity"]["nm"]]
            row["notes"].append(f"rain-sim stores {', '.join(found)} compressed as N:M: the pruned weights happen "
                                "to fit the pattern")
        row["saved_cycles"] = sum(l["sparsity"]["saved_cycles"] for l in res.report["layers"] if l.get("sparsity"))
        if check:
            stage = "bit-exact check against run_integer_graph"
            for i, feed in enumerate(_samples({k: v[:check] for k, v in case.evals.items()})):
                for name, want in run_integer_graph(int_model, feed).items():
                    got = res.outputs[name][i]
                    if got.shape != want.shape or not np.array_equal(got, want):
                        raise AssertionError(f"output {name} sample {i}: {np.count_nonzero(got != want)} of "
                                             f"{want.size} elements differ from the integer reference")
    except Exception as e:  # reported in the table, not worked around
        row["error"] = f"{stage}: {type(e).__name__}: {e}"
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - t0
    return row


def points(case: Case) -> List[tuple]:
    """(method, label, prune pipeline) for every row."""
    rows = [("dense", "-", "")]
    rows += [("unstructured", f"{s:.0%}", f"prune{{mode=unstructured,sensitivity=true,sparsity={s:g}}}")
             for s in UNSTRUCTURED]
    rows += [("N:M", f"{nm} ({s:.0%})", f"sparsify{{weights={nm}}}") for nm, s in NM]
    rows += [("structured", f"{s:.0%}", f"prune{{mode=structured,sensitivity=true,sparsity={s:g}}}")
             for s in STRUCTURED]
    return rows


def run_case(case: Case, target, check: int) -> List[Dict[str, Any]]:
    import qcompile
    from qcompile.onnx_io import to_proto
    dense = qcompile.PassManager.parse("fold").run(qcompile.load(case.path)).model
    dense_weights = weight_counts(dense)[0]
    case.reference = ort_outputs(to_proto(qcompile.load(case.path)).SerializeToString(), case.evals)
    rows = []
    for method, label, prune in points(case):
        row = run_point(case, method, label, prune, target, dense_weights, check)
        rows.append(row)
        print(f"  {case.name:<12} {method:<13} {label:<11} {row['seconds']:6.1f} s"
              + (f"  FAILED {row['error']}" if "error" in row else ""), file=sys.stderr, flush=True)
    return rows


# -- tables and plots ------------------------------------------------------------------------------
def _metric_cols(case: Case) -> List[tuple]:
    if case.labels is not None:
        return [("top1", "top-1 {} (%)", "{:.1f}")]
    return [("sqnr", "SQNR {} (dB)", "{:.2f}"), ("agree", "top-1 agreement {} (%)", "{:.1f}")]


def table(case: Case, rows: List[Dict[str, Any]]) -> str:
    metrics = _metric_cols(case)
    head = ["method", "target", "weight sparsity", "parameters", "non-zero"]
    head += [title.format(where) for where in ("float", "rain-sim") for _, title, _ in metrics]
    head += ["cycles", "energy (uJ)", "DRAM bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["label"]]
        if "weight_sparsity" not in r:
            cells += ["-"] * (len(head) - 2)
        else:
            cells += [f"{100 * r['weight_sparsity']:.1f}%", str(r["params"]), str(r["nonzero"])]
            for where in ("float", "sim"):
                for key, _, fmt in metrics:
                    cells.append(fmt.format(r[where][key]) if where in r else "-")
            if "cycles" in r:
                cells += [str(r["cycles"]), f"{r['energy_uj']:.3f}", str(r["dram"])]
            else:
                cells += ["-", "-", "-"]
        if "error" in r:
            cells[-1] += f" (failed: {r['error']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def energy_note(rows: List[Dict[str, Any]]) -> str:
    dense = next((r for r in rows if r["method"] == "dense" and "energy_parts" in r), None)
    if dense is None:
        return ""
    e = dense["energy_parts"]
    share = {k: 100 * e[k] / e["total"] for k in ("dram", "static", "sram", "mac", "vector")}
    return (f" Dense energy per inference: {e['total']:.3f} uJ, of which DRAM {share['dram']:.0f}%, static "
            f"{share['static']:.0f}%, SRAM {share['sram']:.0f}%, MACs {share['mac']:.1f}%, vector "
            f"{share['vector']:.1f}%.")


def notes(rows: List[Dict[str, Any]]) -> List[str]:
    """Each distinct warning once, with the rows that raised it; then the failures."""
    seen: Dict[str, List[str]] = {}
    for r in rows:
        for n in r["notes"]:
            where = f"{r['method']} {r['label']}" if r["label"] != "-" else r["method"]
            if where not in seen.setdefault(n, []):
                seen[n].append(where)
    out = [f"{', '.join(where)}: {n}" for n, where in seen.items()]
    out += [f"{r['method']} {r['label']}: FAILED at {r['error']}" for r in rows if "error" in r]
    return out


def plot(case: Case, rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(key, title.format("on rain-sim")) for key, title, _ in _metric_cols(case)]
    panels = [(("sim", k), t) for k, t in metrics] + [("cycles", "rain-sim cycles per inference"),
                                                      ("energy_uj", "energy per inference (uJ)"),
                                                      ("dram", "DRAM bytes per inference")]
    ncols = 2 if len(panels) == 4 else 3
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    ok = [r for r in rows if "error" not in r]
    dense = [r for r in ok if r["method"] == "dense"]
    series = {"unstructured (sensitivity)": ("unstructured", "o-"), "structured (sensitivity)": ("structured", "s-"),
              "N:M (2:4, 1:4)": ("N:M", "^-")}

    def value(r, key):
        return r[key[0]][key[1]] if isinstance(key, tuple) else r[key]

    for ax, (key, title) in zip(axes.flat, panels):
        for name, (method, style) in series.items():
            pts = dense + [r for r in ok if r["method"] == method and not r["label"].startswith("4:8")]
            ax.plot([100 * r["weight_sparsity"] for r in pts], [value(r, key) for r in pts], style, label=name)
        for r in ok:
            if r["label"].startswith("4:8"):
                ax.plot(100 * r["weight_sparsity"], value(r, key), "D", color="C2", mfc="none", label="4:8")
        ax.set_title(title)
        ax.set_xlabel("weight sparsity (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{case.name}: pruning and sparsity, int8 on rain-sim, no fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits,transformer")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check", type=int, default=4, help="samples compared bit for bit with the integer reference")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("qcompile").setLevel(logging.ERROR)
    from qcompile.backend.target import load_target

    target = load_target("rain-sim")
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    sections = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            case = MODELS[name](tmp)
            rows = run_case(case, target, args.check)
            failed += sum("error" in r for r in rows)
            text = f"## {name}\n\n{case.note}.{energy_note(rows)}\n\n{table(case, rows)}\n"
            ns = notes(rows)
            if ns:
                text += "\nWarnings and failures:\n\n" + "\n".join(f"- {n}" for n in ns) + "\n"
            sections.append(text)
            print("\n" + text, flush=True)
            if not args.no_plots:
                png = os.path.join(args.out_dir, f"sparsity_{name}.png")
                plot(case, rows, png)
                sections[-1] += f"\n![{name}](sparsity_{name}.png)\n"
    elapsed = time.perf_counter() - start
    head = ("# Sparsity trade-off on rain-sim\n\n"
            "`python benchmarks/sparsity_tradeoff.py` (written by it; "
            f"{elapsed:.0f} s on this machine, 2 CPU cores). Each row: `fold`, the pruning pass shown, then "
            "`calibrate,quantize,lower-integer` (int8), compiled for the `rain-sim` preset (32x32 "
            "output-stationary, 800 MHz; N:M weights stored compressed and streamed in N/M of the cycles; zero "
            "operands skip MAC energy but not cycles) and simulated. No fine-tuning. Unstructured and structured "
            "pruning use the sensitivity allocation (`sensitivity=true`, 64 calibration samples). Weight sparsity: "
            "fraction of the dense model's Conv/Gemm/MatMul weights that are zero or removed. Parameters: float "
            "initializer elements after pruning, counted once per layer reading them (the transformer's two "
            "encoder layers start with equal weights, which the export stores once). Cycles, energy (static included) and DRAM bytes are per "
            "inference. Unstructured zeros save only MAC energy on this target: the weights stay dense in DRAM "
            "(unless they happen to fit an N:M pattern) and cycles are unchanged; small differences between rows "
            "that store the same weights (a few hundred DRAM bytes, about a hundred cycles) come from `quantize` "
            "choosing other activation ranges, which adds or removes an interface Requantize layer. "
            + (f"Bit-exact check: the first {args.check} samples of every program against the integer reference "
               "evaluator." if args.check else "") + "\n\n")
    with open(os.path.join(args.out_dir, "sparsity_tradeoff.md"), "w") as f:
        f.write(head + "\n".join(sections))
    print(f"{elapsed:.0f} s; wrote {os.path.join(args.out_dir, 'sparsity_tradeoff.md')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
