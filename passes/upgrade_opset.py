"""`upgrade-opset{version=N}`: bring a model up to at least opset N of the ONNX domain.

  1. opset below N: converted by qcompile.onnx_io.upgrade_opset (onnx's version
     converter) into a new model, so later passes can count on the newer op
     definitions;
  2. opset N or newer: left alone (this pass never downgrades), not modified.

The default, 13, is the first opset with per-axis QuantizeLinear/DequantizeLinear,
which quantization needs; int4 QDQ needs 21.
"""
from __future__ import annotations

import onnx

from qcompile.ir import Model
from qcompile.onnx_io import upgrade_opset
from qcompile.passmanager import Pass, PassResult, option, register_pass

__all__ = ["UpgradeOpset"]

LATEST = onnx.defs.onnx_opset_version()


@register_pass("upgrade-opset")
class UpgradeOpset(Pass):
    """Convert the model up to a newer ONNX opset (never down)."""

    in_place = False  # the converter builds a new model
    version: int = option(13, "target opset of the ONNX domain", choices=range(7, LATEST + 1))

    def run(self, model: Model) -> PassResult:
        before = model.opset
        if before >= self.version:
            return PassResult(model, modified=False)
        upgraded = upgrade_opset(model, self.version)
        self.stats[f"opset {before} -> {upgraded.opset}"] += 1
        return PassResult(upgraded, modified=True)
