"""HOST operations: nodes rain-sim lacks, packed as one-node ONNX models.

The host runs default-domain ops in onnxruntime and `qcompile.int` ops in the integer
reference, one node at a time, exactly as the reference evaluator does, so a program
with host ops stays bit-identical to the reference. Also here: tabulating a lookup-table
chain by running the chain through the reference.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.quant_math import DOMAIN

from ..program import HostOp
from .context import Context
from .plan import Layer, LoweringError

__all__ = ["lower_host", "run_chain", "host_model"]


def _node_proto(ctx: Context, node) -> onnx.NodeProto:
    """The exported NodeProto of an IR node (attributes in ONNX form)."""
    cache = ctx.__dict__.setdefault("_proto_nodes", None)
    if cache is None:
        from qcompile.onnx_io.exporter import to_proto

        proto = to_proto(ctx.model, weights_as_inputs_over=0)   # the nodes only: no copy of the weights
        cache = {tuple(n.output): n for n in proto.graph.node}
        ctx.__dict__["_proto_nodes"] = cache
        ctx.__dict__["_opsets"] = {o.domain: o.version for o in proto.opset_import}
        ctx.__dict__["_ir_version"] = proto.ir_version
    found = cache.get(tuple(v.name for v in node.outputs))
    if found is None:
        raise LoweringError(f"node {node.label}: cannot export it for the host")
    return found


def host_model(ctx: Context, nodes, inputs: List, outputs: List, shapes: Dict[int, tuple], dtypes) -> bytes:
    """An ONNX model of `nodes` with graph inputs `inputs` (values) and outputs `outputs`;
    constant inputs become initializers."""
    protos = [_node_proto(ctx, n) for n in nodes]
    inits, seen = [], set()
    for n in nodes:
        for v in n.inputs:
            if v is not None and ctx.plan.is_const(v) and v.name not in seen:
                seen.add(v.name)
                inits.append(numpy_helper.from_array(ctx.plan.const(v), v.name))

    def info(v):
        dt = helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[id(v)]))
        return helper.make_tensor_value_info(v.name, dt, list(shapes[id(v)]))

    graph = helper.make_graph(list(protos), "host", [info(v) for v in inputs], [info(v) for v in outputs],
                              initializer=inits)
    opsets = [helper.make_opsetid(d, v) for d, v in ctx.__dict__["_opsets"].items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=min(ctx.__dict__["_ir_version"], 10))
    return model.SerializeToString()


def lower_host(ctx: Context, layer: Layer, host_ops: List[HostOp], shapes, dtypes) -> None:
    node = layer.node
    acts = [v for v in node.inputs if v is not None and not ctx.plan.is_const(v)]
    ins = list(dict.fromkeys(acts))  # unique, in order
    data = host_model(ctx, [node], ins, list(node.outputs), shapes, dtypes)
    kind = "integer" if node.domain == DOMAIN else "onnx"
    in_idx = [ctx.slot(v).index for v in ins]
    out_idx = [ctx.slot(v).index for v in node.outputs]
    host_ops.append(HostOp(kind, node.op_type, layer.name, in_idx, out_idx, data))
    reads = [(ctx.slot(v).addr, ctx.tensors[ctx.slot(v).index].nbytes) for v in ins]
    writes = [(ctx.slot(v).addr, ctx.tensors[ctx.slot(v).index].nbytes) for v in node.outputs]
    ctx.emitter.begin_layer()
    ctx.emitter.host(ctx.layer, len(host_ops) - 1, reads, writes)
    ctx.emitter.finish_layer()
    layer.attrs.update(precision="host", macs=0)
    ctx.note(f"{layer.name}: HOST {node.op_type} ({layer.reason})")


def run_chain(ctx: Context, info, values: np.ndarray) -> np.ndarray:
    """Run a Dequantize -> float ops -> Quantize chain on `values` (any shape the chain's
    constants broadcast against) through the integer reference."""
    from ..reference import run_integer_graph

    src = info["source"]
    out = info["quantize"].outputs[0]
    nodes = [info["dequantize"]] + info["float_nodes"] + [info["quantize"]]
    shapes = {id(src): values.shape, id(out): values.shape}
    dtypes = {id(src): values.dtype, id(out): ctx.plan.dtypes[id(out)]}
    for n in nodes:
        for v in n.outputs:
            shapes.setdefault(id(v), values.shape)
            dtypes.setdefault(id(v), np.float32)
    data = host_model(ctx, nodes, [src], [out], shapes, dtypes)
    model = onnx.load_from_string(data)
    for vi in list(model.graph.value_info):
        model.graph.value_info.remove(vi)
    result = run_integer_graph(model, {src.name: values})
    return np.asarray(result[out.name])
