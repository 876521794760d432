"""The built-in pass catalogue, installed as qcompile.passes.

Importing this package registers every pass below with qcompile.passmanager; the CLI
(the composition root) does so. The core never imports it.
"""
# importing the modules registers their passes
from . import calibrate, canonicalize, dce, fold, infer_shapes, lower_integer, quantize, upgrade_opset  # noqa: F401
from . import prune  # noqa: F401  (prune and sparsify)

__all__ = ["calibrate", "canonicalize", "dce", "fold", "infer_shapes", "lower_integer", "prune", "quantize", "upgrade_opset"]
