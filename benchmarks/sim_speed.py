"""rain-sim functional simulation speed against onnxruntime on the same int8 model.

    python benchmarks/sim_speed.py [--models digits,squeezenet,...] [--batches 1,64]
                                   [--repeat 5] [--budget 30] [--out benchmarks/results/sim_speed.md]

For each model: the float ONNX model goes through `fold,calibrate,quantize`; the QDQ
model (`qcompile.onnx_io.to_proto`) runs in onnxruntime (one intra-op and one inter-op
thread, sequential execution, default graph optimisations, so its int8 QLinear kernels);
`lower-integer` and `compile_program(..., rain-sim)` give the program that rain-sim's
functional simulation runs (`simulate(..., timing=False)`: all samples of a batch at
once). Both are timed end to end on the same float inputs (input quantization and output
dequantization included), at batch 1 and batch 64, on one thread (OMP/MKL/OpenBLAS and
torch set to 1 before anything is imported). Each figure is the process's CPU time, the
best of up to `--repeat` runs after one warm-up run (fewer when `--budget` seconds are
spent); CPU time rather than wall time because the machine is shared.

Models: the shipped example (examples/digits_cnn.onnx, calibrated with
examples/digits_calib.npz, run on examples/digits_eval.npz; its batch dimension is
symbolic, so onnxruntime gets the B samples in one run) and the `onnx` package's light
models (onnx/backend/test/data/light) with seeded random weights in place of their
ConstantOfShape generators (tests/onnx_models.py `light_random_weights`), calibrated on
seeded random inputs and run on other seeded random inputs. The light models have a
fixed batch of 1, so at batch B onnxruntime runs the model B times (marked "xB").

Exactness: every benchmarked sample's simulated outputs are compared bit for bit with
the integer reference (`qcompile.backend.reference.run_integer_graph`, one sample at a
time); a mismatch stops the script (exit 1).

The goal (issue 4 part 6): ratio time(rain-sim) / time(onnxruntime) at most 2 at batch 64.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # onnx_models.light_random_weights

try:
    import torch
    torch.set_num_threads(1)
except ImportError:  # torch is optional: the simulator then uses its float64 GEMM
    torch = None

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT = ["squeezenet", "shufflenet", "bvlc_alexnet", "zfnet512", "inception_v1", "inception_v2", "resnet50",
         "densenet121", "vgg19"]
Feeds = Dict[str, np.ndarray]


class Case:
    """One compiled model: the program, the integer graph, the QDQ model and inputs."""

    def __init__(self, name: str, program, int_model, qdq: onnx.ModelProto, inputs: Feeds, batched_ort: bool,
                 note: str):
        self.name, self.program, self.int_model, self.qdq = name, program, int_model, qdq
        self.inputs, self.batched_ort, self.note = inputs, batched_ort, note


def _compile(name: str, proto: onnx.ModelProto, pipeline: str, calib: Optional[List[Feeds]], inputs: Feeds,
             batched_ort: bool, note: str) -> Case:
    import qcompile
    from qcompile.backend.lowering import compile_program
    from qcompile.backend.target import load_target
    from qcompile.onnx_io import from_proto, to_proto

    model = from_proto(proto)
    if calib is not None:
        model.annotations["calibration_data"] = calib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qdq_model = qcompile.PassManager.parse(pipeline).run(model).model
        qdq = to_proto(qdq_model)
        int_model = qcompile.PassManager.parse("lower-integer").run(qdq_model).model
    program = compile_program(int_model, load_target("rain-sim"))
    return Case(name, program, int_model, qdq, inputs, batched_ort, note)


def digits(n: int) -> Case:
    calib = os.path.join(ROOT, "examples", "digits_calib.npz")
    x = np.load(os.path.join(ROOT, "examples", "digits_eval.npz"))["input"][:n]   # (n, 1, 1, 8, 8)
    return _compile("digits", onnx.load(os.path.join(ROOT, "examples", "digits_cnn.onnx")),
                    f"fold,calibrate{{data={calib},progress=false}},quantize", None, {"input": x}, True,
                    "examples/digits_cnn.onnx, calibrated on examples/digits_calib.npz, inputs from "
                    "examples/digits_eval.npz")


def light(name: str, n: int, n_calib: int = 4) -> Case:
    from onnx_models import light_random_weights

    proto = light_random_weights(onnx.load(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))
    inp = proto.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(1000)
    calib = [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n_calib)]
    x = np.random.default_rng(2000).standard_normal([n] + shape).astype(np.float32)
    return _compile(name, proto, "fold,calibrate{progress=false},quantize", calib, {inp.name: x}, False,
                    f"light_{name}.onnx, seeded random weights, {n_calib} random calibration inputs")


# -- timing -------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], repeat: int, budget: float) -> Tuple[float, int]:
    """(best CPU seconds, runs) over up to `repeat` runs after one warm-up, stopping early
    once `budget` seconds have been spent on timed runs. CPU time of this process (all
    its threads; both sides run on one): other work on a shared machine inflates wall
    time but hardly this."""
    fn()
    times: List[float] = []
    while len(times) < repeat and sum(times) < budget:
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times), len(times)


def ort_session(qdq: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_runner(case: Case, sess, b: int) -> Callable[[], object]:
    feeds = {k: v[:b] for k, v in case.inputs.items()}
    if case.batched_ort:
        batch = {k: np.ascontiguousarray(v.reshape((-1,) + v.shape[2:])) for k, v in feeds.items()}
        return lambda: sess.run(None, batch)
    samples = [{k: np.ascontiguousarray(v[i]) for k, v in feeds.items()} for i in range(b)]
    return lambda: [sess.run(None, s) for s in samples]


def sim_runner(case: Case, b: int) -> Callable[[], object]:
    from qcompile.backend.simulator import simulate
    from qcompile.backend.target import load_target

    target = load_target("rain-sim")
    feeds = {k: v[:b] for k, v in case.inputs.items()}
    return lambda: simulate(case.program, target, feeds, timing=False)


def check_exact(case: Case, n: int) -> None:
    """Simulated outputs of the first `n` samples equal the integer reference's, bit for bit."""
    from qcompile.backend.reference import run_integer_graph
    from qcompile.backend.simulator import simulate
    from qcompile.backend.target import load_target

    feeds = {k: v[:n] for k, v in case.inputs.items()}
    res = simulate(case.program, load_target("rain-sim"), feeds, timing=False)
    for i in range(n):
        ref = run_integer_graph(case.int_model, {k: v[i] for k, v in feeds.items()})
        for name, want in ref.items():
            got = res.outputs[name][i]
            if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
                bad = np.count_nonzero(got != want) if got.shape == want.shape else "shape"
                raise SystemExit(f"{case.name}: output {name} of sample {i} differs from the integer reference "
                                 f"({bad} elements)")


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "an unknown CPU"


