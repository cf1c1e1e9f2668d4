"""numpy semantics over primitives: promotion, broadcasting, indexing, the public `gs.*` functions.

Every function here works on three kinds of operand: traced values (`Var`, recorded into the
trace's builder), imperative `gs.Tensor`s (computed now, recorded on the tape), and plain
arrays (computed with the numpy kernels). `bind` is the one place that tells them apart.
Traced values also answer numpy's own protocols, so `np.sin(x)`, `np.sum(x, axis=0)` and
`x @ w` trace; a numpy function not covered here raises a TypeError naming it.
"""

from __future__ import annotations

import builtins
import math
import operator
import os
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np

from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Var, innermost
from gradserve_engine.ops import KERNELS, PRIMITIVES, Primitive
from gradserve_engine.ops.core import FLOATS, INTS, dtype_name

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
        return x.dtype
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
divide, power, arctan2 = UFUNCS["divide"], UFUNCS["power"], UFUNCS["arctan2"]
maximum, minimum = UFUNCS["maximum"], UFUNCS["minimum"]
less, less_equal, greater, greater_equal = UFUNCS["less"], UFUNCS["less_equal"], UFUNCS["greater"], UFUNCS["greater_equal"]
equal, not_equal = UFUNCS["equal"], UFUNCS["not_equal"]


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


def var(x: Any, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> Any:
    axes = _norm_axes(axis, len(shape_of(x)))
    n = math.prod(shape_of(x)[a] for a in axes)
    (x,) = _promoted(x, to=FLOATS)
    d = subtract(x, mean(x, axes, keepdims=True))
    return divide(sum(multiply(d, d), axes, keepdims), float(n - ddof))


def cumsum(x: Any, axis: int | None = None, reverse: bool = False) -> Any:
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _norm_axes(axis, len(shape_of(x)))
    if dtype_of(x) == "bool":
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


def norm(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """The 2-norm (Frobenius over several axes)."""
    (x,) = _promoted(x, to=FLOATS)
    return sqrt(sum(multiply(x, x), axis, keepdims))


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


def reshape(x: Any, shape: Any, order: str = "C") -> Any:
    if order != "C":
        raise ValueError("only C-order reshape is supported")
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


def swapaxes(x: Any, a: int, b: int) -> Any:
    perm = list(range(len(shape_of(x))))
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


def concatenate(xs: Sequence[Any], axis: int = 0) -> Any:
    xs = _promoted(*xs)
    (axis,) = _norm_axes(axis, len(shape_of(xs[0])))
    return xs[0] if len(xs) == 1 else bind("concatenate", *xs, axis=axis)


def stack(xs: Sequence[Any], axis: int = 0) -> Any:
    nd = len(shape_of(xs[0])) + 1
    (axis,) = _norm_axes(axis, nd)
    return concatenate([expand_dims(x, axis) for x in xs], axis)


def take(x: Any, indices: Any, axis: int | None = None) -> Any:
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    (axis,) = _norm_axes(axis, len(shape_of(x)))
    if not _is_value(indices):
        indices = _checked_index(np.asarray(indices), shape_of(x)[axis], axis)
    return bind("take", x, indices, axis=axis)


def pad(x: Any, pad_width: Any, constant_values: float = 0.0) -> Any:
    nd = len(shape_of(x))
    w = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (nd, 2))
    return bind("pad", x, lo=tuple(w[:, 0]), hi=tuple(w[:, 1]), interior=(0,) * nd, value=float(constant_values))


def zeros_like(x: Any) -> Any:
    return broadcast_to(np.zeros((), dtype_of(x)), shape_of(x))


def ones_like(x: Any) -> Any:
    return broadcast_to(np.ones((), dtype_of(x)), shape_of(x))


def clip(x: Any, lo: Any, hi: Any) -> Any:
    return minimum(maximum(x, lo), hi)


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
        if k.dtype == "bool":
            raise data_dependent("a boolean mask" if k.shape else "a 0-d boolean index")
        if k.dtype not in INTS:
            raise IndexError(f"arrays used as indices must be of integer (or boolean) type, got a traced {k.dtype} value")
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

UFUNCS.update({"true_divide": divide, "positive": lambda x: x, "fabs": abs, "matmul": matmul, "square": square})

FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    np.sum: sum, np.mean: mean, np.max: max, np.min: min, np.amax: max, np.amin: min, np.var: var,
    np.reshape: reshape, np.transpose: transpose, np.swapaxes: swapaxes, np.broadcast_to: broadcast_to,
    np.expand_dims: expand_dims, np.squeeze: squeeze, np.concatenate: concatenate, np.stack: stack,
    np.where: where, np.take: take, np.cumsum: cumsum, np.dot: dot, np.matmul: matmul, np.clip: clip,
    np.pad: pad, np.zeros_like: zeros_like, np.ones_like: ones_like, np.linalg.norm: norm,
}


