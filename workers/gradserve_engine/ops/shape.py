"""Shape primitives: reshape, transpose, broadcast_to, expand_dims, squeeze, slice, pad,
concatenate. All are linear; all but pad and concatenate are views of their operand."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ShapeError
from . import emit as e
from .core import JvpRule, KernelFactory, Primitive, VjpRule, check_axes, flops_elementwise, flops_none, register
from .dtypes import AVal, Shape
from .sharding import SUM, ReshardRule, ShardContext, ShardState, SumRule, refuse, sum_linear


def shape_op(name: str, attrs: dict[str, str], rule: Callable[..., AVal], kernel: KernelFactory, vjp: VjpRule,
             shard: Callable[..., ShardState], *, view: bool = True, broadcast_view: bool = False,
             jvp: JvpRule | None = None, shard_sum: SumRule = sum_linear, reshard: ReshardRule | None = None,
             arity: int | None = 1) -> Primitive:
    """Register a linear shape op (its JVP is itself unless given)."""
    return register(Primitive(
        name, arity, attrs, rule, kernel, vjp, jvp or e.linear_jvp(name), linear=True,
        flops=flops_none if view else flops_elementwise, view=view, broadcast_view=broadcast_view,
        shard=shard, shard_sum=shard_sum, reshard=reshard))


def _batch_at(key: str) -> ReshardRule:
    """Attributes of a shard: attribute `key`'s entry on the batch axis becomes the shard's size."""
    def reshard(attrs: dict[str, Any], a: int, n: int) -> dict[str, Any]:
        return {**attrs, key: tuple(n if k == a else d for k, d in enumerate(attrs[key]))}

    return reshard


# ---------------------------------------------------------------- reshape


def _reshape_rule(x: AVal, *, shape: Shape) -> AVal:
    if any(d < 0 for d in shape) or math.prod(shape) != math.prod(x[1]):
        raise ShapeError(f"cannot reshape {x[1]} to {tuple(shape)}")
    return (x[0], tuple(shape))


def _shard_reshape(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    a = ins[0][1]
    shape = ctx.aval(n.inputs[0])[1]
    before, after = math.prod(shape[:a]), math.prod(shape[a + 1:])
    for j, d in enumerate(n.shape):
        if d == ctx.batch and math.prod(n.shape[:j]) == before and math.prod(n.shape[j + 1:]) == after:
            return ("b", j)
    raise refuse(n, "reshape merges or splits the batch axis")


shape_op("reshape", {"shape": "ints"}, _reshape_rule, lambda xp: lambda x, *, shape: xp.reshape(x, shape),
         lambda g, x, *, out, need, nb, shape: [e.reshape(g, e.batch_dims(g, nb) + x.shape)], _shard_reshape,
         broadcast_view=True, reshard=_batch_at("shape"))


# ---------------------------------------------------------------- transpose


def _transpose_rule(x: AVal, *, perm: tuple[int, ...]) -> AVal:
    if sorted(perm) != list(range(len(x[1]))):
        raise ShapeError(f"perm {tuple(perm)} is not a permutation of the {len(x[1])} axes of {x[1]}")
    return (x[0], tuple(x[1][p] for p in perm))


def _vjp_transpose(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int, perm: tuple[int, ...]) -> list[Any]:
    inverse = tuple(int(i) for i in np.argsort(perm))
    return [e.bind("transpose", g, perm=tuple(range(nb)) + e.shift(inverse, nb))]


shape_op("transpose", {"perm": "ints"}, _transpose_rule, lambda xp: lambda x, *, perm: xp.transpose(x, perm),
         _vjp_transpose, lambda ctx, n, ins: ("b", list(n.attrs["perm"]).index(ins[0][1])))


# ---------------------------------------------------------------- broadcast_to, expand_dims, squeeze


def _broadcast_rule(x: AVal, *, shape: Shape) -> AVal:
    shape = tuple(shape)
    if len(shape) < len(x[1]) or any(d < 0 for d in shape):
        raise ShapeError(f"cannot broadcast {x[1]} to {shape}")
    for s, d in zip(x[1], shape[len(shape) - len(x[1]):], strict=True):
        if s not in (1, d):
            raise ShapeError(f"cannot broadcast {x[1]} to {shape}")
    return (x[0], shape)


shape_op("broadcast_to", {"shape": "ints"}, _broadcast_rule, lambda xp: lambda x, *, shape: xp.broadcast_to(x, shape),
         lambda g, x, *, out, need, nb, shape: [e.unbroadcast(g, x.shape, nb)],
         lambda ctx, n, ins: ("b", ins[0][1] + len(n.shape) - len(ctx.aval(n.inputs[0])[1])),
         broadcast_view=True, reshard=_batch_at("shape"))


def _expand_rule(x: AVal, *, axes: tuple[int, ...]) -> AVal:
    ndim = len(x[1]) + len(axes)
    check_axes(axes, ndim)
    dims = iter(x[1])
    return (x[0], tuple(1 if i in axes else next(dims) for i in range(ndim)))


def _shard_expand(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    axis = ins[0][1]
    for x in sorted(n.attrs["axes"]):
        if x <= axis:
            axis += 1
    return ("b", axis)


shape_op("expand_dims", {"axes": "ints"}, _expand_rule, lambda xp: lambda x, *, axes: xp.expand_dims(x, axes),
         lambda g, x, *, out, need, nb, axes: [e.bind("squeeze", g, axes=e.shift(axes, nb))], _shard_expand,
         broadcast_view=True)


def _squeeze_rule(x: AVal, *, axes: tuple[int, ...]) -> AVal:
    check_axes(axes, len(x[1]))
    if any(x[1][a] != 1 for a in axes):
        raise ShapeError(f"squeeze axes {tuple(axes)} of {x[1]} are not all of size 1")
    return (x[0], tuple(d for i, d in enumerate(x[1]) if i not in axes))


def _shard_squeeze(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    a = ins[0][1]
    if a in n.attrs["axes"]:
        raise refuse(n, "squeeze removes the batch axis")
    return ("b", a - sum(1 for x in n.attrs["axes"] if x < a))


shape_op("squeeze", {"axes": "ints"}, _squeeze_rule, lambda xp: lambda x, *, axes: xp.squeeze(x, axes),
         lambda g, x, *, out, need, nb, axes: [e.bind("expand_dims", g, axes=e.shift(axes, nb))], _shard_squeeze,
         broadcast_view=True)


# ---------------------------------------------------------------- slice and pad


def _per_axis(x: AVal, name: str, **lists: tuple[int, ...]) -> None:
    for key, val in lists.items():
        if len(val) != len(x[1]):
            raise ShapeError(f"{name} {key} has {len(val)} entries for rank-{len(x[1])} operand {x[1]}")


def _slice_rule(x: AVal, *, starts: Shape, stops: Shape, steps: Shape) -> AVal:
    _per_axis(x, "slice", starts=starts, stops=stops, steps=steps)
    out = []
    for d, a, b, s in zip(x[1], starts, stops, steps, strict=True):
        if not (0 <= a <= b <= d and s >= 1):
            raise ShapeError(f"slice start={a} stop={b} step={s} invalid for dimension {d} (need 0<=start<=stop<=dim, step>=1)")
        out.append(-(-(b - a) // s))
    return (x[0], tuple(out))


def _vjp_slice(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int, starts: Shape, stops: Shape,
               steps: Shape) -> list[Any]:
    hi = tuple(d - a - (m - 1) * s - 1 if m else d - a for d, a, s, m in zip(x.shape, starts, steps, out.shape, strict=True))
    return [e.bind("pad", g, lo=(0,) * nb + tuple(starts), hi=(0,) * nb + hi,
                   interior=(0,) * nb + tuple(s - 1 for s in steps), value=0.0)]


def _shard_slice(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    a = ins[0][1]
    if (n.attrs["starts"][a], n.attrs["stops"][a], n.attrs["steps"][a]) != (0, ctx.batch, 1):
        raise refuse(n, "slice selects some examples along the batch axis")
    return ins[0]


shape_op("slice", {"starts": "ints", "stops": "ints", "steps": "ints"}, _slice_rule,
         lambda xp: lambda x, *, starts, stops, steps: x[tuple(map(slice, starts, stops, steps))], _vjp_slice,
         _shard_slice, reshard=_batch_at("stops"))


def _pad_rule(x: AVal, *, lo: Shape, hi: Shape, interior: Shape, value: float) -> AVal:
    _per_axis(x, "pad", lo=lo, hi=hi, interior=interior)
    if any(v < 0 for v in (*lo, *hi, *interior)):
        raise ShapeError(f"pad widths must be non-negative, got lo={tuple(lo)} hi={tuple(hi)} interior={tuple(interior)}")
    return (x[0], tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x[1], lo, hi, interior, strict=True)))


def _pad_kernel(xp: ModuleType) -> Any:
    def kernel(x: Any, *, lo: Shape, hi: Shape, interior: Shape, value: float) -> Any:
        shape = tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x.shape, lo, hi, interior, strict=True))
        out = xp.full(shape, value, dtype=x.dtype)
        out[tuple(slice(l, l + max(d - 1, 0) * (i + 1) + 1 if d else l, i + 1)
                  for d, l, i in zip(x.shape, lo, interior, strict=True))] = x
        return out

    return kernel


def _vjp_pad(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int, lo: Shape, hi: Shape, interior: Shape,
             value: float) -> list[Any]:
    stops = tuple(l + (d - 1) * (i + 1) + 1 if d else l for d, l, i in zip(x.shape, lo, interior, strict=True))
    return [e.bind("slice", g, starts=(0,) * nb + tuple(lo), stops=e.batch_dims(g, nb) + stops,
                   steps=(1,) * nb + tuple(i + 1 for i in interior))]


def _jvp_pad(ts: Sequence[Any], x: Any, *, out: Any, lo: Shape, hi: Shape, interior: Shape, value: float) -> Any:
    return e.bind("pad", ts[0], lo=lo, hi=hi, interior=interior, value=0.0)  # the padding value has no tangent


def _shard_pad(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    a = ins[0][1]
    if (n.attrs["lo"][a], n.attrs["hi"][a], n.attrs["interior"][a]) != (0, 0, 0):
        raise refuse(n, "pad along the batch axis")
    return ins[0]


shape_op("pad", {"lo": "ints", "hi": "ints", "interior": "ints", "value": "float"}, _pad_rule, _pad_kernel, _vjp_pad,
         _shard_pad, view=False, jvp=_jvp_pad, shard_sum=lambda n, ins: n.attrs["value"] == 0.0)


# ---------------------------------------------------------------- concatenate


def _concatenate_rule(*xs: AVal, axis: int) -> AVal:
    first = xs[0]
    check_axes((axis,), len(first[1]), "axis")
    for x in xs[1:]:
        if x[0] != first[0]:
            raise ShapeError(f"concatenate operands have different dtypes {first[0]} and {x[0]}")
        if len(x[1]) != len(first[1]) or any(a != b for i, (a, b) in enumerate(zip(x[1], first[1], strict=True)) if i != axis):
            raise ShapeError(f"concatenate operands {first[1]} and {x[1]} differ off axis {axis}")
    return (first[0], tuple(sum(x[1][axis] for x in xs) if i == axis else d for i, d in enumerate(first[1])))


def _vjp_concatenate(g: Any, *xs: Any, out: Any, need: Sequence[bool], nb: int, axis: int) -> list[Any]:
    cts: list[Any] = []
    start = 0
    for x, n in zip(xs, need, strict=True):
        stop = start + x.shape[axis]
        if n:
            starts = tuple(start if i == axis + nb else 0 for i in range(g.ndim))
            stops = tuple(stop if i == axis + nb else d for i, d in enumerate(g.shape))
            cts.append(e.bind("slice", g, starts=starts, stops=stops, steps=(1,) * g.ndim))
        else:
            cts.append(None)
        start = stop
    return cts


def _jvp_concatenate(ts: Sequence[Any], *xs: Any, out: Any, axis: int) -> Any:
    parts = [t if t is not None else e.zeros(x.shape, x.dtype, x) for t, x in zip(ts, xs, strict=True)]
    return e.bind("concatenate", *parts, axis=axis)


def _shard_concatenate(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    if any(s is None for s in ins) or len({s[1] for s in ins}) != 1:
        raise refuse(n, "concatenate mixes sharded and unsharded operands")
    if n.attrs["axis"] == ins[0][1]:
        raise refuse(n, "concatenate along the batch axis")
    return ins[0]


shape_op("concatenate", {"axis": "int"}, _concatenate_rule, lambda xp: lambda *xs, axis: xp.concatenate(xs, axis=axis),
         _vjp_concatenate, _shard_concatenate, view=False, jvp=_jvp_concatenate, arity=None,
         shard_sum=lambda n, ins: all(s == SUM for s in ins))
