"""Quantization (issue 3, in progress): weight quantizers so far; the `quantize` pass
that inserts QuantizeLinear/DequantizeLinear comes next."""
from .weights import WeightFormat, dequantize, quantize_weight, weight_format

__all__ = ["WeightFormat", "dequantize", "quantize_weight", "weight_format"]
