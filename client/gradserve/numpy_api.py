"""numpy semantics over primitives: promotion, broadcasting, indexing, the public `gs.*` functions.

Every function here works on three kinds of operand: traced values (`Var`, recorded into the
trace's builder), imperative `gs.Tensor`s (computed now, recorded on the tape), and plain
arrays (computed with the numpy kernels). `bind` is the one place that tells them apart.
Traced values also answer numpy's own protocols, so `np.sin(x)`, `np.sum(x, axis=0)` and
`x @ w` trace; a numpy function not covered here raises a TypeError naming it.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import math
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

import numpy as np

from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Var, innermost
from gradserve_engine.ops import KERNELS, PRIMITIVES, Primitive
from gradserve_engine.ops.core import DTYPES, FLOATS, INTS, NP_DTYPES, dtype_name

# the imperative Tensor registers itself here: (class, bind function)
_EAGER: list[tuple[type, Callable[..., Any]]] = []
_ORDER = ("bool", "int32", "int64", "float32", "float64")


def bind(op: str, *args: Any, **attrs: Any) -> Any:
    """Apply primitive `op`: into the trace, onto the tape, or directly, by operand kind."""
    b = innermost(args)  # a loop body's own values with values it closes over go to the body (gradserve.control)
    if b is not None:
        return b.bind(op, *(x if isinstance(x, Var) else b.const(np.asarray(x)) for x in args), **attrs)
    for cls, eager in _EAGER:
        if any(isinstance(a, cls) for a in args):
            return eager(op, *args, **attrs)
    return KERNELS[op](*(np.asarray(a) for a in args), **attrs)


def _is_value(x: Any) -> bool:
    return isinstance(x, Var) or any(isinstance(x, cls) for cls, _ in _EAGER)


def dtype_of(x: Any) -> str:
    if isinstance(x, Var):
        return x.ir_dtype
    return dtype_name(np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype))


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else ()


def _weak(x: Any) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def result_type(*xs: Any) -> str:
    """numpy 2 promotion (NEP 50): Python scalars are weak and take the array operand's dtype."""
    strong = [dtype_of(x) for x in xs if not _weak(x)]
    weak = [x for x in xs if _weak(x)]
    if not strong:
        return np.result_type(*[np.asarray(x) for x in xs]).name
    dt = np.result_type(*strong).name
    if dt not in _ORDER:
        raise TypeError(f"dtype {dt} is not supported; use one of {list(_ORDER)}")
    if any(isinstance(x, float) for x in weak) and dt not in FLOATS:
        dt = "float64"
    elif any(isinstance(x, int) and not isinstance(x, bool) for x in weak) and dt == "bool":
        dt = "int64"
    return dt


def astype(x: Any, dtype: Any) -> Any:
    dtype = np.dtype(dtype).name
    if _weak(x) or isinstance(x, np.generic):
        return np.asarray(x, dtype=dtype)
    if dtype_of(x) == dtype:
        return x
    return bind("cast", x, dtype=dtype)


def _promoted(*xs: Any, to: tuple[str, ...] | None = None) -> list[Any]:
    dt = result_type(*xs)
    if to is not None and dt not in to:
        dt = "float64" if dt not in FLOATS else dt
    return [astype(x, dt) for x in xs]


# ---------------------------------------------------------------- elementwise


def _unary(op: str, floats: bool, name: str | None = None) -> Callable[[Any], Any]:
    def f(x: Any) -> Any:
        (x,) = _promoted(x, to=FLOATS) if floats else _promoted(x)
        return bind(op, x)

    f.__name__ = f.__qualname__ = name or op
    f.__doc__ = f"Elementwise {op} (numpy semantics" + ("; integers promote to float64)." if floats else ").")
    return f


def _binary(op: str, floats: bool, name: str | None = None) -> Callable[[Any, Any], Any]:
    def f(x: Any, y: Any) -> Any:
        x, y = _promoted(x, y, to=FLOATS if floats else None)
        return bind(op, x, y)

    f.__name__ = f.__qualname__ = name or op
    f.__doc__ = f"Elementwise {op} with numpy broadcasting and promotion."
    return f


def _elementwise(p: Primitive) -> Callable[..., Any]:
    """numpy's ufunc over primitive `p`: float-only primitives promote integer operands to float64."""
    return (_unary if p.arity == 1 else _binary)(p.name, p.dtypes == FLOATS, p.numpy)


# every elementwise primitive that names the numpy ufunc it implements, by that name
# (np.<name>(traced) dispatches here, and gs.<name> is the same function)
UFUNCS: dict[str, Callable[..., Any]] = {p.numpy: _elementwise(p) for p in PRIMITIVES.values() if p.numpy}

exp, log, log1p, expm1 = UFUNCS["exp"], UFUNCS["log"], UFUNCS["log1p"], UFUNCS["expm1"]
sin, cos, tan, tanh, sqrt = UFUNCS["sin"], UFUNCS["cos"], UFUNCS["tan"], UFUNCS["tanh"], UFUNCS["sqrt"]
floor, ceil, negative, abs, sign = UFUNCS["floor"], UFUNCS["ceil"], UFUNCS["negative"], UFUNCS["absolute"], UFUNCS["sign"]
sigmoid, stop_gradient = _unary("logistic", True, "sigmoid"), _unary("stop_gradient", False)
add, subtract, multiply = UFUNCS["add"], UFUNCS["subtract"], UFUNCS["multiply"]
divide, arctan2 = UFUNCS["divide"], UFUNCS["arctan2"]
maximum, minimum = UFUNCS["maximum"], UFUNCS["minimum"]
less, less_equal, greater, greater_equal = UFUNCS["less"], UFUNCS["less_equal"], UFUNCS["greater"], UFUNCS["greater_equal"]
equal, not_equal = UFUNCS["equal"], UFUNCS["not_equal"]
remainder, floor_divide, rint = UFUNCS["remainder"], UFUNCS["floor_divide"], UFUNCS["rint"]
_float_power = UFUNCS["power"]


def power(x: Any, y: Any) -> Any:
    """numpy's power; integer operands give an integer result, computed in float64 (exact while
    it stays below 2**53)."""
    dt = result_type(x, y)
    if dt in INTS:
        return astype(_float_power(astype(x, "float64"), astype(y, "float64")), dt)
    return _float_power(x, y)


def divmod(x: Any, y: Any) -> tuple[Any, Any]:
    """numpy's divmod: `(x // y, x % y)`."""
    return floor_divide(x, y), remainder(x, y)


def round(a: Any, decimals: int = 0) -> Any:
    """numpy's round: halves to even; with `decimals`, of `a * 10**decimals` scaled back, as numpy
    computes it. The gradient is zero (a step function)."""
    decimals = operator.index(decimals)
    if dtype_of(a) not in FLOATS:
        if decimals >= 0 or dtype_of(a) == "bool":
            return _fresh(a)  # numpy returns a copy
        f = 10 ** -decimals
        return astype(multiply(rint(divide(a, float(f))), float(f)), dtype_of(a))
    if decimals == 0:
        return rint(a)
    if decimals > 0:
        f = 10.0 ** decimals
        return divide(rint(multiply(a, f)), f)
    f = 10.0 ** -decimals
    return multiply(rint(divide(a, f)), f)


def _truth(x: Any) -> Any:
    return astype(x, "bool")


def logical_and(x: Any, y: Any) -> Any:
    return where(_truth(x), _truth(y), False)


def logical_or(x: Any, y: Any) -> Any:
    return where(_truth(x), True, _truth(y))


