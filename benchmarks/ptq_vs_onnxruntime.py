"""qcompile PTQ against onnxruntime's quantize_static, same models, same data.

    python benchmarks/ptq_vs_onnxruntime.py [--models torch,light | digits,resnet,...,squeezenet,...]
                                           [--out benchmarks/results/ptq_vs_onnxruntime.md]

Models (`--models`, names or the groups `torch`, `light`, `all`; default all): the
digits example, five small torch models of tests/torch_models.py (ResNet- and
MobileNet-style CNNs, a transformer encoder, LSTM and GRU classifiers), and the `onnx`
package's light models (onnx/backend/test/data/light: squeezenet, shufflenet,
bvlc_alexnet, zfnet512, inception_v1, inception_v2, resnet50, densenet121, vgg19) with
seeded random weights in place of their ConstantOfShape generators
(tests/onnx_models.py `light_random_weights`), converted to opset 13 (onnxruntime's
per-channel QDQ needs it) and without their final Softmax (with random weights it
saturates, so the logits are compared). For each model: one float ONNX file; a
calibration split and a disjoint evaluation split (the digits example's own files;
seeded random inputs for the others, drawn from different seeds: structured random
images for the CNNs, light models included). The light models (224x224, a fixed batch
of 1) take fewer samples (LIGHT_SAMPLES: 16 calibration, 8 for the five heaviest; 96
evaluation each) and only the default and W4A8 qcompile rows, with the range search
bounded to LIGHT_SEARCH_SECONDS, so that all models run in about half an hour. Rows:
  - float: the reference;
  - onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations
    (its defaults), after quant_pre_process, for each of MinMax, Entropy, Percentile;
    the best of the three on the evaluation metric is marked (an upper bound on what a
    user of onnxruntime would pick, since the pick looks at the evaluation split);
  - qcompile fold,calibrate,quantize at its defaults (calibration method minmax, int8
    per-channel weights, int8 activations, the activation range search); the other
    calibration methods as extra rows; W4A8 (quantize{weights=int4}).
Metrics, on the evaluation split, every model run by onnxruntime with its default
optimisations: top-1 accuracy against the labels (digits), and against the float model
output SQNR (dB), cosine similarity and top-1 agreement. Size: the ONNX file, and the
weights at their true widths (int4 counts 4 bits). Time: wall time of the quantization
itself (pre-processing, calibration and rewriting; not the export). The W8A8 figures
depend on the CPU: on x86 without VNNI, onnxruntime's fused u8s8 kernels saturate int16
pair sums (onnxruntime's uint8-activation models lose most there), so the output file
names the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # torch_models, onnx_models

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
TORCH = ["digits", "resnet", "mobilenet", "transformer", "lstm", "gru"]
LIGHT = ["squeezenet", "shufflenet", "bvlc_alexnet", "zfnet512", "inception_v1", "inception_v2", "resnet50",
         "densenet121", "vgg19"]
# (calibration, evaluation) samples of the light models: 224x224 images, one per run.
# 96 evaluation samples each: on 16 or 32, which of onnxruntime's three methods comes out
# "best" (picked on the evaluation split) and the gap to qcompile were within the noise of
# the pick (bvlc_alexnet: 0.06 dB under on 16, within 0.01 dB either way on 96). They cost
# 96 x 3x224x224 float32 = 58 MB of inputs per model, run one sample at a time.
LIGHT_SAMPLES = {"squeezenet": (16, 96), "shufflenet": (16, 96), "inception_v1": (16, 96), "inception_v2": (16, 96),
                 "bvlc_alexnet": (8, 96), "zfnet512": (8, 96), "resnet50": (8, 96), "densenet121": (8, 96),
                 "vgg19": (8, 96)}
LIGHT_SEARCH_SECONDS = 10.0
# qcompile rows: (calibration method, weights); the light models take the first and the last
QC_ROWS = (("minmax", "int8"), ("mse", "int8"), ("entropy", "int8"), ("percentile", "int8"), ("minmax", "int4"))

Feed = Dict[str, np.ndarray]


# -- models and data ----------------------------------------------------------------------
class Case:
    """A float model with its calibration and evaluation splits. `batch`: the most
    samples one run takes (1 for a model with a fixed batch of 1); `rows`: the qcompile
    (method, weights) rows; `options`: extra quantize options (none for the default)."""

    def __init__(self, name: str, path: str, calib: List[Feed], evals: List[Feed], labels: Optional[np.ndarray],
                 note: str, batch: int = 64, rows=QC_ROWS, options: str = ""):
        self.name, self.path, self.calib, self.evals, self.labels, self.note = name, path, calib, evals, labels, note
        self.batch, self.rows, self.options = batch, rows, options
        self.ort_note = ""


def _images(seed: int, n: int, c: int, size: int) -> np.ndarray:
    """Structured random images: low-frequency noise (4x4 blocks upsampled) plus fine noise."""
    rng = np.random.default_rng(seed)
    low = rng.normal(0.0, 1.0, (n, c, size // 4, size // 4)).astype(np.float32)
    img = np.kron(low, np.ones((1, 1, 4, 4), np.float32))
    return (img + 0.3 * rng.normal(0.0, 1.0, img.shape)).astype(np.float32)


def _split(arrays: Dict[str, np.ndarray]) -> List[Feed]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


def digits(tmp: str, n_calib: int, n_eval: int) -> Case:
    calib = np.load(os.path.join(ROOT, "examples", "digits_calib.npz"))["input"][:n_calib]
    ev = np.load(os.path.join(ROOT, "examples", "digits_eval.npz"))
    return Case("digits", os.path.join(ROOT, "examples", "digits_cnn.onnx"),
                [{"input": x} for x in calib], [{"input": x} for x in ev["input"][:n_eval]], ev["label"][:n_eval],
                "examples/digits_*.npz (200 calibration / 300 evaluation)")


def _export(tmp: str, name: str, module, example, names: List[str]) -> str:
    import qcompile
    axes = {n: {0: "batch"} for n in names}
    model = qcompile.from_torch(module, example, input_names=names, output_names=["output"],
                                dynamic_axes={**axes, "output": {0: "batch"}})
    path = os.path.join(tmp, name + ".onnx")
    qcompile.save(model, path)
    return path


def cnn(name: str, builder: Callable, size: int) -> Callable[[str, int, int], Case]:
    def make(tmp: str, n_calib: int, n_eval: int) -> Case:
        module, example = builder()
        path = _export(tmp, name, module, example, ["input"])
        calib = _split({"input": _images(1000, n_calib, 3, size)})
        evals = _split({"input": _images(2000, n_eval, 3, size)})
        return Case(name, path, calib, evals, None, f"random low-frequency images 3x{size}x{size}, seeds 1000/2000")
    return make


def transformer(tmp: str, n_calib: int, n_eval: int) -> Case:
    from torch_models import transformer as build
    module, example = build()
    path = _export(tmp, "transformer", module, example, ["x", "pad_mask"])

    def data(seed: int, n: int) -> List[Feed]:
        rng = np.random.default_rng(seed)
        x = rng.normal(0.0, 1.0, (n, 1, 6, 32)).astype(np.float32)
        lengths = rng.integers(2, 7, n)
        mask = np.arange(6)[None, :] >= lengths[:, None]
        return [{"x": x[i], "pad_mask": mask[i:i + 1]} for i in range(n)]
    return Case("transformer", path, data(1000, n_calib), data(2000, n_eval), None,
                "random sequences 6x32 with padding masks (lengths 2-6), seeds 1000/2000")


def recurrent(name: str, builder: Callable) -> Callable[[str, int, int], Case]:
    """An LSTM or GRU classifier of tests/torch_models.py over random sequences; the
    recurrent cell stays in float (neither quantizer has integer LSTM/GRU kernels here),
    its Linear head is quantized."""
    def make(tmp: str, n_calib: int, n_eval: int) -> Case:
        module, example = builder()
        path = _export(tmp, name, module, example, ["input"])
        steps, features = example[0].shape[1:]

        def data(seed: int, n: int) -> List[Feed]:
            x = np.random.default_rng(seed).normal(0.0, 1.0, (n, 1, steps, features)).astype(np.float32)
            return [{"input": x[i]} for i in range(n)]
        return Case(name, path, data(1000, n_calib), data(2000, n_eval), None,
                    f"random sequences {steps}x{features}, seeds 1000/2000")
    return make


def light(name: str) -> Callable[[str, int, int], Case]:
    """An onnx light model with seeded random weights, on structured random images (the
    same `_images` as the torch CNNs) at its fixed input shape; its own sample counts.
    The model (opset 9) is converted to opset 13 for both quantizers: onnxruntime's
    per-channel QDQ output is invalid below 13 (DequantizeLinear has no axis there)."""
    def make(tmp: str, n_calib: int, n_eval: int) -> Case:
        from onnx import version_converter
        from onnx_models import light_random_weights
        proto = light_random_weights(onnx.load(os.path.join(LIGHT_DIR, f"light_{name}.onnx")))
        _drop_final_softmax(proto)
        used = {i for n in proto.graph.node for i in n.input}  # drop the generators' shape constants
        kept = [t for t in proto.graph.initializer if t.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        proto = version_converter.convert_version(proto, 13)
        path = os.path.join(tmp, name + ".onnx")
        onnx.save(proto, path)
        inp = proto.graph.input[0]
        _, c, h, w = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        n_calib, n_eval = LIGHT_SAMPLES[name]
        calib = _split({inp.name: _images(1000, n_calib, c, h)})
        evals = _split({inp.name: _images(2000, n_eval, c, h)})
        return Case(name, path, calib, evals, None,
                    f"light_{name}.onnx (opset 13, final Softmax dropped) with seeded random weights, random "
                    f"low-frequency images {c}x{h}x{w}, seeds 1000/2000; qcompile range search bounded to "
                    f"{LIGHT_SEARCH_SECONDS:g} s",
                    batch=1, rows=(QC_ROWS[0], QC_ROWS[-1]), options=f"search_seconds={LIGHT_SEARCH_SECONDS:g}")
    return make


def _drop_final_softmax(proto: onnx.ModelProto) -> None:
    """Make the logits the output: with random weights the light models' Softmax
    saturates (shufflenet's is one-hot to float precision), and SQNR on it says nothing."""
    out = proto.graph.output[0].name
    last = next((n for n in proto.graph.node if out in n.output), None)
    if last is None or last.op_type != "Softmax":
        return
    logits = last.input[0]
    proto.graph.node.remove(last)
    for n in proto.graph.node:
        n.output[:] = [out if o == logits else o for o in n.output]
        n.input[:] = [out if i == logits else i for i in n.input]


def _builders():
    from torch_models import gru, lstm, mobilenet, resnet
    return {"digits": digits, "resnet": cnn("resnet", resnet, 16), "mobilenet": cnn("mobilenet", mobilenet, 32),
            "transformer": transformer, "lstm": recurrent("lstm", lstm), "gru": recurrent("gru", gru),
            **{name: light(name) for name in LIGHT}}


def _selected(text: str) -> List[str]:
    """Model names from --models: names and the groups torch, light, all, in order."""
    groups = {"torch": TORCH, "light": LIGHT, "all": TORCH + LIGHT}
    names: List[str] = []
    for item in (t.strip() for t in text.split(",")):
        for name in groups.get(item, [item] if item else []):
            if name not in TORCH + LIGHT:
                raise SystemExit(f"unknown model {name!r}; choose from {', '.join(TORCH + LIGHT)} "
                                 f"or the groups {', '.join(groups)}")
            if name not in names:
                names.append(name)
    return names


# -- running and scoring ------------------------------------------------------------------
def _batched(feeds: List[Feed], size: int = 64) -> List[Feed]:
    return [{k: np.concatenate([f[k] for f in feeds[i:i + size]]) for k in feeds[0]}
            for i in range(0, len(feeds), size)]


def outputs(path_or_proto, feeds: List[Feed], batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in _batched(feeds, batch)]).reshape(len(feeds), -1)


