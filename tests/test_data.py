"""qcompile.data: loading calibration/simulation samples, checked against the model."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompile
from qcompile.data import load_samples, save_samples
from qcompile.errors import QCompileError
from qcompile.onnx_io import from_proto

HERE = os.path.dirname(__file__)
DIGITS = os.path.join(HERE, "..", "examples", "digits_cnn.onnx")
CALIB = os.path.join(HERE, "..", "examples", "digits_calib.npz")


@pytest.fixture(scope="module")
def digits():
    return qcompile.load(DIGITS)


def _relu_model(first_dim="N"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_dim, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [first_dim, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_digits_npz_batches_along_symbolic_axis(digits):
    samples = load_samples(CALIB, digits)
    assert len(samples) == 200 and samples.batchable
    batches = list(samples.batches(16))
    assert [b.samples for b in batches] == [16] * 12 + [8]
    assert batches[0]["input"].shape == (16, 1, 8, 8)
    ref = np.load(CALIB)["input"].reshape(200, 1, 8, 8)
    assert np.array_equal(np.concatenate([b["input"] for b in batches]), ref)
    assert sum(b.samples for b in samples.batches(16, limit=20)) == 20


def test_fixed_batch_dim_runs_one_sample_at_a_time(tmp_path):
    model = _relu_model(first_dim=1)
    save_samples(tmp_path / "d.npz", {"x": np.ones((5, 1, 3), np.float32)})
    batches = list(load_samples(str(tmp_path / "d.npz"), model).batches(4))
    assert len(batches) == 5 and batches[0]["x"].shape == (1, 3)


def test_array_of_input_rank_is_samples_of_batch_one(tmp_path):
    save_samples(str(tmp_path / "d.npz"), {"x": np.ones((7, 3), np.float32)})
    samples = load_samples(str(tmp_path / "d.npz"), _relu_model())
    assert len(samples) == 7
    assert [b["x"].shape for b in samples.batches(4)] == [(4, 3), (3, 3)]


def test_folder_streams_files_in_order(tmp_path):
    for i in range(3):
        save_samples(str(tmp_path / f"part{i}.npz"), [{"x": np.full((1, 3), i, np.float32)} for _ in range(2)])
    samples = load_samples(str(tmp_path), _relu_model())
    assert len(samples) == 6
    data = np.concatenate([b["x"] for b in samples.batches(4)])
    assert data[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_compressed_npz_and_iterables(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", x=np.arange(12, dtype=np.float32).reshape(4, 1, 3))
    model = _relu_model()
    assert np.concatenate(list(b["x"] for b in load_samples(str(tmp_path / "c.npz"), model).batches(3))).sum() == 66
    feeds = [{"x": np.ones((2, 3), np.float32)} for _ in range(3)]
    samples = load_samples(feeds, model)
    assert len(samples) == 3 and [b["x"].shape for b in samples.batches(2)] == [(4, 3), (2, 3)]
    gen = load_samples(({"x": np.ones((1, 3), np.float32)} for _ in range(3)), model)
    assert gen.count is None and sum(b.samples for b in gen.batches(2)) == 3
    with pytest.raises(QCompileError, match="one-shot"):
        list(gen.batches(2))


def test_wrong_name_names_file_input_and_model_inputs(tmp_path, digits):
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 1, 1, 8, 8), np.float32))
    with pytest.raises(QCompileError, match=r"bad\.npz: no data for model input 'input' .*model inputs: input"):
        load_samples(str(tmp_path / "bad.npz"), digits)
    np.savez(tmp_path / "extra.npz", input=np.zeros((2, 1, 1, 8, 8), np.float32), label=np.zeros(2))
    with pytest.raises(QCompileError, match=r"extra\.npz: 'label' is not a model input"):
        load_samples(str(tmp_path / "extra.npz"), digits)


def test_wrong_shape_names_expected_shape(tmp_path, digits):
    np.savez(tmp_path / "bad.npz", input=np.zeros((2, 1, 1, 9, 9), np.float32))
    with pytest.raises(QCompileError, match=r"input 'input' expects samples of shape \[N,1,8,8\].*\[1, 1, 9, 9\]"):
        load_samples(str(tmp_path / "bad.npz"), digits)
    with pytest.raises(QCompileError, match=r"feed 0: input 'input' expects shape \[N,1,8,8\], got \[8, 8\]"):
        list(load_samples([{"input": np.zeros((8, 8), np.float32)}], digits).batches(1))


def test_dtypes_int_is_error_float64_is_converted(tmp_path, digits):
    np.savez(tmp_path / "int.npz", input=np.zeros((2, 1, 1, 8, 8), np.int64))
    with pytest.raises(QCompileError, match=r"int\.npz: input 'input' is float32 but the data is int64"):
        load_samples(str(tmp_path / "int.npz"), digits)
    np.savez(tmp_path / "f64.npz", input=np.zeros((2, 1, 1, 8, 8), np.float64))
    samples = load_samples(str(tmp_path / "f64.npz"), digits)
    assert any("float64 data converted to float32" in n for n in samples.notes)
    assert next(samples.batches(2))["input"].dtype == np.float32


def test_nan_is_an_error_naming_the_sample(tmp_path, digits):
    data = np.zeros((5, 1, 1, 8, 8), np.float32)
    data[3, 0, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", input=data)
    with pytest.raises(QCompileError, match=r"nan\.npz: input 'input' sample 3 contains NaN"):
        list(load_samples(str(tmp_path / "nan.npz"), digits).batches(4))


def test_mismatched_counts_and_missing_files(tmp_path):
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2])
    z = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [x, z], [y])
    model = from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 1, 2), np.float32), b=np.zeros((4, 1, 2), np.float32))
    with pytest.raises(QCompileError, match="different numbers of samples"):
        load_samples(str(tmp_path / "d.npz"), model)
    with pytest.raises(QCompileError, match="no such file"):
        load_samples(str(tmp_path / "missing.npz"), model)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(QCompileError, match="not a readable .npz"):
        load_samples(str(tmp_path / "junk.npz"), model)


def test_save_samples_is_atomic_and_round_trips(tmp_path, digits):
    path = str(tmp_path / "s.npz")
    feeds = [{"input": np.random.rand(1, 1, 8, 8).astype(np.float32)} for _ in range(3)]
    save_samples(path, feeds)
    assert os.listdir(tmp_path) == ["s.npz"]
    got = np.concatenate([b["input"] for b in load_samples(path, digits).batches(8)])
    assert np.array_equal(got, np.concatenate([f["input"] for f in feeds]))
    assert onnx  # imported for helper
