"""Data types, tensor types and quantization parameters of the IR.

Every element type that the installed `onnx` defines is a `DataType`, and so is every
integer width from 1 to 32 bits, signed or not, plus `TERNARY` ({-1, 0, 1}) and
`BIPOLAR` ({-1, +1}). Sub-byte and odd widths have no ONNX type of their own: they are
stored in the smallest ONNX integer "container" that holds them, and the exporter
records the true type in the value's metadata so the round trip keeps it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper

__all__ = [
    "DataType",
    "int_type",
    "from_onnx",
    "FLOAT",
    "FLOAT16",
    "BFLOAT16",
    "DOUBLE",
    "INT8",
    "UINT8",
    "INT16",
    "INT32",
    "INT64",
    "BOOL",
    "TERNARY",
    "BIPOLAR",
    "BINARY",
    "QuantParams",
    "Dim",
    "TensorType",
    "OpaqueType",
    "Type",
]


@dataclasses.dataclass(frozen=True)
class DataType:
    """An element type.

    kind is one of "float", "int", "uint", "bool", "string", "complex", "ternary",
    "bipolar". `onnx_type` is the ONNX element type whose values this type stores
    exactly (for odd-width integers: the container).
    """

    name: str
    kind: str
    bits: int
    onnx_type: int

    def __str__(self) -> str:
        return self.name

    @property
    def is_integer(self) -> bool:
        return self.kind in ("int", "uint", "ternary", "bipolar")

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def signed(self) -> bool:
        return self.kind in ("int", "ternary", "bipolar", "float")

    @property
    def is_onnx_native(self) -> bool:
        """True when an ONNX element type has exactly this type's values."""
        return _BY_ONNX.get(self.onnx_type) == self

    @property
    def min(self) -> int:
        """Smallest representable integer value."""
        self._require_integer()
        if self.kind in ("ternary", "bipolar"):
            return -1
        return -(1 << (self.bits - 1)) if self.kind == "int" else 0

    @property
    def max(self) -> int:
        """Largest representable integer value."""
        self._require_integer()
        if self.kind in ("ternary", "bipolar"):
            return 1
        return (1 << (self.bits - 1)) - 1 if self.kind == "int" else (1 << self.bits) - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype that holds values of this type (the container for odd widths)."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.onnx_type))

    def contains(self, array: np.ndarray) -> bool:
        """True when every element of `array` is a value of this integer type."""
        a = np.asarray(array)
        if a.size == 0:
            return True
        if self.kind == "bipolar":
            return bool(np.all((a == 1) | (a == -1)))
        return bool(a.min() >= self.min and a.max() <= self.max)

    def _require_integer(self) -> None:
        if not self.is_integer:
            raise TypeError(f"{self.name} is not an integer type")


def _onnx_kind(name: str) -> str:
    if name.startswith(("FLOAT", "BFLOAT", "DOUBLE")):
        return "float"
    if name.startswith("UINT"):
        return "uint"
    if name.startswith("INT"):
        return "int"
    if name.startswith("COMPLEX"):
        return "complex"
    return name.lower()  # BOOL, STRING


def _onnx_bits(name: str, code: int) -> int:
    if name == "STRING":
        return 0
    if name == "BOOL":
        return 8
    return int(np.dtype(helper.tensor_dtype_to_np_dtype(code)).itemsize * 8) if name not in _SUB_BYTE else _SUB_BYTE[name]


# ml_dtypes reports itemsize 1 for these; their true widths:
_SUB_BYTE = {"UINT4": 4, "INT4": 4, "UINT2": 2, "INT2": 2, "FLOAT4E2M1": 4, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}

_SHORT_NAMES = {
    "FLOAT": "f32", "DOUBLE": "f64", "FLOAT16": "f16", "BFLOAT16": "bf16", "BOOL": "bool", "STRING": "string",
    "COMPLEX64": "c64", "COMPLEX128": "c128",
}

_BY_ONNX: dict = {}
for _name, _code in onnx.TensorProto.DataType.items():
    if _code == onnx.TensorProto.UNDEFINED:
        continue
    _kind = _onnx_kind(_name)
    _bits = _onnx_bits(_name, _code)
    if _kind in ("int", "uint"):
        _short = f"{'i' if _kind == 'int' else 'u'}{_bits}"
    else:
        _short = _SHORT_NAMES.get(_name, _name.lower())
    _BY_ONNX[_code] = DataType(_short, _kind, _bits, _code)

_BY_NAME = {dt.name: dt for dt in _BY_ONNX.values()}


def from_onnx(elem_type: int) -> DataType:
    """The DataType of an ONNX TensorProto element type code."""
    try:
        return _BY_ONNX[elem_type]
    except KeyError:
        raise ValueError(f"unknown ONNX element type {elem_type}") from None


def _container(bits: int, signed: bool) -> int:
    """Smallest ONNX integer type holding `bits`-wide values: an exact ONNX type if one
    exists, else 8/16/32 bits."""
    exact = _BY_NAME.get(f"{'i' if signed else 'u'}{bits}")
    if exact is not None:
        return exact.onnx_type
    for width in (8, 16, 32):
        if bits <= width:
            return _BY_NAME[f"{'i' if signed else 'u'}{width}"].onnx_type
    raise ValueError(f"no ONNX container for {bits}-bit integers")


