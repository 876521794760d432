"""Small graph facts the rules share."""
from __future__ import annotations

from typing import Optional, Union

from qcompile.ir import Node, TensorType, Value
from qcompile.rewrite import Failure, constant_value, fail

__all__ = ["bn_inference_failure", "conv_bias", "is_graph_output", "only_user", "rank"]


def conv_bias(conv: Node) -> Optional[Value]:
    """The bias input of a Conv, or None."""
    return conv.inputs[2] if len(conv.inputs) > 2 else None


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


def bn_inference_failure(bn: Node, opset: Optional[int]) -> Optional[Failure]:
    """Why BatchNormalization `bn` is not a per-channel inference-mode normalisation that
    a fold may absorb (running statistics used, training_mode=1, an opset 1-6 node
    without is_test=1, spatial=0); None when it is."""
    for stat in bn.outputs[1:]:
        if stat.uses or is_graph_output(stat):
            return fail(f"BatchNormalization output %{stat.name} (running statistics) is used: training mode",
                        bn, stat)
    if bn.attr("training_mode", 0):
        return fail("BatchNormalization has training_mode=1", bn)
    if ("is_test" in bn.attributes or (opset is not None and opset < 7)) and not bn.attr("is_test", 0):
        return fail("an opset 1-6 BatchNormalization without is_test=1 runs in training mode", bn)
    if bn.attr("spatial", 1) != 1:
        return fail("per-activation BatchNormalization (spatial=0) is not folded", bn)
    return None
