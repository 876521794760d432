"""SCALE-Sim 3.0 as the reference for rain-sim's matrix-unit compute cycles.

    python benchmarks/scalesim_reference.py [--rows 32] [--cols 32] [--dataflow os ws]
                                            [--venv DIR] [--layers NAME ...]
                                            [--json FILE] [--md FILE] [--keep DIR]
    python benchmarks/scalesim_reference.py --save      # writes benchmarks/results/scalesim_resnet18.{json,md}

SCALE-Sim (PyPI package ``scalesim``, version 3.0.0) needs numpy < 2.4, so it lives in its
own virtual environment and runs in a subprocess; this module imports nothing from it and
needs only the standard library. The environment is taken from ``--venv``, else from
``$SCALESIM_VENV``, else ``scalesim-venv`` beside the repository (``/work/scalesim-venv``
for a checkout at ``/work/main``); when missing it is created with
``python -m venv DIR && DIR/bin/pip install scalesim==3.0.0 'numpy<2.4'``.

API for other scripts (``benchmarks/vs_scalesim.py``)::

    from scalesim_reference import resnet18_conv_layers, run_scalesim, formula_cycles, gemm_dims
    layers = resnet18_conv_layers()                      # 20 dicts, torchvision order
    res = run_scalesim(layers, 32, 32, "os")             # {"per_layer": [...], "wall_s": ...}
    formula_cycles(M, K, N, 32, 32, "ws")                # closed form, equal to SCALE-Sim's
    load_results()                                       # the saved JSON, without rerunning

How a convolution reaches SCALE-Sim (see docs/scalesim.md):
  * GEMM view: M = output pixels (Ho*Wo, batch 1), K = kh*kw*Cin, N = Cout.
  * SCALE-Sim's topology has no padding column and computes the output size as
    ceil((H - kh + s) / s), not PyTorch's floor((H + 2p - kh) / s) + 1. We pass the
    extent of the (padded) input that the windows actually touch,
    H' = (Ho - 1)*s + kh (same for W), for which both give Ho exactly. Passing H + 2p
    would give one extra output row/column for every stride-2 layer of ResNet-18 whose
    H + 2p - kh is odd (conv1: 113 instead of 112).
  * SCALE-Sim 3.0 always simulates batch 1 (operand_matrix.batch_size = 1, a TODO in its
    source); a batch B layer is M = B*Ho*Wo, which its GEMM input mode (``-i gemm``) or a
    taller IFMAP can express.

Compute cycles ("Total Cycles" in COMPUTE_REPORT.csv, stall cycles 0 in CALC bandwidth
mode), for an R x C array (R = ArrayHeight rows, C = ArrayWidth cols):
  output-stationary  ceil(M/R) * ceil(N/C) * (K + R + C - 2) - 1
  weight-stationary  ceil(K/R) * ceil(N/C) * (M + 2R + C - 2) - 1
The -1: SCALE-Sim reports the 0-based cycle index at which the last OFMAP row is written
(max over the serviced cycles of its demand rows), i.e. the number of demand rows minus
one, once per layer (not per fold).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

SCALESIM_REQUIREMENT = "scalesim==3.0.0"
NUMPY_REQUIREMENT = "numpy<2.4"
DATAFLOWS = ("os", "ws")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_JSON = os.path.join(RESULTS_DIR, "scalesim_resnet18.json")
DEFAULT_MD = os.path.join(RESULTS_DIR, "scalesim_resnet18.md")


def default_venv() -> str:
    """``$SCALESIM_VENV``, else ``scalesim-venv`` beside the repository root."""
    env = os.environ.get("SCALESIM_VENV")
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.dirname(ROOT), "scalesim-venv")


# -- the workload -----------------------------------------------------------------------------
def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch's output size (dilation 1): floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _conv(name: str, in_hw: int, cin: int, cout: int, kernel: int, stride: int, padding: int) -> Dict:
    out = conv_out(in_hw, kernel, stride, padding)
    return {
        "name": name,
        "in_h": in_hw, "in_w": in_hw, "in_c": cin,
        "kernel_h": kernel, "kernel_w": kernel,
        "out_c": cout, "stride": stride, "padding": padding,
        "out_h": out, "out_w": out,
    }


def resnet18_conv_layers(image: int = 224) -> List[Dict]:
    """torchvision's ResNet-18 convolutions at ``image`` x ``image``, batch 1, in module order.

    conv1 7x7/2 pad 3; maxpool 3x3/2 pad 1 (not a conv, only shrinks 112 -> 56); per stage
    two BasicBlocks of 3x3 pad-1 convs, the first conv of stages 2-4 with stride 2, and a
    1x1/2 pad-0 ``downsample.0`` conv on the shortcut of those blocks. 20 layers.
    """
    layers = [_conv("conv1", image, 3, 64, 7, 2, 3)]
    hw = conv_out(layers[0]["out_h"], 3, 2, 1)  # maxpool
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if (stage > 1 and block == 0) else 1
            prefix = f"layer{stage}.{block}"
            c1 = _conv(prefix + ".conv1", hw, cin, cout, 3, stride, 1)
            c2 = _conv(prefix + ".conv2", c1["out_h"], cout, cout, 3, 1, 1)
            layers += [c1, c2]
            if stride != 1 or cin != cout:
                layers.append(_conv(prefix + ".downsample.0", hw, cin, cout, 1, stride, 0))
            hw, cin = c2["out_h"], cout
    return layers


def gemm_dims(layer: Dict, batch: int = 1) -> Dict[str, int]:
    """GEMM view of a conv: M = output pixels, K = kh*kw*Cin, N = Cout."""
    return {
        "M": batch * layer["out_h"] * layer["out_w"],
        "K": layer["kernel_h"] * layer["kernel_w"] * layer["in_c"],
        "N": layer["out_c"],
    }


def scalesim_ifmap_hw(layer: Dict) -> (int, int):
    """The IFMAP height/width to give SCALE-Sim: the extent of the zero-padded input that the
    windows touch, (Ho - 1)*s + kh, so that its ceil((H - kh + s)/s) equals Ho."""
    s = layer["stride"]
    h = (layer["out_h"] - 1) * s + layer["kernel_h"]
    w = (layer["out_w"] - 1) * s + layer["kernel_w"]
    assert h <= layer["in_h"] + 2 * layer["padding"] and w <= layer["in_w"] + 2 * layer["padding"]
    assert math.ceil((h - layer["kernel_h"] + s) / s) == layer["out_h"]
    return h, w


def scalesim_out_hw(ifmap_h: int, ifmap_w: int, kh: int, kw: int, stride: int) -> (int, int):
    """SCALE-Sim 3.0's output size (topology_utils.topo_calc_hyperparams)."""
    return (int(math.ceil((ifmap_h - kh + stride) / stride)), int(math.ceil((ifmap_w - kw + stride) / stride)))


