"""The constant segment builder (`_weights.ConstSegment`): the bytes a bytearray with
the same aligned appends would hold, built in one object that is handed over, not
copied."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.backend.lowering._weights import ConstSegment


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.sampled_from([1, 2, 4, 64])), max_size=30))
def test_appends_are_the_bytearray_reference(pieces):
    seg, ref = ConstSegment(), bytearray()
    for data, align in pieces:
        ref += b"\0" * ((-len(ref)) % align)
        assert seg.append(data, align) == len(ref)
        ref += data
        assert len(seg) == len(ref)
    out = seg.finish()
    assert type(out) is bytes and out == bytes(ref)


def test_buffers_of_any_kind_and_growth_past_the_first_capacity():
    seg = ConstSegment()
    n = (65 << 20) + 3                                   # more than the 64 MiB first capacity
    big = np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n]
    assert seg.append(memoryview(b"abc")) == 0
    assert seg.append(bytearray(b"de"), 64) == 64
    assert seg.append(big, 64) == 128
    assert seg.append(np.array([7], np.int32), 4) == 128 + big.size + (-(128 + big.size)) % 4
    out = seg.finish()
    assert out[:3] == b"abc" and out[3:64] == bytes(61) and out[64:66] == b"de"
    assert out[128:128 + big.size] == big.tobytes() and out[-4:] == np.array([7], np.int32).tobytes()
    with pytest.raises(ValueError, match="finished"):
        seg.append(b"x")
    with pytest.raises(ValueError, match="finished"):
        seg.finish()


def test_an_empty_segment():
    assert ConstSegment().finish() == b""
