"""qcompile: a quantization compiler for edge AI.

    import qcompile
    model = qcompile.load("model.onnx")
    print(model.graph)
    result = qcompile.PassManager.parse("canonicalize,dce").run(model)
    qcompile.save(result.model, "out.onnx")
"""
from .errors import ModelLoadError, PassFailedError, PipelineError, QCompileError
from .ir import Graph, Model, Node, Value, check, verify
from .onnx_io import load, save
from .passmanager import Pass, PassManager, PassResult, option, register_pass

__version__ = "0.1.0"

__all__ = [
    "Graph",
    "Model",
    "ModelLoadError",
    "Node",
    "Pass",
    "PassFailedError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "QCompileError",
    "Value",
    "check",
    "from_torch",
    "load",
    "option",
    "register_pass",
    "save",
    "verify",
]


def from_torch(module, example_inputs, **kwargs) -> Model:
    """Export a torch.nn.Module through torch.onnx and import it (needs the torch extra).
    See qcompile.torch_import.from_torch for the options."""
    from .torch_import import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)