def score(case: Case, ref: np.ndarray, out: np.ndarray) -> Dict[str, float]:
    noise = float(np.square(ref.astype(np.float64) - out).sum())
    signal = float(np.square(ref.astype(np.float64)).sum())
    cos = float((ref * out).sum() / np.sqrt((ref * ref).sum() * (out * out).sum()))
    m = {"sqnr": 10 * np.log10(signal / noise) if noise else float("inf"), "cos": cos,
         "agree": float((ref.argmax(1) == out.argmax(1)).mean()) * 100}
    if case.labels is not None:
        m["top1"] = float((out.argmax(1) == case.labels).mean()) * 100
    return m


def sizes(path: str) -> Dict[str, float]:
    """ONNX file bytes, and weight bytes at their true widths."""
    import json
    model = onnx.load(path)
    bits = {}
    for p in model.metadata_props:
        if p.key == "qcompile.weight_bits":
            bits = json.loads(p.value)
    width = {"binary": 1, "ternary": 2}
    total = 0.0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if n <= 1:
            continue
        if init.name in bits:
            t = bits[init.name]
            b = width.get(t) or int("".join(c for c in t if c.isdigit()) or 8)
        else:
            b = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * 8
        total += n * b / 8
    return {"file_kb": os.path.getsize(path) / 1024, "weights_kb": total / 1024}


