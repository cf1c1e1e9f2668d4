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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve_engine.errors import ShardError
from gradserve_engine.ir import Builder, Graph, Node, Var
from gradserve_engine.primitives import FLOATS

SUM = "sum"
_ELEMENTWISE = frozenset({"neg", "exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "logistic", "sqrt", "abs",
                          "sign", "floor", "ceil", "stop_gradient", "cast", "add", "sub", "mul", "div", "pow", "maximum",
                          "minimum", "atan2", "lt", "le", "gt", "ge", "eq", "ne", "select"})
_LINEAR_UNARY = frozenset({"neg", "cast", "stop_gradient", "reshape", "transpose", "broadcast_to", "expand_dims", "squeeze",
                           "reduce_sum", "cumsum", "slice"})


@dataclass(frozen=True)
class Sharding:
    batch: int  # the batch size B
    states: tuple[Any, ...]  # per value id: None, ("b", axis) or "sum"

    def state(self, vid: int) -> Any:
        return self.states[vid]


def _fail(n: Node, why: str) -> ShardError:
    return ShardError(f"cannot shard along the batch axis: {why}, at {n.text()}")


def analyze(graph: Graph, batch_axes: Mapping[str, int]) -> Sharding:
    """States of every value for inputs batched along `batch_axes`; raises ShardError naming
    the node that mixes examples."""
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
    batch = sizes.pop()

    def has_batch_dim(vid: int, axis: int, ndim: int) -> bool:
        shape = graph.aval(vid)[1]
        k = axis - (ndim - len(shape))
        return k >= 0 and shape[k] == batch and batch != 1

    for n in graph.nodes:
        ins = [states[i] for i in n.inputs]
        if all(s is None for s in ins):
            continue
        states[n.id] = _rule(graph, n, ins, batch, has_batch_dim)
    return Sharding(batch, tuple(states))


def _rule(graph: Graph, n: Node, ins: list[Any], batch: int, has_batch_dim) -> Any:
    op, nd = n.op, len(n.shape)
    if SUM in ins:
        return _rule_sum(graph, n, ins)
    batched = [(k, s[1]) for k, s in enumerate(ins) if s is not None]
    if op in _ELEMENTWISE:
        axes = {s_axis + nd - len(graph.aval(n.inputs[k])[1]) for k, s_axis in batched}
        if len(axes) != 1:
            raise _fail(n, "operands are batched along different axes")
        (axis,) = axes
        for k, s in enumerate(ins):
            if s is None and has_batch_dim(n.inputs[k], axis, nd):
                raise _fail(n, f"operand %{n.inputs[k]} has the batch dimension but is not one of the sharded inputs")
        return ("b", axis)
    a = batched[0][1]
    if op in ("reduce_sum", "reduce_max", "reduce_min"):
        axes, keep = n.attrs["axes"], n.attrs["keepdims"]
        if a in axes:
            if op != "reduce_sum":
                raise _fail(n, f"{op} over the batch axis mixes examples")
            return SUM
        return ("b", a if keep else a - sum(1 for x in axes if x < a))
    if op == "cumsum":
        if n.attrs["axis"] == a:
            raise _fail(n, "cumsum along the batch axis mixes examples")
        return ("b", a)
    if op == "matmul":
        ra, rb = graph.aval(n.inputs[0])[1], graph.aval(n.inputs[1])[1]
        sa, sb = ins
        pa = None if sa is None else sa[1] - len(ra)  # negative position: -1 columns, -2 rows
        pb = None if sb is None else sb[1] - len(rb)
        if pa == -1 and pb == -2:
            return SUM  # contraction over the examples: a sum of per-example products
        if pa == -1 or pb == -2:
            raise _fail(n, "matmul contracts the batch axis of one operand with a non-batch axis of the other")
        out_axes = set()
        if pa is not None:
            out_axes.add(nd - 2 if pa == -2 else nd + pa)
        if pb is not None:
            out_axes.add(nd - 1 if pb == -1 else nd + pb)
        if len(out_axes) != 1:
            raise _fail(n, "both operands of matmul are batched along different axes")
        return ("b", out_axes.pop())
    if op == "reshape":
        shape = graph.aval(n.inputs[0])[1]
        before, after = math.prod(shape[:a]), math.prod(shape[a + 1:])
        for j, d in enumerate(n.shape):
            if d == batch and math.prod(n.shape[:j]) == before and math.prod(n.shape[j + 1:]) == after:
                return ("b", j)
        raise _fail(n, "reshape merges or splits the batch axis")
    if op == "transpose":
        return ("b", list(n.attrs["perm"]).index(a))
    if op == "broadcast_to":
        return ("b", a + nd - len(graph.aval(n.inputs[0])[1]))
    if op == "expand_dims":
        axis = a
        for x in sorted(n.attrs["axes"]):
            if x <= axis:
                axis += 1
        return ("b", axis)
    if op == "squeeze":
        if a in n.attrs["axes"]:
            raise _fail(n, "squeeze removes the batch axis")
        return ("b", a - sum(1 for x in n.attrs["axes"] if x < a))
    if op == "slice":
        if (n.attrs["starts"][a], n.attrs["stops"][a], n.attrs["steps"][a]) != (0, batch, 1):
            raise _fail(n, "slice selects some examples along the batch axis")
        return ("b", a)
    if op == "pad":
        if (n.attrs["lo"][a], n.attrs["hi"][a], n.attrs["interior"][a]) != (0, 0, 0):
            raise _fail(n, "pad along the batch axis")
        return ("b", a)
    if op == "concatenate":
        if any(s is None for s in ins) or len({s[1] for s in ins}) != 1:
            raise _fail(n, "concatenate mixes sharded and unsharded operands")
        if n.attrs["axis"] == a:
            raise _fail(n, "concatenate along the batch axis")
        return ("b", a)
    if op == "take":
        sx, si = ins
        axis = n.attrs["axis"]
        idx_nd = len(graph.aval(n.inputs[1])[1])
        if sx is not None and si is not None:
            raise _fail(n, "take with batched indices from a batched operand")
        if si is not None:  # an example-independent table looked up by per-example indices
            return ("b", axis + si[1])
        if sx[1] == axis:
            raise _fail(n, "take along the batch axis selects examples")
        return ("b", sx[1] if sx[1] < axis else sx[1] - 1 + idx_nd)
    raise _fail(n, f"{op} on batched values is not supported by data-parallel execution")


