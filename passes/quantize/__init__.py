"""Quantization: weight quantizers, the `quantize` pass that inserts
QuantizeLinear/DequantizeLinear, and the `error-report` pass (per-tensor and per-layer
quantization error)."""
from . import error_analysis, qdq  # noqa: F401  (importing registers the passes)
from .error_analysis import ErrorReport, analyze_quantization_error
from .qdq import Quantize
from .weights import WeightFormat, dequantize, quantize_weight, weight_format

__all__ = ["ErrorReport", "Quantize", "analyze_quantization_error", "WeightFormat", "dequantize", "quantize_weight", "weight_format"]
