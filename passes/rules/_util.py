"""Small graph facts the rules share."""
from __future__ import annotations

from typing import Optional, Union

from qcompile.ir import TensorType, Value
from qcompile.rewrite import Failure, constant_value, fail

__all__ = ["is_graph_output", "only_user", "rank"]


def is_graph_output(value: Value) -> bool:
    graph = value.owning_graph()
    return graph is not None and any(o is value for o in graph.outputs)


def only_user(value: Value, what: str) -> Union[bool, Failure]:
    """True when `value` has exactly one reader and is no graph output, else a Failure
    (`conv output %c has 2 users`) naming the readers."""
    users, reads = value.users, len(value.uses)
    if is_graph_output(value):
        return fail(f"{what} %{value.name} is a graph output", value)
    if len(users) != 1:
        return fail(f"{what} %{value.name} has {len(users)} users", value, *users)
    if reads != 1:
        return fail(f"{what} %{value.name} is read {reads} times by its user", value, *users)
    return True


def rank(value: Value) -> Optional[int]:
    """The rank of `value` from its constant data or its type; None when unknown."""
    data = constant_value(value)
    if data is not None:
        return data.ndim
    return value.type.rank if isinstance(value.type, TensorType) else None