def logical_xor(x: Any, y: Any) -> Any:
    return not_equal(_truth(x), _truth(y))


def logical_not(x: Any) -> Any:
    return equal(_truth(x), False)


def _boolean(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """numpy's bitwise `name` (`&`, `|`, `^`, `~`) on boolean operands, where it is the logical one."""
    def bitwise(*xs: Any) -> Any:
        if builtins.any(dtype_of(x) != "bool" for x in xs if not isinstance(x, bool)):
            raise TypeError(f"numpy.{name} on traced values takes boolean operands (masks), got dtypes "
                            f"{[dtype_of(x) for x in xs]}; there is no bitwise primitive for integers")
        return f(*xs)

    bitwise.__name__ = bitwise.__qualname__ = name
    return bitwise


bitwise_and, bitwise_or = _boolean("bitwise_and", logical_and), _boolean("bitwise_or", logical_or)
bitwise_xor, invert = _boolean("bitwise_xor", logical_xor), _boolean("invert", logical_not)


def square(x: Any) -> Any:
    return multiply(x, x)


def where(cond: Any, x: Any = None, y: Any = None) -> Any:
    """`x` where `cond`, else `y` (numpy broadcasting). With `cond` alone numpy returns the indices
    where it holds: their number depends on the data, so a traced `cond` raises."""
    if x is None and y is None:
        if isinstance(cond, Var):
            raise data_dependent("where(mask) with one argument (the indices of a mask)")
        return np.nonzero(np.asarray(cond))
    if x is None or y is None:
        raise ValueError("either both or neither of x and y should be given")
    x, y = _promoted(x, y)
    return bind("select", astype(cond, "bool"), x, y)


_select = where  # for the reductions, whose `where=` keyword shadows the function


def relu(x: Any) -> Any:
    return where(greater(x, 0), x, 0)


def cast(x: Any, dtype: Any) -> Any:
    return astype(x, dtype)


def _fresh(x: Any) -> Any:
    """`x` as a new traced value object of the same value: what numpy returns as a copy, so that
    an in-place operator on it (a functional update of its object) leaves `x` as it is."""
    return Traced(x.builder, x.id, x.ir_dtype, x.shape) if isinstance(x, Traced) else x


# ---------------------------------------------------------------- reductions


def _norm_axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(f"axis {a} is out of bounds for array of dimension {ndim}")
        out.append(int(a) % builtins.max(ndim, 1))
    return tuple(sorted(out))


def _mask(where: Any, x: Any) -> Any:
    """numpy's `where=` of a reduction: a boolean mask that broadcasts to `x`'s shape."""
    if dtype_of(where) != "bool":
        raise TypeError(f"where= must be a boolean mask, got dtype {dtype_of(where)}")
    shape = shape_of(x)
    try:
        ok = np.broadcast_shapes(shape_of(where), shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"where= of shape {shape_of(where)} does not broadcast to the reduced array's shape {shape}")
    return where


def _keepdims(keepdims: Any) -> bool:
    if not isinstance(keepdims, (bool, np.bool_, int, np.integer)) or keepdims not in (0, 1):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r} (pass dtype= by keyword)")
    return bool(keepdims)


def sum(x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None, *, where: Any = None,
        initial: Any = None) -> Any:
    """numpy's sum; `where=mask` adds only the elements where the mask holds (a masked sum, whose
    gradient is the mask: the traceable form of `x[mask].sum()`)."""
    if dtype is not None:
        x = astype(x, dtype)
    elif dtype_of(x) in ("bool", "int32"):
        x = astype(x, "int64")  # as numpy: small integers sum in int64
    if where is not None:
        x = _select(_mask(where, x), x, np.zeros((), dtype_of(x)))
    out = bind("reduce_sum", x, axes=_norm_axes(axis, len(shape_of(x))), keepdims=_keepdims(keepdims))
    return out if initial is None else add(out, np.asarray(initial, dtype_of(out)))


def _extremum(op: str) -> Callable[..., Any]:
    ufunc = "maximum" if op == "reduce_max" else "minimum"

    def f(x: Any, axis: Any = None, keepdims: bool = False, *, where: Any = None, initial: Any = None) -> Any:
        """numpy's max (min); `where=mask` considers only the selected elements, and then needs
        `initial` (the value where none is selected), as numpy."""
        if where is not None:
            if initial is None:
                raise ValueError(f"reduction operation '{ufunc}' does not have an identity, so to use a where mask "
                                 "one has to specify 'initial'")
            x = _select(_mask(where, x), x, np.asarray(initial, dtype_of(x)))
        out = bind(op, x, axes=_norm_axes(axis, len(shape_of(x))), keepdims=bool(keepdims))
        return out if initial is None else UFUNCS[ufunc](out, np.asarray(initial, dtype_of(out)))

    return f


max, min = _extremum("reduce_max"), _extremum("reduce_min")


def mean(x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None, *, where: Any = None) -> Any:
    """numpy's mean; `where=mask` averages only the elements where the mask holds (the traceable
    form of `x[mask].mean()`; no element selected gives nan, as numpy)."""
    axes = _norm_axes(axis, len(shape_of(x)))
    if dtype is not None:
        x = astype(x, dtype)
    (x,) = _promoted(x, to=FLOATS)
    if where is None:
        return divide(sum(x, axes, keepdims), float(math.prod(shape_of(x)[a] for a in axes)))
    mask = _mask(where, x)
    n = sum(broadcast_to(astype(mask, dtype_of(x)), shape_of(x)), axes, keepdims)
    return divide(sum(x, axes, keepdims, where=mask), n)


def var(x: Any, axis: Any = None, keepdims: bool = False, ddof: int = 0, *, dtype: Any = None) -> Any:
    axes = _norm_axes(axis, len(shape_of(x)))
    n = math.prod(shape_of(x)[a] for a in axes)
    if dtype is not None:
        x = astype(x, dtype)
    (x,) = _promoted(x, to=FLOATS)
    d = subtract(x, mean(x, axes, keepdims=True))
    return divide(sum(multiply(d, d), axes, keepdims), float(n - ddof))


def cumsum(x: Any, axis: int | None = None, dtype: Any = None, *, reverse: bool = False) -> Any:
    """numpy's cumsum (booleans and int32 sum in int64, as numpy's); `reverse=True` sums from the end."""
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _norm_axes(axis, len(shape_of(x)))
    if dtype is not None:
        x = astype(x, dtype)
    elif dtype_of(x) in ("bool", "int32"):
        x = astype(x, "int64")
    return bind("cumsum", x, axis=axis, reverse=reverse)


def logsumexp(x: Any, axis: Any = -1, keepdims: bool = False) -> Any:
    axes = _norm_axes(axis, len(shape_of(x)))
    (x,) = _promoted(x, to=FLOATS)
    m = stop_gradient(max(x, axes, keepdims=True))
    m = where(equal(abs(m), math.inf), 0.0, m)  # all -inf (or inf) rows: no shift, like scipy
    out = add(log(sum(exp(subtract(x, m)), axes, keepdims=True)), m)
    return out if keepdims else squeeze(out, axes)


def log_softmax(x: Any, axis: int = -1) -> Any:
    return subtract(x, logsumexp(x, axis, keepdims=True))


def softmax(x: Any, axis: int = -1) -> Any:
    return exp(log_softmax(x, axis))


