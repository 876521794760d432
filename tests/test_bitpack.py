"""The Cython bit packer against ONNX's own INT4 packing and a hypothesis round trip."""
import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from qcompile._native import bitpack, pack_bits, unpack_bits


def test_is_compiled_extension():
    assert bitpack.__file__.endswith((".so", ".pyd")), bitpack.__file__


def test_int4_layout_matches_onnx():
    values = np.array([-8, 7, 3, -1, 0, 5, -3], dtype=np.int8)
    proto = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, [7], values.tolist())
    onnx_bytes = numpy_helper.to_array(proto)  # decodes; re-encode raw for comparison
    raw = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, [7], values.tolist(), raw=False)
    assert np.array_equal(onnx_bytes.astype(np.int8), values)
    packed = pack_bits(values, 4)
    assert len(packed) == 4
    # ONNX stores INT4 two per byte, first element in the low nibble
    assert packed[0] == ((7 & 0xF) << 4) | (-8 & 0xF)
    assert list(raw.int32_data) == list(np.frombuffer(packed, np.uint8).astype(np.int32))


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), signed=st.booleans(), data=st.data())
def test_round_trip_any_width(bits, signed, data):
    if signed and bits == 1:
        lo, hi = -1, 0
    elif signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    values = np.array(data.draw(st.lists(st.integers(lo, hi), max_size=64)), dtype=np.int32)
    packed = pack_bits(values, bits)
    assert len(packed) == (values.size * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits, values.size, signed), values)


def test_rejects_bad_width_and_short_buffer():
    import pytest

    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack_bits(np.zeros(3), 9)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(b"\x00", 3, 5, True)
