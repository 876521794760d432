"""Lowering: an integer graph (after `lower-integer`) to a rain-sim program.

Stages, each with a name and a text dump (`--dump STAGE`):
  partition     the graph as accelerator layers, aliases, lookup tables, interface
                conversions and HOST ops (plan.py)
  schedule      per layer, the tiling and loop order chosen (matrix.py, vector.py;
                candidate tilings ranked by the cost model in _tiling.pyx)
  allocation    DRAM tensors placed by liveness across layers, SRAM tiles by liveness
                within each layer (_alloc.pyx), the peak use of each buffer
  instructions  the instruction stream with its dependency tokens (_deps.pyx), as
                assembly
  binary        the encoded program (header, sections, sizes)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np

from ..isa import Buf, dtype_code, encode, format_asm
from ..program import Program, TensorSlot
from ._alloc import allocate
from .context import Context, Slot
from .emitter import Emitter, verify_tokens
from .host import lower_host
from .matrix import NoTilingError, lower_conv, lower_gemm
from .plan import Layer, LoweringError, Plan, plan_layers
from .vector import lower_dwconv, lower_move, lower_pointwise, lower_pool

__all__ = ["compile_program", "STAGES", "LoweringError"]

STAGES = ("partition", "schedule", "allocation", "instructions", "binary")
_UNIT_OF = {"conv": "matrix", "gemm": "matrix", "dwconv": "vector", "pool": "vector", "pointwise": "vector",
            "move": "dma", "host": "host", "alias": "-"}


def compile_program(model, target, dump: Optional[Callable[[str, str], None]] = None,
                    check_tokens: bool = False) -> Program:
    """Lower `model` (a qcompile Model holding an integer graph) for `target`.
    `check_tokens` re-verifies every memory hazard against the tokens (slow; tests)."""
    plan = plan_layers(model)
    if dump:
        dump("partition", _format_partition(plan))
    tensors, slots, arena = _place_tensors(plan)
    emitter = Emitter(target)
    ctx = Context(target, model, plan, emitter, slots, tensors)
    host_ops = []
    for i, layer in enumerate(plan.layers):
        ctx.layer = i
        kind = layer.kind
        if kind == "alias":
            layer.attrs.update(precision="-", macs=0)
            continue
        if kind in ("conv", "gemm"):
            try:
                (lower_conv if kind == "conv" else lower_gemm)(ctx, layer)
            except NoTilingError as e:      # too large for the buffers: the host runs it
                layer.kind, layer.reason = "host", str(e)
                lower_host(ctx, layer, host_ops, plan.shapes, plan.dtypes)
        elif kind == "dwconv":
            lower_dwconv(ctx, layer)
        elif kind == "pool":
            lower_pool(ctx, layer)
        elif kind == "pointwise":
            lower_pointwise(ctx, layer)
        elif kind == "move":
            lower_move(ctx, layer)
        else:
            lower_host(ctx, layer, host_ops, plan.shapes, plan.dtypes)
    if dump:
        dump("schedule", "\n".join(ctx.schedule) + "\n")
        dump("allocation", _format_allocation(tensors, arena, emitter))
    instrs = emitter.finish(arena)
    if check_tokens:
        problems = verify_tokens(instrs, emitter.physical)
        if problems:
            raise LoweringError(f"internal error (a bug): {len(problems)} unordered hazards, first: {problems[0]}")
    if dump:
        dump("instructions", format_asm(instrs))
    program = Program(
        target_name=target.name, target_fingerprint=target.fingerprint(), code=encode(instrs), const=ctx.const.finish(),
        arena_size=arena, tensors=tensors, inputs=[_interface(s, slots) for s in plan.inputs],
        outputs=[_interface(s, slots) for s in plan.outputs], host_ops=host_ops,
        layers=[_layer_record(layer, plan) for layer in plan.layers],
        info={"sram_peak": {b.name: int(emitter.peak[b]) for b in Buf}})
    if dump:
        dump("binary", _format_binary(program))
    return program


def _place_tensors(plan: Plan):
    """DRAM slots for every activation tensor, placed by liveness over the layers;
    aliases share their source's slot."""
    n_layers = len(plan.layers)
    root: Dict[int, object] = {}

    def find(v):
        while id(v) in root:
            v = root[id(v)]
        return v

    for layer in plan.layers:
        if layer.kind == "alias":
            root[id(layer.outputs[0])] = layer.inputs[0]
    first: Dict[int, int] = {}
    last: Dict[int, int] = {}
    values: Dict[int, object] = {}

    def touch(v, at):
        r = find(v)
        values[id(r)] = r
        first[id(r)] = min(first.get(id(r), at), at)
        last[id(r)] = max(last.get(id(r), at), at)

    for spec in plan.inputs:
        touch(spec["value"], -1)
    for i, layer in enumerate(plan.layers):
        for v in list(layer.inputs) + list(layer.outputs):
            if v is not None and not plan.is_const(v):
                touch(v, i)
    for spec in plan.outputs:
        touch(spec["value"], n_layers)
    ids = list(values)
    sizes = []
    for k in ids:
        v = values[k]
        sizes.append(int(np.prod(plan.shapes[k], dtype=np.int64)) * np.dtype(plan.dtypes[k]).itemsize)
    offsets, peak = allocate(np.array([first[k] for k in ids], np.int64), np.array([last[k] for k in ids], np.int64),
                             np.array(sizes, np.int64), 1 << 40, 64)
    tensors: List[TensorSlot] = []
    slots: Dict[int, Slot] = {}
    index_of: Dict[int, int] = {}
    for k, off in zip(ids, offsets.tolist()):
        v = values[k]
        index_of[k] = len(tensors)
        tensors.append(TensorSlot(v.name, int(off), dtype_code(plan.dtypes[k]), list(plan.shapes[k])))
    # every value (aliases included) maps to a slot; an alias gets its own table entry
    for layer in plan.layers:
        for v in list(layer.inputs) + list(layer.outputs):
            if v is None or plan.is_const(v) or id(v) in slots:
                continue
            r = find(v)
            idx = index_of[id(r)]
            if r is not v:
                tensors.append(TensorSlot(v.name, tensors[idx].addr, tensors[idx].dtype, list(plan.shapes[id(v)])))
                idx = len(tensors) - 1
            t = tensors[idx]
            slots[id(v)] = Slot(idx, t.addr, t.dtype, tuple(t.shape))
    for spec in plan.inputs + plan.outputs:
        v = spec["value"]
        if id(v) not in slots:
            r = find(v)
            idx = index_of[id(r)]
            t = tensors[idx]
            slots[id(v)] = Slot(idx, t.addr, t.dtype, tuple(plan.shapes[id(v)]))
    return tensors, slots, int(peak)


