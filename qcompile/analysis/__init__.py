"""Analyses over the IR: shape inference, MAC counts, summaries and Graphviz output."""
from .dot import to_dot
from .macs import node_macs
from .shapes import infer_shapes
from .summary import ModelSummary, NodeRow, format_summary, summarize

__all__ = ["ModelSummary", "NodeRow", "format_summary", "infer_shapes", "node_macs", "summarize", "to_dot"]