# -- closed forms ---------------------------------------------------------------------------
def fold_counts(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> (int, int):
    """(row folds, col folds) SCALE-Sim uses: OS maps M on rows, WS maps K on rows; N on cols."""
    if dataflow == "os":
        return math.ceil(M / rows), math.ceil(N / cols)
    if dataflow == "ws":
        return math.ceil(K / rows), math.ceil(N / cols)
    raise ValueError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")


def formula_cycles(M: int, K: int, N: int, rows: int, cols: int, dataflow: str) -> int:
    """SCALE-Sim 3.0's compute cycles for an M x K by K x N GEMM on a rows x cols array.

    os: ceil(M/R)*ceil(N/C)*(K + R + C - 2) - 1
    ws: ceil(K/R)*ceil(N/C)*(M + 2R + C - 2) - 1
    """
    fr, fc = fold_counts(M, K, N, rows, cols, dataflow)
    per_fold = (K + rows + cols - 2) if dataflow == "os" else (M + 2 * rows + cols - 2)
    return fr * fc * per_fold - 1


# -- SCALE-Sim environment and files ---------------------------------------------------------
def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")


def ensure_scalesim_venv(venv: Optional[str] = None, create: bool = True, quiet: bool = True) -> str:
    """Return the python of the SCALE-Sim environment, creating it when missing."""
    venv = os.path.abspath(venv or default_venv())
    py = venv_python(venv)

    def usable() -> bool:
        if not os.path.exists(py):
            return False
        r = subprocess.run([py, "-c", "import scalesim.scale_sim"], capture_output=True)
        return r.returncode == 0

    if usable():
        return py
    if not create:
        raise RuntimeError(f"no SCALE-Sim environment at {venv}; create it with: python3 -m venv {venv} && "
                           f"{venv}/bin/pip install {SCALESIM_REQUIREMENT} '{NUMPY_REQUIREMENT}'")
    if not os.path.exists(py):
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", venv], check=True)
    cmd = [py, "-m", "pip", "install", SCALESIM_REQUIREMENT, NUMPY_REQUIREMENT]
    if quiet:
        cmd.insert(4, "-q")
    subprocess.run(cmd, check=True)
    if not usable():
        raise RuntimeError(f"SCALE-Sim did not import in {venv} after installing it")
    return py


def write_config(path: str, rows: int, cols: int, dataflow: str, run_name: str = "run",
                 sram_kb: Sequence[int] = (64, 64, 64)) -> None:
    """A SCALE-Sim 3.0 config (the keys its scale_config.read_conf_file requires).

    CALC bandwidth mode: SCALE-Sim estimates the DRAM bandwidth needed for no stalls, so the
    reported cycles are pure compute. No [network_presets] section: 3.0 reads its
    TopologyCsvLoc from the wrong section, and the topology is given explicitly anyway.
    """
    ifmap_kb, filter_kb, ofmap_kb = sram_kb
    text = f"""[general]
run_name = {run_name}

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: {ifmap_kb}
FilterSramSzkB: {filter_kb}
OfmapSramSzkB: {ofmap_kb}
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Bandwidth: 10
Dataflow: {dataflow}
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 100
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 100
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""
    with open(path, "w") as f:
        f.write(text)


def _topo_name(i: int, name: str) -> str:
    # SCALE-Sim splits rows on ',' and expands any layer whose name contains 'DP' into a
    # depthwise conv, one layer per channel: keep names free of both.
    safe = name.replace(",", "_").replace("DP", "dp")
    return f"{i:02d}_{safe}"


def write_topology(path: str, layers: Sequence[Dict]) -> List[Dict]:
    """Conv topology CSV (one trailing comma per row, as SCALE-Sim's parser drops the last
    field). Returns what was written per layer."""
    rows = []
    with open(path, "w") as f:
        f.write("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,\n")
        for i, L in enumerate(layers):
            h, w = scalesim_ifmap_hw(L)
            row = {"topo_name": _topo_name(i, L["name"]), "ifmap_h": h, "ifmap_w": w,
                   "filter_h": L["kernel_h"], "filter_w": L["kernel_w"], "channels": L["in_c"],
                   "num_filter": L["out_c"], "stride": L["stride"]}
            f.write(", ".join(str(row[k]) for k in ("topo_name", "ifmap_h", "ifmap_w", "filter_h", "filter_w",
                                                    "channels", "num_filter", "stride")) + ",\n")
            rows.append(row)
    return rows


def write_layout(path: str) -> None:
    # 3.0 opens a layout file unconditionally; with IfmapCustomLayout/FilterCustomLayout False
    # its rows are never read, so a header is enough.
    with open(path, "w") as f:
        f.write("Layer name, IFMAP Height Intraline Factor,\n")


# Runs inside the SCALE-Sim environment. Uses the API rather than `python -m scalesim.scale`,
# whose main hard-codes save_disk_space=False (it would write every SRAM/DRAM trace CSV, GBs
# for ResNet-18) whatever -s says; verbose=False drops the per-layer prints and tqdm bars.
_DRIVER = r'''
import json, sys, time
t0 = time.perf_counter()
from importlib.metadata import version
from scalesim.scale_sim import scalesim
t_import = time.perf_counter() - t0
a = json.loads(sys.argv[1])
s = scalesim(save_disk_space=True, verbose=False, config=a["config"], topology=a["topology"],
             layout=a["layout"], input_type_gemm=False)
t1 = time.perf_counter()
s.run_scale(top_path=a["out_dir"])
t_sim = time.perf_counter() - t1
per = []
for obj in s.runner.single_layer_sim_object_list:
    cs = obj.compute_system
    items = obj.get_compute_report_items()
    row_fold = getattr(cs, "row_fold_demand_matrices", cs.row_fold)
    per.append({"Sr": int(cs.Sr), "Sc": int(cs.Sc), "T": int(cs.T), "row_fold": int(row_fold),
                "col_fold": int(cs.col_fold),
                "ofmap_demand_rows": int(cs.ofmap_demand_matrix.shape[0]),
                "total_cycles_incl_prefetch": int(items[0]), "total_cycles": int(items[1]),
                "stall_cycles": int(items[2])})
with open(a["result"], "w") as f:
    json.dump({"version": version("scalesim"), "numpy": version("numpy"), "import_s": t_import,
               "sim_s": t_sim, "python": sys.version.split()[0], "per_layer": per}, f)
'''


def parse_compute_report(path: str) -> List[Dict]:
    """COMPUTE_REPORT.csv: LayerID, Total Cycles (incl. prefetch), Total Cycles, Stall Cycles,
    Overall Util %, Mapping Efficiency %, Compute Util %."""
    out = []
    with open(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        for row in reader:
            vals = [v.strip() for v in row]
            if not vals or not vals[0]:
                continue
            d = dict(zip(header, vals))
            out.append({
                "layer_id": int(d["LayerID"]),
                "total_cycles_incl_prefetch": int(float(d["Total Cycles (incl. prefetch)"])),
                "total_cycles": int(float(d["Total Cycles"])),
                "stall_cycles": int(float(d["Stall Cycles"])),
                "overall_util_pct": float(d["Overall Util %"]),
                "mapping_efficiency_pct": float(d["Mapping Efficiency %"]),
                "compute_util_pct": float(d["Compute Util %"]),
            })
    return out


def run_scalesim(layers: Sequence[Dict], rows: int = 32, cols: int = 32, dataflow: str = "os",
                 venv: Optional[str] = None, keep_dir: Optional[str] = None, create_venv: bool = True,
                 sram_kb: Sequence[int] = (64, 64, 64), timeout: Optional[float] = None) -> Dict:
    """Run SCALE-Sim on conv ``layers`` (dicts as from resnet18_conv_layers) in one process.

    Returns {"per_layer": [...], "wall_s", "sim_s", "import_s", "scalesim_version", ...}.
    wall_s is the whole subprocess (interpreter start, import, simulation, reports) measured
    here; sim_s is scalesim.run_scale() alone, measured inside. Per layer: the GEMM view
    M, K, N as SCALE-Sim mapped it (from its compute unit's Sr, Sc, T), compute_cycles (the
    report's "Total Cycles"), stall_cycles, total_cycles_incl_prefetch, utilizations, and
    the closed form with match.
    """
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
    py = ensure_scalesim_venv(venv, create=create_venv)
    work = keep_dir or tempfile.mkdtemp(prefix=f"scalesim_{dataflow}_")
    os.makedirs(work, exist_ok=True)
    try:
        cfg = os.path.join(work, f"resnet_{dataflow}.cfg")
        topo = os.path.join(work, "topology.csv")
        layout = os.path.join(work, "layout.csv")
        out_dir = os.path.join(work, "out")
        result = os.path.join(work, "driver_result.json")
        run_name = f"run_{rows}x{cols}_{dataflow}"
        write_config(cfg, rows, cols, dataflow, run_name=run_name, sram_kb=sram_kb)
        topo_rows = write_topology(topo, layers)
        write_layout(layout)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        arg = json.dumps({"config": cfg, "topology": topo, "layout": layout, "out_dir": out_dir, "result": result})
        load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        proc = subprocess.run([py, "-c", _DRIVER, arg], capture_output=True, text=True, cwd=work, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"SCALE-Sim failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(result) as f:
            drv = json.load(f)
        report = parse_compute_report(os.path.join(out_dir, run_name, "COMPUTE_REPORT.csv"))
        assert len(report) == len(layers) == len(drv["per_layer"]), "layer count mismatch"
        per_layer = []
        for L, t, rep, d in zip(layers, topo_rows, report, drv["per_layer"]):
            # SCALE-Sim's mapping: OS rows = Sr = M, cols = Sc = N, time T = K;
            #                      WS rows = Sr = K, cols = Sc = N, time T = M.
            if dataflow == "os":
                M, K, N = d["Sr"], d["T"], d["Sc"]
            else:
                M, K, N = d["T"], d["Sr"], d["Sc"]
            expect = gemm_dims(L)
            assert (M, K, N) == (expect["M"], expect["K"], expect["N"]), (L["name"], (M, K, N), expect)
            assert rep["total_cycles"] == d["total_cycles"] and rep["stall_cycles"] == d["stall_cycles"]
            f = formula_cycles(M, K, N, rows, cols, dataflow)
            fr, fc = fold_counts(M, K, N, rows, cols, dataflow)
            compute = rep["total_cycles"] - rep["stall_cycles"]
            per_layer.append({
                "name": L["name"],
                "scalesim_topology": t,
                "M": M, "K": K, "N": N,
                "folds": fr * fc, "row_folds": d["row_fold"], "col_folds": d["col_fold"],
                "scalesim_cycles": rep["total_cycles"],
                "stall_cycles": rep["stall_cycles"],
                "compute_cycles": compute,
                "total_cycles_incl_prefetch": rep["total_cycles_incl_prefetch"],
                "ofmap_demand_rows": d["ofmap_demand_rows"],
                "overall_util_pct": rep["overall_util_pct"],
                "mapping_efficiency_pct": rep["mapping_efficiency_pct"],
                "compute_util_pct": rep["compute_util_pct"],
                "formula_cycles": f,
                "match": compute == f,
            })
        return {
            "dataflow": dataflow, "rows": rows, "cols": cols,
            "per_layer": per_layer,
            "wall_s": wall, "sim_s": drv["sim_s"], "import_s": drv["import_s"], "loadavg_before": load_before,
            "scalesim_version": drv["version"], "numpy_version": drv["numpy"],
            "scalesim_python": drv["python"], "venv": os.path.dirname(os.path.dirname(py)),
            "sram_kb": list(sram_kb), "bandwidth_mode": "CALC",
        }
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)


# -- extra checks ------------------------------------------------------------------------------
def synthetic_layers() -> List[Dict]:
    """Small odd-shaped convs (stride 1 and 2, padding 0-2, 1x1 to 5x5) for array-shape checks."""
    return [_conv("s_a", 12, 5, 37, 3, 1, 1), _conv("s_b", 15, 9, 20, 3, 2, 1),
            _conv("s_c", 9, 70, 13, 1, 2, 0), _conv("s_d", 7, 3, 50, 5, 1, 2)]


def array_shape_check(venv: Optional[str] = None,
                      shapes: Sequence[Sequence[int]] = ((8, 16), (16, 8), (5, 7), (4, 4))) -> Dict:
    """The closed forms on non-square and non-power-of-two arrays (R and C roles), both dataflows."""
    rows_out = []
    for R, C in shapes:
        for df in DATAFLOWS:
            run = run_scalesim(synthetic_layers(), R, C, df, venv=venv)
            for p in run["per_layer"]:
                rows_out.append({"rows": R, "cols": C, "dataflow": df, "name": p["name"], "M": p["M"], "K": p["K"],
                                 "N": p["N"], "scalesim_cycles": p["scalesim_cycles"],
                                 "stall_cycles": p["stall_cycles"], "formula_cycles": p["formula_cycles"],
                                 "ofmap_demand_rows": p["ofmap_demand_rows"], "match": p["match"]})
    return {"cases": rows_out, "all_match": all(r["match"] for r in rows_out)}


_TOPO_PROBE = r"""
import json, sys
from scalesim.topology_utils import topologies
t = topologies()
for name, h, w, kh, kw, c, n, s in json.loads(sys.argv[1]):
    t.append_topo_arrays(name, [name, h, w, kh, kw, c, n, s, s, 1, 1])
t.num_layers = len(t.topo_arrays)
t.topo_load_flag = True
t.topo_calc_hyperparams()
print(json.dumps([[int(x) for x in e[:2]] for e in t.layers_calculated_hyperparams]))
"""


def padding_check(layers: Sequence[Dict], venv: Optional[str] = None) -> Dict:
    """SCALE-Sim's own output size (topology_utils) for two ways of giving a padded conv:
    the IFMAP we pass, (Ho-1)*s+k, and the naive padded size H+2p; against PyTorch's Ho."""
    py = ensure_scalesim_venv(venv)
    probe = []
    for L in layers:
        h, w = scalesim_ifmap_hw(L)
        p = L["padding"]
        probe.append([L["name"] + "_ours", h, w, L["kernel_h"], L["kernel_w"], L["in_c"], L["out_c"], L["stride"]])
        probe.append([L["name"] + "_naive", L["in_h"] + 2 * p, L["in_w"] + 2 * p, L["kernel_h"], L["kernel_w"],
                      L["in_c"], L["out_c"], L["stride"]])
    r = subprocess.run([py, "-c", _TOPO_PROBE, json.dumps(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"SCALE-Sim topology probe failed:\n{r.stderr[-4000:]}")
    outs = json.loads(r.stdout)
    cases = []
    for i, L in enumerate(layers):
        ours, naive = outs[2 * i], outs[2 * i + 1]
        cases.append({"name": L["name"], "torch_out": [L["out_h"], L["out_w"]],
                      "scalesim_ifmap": list(scalesim_ifmap_hw(L)), "scalesim_out": ours,
                      "naive_ifmap": [L["in_h"] + 2 * L["padding"], L["in_w"] + 2 * L["padding"]],
                      "naive_scalesim_out": naive,
                      "ours_ok": ours == [L["out_h"], L["out_w"]],
                      "naive_ok": naive == [L["out_h"], L["out_w"]]})
    return {"cases": cases, "all_ours_ok": all(c["ours_ok"] for c in cases),
            "naive_wrong": [c["name"] for c in cases if not c["naive_ok"]]}


# -- results ---------------------------------------------------------------------------------
def build_results(layers: Sequence[Dict], runs: Dict[str, Dict], rows: int, cols: int,
                  checks: Optional[Dict] = None) -> Dict:
    out_layers = []
    for i, L in enumerate(layers):
        entry = dict(L)
        entry.update(gemm_dims(L))
        h, w = scalesim_ifmap_hw(L)
        entry["scalesim_ifmap_h"], entry["scalesim_ifmap_w"] = h, w
        for df, run in runs.items():
            p = run["per_layer"][i]
            entry[df] = {k: p[k] for k in ("scalesim_cycles", "stall_cycles", "compute_cycles", "formula_cycles",
                                           "match", "folds", "ofmap_demand_rows", "total_cycles_incl_prefetch",
                                           "overall_util_pct", "mapping_efficiency_pct", "compute_util_pct")}
        out_layers.append(entry)
    totals = {}
    for df, run in runs.items():
        pl = run["per_layer"]
        totals[df] = {
            "scalesim_cycles": sum(p["scalesim_cycles"] for p in pl),
            "stall_cycles": sum(p["stall_cycles"] for p in pl),
            "formula_cycles": sum(p["formula_cycles"] for p in pl),
            "layers_matching": sum(p["match"] for p in pl),
            "layers": len(pl),
            "all_match": all(p["match"] for p in pl),
            # the -1: cycles reported = OFMAP demand rows (one per cycle) - 1
            "cycles_equal_demand_rows_minus_1": all(p["scalesim_cycles"] == p["ofmap_demand_rows"] - 1 for p in pl),
            "wall_s": round(run["wall_s"], 3),
            "sim_s": round(run["sim_s"], 3),
            "import_s": round(run["import_s"], 3),
            "loadavg_1min_before": run.get("loadavg_before"),
        }
    any_run = next(iter(runs.values()))
    return {
        "what": "SCALE-Sim 3.0 compute cycles on torchvision ResNet-18's convolutions (224x224, batch 1) "
                "against the closed forms in DESIGN.md",
        "scalesim_version": any_run["scalesim_version"],
        "scalesim_numpy": any_run["numpy_version"],
        "scalesim_python": any_run["scalesim_python"],
        "array": {"rows": rows, "cols": cols},
        "batch": 1,
        "config": {"sram_kb_ifmap_filter_ofmap": any_run["sram_kb"], "bandwidth_mode": any_run["bandwidth_mode"],
                   "save_traces": False, "verbose": False},
        "formulas": {
            "os": "ceil(M/R)*ceil(N/C)*(K+R+C-2) - 1",
            "ws": "ceil(K/R)*ceil(N/C)*(M+2R+C-2) - 1",
            "minus_one": "SCALE-Sim reports the 0-based cycle index of the last OFMAP write, i.e. its number "
                         "of demand rows minus one, once per layer",
        },
        "padding": "SCALE-Sim's IFMAP is given as (Ho-1)*s+k (the padded extent the windows touch), so its "
                   "ceil((H-k+s)/s) equals PyTorch's Ho",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "totals": totals,
        "layers": out_layers,
        "checks": checks or {},
    }


def to_markdown(res: Dict) -> str:
    dfs = [df for df in DATAFLOWS if df in res["totals"]]
    R, C = res["array"]["rows"], res["array"]["cols"]
    lines = [
        f"# SCALE-Sim {res['scalesim_version']} on ResNet-18 ({R}x{C} array)",
        "",
        "torchvision ResNet-18 convolutions, 224x224, batch 1; GEMM M = output pixels, K = kh*kw*Cin, "
        "N = Cout. SCALE-Sim cycles = COMPUTE_REPORT.csv \"Total Cycles\" (stall cycles 0 in CALC "
        "bandwidth mode). Formulas: OS `ceil(M/R)*ceil(N/C)*(K+R+C-2) - 1`, "
        "WS `ceil(K/R)*ceil(N/C)*(M+2R+C-2) - 1`. Made by `python benchmarks/scalesim_reference.py --save`.",
        "",
    ]
    head = "| layer | M | K | N |"
    sep = "|---|---:|---:|---:|"
    for df in dfs:
        u = df.upper()
        head += f" {u} SCALE-Sim | {u} formula | {u} match |"
        sep += "---:|---:|:---:|"
    lines += [head, sep]
    for L in res["layers"]:
        row = f"| {L['name']} | {L['M']} | {L['K']} | {L['N']} |"
        for df in dfs:
            d = L[df]
            row += f" {d['scalesim_cycles']} | {d['formula_cycles']} | {'yes' if d['match'] else 'NO'} |"
        lines.append(row)
    row = "| **total** | | | |"
    for df in dfs:
        t = res["totals"][df]
        row += f" {t['scalesim_cycles']} | {t['formula_cycles']} | {t['layers_matching']}/{t['layers']} |"
    lines.append(row)
    lines += ["", "| dataflow | SCALE-Sim wall time (s) | of which run_scale (s) | stall cycles | load avg before |",
              "|---|---:|---:|---:|---:|"]
    for df in dfs:
        t = res["totals"][df]
        lines.append(f"| {df.upper()} | {t['wall_s']:.1f} | {t['sim_s']:.1f} | {t['stall_cycles']} | "
                     f"{t.get('loadavg_1min_before')} |")
    lines += ["", "Every layer's SCALE-Sim cycles equal its number of OFMAP demand rows (one per cycle) minus one: "
                  + ", ".join(f"{df.upper()} {'yes' if res['totals'][df].get('cycles_equal_demand_rows_minus_1') else 'NO'}"
                              for df in dfs) + "."]
    ch = res.get("checks") or {}
    if ch:
        pad, arr = ch["padding"], ch["array_shapes"]
        lines += ["", "Checks: SCALE-Sim's output size from the IFMAP we pass ((Ho-1)*s+k) equals PyTorch's on "
                      f"{sum(c['ours_ok'] for c in pad['cases'])}/{len(pad['cases'])} layers; the naive H+2p would be "
                      f"wrong on {len(pad['naive_wrong'])} ({', '.join(pad['naive_wrong'])}). Closed forms on "
                      f"non-square/odd arrays ({', '.join(sorted({'%dx%d' % (c['rows'], c['cols']) for c in arr['cases']}))},"
                      f" small odd convs, both dataflows): {sum(c['match'] for c in arr['cases'])}/{len(arr['cases'])} exact."]
    lines += ["", f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs (shared), "
                  f"SCALE-Sim in its own venv (Python {res['scalesim_python']}, numpy {res['scalesim_numpy']}), "
                  f"{res['date']}.", ""]
    return "\n".join(lines)


def load_results(path: str = DEFAULT_JSON) -> Dict:
    """The saved results (so a comparison need not rerun SCALE-Sim for minutes)."""
    with open(path) as f:
        return json.load(f)


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--cols", type=int, default=32)
    ap.add_argument("--dataflow", nargs="+", default=list(DATAFLOWS), choices=DATAFLOWS)
    ap.add_argument("--venv", default=None, help="SCALE-Sim virtualenv (default $SCALESIM_VENV or %s)" % default_venv())
    ap.add_argument("--layers", nargs="+", default=None, help="only these layer names")
    ap.add_argument("--json", default=None, help="write the results JSON here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--save", action="store_true", help="write to benchmarks/results/scalesim_resnet18.{json,md}")
    ap.add_argument("--keep", default=None, help="keep SCALE-Sim's inputs and reports under this folder")
    ap.add_argument("--extra-checks", action="store_true",
                    help="also check padding handling and non-square arrays (on with --save)")
    ap.add_argument("--formulas-only", action="store_true", help="print M, K, N and the closed forms, no SCALE-Sim")
    args = ap.parse_args(argv)

    layers = resnet18_conv_layers()
    if args.layers:
        want = set(args.layers)
        layers = [L for L in layers if L["name"] in want]
        missing = want - {L["name"] for L in layers}
        if missing:
            ap.error("unknown layers: " + ", ".join(sorted(missing)))

    if args.formulas_only:
        print(f"{'layer':24s} {'M':>6s} {'K':>6s} {'N':>5s} " + " ".join(f"{d.upper():>10s}" for d in args.dataflow))
        for L in layers:
            g = gemm_dims(L)
            cyc = [formula_cycles(g["M"], g["K"], g["N"], args.rows, args.cols, d) for d in args.dataflow]
            print(f"{L['name']:24s} {g['M']:6d} {g['K']:6d} {g['N']:5d} " + " ".join(f"{c:10d}" for c in cyc))
        return 0

    runs = {}
    for df in args.dataflow:  # one at a time: the machine's cores are shared
        keep = os.path.join(args.keep, df) if args.keep else None
        print(f"running SCALE-Sim {df.upper()} on {len(layers)} layers, {args.rows}x{args.cols} ...", flush=True)
        runs[df] = run_scalesim(layers, args.rows, args.cols, df, venv=args.venv, keep_dir=keep)
        t = runs[df]
        print(f"  done in {t['wall_s']:.1f} s (run_scale {t['sim_s']:.1f} s)", flush=True)
    checks = {}
    if args.extra_checks or args.save:
        print("extra checks: padding, non-square arrays ...", flush=True)
        checks["padding"] = padding_check(layers, venv=args.venv)
        checks["array_shapes"] = array_shape_check(venv=args.venv)
    res = build_results(layers, runs, args.rows, args.cols, checks)
    md = to_markdown(res)
    print(md)
    json_path = args.json or (DEFAULT_JSON if args.save else None)
    md_path = args.md or (DEFAULT_MD if args.save else None)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    if md_path:
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        with open(md_path, "w") as f:
            f.write(md)
    ok = all(t["all_match"] for t in res["totals"].values())
    if checks:
        ok = ok and checks["padding"]["all_ours_ok"] and checks["array_shapes"]["all_match"]
    if not ok:
        print("MISMATCH between SCALE-Sim and the closed forms", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