def quantized_tensors(path: str) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)


def run_ort(case: Case, tmp: str, method: str):
    """onnxruntime quantize_static with `method`: (QDQ model path, seconds)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            # equal batches: the histogram calibrators (Entropy, Percentile) of
            # onnxruntime 1.2x fail on a shorter last batch (np.asarray of ragged arrays)
            size = next(b for b in (16, 10, 8, 5, 4, 2, 1) if len(case.calib) % b == 0 and b <= case.batch)
            self.it = iter(_batched(case.calib, size))

        def get_next(self):
            return next(self.it, None)

    out = os.path.join(tmp, f"{case.name}_ort_{method}.onnx")
    pre, pre_s = _ort_pre_process(case, tmp)
    t = time.perf_counter()
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return out, pre_s + time.perf_counter() - t


def _ort_pre_process(case: Case, tmp: str):
    """quant_pre_process once per model (its output is the same for each method):
    (path, seconds), the seconds counted in each method's quantization time."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if getattr(case, "ort_pre", None) is None:
        pre = os.path.join(tmp, f"{case.name}_pre.onnx")
        t = time.perf_counter()
        try:
            quant_pre_process(case.path, pre, skip_symbolic_shape=False)
        except Exception:  # its symbolic shape inference fails on the transformer's Reshape
            quant_pre_process(case.path, pre, skip_symbolic_shape=True)
            case.ort_note = "onnxruntime pre-processing without symbolic shape inference (it fails on this model)"
        case.ort_pre = (pre, time.perf_counter() - t)
    return case.ort_pre