def _no_out(out: Any, name: str) -> None:
    if out is not None:
        raise TypeError(f"numpy.{name}: out= is not supported on traced values (they are immutable)")


def _np_sum(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False,
            initial: Any = None, where: Any = None) -> Any:
    _no_out(out, "sum")
    return sum(a, axis, keepdims, dtype, where=where, initial=initial)


def _np_mean(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, *,
             where: Any = None) -> Any:
    _no_out(out, "mean")
    return mean(a, axis, keepdims, dtype, where=where)


def _data_dependent_function(name: str) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        raise data_dependent(f"numpy.{name}")

    return f


FUNCTIONS.update({np.sum: _np_sum, np.mean: _np_mean})
FUNCTIONS.update({fn: _data_dependent_function(fn.__name__) for fn in (
    np.nonzero, np.argwhere, np.flatnonzero, np.extract, np.compress, np.unique)})


def array_ufunc(ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
    name = ufunc.__name__
    if method != "__call__":
        raise TypeError(f"numpy.{name}.{method} is not supported on traced values")
    if kwargs:
        raise TypeError(f"numpy.{name}: keyword arguments {sorted(kwargs)} are not supported on traced values")
    if name not in UFUNCS:
        raise TypeError(f"numpy.{name} is not supported on traced values (no gradient rule); "
                        f"supported ufuncs: {sorted(UFUNCS)}")
    return UFUNCS[name](*inputs)


def array_function(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if func not in FUNCTIONS:
        name = getattr(func, "__module__", "numpy").replace("numpy.core", "numpy") + "." + func.__name__
        raise TypeError(f"{name} is not supported on traced values (no gradient rule)")
    return FUNCTIONS[func](*args, **kwargs)


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
    __pow__, __rpow__ = _binary_method(power), _binary_method(power, reflected=True)
    __matmul__, __rmatmul__ = _binary_method(matmul), _binary_method(matmul, reflected=True)
    __lt__, __le__ = _binary_method(less), _binary_method(less_equal)
    __gt__, __ge__ = _binary_method(greater), _binary_method(greater_equal)
    __eq__, __ne__ = _binary_method(equal), _binary_method(not_equal)  # type: ignore[assignment]
    def __neg__(self): return negative(self)
    def __pos__(self): return self
    def __abs__(self): return abs(self)
    def __getitem__(self, key): return getitem(self, key)
    __hash__ = object.__hash__

    def __len__(self) -> int:  # `shape` is the concrete class's (a traced value's slot, a tensor's property)
        shape = shape_of(self)
        if not shape:
            raise TypeError("len() of a 0-d value")
        return shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def T(self): return transpose(self)
    def sum(self, axis=None, keepdims=False, *, dtype=None, where=None, initial=None):
        return sum(self, axis, keepdims, dtype, where=where, initial=initial)
    def mean(self, axis=None, keepdims=False, *, dtype=None, where=None):
        return mean(self, axis, keepdims, dtype, where=where)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return min(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return var(self, axis, keepdims, ddof)
    def reshape(self, *shape): return reshape(self, _one_or_many(shape))
    def transpose(self, *axes): return transpose(self, _one_or_many(axes) or None)
    def astype(self, dtype): return astype(self, dtype)
    def squeeze(self, axis=None): return squeeze(self, axis)
    def cumsum(self, axis=None): return cumsum(self, axis)
    def dot(self, o): return dot(self, o)


class Traced(ArrayMethods, Var):
    """A traced value: a `Var` with numpy's operators, methods and protocols."""

    __slots__ = ()

    def __bool__(self) -> bool:
        raise TypeError(f"the truth value of a traced value {self!r} depends on its data: "
                        "Python control flow on traced values is not traced; use gs.where")

    def __float__(self) -> float:
        raise TypeError(f"float() of a traced value {self!r}: its value is not known while tracing")

    def __array__(self, *args, **kwargs):
        raise TypeError(f"a traced value {self!r} cannot be converted to a numpy array while tracing")

    def __setitem__(self, key, value):
        raise TypeError("traced values are immutable; build a new value with gs.where or concatenate")


__all__ = [
    "abs", "add", "arctan2", "astype", "broadcast_to", "cast", "ceil", "clip", "concatenate", "cos", "cross_entropy",
    "cumsum", "divide", "dot", "equal", "exp", "expand_dims", "expm1", "floor", "greater", "greater_equal",
    "less", "less_equal", "log", "log1p", "log_softmax", "logsumexp", "matmul", "max", "maximum", "mean", "min",
    "minimum", "mse", "multiply", "negative", "norm", "not_equal", "ones_like", "pad", "power", "relu", "reshape",
    "sigmoid", "sign", "sin", "softmax", "sqrt", "square", "squeeze", "stack", "stop_gradient", "subtract", "sum",
    "swapaxes", "take", "tan", "tanh", "transpose", "var", "where", "zeros_like",
]