def _rule_sum(graph: Graph, n: Node, ins: list[Any]) -> Any:
    op = n.op
    if any(s is not None and s != SUM for s in ins):
        raise _fail(n, "a per-example value meets a sum over examples")
    if op in _LINEAR_UNARY:
        return SUM
    if op in ("add", "sub"):
        return SUM  # an example-independent term is split across shards by the rewrite
    if op == "mul" and ins.count(SUM) == 1:
        return SUM
    if op == "div" and ins[0] == SUM and ins[1] is None:
        return SUM
    if op == "pad" and n.attrs["value"] == 0.0:
        return SUM
    if op == "concatenate" and all(s == SUM for s in ins):
        return SUM
    raise _fail(n, f"{op} of a sum over examples is not linear, so shards cannot be added up")


def shard_graph(graph: Graph, sharding: Sharding, size: int) -> Graph:
    """`graph` for a shard of `size` examples: batch dimensions become `size`; an
    example-independent term added to a sum is scaled by size/B, so shards add up exactly."""
    B = sharding.batch
    b = Builder()
    env: dict[int, Var] = {}
    for i in graph.inputs:
        s = sharding.state(i.id)
        shape = tuple(size if s is not None and k == s[1] else d for k, d in enumerate(i.shape))
        env[i.id] = b.input(i.name, i.dtype, shape)
    for k, c in enumerate(graph.constants):
        env[len(graph.inputs) + k] = b.const(c)
    for n in graph.nodes:
        s = sharding.state(n.id)
        args = [env[i] for i in n.inputs]
        attrs = dict(n.attrs)
        if isinstance(s, tuple):
            axis = s[1]
            if n.op in ("reshape", "broadcast_to"):
                attrs["shape"] = tuple(size if k == axis else d for k, d in enumerate(attrs["shape"]))
            elif n.op == "slice":
                attrs["stops"] = tuple(size if k == axis else d for k, d in enumerate(attrs["stops"]))
        elif s == SUM and n.op in ("add", "sub"):
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
