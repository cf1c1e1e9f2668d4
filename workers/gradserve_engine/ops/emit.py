"""Strict emitters: the functions VJP/JVP rules and transforms build IR with.

Each emitter binds one primitive into the builder its traced operands belong to. They are
strict, as `lax` is next to `jax.numpy`: operands are values of one trace, and the only
conversion is a Python scalar taking the dtype of the traced operand beside it; a dtype
mismatch is a ShapeError from the primitive's own rule, never a silent promotion. Shapes
broadcast where the primitive broadcasts. The SDK's numpy semantics (promotion, indexing,
numpy's protocols) are built on top of these in the SDK, never used by the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import GraphError
from ..ir import Var
from .core import Shape

Operand = Var | bool | int | float


def _traced(op: str, xs: tuple[Operand, ...]) -> Var:
    for x in xs:
        if isinstance(x, Var):
            return x
    raise GraphError(f"{op}: needs at least one traced operand, got {xs!r}")


def _lift(x: Operand, like: Var, dtype: str) -> Var:
    if isinstance(x, Var):
        return x
    if isinstance(x, (bool, int, float)):
        return like.builder.const(np.asarray(x, dtype))
    raise GraphError(f"operand {x!r} of type {type(x).__name__} is neither a traced value nor a Python scalar")


def bind(op: str, *xs: Operand, **attrs: Any) -> Var:
    """Apply primitive `op`; Python scalars take the dtype of the first traced operand."""
    v = _traced(op, xs)
    return v.builder.bind(op, *(_lift(x, v, v.ir_dtype) for x in xs), **attrs)


def _binary(op: str):
    def emit(x: Operand, y: Operand) -> Var:
        return bind(op, x, y)

    emit.__name__ = op
    return emit


add, sub, mul, div, pow_ = _binary("add"), _binary("sub"), _binary("mul"), _binary("div"), _binary("pow")
eq, lt, gt, ge = _binary("eq"), _binary("lt"), _binary("gt"), _binary("ge")


def mul_no_nan(d: Operand, g: Var) -> Var:
    """`d * g`, and 0 wherever `g` is 0 even if `d` is inf or nan: how a rule applies a local
    derivative `d` to a cotangent `g`. A zero cotangent (the branch `where` did not select, say)
    then stays zero instead of turning into nan where that branch is not finite."""
    return bind("mul_no_nan", d, g)


def neg(x: Var) -> Var:
    return bind("neg", x)


def select(c: Var, x: Operand, y: Operand) -> Var:
    """`x` where `c`, else `y` (one of them traced; a scalar takes the other's dtype)."""
    v = _traced("select", (x, y))
    return c.builder.bind("select", c, _lift(x, v, v.ir_dtype), _lift(y, v, v.ir_dtype))


def cast(x: Var, dtype: str) -> Var:
    return x if x.ir_dtype == dtype else bind("cast", x, dtype=dtype)


def reshape(x: Var, shape: Shape) -> Var:
    shape = tuple(shape)
    return x if x.shape == shape else bind("reshape", x, shape=shape)


def broadcast_to(x: Var, shape: Shape) -> Var:
    shape = tuple(shape)
    return x if x.shape == shape else bind("broadcast_to", x, shape=shape)


def zeros(shape: Shape, dtype: str, like: Var) -> Var:
    """A zero value of the given type, emitted into `like`'s trace."""
    return broadcast_to(like.builder.const(np.zeros((), dtype)), shape)


def shift(axes: tuple[int, ...], nb: int) -> tuple[int, ...]:
    return tuple(a + nb for a in axes)


def batch_dims(g: Var, nb: int) -> Shape:
    return tuple(g.shape[:nb])


def unbroadcast(g: Var, shape: Shape, nb: int) -> Var:
    """Sum `g` (shape batch + broadcast) down to batch + `shape`: the adjoint of broadcasting."""
    lead = g.ndim - nb - len(shape)
    axes = [nb + i for i in range(lead)]
    axes += [nb + lead + i for i, d in enumerate(shape) if d == 1 and g.shape[nb + lead + i] != 1]
    if axes:
        g = bind("reduce_sum", g, axes=tuple(axes), keepdims=False)
        g = reshape(g, g.shape[:nb] + shape)
    return g


def linear_jvp(op: str) -> Callable[..., Var]:
    """The JVP of an op linear in its operands: the op itself applied to the tangents."""
    def rule(ts: Sequence[Var], *xs: Var, out: Var, **attrs: Any) -> Var:
        return bind(op, *ts, **attrs)

    return rule
