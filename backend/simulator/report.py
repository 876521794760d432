"""The performance report of one inference: per layer and in total.

Per layer: op, shapes, precision, MACs, cycles (span from its first instruction's start
to its last one's end, busy cycles per unit, stall cycles), matrix utilization (MACs
over the array's MAC slots in its busy cycles), SRAM and DRAM bytes, and energy by
component (MAC, vector, SRAM, DRAM, and static power over the layer's span), and for
matrix layers their sparsity (weight density, N:M pattern, zero activations) and what
it saved. Totals add the whole run's static energy and split MAC energy by precision;
HOST ops are listed with the reason each runs on the host. `format_report` prints the
tables; `report` is also plain JSON data.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..isa import Op, Unit
from ..program import Program
from .energy import instruction_cost
from .timing import Timeline

__all__ = ["build_report", "format_report"]

_COMPONENTS = ("mac", "vector", "sram", "dram", "static")


def build_report(program: Program, target, timeline: Timeline, samples: int,
                 measured: Optional[Dict[str, Dict[int, float]]] = None) -> Dict[str, Any]:
    """`measured`: from the functional run, per MATMUL index, "mac_pairs" (MACs with both
    operands nonzero) and "act_nonzero" (the fraction of nonzero A operands)."""
    from .timing import matmul_cycles

    measured = measured or {}
    pairs, act_nz = measured.get("mac_pairs", {}), measured.get("act_nonzero", {})
    instrs = program.instructions
    static_pj_per_cycle = target.energy.static_power_mw * 1e-3 / (target.clock_mhz * 1e6) * 1e12
    n_layers = len(program.layers)
    acc = [{"macs": 0, "sram": 0, "dram": 0, "energy": dict.fromkeys(_COMPONENTS, 0.0),
            "busy": {u.name.lower(): 0 for u in Unit}, "stall": 0, "start": None, "end": 0, "count": 0,
            "effective": 0.0, "dense_macs": 0, "dense_cycles": 0, "a_elems": 0, "a_nonzero": 0.0}
           for _ in range(n_layers)]
    rows, cols = target.matrix.rows, target.matrix.cols
    for i, ins in enumerate(instrs):
        rec = acc[ins.layer]
        cost = instruction_cost(ins, target, pairs.get(i))
        rec["macs"] += cost.macs
        rec["effective"] += cost.macs_effective
        if ins.op == Op.MATMUL:
            a = ins.args
            m, k = a["m0"] * a["m1"], a["k0"] * a["k1"] * a["k2"]
            rec["dense_macs"] += m * k * a["n"]
            rec["dense_cycles"] += matmul_cycles(m, k, a["n"], rows, cols, target.matrix.dataflow, bool(a["fill"]))
            rec["a_elems"] += m * k
            rec["a_nonzero"] += m * k * act_nz.get(i, 1.0)
        rec["sram"] += sum(cost.sram_bytes.values())
        rec["dram"] += cost.dram_bytes
        for k, v in cost.energy.items():
            rec["energy"][k] += v
        u = Unit(int(timeline.units[i])).name.lower()
        rec["busy"][u] += int(timeline.end[i] - timeline.start[i])
        rec["stall"] += int(timeline.stall[i])
        s = int(timeline.start[i])
        rec["start"] = s if rec["start"] is None else min(rec["start"], s)
        rec["end"] = max(rec["end"], int(timeline.end[i]))
        rec["count"] += 1
    layers: List[Dict[str, Any]] = []
    for meta, rec in zip(program.layers, acc):
        span = 0 if rec["start"] is None else rec["end"] - rec["start"]
        rec["energy"]["static"] = span * static_pj_per_cycle
        mat = rec["busy"]["matrix"]
        sparsity = None
        if rec["dense_macs"]:
            mac_pj = rec["energy"]["mac"] / rec["effective"] if rec["effective"] else 0.0
            sparsity = {
                "weight_density": meta.get("weight_density"), "nm": meta.get("nm"),
                "activation_zeros": 1.0 - rec["a_nonzero"] / rec["a_elems"],
                "macs_performed": rec["macs"], "macs_nonzero": round(rec["effective"], 1),
                "saved_cycles": rec["dense_cycles"] - mat,
                "saved_mac_energy_pj": round((rec["dense_macs"] - rec["effective"]) * mac_pj, 3),
                "saved_dram_bytes": meta.get("weight_dram_bytes_dense", 0) - meta.get("weight_dram_bytes", 0),
            }
        layers.append({
            "name": meta["name"], "op": meta["op"], "unit": meta["unit"], "inputs": meta["inputs"],
            "output": meta["output"], "precision": meta["precision"], "macs": meta.get("macs") or rec["macs"],
            "instructions": rec["count"],
            "cycles": {"span": span, "matrix": mat, "vector": rec["busy"]["vector"], "dma": rec["busy"]["dma"],
                       "stall": rec["stall"]},
            "utilization": (rec["macs"] / (mat * rows * cols)) if mat and meta["unit"] == "matrix" else None,
            "sram_bytes": rec["sram"], "dram_bytes": rec["dram"],
            "energy_pj": {k: round(v, 3) for k, v in rec["energy"].items()},
            "host": meta["unit"] == "host", "reason": meta.get("reason", ""), "sparsity": sparsity,
        })
    total_cycles = timeline.total
    energy = {k: float(sum(r["energy"][k] for r in acc)) for k in _COMPONENTS if k != "static"}
    energy["static"] = total_cycles * static_pj_per_cycle
    energy["total"] = float(sum(energy.values()))
    busy = {u.name.lower(): timeline.busy(u) for u in Unit}
    total_macs = int(sum(r["macs"] for r in acc))
    return {
        "target": target.name, "clock_mhz": target.clock_mhz, "samples": samples,
        "array": f"{rows}x{cols} {target.matrix.dataflow}",
        "total": {
            "cycles": total_cycles, "time_us": total_cycles / target.clock_mhz,
            "busy": busy, "utilization": {k: (v / total_cycles if total_cycles else 0.0) for k, v in busy.items()},
            "matrix_utilization": (total_macs / (busy["matrix"] * rows * cols)) if busy["matrix"] else None,
            "stall": int(timeline.stall.sum()), "macs": int(sum(l["macs"] for l in layers)),
            "macs_performed": total_macs,
            "sram_bytes": int(sum(r["sram"] for r in acc)), "dram_bytes": int(sum(r["dram"] for r in acc)),
            "energy_pj": {k: round(v, 3) for k, v in energy.items()},
            "instructions": len(instrs),
        },
        "layers": layers,
        "host_ops": [{"name": l["name"], "op": l["op"], "reason": l["reason"]} for l in layers if l["host"]],
    }


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def format_report(rep: Dict[str, Any]) -> str:
    head = (f"{'#':>3} {'layer':<24} {'op':<12} {'input':<13} {'output':<13} {'unit':<6} {'prec':<10} {'MACs':>6} "
            f"{'cycles':>8} {'matrix':>8} {'vector':>7} {'dma':>8} {'stall':>8} {'util':>5} {'SRAM B':>6} "
            f"{'DRAM B':>6} {'E mac':>7} {'E vec':>6} {'E sram':>7} {'E dram':>8} {'E stat':>6} {'E nJ':>8}")
    lines = [f"rain-sim report: target {rep['target']} ({rep['array']}, {rep['clock_mhz']:g} MHz), "
             f"per inference ({rep['samples']} simulated); energies in nJ", head, "-" * len(head)]
    for i, l in enumerate(rep["layers"]):
        if l["unit"] in ("-", "host"):
            continue
        c = l["cycles"]
        util = f"{100 * l['utilization']:.0f}%" if l["utilization"] is not None else "-"
        e = l["energy_pj"]
        shape = "x".join(map(str, l["output"]))
        first = "x".join(map(str, l["inputs"][0])) + ("+" if len(l["inputs"]) > 1 else "") if l["inputs"] else "-"
        lines.append(f"{i:>3} {l['name'][:24]:<24} {l['op'][:12]:<12} {first[:13]:<13} {shape[:13]:<13} "
                     f"{l['unit']:<6} {str(l['precision'])[:10]:<10} {_si(l['macs']):>6} {c['span']:>8} "
                     f"{c['matrix']:>8} {c['vector']:>7} {c['dma']:>8} {c['stall']:>8} {util:>5} "
                     f"{_si(l['sram_bytes']):>6} {_si(l['dram_bytes']):>6} {e['mac'] / 1e3:>7.2f} "
                     f"{e['vector'] / 1e3:>6.2f} {e['sram'] / 1e3:>7.2f} {e['dram'] / 1e3:>8.2f} "
                     f"{e['static'] / 1e3:>6.2f} {sum(e.values()) / 1e3:>8.2f}")
    t = rep["total"]
    e = t["energy_pj"]
    mu = f"{100 * t['matrix_utilization']:.0f}%" if t["matrix_utilization"] is not None else "-"
    lines += [
        "-" * len(head),
        f"total: {t['cycles']} cycles = {t['time_us']:.2f} us; {_si(t['macs'])} MACs; {t['instructions']} instructions",
        f"units busy: matrix {t['busy']['matrix']} ({100 * t['utilization']['matrix']:.0f}% of the run, array "
        f"utilization {mu}), vector {t['busy']['vector']} ({100 * t['utilization']['vector']:.0f}%), "
        f"dma {t['busy']['dma']} ({100 * t['utilization']['dma']:.0f}%); stalls {t['stall']}",
        f"traffic: SRAM {_si(t['sram_bytes'])}B, DRAM {_si(t['dram_bytes'])}B",
        f"energy: {e['total'] / 1e6:.4f} uJ = MAC {e['mac'] / 1e3:.2f} nJ{_by_precision(rep)} + vector "
        f"{e['vector'] / 1e3:.2f} nJ + SRAM {e['sram'] / 1e3:.2f} nJ + DRAM {e['dram'] / 1e3:.2f} nJ + static "
        f"{e['static'] / 1e3:.2f} nJ",
    ]
    sparse = [l for l in rep["layers"] if l.get("sparsity")]
    if sparse:
        nm = [f"{l['name']} {l['sparsity']['nm']}" for l in sparse if l["sparsity"]["nm"]]
        performed = sum(l["sparsity"]["macs_performed"] for l in sparse)
        nonzero = sum(l["sparsity"]["macs_nonzero"] for l in sparse)
        lines.append(
            f"sparsity: {len(nm)} layers with N:M weights{' (' + ', '.join(nm[:6]) + (' ...' if len(nm) > 6 else '') + ')' if nm else ''}; "
            f"{100 * (1 - nonzero / performed) if performed else 0:.1f}% of performed MACs have a zero operand (no MAC "
            f"energy); saved vs dense: {sum(l['sparsity']['saved_cycles'] for l in sparse)} matrix cycles, "
            f"{sum(l['sparsity']['saved_mac_energy_pj'] for l in sparse) / 1e3:.2f} nJ MAC energy, "
            f"{_si(sum(l['sparsity']['saved_dram_bytes'] for l in sparse))}B of weight DRAM traffic")
    if any(l["sparsity"]["nm"] or (l["sparsity"]["weight_density"] or 1.0) < 1.0 or
           l["sparsity"]["activation_zeros"] > 0 for l in sparse):
        lines += _sparsity_table(rep)
    if rep["host_ops"]:
        counts: Dict[str, int] = {}
        for h in rep["host_ops"]:
            counts[h["op"]] = counts.get(h["op"], 0) + 1
        lines.append(f"host ops ({len(rep['host_ops'])}, run on the host, not in the cycle count): " +
                     ", ".join(f"{n} {op}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])) +
                     " (each with its reason in --report-json)")
    return "\n".join(lines) + "\n"


def _by_precision(rep: Dict[str, Any]) -> str:
    """' (a8w8 1.20, a8w4 0.14)': MAC energy per operand precision, when there are several."""
    by: Dict[str, float] = {}
    for l in rep["layers"]:
        if l["energy_pj"]["mac"]:
            by[str(l["precision"])] = by.get(str(l["precision"]), 0.0) + l["energy_pj"]["mac"]
    if len(by) < 2:
        return f" ({next(iter(by))})" if by else ""
    return " (" + ", ".join(f"{p} {v / 1e3:.2f}" for p, v in sorted(by.items(), key=lambda kv: -kv[1])) + ")"


def _sparsity_table(rep: Dict[str, Any]) -> List[str]:
    """Per matrix layer: weight density, N:M pattern, zero activations, and what they saved."""
    head = (f"{'#':>3} {'layer':<24} {'weights':>7} {'N:M':>5} {'act 0s':>6} {'cycles saved':>12} "
            f"{'MAC nJ saved':>12} {'DRAM B saved':>12}")
    lines = ["sparsity per layer (weights: density of the weights kept; act 0s: zero A operands):", head]
    for i, l in enumerate(rep["layers"]):
        sp = l.get("sparsity")
        if not sp:
            continue
        density = f"{100 * sp['weight_density']:.0f}%" if sp["weight_density"] is not None else "-"
        lines.append(f"{i:>3} {l['name'][:24]:<24} {density:>7} {sp['nm'] or '-':>5} "
                     f"{100 * sp['activation_zeros']:>5.0f}% {sp['saved_cycles']:>12} "
                     f"{sp['saved_mac_energy_pj'] / 1e3:>12.2f} {_si(sp['saved_dram_bytes']):>12}")
    return lines
