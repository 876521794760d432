"""The host side of a program: its HOST operations and the interface conversions.

HOST operations are one-node ONNX models; default-domain ops run in onnxruntime and
`qcompile.int` ops in the integer reference, one inference at a time, as the reference
evaluator runs them. The interface quantizes float inputs and dequantizes outputs with
ONNX QuantizeLinear / DequantizeLinear arithmetic (round half to even, float32).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ..program import Program

__all__ = ["HostRunner", "quantize_input", "dequantize_output"]


class HostRunner:
    def __init__(self, program: Program):
        self.program = program
        self._runners: Dict[int, Any] = {}

    def _runner(self, index: int):
        r = self._runners.get(index)
        if r is None:
            op = self.program.host_ops[index]
            if op.kind == "onnx":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                sess = ort.InferenceSession(op.model, opts, providers=["CPUExecutionProvider"])
                names = [i.name for i in sess.get_inputs()]
                r = ("onnx", sess, names)
            else:
                import onnx

                from ..reference import _as_model

                model = _as_model(onnx.load_from_string(op.model))
                r = ("integer", model, [v.name for v in model.graph.inputs if v.const_value is None])
            self._runners[index] = r
        return r

    def run(self, index: int, arena: np.ndarray) -> None:
        op = self.program.host_ops[index]
        kind, engine, names = self._runner(index)
        ins = [self.program.tensor_array(arena, t) for t in op.inputs]
        outs = [self.program.tensor_array(arena, t) for t in op.outputs]
        for s in range(arena.shape[0]):
            feeds = {name: np.ascontiguousarray(x[s]) for name, x in zip(names, ins)}
            if kind == "onnx":
                results = engine.run(None, feeds)
            else:
                from ..reference import run_integer_graph

                res = run_integer_graph(engine, feeds)
                results = [res[v.name] for v in engine.graph.outputs]
            for o, r in zip(outs, results):
                o[s] = np.asarray(r).reshape(o.shape[1:])


def _channel_shape(ndim: int, axis: int, size: int) -> List[int]:
    shape = [1] * ndim
    shape[axis % ndim] = size
    return shape


def quantize_input(x: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """Float samples (N, *shape) to the program's integer input, as ONNX QuantizeLinear."""
    s = np.asarray(spec["scale"], np.float32).reshape(spec.get("scale_shape", [len(spec["scale"])]))
    zdt = np.dtype(spec.get("zero_point_dtype") or np.uint8)
    z = np.zeros((), np.int64) if spec["zero_point"] is None else np.asarray(spec["zero_point"], np.int64)
    x = np.asarray(x, np.float32)
    if s.ndim and s.size > 1:
        shape = [1] + _channel_shape(x.ndim - 1, spec["axis"], s.size)
        s, z = s.reshape(shape), z.reshape(shape)
    elif s.ndim:
        s, z = s.reshape(()), z.reshape(())
    info = np.iinfo(zdt)
    lo, hi = spec.get("out_min", info.min), spec.get("out_max", info.max)   # narrow types in a container
    y = np.rint(x / s) + z.astype(np.float32)
    return np.clip(y, lo, hi).astype(zdt)


def dequantize_output(q: np.ndarray, spec: Dict[str, Any]) -> np.ndarray:
    """The program's integer output (N, *shape) to float, as ONNX DequantizeLinear."""
    s = np.asarray(spec["scale"], np.float32).reshape(spec.get("scale_shape", [len(spec["scale"])]))
    z = np.zeros((), np.int64) if spec["zero_point"] is None else np.asarray(spec["zero_point"], np.int64)
    if s.ndim and s.size > 1:
        shape = [1] + _channel_shape(q.ndim - 1, spec["axis"], s.size)
        s, z = s.reshape(shape), z.reshape(shape)
    elif s.ndim:
        s, z = s.reshape(()), z.reshape(())
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)
