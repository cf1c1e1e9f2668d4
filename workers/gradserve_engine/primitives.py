"""The primitive ops of the IR: name, arity, attribute schema and shape/dtype rule.

One table keyed by op name (DESIGN §2). Kernels live in `gradserve_engine.kernels`,
VJP/JVP rules in `gradserve_engine.rules`; a test checks every op here has both.
Shape rules take operand types `(dtype, shape)` and the attributes, and return the
result type or raise `ShapeError` with a message that says what disagrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ShapeError

Shape = tuple[int, ...]
AVal = tuple[str, Shape]  # (dtype name, shape)

DTYPES = ("bool", "int32", "int64", "float32", "float64")
NP_DTYPES = {name: np.dtype(name) for name in DTYPES}
_NAMES = {dt: name for name, dt in NP_DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str:
    """The IR name of a numpy dtype ("float64", ...), or numpy's own name when unsupported
    (`np.dtype.name` itself is slow: this is on every call's path)."""
    name = _NAMES.get(dtype)
    return name if name is not None else dtype.name
FLOATS = ("float32", "float64")
INTS = ("int32", "int64")
NUMERIC = INTS + FLOATS

# attribute kinds: how each attribute is typed on the wire and checked on arrival
ATTR_KINDS = ("int", "float", "bool", "dtype", "ints")


@dataclass(frozen=True)
class Primitive:
    name: str
    arity: int | None  # None: variadic, at least one operand
    attrs: dict[str, str]  # attribute name -> kind
    rule: Callable[..., AVal]
    linear: bool = False  # linear in its (float) operands: JVP is the op itself
    differentiable: bool = True


PRIMITIVES: dict[str, Primitive] = {}


def _def(name: str, arity: int | None, attrs: dict[str, str] | None = None, **kw) -> Callable:
    def register(rule: Callable[..., AVal]) -> Callable[..., AVal]:
        PRIMITIVES[name] = Primitive(name, arity, attrs or {}, rule, **kw)
        return rule

    return register


def _need(dtype: str, allowed: tuple[str, ...], what: str) -> None:
    if dtype not in allowed:
        raise ShapeError(f"{what} must have dtype in {list(allowed)}, got {dtype}")


def broadcast_shapes(*shapes: Shape) -> Shape:
    """numpy broadcasting of shapes, or ShapeError naming them."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        dims = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0} - {1}
        if len(dims) > 1:
            raise ShapeError("shapes " + " and ".join(str(tuple(s)) for s in shapes) + " do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _axes(axes: tuple[int, ...], ndim: int, what: str = "axes") -> tuple[int, ...]:
    for a in axes:
        if not 0 <= a < ndim:
            raise ShapeError(f"{what} {tuple(axes)} out of range for rank {ndim} (normalise to 0..{ndim - 1})")
    if len(set(axes)) != len(axes):
        raise ShapeError(f"repeated axis in {tuple(axes)}")
    return axes


# ---------------------------------------------------------------- elementwise unary

for _name in ("exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "logistic", "sqrt"):
    _def(_name, 1)(lambda x, _n=_name: (_need(x[0], FLOATS, f"{_n} operand"), x)[1])
for _name in ("floor", "ceil"):
    _def(_name, 1, differentiable=False)(lambda x, _n=_name: (_need(x[0], FLOATS, f"{_n} operand"), x)[1])
_def("abs", 1)(lambda x: (_need(x[0], NUMERIC, "abs operand"), x)[1])
_def("sign", 1, differentiable=False)(lambda x: (_need(x[0], NUMERIC, "sign operand"), x)[1])
_def("neg", 1, linear=True)(lambda x: (_need(x[0], NUMERIC, "neg operand"), x)[1])
_def("stop_gradient", 1, differentiable=False)(lambda x: x)


@_def("cast", 1, {"dtype": "dtype"}, linear=True)
def _cast(x: AVal, *, dtype: str) -> AVal:
    return (dtype, x[1])


# ---------------------------------------------------------------- broadcasting binary


def _binary(x: AVal, y: AVal, allowed: tuple[str, ...], name: str) -> Shape:
    if x[0] != y[0]:
        raise ShapeError(f"{name} operands have different dtypes {x[0]} and {y[0]} (insert a cast)")
    _need(x[0], allowed, f"{name} operands")
    return broadcast_shapes(x[1], y[1])


for _name, _allowed in (("add", NUMERIC), ("sub", NUMERIC), ("mul", NUMERIC), ("div", FLOATS),
                        ("pow", FLOATS), ("maximum", NUMERIC), ("minimum", NUMERIC), ("atan2", FLOATS)):
    _def(_name, 2, linear=_name in ("add", "sub"))(
        lambda x, y, _n=_name, _a=_allowed: (x[0], _binary(x, y, _a, _n)))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    _def(_name, 2, differentiable=False)(lambda x, y, _n=_name: ("bool", _binary(x, y, DTYPES, _n)))


@_def("select", 3)
def _select(c: AVal, x: AVal, y: AVal) -> AVal:
    _need(c[0], ("bool",), "select condition")
    if x[0] != y[0]:
        raise ShapeError(f"select branches have different dtypes {x[0]} and {y[0]}")
    return (x[0], broadcast_shapes(c[1], x[1], y[1]))


# ---------------------------------------------------------------- reductions


def _reduced(shape: Shape, axes: tuple[int, ...], keepdims: bool) -> Shape:
    _axes(axes, len(shape))
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


@_def("reduce_sum", 1, {"axes": "ints", "keepdims": "bool"}, linear=True)
def _reduce_sum(x: AVal, *, axes: tuple[int, ...], keepdims: bool) -> AVal:
    _need(x[0], NUMERIC, "reduce_sum operand")
    return (x[0], _reduced(x[1], axes, keepdims))


for _name in ("reduce_max", "reduce_min"):
    @_def(_name, 1, {"axes": "ints", "keepdims": "bool"})
    def _reduce_extremum(x: AVal, *, axes: tuple[int, ...], keepdims: bool, _n: str = _name) -> AVal:
        _need(x[0], NUMERIC, f"{_n} operand")
        if any(x[1][a] == 0 for a in _axes(axes, len(x[1]))):
            raise ShapeError(f"{_n} over an empty axis has no identity")
        return (x[0], _reduced(x[1], axes, keepdims))


@_def("cumsum", 1, {"axis": "int", "reverse": "bool"}, linear=True)
def _cumsum(x: AVal, *, axis: int, reverse: bool) -> AVal:
    _need(x[0], NUMERIC, "cumsum operand")
    _axes((axis,), len(x[1]), "axis")
    return x


# ---------------------------------------------------------------- linear algebra


@_def("matmul", 2)
def _matmul(a: AVal, b: AVal) -> AVal:
    if a[0] != b[0]:
        raise ShapeError(f"matmul operands have different dtypes {a[0]} and {b[0]}")
    _need(a[0], NUMERIC, "matmul operands")
    if len(a[1]) < 2 or len(b[1]) < 2:
        raise ShapeError(f"matmul primitive needs rank >= 2 operands, got {a[1]} and {b[1]}")
    if a[1][-1] != b[1][-2]:
        raise ShapeError(f"matmul contracting dimensions differ: {a[1]} @ {b[1]}")
    return (a[0], (*broadcast_shapes(a[1][:-2], b[1][:-2]), a[1][-2], b[1][-1]))


# ---------------------------------------------------------------- shape ops


@_def("reshape", 1, {"shape": "ints"}, linear=True)
def _reshape(x: AVal, *, shape: Shape) -> AVal:
    if any(d < 0 for d in shape) or math.prod(shape) != math.prod(x[1]):
        raise ShapeError(f"cannot reshape {x[1]} to {tuple(shape)}")
    return (x[0], tuple(shape))


@_def("transpose", 1, {"perm": "ints"}, linear=True)
def _transpose(x: AVal, *, perm: tuple[int, ...]) -> AVal:
    if sorted(perm) != list(range(len(x[1]))):
        raise ShapeError(f"perm {tuple(perm)} is not a permutation of the {len(x[1])} axes of {x[1]}")
    return (x[0], tuple(x[1][p] for p in perm))


@_def("broadcast_to", 1, {"shape": "ints"}, linear=True)
def _broadcast_to(x: AVal, *, shape: Shape) -> AVal:
    shape = tuple(shape)
    if len(shape) < len(x[1]) or any(d < 0 for d in shape):
        raise ShapeError(f"cannot broadcast {x[1]} to {shape}")
    for s, d in zip(x[1], shape[len(shape) - len(x[1]):], strict=True):
        if s not in (1, d):
            raise ShapeError(f"cannot broadcast {x[1]} to {shape}")
    return (x[0], shape)


@_def("expand_dims", 1, {"axes": "ints"}, linear=True)
def _expand_dims(x: AVal, *, axes: tuple[int, ...]) -> AVal:
    ndim = len(x[1]) + len(axes)
    _axes(axes, ndim)
    dims = iter(x[1])
    return (x[0], tuple(1 if i in axes else next(dims) for i in range(ndim)))


@_def("squeeze", 1, {"axes": "ints"}, linear=True)
def _squeeze(x: AVal, *, axes: tuple[int, ...]) -> AVal:
    _axes(axes, len(x[1]))
    if any(x[1][a] != 1 for a in axes):
        raise ShapeError(f"squeeze axes {tuple(axes)} of {x[1]} are not all of size 1")
    return (x[0], tuple(d for i, d in enumerate(x[1]) if i not in axes))


def _per_axis(x: AVal, name: str, **lists: tuple[int, ...]) -> None:
    for key, val in lists.items():
        if len(val) != len(x[1]):
            raise ShapeError(f"{name} {key} has {len(val)} entries for rank-{len(x[1])} operand {x[1]}")


@_def("slice", 1, {"starts": "ints", "stops": "ints", "steps": "ints"}, linear=True)
def _slice(x: AVal, *, starts: Shape, stops: Shape, steps: Shape) -> AVal:
    _per_axis(x, "slice", starts=starts, stops=stops, steps=steps)
    out = []
    for d, a, b, s in zip(x[1], starts, stops, steps, strict=True):
        if not (0 <= a <= b <= d and s >= 1):
            raise ShapeError(f"slice start={a} stop={b} step={s} invalid for dimension {d} (need 0<=start<=stop<=dim, step>=1)")
        out.append(-(-(b - a) // s))
    return (x[0], tuple(out))


@_def("pad", 1, {"lo": "ints", "hi": "ints", "interior": "ints", "value": "float"}, linear=True)
def _pad(x: AVal, *, lo: Shape, hi: Shape, interior: Shape, value: float) -> AVal:
    _per_axis(x, "pad", lo=lo, hi=hi, interior=interior)
    if any(v < 0 for v in (*lo, *hi, *interior)):
        raise ShapeError(f"pad widths must be non-negative, got lo={tuple(lo)} hi={tuple(hi)} interior={tuple(interior)}")
    return (x[0], tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x[1], lo, hi, interior, strict=True)))


@_def("concatenate", None, {"axis": "int"}, linear=True)
def _concatenate(*xs: AVal, axis: int) -> AVal:
    first = xs[0]
    _axes((axis,), len(first[1]), "axis")
    for x in xs[1:]:
        if x[0] != first[0]:
            raise ShapeError(f"concatenate operands have different dtypes {first[0]} and {x[0]}")
        if len(x[1]) != len(first[1]) or any(a != b for i, (a, b) in enumerate(zip(x[1], first[1], strict=True)) if i != axis):
            raise ShapeError(f"concatenate operands {first[1]} and {x[1]} differ off axis {axis}")
    return (first[0], tuple(sum(x[1][axis] for x in xs) if i == axis else d for i, d in enumerate(first[1])))


def _gathered(x: AVal, idx: AVal, axis: int, name: str) -> Shape:
    _need(idx[0], INTS, f"{name} indices")
    _axes((axis,), len(x[1]), "axis")
    if x[1][axis] == 0 and math.prod(idx[1]) > 0:
        raise ShapeError(f"{name} from an empty axis {axis} of {x[1]}")
    return (*x[1][:axis], *idx[1], *x[1][axis + 1:])


@_def("take", 2, {"axis": "int"})
def _take(x: AVal, idx: AVal, *, axis: int) -> AVal:
    return (x[0], _gathered(x, idx, axis, "take"))


@_def("scatter_add", 3, {"axis": "int"})
def _scatter_add(x: AVal, idx: AVal, upd: AVal, *, axis: int) -> AVal:
    want = _gathered(x, idx, axis, "scatter_add")
    if upd != (x[0], want):
        raise ShapeError(f"scatter_add updates must be {x[0]}{list(want)}, got {upd[0]}{list(upd[1])}")
    return x


def infer(op: str, operands: list[AVal], attrs: dict) -> AVal:
    """The result type of `op` applied to `operands`; raises ShapeError/GraphError."""
    prim = PRIMITIVES[op]
    return prim.rule(*operands, **attrs)
