"""Import a PyTorch module: export it with `torch.onnx.export` to memory, then read the
ONNX with `qcompile.onnx_io.from_proto`.

    import torch, qcompile
    model = qcompile.from_torch(net, torch.randn(1, 3, 32, 32), input_names=["image"])

The import adds nothing of its own: the graph is exactly what torch.onnx produced, so
onnxruntime gives bit-identical results on `to_proto(model)` and on the exporter's file.
PyTorch is imported only when this function is called; the core works without it.
"""
from __future__ import annotations

import io
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

from .errors import QCompileError
from .ir.model import Model

__all__ = ["from_torch"]

_NO_TORCH = "from_torch needs PyTorch: pip install 'qcompile[torch]' (after installing a torch wheel)"


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    opset: int = 17,
    dynamic_axes: Optional[Dict[str, Any]] = None,
    dynamo: bool = False,
) -> Model:
    """Export `module` traced on `example_inputs` (a tensor or a tuple of tensors) to
    ONNX at `opset` and import it as a qcompile Model.

    The module runs in eval mode for the export (its train/eval state is restored
    afterwards). `input_names`, `output_names` and `dynamic_axes` are passed to
    `torch.onnx.export` as they are. `dynamo=False` (default) uses the TorchScript
    exporter, which is fast; `dynamo=True` uses the torch.export based exporter, which
    needs the onnxscript package, folds BatchNormalization into convolutions, and writes
    opset 18 or newer when it cannot convert down to `opset` (it logs why). Raises
    QCompileError when torch (or, for dynamo, onnxscript) is missing or the export fails.
    """
    if sys.modules.get("torch", False) is None:  # blocked on purpose (tests, minimal installs)
        raise QCompileError(_NO_TORCH)
    try:
        import torch
    except ImportError:
        raise QCompileError(_NO_TORCH) from None
    import onnx

    from .onnx_io import from_proto

    if not isinstance(module, torch.nn.Module):
        raise QCompileError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    args = _as_tuple(example_inputs, torch)
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise QCompileError(
                "from_torch(dynamo=True) needs the onnxscript package: pip install onnxscript "
                "(or use dynamo=False, the TorchScript exporter)"
            ) from None

    kwargs: Dict[str, Any] = dict(
        opset_version=opset,
        input_names=list(input_names) if input_names is not None else None,
        output_names=list(output_names) if output_names is not None else None,
        dynamic_axes=dynamic_axes,
        dynamo=dynamo,
    )
    if dynamo:
        kwargs["verbose"] = False
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            if not dynamo:  # the TorchScript exporter warns that it is deprecated, and about tracing
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, args, buffer, **kwargs)
    except QCompileError:
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else type(e).__name__
        raise QCompileError(f"from_torch: torch.onnx.export failed: {first}") from e
    finally:
        module.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    return from_proto(proto, source=f"<torch {type(module).__name__}>")


def _as_tuple(example_inputs: Any, torch: Any) -> tuple:
    """The example inputs as the tuple torch.onnx.export expects."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        items: List[Any] = list(example_inputs)
        bad = [type(x).__name__ for x in items if not isinstance(x, torch.Tensor) and x is not None]
        if bad:
            raise QCompileError(f"from_torch: example_inputs must be tensors, got {', '.join(bad)}")
        return tuple(items)
    raise QCompileError(
        f"from_torch: example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}"
    )
