"""VJP and JVP rules: one entry per primitive, each emitting IR through the tracing builder.

Because rules emit primitives (not numpy closures), a gradient is itself a graph that can be
cached, optimised and differentiated again. Cotangents may carry `nb` leading batch axes
(stacked seeds, for Jacobians and Hessians in one pass), so axis attributes shift by `nb`.

VJP rule: `rule(g, *xs, out, need, nb, **attrs) -> [cotangent or None per operand]`.
JVP rule: `rule(ts, *xs, out, **attrs) -> tangent or None`; `ts[i]` is None for a zero tangent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradserve import numpy_api as gnp
from gradserve.numpy_api import bind
from gradserve_engine.primitives import PRIMITIVES

VJP: dict[str, Callable[..., list[Any]]] = {}
JVP: dict[str, Callable[..., Any]] = {}


def zeros(shape: tuple[int, ...], dtype: str, like: Any) -> Any:
    """A zero value of the given type, emitted into `like`'s trace."""
    z = like.builder.const(np.zeros((), dtype))
    return gnp.broadcast_to(z, shape)


def unbroadcast(g: Any, shape: tuple[int, ...], nb: int) -> Any:
    """Sum `g` (shape batch + broadcast) down to batch + `shape`: the adjoint of broadcasting."""
    lead = g.ndim - nb - len(shape)
    axes = [nb + i for i in range(lead)]
    axes += [nb + lead + i for i, d in enumerate(shape) if d == 1 and g.shape[nb + lead + i] != 1]
    if axes:
        g = bind("reduce_sum", g, axes=tuple(axes), keepdims=False)
        g = gnp.reshape(g, g.shape[:nb] + shape)
    return g


def _shift(axes: tuple[int, ...], nb: int) -> tuple[int, ...]:
    return tuple(a + nb for a in axes)


def _expand_reduced(g: Any, axes: tuple[int, ...], keepdims: bool, nb: int) -> Any:
    return g if keepdims else bind("expand_dims", g, axes=_shift(axes, nb))


