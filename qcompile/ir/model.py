"""Models: a main graph plus what ONNX keeps around it (opsets, metadata, functions)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .graph import Graph

__all__ = ["Model"]


class Model:
    """A model: the main graph, its opset imports ({domain: version}, "" for ONNX) and
    the ModelProto fields a round trip must keep. Local functions, training info and
    configuration are kept as the protos they were imported as."""

    def __init__(self, graph: Graph, opset_imports: Optional[Dict[str, int]] = None, ir_version: int = 10):
        self.graph = graph
        self.opset_imports: Dict[str, int] = dict(opset_imports or {"": 17})
        self.ir_version = ir_version
        self.producer_name = "qcompile"
        self.producer_version = ""
        self.domain = ""
        self.model_version = 0
        self.doc_string = ""
        self.metadata_props: Dict[str, str] = {}
        self.functions: List = []  # FunctionProto
        self.training_info: List = []  # TrainingInfoProto
        self.configuration: List = []  # DeviceConfigurationProto
        self.path: Optional[str] = None  # file it was loaded from, if any
        # Results passes hand to later passes (calibration statistics, say), by name.
        # In memory only: never exported to ONNX.
        self.annotations: Dict[str, Any] = {}

    @property
    def opset(self) -> int:
        """The default-domain ONNX opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))

    def __str__(self) -> str:
        from .printer import print_model

        return print_model(self)

    def __repr__(self) -> str:
        return f"Model(opset={self.opset}, {len(self.graph)} nodes)"
