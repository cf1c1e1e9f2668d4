"""Linear algebra primitives: batched matrix multiplication."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ShapeError
from . import emit as e
from .core import Primitive, broadcast_shapes, need, register, ufunc
from .dtypes import NUMERIC, AVal
from .sharding import SUM, ShardContext, ShardState, refuse, sum_refused


def _matmul_rule(a: AVal, b: AVal) -> AVal:
    if a[0] != b[0]:
        raise ShapeError(f"matmul operands have different dtypes {a[0]} and {b[0]}")
    need(a[0], NUMERIC, "matmul operands")
    if len(a[1]) < 2 or len(b[1]) < 2:
        raise ShapeError(f"matmul primitive needs rank >= 2 operands, got {a[1]} and {b[1]}")
    if a[1][-1] != b[1][-2]:
        raise ShapeError(f"matmul contracting dimensions differ: {a[1]} @ {b[1]}")
    return (a[0], (*broadcast_shapes(a[1][:-2], b[1][:-2]), a[1][-2], b[1][-1]))


def _swap(a: Any) -> Any:
    perm = list(range(a.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return e.bind("transpose", a, perm=tuple(perm))


def _vjp_matmul(g: Any, a: Any, b: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [e.unbroadcast(e.bind("matmul", g, _swap(b)), a.shape, nb) if need[0] else None,
            e.unbroadcast(e.bind("matmul", _swap(a), g), b.shape, nb) if need[1] else None]


def _jvp_matmul(ts: Sequence[Any], a: Any, b: Any, *, out: Any) -> Any:
    terms = []
    if ts[0] is not None:
        terms.append(e.bind("matmul", ts[0], b))
    if ts[1] is not None:
        terms.append(e.bind("matmul", a, ts[1]))
    t = terms[0] if len(terms) == 1 else e.add(terms[0], terms[1])
    return e.broadcast_to(t, out.shape)


def _flops_matmul(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return 2.0 * math.prod(out[1]) * ins[0][1][-1]


def _shard_matmul(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    nd = len(n.shape)
    ra, rb = ctx.aval(n.inputs[0])[1], ctx.aval(n.inputs[1])[1]
    sa, sb = ins
    pa = None if sa is None else sa[1] - len(ra)  # negative position: -1 columns, -2 rows
    pb = None if sb is None else sb[1] - len(rb)
    if pa == -1 and pb == -2:
        return SUM  # contraction over the examples: a sum of per-example products
    if pa == -1 or pb == -2:
        raise refuse(n, "matmul contracts the batch axis of one operand with a non-batch axis of the other")
    out_axes = set()
    if pa is not None:
        out_axes.add(nd - 2 if pa == -2 else nd + pa)
    if pb is not None:
        out_axes.add(nd - 1 if pb == -1 else nd + pb)
    if len(out_axes) != 1:
        raise refuse(n, "both operands of matmul are batched along different axes")
    return ("b", out_axes.pop())


register(Primitive(
    "matmul", 2, {}, _matmul_rule, ufunc("matmul"), _vjp_matmul, _jvp_matmul, flops=_flops_matmul, out=True,
    shard=_shard_matmul, shard_sum=sum_refused))
