"""Quantization (issue 3, in progress): weight quantizers and the `quantize` pass that
inserts QuantizeLinear/DequantizeLinear."""
from . import qdq  # noqa: F401  (registers the pass)
from .qdq import Quantize
from .weights import WeightFormat, dequantize, quantize_weight, weight_format

__all__ = ["Quantize", "WeightFormat", "dequantize", "quantize_weight", "weight_format"]
