"""rain-sim's timing model against SCALE-Sim 3.0 on ResNet-18's convolutions (32x32 array).

    python benchmarks/vs_scalesim.py              # runs SCALE-Sim live (about 5 minutes per dataflow)
    python benchmarks/vs_scalesim.py --cached     # SCALE-Sim's figures from benchmarks/results/scalesim_resnet18.json

Each of torchvision ResNet-18's 20 convolutions (224x224, batch 1) becomes a one-layer
ONNX model (seeded random weights), goes through fold, calibrate, quantize and
lower-integer, and is compiled for a 32x32 rain-sim array in the output- and the
weight-stationary dataflow. Two rain-sim targets per dataflow:

  * layer-sized buffers (8/8/16 MiB): every layer runs as one tile, as SCALE-Sim streams
    a whole layer; its matrix-unit compute cycles must equal SCALE-Sim's;
  * the rain-sim preset's buffers (256/256/64 KiB): the lowering tiles the layers, and
    the compute cycles show what tiling costs (refills, unaligned tiles).

SCALE-Sim reports the 0-based index of a layer's last compute cycle; rain-sim counts
cycles, so "equal" means rain-sim = SCALE-Sim + 1 (docs/scalesim.md). Wall time: SCALE-Sim
simulates cycle by cycle; rain-sim's timing model evaluates closed forms per
instruction (`qcompile.backend.simulator.timing.schedule`, the functional simulation not
included). SCALE-Sim lives in its own virtual environment (numpy < 2.4):
benchmarks/scalesim_reference.py makes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from scalesim_reference import gemm_dims, load_results, resnet18_conv_layers, run_scalesim  # noqa: E402

RESULTS = os.path.join(HERE, "results", "vs_scalesim.md")


def _target(dataflow: str, big: bool):
    from qcompile.backend.target import Target, load_target

    d = load_target("rain-sim").to_dict()
    d["name"] = f"rain-sim-{'os' if dataflow == 'output-stationary' else 'ws'}{'-big' if big else ''}"
    d["matrix"]["dataflow"] = dataflow
    if big:
        d["sram"]["activation"]["size_kib"] = 8192
        d["sram"]["weight"]["size_kib"] = 8192
        d["sram"]["accumulator"]["size_kib"] = 16384
    return Target.from_dict(d, "vs_scalesim")


def _integer_conv(layer, rng):
    """One conv as an integer graph (fold, calibrate on 2 random samples, quantize, lower-integer)."""
    from onnx import TensorProto, helper, numpy_helper

    import qcompile
    from qcompile.onnx_io import from_proto

    c, k, m = layer["in_c"], layer["kernel_h"], layer["out_c"]
    shape = [1, c, layer["in_h"], layer["in_w"]]
    w = (rng.standard_normal((m, c, k, k)) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[layer["stride"]] * 2,
                            pads=[layer["padding"]] * 4)
    graph = helper.make_graph([node], layer["name"], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model.annotations["calibration_data"] = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.PassManager.parse("fold,calibrate{progress=false},quantize,lower-integer").run(model).model


def rain_sim(layers, targets):
    """Per target name: per-layer compute cycles, total cycles, and timing-model seconds."""
    from qcompile.backend.isa import Op
    from qcompile.backend.lowering import compile_program
    from qcompile.backend.simulator.timing import instruction_cycles, schedule

    rng = np.random.default_rng(0)
    out = {name: {"compute": [], "total": [], "timing_s": 0.0, "compile_s": 0.0} for name in targets}
    for layer in layers:
        model = _integer_conv(layer, rng)
        for name, target in targets.items():
            t0 = time.perf_counter()
            prog = compile_program(model, target)
            instrs = prog.instructions
            t1 = time.perf_counter()
            timeline = schedule(instrs, target)
            compute = sum(instruction_cycles(i, target) for i in instrs if i.op == Op.MATMUL)
            t2 = time.perf_counter()
            r = out[name]
            r["compute"].append(compute)
            r["total"].append(timeline.total)
            r["timing_s"] += t2 - t1
            r["compile_s"] += t1 - t0
        print(f"  {layer['name']}: " + ", ".join(f"{n} {out[n]['compute'][-1]}" for n in targets), flush=True)
    return out


def scale_sim(layers, cached: bool):
    if cached:
        saved = load_results()
        res = {}
        for df in ("os", "ws"):
            per = [next(l for l in saved["layers"] if l["name"] == layer["name"])[df] for layer in layers]
            res[df] = {"cycles": [p["scalesim_cycles"] for p in per], "wall_s": saved["totals"][df]["wall_s"],
                       "live": False}
        return res
    res = {}
    for df in ("os", "ws"):
        print(f"running SCALE-Sim ({df}), a few minutes ...", flush=True)
        r = run_scalesim(layers, 32, 32, df)
        res[df] = {"cycles": [p["compute_cycles"] for p in r["per_layer"]], "wall_s": r["wall_s"], "live": True}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cached", action="store_true", help="SCALE-Sim's figures from the saved JSON, not a live run")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0: all 20)")
    args = ap.parse_args()
    layers = resnet18_conv_layers()
    if args.layers:
        layers = layers[:args.layers]
    flows = {"os": "output-stationary", "ws": "weight-stationary"}
    targets = {f"{df}-{size}": _target(flow, size == "big") for df, flow in flows.items() for size in ("big", "preset")}
    print("rain-sim: compiling and timing each layer ...", flush=True)
    rs = rain_sim(layers, targets)
    ss = scale_sim(layers, args.cached)

    lines = ["| layer | M | K | N | OS SCALE-Sim | OS rain-sim, layer-sized buffers | OS rain-sim, preset buffers | "
             "WS SCALE-Sim | WS rain-sim, layer-sized buffers | WS rain-sim, preset buffers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    equal = {"os": 0, "ws": 0}
    for i, layer in enumerate(layers):
        g = gemm_dims(layer)
        cells = []
        for df in ("os", "ws"):
            s = ss[df]["cycles"][i]
            big, pre = rs[f"{df}-big"]["compute"][i], rs[f"{df}-preset"]["compute"][i]
            equal[df] += big == s + 1
            cells += [str(s), f"{big}{'' if big == s + 1 else ' (differs)'}", f"{pre} ({pre / (s + 1):.2f}x)"]
        lines.append(f"| {layer['name']} | {g['M']} | {g['K']} | {g['N']} | " + " | ".join(cells) + " |")
    tot = []
    for df in ("os", "ws"):
        s = sum(ss[df]["cycles"])
        big, pre = sum(rs[f"{df}-big"]["compute"]), sum(rs[f"{df}-preset"]["compute"])
        tot += [str(s), f"{big} ({equal[df]}/{len(layers)} layers = SCALE-Sim + 1)", f"{pre} ({pre / s:.2f}x)"]
    lines.append("| **total** | | | | " + " | ".join(tot) + " |")
    lines += ["", "| dataflow | SCALE-Sim wall time | rain-sim timing model (layer-sized / preset) | speed-up | "
              "rain-sim compile (layer-sized / preset) |", "|---|---:|---:|---:|---:|"]
    for df in ("os", "ws"):
        w = ss[df]["wall_s"]
        tb, tp = rs[f"{df}-big"]["timing_s"], rs[f"{df}-preset"]["timing_s"]
        cb, cp = rs[f"{df}-big"]["compile_s"], rs[f"{df}-preset"]["compile_s"]
        lines.append(f"| {df.upper()} | {w:.1f} s{'' if ss[df]['live'] else ' (saved run)'} | {1e3 * tb:.1f} ms / "
                     f"{1e3 * tp:.1f} ms | {w / max(tb, tp):,.0f}x | {cb:.1f} s / {cp:.1f} s |")
    table = "\n".join(lines)
    print(table)
    with open(RESULTS, "w") as f:
        f.write("# rain-sim vs SCALE-Sim 3.0: ResNet-18 convolutions, 32x32 array\n\n")
        f.write("Made by `python benchmarks/vs_scalesim.py" + (" --cached" if args.cached else "") + "` "
                f"on {time.strftime('%Y-%m-%d')}. Matrix-unit compute cycles per layer; rain-sim counts cycles, "
                "SCALE-Sim reports the index of the last one (so equal = SCALE-Sim + 1). Preset buffers: "
                "the ratio to SCALE-Sim shows the cost of tiling into 256/256/64 KiB.\n\n" + table + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
