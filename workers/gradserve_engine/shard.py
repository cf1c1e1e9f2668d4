"""Data-parallel sharding: prove from the IR that examples stay independent along the named
batch axes until a final sum, then rewrite the graph for a shard's batch size.

Each value gets a state, propagated over the graph like sharding propagation:
  None       the value does not depend on the examples (parameters, constants);
  ("b", a)   the value holds one slice per example along axis a;
  "sum"      a partial sum over the examples: shards add up to the whole.
Only linear operations may follow a sum (add, subtract, scale by an example-independent value,
reshape, ...); anything that mixes examples otherwise is refused with the node named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ShardError
from .ir import Builder, Graph, Input, copy_into
from .ops import PRIMITIVES
from .ops.core import FLOATS
from .ops.sharding import SUM, ShardContext, refuse


@dataclass(frozen=True)
class Sharding:
    batch: int  # the batch size B
    states: tuple[Any, ...]  # per value id: None, ("b", axis) or "sum"

    def state(self, vid: int) -> Any:
        return self.states[vid]


def analyze(graph: Graph, batch_axes: Mapping[str, int]) -> Sharding:
    """States of every value for inputs batched along `batch_axes`; raises ShardError naming
    the node that mixes examples. Each op's rule is its primitive's `shard` (batched operands)
    or `shard_sum` (a sum over examples among the operands)."""
    states: list[Any] = [None] * graph.n_values
    sizes = set()
    for name, axis in batch_axes.items():
        inp = graph.input(name)
        if not -len(inp.shape) <= axis < len(inp.shape):
            raise ShardError(f"batch axis {axis} of input {name!r} is out of range for shape {inp.shape}")
        axis %= len(inp.shape)
        states[inp.id] = ("b", axis)
        sizes.add(inp.shape[axis])
    if len(sizes) != 1:
        raise ShardError(f"inputs named in batch_axes have different batch sizes {sorted(sizes)}")
    ctx = ShardContext(graph.aval, sizes.pop())
    for n in graph.nodes:
        ins = [states[i] for i in n.inputs]
        if all(s is None for s in ins):
            continue
        prim = PRIMITIVES[n.op]
        if prim.shard is None or prim.shard_sum is None:  # the registry's coverage test rules this out
            raise refuse(n, f"{n.op} declares no sharding rule")
        if SUM not in ins:
            states[n.id] = prim.shard(ctx, n, ins)
        elif any(s is not None and s != SUM for s in ins):
            raise refuse(n, "a per-example value meets a sum over examples")
        elif prim.shard_sum(n, ins):
            states[n.id] = SUM  # an example-independent term added to a sum is split across shards by the rewrite
        else:
            raise refuse(n, f"{n.op} of a sum over examples is not linear, so shards cannot be added up")
    return Sharding(ctx.batch, tuple(states))


def shard_graph(graph: Graph, sharding: Sharding, size: int) -> Graph:
    """`graph` for a shard of `size` examples: batch dimensions become `size`; an
    example-independent term added to a sum is scaled by size/B, so shards add up exactly."""
    B = sharding.batch

    def shard_shape(i: Input) -> tuple[int, ...]:
        s = sharding.state(i.id)
        return tuple(size if s is not None and k == s[1] else d for k, d in enumerate(i.shape))

    b = Builder()
    env = copy_into(graph, b, shard_shape)
    for n in graph.nodes:
        s = sharding.state(n.id)
        prim = PRIMITIVES[n.op]
        args = [env[i] for i in n.inputs]
        attrs = dict(n.attrs)
        if isinstance(s, tuple) and prim.reshard is not None:
            attrs = prim.reshard(attrs, s[1], size)
        elif s == SUM and prim.additive:
            for k, i in enumerate(n.inputs):
                if sharding.state(i) is None:
                    if n.dtype not in FLOATS:
                        raise ShardError(f"cannot split the integer term %{i} across shards, at {n.text()}")
                    args[k] = b.bind("mul", args[k], b.const(np.asarray(size / B, dtype=n.dtype)))
        env[n.id] = b.bind(n.op, *args, **attrs)
    return b.build([(name, env[vid]) for name, vid in graph.outputs])


def split(x: np.ndarray, axis: int, sizes: list[int]) -> list[np.ndarray]:
    """`x` cut along `axis` into consecutive pieces of the given sizes."""
    bounds = np.cumsum([0, *sizes])
    return [x[(slice(None),) * axis + (slice(int(bounds[k]), int(bounds[k + 1])),)] for k in range(len(sizes))]


def shard_sizes(batch: int, parts: int) -> list[int]:
    parts = max(1, min(parts, batch))
    base, extra = divmod(batch, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]
