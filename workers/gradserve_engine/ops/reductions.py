"""Reductions over axes (sum, max, min) and the cumulative sum."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ..errors import ShapeError
from . import emit as e
from .core import Primitive, check_axes, flops_of_input, need, register
from .dtypes import NUMERIC, AVal, Shape
from .sharding import SUM, ShardContext, ShardState, refuse, sum_linear, sum_refused

REDUCE_ATTRS = {"axes": "ints", "keepdims": "bool"}


def _reduced(shape: Shape, axes: tuple[int, ...], keepdims: bool) -> Shape:
    check_axes(axes, len(shape))
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _expand_reduced(g: Any, axes: tuple[int, ...], keepdims: bool, nb: int) -> Any:
    return g if keepdims else e.bind("expand_dims", g, axes=e.shift(axes, nb))


def _shard_reduce(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    a = ins[0][1]
    axes, keep = n.attrs["axes"], n.attrs["keepdims"]
    if a in axes:
        if n.op != "reduce_sum":
            raise refuse(n, f"{n.op} over the batch axis mixes examples")
        return SUM
    return ("b", a if keep else a - sum(1 for x in axes if x < a))


# ---------------------------------------------------------------- sum


def _sum_rule(x: AVal, *, axes: tuple[int, ...], keepdims: bool) -> AVal:
    need(x[0], NUMERIC, "reduce_sum operand")
    return (x[0], _reduced(x[1], axes, keepdims))


def _vjp_sum(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int, axes: tuple[int, ...], keepdims: bool) -> list[Any]:
    return [e.broadcast_to(_expand_reduced(g, axes, keepdims, nb), e.batch_dims(g, nb) + x.shape)]


register(Primitive(
    "reduce_sum", 1, REDUCE_ATTRS, _sum_rule,
    lambda xp: lambda x, *, axes, keepdims: xp.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
    _vjp_sum, e.linear_jvp("reduce_sum"), linear=True, flops=flops_of_input, shard=_shard_reduce, shard_sum=sum_linear))


# ---------------------------------------------------------------- max and min


def _extremum_rule(name: str):
    def rule(x: AVal, *, axes: tuple[int, ...], keepdims: bool) -> AVal:
        need(x[0], NUMERIC, f"{name} operand")
        if any(x[1][a] == 0 for a in check_axes(axes, len(x[1]))):
            raise ShapeError(f"{name} over an empty axis has no identity")
        return (x[0], _reduced(x[1], axes, keepdims))

    return rule


def _extremum_mask(x: Any, out: Any, axes: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    m = out if keepdims else e.bind("expand_dims", out, axes=axes)
    mask = e.cast(e.eq(x, m), x.dtype)
    return mask, e.bind("reduce_sum", mask, axes=axes, keepdims=True)


def _vjp_extremum(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int, axes: tuple[int, ...],
                  keepdims: bool) -> list[Any]:
    # the cotangent is shared evenly among the positions that attain the extremum (as torch.amax)
    mask, count = _extremum_mask(x, out, axes, keepdims)
    return [e.mul_no_nan(e.div(mask, count), _expand_reduced(g, axes, keepdims, nb))]


def _jvp_extremum(ts: Sequence[Any], x: Any, *, out: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    mask, count = _extremum_mask(x, out, axes, keepdims)
    return e.bind("reduce_sum", e.mul(ts[0], e.div(mask, count)), axes=axes, keepdims=keepdims)


def _extremum_kernel(fn: str):
    def factory(xp: ModuleType) -> Any:
        f = getattr(xp, fn)
        return lambda x, *, axes, keepdims: f(x, axis=axes, keepdims=keepdims)

    return factory


for _name, _fn in (("reduce_max", "max"), ("reduce_min", "min")):
    register(Primitive(
        _name, 1, REDUCE_ATTRS, _extremum_rule(_name), _extremum_kernel(_fn), _vjp_extremum, _jvp_extremum,
        flops=flops_of_input, shard=_shard_reduce, shard_sum=sum_refused))


# ---------------------------------------------------------------- cumulative sum


def _cumsum_rule(x: AVal, *, axis: int, reverse: bool) -> AVal:
    need(x[0], NUMERIC, "cumsum operand")
    check_axes((axis,), len(x[1]), "axis")
    return x


def _cumsum_kernel(xp: ModuleType) -> Any:
    def kernel(x: Any, *, axis: int, reverse: bool) -> Any:
        if reverse:
            return xp.flip(xp.cumsum(xp.flip(x, axis), axis=axis, dtype=x.dtype), axis)
        return xp.cumsum(x, axis=axis, dtype=x.dtype)

    return kernel


def _shard_cumsum(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    if n.attrs["axis"] == ins[0][1]:
        raise refuse(n, "cumsum along the batch axis mixes examples")
    return ins[0]


register(Primitive(
    "cumsum", 1, {"axis": "int", "reverse": "bool"}, _cumsum_rule, _cumsum_kernel,
    lambda g, x, *, out, need, nb, axis, reverse: [e.bind("cumsum", g, axis=axis + nb, reverse=not reverse)],
    e.linear_jvp("cumsum"), linear=True, flops=flops_of_input, shard=_shard_cumsum, shard_sum=sum_linear))