def int_type(bits: int, signed: bool = True) -> DataType:
    """The integer type of the given width (1-32 bits; 1-bit signed is not a thing:
    use BIPOLAR for {-1, +1})."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"integer types have 1 to 32 bits, got {bits!r}")
    if signed and bits == 1:
        raise ValueError("a signed 1-bit integer has no positive values: use BIPOLAR ({-1, +1}) or int_type(1, signed=False)")
    name = f"{'i' if signed else 'u'}{int(bits)}"
    if name in _BY_NAME:
        return _BY_NAME[name]
    return DataType(name, "int" if signed else "uint", int(bits), _container(int(bits), signed))


def by_name(name: str) -> DataType:
    """Parse a type name as printed: f32, i8, u3, i4, ternary, bipolar, ..."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name == "ternary":
        return TERNARY
    if name == "bipolar":
        return BIPOLAR
    if len(name) > 1 and name[0] in "iu" and name[1:].isdigit():
        return int_type(int(name[1:]), signed=name[0] == "i")
    raise ValueError(f"unknown data type {name!r}")


FLOAT = from_onnx(onnx.TensorProto.FLOAT)
FLOAT16 = from_onnx(onnx.TensorProto.FLOAT16)
BFLOAT16 = from_onnx(onnx.TensorProto.BFLOAT16)
DOUBLE = from_onnx(onnx.TensorProto.DOUBLE)
INT8 = from_onnx(onnx.TensorProto.INT8)
UINT8 = from_onnx(onnx.TensorProto.UINT8)
INT16 = from_onnx(onnx.TensorProto.INT16)
INT32 = from_onnx(onnx.TensorProto.INT32)
INT64 = from_onnx(onnx.TensorProto.INT64)
BOOL = from_onnx(onnx.TensorProto.BOOL)
TERNARY = DataType("ternary", "ternary", 2, onnx.TensorProto.INT8)
BIPOLAR = DataType("bipolar", "bipolar", 1, onnx.TensorProto.INT8)
BINARY = int_type(1, signed=False)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantParams:
    """Affine quantization: real = scale * (q - zero_point).

    `axis` is None for per-tensor parameters (scalar scale and zero point), else the
    channel axis along which the 1-D scale and zero point vary.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        zero_point = np.asarray(self.zero_point, dtype=np.int64)
        if scale.shape != zero_point.shape:
            raise ValueError(f"scale shape {scale.shape} and zero point shape {zero_point.shape} differ")
        if self.axis is None and scale.ndim != 0:
            raise ValueError("per-tensor quantization (axis=None) needs a scalar scale and zero point")
        if self.axis is not None and scale.ndim != 1:
            raise ValueError(f"per-channel quantization along axis {self.axis} needs 1-D scale and zero point")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError("quantization scales must be finite and positive")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, QuantParams)
            and self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self) -> int:
        return hash((self.axis, self.scale.tobytes(), self.zero_point.tobytes()))

    def __str__(self) -> str:
        if self.axis is None:
            return f"scale={float(self.scale):.6g}, zp={int(self.zero_point)}"
        return f"axis={self.axis}, channels={self.scale.size}"


Dim = Union[int, str, None]
"""A dimension: a size, a symbolic name (ONNX dim_param), or None when unknown."""


@dataclasses.dataclass(frozen=True)
class TensorType:
    """A tensor's element type, shape (None when even the rank is unknown) and, for
    quantized integer tensors, its quantization parameters."""

    dtype: DataType
    shape: Optional[Tuple[Dim, ...]] = None
    quant: Optional[QuantParams] = None

    def __post_init__(self) -> None:
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
        if self.quant is not None and not self.dtype.is_integer:
            raise ValueError(f"quantization parameters need an integer type, not {self.dtype}")

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Optional[int]:
        """Number of elements when the shape is static, else None."""
        if not self.is_static:
            return None
        return int(np.prod(self.shape, dtype=np.int64))

    def with_shape(self, shape: Optional[Sequence[Dim]]) -> "TensorType":
        return dataclasses.replace(self, shape=None if shape is None else tuple(shape))

    def __str__(self) -> str:
        text = str(self.dtype)
        if self.shape is not None:
            text += "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        if self.quant is not None:
            text += "{" + str(self.quant) + "}"
        return text


@dataclasses.dataclass(frozen=True, eq=False)
class OpaqueType:
    """A non-tensor ONNX type (sequence, map, optional, sparse tensor) or a tensor type
    with features the IR does not model (denotations), kept as its TypeProto."""

    proto: onnx.TypeProto

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OpaqueType) and self.proto.SerializeToString() == other.proto.SerializeToString()

    def __hash__(self) -> int:
        return hash(self.proto.SerializeToString())

    def __str__(self) -> str:
        return _describe_type_proto(self.proto)


def _describe_type_proto(t: onnx.TypeProto) -> str:
    which = t.WhichOneof("value")
    if which == "tensor_type":
        return f"{from_onnx(t.tensor_type.elem_type)}[...]" if t.tensor_type.elem_type else "tensor"
    if which == "sequence_type":
        return f"seq<{_describe_type_proto(t.sequence_type.elem_type)}>"
    if which == "optional_type":
        return f"optional<{_describe_type_proto(t.optional_type.elem_type)}>"
    if which == "map_type":
        return f"map<{from_onnx(t.map_type.key_type)},{_describe_type_proto(t.map_type.value_type)}>"
    if which == "sparse_tensor_type":
        return f"sparse<{from_onnx(t.sparse_tensor_type.elem_type)}>"
    return "?"


Type = Union[TensorType, OpaqueType]
