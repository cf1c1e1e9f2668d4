"""Graph optimisation after the AD transform: constant folding, peephole simplification,
common-subexpression elimination, and dead-code elimination (done by `Builder.build`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .guard import poller
from .ir import Builder, Graph, Var, copy_into
from .ops import KERNELS, PRIMITIVES

FOLD_MAX_ELEMENTS = 64  # fold only small results: a folded broadcast would ship as a big constant


def _attr_key(attrs: dict[str, Any]) -> tuple:
    return tuple(sorted(attrs.items()))


def _is_all(c: np.ndarray | None, value: float) -> bool:
    return c is not None and c.size <= FOLD_MAX_ELEMENTS and bool(np.all(c == value))


def _simplify(op: str, args: list[Var], consts: list[np.ndarray | None], shape: tuple[int, ...]) -> Var | None:
    """x*1, 1*x, x+0, 0+x, x-0, x/1 -> x (when x already has the result's shape and dtype): an
    operand equal to the op's identity element drops out."""
    prim = PRIMITIVES[op]
    if prim.identity is not None:
        for k in (1, 0) if prim.commutative else (1,):
            if _is_all(consts[k], prim.identity) and args[1 - k].shape == shape:
                return args[1 - k]
    return None


def optimize(graph: Graph) -> Graph:
    """Fold constants, simplify, share common subexpressions, drop dead nodes."""
    b = Builder()
    env = copy_into(graph, b)
    memo: dict[tuple, Var] = {}
    poll = poller("while optimizing")
    with np.errstate(all="ignore"):
        for n in graph.nodes:
            poll()
            args = [env[i] for i in n.inputs]
            consts = [b.constant_value(a) for a in args]
            if all(c is not None for c in consts) and int(np.prod(n.shape)) <= FOLD_MAX_ELEMENTS:
                env[n.id] = b.const(np.asarray(KERNELS[n.op](*consts, **n.attrs), dtype=n.dtype))
                continue
            same = _simplify(n.op, args, consts, n.shape)
            if same is not None and same.dtype == n.dtype:
                env[n.id] = same
                continue
            key = (n.op, tuple(a.id for a in args), _attr_key(n.attrs))
            if key not in memo:
                memo[key] = b.bind(n.op, *args, **n.attrs)
            env[n.id] = memo[key]
    return b.build([(name, env[vid]) for name, vid in graph.outputs])
