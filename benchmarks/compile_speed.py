"""Compile (lowering) speed: integer graph -> rain-sim program, as `qcompile MODEL --target`
runs it (`backend.driver.compile_model`), on the shipped example and the onnx package's
light models.

    python benchmarks/compile_speed.py [--models digits,squeezenet,resnet50,vgg19]
                                       [--repeat 3] [--cache DIR] [--save-code FILE.npz]
                                       [--check-code FILE.npz] [--profile MODEL] [--target T]
                                       [--memory]

The integer graphs (`fold,calibrate,quantize{search_samples=0},lower-integer` on seeded
random calibration inputs for the light models, the example's calibration set for
digits) are built once and cached in `--cache` as ONNX files, so only the lowering is
timed. Each figure is the best wall time of `--repeat` runs of `compile_model` (the
machine is shared: the best run is the least disturbed). `--save-code` writes every
program's instruction words; `--check-code` compares them with a saved file and exits 1
on any difference (the instruction stream must not change with a faster compiler).
`--profile MODEL` prints cProfile's top functions for one compile of MODEL.
`--memory` adds the memory of one compile per model, each in a fresh process (the
integer graph loaded first): the resident set before it, its peak during the compile
(VmHWM, reset just before compiling), and the difference, the lowering's own peak.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import qcompile  # noqa: E402
from qcompile.backend.driver import compile_model  # noqa: E402

PIPELINE = "fold,calibrate{progress=false},quantize{search_samples=0},lower-integer"


def _integer_model(name: str, cache: str):
    path = os.path.join(cache, f"{name}.int.onnx")
    if os.path.exists(path):
        return qcompile.load(path)
    if name == "digits":
        model = qcompile.load(os.path.join(ROOT, "examples", "digits_cnn.onnx"))
        calib = np.load(os.path.join(ROOT, "examples", "digits_calib.npz"))["input"]
        model.annotations["calibration_data"] = [{"input": x} for x in calib]
    else:
        import onnx

        from onnx_models import light_random_weights
        from qcompile.onnx_io import from_proto

        light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
        proto = light_random_weights(onnx.load(os.path.join(light, f"light_{name}.onnx")))
        inp = proto.graph.input[0]
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        model = from_proto(proto)
        model.annotations["calibration_data"] = [{inp.name: rng.standard_normal(shape).astype(np.float32)}
                                                 for _ in range(2)]
    int_model = qcompile.PassManager.parse(PIPELINE).run(model).model
    qcompile.save(int_model, path)
    return qcompile.load(path)


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_memory(name: str, cache: str, target: str) -> dict:
    """Peak memory of one compile of `name`, in this process (run in a fresh one)."""
    import gc

    model = _integer_model(name, cache)
    gc.collect()
    before = _rss_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass                                   # the peak then includes loading the model
    compile_model(model, target)
    peak = _rss_mb("VmHWM")
    return {"before_mb": before, "peak_mb": peak, "lowering_mb": peak - before}


def _memory_in_subprocess(name: str, cache: str, target: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-memory", name, "--cache", cache,
                          "--target", target], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,squeezenet,resnet50,vgg19")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qcompile_compile_speed"))
    ap.add_argument("--save-code")
    ap.add_argument("--check-code")
    ap.add_argument("--profile")
    ap.add_argument("--target", default="rain-sim", help="a preset or a target TOML file")
    ap.add_argument("--memory", action="store_true", help="also the peak RSS of one compile per model")
    ap.add_argument("--measure-memory", help=argparse.SUPPRESS)     # the child process of --memory
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.measure_memory:
        print(json.dumps(_measure_memory(args.measure_memory, args.cache, args.target)))
        return 0
    names = args.models.split(",")
    models = {n: _integer_model(n, args.cache) for n in names}
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        compile_model(models[args.profile], args.target)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
        return 0
    codes = {}
    mem_head = f" {'RSS before MB':>14} {'peak MB':>8} {'lowering MB':>12}" if args.memory else ""
    print(f"{'model':<12} {'instructions':>12} {'words':>10} {'compile s (best of %d)' % args.repeat:>24}{mem_head}")
    for n in names:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            program, _ = compile_model(models[n], args.target)
            best = min(best, time.perf_counter() - t0)
        codes[n] = np.asarray(program.code)
        codes[n + ".const"] = np.frombuffer(program.const, np.uint8)
        mem = ""
        if args.memory:
            m = _memory_in_subprocess(n, args.cache, args.target)
            mem = f" {m['before_mb']:>14.0f} {m['peak_mb']:>8.0f} {m['lowering_mb']:>12.0f}"
        print(f"{n:<12} {len(program.instructions):>12} {program.code.size:>10} {best:>24.3f}{mem}", flush=True)
    if args.save_code:
        np.savez(args.save_code, **codes)
    status = 0
    if args.check_code:
        with np.load(args.check_code) as ref:
            for k, v in codes.items():
                if k not in ref.files:
                    continue
                same = ref[k].shape == v.shape and np.array_equal(ref[k], v)
                print(f"{k}: {'identical' if same else 'DIFFERENT'} ({v.size} elements)")
                status |= not same
    return status


if __name__ == "__main__":
    sys.exit(main())