def run_qcompile(case: Case, tmp: str, method: str, weights: str) -> str:
    import qcompile
    import qcompile.passes  # noqa: F401
    model = qcompile.load(case.path)
    model.annotations["calibration_data"] = case.calib
    options = f"weights={weights}" + (f",{case.options}" if case.options else "")
    text = f"fold,calibrate{{method={method},progress=false}},quantize{{{options}}}"
    result = qcompile.PassManager.parse(text).run(model)
    out = os.path.join(tmp, f"{case.name}_qc_{method}_{weights}.onnx")
    qcompile.save(result.model, out)
    return out


def bench(case: Case, tmp: str) -> List[Dict]:
    ref = outputs(case.path, case.evals, case.batch)
    rows = [{"tool": "float", "config": "fp32", **score(case, ref, ref), **sizes(case.path), "time": 0.0, "q": 0}]
    ort_rows = []
    for method in ("MinMax", "Entropy", "Percentile"):
        try:
            path, dt = run_ort(case, tmp, method)
        except Exception as e:  # report, do not hide
            rows.append({"tool": "onnxruntime", "config": f"W8A8 {method}: failed ({type(e).__name__}: {e})"[:90]})
            continue
        row = {"tool": "onnxruntime", "config": f"W8A8 {method}",
               **score(case, ref, outputs(path, case.evals, case.batch)),
               **sizes(path), "time": dt, "q": quantized_tensors(path)}
        rows.append(row)
        ort_rows.append(row)
    key = "top1" if case.labels is not None else "sqnr"
    if ort_rows:
        max(ort_rows, key=lambda r: r[key])["best"] = True
    for method, weights in case.rows:
        t = time.perf_counter()
        path = run_qcompile(case, tmp, method, weights)
        dt = time.perf_counter() - t
        label = ("W8A8" if weights == "int8" else "W4A8") + f" {method}" + (" (default)" if method == "minmax" else "")
        out = outputs(path, case.evals, case.batch)
        rows.append({"tool": "qcompile", "config": label, **score(case, ref, out), **sizes(path), "time": dt,
                     "q": quantized_tensors(path)})
    return rows