def _interface(spec, slots) -> dict:
    out = {"name": spec["name"], "tensor": slots[id(spec["value"])].index, "shape": spec["shape"],
           "float": bool(spec["float"])}
    if spec["float"]:
        scale = np.asarray(spec["scale"], np.float32)
        zp = spec["zero_point"]
        out.update(scale=scale.reshape(-1).tolist(), scale_shape=list(scale.shape),
                   zero_point=None if zp is None else np.asarray(zp).reshape(-1).tolist(),
                   zero_point_dtype=None if zp is None else str(np.asarray(zp).dtype), axis=spec["axis"])
        if spec.get("out_min") is not None:   # a narrow type (int4) in an 8-bit container
            out.update(out_min=int(spec["out_min"]), out_max=int(spec["out_max"]))
    if "dtype" in spec:
        out["dtype"] = spec["dtype"]
    return out


def _layer_record(layer: Layer, plan: Plan) -> dict:
    shapes = [list(plan.shapes.get(id(v), ())) for v in layer.inputs if v is not None and not plan.is_const(v)]
    return {"name": layer.name, "op": layer.op_type, "kind": layer.kind, "unit": _UNIT_OF[layer.kind],
            "inputs": shapes, "output": list(plan.shapes.get(id(layer.outputs[0]), ())),
            "precision": layer.attrs.get("precision", "-"), "macs": int(layer.attrs.get("macs", 0)),
            "weight_type": layer.attrs.get("weight_type"), "reason": layer.reason,
            **{k: layer.attrs[k] for k in ("weight_density", "nm", "weight_dram_bytes", "weight_dram_bytes_dense")
               if k in layer.attrs}}


def _format_partition(plan: Plan) -> str:
    lines = [f"{'#':>3}  {'kind':<9} {'unit':<6} {'op':<14} {'name':<28} output"]
    for i, layer in enumerate(plan.layers):
        out = plan.shapes.get(id(layer.outputs[0]), ())
        note = f"  ({layer.reason})" if layer.reason else ""
        lines.append(f"{i:>3}  {layer.kind:<9} {_UNIT_OF[layer.kind]:<6} {layer.op_type[:14]:<14} "
                     f"{layer.name[:28]:<28} {list(out)}{note}")
    for spec in plan.inputs:
        how = "quantized on entry" if spec["float"] else "fed as is"
        lines.append(f"input  {spec['name']} {spec['shape']}: {how}")
    for spec in plan.outputs:
        how = "dequantized on exit" if spec["float"] else "returned as is"
        lines.append(f"output {spec['name']} {spec['shape']}: {how}")
    return "\n".join(lines) + "\n"


def _format_allocation(tensors, arena: int, emitter: Emitter) -> str:
    lines = [f"DRAM activation arena: {arena} bytes"]
    for i, t in enumerate(tensors):
        lines.append(f"  t{i:<4} 0x{t.addr:08x} {t.nbytes:>10} B  {t.dtype.name:<7} {t.shape}  %{t.name}")
    cap = emitter.capacity
    for b in Buf:
        unit = "words" if b == Buf.ACC else "bytes"
        lines.append(f"SRAM {b.name}: peak {emitter.peak[b]} of {cap[b]} {unit}")
    return "\n".join(lines) + "\n"


def _format_binary(program: Program) -> str:
    data = program.to_bytes()
    words = program.code
    head = " ".join(f"{w & 0xFFFFFFFF:08x}" for w in words[:16].tolist())
    return (f"format RSIM v1, target {program.target_name} fingerprint {program.target_fingerprint.hex()}\n"
            f"total {len(data)} bytes: code {words.size * 4} B ({len(program.instructions)} instructions), "
            f"constants {len(program.const)} B, host ops {len(program.host_ops)}, arena {program.arena_size} B\n"
            f"code: {head}{' ...' if words.size > 16 else ''}\n")