# -- main ---------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(["digits"] + LIGHT))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per figure (best of), after a warm-up")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per figure before stopping early")
    ap.add_argument("--check", type=int, default=None,
                    help="samples checked against the integer reference (default: the largest batch)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sim_speed.md"))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    n = max(batches)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m != "digits" and m not in LIGHT]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from digits, {', '.join(LIGHT)}")
    if any(m in LIGHT for m in names) and not os.path.isdir(LIGHT_DIR):
        ap.error(f"the onnx package ships no light models here ({LIGHT_DIR})")

    rows, notes = [], []
    header = "| model | batch | rain-sim ms | onnxruntime ms | ratio | runs (sim/ort) |"
    print(header)
    print("|---|---|---|---|---|---|")
    for name in names:
        t0 = time.perf_counter()
        case = digits(n) if name == "digits" else light(name, n)
        compile_s = time.perf_counter() - t0
        check_n = min(args.check if args.check is not None else n, n)
        t0 = time.perf_counter()
        check_exact(case, check_n)
        check_s = time.perf_counter() - t0
        notes.append(f"- {name}: {case.note}; {len(case.program.instructions)} instructions, "
                     f"{len(case.program.host_ops)} host ops; bit-exact against the integer reference on "
                     f"{check_n} samples (quantize+compile {compile_s:.0f} s, check {check_s:.0f} s)")
        sess = ort_session(case.qdq)
        for b in batches:
            sim_s, sim_k = best_time(sim_runner(case, b), args.repeat, args.budget)
            ort_s, ort_k = best_time(ort_runner(case, sess, b), args.repeat, args.budget)
            ort_cell = f"{ort_s * 1e3:.2f}" + ("" if case.batched_ort or b == 1 else f" (x{b})")
            row = f"| {name} | {b} | {sim_s * 1e3:.2f} | {ort_cell} | {sim_s / ort_s:.2f} | {sim_k}/{ort_k} |"
            rows.append(row)
            print(row, flush=True)

    import onnxruntime as ort

    versions = (f"python {platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}, "
                f"torch {torch.__version__ if torch is not None else 'absent'}")
    text = "\n".join([
        "# rain-sim functional simulation vs onnxruntime",
        "",
        f"Made by `python benchmarks/sim_speed.py{''.join(' ' + a for a in (sys.argv[1:] if argv is None else argv))}`"
        f" on {_cpu_name()} ({platform.machine()}, {os.cpu_count()} CPUs), one thread; {versions}.",
        "",
        "rain-sim: `simulate(program, rain-sim, feeds, timing=False)`, all samples of a batch in one call (run in chunks that fit CHUNK_BYTES). "
        "onnxruntime: the exported QDQ model, 1 intra-op thread, sequential execution. "
        f"CPU time of the process, best of up to {args.repeat} runs after a warm-up. "
        "Ratio = rain-sim / onnxruntime (goal: at most 2 at batch 64). \"(xB)\": the model has a fixed batch of 1, "
        "so onnxruntime runs it B times.",
        "",
        header, "|---|---|---|---|---|---|", *rows, "",
        *notes, "",
    ])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