def table(results: Dict[str, List[Dict]], cases: Dict[str, Case]) -> str:
    lines = ["| model | tool | config | top-1 % | SQNR dB | cosine | top-1 agree % | Q tensors | file KiB "
             "| weights KiB | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            if "sqnr" not in r:
                lines.append(f"| {name} | {r['tool']} | {r['config']} | | | | | | | | |")
                continue
            top1 = f"{r['top1']:.1f}" if "top1" in r else "-"
            mark = " **best**" if r.get("best") else ""
            sq = "inf" if not np.isfinite(r["sqnr"]) else f"{r['sqnr']:.2f}"
            lines.append(f"| {name} | {r['tool']} | {r['config']}{mark} | {top1} | {sq} | {r['cos']:.5f} | "
                         f"{r['agree']:.1f} | {r['q']} | {r['file_kb']:.1f} | {r['weights_kb']:.1f} | "
                         f"{r['time']:.2f} |")
    lines.append("")
    for name, c in cases.items():
        lines.append(f"- {name}: {len(c.calib)} calibration / {len(c.evals)} evaluation samples; {c.note}"
                     + (f"; {c.ort_note}" if c.ort_note else ""))
    return "\n".join(lines)


def machine() -> str:
    """The CPU and versions: onnxruntime's int8 kernels saturate int16 pair sums on x86
    CPUs without VNNI, which changes every W8A8 figure (both tools)."""
    import platform

    import onnxruntime as ort
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vnni = sorted(f for f in flags if "vnni" in f)
    isa = ("VNNI: " + ", ".join(vnni)) if vnni else ("no VNNI (AVX2 u8s8 kernels saturate)" if "avx2" in flags
                                                     else "")
    return (f"{cpu}, {os.cpu_count()} CPUs{', ' + isa if isa else ''}; python {platform.python_version()}, "
            f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all", help=f"comma-separated names ({', '.join(TORCH + LIGHT)}) or "
                                                    "groups (torch, light, all)")
    ap.add_argument("--calib", type=int, default=200,
                    help="calibration samples (torch models; digits has 200; light models: LIGHT_SAMPLES)")
    ap.add_argument("--eval", type=int, default=500, help="evaluation samples (digits has 300)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ptq_vs_onnxruntime.md"))
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    names = _selected(args.models)
    if any(n in LIGHT for n in names) and not os.path.isdir(LIGHT_DIR):
        raise SystemExit(f"the onnx package ships no light models here ({LIGHT_DIR})")
    builders = _builders()
    results, cases = {}, {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t = time.perf_counter()
            case = builders[name](tmp, args.calib, args.eval)
            cases[name] = case
            results[name] = bench(case, tmp)
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    total = time.perf_counter() - start
    text = table(results, cases)
    print(text)
    if args.out:
        from qcompile._fileio import atomic_write
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        command = " ".join(["python benchmarks/ptq_vs_onnxruntime.py", *(sys.argv[1:] if argv is None else argv)])
        atomic_write(args.out, "# PTQ: qcompile vs onnxruntime quantize_static\n\n"
                     f"Made by `{command}` on {machine()}; {total:.0f} s in all.\n\n" + text + "\n", "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
