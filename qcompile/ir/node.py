"""Nodes: operations with attributes, input values and output values.

Setting an input goes through `set_input` (or `replace_input_with`), which updates the
use lists of the old and new values: nobody has to remember the bookkeeping.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

import onnx

from .value import Value

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Attr", "Node"]

AttrType = onnx.AttributeProto.AttributeType


@dataclasses.dataclass
class Attr:
    """An attribute. `type` is the ONNX AttributeType; `value` is an int, float, str,
    Tensor, Graph, TypeProto, SparseTensorProto, or a list of one of those.
    `ref_attr_name` is set for attributes that refer to a function's attribute."""

    name: str
    type: int
    value: Any
    doc_string: str = ""
    ref_attr_name: str = ""

    @property
    def type_name(self) -> str:
        return AttrType.Name(self.type)


def _infer_attr_type(value: Any) -> int:
    from .graph import Graph
    from .tensor import Tensor

    if isinstance(value, bool) or isinstance(value, int):
        return AttrType.INT
    if isinstance(value, float):
        return AttrType.FLOAT
    if isinstance(value, (str, bytes)):
        return AttrType.STRING
    if isinstance(value, Tensor):
        return AttrType.TENSOR
    if isinstance(value, Graph):
        return AttrType.GRAPH
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("cannot infer the type of an empty list attribute: pass an Attr")
        single = _infer_attr_type(value[0])
        return {
            AttrType.INT: AttrType.INTS,
            AttrType.FLOAT: AttrType.FLOATS,
            AttrType.STRING: AttrType.STRINGS,
            AttrType.TENSOR: AttrType.TENSORS,
            AttrType.GRAPH: AttrType.GRAPHS,
        }[single]
    raise TypeError(f"unsupported attribute value {value!r}")


class Node:
    """One operation of a graph."""

    __slots__ = (
        "op_type",
        "domain",
        "name",
        "overload",
        "doc_string",
        "metadata_props",
        "attributes",
        "device_configurations",
        "_inputs",
        "_outputs",
        "_graph",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Optional[Value]] = (),
        attributes: Optional[Dict[str, Any]] = None,
        *,
        outputs: Optional[Sequence[Value]] = None,
        num_outputs: int = 1,
        domain: str = "",
        name: str = "",
    ):
        """Create a node. Outputs are given as Values, or `num_outputs` fresh unnamed
        ones are made (the graph names them on insertion). `attributes` maps names to
        Attr objects or plain Python values whose ONNX type is inferred."""
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.overload = ""
        self.doc_string = ""
        self.metadata_props: Dict[str, str] = {}
        self.device_configurations: list = []
        self.attributes: Dict[str, Attr] = {}
        for key, val in (attributes or {}).items():
            self.attributes[key] = val if isinstance(val, Attr) else Attr(key, _infer_attr_type(val), val)
        self._graph: Optional["Graph"] = None
        self._inputs: List[Optional[Value]] = []
        for i, v in enumerate(inputs):
            self._inputs.append(v)
            if v is not None:
                v._add_use(self, i)
        if outputs is None:
            outputs = [Value("") for _ in range(num_outputs)]
        self._outputs: List[Value] = []
        for i, v in enumerate(outputs):
            if v._producer is not None:
                raise ValueError(f"value %{v.name} is already produced by node '{v._producer.name}'")
            v._producer, v._index = self, i
            self._outputs.append(v)

    # -- inputs ----------------------------------------------------------------------
    @property
    def inputs(self) -> tuple:
        """Input values in order; None marks an omitted optional input."""
        return tuple(self._inputs)

    def set_input(self, index: int, value: Optional[Value]) -> None:
        """Set input `index` to `value`, updating the use lists of both values."""
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._remove_use(self, index)
        self._inputs[index] = value
        if value is not None:
            value._add_use(self, index)

    def replace_input_with(self, old: Value, new: Optional[Value]) -> int:
        """Replace every occurrence of `old` among the inputs; returns how many."""
        count = 0
        for i, v in enumerate(self._inputs):
            if v is old:
                self.set_input(i, new)
                count += 1
        return count

    def append_input(self, value: Optional[Value]) -> None:
        self._inputs.append(None)
        self.set_input(len(self._inputs) - 1, value)

    def clear_inputs(self) -> None:
        """Drop every input (used when a node leaves the graph)."""
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._remove_use(self, i)
        self._inputs = []

    # -- outputs ---------------------------------------------------------------------
    @property
    def outputs(self) -> tuple:
        return tuple(self._outputs)

    @property
    def output(self) -> Value:
        """The only output (an error for multi-output nodes)."""
        if len(self._outputs) != 1:
            raise ValueError(f"node '{self.name}' ({self.op_type}) has {len(self._outputs)} outputs, not 1")
        return self._outputs[0]

    # -- attributes ------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute `name`, or `default` when absent."""
        a = self.attributes.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any) -> None:
        self.attributes[name] = value if isinstance(value, Attr) else Attr(name, _infer_attr_type(value), value)

    # -- structure -------------------------------------------------------------------
    @property
    def graph(self) -> Optional["Graph"]:
        return self._graph

    def subgraphs(self) -> Iterable["Graph"]:
        """Graphs held in attributes (If branches, Loop and Scan bodies)."""
        from .graph import Graph

        for a in self.attributes.values():
            if isinstance(a.value, Graph):
                yield a.value
            elif isinstance(a.value, list):
                for g in a.value:
                    if isinstance(g, Graph):
                        yield g

    def predecessors(self) -> List["Node"]:
        """Distinct producers of this node's inputs."""
        return list(dict.fromkeys(v.producer for v in self._inputs if v is not None and v.producer is not None))

    def successors(self) -> List["Node"]:
        """Distinct consumers of this node's outputs."""
        return list(dict.fromkeys(n for v in self._outputs for n in v.users))

    @property
    def label(self) -> str:
        """How messages refer to this node: its name and op type."""
        return f"'{self.name}' ({self.op_type})" if self.name else f"<unnamed {self.op_type}>"

    def __repr__(self) -> str:
        ins = ", ".join("" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self._outputs)
        return f"Node({outs} = {self.op_type}({ins}), name={self.name!r})"
