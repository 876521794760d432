"""from_torch: PyTorch models export, import, verify, export again and run in
onnxruntime with the torch outputs, and bit for bit as the plain torch.onnx export."""
import io
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qcompile  # noqa: E402
from qcompile.errors import QCompileError  # noqa: E402
from qcompile.onnx_io import to_proto  # noqa: E402
from torch_models import BUILDERS  # noqa: E402


def _ort_run(proto_bytes: bytes, feeds):
    sess = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, feeds)))


def _plain_export(module, args) -> bytes:
    """What torch.onnx.export alone writes, for the bit-for-bit comparison."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, opset_version=17, dynamo=False)
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_from_torch_matches_torch_and_plain_export(name):
    module, args = BUILDERS[name]()
    with torch.no_grad():
        expected = module(*args).numpy()
    model = qcompile.from_torch(module, args)
    qcompile.check(model)
    feeds = [a.numpy() for a in args]
    ours = _ort_run(to_proto(model).SerializeToString(), feeds)
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-5)
    plain = _ort_run(_plain_export(module, args), feeds)
    assert len(ours) == len(plain)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), f"{name}: import/export changed the ORT result"
    assert not module.training


def test_expected_ops_are_present():
    """The builders exercise what they claim to (residual Add, mask, recurrences)."""
    ops, inputs = {}, {}
    for name in ("resnet", "transformer", "lstm", "gru"):
        module, args = BUILDERS[name]()
        graph = qcompile.from_torch(module, args).graph
        ops[name] = {n.op_type for n in graph.all_nodes()}
        inputs[name] = len(graph.inputs)
    assert inputs["transformer"] == 2, "the padding mask is a graph input"
    assert {"Conv", "Add", "Relu", "GlobalAveragePool", "Gemm"} <= ops["resnet"]
    assert {"MatMul", "Softmax", "Where"} <= ops["transformer"]
    assert ops["transformer"] & {"LayerNormalization", "ReduceMean"}
    assert "LSTM" in ops["lstm"] and "GRU" in ops["gru"]


def test_names_dynamic_axes_and_train_mode_restored():
    module, (x,) = BUILDERS["resnet"]()
    module.train()
    model = qcompile.from_torch(
        module, x, input_names=["image"], output_names=["scores"], dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}}
    )
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [v.name for v in model.graph.outputs] == ["scores"]
    assert module.training, "from_torch must restore the module's train/eval state"
    proto = to_proto(model)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    (out,) = _ort_run(proto.SerializeToString(), [torch.randn(5, 3, 16, 16).numpy()])
    assert out.shape == (5, 10)


def test_export_failure_is_a_qcompile_error():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).abs()  # complex tensors: no ONNX export

    with pytest.raises(QCompileError, match=r"^from_torch: torch.onnx.export failed: "):
        qcompile.from_torch(Bad(), torch.randn(4))


def test_bad_arguments_are_qcompile_errors():
    with pytest.raises(QCompileError, match="torch.nn.Module"):
        qcompile.from_torch(lambda x: x, torch.randn(2))
    with pytest.raises(QCompileError, match="example_inputs"):
        qcompile.from_torch(torch.nn.ReLU(), [1.0, 2.0])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dynamo_exporter():
    pytest.importorskip("onnxscript")
    module, args = BUILDERS["resnet"]()
    with torch.no_grad():
        expected = module(*args).numpy()
    model = qcompile.from_torch(module, args, dynamo=True)
    qcompile.check(model)
    (out,) = _ort_run(to_proto(model).SerializeToString(), [a.numpy() for a in args])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dynamo_without_onnxscript_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    module, args = BUILDERS["lstm"]()
    with pytest.raises(QCompileError, match="needs the onnxscript package"):
        qcompile.from_torch(module, args, dynamo=True)


def test_missing_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(QCompileError, match=r"^from_torch needs PyTorch"):
        qcompile.from_torch(object(), ())
