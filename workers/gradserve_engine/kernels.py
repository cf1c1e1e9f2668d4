"""Primitive kernels: one table `op -> kernel` over an array namespace (numpy by default).

Every kernel takes arrays and the node's attributes and returns an array of the node's dtype.
Kernels listed in `OUT_CAPABLE` also accept `out=`, a preallocated buffer of the result's
shape and dtype, which the planner hands them to reuse dead intermediates' memory.
These are the reference every faster path (fused, native, GPU) is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

Kernel = Callable[..., Any]


def _scatter_add(xp: ModuleType) -> Kernel:
    def kernel(x, idx, upd, *, axis):
        out = xp.array(x, copy=True)
        xp.add.at(out, (slice(None),) * axis + (idx,), upd)
        return out

    return kernel


def _pad(xp: ModuleType) -> Kernel:
    def kernel(x, *, lo, hi, interior, value):
        shape = tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x.shape, lo, hi, interior, strict=True))
        out = xp.full(shape, value, dtype=x.dtype)
        out[tuple(slice(l, l + max(d - 1, 0) * (i + 1) + 1 if d else l, i + 1)
                  for d, l, i in zip(x.shape, lo, interior, strict=True))] = x
        return out

    return kernel


def _cumsum(xp: ModuleType) -> Kernel:
    def kernel(x, *, axis, reverse):
        if reverse:
            return xp.flip(xp.cumsum(xp.flip(x, axis), axis=axis, dtype=x.dtype), axis)
        return xp.cumsum(x, axis=axis, dtype=x.dtype)

    return kernel


def _logistic(xp: ModuleType) -> Kernel:
    def kernel(x, out=None):
        # e = exp(-|x|) never overflows; 1/(1+e) for x >= 0 and e/(1+e) for x < 0 keep full
        # relative precision in both tails (sigmoid(-40) is 4.2e-18, not 0)
        e = xp.exp(-xp.abs(x))
        if out is None:
            out = xp.empty_like(x)
        xp.divide(xp.where(x >= 0, 1.0, e).astype(x.dtype, copy=False), e + 1, out=out)
        return out

    return kernel


def make_kernels(xp: ModuleType = np) -> dict[str, Kernel]:
    """The kernel table over array namespace `xp` (numpy, or a drop-in such as CuPy)."""
    ufuncs = {
        "neg": xp.negative, "exp": xp.exp, "log": xp.log, "log1p": xp.log1p, "expm1": xp.expm1,
        "sin": xp.sin, "cos": xp.cos, "tan": xp.tan, "tanh": xp.tanh, "sqrt": xp.sqrt,
        "abs": xp.abs, "sign": xp.sign, "floor": xp.floor, "ceil": xp.ceil,
        "add": xp.add, "sub": xp.subtract, "mul": xp.multiply, "div": xp.divide, "pow": xp.power,
        "maximum": xp.maximum, "minimum": xp.minimum, "atan2": xp.arctan2,
        "lt": xp.less, "le": xp.less_equal, "gt": xp.greater, "ge": xp.greater_equal,
        "eq": xp.equal, "ne": xp.not_equal, "matmul": xp.matmul,
    }
    table: dict[str, Kernel] = {name: f for name, f in ufuncs.items()}
    table.update({
        "logistic": _logistic(xp),
        "select": xp.where,
        "cast": lambda x, *, dtype: x.astype(dtype),
        "stop_gradient": lambda x: x,
        "reduce_sum": lambda x, *, axes, keepdims: xp.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
        "reduce_max": lambda x, *, axes, keepdims: xp.max(x, axis=axes, keepdims=keepdims),
        "reduce_min": lambda x, *, axes, keepdims: xp.min(x, axis=axes, keepdims=keepdims),
        "cumsum": _cumsum(xp),
        "reshape": lambda x, *, shape: xp.reshape(x, shape),
        "transpose": lambda x, *, perm: xp.transpose(x, perm),
        "broadcast_to": lambda x, *, shape: xp.broadcast_to(x, shape),
        "expand_dims": lambda x, *, axes: xp.expand_dims(x, axes),
        "squeeze": lambda x, *, axes: xp.squeeze(x, axes),
        "slice": lambda x, *, starts, stops, steps: x[tuple(map(slice, starts, stops, steps))],
        "pad": _pad(xp),
        "concatenate": lambda *xs, axis: xp.concatenate(xs, axis=axis),
        "take": lambda x, idx, *, axis: xp.take(x, idx, axis=axis),
        "scatter_add": _scatter_add(xp),
    })
    return table


KERNELS = make_kernels(np)

# kernels that accept out= (numpy ufuncs, and logistic which is built from them)
OUT_CAPABLE = frozenset({
    "neg", "exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "sqrt", "abs", "sign", "floor", "ceil",
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "atan2", "logistic", "matmul",
})
# elementwise kernels that may write over an operand of the result's shape (exact aliasing is safe)
IN_PLACE = OUT_CAPABLE - {"matmul"}
# kernels whose result may share memory with an operand (a view): the planner tracks aliases
VIEWS = frozenset({"stop_gradient", "reshape", "transpose", "broadcast_to", "expand_dims", "squeeze", "slice"})
