"""Indexing primitives: gather along an axis (take) and its transpose (scatter_add), and the ops
that compute indices from values (argsort, searchsorted: integer results, no gradient; a sort
is `take` of its argsort, so its gradient flows through the permutation)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from ..errors import ShapeError
from . import emit as e
from .core import Primitive, check_axes, flops_of_input, need, register, size_of
from .dtypes import DTYPES, INTS, AVal, Shape
from .sharding import ShardContext, ShardState, refuse, shard_refused, sum_refused


def _gathered(x: AVal, idx: AVal, axis: int, name: str) -> Shape:
    need(idx[0], INTS, f"{name} indices")
    check_axes((axis,), len(x[1]), "axis")
    if x[1][axis] == 0 and math.prod(idx[1]) > 0:
        raise ShapeError(f"{name} from an empty axis {axis} of {x[1]}")
    return (*x[1][:axis], *idx[1], *x[1][axis + 1:])


# ---------------------------------------------------------------- take


def _take_rule(x: AVal, idx: AVal, *, axis: int) -> AVal:
    return (x[0], _gathered(x, idx, axis, "take"))


def _vjp_take(g: Any, x: Any, idx: Any, *, out: Any, need: Sequence[bool], nb: int, axis: int) -> list[Any]:
    zeros = e.zeros(e.batch_dims(g, nb) + x.shape, x.dtype, x)
    return [e.bind("scatter_add", zeros, idx, g, axis=axis + nb), None]


def _shard_take(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    sx, si = ins
    axis = n.attrs["axis"]
    idx_nd = len(ctx.aval(n.inputs[1])[1])
    if sx is not None and si is not None:
        raise refuse(n, "take with batched indices from a batched operand")
    if si is not None:  # an example-independent table looked up by per-example indices
        return ("b", axis + si[1])
    if sx[1] == axis:
        raise refuse(n, "take along the batch axis selects examples")
    return ("b", sx[1] if sx[1] < axis else sx[1] - 1 + idx_nd)


register(Primitive(
    "take", 2, {"axis": "int"}, _take_rule, lambda xp: lambda x, idx, *, axis: xp.take(x, idx, axis=axis), _vjp_take,
    lambda ts, x, idx, *, out, axis: e.bind("take", ts[0], idx, axis=axis), shard=_shard_take, shard_sum=sum_refused))


# ---------------------------------------------------------------- scatter_add


def _scatter_rule(x: AVal, idx: AVal, upd: AVal, *, axis: int) -> AVal:
    want = _gathered(x, idx, axis, "scatter_add")
    if upd != (x[0], want):
        raise ShapeError(f"scatter_add updates must be {x[0]}{list(want)}, got {upd[0]}{list(upd[1])}")
    return x


def _scatter_kernel(xp: ModuleType) -> Any:
    def kernel(x: Any, idx: Any, upd: Any, *, axis: int) -> Any:
        out = xp.array(x, copy=True)
        xp.add.at(out, (slice(None),) * axis + (idx,), upd)
        return out

    return kernel


def _vjp_scatter(g: Any, x: Any, idx: Any, upd: Any, *, out: Any, need: Sequence[bool], nb: int, axis: int) -> list[Any]:
    return [g if need[0] else None, None, e.bind("take", g, idx, axis=axis + nb) if need[2] else None]


def _jvp_scatter(ts: Sequence[Any], x: Any, idx: Any, upd: Any, *, out: Any, axis: int) -> Any:
    tx = ts[0] if ts[0] is not None else e.zeros(x.shape, x.dtype, x)
    tu = ts[2] if ts[2] is not None else e.zeros(upd.shape, upd.dtype, upd)
    return e.bind("scatter_add", tx, idx, tu, axis=axis)


register(Primitive(
    "scatter_add", 3, {"axis": "int"}, _scatter_rule, _scatter_kernel, _vjp_scatter, _jvp_scatter,
    shard=shard_refused, shard_sum=sum_refused))


# ---------------------------------------------------------------- argsort and searchsorted


def _argsort_rule(x: AVal, *, axis: int) -> AVal:
    need(x[0], DTYPES, "argsort operand")
    check_axes((axis,), len(x[1]), "axis")
    return ("int64", x[1])


def _argsort_kernel(xp: ModuleType) -> Any:
    # stable: equal values keep their order (NaN sorts last, as numpy's)
    return lambda x, *, axis: xp.argsort(x, axis=axis, kind="stable").astype("int64", copy=False)


def _shard_argsort(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    if n.attrs["axis"] == ins[0][1]:
        raise refuse(n, "argsort along the batch axis mixes examples")
    return ins[0]


register(Primitive(
    "argsort", 1, {"axis": "int"}, _argsort_rule, _argsort_kernel, differentiable=False, flops=flops_of_input,
    shard=_shard_argsort, shard_sum=sum_refused))


def _searchsorted_rule(a: AVal, v: AVal, *, right: bool) -> AVal:
    if a[0] != v[0]:
        raise ShapeError(f"searchsorted operands have different dtypes {a[0]} and {v[0]} (insert a cast)")
    need(a[0], DTYPES, "searchsorted operands")
    if len(a[1]) != 1:
        raise ShapeError(f"searchsorted needs a 1-D sorted operand, got shape {a[1]}")
    return ("int64", v[1])


def _searchsorted_kernel(xp: ModuleType) -> Any:
    def kernel(a: Any, v: Any, *, right: bool) -> Any:
        return xp.asarray(xp.searchsorted(a, v, side="right" if right else "left"), dtype="int64")

    return kernel


def _flops_searchsorted(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return size_of(out) * max(1.0, math.log2(max(ins[0][1][0], 1)))  # a binary search per value


def _shard_searchsorted(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    if ins[0] is not None:
        raise refuse(n, "searchsorted in a batched sorted operand")
    return ins[1]  # each value is looked up in the one example-independent sorted array


register(Primitive(
    "searchsorted", 2, {"right": "bool"}, _searchsorted_rule, _searchsorted_kernel, differentiable=False,
    flops=_flops_searchsorted, shard=_shard_searchsorted, shard_sum=sum_refused))
