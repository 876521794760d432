"""Narrow integer types in the integer graph: tensors of fewer than 8 bits held in
int8/uint8 containers, the form the backend and the integer reference consume.

`lower-integer` computes with each tensor's true type (a 4-bit activation saturates to
[-8, 7] through its producer's out_min/out_max) and calls `widen_narrow_types` last:
  1. Activations (non-constant values) of fewer than 8 bits get the int8/uint8 type,
     quantization parameters unchanged; the true type goes to the model metadata
     `qcompile.activation_bits` ({tensor: type}).
  2. A `Quantize` writing such a tensor gets out_min/out_max, the true range (the
     container's range would not saturate it).
  3. Constants stored in a packed 4-bit ONNX type, or in a container wider than their
     true width (int16 for 8-bit weights that a Conv of int4 activations reads in the
     QDQ model), become int8/uint8 arrays. `qcompile.weight_bits` keeps the true width
     of each weight, keyed by the lowered initializer names (a weight it does not list
     gets the width of its values, i8 or u8).
Left alone: 16- and 32-bit tensors (int16 activations, int32 bias, multipliers).
"""
from __future__ import annotations

import json
from typing import Dict, Optional

import numpy as np

from qcompile.ir import INT8, UINT8, DataType, Model, TensorType, Value
from qcompile.ir.types import by_name
from qcompile.quant_math import DOMAIN, QCONV, QGEMM, QMATMUL, QUANTIZE

__all__ = ["ACTIVATION_BITS_KEY", "WEIGHT_BITS_KEY", "widen_narrow_types"]

WEIGHT_BITS_KEY = "qcompile.weight_bits"
ACTIVATION_BITS_KEY = "qcompile.activation_bits"
_WEIGHTED = (QCONV, QGEMM, QMATMUL)


def widen_narrow_types(model: Model) -> int:
    """Move narrow tensors of the main graph into int8/uint8 containers (see the module
    docstring); returns how many values changed."""
    g = model.graph
    try:
        weight_bits: Dict[str, str] = json.loads(model.metadata_props.get(WEIGHT_BITS_KEY, "{}"))
    except ValueError:
        weight_bits = {}
    changed = 0
    for node in g.nodes:  # weights in a wider container, width not recorded: the width of their values
        w = node.inputs[1] if node.domain == DOMAIN and node.op_type in _WEIGHTED and len(node.inputs) > 1 else None
        if w is not None and w.is_initializer and w.name not in weight_bits:
            a = np.asarray(w.const_value)
            if a.dtype.kind in "iu" and a.dtype.itemsize > 1 and a.size:
                fits = INT8 if a.min() >= INT8.min and a.max() <= INT8.max else UINT8
                if a.min() >= fits.min and a.max() <= fits.max:
                    weight_bits[w.name] = str(fits)
    for name, v in g.initializers.items():
        true = _true_type(v, weight_bits.get(name))
        if true is None:
            continue
        box = _container(true)
        array = np.asarray(v.const_value)
        if array.dtype != box.numpy_dtype:
            v.const_value = array.astype(np.int32).astype(box.numpy_dtype)
            changed += 1
        t = v.type if isinstance(v.type, TensorType) else None
        v.type = TensorType(box, t.shape if t else array.shape, t.quant if t else None)
    activation_bits: Dict[str, str] = {}
    for node in g.nodes:
        for v in node.outputs:
            t = v.type
            if not isinstance(t, TensorType) or not _narrow(t.dtype):
                continue
            if node.op_type == QUANTIZE and node.domain == DOMAIN:
                node.set_attr("out_min", int(t.dtype.min))
                node.set_attr("out_max", int(t.dtype.max))
            v.type = TensorType(_container(t.dtype), t.shape, t.quant)
            activation_bits[v.name] = str(t.dtype)
            changed += 1
    kept = {k: t for k, t in weight_bits.items() if k in g.initializers}
    if kept:
        model.metadata_props[WEIGHT_BITS_KEY] = json.dumps(kept, sort_keys=True)
    elif WEIGHT_BITS_KEY in model.metadata_props:
        del model.metadata_props[WEIGHT_BITS_KEY]
    if activation_bits:
        model.metadata_props[ACTIVATION_BITS_KEY] = json.dumps(activation_bits, sort_keys=True)
    return changed


def _narrow(dtype: DataType) -> bool:
    return dtype.is_integer and dtype.bits < 8


def _container(dtype: DataType) -> DataType:
    return INT8 if dtype.signed else UINT8


def _true_type(v: Value, recorded: Optional[str]) -> Optional[DataType]:
    """The true integer type of constant `v` when it is 8 bits or fewer (None otherwise)."""
    if recorded is not None:
        try:
            true = by_name(recorded)
        except ValueError:
            return None
        return true if true.is_integer and true.bits <= 8 else None
    t = v.type
    if isinstance(t, TensorType) and _narrow(t.dtype):
        return t.dtype
    return None
