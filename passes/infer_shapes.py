"""`infer-shapes`: give every value a type and shape with ONNX shape inference.

A thin pass over qcompile.analysis.infer_shapes, which documents how inferred types
merge with the ones values already have.
"""
from __future__ import annotations

from qcompile.analysis import infer_shapes
from qcompile.ir import Model
from qcompile.passmanager import Pass, PassResult, register_pass

__all__ = ["InferShapes"]


@register_pass("infer-shapes")
class InferShapes(Pass):
    """Set the type and shape of every value with ONNX shape inference."""

    in_place = True

    def run(self, model: Model) -> PassResult:
        changed = infer_shapes(model)
        if changed:
            self.stats["values typed"] += changed
        return PassResult(model, modified=changed > 0)
