"""ONNX import and export: the exact round trip between ONNX files and the IR."""
from .exporter import save, to_proto, type_to_proto
from .importer import from_proto, load, type_from_proto
from .opset import upgrade_opset

__all__ = ["from_proto", "load", "save", "to_proto", "type_from_proto", "type_to_proto", "upgrade_opset"]
