"""The states and rules of data-parallel sharding that primitives declare (see `shard.py`).

Each value gets a state: None (it does not depend on the examples), ("b", axis) (one slice per
example along axis), or SUM (a partial sum over the examples: shards add up to the whole).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ShardError
from .dtypes import AVal

SUM = "sum"  # a partial sum over the examples: shards add up to the whole
ShardState = Any  # None (does not depend on the examples), ("b", axis) (one slice per example), or SUM


class ShardContext:
    """What a sharding rule sees: operand types, the batch size, whether a value has the batch dim."""

    def __init__(self, aval: Callable[[int], AVal], batch: int):
        self.aval, self.batch = aval, batch

    def has_batch_dim(self, vid: int, axis: int, ndim: int) -> bool:
        shape = self.aval(vid)[1]
        k = axis - (ndim - len(shape))
        return k >= 0 and shape[k] == self.batch and self.batch != 1


# shard(ctx, node, operand states) -> the result's state, for a node with a batched operand and
# no SUM operand; raises ShardError (through `refuse`) when the op mixes examples
ShardRule = Callable[[ShardContext, Any, list[ShardState]], ShardState]
# shard_sum(node, operand states) -> whether the result of an op on a sum over examples (and
# example-independent values) is still a sum: the op is linear in that operand
SumRule = Callable[[Any, list[ShardState]], bool]
# reshard(attrs, axis, size) -> the attributes of the node in a shard of `size` examples
ReshardRule = Callable[[dict[str, Any], int, int], dict[str, Any]]


def refuse(n: Any, why: str) -> ShardError:
    return ShardError(f"cannot shard along the batch axis: {why}, at {n.text()}")


def shard_refused(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    raise refuse(n, f"{n.op} on batched values is not supported by data-parallel execution")


def sum_linear(n: Any, ins: list[ShardState]) -> bool:
    return True


def sum_refused(n: Any, ins: list[ShardState]) -> bool:
    return False


def shard_elementwise(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    """Elementwise ops keep examples apart when every batched operand is batched along one axis
    and no unsharded operand carries the batch dimension."""
    nd = len(n.shape)
    axes = {s[1] + nd - len(ctx.aval(n.inputs[k])[1]) for k, s in enumerate(ins) if s is not None}
    if len(axes) != 1:
        raise refuse(n, "operands are batched along different axes")
    (axis,) = axes
    for k, s in enumerate(ins):
        if s is None and ctx.has_batch_dim(n.inputs[k], axis, nd):
            raise refuse(n, f"operand %{n.inputs[k]} has the batch dimension but is not one of the sharded inputs")
    return ("b", axis)
