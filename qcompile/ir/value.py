"""Values: the edges of the graph.

A Value is produced by at most one node (none for graph inputs and initializers) and
used by any number of node inputs. Its `uses` list is maintained by Node's input setters,
never by hand, so it is always the exact inverse of the nodes' input lists.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from .tensor import Tensor
from .types import Type

if TYPE_CHECKING:
    from .graph import Graph
    from .node import Node

__all__ = ["Value", "Use"]

Use = Tuple["Node", int]
"""A use of a value: (consumer node, input index)."""


class Value:
    """A named tensor (or other ONNX value) flowing between nodes."""

    __slots__ = (
        "name",
        "type",
        "doc_string",
        "metadata_props",
        "_producer",
        "_index",
        "_uses",
        "_const",
        "_graph",
    )

    def __init__(self, name: str, type: Optional[Type] = None, const: Optional[Tensor] = None):
        self.name = name
        self.type = type
        self.doc_string = ""
        self.metadata_props: Dict[str, str] = {}
        self._producer: Optional["Node"] = None
        self._index: Optional[int] = None
        self._uses: Dict[Use, None] = {}  # ordered set
        self._const = const
        self._graph: Optional["Graph"] = None  # set for graph inputs and initializers

    # -- def/use ---------------------------------------------------------------------
    @property
    def producer(self) -> Optional["Node"]:
        """The node computing this value, or None for inputs and initializers."""
        return self._producer

    @property
    def index(self) -> Optional[int]:
        """Output index in the producer."""
        return self._index

    @property
    def uses(self) -> List[Use]:
        """Every (node, input index) that reads this value, in the order they were added."""
        return list(self._uses)

    @property
    def users(self) -> List["Node"]:
        """Distinct nodes reading this value."""
        return list(dict.fromkeys(node for node, _ in self._uses))

    def _add_use(self, node: "Node", index: int) -> None:
        self._uses[(node, index)] = None

    def _remove_use(self, node: "Node", index: int) -> None:
        self._uses.pop((node, index), None)

    def replace_all_uses_with(self, other: "Value") -> int:
        """Make every node that reads this value read `other` instead; graph outputs
        that are this value are redirected too. Returns the number of uses moved."""
        if other is self:
            return 0
        moved = 0
        for node, index in list(self._uses):
            node.set_input(index, other)
            moved += 1
        graph = self.owning_graph()
        if graph is not None:
            graph.replace_output(self, other)
        return moved

    # -- constant data ---------------------------------------------------------------
    @property
    def const(self) -> Optional[Tensor]:
        """The constant data of an initializer, or None."""
        return self._const

    @const.setter
    def const(self, tensor: Optional[Tensor]) -> None:
        self._const = tensor

    @property
    def const_value(self) -> Optional[np.ndarray]:
        """The constant data as a numpy array, or None when the value is not constant."""
        return None if self._const is None else self._const.numpy()

    @const_value.setter
    def const_value(self, array: Optional[np.ndarray]) -> None:
        self._const = None if array is None else Tensor(array)

    @property
    def is_initializer(self) -> bool:
        graph = self._graph
        return graph is not None and graph.initializers.get(self.name) is self

    @property
    def is_graph_input(self) -> bool:
        graph = self._graph
        return graph is not None and any(v is self for v in graph.inputs)

    def owning_graph(self) -> Optional["Graph"]:
        """The graph this value belongs to (through its producer for node outputs)."""
        if self._producer is not None:
            return self._producer.graph
        return self._graph

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type})"
