"""Constant tensor data: a numpy array, or an ONNX TensorProto decoded only when needed.

Keeping the imported TensorProto is what makes the ONNX round trip exact and cheap: an
initializer that no pass touched is written back as the very proto it came from (raw or
typed fields, external-data reference and all), without decoding its bytes.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .types import DataType, from_onnx

__all__ = ["Tensor"]


class Tensor:
    """Immutable constant data with an element type and shape."""

    __slots__ = ("_array", "_proto", "_base_dir", "_dtype")

    def __init__(self, array: np.ndarray, dtype: Optional[DataType] = None):
        """Wrap an array. `dtype` overrides the element type for integer data of widths
        numpy lacks (an int8 container holding int3 values, say)."""
        self._array = np.asarray(array)
        self._proto: Optional[onnx.TensorProto] = None
        self._base_dir = ""
        self._dtype = dtype

    @classmethod
    def from_proto(cls, proto: onnx.TensorProto, base_dir: str = "") -> "Tensor":
        """Wrap a TensorProto; `base_dir` resolves its external-data location."""
        t = cls.__new__(cls)
        t._array = None
        t._proto = proto
        t._base_dir = base_dir
        t._dtype = None
        return t

    @property
    def dtype(self) -> DataType:
        if self._dtype is not None:
            return self._dtype
        if self._proto is not None:
            return from_onnx(self._proto.data_type)
        return _dtype_of_array(self._array)

    @property
    def shape(self) -> tuple:
        if self._proto is not None:
            return tuple(int(d) for d in self._proto.dims)
        return tuple(self._array.shape)

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the data as ONNX stores it (sub-byte types packed)."""
        return (self.numel * self.dtype.bits + 7) // 8

    @property
    def is_external(self) -> bool:
        return self._proto is not None and external_data_helper.uses_external_data(self._proto)

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (decoded on first use, then cached)."""
        if self._array is None:
            self._array = numpy_helper.to_array(self._proto, base_dir=self._base_dir)
        return self._array

    def to_proto(self, name: str) -> onnx.TensorProto:
        """A TensorProto named `name`: the original proto when there is one."""
        if self._proto is not None:
            if self._proto.name == name:
                return self._proto
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            proto.name = name
            return proto
        array = self.numpy()
        if self._dtype is not None and not self._dtype.is_onnx_native:
            array = array.astype(self._dtype.numpy_dtype)
        return numpy_helper.from_array(array, name)

    @property
    def proto(self) -> Optional[onnx.TensorProto]:
        """The imported TensorProto, or None for data made in Python."""
        return self._proto

    @property
    def base_dir(self) -> str:
        return self._base_dir

    def external_path(self) -> Optional[str]:
        """The external-data file this tensor reads from, or None."""
        if not self.is_external:
            return None
        info = external_data_helper.ExternalDataInfo(self._proto)
        return os.path.join(self._base_dir, info.location)

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}{list(self.shape)})"


def _dtype_of_array(array: np.ndarray) -> DataType:
    return from_onnx(helper.np_dtype_to_tensor_dtype(array.dtype))