def _swap(a: Any) -> Any:
    perm = list(range(a.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return bind("transpose", a, perm=tuple(perm))


# ---------------------------------------------------------------- elementwise unary
# d/dx as a function of (x, out); the VJP multiplies the cotangent, the JVP the tangent.

_DERIV: dict[str, Callable[[Any, Any], Any]] = {
    "neg": lambda x, out: -1.0,
    "exp": lambda x, out: out,
    "log": lambda x, out: 1.0 / x,
    "log1p": lambda x, out: 1.0 / (1.0 + x),
    "expm1": lambda x, out: out + 1.0,
    "sin": lambda x, out: gnp.cos(x),
    "cos": lambda x, out: -gnp.sin(x),
    "tan": lambda x, out: 1.0 + out * out,
    "tanh": lambda x, out: 1.0 - out * out,
    "logistic": lambda x, out: out * (1.0 - out),
    "sqrt": lambda x, out: 0.5 / out,
    "abs": lambda x, out: gnp.sign(x),
}

for _op, _d in _DERIV.items():
    if _op == "neg":
        VJP[_op] = lambda g, x, *, out, need, nb: [-g]
        JVP[_op] = lambda ts, x, *, out: -ts[0]
    else:
        VJP[_op] = lambda g, x, *, out, need, nb, _d=_d: [g * _d(x, out)]
        JVP[_op] = lambda ts, x, *, out, _d=_d: ts[0] * _d(x, out)

VJP["cast"] = lambda g, x, *, out, need, nb, dtype: [gnp.astype(g, x.dtype)]
JVP["cast"] = lambda ts, x, *, out, dtype: gnp.astype(ts[0], dtype)


# ---------------------------------------------------------------- broadcasting binary


def _vjp_binary(partials: Callable[..., tuple[Any, Any]]) -> Callable[..., list[Any]]:
    def rule(g, x, y, *, out, need, nb):
        px, py = partials(g, x, y, out, need)
        return [unbroadcast(px, x.shape, nb) if need[0] else None,
                unbroadcast(py, y.shape, nb) if need[1] else None]

    return rule


def _jvp_binary(partials: Callable[..., tuple[Any, Any]]) -> Callable[..., Any]:
    def rule(ts, x, y, *, out):
        tx, ty = ts
        need = (tx is not None, ty is not None)
        # with the tangent as the "cotangent", the partials are the tangent's images
        terms = []
        if tx is not None:
            terms.append(partials(tx, x, y, out, need)[0])
        if ty is not None:
            terms.append(partials(ty, x, y, out, need)[1])
        t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return gnp.broadcast_to(t, out.shape)

    return rule


def _pow(g, x, y, out, need):
    gx = gy = None
    if need[0]:
        gx = g * gnp.where(y == 0.0, 0.0, y * x ** (y - 1.0))
    if need[1]:
        gy = g * gnp.where(x == 0.0, 0.0, out * gnp.log(gnp.where(x == 0.0, 1.0, x)))
    return gx, gy


def _extremum_weight(cmp: str) -> Callable[..., tuple[Any, Any]]:
    def partials(g, x, y, out, need):
        # ties split the cotangent evenly, like PyTorch's maximum/minimum
        w = gnp.astype(bind(cmp, x, y), x.dtype) + 0.5 * gnp.astype(x == y, x.dtype)
        return g * w, g * (1.0 - w)

    return partials


def _atan2(g, x, y, out, need):
    r = x * x + y * y
    return g * (y / r), g * (-x / r)


_BINARY_PARTIALS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "add": lambda g, x, y, out, need: (g, g),
    "sub": lambda g, x, y, out, need: (g, -g if need[1] else None),
    "mul": lambda g, x, y, out, need: (g * y if need[0] else None, g * x if need[1] else None),
    "div": lambda g, x, y, out, need: (g / y if need[0] else None, -(g * out) / y if need[1] else None),
    "pow": _pow,
    "maximum": _extremum_weight("gt"),
    "minimum": _extremum_weight("lt"),
    "atan2": _atan2,
}
for _op, _p in _BINARY_PARTIALS.items():
    VJP[_op] = _vjp_binary(_p)
    JVP[_op] = _jvp_binary(_p)


def _vjp_select(g, c, x, y, *, out, need, nb):
    zero = 0.0 if g.dtype in ("float32", "float64") else 0
    return [None,
            unbroadcast(gnp.where(c, g, zero), x.shape, nb) if need[1] else None,
            unbroadcast(gnp.where(c, zero, g), y.shape, nb) if need[2] else None]


def _jvp_select(ts, c, x, y, *, out):
    tx = ts[1] if ts[1] is not None else 0.0
    ty = ts[2] if ts[2] is not None else 0.0
    return gnp.broadcast_to(gnp.where(c, tx, ty), out.shape)


VJP["select"], JVP["select"] = _vjp_select, _jvp_select


# ---------------------------------------------------------------- reductions


def _vjp_reduce_sum(g, x, *, out, need, nb, axes, keepdims):
    return [gnp.broadcast_to(_expand_reduced(g, axes, keepdims, nb), g.shape[:nb] + x.shape)]


def _extremum_mask(x, out, axes, keepdims):
    m = out if keepdims else bind("expand_dims", out, axes=axes)
    mask = gnp.astype(x == m, x.dtype)
    return mask, bind("reduce_sum", mask, axes=axes, keepdims=True)


def _vjp_reduce_extremum(g, x, *, out, need, nb, axes, keepdims):
    # the cotangent is shared evenly among the positions that attain the extremum (as torch.amax)
    mask, count = _extremum_mask(x, out, axes, keepdims)
    return [_expand_reduced(g, axes, keepdims, nb) * (mask / count)]


def _jvp_reduce_extremum(ts, x, *, out, axes, keepdims):
    mask, count = _extremum_mask(x, out, axes, keepdims)
    return bind("reduce_sum", ts[0] * (mask / count), axes=axes, keepdims=keepdims)


VJP["reduce_sum"] = _vjp_reduce_sum
VJP["reduce_max"] = VJP["reduce_min"] = _vjp_reduce_extremum
JVP["reduce_max"] = JVP["reduce_min"] = _jvp_reduce_extremum
VJP["cumsum"] = lambda g, x, *, out, need, nb, axis, reverse: [bind("cumsum", g, axis=axis + nb, reverse=not reverse)]


# ---------------------------------------------------------------- linear algebra


def _vjp_matmul(g, a, b, *, out, need, nb):
    return [unbroadcast(bind("matmul", g, _swap(b)), a.shape, nb) if need[0] else None,
            unbroadcast(bind("matmul", _swap(a), g), b.shape, nb) if need[1] else None]


def _jvp_matmul(ts, a, b, *, out):
    terms = []
    if ts[0] is not None:
        terms.append(bind("matmul", ts[0], b))
    if ts[1] is not None:
        terms.append(bind("matmul", a, ts[1]))
    t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return gnp.broadcast_to(t, out.shape)


VJP["matmul"], JVP["matmul"] = _vjp_matmul, _jvp_matmul


# ---------------------------------------------------------------- shape ops


def _batch(g: Any, nb: int) -> tuple[int, ...]:
    return tuple(g.shape[:nb])


VJP["reshape"] = lambda g, x, *, out, need, nb, shape: [gnp.reshape(g, _batch(g, nb) + x.shape)]
VJP["transpose"] = lambda g, x, *, out, need, nb, perm: [
    bind("transpose", g, perm=tuple(range(nb)) + _shift(tuple(int(i) for i in np.argsort(perm)), nb))]
VJP["broadcast_to"] = lambda g, x, *, out, need, nb, shape: [unbroadcast(g, x.shape, nb)]
VJP["expand_dims"] = lambda g, x, *, out, need, nb, axes: [bind("squeeze", g, axes=_shift(axes, nb))]
VJP["squeeze"] = lambda g, x, *, out, need, nb, axes: [bind("expand_dims", g, axes=_shift(axes, nb))]


def _vjp_slice(g, x, *, out, need, nb, starts, stops, steps):
    hi = tuple(d - a - (m - 1) * s - 1 if m else d - a for d, a, s, m in zip(x.shape, starts, steps, out.shape, strict=True))
    return [bind("pad", g, lo=(0,) * nb + tuple(starts), hi=(0,) * nb + hi,
                 interior=(0,) * nb + tuple(s - 1 for s in steps), value=0.0)]


def _vjp_pad(g, x, *, out, need, nb, lo, hi, interior, value):
    stops = tuple(l + (d - 1) * (i + 1) + 1 if d else l for d, l, i in zip(x.shape, lo, interior, strict=True))
    return [bind("slice", g, starts=(0,) * nb + tuple(lo), stops=_batch(g, nb) + stops,
                 steps=(1,) * nb + tuple(i + 1 for i in interior))]


def _vjp_concatenate(g, *xs, out, need, nb, axis):
    cts, start = [], 0
    for x, n in zip(xs, need, strict=True):
        stop = start + x.shape[axis]
        if n:
            starts = tuple(start if i == axis + nb else 0 for i in range(g.ndim))
            stops = tuple(stop if i == axis + nb else d for i, d in enumerate(g.shape))
            cts.append(bind("slice", g, starts=starts, stops=stops, steps=(1,) * g.ndim))
        else:
            cts.append(None)
        start = stop
    return cts


def _jvp_concatenate(ts, *xs, out, axis):
    parts = [t if t is not None else zeros(x.shape, x.dtype, x) for t, x in zip(ts, xs, strict=True)]
    return bind("concatenate", *parts, axis=axis)


VJP["slice"], VJP["pad"] = _vjp_slice, _vjp_pad
VJP["concatenate"], JVP["concatenate"] = _vjp_concatenate, _jvp_concatenate


def _vjp_take(g, x, idx, *, out, need, nb, axis):
    return [bind("scatter_add", zeros(_batch(g, nb) + x.shape, x.dtype, x), idx, g, axis=axis + nb), None]


def _vjp_scatter_add(g, x, idx, upd, *, out, need, nb, axis):
    return [g if need[0] else None, None, bind("take", g, idx, axis=axis + nb) if need[2] else None]


def _jvp_scatter_add(ts, x, idx, upd, *, out, axis):
    tx = ts[0] if ts[0] is not None else zeros(x.shape, x.dtype, x)
    tu = ts[2] if ts[2] is not None else zeros(upd.shape, upd.dtype, upd)
    return bind("scatter_add", tx, idx, tu, axis=axis)


VJP["take"], VJP["scatter_add"], JVP["scatter_add"] = _vjp_take, _vjp_scatter_add, _jvp_scatter_add
JVP["take"] = lambda ts, x, idx, *, out, axis: bind("take", ts[0], idx, axis=axis)


# ---------------------------------------------------------------- linear ops: the JVP is the op itself


def _jvp_linear(op: str) -> Callable[..., Any]:
    def rule(ts, *xs, out, **attrs):
        if op == "pad":
            attrs = {**attrs, "value": 0.0}
        return bind(op, *ts, **attrs)

    return rule


for _op in ("reduce_sum", "cumsum", "reshape", "transpose", "broadcast_to", "expand_dims", "squeeze", "slice", "pad"):
    JVP[_op] = _jvp_linear(_op)

# non-differentiable ops pass no cotangent and have zero tangent
NON_DIFFERENTIABLE = frozenset(name for name, p in PRIMITIVES.items() if not p.differentiable)