def _two_norm(x: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    """sqrt(sum(x**2)) with a zero gradient at 0, as torch's (the double where keeps the root's
    infinite derivative out)."""
    s = sum(multiply(x, x), axes, keepdims)
    zero = equal(s, 0.0)
    return where(zero, 0.0, sqrt(where(zero, 1.0, s)))


def norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """numpy.linalg.norm: vector norms of every order over one axis; over two, the Frobenius norm
    and the induced 1- and inf-norms (the 2-norm and the nuclear norm need singular values)."""
    (x,) = _promoted(x, to=FLOATS)
    nd = len(shape_of(x))
    if axis is None and ord is None:
        return _two_norm(x, tuple(range(nd)), keepdims)
    if axis is None:
        if nd not in (1, 2):
            raise ValueError("Improper number of dimensions to norm.")
        axes: tuple[int, ...] = tuple(range(nd))
    else:
        given = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        axes = tuple(_norm_axes(a, nd)[0] for a in given)
    if len(axes) == 1:
        return _vector_norm(x, ord, axes, keepdims)
    if len(axes) != 2 or axes[0] == axes[1]:
        raise ValueError("Improper number of dimensions to norm." if len(axes) != 2 else "Duplicate axes given.")
    return _matrix_norm(x, ord, axes, keepdims)


def _vector_norm(x: Any, ord: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    if ord is None or (not isinstance(ord, str) and ord == 2):
        return _two_norm(x, axes, keepdims)
    if isinstance(ord, str):
        raise ValueError(f"Invalid norm order '{ord}' for vectors")
    if ord == math.inf:
        return max(abs(x), axes, keepdims)
    if ord == -math.inf:
        return min(abs(x), axes, keepdims)
    if ord == 0:
        return sum(astype(not_equal(x, 0.0), dtype_of(x)), axes, keepdims)
    if ord == 1:
        return sum(abs(x), axes, keepdims)
    p = float(ord)
    return power(sum(power(abs(x), p), axes, keepdims), 1.0 / p)


def _matrix_norm(x: Any, ord: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    row, col = axes
    if ord is None or ord == "fro":
        return _two_norm(x, tuple(sorted(axes)), keepdims)
    if isinstance(ord, str) or ord in (2, -2):
        raise TypeError(f"numpy.linalg.norm with ord={ord!r} needs singular values, which traced values do not have yet; "
                        "ord=None, 'fro', 1, -1, inf and -inf are supported")
    if ord in (1, -1):
        ext, summed, reduced = (max if ord == 1 else min), row, col - (col > row)
    elif ord in (math.inf, -math.inf):
        ext, summed, reduced = (max if ord > 0 else min), col, row - (row > col)
    else:
        raise ValueError("Invalid norm order for matrices.")
    out = ext(sum(abs(x), summed), reduced)
    if keepdims:
        out = expand_dims(out, tuple(sorted(axes)))
    return out


def mse(pred: Any, target: Any) -> Any:
    d = subtract(pred, target)
    return mean(multiply(d, d))


def cross_entropy(logits: Any, labels: Any, axis: int = -1) -> Any:
    """Mean cross-entropy of `logits` against integer class labels or class probabilities."""
    logp = log_softmax(logits, axis)
    if dtype_of(labels) in ("int32", "int64"):
        n_classes = shape_of(logits)[axis]
        classes = np.arange(n_classes).reshape((n_classes,) + (1,) * (-1 - axis if axis < 0 else 0))
        labels = astype(equal(expand_dims(labels, axis), classes.astype(dtype_of(labels))), dtype_of(logp))
    return negative(mean(sum(multiply(labels, logp), axis)))


# ---------------------------------------------------------------- linear algebra


def matmul(a: Any, b: Any) -> Any:
    """numpy matmul: 1-D operands are promoted to matrices and the added axis removed after."""
    a, b = _promoted(a, b)
    if len(shape_of(a)) == 0 or len(shape_of(b)) == 0:
        raise ValueError("matmul: operands must not be scalars (use *)")
    va, vb = len(shape_of(a)) == 1, len(shape_of(b)) == 1
    if va:
        a = expand_dims(a, 0)
    if vb:
        b = expand_dims(b, 1)
    out = bind("matmul", a, b)
    if va or vb:
        out = squeeze(out, tuple(a for a, keep in ((-2, va), (-1, vb)) if keep))
    return out


def dot(a: Any, b: Any) -> Any:
    if len(shape_of(a)) <= 2 and len(shape_of(b)) <= 2 and shape_of(a) and shape_of(b):
        return matmul(a, b)
    if not shape_of(a) or not shape_of(b):
        return multiply(a, b)
    raise TypeError("dot of operands above rank 2 is not covered; use matmul")


# ---------------------------------------------------------------- shapes


def reshape(x: Any, shape: Any = None, order: str = "C", *, newshape: Any = None) -> Any:
    """numpy's reshape (`newshape` is numpy's name for `shape` before numpy 2.1)."""
    if shape is None:
        if newshape is None:
            raise TypeError("reshape() missing the new shape")
        shape = newshape
    if order == "F":  # numpy's Fortran order is the C order of the transposes
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return transpose(reshape(transpose(x), shape[::-1]))
    if order not in ("C", "A"):
        raise ValueError(f"order must be one of 'C', 'F', 'A' (got {order!r})")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    size = math.prod(shape_of(x))
    if shape.count(-1) > 1:
        raise ValueError("can only specify one unknown dimension")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape array of size {size} into shape {shape}")
        shape = tuple(size // known if d == -1 else d for d in shape)
    if shape == shape_of(x):
        return x
    return bind("reshape", x, shape=shape)


def transpose(x: Any, axes: Sequence[int] | None = None) -> Any:
    nd = len(shape_of(x))
    perm = tuple(reversed(range(nd))) if axes is None else tuple(int(a) % builtins.max(nd, 1) for a in axes)
    if perm == tuple(range(nd)):
        return x
    return bind("transpose", x, perm=perm)


def swapaxes(x: Any, axis1: int, axis2: int) -> Any:
    nd = len(shape_of(x))
    (a,), (b,) = _norm_axes(axis1, nd), _norm_axes(axis2, nd)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


def broadcast_to(x: Any, shape: Sequence[int]) -> Any:
    shape = tuple(int(d) for d in shape)
    return x if shape == shape_of(x) else bind("broadcast_to", x, shape=shape)


def expand_dims(x: Any, axis: int | Sequence[int]) -> Any:
    axes = _norm_axes(axis, len(shape_of(x)) + (1 if isinstance(axis, (int, np.integer)) else len(axis)))
    return bind("expand_dims", x, axes=axes)


def squeeze(x: Any, axis: int | Sequence[int] | None = None) -> Any:
    axes = tuple(i for i, d in enumerate(shape_of(x)) if d == 1) if axis is None else _norm_axes(axis, len(shape_of(x)))
    return bind("squeeze", x, axes=axes) if axes else x


def concatenate(xs: Sequence[Any], axis: int | None = 0, *, dtype: Any = None) -> Any:
    """numpy's concatenate (`axis=None`: of the flattened arrays; `dtype`: cast to it first)."""
    if not len(xs):
        raise ValueError("need at least one array to concatenate")
    if axis is None:
        xs, axis = [reshape(x, (-1,)) for x in xs], 0
    xs = _promoted(*xs) if dtype is None else [astype(x, dtype) for x in xs]
    (axis,) = _norm_axes(axis, len(shape_of(xs[0])))
    return _fresh(xs[0]) if len(xs) == 1 else bind("concatenate", *xs, axis=axis)


def stack(xs: Sequence[Any], axis: int = 0, *, dtype: Any = None) -> Any:
    if not len(xs):
        raise ValueError("need at least one array to stack")
    nd = len(shape_of(xs[0])) + 1
    (axis,) = _norm_axes(axis, nd)
    return concatenate([expand_dims(x, axis) for x in xs], axis, dtype=dtype)


def take(x: Any, indices: Any, axis: int | None = None) -> Any:
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _norm_axes(axis, len(shape_of(x)))
    if not _is_value(indices):
        indices = _checked_index(np.asarray(indices), shape_of(x)[axis], axis)
    return bind("take", x, indices, axis=axis)


_PAD_BY_INDEX = ("edge", "reflect", "symmetric", "wrap")  # modes whose padding repeats elements of the array


def pad(x: Any, pad_width: Any, mode: str = "constant", **kwargs: Any) -> Any:
    """numpy's pad in the modes "constant" (`constant_values` per axis and side, as numpy's),
    "edge", "reflect", "symmetric" and "wrap" (gathers of the array's own elements: the
    gradient flows to them)."""
    nd = len(shape_of(x))
    w = np.asarray(pad_width)
    if w.dtype.kind not in "iu":
        raise TypeError("`pad_width` must be of integral type.")
    w = np.broadcast_to(w.astype(np.int64), (nd, 2))
    if (w < 0).any():
        raise ValueError("index can't contain negative values")
    if mode == "constant":
        _only(kwargs, ("constant_values",), mode)
        values = np.broadcast_to(np.asarray(kwargs.get("constant_values", 0)), (nd, 2))
        if (values == values.flat[0]).all():
            return bind("pad", x, lo=tuple(w[:, 0]), hi=tuple(w[:, 1]), interior=(0,) * nd, value=float(values.flat[0]))
        for a in range(nd):  # axis by axis, so that the corners take the later axis's value, as numpy's
            for side, width in enumerate(w[a]):
                if width:
                    lo = tuple(int(width) if i == a and side == 0 else 0 for i in range(nd))
                    hi = tuple(int(width) if i == a and side == 1 else 0 for i in range(nd))
                    x = bind("pad", x, lo=lo, hi=hi, interior=(0,) * nd, value=float(values[a, side]))
        return x
    if mode in _PAD_BY_INDEX:
        _only(kwargs, ("reflect_type",) if mode in ("reflect", "symmetric") else (), mode)
        if kwargs.get("reflect_type", "even") != "even":
            raise TypeError(f"numpy.pad(mode={mode!r}) with reflect_type={kwargs['reflect_type']!r} is not supported "
                            "on traced values; reflect_type='even' is")
        index_mode: Any = mode
        for a in range(nd):
            if w[a].any():  # numpy's own padding of the positions picks the elements
                x = take(x, np.pad(np.arange(shape_of(x)[a]), tuple(w[a]), mode=index_mode), axis=a)
        return x
    raise TypeError(f"numpy.pad(mode={mode!r}) is not supported on traced values; the modes are "
                    f"{['constant', *_PAD_BY_INDEX]}")


def _only(kwargs: dict[str, Any], allowed: tuple[str, ...], mode: str) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise ValueError(f"unsupported keyword arguments for mode '{mode}': {set(extra)}")


def full_like(a: Any, fill_value: Any, dtype: Any = None, *, shape: Any = None) -> Any:
    """An array of `fill_value` shaped (and typed) like `a`: a constant, whose gradient is zero."""
    shape = shape_of(a) if shape is None else ((shape,) if isinstance(shape, (int, np.integer)) else tuple(shape))
    return broadcast_to(np.full((), fill_value, dtype_of(a) if dtype is None else dtype), shape)


def zeros_like(a: Any, dtype: Any = None, *, shape: Any = None) -> Any:
    return full_like(a, 0, dtype, shape=shape)


def ones_like(a: Any, dtype: Any = None, *, shape: Any = None) -> Any:
    return full_like(a, 1, dtype, shape=shape)


def clip(a: Any, a_min: Any = None, a_max: Any = None, *, min: Any = None, max: Any = None) -> Any:
    """numpy's clip (`min`/`max` are numpy 2's names for the bounds). The gradient goes to `a`
    where a_min <= a <= a_max, both ends included, and to a bound where it is taken (as torch.clamp)."""
    if (min is not None and a_min is not None) or (max is not None and a_max is not None):
        raise TypeError("Passing `min` or `max` keyword argument when `a_min` and `a_max` are provided is forbidden.")
    lo, hi = (a_min if min is None else min), (a_max if max is None else max)
    x, *bounds = _promoted(a, *(b for b in (lo, hi) if b is not None))
    if lo is not None:
        lo = bounds.pop(0)
        x = where(less(x, lo), lo, x)
    if hi is not None:
        x = where(greater(x, bounds[0]), bounds[0], x)
    return _fresh(x)


# ---------------------------------------------------------------- indexing

_VALID_INDICES = ("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis (`None`) and integer or boolean "
                  "arrays are valid indices")


class DataDependentShapeError(GraphError, IndexError):
    """A traced value would take a shape that depends on its data (a boolean mask, nonzero, ...):
    a graph has static shapes, so this cannot be traced."""


def _user_site() -> str:
    """` (at file:line)` of the innermost caller outside gradserve and numpy."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("gradserve", "numpy")):
            return f" (at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    return ""


def data_dependent(what: str) -> DataDependentShapeError:
    return DataDependentShapeError(
        f"{what} of a traced value has a shape that depends on the data{_user_site()}, and a traced "
        "graph has static shapes; keep the shape with gs.where(mask, x, 0), or reduce over the mask "
        "with gs.sum(x, where=mask) or gs.mean(x, where=mask)")


def _checked_index(idx: np.ndarray, dim: int, axis: int) -> np.ndarray:
    if idx.dtype == bool:
        raise IndexError("boolean indices are not valid here; index with x[mask] or use gs.where")
    if idx.dtype.kind not in "iu":
        raise IndexError("arrays used as indices must be of integer (or boolean) type")
    if idx.size and (idx.max() >= dim or idx.min() < -dim):
        bad = int(idx.max() if idx.max() >= dim else idx.min())
        raise IndexError(f"index {bad} is out of bounds for axis {axis} with size {dim}")
    return np.where(idx < 0, idx + dim, idx).astype(np.int64)


def _index_operand(k: Any) -> Any:
    """One entry of an index, as numpy reads it: None, Ellipsis, a slice, an int, a numpy array
    (integer or boolean) or a traced integer value; anything else raises IndexError as numpy does."""
    if k is None or k is Ellipsis:
        return k
    if isinstance(k, slice):
        if builtins.any(isinstance(v, Var) for v in (k.start, k.stop, k.step)):
            raise data_dependent("a slice with traced bounds")
        return k
    if isinstance(k, (bool, np.bool_)):
        return np.asarray(k)  # a 0-d boolean: numpy adds an axis of length 1 (True) or 0 (False)
    if isinstance(k, (int, np.integer)):
        return int(k)
    if isinstance(k, Var):
        if k.ir_dtype == "bool":
            raise data_dependent("a boolean mask" if k.shape else "a 0-d boolean index")
        if k.ir_dtype not in INTS:
            raise IndexError(f"arrays used as indices must be of integer (or boolean) type, got a traced {k.ir_dtype} value")
        return k
    if _is_value(k):  # an imperative tensor: its value is known now
        k = np.asarray(k)
    elif isinstance(k, (list, tuple)):
        a = np.asarray(k)
        k = a.astype(np.intp) if a.size == 0 and a.dtype.kind == "f" else a  # numpy: [] indexes nothing
    if isinstance(k, np.ndarray):
        if k.dtype != bool and k.dtype.kind not in "iu":
            raise IndexError("arrays used as indices must be of integer (or boolean) type")
        return k
    try:
        return operator.index(k)
    except TypeError:
        raise IndexError(_VALID_INDICES) from None


def _consumes(k: Any) -> int:
    """How many axes of the indexed value an index entry consumes."""
    if k is None or k is Ellipsis:
        return 0
    if isinstance(k, np.ndarray) and k.dtype == bool:
        return k.ndim
    return 1


def getitem(x: Any, key: Any) -> Any:
    """numpy indexing: ints, slices (any step), None, Ellipsis, integer arrays and constant boolean
    masks (advanced). A traced boolean mask raises: its result's shape depends on the data."""
    key = [_index_operand(k) for k in (key if isinstance(key, tuple) else (key,))]
    nd = len(shape_of(x))
    n_real = builtins.sum(_consumes(k) for k in key)
    if n_real > nd:
        raise IndexError(f"too many indices for array: array is {nd}-dimensional, but {n_real} were indexed")
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if not builtins.any(k is Ellipsis for k in key):
        key.append(Ellipsis)
    expanded: list[Any] = []
    for k in key:
        expanded.extend([slice(None)] * (nd - n_real) if k is Ellipsis else [k])
    advanced = builtins.any(isinstance(k, (np.ndarray, Var)) for k in expanded)
    y, ax, adv = x, 0, []
    for k in expanded:
        if k is None:
            y = expand_dims(y, ax)
            ax += 1
        elif isinstance(k, slice):
            y = _slice_axis(y, ax, k)
            ax += 1
        elif isinstance(k, int) and not advanced:
            dim = shape_of(y)[ax]
            if not -dim <= k < dim:
                raise IndexError(f"index {k} is out of bounds for axis {ax} with size {dim}")
            k %= dim
            y = squeeze(bind("slice", y, **_slice_attrs(shape_of(y), ax, k, k + 1, 1)), ax)
        elif isinstance(k, np.ndarray) and k.dtype == bool and k.ndim == 0:
            y = expand_dims(y, ax)  # a new axis of length 1, picked once (True) or not at all (False)
            adv.append((ax, np.zeros(int(k), np.int64)))
            ax += 1
        elif isinstance(k, np.ndarray) and k.dtype == bool:
            dims = shape_of(y)[ax:ax + k.ndim]
            for i, (d, m) in enumerate(zip(dims, k.shape, strict=True)):
                if d != m:
                    raise IndexError(f"boolean index did not match indexed array along axis {ax + i}; "
                                     f"size of axis is {d} but size of corresponding boolean axis is {m}")
            adv.extend((ax + i, nz) for i, nz in enumerate(np.nonzero(k)))  # a constant mask: known positions
            ax += k.ndim
        else:
            adv.append((ax, np.asarray(k) if isinstance(k, int) else k))
            ax += 1
    return _advanced(y, adv) if adv else y


def _slice_attrs(shape: tuple[int, ...], axis: int, start: int, stop: int, step: int) -> dict[str, tuple[int, ...]]:
    return {"starts": tuple(start if i == axis else 0 for i in range(len(shape))),
            "stops": tuple(stop if i == axis else d for i, d in enumerate(shape)),
            "steps": tuple(step if i == axis else 1 for i in range(len(shape)))}


def _slice_axis(y: Any, axis: int, s: slice) -> Any:
    dim = shape_of(y)[axis]
    start, stop, step = s.indices(dim)
    if step > 0:
        stop = builtins.max(stop, start)
        if (start, stop, step) == (0, dim, 1):
            return y
        return bind("slice", y, **_slice_attrs(shape_of(y), axis, start, stop, step))
    return bind("take", y, np.arange(start, stop, step, dtype=np.int64), axis=axis)


def _advanced(y: Any, adv: list[tuple[int, Any]]) -> Any:
    """Integer-array indices on axes `adv`: merge those axes and gather with one linear index."""
    axes = [a for a, _ in adv]
    idxs = [k for _, k in adv]
    try:
        bshape = np.broadcast_shapes(*(shape_of(k) for k in idxs))
    except ValueError:
        raise IndexError("shape mismatch: indexing arrays could not be broadcast together with shapes "
                         + " ".join(str(shape_of(k)) for k in idxs)) from None
    if axes != list(range(axes[0], axes[0] + len(axes))):  # separated: numpy puts them first
        rest = [i for i in range(len(shape_of(y))) if i not in axes]
        y, axes, pos = transpose(y, axes + rest), list(range(len(axes))), 0
    else:
        pos = axes[0]
    dims = [shape_of(y)[a] for a in axes]
    shape = shape_of(y)
    y = reshape(y, (*shape[:pos], math.prod(dims), *shape[pos + len(dims):]))
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    # numpy checks a scalar index always, an array's elements only where the broadcast picks them
    empty = math.prod(bshape) == 0
    consts = {i: _checked_index(np.broadcast_to(k, bshape) if empty and np.ndim(k) else np.asarray(k), d, a)
              for i, ((a, k), d) in enumerate(zip(adv, dims, strict=True)) if not _is_value(k)}
    if len(consts) == len(adv):
        flat = np.zeros((), np.int64)
        for i, s in enumerate(strides):
            flat = flat + consts[i] * s
        return bind("take", y, flat, axis=pos)
    # computed indices: wrap negatives as numpy does; an index out of range on any axis makes the
    # linear index point past the merged axis, so the gather raises IndexError instead of picking
    # an element of a neighbouring row
    total = math.prod(dims)
    lin: Any = 0
    for i, (k, d, s) in enumerate(zip(idxs, dims, strides, strict=True)):
        if i in consts:
            k = consts[i]
        else:
            k = astype(k, "int64")
            k = where(less(k, 0), add(k, d), k)
            bad = not_equal(greater_equal(k, 0), less(k, d))
            if empty and not shape_of(k):  # a scalar gathers nothing here, but numpy still checks it
                lin = add(lin, multiply(bind("take", np.arange(d, dtype=np.int64), where(bad, d, k), axis=0), 0))
            k = where(bad, total, k)
        lin = add(lin, multiply(k, s)) if s != 1 else add(lin, k)
    return bind("take", y, lin, axis=pos)


# ---------------------------------------------------------------- numpy protocol tables


def conjugate(x: Any) -> Any:
    """The complex conjugate: of real values, a copy (gradserve's dtypes are real)."""
    return _fresh(x)


UFUNCS.update({"true_divide": divide, "positive": _fresh, "fabs": abs, "matmul": matmul, "square": square})
UFUNCS.update({"power": power, "mod": remainder, "divmod": divmod, "conjugate": conjugate,
               "logical_and": logical_and, "logical_or": logical_or, "logical_xor": logical_xor,
               "logical_not": logical_not, "bitwise_and": bitwise_and, "bitwise_or": bitwise_or,
               "bitwise_xor": bitwise_xor, "invert": invert})

FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    np.sum: sum, np.mean: mean, np.max: max, np.min: min, np.amax: max, np.amin: min, np.var: var,
    np.reshape: reshape, np.transpose: transpose, np.swapaxes: swapaxes, np.broadcast_to: broadcast_to,
    np.expand_dims: expand_dims, np.squeeze: squeeze, np.concatenate: concatenate, np.stack: stack,
    np.where: where, np.take: take, np.cumsum: cumsum, np.dot: dot, np.matmul: matmul, np.clip: clip,
    np.pad: pad, np.zeros_like: zeros_like, np.ones_like: ones_like, np.linalg.norm: norm,
}


def _astype(x: Any, dtype: Any, *, copy: bool = True) -> Any:
    out = astype(x, dtype)
    return _fresh(out) if copy and out is x else out


def _size(a: Any, axis: int | None = None) -> int:
    return math.prod(shape_of(a)) if axis is None else shape_of(a)[_norm_axes(axis, len(shape_of(a)))[0]]


def _result_type(*arrays_and_dtypes: Any) -> np.dtype:
    return np.result_type(*(NP_DTYPES[x.ir_dtype] if isinstance(x, Var) else x for x in arrays_and_dtypes))


# what numpy code asks of any array: its shape, a copy, its real part, numpy's promotion
FUNCTIONS.update({
    np.round: round, np.around: round, np.copy: lambda a: _fresh(a), np.full_like: full_like,
    np.empty_like: zeros_like, np.shape: shape_of, np.ndim: lambda a: len(shape_of(a)), np.size: _size,
    np.real: lambda val: val, np.imag: zeros_like, np.result_type: _result_type,
    np.iscomplexobj: lambda x: False, np.isrealobj: lambda x: True,
})
if hasattr(np, "astype"):  # numpy >= 2.1
    FUNCTIONS[np.astype] = _astype


def _data_dependent_function(name: str) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        raise data_dependent(f"numpy.{name}")

    return f


FUNCTIONS.update({fn: _data_dependent_function(fn.__name__) for fn in (
    np.nonzero, np.argwhere, np.flatnonzero, np.extract, np.compress, np.unique)})

# numpy's "no value given" default (keepdims=<no value>): an argument that is it was not given
_NO_VALUE = inspect.signature(np.sum).parameters["keepdims"].default
# what each argument numpy takes and traced values cannot, is for
_REFUSED = {"out": "a result is a new traced value: use the returned one"}


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    t = type(value)
    return t is type(default) and t in (str, bool, int, float) and value == default


@functools.cache
def _signatures(func: Callable[..., Any], impl: Callable[..., Any]) -> tuple[inspect.Signature, frozenset[str], bool] | None:
    """numpy's signature of `func`, the parameter names `impl` takes by keyword, and whether it
    takes any keyword (**kwargs); None where numpy gives no signature (C functions before numpy 2)."""
    try:
        sig = inspect.signature(func)
    except ValueError:
        return None
    params = inspect.signature(impl).parameters.values()
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return sig, names, builtins.any(p.kind is p.VAR_KEYWORD for p in params)


def numpy_call(func: Callable[..., Any], impl: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """`impl(...)` called as numpy's `func(*args, **kwargs)` is: the arguments are bound against
    numpy's own signature (numpy's names and positions, and numpy's error for a wrong one), then
    the array and numpy's positional-only parameters go by position and every other argument by
    its numpy name. An argument `impl` does not take is refused, by name, unless it is numpy's
    default."""
    signatures = _signatures(func, impl)
    if signatures is None:
        return impl(*args, **kwargs)
    sig, names, any_keyword = signatures
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{_numpy_name(func)}(): {e}") from None
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        p = sig.parameters[name]
        if p.kind is p.VAR_POSITIONAL:
            positional.extend(value)
            continue
        if p.kind is p.POSITIONAL_ONLY or (i == 0 and p.kind is p.POSITIONAL_OR_KEYWORD):
            positional.append(value)
            continue
        given = value.items() if p.kind is p.VAR_KEYWORD else ((name, value),)
        default = p.default if p.kind is not p.VAR_KEYWORD else _NO_VALUE
        for k, v in given:
            if v is _NO_VALUE:
                continue
            if k in names or any_keyword:
                keywords[k] = v
            elif not _is_default(v, default):
                why = _REFUSED.get(k, "gradserve does not implement it")
                raise TypeError(f"{_numpy_name(func)}(): {k}={v!r} is not supported on traced values ({why})")
    return impl(*positional, **keywords)


def _numpy_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__module__", "numpy").replace("numpy.core", "numpy") + "." + func.__name__


# ufunc keywords and the values that change nothing for a traced value
_UFUNC_NEUTRAL = {"where": True, "casting": "same_kind", "order": "K", "subok": True, "signature": None}


def array_ufunc(ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
    name = ufunc.__name__
    if method != "__call__":
        raise TypeError(f"numpy.{name}.{method} is not supported on traced values")
    if name not in UFUNCS:
        raise TypeError(f"numpy.{name} is not supported on traced values (no gradient rule); "
                        f"supported ufuncs: {sorted(UFUNCS)}")
    dtype = kwargs.pop("dtype", None)
    out = kwargs.pop("out", None)
    if out is not None and not (isinstance(out, tuple) and builtins.all(o is None for o in out)):
        raise TypeError(f"numpy.{name}(): out= is not supported on traced values ({_REFUSED['out']})")
    for k, v in kwargs.items():
        if k not in _UFUNC_NEUTRAL or not _is_default(v, _UFUNC_NEUTRAL[k]):
            raise TypeError(f"numpy.{name}(): {k}={v!r} is not supported on traced values")
    if dtype is not None:  # the loop's dtype: the operands cast to it, as numpy's same_kind rule allows
        dt = dtype_name(np.dtype(dtype))
        for i, x in enumerate(inputs):
            if not _weak(x) and not np.can_cast(dtype_of(x), dt, "same_kind"):
                raise TypeError(f"Cannot cast ufunc '{name}' input {i} from dtype('{dtype_of(x)}') to "
                                f"dtype('{dt}') with casting rule 'same_kind'")
        inputs = tuple(astype(x, dt) for x in inputs)
    return UFUNCS[name](*inputs)


def array_function(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    impl = FUNCTIONS.get(func)
    if impl is None:
        raise TypeError(f"{_numpy_name(func)} is not supported on traced values (no gradient rule)")
    return numpy_call(func, impl, args, kwargs)


def _one_or_many(args: tuple) -> Any:
    """`x.reshape(2, 3)` and `x.reshape((2, 3))` alike."""
    return args[0] if len(args) == 1 and not isinstance(args[0], (int, np.integer)) else args


def _binary_method(f: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Any, Any], Any]:
    def method(self: Any, o: Any) -> Any:
        if getattr(type(o), "__array_ufunc__", False) is None:
            return NotImplemented
        return f(o, self) if reflected else f(self, o)

    method.__name__ = f"__r{f.__name__}__" if reflected else f"__{f.__name__}__"
    return method


def _method(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ndarray method that is numpy's `func` of the array, with numpy's arguments."""
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return array_function(func, (self, *args), kwargs)

    method.__name__ = method.__qualname__ = func.__name__
    method.__doc__ = f"numpy's ndarray.{func.__name__}(...): numpy.{func.__name__}(self, ...)."
    return method


def _flat(x: Any, order: str) -> Any:
    if order == "F":
        return reshape(transpose(x), (-1,))
    if order not in ("C", "A", "K"):
        raise ValueError(f"order must be one of 'C', 'F', 'A', or 'K' (got {order!r})")
    return reshape(x, (-1,))


class ArrayMethods:
    """numpy-style operators and methods, shared by traced values and imperative tensors."""

    __slots__ = ()
    __array_priority__ = 1000

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return array_ufunc(ufunc, method, *inputs, **kwargs)

    def __array_function__(self, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
        return array_function(func, args, kwargs)

    # numpy's binary-operator protocol: an operand with __array_ufunc__ = None (pytest.approx, ...)
    # handles the operation itself
    __add__, __radd__ = _binary_method(add), _binary_method(add, reflected=True)
    __sub__, __rsub__ = _binary_method(subtract), _binary_method(subtract, reflected=True)
    __mul__, __rmul__ = _binary_method(multiply), _binary_method(multiply, reflected=True)
    __truediv__, __rtruediv__ = _binary_method(divide), _binary_method(divide, reflected=True)
    __floordiv__, __rfloordiv__ = _binary_method(floor_divide), _binary_method(floor_divide, reflected=True)
    __mod__, __rmod__ = _binary_method(remainder), _binary_method(remainder, reflected=True)
    __divmod__, __rdivmod__ = _binary_method(divmod), _binary_method(divmod, reflected=True)
    __pow__, __rpow__ = _binary_method(power), _binary_method(power, reflected=True)
    __matmul__, __rmatmul__ = _binary_method(matmul), _binary_method(matmul, reflected=True)
    __and__, __rand__ = _binary_method(bitwise_and), _binary_method(bitwise_and, reflected=True)
    __or__, __ror__ = _binary_method(bitwise_or), _binary_method(bitwise_or, reflected=True)
    __xor__, __rxor__ = _binary_method(bitwise_xor), _binary_method(bitwise_xor, reflected=True)
    __lt__, __le__ = _binary_method(less), _binary_method(less_equal)
    __gt__, __ge__ = _binary_method(greater), _binary_method(greater_equal)
    __eq__, __ne__ = _binary_method(equal), _binary_method(not_equal)  # type: ignore[assignment]
    def __neg__(self): return negative(self)
    def __pos__(self): return _fresh(self)
    def __abs__(self): return abs(self)
    def __invert__(self): return invert(self)
    def __round__(self, ndigits=None): return round(self, 0 if ndigits is None else ndigits)
    def __getitem__(self, key): return getitem(self, key)
    __hash__ = object.__hash__

    def __len__(self) -> int:  # `shape` is the concrete class's (a traced value's slot, a tensor's property)
        shape = shape_of(self)
        if not shape:
            raise TypeError("len() of a 0-d value")
        return shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # the attributes of numpy's arrays that follow from shape and dtype
    @property
    def size(self) -> int: return math.prod(shape_of(self))
    @property
    def itemsize(self) -> int: return np.dtype(self.dtype).itemsize  # type: ignore[attr-defined]
    @property
    def nbytes(self) -> int: return self.size * self.itemsize
    @property
    def T(self): return transpose(self)
    @property
    def mT(self):
        if len(shape_of(self)) < 2:
            raise ValueError("matrix transpose with ndim < 2 is undefined")
        return swapaxes(self, -1, -2)
    @property
    def real(self): return self
    @property
    def imag(self): return zeros_like(self)

    # methods that are numpy functions of the array, with numpy's arguments
    sum, mean, var, max, min = _method(np.sum), _method(np.mean), _method(np.var), _method(np.max), _method(np.min)
    cumsum, clip, dot, take, round = _method(np.cumsum), _method(np.clip), _method(np.dot), _method(np.take), _method(np.round)
    squeeze, swapaxes = _method(np.squeeze), _method(np.swapaxes)

    def reshape(self, *shape, order="C", copy=None):
        out = reshape(self, _one_or_many(shape), order)
        return _fresh(out) if copy and out is self else out
    def transpose(self, *axes): return transpose(self, _one_or_many(axes) or None)
    def ravel(self, order="C"): return _flat(self, order)
    def flatten(self, order="C"): return _fresh(_flat(self, order))  # a copy, as numpy's
    def conj(self): return conjugate(self)
    def conjugate(self): return conjugate(self)
    def nonzero(self): raise data_dependent("nonzero()")

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if casting != "unsafe" and not np.can_cast(self.dtype, dtype, casting):  # type: ignore[attr-defined]
            raise TypeError(f"Cannot cast array data from {self.dtype!r} to {np.dtype(dtype)!r} "  # type: ignore[attr-defined]
                            f"according to the rule {casting!r}")
        return _astype(self, dtype, copy=copy)


# ---------------------------------------------------------------- traced values


class ConcretizationTypeError(GraphError, TypeError):
    """A traced value's own number was asked for (`float(x)`, `if x > 0:`, `np.float64(x)`,
    `x.item()`): it is not known while tracing, since a traced function runs once for every value
    of its inputs (JAX's error of the same name)."""


def _concretization(what: str, fix: str) -> ConcretizationTypeError:
    """`what` (the traced value and where: `{at}`) is not known while tracing; `fix` says what to write."""
    return ConcretizationTypeError(f"{what.format(at=_user_site())}: a traced function runs once, for every value of "
                                   f"its inputs. {fix}")


_SCALAR_FIX = ("Keep computing with the array (2.0 * x, not 2.0 * float(x)); a number needed outside is returned "
               "by the function and converted after it.")
_BOOL_FIX = ("Choose between values with np.where(cond, a, b); write a comparison chain `a < x < b` as "
             "(a < x) & (x < b), and `and`, `or`, `not` of masks as &, |, ~.")


def _in_place(f: Callable[[Any, Any], Any], symbol: str) -> Callable[[Traced, Any], Any]:
    """`x <op>= o` as numpy computes it (the result cast back to x's dtype under numpy's same_kind
    rule, broadcast to x's shape and no further), as a functional update: the object `x` names the
    result from now on, so every name bound to it sees it, as every name of a numpy array does."""
    def method(self: Traced, o: Any) -> Any:
        if getattr(type(o), "__array_ufunc__", False) is None:
            return NotImplemented
        r = f(self, o)
        if shape_of(r) != self.shape:
            raise ValueError(f"non-broadcastable output operand with shape {self.shape} doesn't match the broadcast "
                             f"shape {shape_of(r)} (in {symbol})")
        if dtype_of(r) != self.ir_dtype:
            if not np.can_cast(dtype_of(r), self.ir_dtype, "same_kind"):
                raise TypeError(f"Cannot cast ufunc output from dtype('{dtype_of(r)}') to dtype('{self.ir_dtype}') "
                                f"with casting rule 'same_kind' (in {symbol})")
            r = astype(r, self.ir_dtype)
        self.id = r.id
        return self

    method.__name__ = f"__i{f.__name__}__"
    return method


def _has_traced(key: Any) -> bool:
    if isinstance(key, (tuple, list)):
        return builtins.any(_has_traced(k) for k in key)
    if isinstance(key, slice):
        return builtins.any(isinstance(v, Var) for v in (key.start, key.stop, key.step))
    return isinstance(key, Var)


def _assigned(x: Traced, key: Any, value: Any) -> Any:
    """`x` with `x[key] = value` done, functionally: numpy picks the positions (every index numpy
    takes but traced ones), the value broadcasts to them and is cast to x's dtype, and where a
    position repeats the last value wins, as numpy's."""
    if _has_traced(key):
        raise TypeError(f"assignment at traced indices{_user_site()} is not supported; build the value with "
                        "np.where(mask, value, x), or with scatter-style sums of np.take")
    positions = np.arange(x.size).reshape(x.shape)[key]
    v = astype(value, x.ir_dtype)
    vshape = shape_of(v)
    while len(vshape) > positions.ndim and vshape[0] == 1:  # numpy drops leading length-1 axes of the value
        vshape = vshape[1:]
    try:
        fits = np.broadcast_shapes(vshape, positions.shape) == positions.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"could not broadcast input array from shape {shape_of(v)} into shape {positions.shape}")
    flat = positions.ravel()
    if not flat.size:
        return x
    v = reshape(broadcast_to(reshape(v, vshape), positions.shape), (-1,))
    targets, first_from_end = np.unique(flat[::-1], return_index=True)
    last = flat.size - 1 - first_from_end  # the last write of each position
    if not np.array_equal(last, np.arange(flat.size)):
        v = take(v, last)
    kept = np.ones(x.size, bool)
    kept[targets] = False
    base = where(kept, reshape(x, (-1,)), np.zeros((), x.ir_dtype))
    return reshape(bind("scatter_add", base, targets.astype(np.int64), v, axis=0), x.shape)


class Traced(ArrayMethods, Var):
    """A traced value: a `Var` with numpy's operators, methods and protocols."""

    __slots__ = ()

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]  # numpy's dtype for numpy code; the IR's name is ir_dtype
        return NP_DTYPES[self.ir_dtype]

    # ---- its value is not known while tracing
    def _needs_value(self, what: str) -> ConcretizationTypeError:
        return _concretization(f"{what} of a traced value {self!r}{{at}} needs its value, which is not known while "
                               "tracing", _SCALAR_FIX)

    def __bool__(self) -> bool:
        raise _concretization(f"the truth value of a traced value {self!r}{{at}} is not known while tracing (an `if`, "
                              "`while`, `and`, `or`, `not` or a comparison chain asks for it)", _BOOL_FIX)

    def __float__(self) -> float:
        raise self._needs_value("float()")

    def __int__(self) -> int:
        raise self._needs_value("int()")

    def __complex__(self) -> complex:
        raise self._needs_value("complex()")

    def item(self, *args: Any) -> Any:
        raise self._needs_value(".item()")

    def tolist(self) -> Any:
        raise self._needs_value(".tolist()")

    def __index__(self) -> int:
        raise _concretization(f"a traced value {self!r}{{at}} cannot be a Python integer (a list index, a range bound, a "
                              "shape) while tracing", "Index arrays with it instead (x[i], np.take(a, i)); shapes are "
                              "fixed when tracing.")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise _concretization(f"a traced value {self!r}{{at}} cannot become a numpy array or scalar (np.float64(x), "
                              "storing it into a numpy array, a C extension) while tracing", "Inside the traced function "
                              "np.asarray(x) and np.array([...]) of traced values stay traced, as array operations do; "
                              "a number needed outside is returned by the function.")

    # ---- copies and functional updates
    def copy(self, order: str = "C") -> Traced:
        """A copy: a new object for the same value, which in-place operators update on their own."""
        return _fresh(self)

    def __copy__(self) -> Traced:
        return _fresh(self)

    def __deepcopy__(self, memo: Any) -> Traced:
        return _fresh(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.id = _assigned(self, key, value).id

    def fill(self, value: Any) -> None:
        self[...] = value

    __iadd__, __isub__ = _in_place(add, "+="), _in_place(subtract, "-=")
    __imul__, __itruediv__ = _in_place(multiply, "*="), _in_place(divide, "/=")
    __ifloordiv__, __imod__ = _in_place(floor_divide, "//="), _in_place(remainder, "%=")
    __ipow__, __imatmul__ = _in_place(power, "**="), _in_place(matmul, "@=")
    __iand__, __ior__, __ixor__ = _in_place(bitwise_and, "&="), _in_place(bitwise_or, "|="), _in_place(bitwise_xor, "^=")


# ---------------------------------------------------------------- numpy's constructors while tracing

_CONSTRUCTORS = ("array", "asarray", "asanyarray", "ascontiguousarray")
_hooks_lock = threading.Lock()
_hooks_depth = 0
_originals: dict[str, Callable[..., Any]] = {}


@contextlib.contextmanager
def traced_constructors() -> Iterator[None]:
    """While a function is traced, `np.array`, `np.asarray`, `np.asanyarray` and
    `np.ascontiguousarray` of traced values (alone or in nested lists) give traced values, as
    jax.numpy's do. numpy has no protocol for its constructors, so these names of the numpy
    module are wrapped for the duration (of every trace in the process, counted): the original
    runs first, and only a traced value's refusal to become a numpy array (`__array__`) diverts
    the call, so nothing else sees a difference. A name bound before (`from numpy import asarray`)
    is numpy's own."""
    global _hooks_depth
    with _hooks_lock:
        if _hooks_depth == 0:
            for name in _CONSTRUCTORS:
                _originals[name] = original = getattr(np, name)
                setattr(np, name, _constructor(name, original))
        _hooks_depth += 1
    try:
        yield
    finally:
        with _hooks_lock:
            _hooks_depth -= 1
            if _hooks_depth == 0:
                for name in _CONSTRUCTORS:
                    if getattr(getattr(np, name), "__wrapped__", None) is _originals[name]:
                        setattr(np, name, _originals[name])


def _constructor(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def construct(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except ConcretizationTypeError:
            if not args:
                raise
            return _traced_array(name, original, *args, **kwargs)

    return construct


def _traced_array(name: str, original: Callable[..., Any], obj: Any, dtype: Any = None, *args: Any, ndmin: int = 0,
                  copy: Any = _NO_VALUE, **kwargs: Any) -> Any:
    """`np.<name>(obj, dtype, ...)` of an object holding traced values: numpy's dtype and shape
    (numpy decides them from stand-ins of the traced values' types), built by stacking."""
    if isinstance(obj, Var):
        v = obj
    else:
        ref = original(_stand_in(obj), dtype)  # numpy's dtype discovery, and numpy's errors for ragged lists
        if dtype_name(ref.dtype) not in DTYPES:
            raise TypeError(f"numpy.{name} of traced values would be {ref.dtype}; use one of {list(DTYPES)}")
        v = _stacked(obj, dtype_name(ref.dtype), original)
    if dtype is not None:
        v = astype(v, dtype)
    if ndmin > len(v.shape):
        v = reshape(v, (1,) * (ndmin - len(v.shape)) + v.shape)
    if v is obj and (copy is True or (copy is _NO_VALUE and name == "array")):  # np.array copies by default
        v = _fresh(v)
    return v


def _stand_in(obj: Any) -> Any:
    if isinstance(obj, Var):
        return np.zeros(obj.shape, NP_DTYPES[obj.ir_dtype])
    if isinstance(obj, (list, tuple)):
        return [_stand_in(o) for o in obj]
    return obj


def _stacked(obj: Any, dtype: str, original: Callable[..., Any]) -> Any:
    if isinstance(obj, Var):
        return astype(obj, dtype)
    if isinstance(obj, (list, tuple)) and _has_traced(obj):
        return stack([_stacked(o, dtype, original) for o in obj])
    return original(obj, dtype)


__all__ = [
    "abs", "add", "arctan2", "astype", "bitwise_and", "bitwise_or", "bitwise_xor", "broadcast_to", "cast", "ceil",
    "clip", "concatenate", "conjugate", "cos", "cross_entropy", "cumsum", "divide", "divmod", "dot", "equal", "exp",
    "expand_dims", "expm1", "floor", "floor_divide", "full_like", "greater", "greater_equal", "invert", "less",
    "less_equal", "log", "log1p", "log_softmax", "logical_and", "logical_not", "logical_or", "logical_xor",
    "logsumexp", "matmul", "max", "maximum", "mean", "min", "minimum", "mse", "multiply", "negative", "norm",
    "not_equal", "ones_like", "pad", "power", "relu", "remainder", "reshape", "rint", "round", "sigmoid", "sign", "sin",
    "softmax", "sqrt", "square", "squeeze", "stack", "stop_gradient", "subtract", "sum", "swapaxes", "take", "tan",
    "tanh", "transpose", "var", "where", "zeros_like",
]
