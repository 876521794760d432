"""The public surface is deliberate: these names, and no accidental others."""
import qcompile
import qcompile.ir
import qcompile.onnx_io


def test_top_level_api():
    assert sorted(qcompile.__all__) == sorted([
        "Graph", "Model", "ModelLoadError", "Node", "Pass", "PassFailedError", "PassManager", "PassResult",
        "PipelineError", "QCompileError", "Value", "check", "from_torch", "load", "option", "register_pass",
        "save", "verify",
    ])
    for name in qcompile.__all__:
        assert hasattr(qcompile, name), name


def test_ir_api_names_exist():
    for module in (qcompile.ir, qcompile.onnx_io):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
    for name in ("Model", "Graph", "Node", "Value", "TensorType", "QuantParams", "int_type", "verify", "check"):
        assert name in qcompile.ir.__all__
