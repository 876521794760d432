"""The graph IR: Model -> Graph -> Node -> Value, with typed tensors.

See DESIGN.md. Everything here is pure Python over numpy and networkx; ONNX is only
the interchange format (qcompile.onnx_io).
"""
from .graph import CycleError, Graph
from .model import Model
from .node import Attr, Node
from .printer import print_graph, print_model
from .tensor import Tensor
from .types import (
    BIPOLAR,
    BINARY,
    BOOL,
    DOUBLE,
    FLOAT,
    FLOAT16,
    INT8,
    INT16,
    INT32,
    INT64,
    TERNARY,
    UINT8,
    DataType,
    OpaqueType,
    QuantParams,
    TensorType,
    int_type,
)
from .value import Value
from .verifier import VerificationError, check, verify

__all__ = [
    "Attr", "BINARY", "BIPOLAR", "BOOL", "CycleError", "DOUBLE", "DataType", "FLOAT", "FLOAT16",
    "Graph", "INT8", "INT16", "INT32", "INT64", "Model", "Node", "OpaqueType", "QuantParams",
    "TERNARY", "Tensor", "TensorType", "UINT8", "Value", "VerificationError", "check", "int_type",
    "print_graph", "print_model", "verify",
]
