"""numpy's everyday functions beyond the core ones, written over the primitives.

Each is registered into `numpy_api`'s dispatch tables (`UFUNCS` for ufuncs, `FUNCTIONS` for
`__array_function__`), so `np.f(traced)` traces, and exported as `gs.f`. They take numpy's
signatures, except that the reductions take `gs.sum`'s argument order (x, axis, keepdims, ...):
`np.f` reaches them through adapters with numpy's order (at the end of this module). They are
compositions: no new rules, so every transform (gradients of any order, JVPs, the server) gets
them for free. Where a composition would be wrong (a second
derivative at ties) or slow, the op is a primitive in the engine's registry instead, and its
ufunc comes from there (`np.logaddexp`, `np.arcsin`, `np.isnan`, ... need nothing here).

Gradients follow numpy's values: a sort, median or quantile passes the cotangent back to the
elements it selected (a sort is a gather by its argsort); products are trees of multiplications
(exact zeros give the right gradient, no division); rounding and the predicates have zero or no
gradient.
"""

from __future__ import annotations

import builtins
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from gradserve_engine.errors import LinAlgError
from gradserve_engine.ops.core import FLOATS

from .numpy_api import (
    FUNCTIONS,
    UFUNCS,
    _checked_index,
    _is_value,
    _keepdims,
    _mask,
    _norm_axes,
    _promoted,
    _slice_attrs,
    _slice_axis,
    abs,
    add,
    astype,
    bind,
    broadcast_to,
    concatenate,
    data_dependent,
    divide,
    dtype_of,
    equal,
    expand_dims,
    greater,
    less,
    matmul,
    multiply,
    not_equal,
    reshape,
    result_type,
    shape_of,
    sin,
    sqrt,
    squeeze,
    subtract,
    sum,
    swapaxes,
    transpose,
    where,
)
from .numpy_api import max as _max
from .numpy_api import mean as _mean
from .numpy_api import min as _min

isnan, rint, trunc = UFUNCS["isnan"], UFUNCS["rint"], UFUNCS["trunc"]
_fmod_float = UFUNCS["fmod"]
_select = where  # for the functions whose `where=` keyword shadows it


def _no_out(out: Any, name: str) -> None:
    if out is not None:
        raise TypeError(f"numpy.{name}: out= is not supported on traced values (they are immutable)")


def _arr(x: Any) -> Any:
    """An array-like operand as a value with a shape: traced values and tensors as they are,
    anything else (lists, scalars) as a numpy array; None stays None."""
    return x if x is None or _is_value(x) else np.asarray(x)


def _ndim(x: Any) -> int:
    return len(shape_of(x))


def _axis1(axis: Any, ndim: int) -> int:
    (a,) = _norm_axes(int(axis), ndim)
    return a


def _zero(x: Any) -> np.ndarray:
    return np.zeros((), dtype_of(x))


def _not(b: Any) -> Any:
    return equal(b, np.False_)


def _or(a: Any, b: Any) -> Any:
    return where(a, np.True_, b)


def _and(a: Any, b: Any) -> Any:
    return where(a, b, np.False_)


def _truth(a: Any) -> Any:
    """numpy's truth value of each element: bool as is, anything else compared with zero."""
    return a if dtype_of(a) == "bool" else not_equal(a, _zero(a))


def _int_via_float(f: Callable[..., Any], *xs: Any) -> Any:
    """Integer operands of a float-only computation: computed in float64 and cast back to the
    integer dtype numpy gives (exact while the values stay below 2**53)."""
    dt = result_type(*xs)
    if dt in FLOATS:
        return f(*_promoted(*xs))
    return astype(f(*(astype(x, "float64") for x in xs)), "int64" if dt == "bool" else dt)


# ---------------------------------------------------------------- elementwise


def fmod(x1: Any, x2: Any, /) -> Any:
    """numpy's fmod: the remainder of truncated division, with the sign of `x1`."""
    return _int_via_float(_fmod_float, x1, x2)


def heaviside(x1: Any, x2: Any, /) -> Any:
    """0 where x1 < 0, `x2` where x1 == 0, 1 where x1 > 0 (NaN stays NaN); no gradient through x1."""
    x1, x2 = _promoted(x1, x2, to=FLOATS)
    step = where(less(x1, 0.0), 0.0, where(greater(x1, 0.0), 1.0, x2))
    return where(isnan(x1), x1, step)


def reciprocal(x: Any, /) -> Any:
    if result_type(x) not in FLOATS:
        raise TypeError("numpy.reciprocal of integers truncates (1 / 2 is 0) and is not supported; use 1.0 / x")
    return divide(1.0, x)


def sinc(x: Any) -> Any:
    """sin(pi x) / (pi x), 1 at 0; near 0 its Taylor polynomial, so derivatives of every order
    are right there too."""
    (x,) = _promoted(x, to=FLOATS)
    y = multiply(x, math.pi)
    small = less(abs(y), 1e-4)
    safe = where(small, 1.0, y)
    y2 = multiply(y, y)
    taylor = add(subtract(1.0, divide(y2, 6.0)), divide(multiply(y2, y2), 120.0))
    return where(small, taylor, divide(sin(safe), safe))


def fix(x: Any, out: Any = None) -> Any:
    _no_out(out, "fix")
    return trunc(x)


# ---------------------------------------------------------------- products


def _to_last(x: Any, axes: tuple[int, ...]) -> Any:
    """`x` with `axes` moved to the end and merged into one."""
    nd = _ndim(x)
    rest = [i for i in range(nd) if i not in axes]
    x = transpose(x, rest + list(axes))
    shape = shape_of(x)
    return reshape(x, (*shape[:len(rest)], math.prod(shape[len(rest):])))


def _reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape)) if keepdims else \
        tuple(d for i, d in enumerate(shape) if i not in axes)


def _slice_last(x: Any, start: int, stop: int, step: int) -> Any:
    shape = shape_of(x)
    return bind("slice", x, **_slice_attrs(shape, len(shape) - 1, start, stop, step))


def _pad_axis(x: Any, axis: int, lo: int, hi: int, value: float) -> Any:
    nd = _ndim(x)
    return bind("pad", x, lo=tuple(lo if i == axis else 0 for i in range(nd)),
                hi=tuple(hi if i == axis else 0 for i in range(nd)), interior=(0,) * nd, value=value)


def _tree_prod(x: Any) -> Any:
    """The product over the last axis as a tree of pairwise multiplications: O(n) work in
    log2(n) steps, and a gradient that is the product of the other elements even where some
    are zero."""
    n = shape_of(x)[-1]
    if n == 0:
        return broadcast_to(np.ones((), dtype_of(x)), shape_of(x)[:-1])
    while n > 1:
        if n % 2:
            x, n = _pad_axis(x, _ndim(x) - 1, 0, 1, 1.0), n + 1
        x = multiply(_slice_last(x, 0, n, 2), _slice_last(x, 1, n, 2))
        n //= 2
    return reshape(x, shape_of(x)[:-1])


def _small_int_to_int64(x: Any, dtype: Any) -> Any:
    if dtype is not None:
        return astype(x, dtype)
    return astype(x, "int64") if dtype_of(x) in ("bool", "int32") else x  # as numpy: small integers accumulate in int64


def prod(a: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None, *, where: Any = None,
         initial: Any = None) -> Any:
    """numpy's prod (arguments in `gs.sum`'s order); `where=mask` multiplies only the selected
    elements."""
    a = _arr(a)
    x = _small_int_to_int64(a, dtype)
    if where is not None:
        x = _select(_mask(where, x), x, np.ones((), dtype_of(x)))
    axes = _norm_axes(axis, _ndim(x))
    shape = shape_of(x)
    r = reshape(_tree_prod(_to_last(x, axes)), _reduced_shape(shape, axes, _keepdims(keepdims)))
    return r if initial is None else multiply(r, np.asarray(initial, dtype_of(r)))


def cumprod(a: Any, axis: Any = None, dtype: Any = None, out: Any = None) -> Any:
    """numpy's cumprod, as a parallel prefix scan of multiplications (log2(n) steps): gradients
    are exact where elements are zero."""
    a = _arr(a)
    _no_out(out, "cumprod")
    x = _small_int_to_int64(a, dtype)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    ax = _axis1(axis, _ndim(x))
    n = shape_of(x)[ax]
    d = 1
    while d < n:
        shifted = _pad_axis(bind("slice", x, **_slice_attrs(shape_of(x), ax, 0, n - d, 1)), ax, d, 0, 1.0)
        x = multiply(x, shifted)
        d *= 2
    return x


# ---------------------------------------------------------------- moments and extrema


def _count(mask: Any, x: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    return sum(broadcast_to(astype(mask, dtype_of(x)), shape_of(x)), axes, keepdims)


def _var(a: Any, axis: Any, keepdims: bool, ddof: float, dtype: Any, where: Any, mean: Any, correction: Any) -> Any:
    if correction is not None:
        if ddof != 0:
            raise ValueError("ddof and correction can't be provided simultaneously.")
        ddof = correction
    x = astype(a, dtype) if dtype is not None else a
    (x,) = _promoted(x, to=FLOATS)
    axes = _norm_axes(axis, _ndim(x))
    keep = _keepdims(keepdims)
    mask = None if where is None else _mask(where, x)
    d = subtract(x, mean if mean is not None else _mean(x, axes, True, where=mask))
    sq = sum(multiply(d, d), axes, keep, where=mask)
    if mask is None:
        return divide(sq, float(math.prod(shape_of(x)[i] for i in axes)) - float(ddof))
    return divide(sq, subtract(_count(mask, x, axes, keep), float(ddof)))


def std(a: Any, axis: Any = None, keepdims: bool = False, ddof: float = 0, *, dtype: Any = None, where: Any = None,
        mean: Any = None, correction: Any = None) -> Any:
    """The standard deviation (arguments in `gs.var`'s order): sqrt of the variance with `ddof`
    (or `correction`), over the elements `where=` selects, around a precomputed `mean=` if given."""
    a = _arr(a)
    return sqrt(_var(a, axis, keepdims, ddof, dtype, where, mean, correction))


def ptp(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Peak to peak: max - min."""
    a = _arr(a)
    return subtract(_max(a, axis, _keepdims(keepdims)), _min(a, axis, _keepdims(keepdims)))


def _arg_extremum(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    def arg(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        x = astype(a, "int32") if dtype_of(a) == "bool" else a
        shape = shape_of(x)
        if axis is None:
            flat = arg(reshape(x, (-1,)), 0)
            return reshape(flat, (1,) * len(shape)) if keepdims else flat
        ax = _axis1(axis, len(shape))
        if shape[ax] == 0:
            raise ValueError(f"attempt to get {name} of an empty sequence")
        hit = equal(x, f(x, ax, True))
        if dtype_of(x) in FLOATS:
            hit = _or(isnan(x), hit)
        n = shape[ax]
        pos = np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (len(shape) - ax - 1))
        return _min(where(hit, pos, np.int64(n)), ax, _keepdims(keepdims))

    arg.__name__ = arg.__qualname__ = name
    arg.__doc__ = f"The first position of the {name[3:]}imum (of the first NaN, if any), as numpy's; an integer, no gradient."
    return arg


argmax = _arg_extremum(_max, "argmax")
argmin = _arg_extremum(_min, "argmin")


def any(a: Any, axis: Any = None, keepdims: bool = False, *, where: Any = None) -> Any:
    """Whether any element (that `where=` selects) is true (non-zero)."""
    a = _arr(a)
    b = _truth(a)
    if where is not None:
        b = _and(_mask(where, b), b)
    return greater(sum(astype(b, "int64"), axis, keepdims), np.int64(0))


def all(a: Any, axis: Any = None, keepdims: bool = False, *, where: Any = None) -> Any:
    """Whether every element (that `where=` selects) is true (non-zero)."""
    a = _arr(a)
    miss = _not(_truth(a))
    if where is not None:
        miss = _and(_mask(where, miss), miss)
    return equal(sum(astype(miss, "int64"), axis, keepdims), np.int64(0))


def _nan_to_zero(a: Any) -> Any:
    return _select(isnan(a), 0.0, a) if dtype_of(a) in FLOATS else a


def nansum(a: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None, *, where: Any = None,
           initial: Any = None) -> Any:
    """sum with NaNs counted as zero (their gradient is zero)."""
    a = _arr(a)
    return sum(_nan_to_zero(a), axis, keepdims, dtype, where=where, initial=initial)


def nanmean(a: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None, *, where: Any = None) -> Any:
    """mean of the elements that are not NaN (NaN where there is none)."""
    a = _arr(a)
    keep = _not(isnan(a)) if dtype_of(a) in FLOATS else broadcast_to(np.True_, shape_of(a))
    if where is not None:
        keep = _and(_mask(where, keep), keep)
    return _mean(_nan_to_zero(a), axis, keepdims, dtype, where=keep)


def average(a: Any, axis: Any = None, weights: Any = None, returned: bool = False, *, keepdims: bool = False) -> Any:
    """numpy's average: the mean, or sum(a * w) / sum(w) along `axis`; weights may be traced
    (a gradient with respect to them too). `returned=True` also gives the sum of the weights."""
    a, weights = _arr(a), _arr(weights)
    keep = _keepdims(keepdims)
    if weights is None:
        avg = _mean(a, axis, keep)
        if not returned:
            return avg
        axes = _norm_axes(axis, _ndim(a))
        n = float(math.prod(shape_of(a)[i] for i in axes))
        return avg, broadcast_to(np.asarray(n, dtype_of(avg)), shape_of(avg))
    dt = result_type(a, weights)
    if dt not in FLOATS:
        dt = "float64"
    a, w = astype(a, dt), astype(weights, dt)
    sa, sw = shape_of(a), shape_of(w)
    if sa != sw:
        if axis is None:
            raise TypeError("Axis must be specified when shapes of a and weights differ.")
        if len(sw) != 1:
            raise TypeError("1D weights expected when shapes of a and weights differ.")
        ax = _axis1(axis, len(sa))
        if sw[0] != sa[ax]:
            raise ValueError("Length of weights not compatible with specified axis.")
        w = broadcast_to(reshape(w, (sw[0],) + (1,) * (len(sa) - ax - 1)), sa)
    axes = _norm_axes(axis, len(sa))
    wsum = sum(w, axes, keep)
    avg = divide(sum(multiply(a, w), axes, keep), wsum)
    return (avg, broadcast_to(wsum, shape_of(avg))) if returned else avg


# ---------------------------------------------------------------- order: sort, quantiles, searches


def argsort(a: Any, axis: Any = -1, kind: str | None = None, order: Any = None, *, stable: bool | None = None) -> Any:
    """The permutation that sorts `a` along `axis` (stable: ties keep their order; NaN last)."""
    a = _arr(a)
    if order is not None:
        raise TypeError("argsort: order= (structured arrays) is not supported on traced values")
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    return bind("argsort", a, axis=_axis1(axis, _ndim(a)))


def sort(a: Any, axis: Any = -1, kind: str | None = None, order: Any = None, *, stable: bool | None = None) -> Any:
    """Sorted along `axis`: a gather by the argsort, so the gradient follows the permutation."""
    a = _arr(a)
    if order is not None:
        raise TypeError("sort: order= (structured arrays) is not supported on traced values")
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    ax = _axis1(axis, _ndim(a))
    return _gather_along(a, bind("argsort", a, axis=ax), ax, checked=True)


def _gather_along(x: Any, idx: Any, axis: int, checked: bool) -> Any:
    """x's elements at `idx` along `axis` (numpy's take_along_axis): one gather from the flattened
    array by linear index. `checked`: indices known to be in range (an argsort's)."""
    xs, ishape = shape_of(x), shape_of(idx)
    try:
        out = tuple(i if k == axis else np.broadcast_shapes((d,), (i,))[0]
                    for k, (d, i) in enumerate(zip(xs, ishape, strict=True)))
    except ValueError:
        raise ValueError(f"take_along_axis: shape mismatch: indices {ishape} do not broadcast with {xs}") from None
    strides = [math.prod(xs[k + 1:]) for k in range(len(xs))]
    base = np.zeros((), np.int64)
    for k, (d, o) in enumerate(zip(xs, out, strict=True)):
        if k != axis and d == o and d > 1:
            base = base + np.arange(d, dtype=np.int64).reshape((d,) + (1,) * (len(xs) - k - 1)) * strides[k]
    n = xs[axis]
    if not _is_value(idx):
        idx = _checked_index(np.asarray(idx), n, axis)
    elif not checked:
        idx = astype(idx, "int64")
        idx = where(less(idx, 0), add(idx, np.int64(n)), idx)
        # out of range along the axis: point past the whole array, so the gather raises IndexError
        # instead of reading a neighbouring row
        bad = equal(less(idx, np.int64(0)), less(idx, np.int64(n)))
        idx = where(bad, np.int64(math.prod(xs)), idx)
    lin = add(multiply(idx, np.int64(strides[axis])), base) if strides[axis] != 1 else add(idx, base)
    return bind("take", reshape(x, (-1,)), broadcast_to(lin, out), axis=0)


def take_along_axis(arr: Any, indices: Any, axis: Any = -1) -> Any:
    arr, indices = _arr(arr), _arr(indices)
    if axis is None:
        if _ndim(indices) != 1:
            raise ValueError("when axis=None, `indices` must have a single dimension.")
        arr, axis = reshape(arr, (-1,)), 0
    if np.dtype(dtype_of(indices)).kind not in "iu":
        raise IndexError("`indices` must be an integer array")
    if _ndim(indices) != _ndim(arr):
        raise ValueError("`indices` and `arr` must have the same number of dimensions")
    return _gather_along(arr, indices, _axis1(axis, _ndim(arr)), checked=False)


def searchsorted(a: Any, v: Any, side: str = "left", sorter: Any = None) -> Any:
    """Insertion points of `v` into the sorted 1-D `a` (integers, no gradient)."""
    a, v = _arr(a), _arr(v)
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right' (got {side!r})")
    if sorter is not None:
        a = bind("take", a, sorter if _is_value(sorter) else np.asarray(sorter, np.int64), axis=0)
    a, v = _promoted(a, v)
    return bind("searchsorted", a, v, right=side == "right")


_METHODS = ("linear", "lower", "higher", "midpoint", "nearest")


def _positions(q: np.ndarray, n: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted positions below and above each quantile, and the weight of the one above."""
    v = q * (n - 1)
    lo = np.floor(v)
    if method == "lower":
        t = np.zeros_like(v)
    elif method == "higher":
        lo, t = np.ceil(v), np.zeros_like(v)
    elif method == "nearest":
        lo, t = np.around(v), np.zeros_like(v)  # halves to even, as numpy
    elif method == "midpoint":
        t = np.where(v > lo, 0.5, 0.0)
    else:
        t = v - lo
    lo = lo.astype(np.int64)
    return lo, np.minimum(lo + 1, n - 1), t


def quantile(a: Any, q: Any, axis: Any = None, keepdims: bool = False, *, method: str = "linear") -> Any:
    """numpy's quantile (q in [0, 1], known while tracing): interpolation between sorted
    elements, so the gradient reaches the (at most two) elements each quantile selects."""
    a = _arr(a)
    if method not in _METHODS:
        raise ValueError(f"quantile: method {method!r} is not supported on traced values; use one of {list(_METHODS)}")
    if _is_value(q):
        raise TypeError("quantile: q must be known while tracing (a number or numpy array), not a traced value")
    qa = np.asarray(q, dtype=np.float64)
    if qa.size and not (np.all(qa >= 0) and np.all(qa <= 1)):
        raise ValueError("Quantiles must be in the range [0, 1]")
    discrete = method in ("lower", "higher", "nearest")  # an element itself: the array's dtype, as numpy
    dt = dtype_of(a) if discrete else result_type(a, q)
    x = astype(a, dt if dt in FLOATS or discrete else "float64")
    shape = shape_of(x)
    axes = _norm_axes(axis, len(shape))
    x = _to_last(x, axes)
    n = shape_of(x)[-1]
    if n == 0:
        raise ValueError("quantile of an empty array")
    s = sort(x, -1)
    lo, hi, t = _positions(qa.reshape(-1), n, method)
    r = below = bind("take", s, lo, axis=_ndim(s) - 1)
    if not discrete:
        above = bind("take", s, hi, axis=_ndim(s) - 1)
        d = subtract(above, below)
        tt = t.astype(dtype_of(x))
        # numpy's lerp: from the nearer end, so t = 1 gives `above` exactly
        r = where(t >= 0.5, subtract(above, multiply(d, 1 - tt)), add(below, multiply(d, tt)))
    if dtype_of(x) in FLOATS:  # NaN anywhere: NaN, as numpy
        r = where(_any_last(isnan(x)), np.asarray(np.nan, dtype_of(x)), r)
    r = transpose(r, [_ndim(r) - 1, *range(_ndim(r) - 1)])  # the quantiles' axis first
    return reshape(r, qa.shape + _reduced_shape(shape, axes, _keepdims(keepdims)))


def _any_last(b: Any) -> Any:
    return expand_dims(greater(sum(astype(b, "int64"), -1), np.int64(0)), -1)


def percentile(a: Any, q: Any, axis: Any = None, keepdims: bool = False, *, method: str = "linear") -> Any:
    """quantile with q in percent."""
    if _is_value(q):
        raise TypeError("percentile: q must be known while tracing (a number or numpy array), not a traced value")
    qa = q / 100 if isinstance(q, (int, float)) else np.true_divide(np.asarray(q), 100)
    if not (np.all(np.asarray(qa) >= 0) and np.all(np.asarray(qa) <= 1)):
        raise ValueError("Percentiles must be in the range [0, 100]")
    return quantile(a, qa, axis, keepdims, method=method)


def median(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """The middle element along `axis` (the mean of the middle two for an even count)."""
    return quantile(a, 0.5, axis, keepdims)


# ---------------------------------------------------------------- shape


def ravel(a: Any, order: str = "C") -> Any:
    a = _arr(a)
    if order == "F":
        return reshape(transpose(a), (-1,))
    if order not in ("C", "A", "K"):
        raise ValueError(f"order must be one of 'C', 'F', 'A', or 'K' (got {order!r})")
    return reshape(a, (-1,))


def moveaxis(a: Any, source: Any, destination: Any) -> Any:
    a = _arr(a)
    nd = _ndim(a)
    src = [_axis1(s, nd) for s in np.atleast_1d(source)]
    dst = [_axis1(d, nd) for d in np.atleast_1d(destination)]
    if len(src) != len(dst):
        raise ValueError("`source` and `destination` arguments must have the same number of elements")
    if len(set(src)) != len(src) or len(set(dst)) != len(dst):
        raise ValueError("repeated axis in `source` or `destination` argument")
    order = [i for i in range(nd) if i not in src]
    for d, s in sorted(zip(dst, src, strict=True)):
        order.insert(d, s)
    return transpose(a, order)


def _atleast(nd: int, place: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Callable[..., Any]:
    def f(*arys: Any) -> Any:
        res = []
        for x in arys:
            if not _is_value(x):
                x = np.asarray(x)
            shape = shape_of(x)
            res.append(reshape(x, place(shape)) if len(shape) < nd else x)
        return res[0] if len(res) == 1 else tuple(res)

    f.__name__ = f.__qualname__ = f"atleast_{nd}d"
    return f


atleast_1d = _atleast(1, lambda s: (1,))
atleast_2d = _atleast(2, lambda s: (1,) * (2 - len(s)) + s)
atleast_3d = _atleast(3, lambda s: (1, 1, 1) if not s else (1, s[0], 1) if len(s) == 1 else (*s, 1))


def tile(A: Any, reps: Any) -> Any:
    """Repeat the whole array: broadcast along new axes interleaved with the old, then reshape
    (the gradient sums the copies)."""
    A = _arr(A)
    reps = (int(reps),) if isinstance(reps, (int, np.integer)) else tuple(int(r) for r in reps)
    shape = shape_of(A)
    d = builtins.max(len(reps), len(shape))
    reps = (1,) * (d - len(reps)) + reps
    shape = (1,) * (d - len(shape)) + shape
    x = reshape(A, tuple(v for s in shape for v in (1, s)))
    x = broadcast_to(x, tuple(v for r, s in zip(reps, shape, strict=True) for v in (r, s)))
    return reshape(x, tuple(r * s for r, s in zip(reps, shape, strict=True)))


def repeat(a: Any, repeats: Any, axis: Any = None) -> Any:
    """Each element repeated along `axis` (the gradient sums the repeats)."""
    a = _arr(a)
    if _is_value(repeats):
        raise data_dependent("numpy.repeat with traced repeats")
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    ax = _axis1(axis, _ndim(a))
    shape = shape_of(a)
    r = np.asarray(repeats, dtype=np.int64)
    if r.ndim == 0 or r.size == 1:
        k = int(r.reshape(()) if r.ndim == 0 else r[0])
        if k < 0:
            raise ValueError("repeats may not contain negative values.")
        x = broadcast_to(expand_dims(a, ax + 1), (*shape[:ax + 1], k, *shape[ax + 1:]))
        return reshape(x, (*shape[:ax], shape[ax] * k, *shape[ax + 1:]))
    if r.shape != (shape[ax],):
        raise ValueError(f"operands could not be broadcast together with shape ({shape[ax]},) ({r.size},)")
    if np.any(r < 0):
        raise ValueError("repeats may not contain negative values.")
    return bind("take", a, np.repeat(np.arange(shape[ax], dtype=np.int64), r), axis=ax)


def flip(m: Any, axis: Any = None) -> Any:
    m = _arr(m)
    x = m
    for ax in _norm_axes(axis, _ndim(m)):
        x = _slice_axis(x, ax, slice(None, None, -1))
    return x


def fliplr(m: Any) -> Any:
    m = _arr(m)
    if _ndim(m) < 2:
        raise ValueError("Input must be >= 2-d.")
    return flip(m, 1)


def flipud(m: Any) -> Any:
    m = _arr(m)
    if _ndim(m) < 1:
        raise ValueError("Input must be >= 1-d.")
    return flip(m, 0)


def roll(a: Any, shift: Any, axis: Any = None) -> Any:
    """Elements shifted along `axis`, wrapping around: two slices concatenated."""
    a = _arr(a)
    if axis is None:
        return reshape(roll(reshape(a, (-1,)), shift, 0), shape_of(a))
    shifts, axes = np.broadcast_arrays(np.asarray(shift, np.int64), np.asarray(axis, np.int64))
    total: dict[int, int] = {}
    for s, ax in zip(shifts.reshape(-1), axes.reshape(-1), strict=True):
        k = _axis1(int(ax), _ndim(a))
        total[k] = total.get(k, 0) + int(s)
    x = a
    for ax, s in total.items():
        n = shape_of(x)[ax]
        s = s % n if n else 0
        if s:
            x = concatenate([_slice_axis(x, ax, slice(n - s, n)), _slice_axis(x, ax, slice(0, n - s))], ax)
    return x


def diff(a: Any, n: int = 1, axis: int = -1, prepend: Any = None, append: Any = None) -> Any:
    """The n-th discrete difference along `axis`, from slices."""
    a, prepend, append = _arr(a), _arr(prepend), _arr(append)
    if n < 0:
        raise ValueError(f"order must be non-negative but got {n!r}")
    if n == 0:
        return a
    nd = _ndim(a)
    if nd == 0:
        raise ValueError("diff requires input that is at least one dimensional")
    ax = _axis1(axis, nd)
    parts = []
    for extra, at_end in ((prepend, False), (append, True)):
        if extra is None:
            continue
        if not _ndim(extra):
            extra = broadcast_to(extra, (*shape_of(a)[:ax], 1, *shape_of(a)[ax + 1:]))
        parts.append((extra, at_end))
    if parts:
        a = concatenate([p for p, end in parts if not end] + [a] + [p for p, end in parts if end], ax)
    x = a
    for _ in range(n):
        m = shape_of(x)[ax]
        hi, lo = _slice_axis(x, ax, slice(1, m)), _slice_axis(x, ax, slice(0, builtins.max(m - 1, 0)))
        x = not_equal(hi, lo) if dtype_of(x) == "bool" else subtract(hi, lo)
    return x


def outer(a: Any, b: Any, out: Any = None) -> Any:
    a, b = _arr(a), _arr(b)
    _no_out(out, "outer")
    return multiply(reshape(a, (-1, 1)), reshape(b, (1, -1)))


def kron(a: Any, b: Any) -> Any:
    """The Kronecker product: each element of `a` times the whole of `b`."""
    a, b = _arr(a), _arr(b)
    sa, sb = shape_of(a), shape_of(b)
    d = builtins.max(len(sa), len(sb))
    sa, sb = (1,) * (d - len(sa)) + sa, (1,) * (d - len(sb)) + sb
    x = reshape(a, tuple(v for s in sa for v in (s, 1)))
    y = reshape(b, tuple(v for s in sb for v in (1, s)))
    return reshape(multiply(x, y), tuple(p * q for p, q in zip(sa, sb, strict=True)))


def _triangle(m: Any, k: int, lower: bool) -> Any:
    shape = shape_of(m)
    if not shape:
        raise ValueError(f"{'tril' if lower else 'triu'}: input must be at least 1-d")
    rows, cols = shape[-2:] if len(shape) > 1 else (shape[0], shape[0])  # numpy: a 1-D row repeated
    below = np.tri(rows, cols, k if lower else k - 1, dtype=bool)
    return _select(below if lower else ~below, m, _zero(m))


def tril(m: Any, k: int = 0) -> Any:
    """The lower triangle (zero above the k-th diagonal); the gradient is the mask."""
    m = _arr(m)
    return _triangle(m, int(k), lower=True)


def triu(m: Any, k: int = 0) -> Any:
    """The upper triangle (zero below the k-th diagonal); the gradient is the mask."""
    m = _arr(m)
    return _triangle(m, int(k), lower=False)


def diagonal(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1) -> Any:
    """The diagonal of the (axis1, axis2) planes, as a last axis: one strided slice of the
    merged plane (the gradient pads it back)."""
    a = _arr(a)
    nd = _ndim(a)
    if nd < 2:
        raise ValueError("diag requires an array of at least two dimensions")
    a1, a2 = _axis1(axis1, nd), _axis1(axis2, nd)
    if a1 == a2:
        raise ValueError("axis1 and axis2 cannot be the same")
    x = _to_last(a, (a1, a2)) if (a1, a2) != (nd - 2, nd - 1) else reshape(a, (*shape_of(a)[:-2], -1))
    rows, cols = shape_of(a)[a1], shape_of(a)[a2]
    k = int(offset)
    length = builtins.max(0, builtins.min(rows, cols - k) if k >= 0 else builtins.min(rows + k, cols))
    if length == 0:
        return _slice_last(x, 0, 0, 1)
    start = k if k >= 0 else -k * cols
    return _slice_last(x, start, start + (length - 1) * (cols + 1) + 1, cols + 1)


def diag(v: Any, k: int = 0) -> Any:
    """The k-th diagonal of a 2-D array, or a 2-D array with a 1-D one on its k-th diagonal."""
    v = _arr(v)
    shape = shape_of(v)
    k = int(k)
    if len(shape) == 2:
        return diagonal(v, k)
    if len(shape) != 1:
        raise ValueError("Input must be 1- or 2-d.")
    n = shape[0]
    square = _select(np.eye(n, dtype=bool), expand_dims(v, 1), _zero(v))
    return bind("pad", square, lo=(0, k) if k >= 0 else (-k, 0), hi=(k, 0) if k >= 0 else (0, -k), interior=(0, 0),
                value=0.0)


def trace(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1, dtype: Any = None, out: Any = None) -> Any:
    a = _arr(a)
    _no_out(out, "trace")
    return sum(diagonal(a, offset, axis1, axis2), -1, dtype=dtype)


def _split(ary: Any, indices_or_sections: Any, axis: int, even: bool) -> list[Any]:
    ax = _axis1(axis, _ndim(ary))
    n = shape_of(ary)[ax]
    if isinstance(indices_or_sections, (int, np.integer)):
        k = int(indices_or_sections)
        if k <= 0:
            raise ValueError("number sections must be larger than 0.")
        if even and n % k:
            raise ValueError("array split does not result in an equal division")
        size, extra = divmod(n, k)
        bounds = np.cumsum([0] + [size + 1] * extra + [size] * (k - extra)).tolist()
    else:
        bounds = [0, *(int(i) for i in indices_or_sections), n]
    return [_slice_axis(ary, ax, slice(lo, hi)) for lo, hi in itertools.pairwise(bounds)]


def split(ary: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    return _split(ary, indices_or_sections, axis, even=True)


def array_split(ary: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    return _split(ary, indices_or_sections, axis, even=False)


def meshgrid(*xi: Any, copy: bool = True, sparse: bool = False, indexing: str = "xy") -> tuple[Any, ...]:
    if indexing not in ("xy", "ij"):
        raise ValueError("Valid values for `indexing` are 'xy' and 'ij'.")
    nd = len(xi)
    xi = tuple(_arr(x) for x in xi)
    out = [reshape(x, (1,) * i + (-1,) + (1,) * (nd - i - 1)) for i, x in enumerate(xi)]
    if indexing == "xy" and nd > 1:
        out[0] = reshape(out[0], (1, -1) + (1,) * (nd - 2))
        out[1] = reshape(out[1], (-1, 1) + (1,) * (nd - 2))
    if not sparse:
        full = np.broadcast_shapes(*(shape_of(o) for o in out))
        out = [broadcast_to(o, full) for o in out]
    return tuple(out)


# ---------------------------------------------------------------- einsum

Label = str | int  # a subscript letter, or an ellipsis dimension (counted from the right)


def _einsum_terms(subscripts: str, shapes: list[tuple[int, ...]]) -> tuple[list[list[Label]], list[Label]]:
    """The labels of each operand's axes and of the output (numpy's rules: an implicit output is
    the ellipsis dimensions, then the letters used once, in order)."""
    spec = subscripts.replace(" ", "")
    ins, arrow, out = spec.partition("->")
    terms = ins.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum: {len(terms)} operand subscripts in {subscripts!r} for {len(shapes)} operands")
    for t in (*terms, out):
        bad = set(t.replace("...", "")) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        if bad or t.count("...") > 1:
            raise ValueError(f"einsum: invalid subscripts {subscripts!r} (letters, one '...' per term, ',' and '->')")
    labels: list[list[Label]] = []
    n_ell = 0
    for t, shape in zip(terms, shapes, strict=True):
        head, ell, tail = t.partition("...")
        k = len(shape) - len(head) - len(tail)
        if k < 0 or (k and not ell):
            raise ValueError(f"einsum: subscripts {t!r} do not match an operand of rank {len(shape)}")
        n_ell = builtins.max(n_ell, k)
        labels.append([*head, *range(k - 1, -1, -1), *tail])
    ellipsis: list[Label] = list(range(n_ell - 1, -1, -1))
    if arrow:
        head, ell, tail = out.partition("...")
        if not ell and n_ell:
            raise ValueError(f"einsum: output subscripts of {subscripts!r} must keep the '...' dimensions")
        result: list[Label] = [*head, *ellipsis, *tail] if ell else [*head, *tail]
    else:
        counts = {c: ins.count(c) for c in set(ins.replace("...", "").replace(",", ""))}
        result = [*ellipsis, *sorted(c for c, n in counts.items() if n == 1)]
    used = {lb for t in labels for lb in t}
    for lb in result:
        if lb not in used:
            raise ValueError(f"einsum: output subscript {lb!r} of {subscripts!r} is not in any operand")
    if len(set(result)) != len(result):
        raise ValueError(f"einsum: output subscripts of {subscripts!r} repeat a letter")
    return labels, result


def _einsum_sizes(items: list[tuple[Any, list[Label]]]) -> dict[Label, int]:
    sizes: dict[Label, int] = {}
    for x, labels in items:
        for lb, d in zip(labels, shape_of(x), strict=True):
            if sizes.get(lb, 1) != 1 and d not in (1, sizes[lb]):
                raise ValueError(f"einsum: subscript {lb!r} has sizes {sizes[lb]} and {d}")
            sizes[lb] = builtins.max(sizes.get(lb, 1), d)
    return sizes


def _einsum_diagonals(x: Any, labels: list[Label]) -> tuple[Any, list[Label]]:
    """A letter repeated within one operand ('ii'): its diagonal, as a last axis."""
    while len(set(labels)) != len(labels):
        lb = next(lb for lb in labels if labels.count(lb) > 1)
        p = labels.index(lb)
        q = labels.index(lb, p + 1)
        if shape_of(x)[p] != shape_of(x)[q]:
            raise ValueError(f"einsum: repeated subscript {lb!r} on axes of sizes {shape_of(x)[p]} and {shape_of(x)[q]}")
        x = diagonal(x, 0, p, q)
        labels = [b for i, b in enumerate(labels) if i not in (p, q)] + [lb]
    return x, labels


def _einsum_sum(x: Any, labels: list[Label], keep: set[Label]) -> tuple[Any, list[Label]]:
    gone = tuple(i for i, lb in enumerate(labels) if lb not in keep)
    if not gone:
        return x, labels
    return sum(x, gone), [lb for lb in labels if lb in keep]


def _einsum_pair(a: Any, la: list[Label], b: Any, lb: list[Label], keep: set[Label],
                 sizes: dict[Label, int]) -> tuple[Any, list[Label]]:
    """Two operands contracted: the shared letters to keep are a batch, the others summed by one
    (batched) matmul of the operands transposed and reshaped to (batch, M, K) and (batch, K, N)."""
    a, la = _einsum_sum(a, la, keep | set(lb))
    b, lb = _einsum_sum(b, lb, keep | set(la))
    batch = [x for x in la if x in lb and x in keep]
    contract = [x for x in la if x in lb and x not in keep]
    a_only, b_only = [x for x in la if x not in lb], [x for x in lb if x not in la]
    # a size-1 dimension shared with a longer one broadcasts, as numpy
    a = broadcast_to(a, tuple(sizes[x] if x in lb else d for x, d in zip(la, shape_of(a), strict=True)))
    b = broadcast_to(b, tuple(sizes[x] if x in la else d for x, d in zip(lb, shape_of(b), strict=True)))
    da, db = dict(zip(la, shape_of(a), strict=True)), dict(zip(lb, shape_of(b), strict=True))
    nb = tuple(da[x] for x in batch)
    a = transpose(a, [la.index(x) for x in (*batch, *a_only, *contract)])
    b = transpose(b, [lb.index(x) for x in (*batch, *contract, *b_only)])
    a_dims, b_dims = tuple(da[x] for x in a_only), tuple(db[x] for x in b_only)
    if not contract:  # an outer product over the batch: a broadcast multiplication
        r = multiply(reshape(a, nb + a_dims + (1,) * len(b_dims)), reshape(b, nb + (1,) * len(a_dims) + b_dims))
        return r, [*batch, *a_only, *b_only]
    k = math.prod(da[x] for x in contract)
    r = matmul(reshape(a, (*nb, math.prod(a_dims), k)), reshape(b, (*nb, k, math.prod(b_dims))))
    return reshape(r, nb + a_dims + b_dims), [*batch, *a_only, *b_only]


def einsum(subscripts: str, *operands: Any, out: Any = None, dtype: Any = None, order: str = "K",
           casting: str = "safe", optimize: Any = False) -> Any:
    """numpy's einsum with any subscripts (repeated letters, '...', implicit output), lowered to
    diagonals, sums, transposes, reshapes and matmuls; more than two operands are contracted in
    the order numpy's greedy `einsum_path` picks."""
    _no_out(out, "einsum")
    if not isinstance(subscripts, str):
        raise TypeError("einsum: give the subscripts as a string ('ij,jk->ik'), not as lists of axes")
    if not operands:
        raise ValueError("einsum: no operands")
    operands = tuple(_arr(x) for x in operands)
    ops = _promoted(*operands) if dtype is None else [astype(x, dtype) for x in operands]
    terms, result = _einsum_terms(subscripts, [shape_of(x) for x in ops])
    items = [_einsum_diagonals(x, t) for x, t in zip(ops, terms, strict=True)]
    sizes = _einsum_sizes(items)
    if len(items) > 2:
        dummies = [np.broadcast_to(np.zeros((), np.float64), shape_of(x)) for x in ops]
        path = [tuple(step) for step in np.einsum_path(subscripts, *dummies, optimize="greedy")[0][1:]]
    else:
        path = [tuple(range(len(items)))]
    for step in path:
        picked = [items[i] for i in step]
        items = [it for i, it in enumerate(items) if i not in step]
        rest = {lb for _, t in items for lb in t} | set(result)
        x, labels = picked[0]
        for y, ly in picked[1:]:
            x, labels = _einsum_pair(x, labels, y, ly, rest | {lb for _, t in picked[2:] for lb in t}, sizes)
        items.append(_einsum_sum(x, labels, rest))
    (x, labels), = items
    x = transpose(x, [labels.index(lb) for lb in result])
    return broadcast_to(x, tuple(sizes[lb] for lb in result))


# ---------------------------------------------------------------- numpy.linalg
# The decompositions are primitives of the engine (their factors packed along axis -2, see
# `gradserve_engine.ops.linalg`); everything else here is composed from them. Integer operands
# are computed in float64, as numpy's.


class SlogdetResult(NamedTuple):
    sign: Any
    logabsdet: Any


class EighResult(NamedTuple):
    eigenvalues: Any
    eigenvectors: Any


class SVDResult(NamedTuple):
    U: Any
    S: Any
    Vh: Any


class QRResult(NamedTuple):
    Q: Any
    R: Any


class LstsqResult(NamedTuple):
    x: Any
    residuals: Any
    rank: Any
    s: Any


def _matrix_operand(a: Any, square: bool = False) -> Any:
    """`a` as float matrices (numpy's LinAlgError for fewer than two axes, or non-square ones)."""
    (a,) = _promoted(_arr(a), to=FLOATS)
    shape = shape_of(a)
    if len(shape) < 2:
        raise LinAlgError(f"{len(shape)}-dimensional array given. Array must be at least two-dimensional")
    if square and shape[-1] != shape[-2]:
        raise LinAlgError(f"Last 2 dimensions of the array must be square, got shape {shape}")
    return a


def _rows(x: Any, lo: int, hi: int) -> Any:
    return _slice_axis(x, _ndim(x) - 2, slice(lo, hi))


def _row(x: Any, i: int) -> Any:
    return squeeze(_rows(x, i, i + 1), _ndim(x) - 2)


def _mT(x: Any) -> Any:
    return swapaxes(x, -1, -2)


def _eye(n: int, like: Any) -> np.ndarray:
    return np.eye(n, dtype=dtype_of(like))


def det(a: Any) -> Any:
    """numpy.linalg.det; its gradient det(A)·A⁻ᵀ needs A invertible (a singular A raises
    LinAlgError when the gradient runs)."""
    return bind("det", _matrix_operand(a, square=True))


def slogdet(a: Any) -> SlogdetResult:
    """numpy.linalg.slogdet: (sign, log|det|); the sign has zero gradient."""
    p = bind("slogdet", _matrix_operand(a, square=True))
    return SlogdetResult(squeeze(_slice_last(p, 0, 1, 1), -1), squeeze(_slice_last(p, 1, 2, 1), -1))


def solve(a: Any, b: Any) -> Any:
    """numpy.linalg.solve (numpy 2's rule: a 1-D `b` is one vector, otherwise a stack of matrices);
    a singular `a` raises LinAlgError when the graph runs."""
    a = _matrix_operand(a, square=True)
    a, b = _promoted(a, _arr(b), to=FLOATS)
    if _ndim(b) == 0:
        raise ValueError("solve: b must be at least one-dimensional")
    vector = _ndim(b) == 1
    if vector:
        b = expand_dims(b, 1)
    n = shape_of(a)[-1]
    if shape_of(b)[-2] != n:
        raise ValueError(f"solve: a of shape {shape_of(a)} and b of shape {shape_of(b)} do not match in their rows")
    x = bind("solve", a, b)
    return squeeze(x, -1) if vector else x


def inv(a: Any) -> Any:
    """numpy.linalg.inv, as a solve with the identity."""
    a = _matrix_operand(a, square=True)
    return bind("solve", a, _eye(shape_of(a)[-1], a))


def cholesky(a: Any, /, *, upper: bool = False) -> Any:
    """numpy.linalg.cholesky of the symmetric part ½(A + Aᵀ) (numpy reads the lower triangle:
    the same for symmetric input); not positive definite raises LinAlgError when the graph runs."""
    lower = bind("cholesky", _matrix_operand(a, square=True))
    return _mT(lower) if upper else lower


def _uplo(UPLO: str) -> None:
    if UPLO not in ("L", "U"):
        raise ValueError("UPLO argument must be 'L' or 'U'")


def eigh(a: Any, UPLO: str = "L") -> EighResult:
    """numpy.linalg.eigh of the symmetric part ½(A + Aᵀ) (numpy reads one triangle, `UPLO`: the
    same for symmetric input); each eigenvector's entry of largest magnitude is positive."""
    _uplo(UPLO)
    a = _matrix_operand(a, square=True)
    p = bind("eigh", a)
    n = shape_of(a)[-1]
    return EighResult(_row(p, 0), _rows(p, 1, n + 1))


def eigvalsh(a: Any, UPLO: str = "L") -> Any:
    return eigh(a, UPLO).eigenvalues


def _svd_parts(a: Any) -> tuple[Any, Any, Any]:
    """U (m, k), s (k,), V (n, k) of the engine's packed SVD."""
    m = shape_of(a)[-2]
    p = bind("svd", a)
    return _rows(p, 0, m), _row(p, m), _rows(p, m + 1, shape_of(p)[-2])


def svd(a: Any, full_matrices: bool = True, compute_uv: bool = True, hermitian: bool = False) -> Any:
    """numpy.linalg.svd; each left singular vector's entry of largest magnitude is positive. The
    extra columns of `full_matrices=True` for a non-square matrix are not unique, so they are not
    computed: pass full_matrices=False (square matrices are the same either way)."""
    a = _matrix_operand(a)
    u, s, v = _svd_parts(a)
    if not compute_uv:
        return s
    m, n = shape_of(a)[-2:]
    if full_matrices and m != n:
        raise ValueError(f"svd: full_matrices=True of a non-square ({m}, {n}) matrix completes U or Vh with "
                         "columns that are not unique (and have no derivative); pass full_matrices=False")
    return SVDResult(u, s, _mT(v))


def svdvals(x: Any, /) -> Any:
    return _svd_parts(_matrix_operand(x))[1]


def qr(a: Any, mode: str = "reduced") -> Any:
    """numpy.linalg.qr ('reduced', 'complete' where it is the same as 'reduced' (m <= n), 'r'),
    with LAPACK's signs as numpy's; its derivative needs R invertible. A wide matrix's Q and first
    block of R are those of its leading square block."""
    if mode not in ("reduced", "complete", "r"):
        raise ValueError(f"qr: mode {mode!r} is not supported on traced values; use 'reduced', 'complete' or 'r'")
    a = _matrix_operand(a)
    m, n = shape_of(a)[-2:]
    if mode == "complete" and m > n:
        raise ValueError(f"qr: mode='complete' of a tall ({m}, {n}) matrix completes Q with columns that are not "
                         "unique (and have no derivative); use mode='reduced'")
    head = a if m >= n else _slice_axis(a, _ndim(a) - 1, slice(0, m))
    p = bind("qr", head)
    q, r = _rows(p, 0, m), _rows(p, m, shape_of(p)[-2])
    if m < n:
        r = concatenate([r, matmul(_mT(q), _slice_axis(a, _ndim(a) - 1, slice(m, n)))], _ndim(a) - 1)
    return r if mode == "r" else QRResult(q, r)


def matrix_power(a: Any, n: int) -> Any:
    """numpy.linalg.matrix_power by repeated squaring (a negative power inverts first)."""
    a = _arr(a)
    if not isinstance(n, (int, np.integer)):
        raise TypeError("exponent must be an integer")
    shape = shape_of(a)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise LinAlgError(f"Last 2 dimensions of the array must be square, got shape {shape}")
    n = int(n)
    if n == 0:
        return broadcast_to(np.eye(shape[-1], dtype=dtype_of(a)), shape)
    if n < 0:
        a, n = inv(a), -n
    result = None
    while True:
        if n & 1:
            result = a if result is None else matmul(result, a)
        n >>= 1
        if not n:
            return result
        a = matmul(a, a)


def _cutoff_rcond(rcond: Any, rtol: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if rcond is None:
        if rtol is _NO_VALUE:
            return 1e-15
        return max(shape[-2:]) * np.finfo(dtype).eps if rtol is None else rtol
    if rtol is not _NO_VALUE:
        raise ValueError("`rtol` and `rcond` can't be both set.")
    return rcond


_NO_VALUE = object()


def _pinv_parts(a: Any, rcond: Any) -> tuple[Any, Any, Any, Any]:
    """U, s, V and s⁺ (1/s above rcond · max(s), else 0: a derivative of zero there too)."""
    u, s, v = _svd_parts(a)
    if not shape_of(s)[-1]:
        return u, s, v, s
    cutoff = multiply(np.asarray(rcond, dtype_of(s))[..., None] if np.ndim(rcond) else float(rcond),
                      _max(s, -1, keepdims=True))
    large = greater(s, cutoff)
    return u, s, v, where(large, divide(1.0, where(large, s, 1.0)), 0.0)


def pinv(a: Any, rcond: Any = None, hermitian: bool = False, *, rtol: Any = _NO_VALUE) -> Any:
    """numpy.linalg.pinv, from the SVD: V diag(s⁺) Uᵀ; its derivative is that of singular values
    apart from each other and from the cutoff."""
    a = _matrix_operand(a)
    u, _, v, s_inv = _pinv_parts(a, _cutoff_rcond(rcond, rtol, shape_of(a), dtype_of(a)))
    return matmul(multiply(v, expand_dims(s_inv, -2)), _mT(u))


def lstsq(a: Any, b: Any, rcond: Any = None) -> LstsqResult:
    """numpy.linalg.lstsq: x = pinv(a) b with singular values below rcond · max(s) dropped. The
    rank is a traced integer; the residuals (the squared norm of each column of b - a x) are given
    whenever m > n, also where a is rank-deficient (numpy then gives an empty array, a shape that
    depends on the data)."""
    a = _matrix_operand(a)
    a, b = _promoted(a, _arr(b), to=FLOATS)
    if _ndim(a) != 2 or _ndim(b) not in (1, 2):
        raise LinAlgError(f"lstsq: a must be a matrix and b a vector or a matrix, got shapes {shape_of(a)} and {shape_of(b)}")
    m, n = shape_of(a)
    if shape_of(b)[0] != m:
        raise LinAlgError(f"Incompatible dimensions: a {shape_of(a)} and b {shape_of(b)}")
    rcond = np.finfo(dtype_of(a)).eps * max(m, n) if rcond is None else rcond
    u, s, v, s_inv = _pinv_parts(a, rcond)
    x = matmul(multiply(v, expand_dims(s_inv, -2)), matmul(_mT(u), b))
    rank = sum(astype(greater(s_inv, 0.0), "int32"), dtype="int32") if shape_of(s)[-1] else np.int32(0)
    if m > n:
        r = subtract(b, matmul(a, x))
        residuals = sum(multiply(r, r), 0)
        residuals = reshape(residuals, (1,)) if _ndim(b) == 1 else residuals
    else:
        residuals = np.zeros((0,), dtype_of(a))
    return LstsqResult(x, residuals, rank, s)


def _root_of_squares(x: Any, axis: Any, keepdims: bool = False) -> Any:
    """sqrt(sum(x²)), with gradient 0 where it is 0 (torch's subgradient; sqrt's would be nan)."""
    s = sum(multiply(x, x), axis, keepdims)
    zero = equal(s, 0.0)
    return where(zero, 0.0, sqrt(where(zero, 1.0, s)))


def _vector_norm(x: Any, ord: Any, axis: int, keepdims: bool) -> Any:
    ax = abs(x)
    if ord is None or ord == 2:
        return _root_of_squares(x, axis, keepdims)
    if ord == math.inf:
        return _max(ax, axis, keepdims)
    if ord == -math.inf:
        return _min(ax, axis, keepdims)
    if ord == 0:
        return sum(astype(not_equal(x, 0.0), dtype_of(x)), axis, keepdims)
    if ord == 1:
        return sum(ax, axis, keepdims)
    if isinstance(ord, str):
        raise ValueError(f"Invalid norm order '{ord}' for vectors")
    p = float(ord)
    total = sum(UFUNCS["power"](ax, p), axis, keepdims)
    if p < 0:  # numpy's value (0 where an element is 0); its gradient there is nan as torch's
        return UFUNCS["power"](total, 1.0 / p)
    zero = equal(total, 0.0)  # gradient 0 at the zero vector, as torch's p-norm (the root's would be nan)
    return where(zero, 0.0, UFUNCS["power"](where(zero, 1.0, total), 1.0 / p))


def _matrix_norm(x: Any, ord: Any, axes: tuple[int, int], keepdims: bool) -> Any:
    row, col = axes
    if row == col:
        raise ValueError("Duplicate axes given.")
    nd = _ndim(x)
    if ord in (2, -2, "nuc"):
        s = _svd_parts(moveaxis(x, (row, col), (nd - 2, nd - 1)))[1]
        r = _max(s, -1) if ord == 2 else _min(s, -1) if ord == -2 else sum(s, -1)
    elif ord in (None, "fro"):
        r = _root_of_squares(x, axes)
    elif ord in (1, -1, math.inf, -math.inf):
        inner, outer = (row, col) if ord in (1, -1) else (col, row)
        sums = sum(abs(x), inner)
        if outer > inner:  # the inner axis is gone
            outer -= 1
        r = (_max if ord in (1, math.inf) else _min)(sums, outer)
    else:
        raise ValueError("Invalid norm order for matrices.")
    if keepdims:
        r = expand_dims(r, sorted(axes))
    return r


def linalg_norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """numpy.linalg.norm with every `ord`: vectors (None or 2, 1, inf, -inf, 0, any p) and matrices
    ('fro', 'nuc', 1, -1, 2, -2, inf, -inf), over `axis` (an int, two axes, or None), with
    `keepdims`. At zero, where the value is not differentiable, the 2-norm and the Frobenius norm
    have gradient 0 (torch's subgradient: `norm(x - y)` at x == y does not give nan)."""
    (x,) = _promoted(_arr(x), to=FLOATS)
    nd = _ndim(x)
    if axis is None:
        if ord is None:
            r = _root_of_squares(x, None)
            return reshape(r, (1,) * nd) if keepdims else r
        if nd == 1:
            axis = 0
        elif nd == 2:
            axis = (0, 1)
        else:
            raise ValueError("Improper number of dimensions to norm.")
    if isinstance(axis, (int, np.integer)):
        return _vector_norm(x, ord, _axis1(axis, nd), keepdims)
    axes = tuple(axis)
    if len(axes) == 1:
        return _vector_norm(x, ord, _axis1(axes[0], nd), keepdims)
    if len(axes) != 2:
        raise ValueError("Improper number of dimensions to norm.")
    return _matrix_norm(x, ord, (_axis1(axes[0], nd), _axis1(axes[1], nd)), keepdims)


# ---------------------------------------------------------------- numpy.fft, as pairs of real arrays
# The engine's values are real (bool, integers, floats), on the wire too, so numpy.fft's complex
# results cannot be traced values: `np.fft.fft(traced)` raises and says so. These functions take
# and give the real and imaginary parts as two arrays instead; each transform is a matrix product
# with the DFT's cosine and sine tables (O(n²) per transform, exact to rounding: for the lengths
# where a trained model meets a spectrum, up to a few thousand points), so gradients of any order
# come from matmul's rules.

_FFT_NORMS = (None, "backward", "ortho", "forward")


def _fft_scale(norm: str | None, n: int, inverse: bool) -> float:
    if norm not in _FFT_NORMS:
        raise ValueError(f'Invalid norm value {norm}; should be "backward", "ortho" or "forward".')
    if norm == "ortho":
        return 1.0 / math.sqrt(n)
    return 1.0 / n if (norm == "forward") != inverse else 1.0


def _fft_operand(x: Any, n: int | None, axis: int, what: str) -> tuple[Any, int]:
    """`x` as floats with `axis` last, cropped or zero-padded to `n` points, as numpy's."""
    (x,) = _promoted(_arr(x), to=FLOATS)
    ax = _axis1(axis, _ndim(x))
    x = moveaxis(x, ax, -1)
    size = shape_of(x)[-1]
    n = size if n is None else int(n)
    if n < 1:
        raise ValueError(f"Invalid number of FFT data points ({n}) specified.")
    if n < size:
        x = _slice_last(x, 0, n, 1)
    elif n > size:
        x = _pad_axis(x, _ndim(x) - 1, 0, n - size, 0.0)
    return x, n


def _dft_tables(n_in: int, n_out: int, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2π j k / n for j < n_in, k < n_out: phases reduced exactly in integers, and
    the quarter turns exact (so the imaginary part of a real signal's zero and Nyquist frequencies
    is exactly zero, as numpy's)."""
    turns = np.outer(np.arange(n_in), np.arange(n_out)) % n
    phase = turns * (2.0 * math.pi / n)
    c, s = np.cos(phase), np.sin(phase)
    quarter = (4 * turns) % n == 0
    c[quarter], s[quarter] = np.rint(c[quarter]), np.rint(s[quarter])
    return c.astype(dtype), s.astype(dtype)


def _complex_dft(re: Any, im: Any | None, n: int, sign: float, scale: float) -> tuple[Any, Any]:
    """Σ_j (re + i im)_j e^{sign · 2πi jk/n}, times scale, over the last axis."""
    c, s = _dft_tables(n, n, n, dtype_of(re))
    c, s = c * scale, s * (sign * scale)
    out_re, out_im = matmul(re, c), matmul(re, s)
    if im is not None:
        out_re, out_im = subtract(out_re, matmul(im, s)), add(out_im, matmul(im, c))
    return out_re, out_im


def _parts(re: Any, im: Any | None, n: int | None, axis: int) -> tuple[Any, Any | None, int]:
    if im is not None:
        re, im = _promoted(_arr(re), _arr(im), to=FLOATS)
        if shape_of(re) != shape_of(im):
            raise ValueError(f"the real and imaginary parts have different shapes {shape_of(re)} and {shape_of(im)}")
        im, _ = _fft_operand(im, n, axis, "fft")
    re, n = _fft_operand(re, n, axis, "fft")
    return re, im, n


def fft_parts(re: Any, im: Any = None, n: int | None = None, axis: int = -1, norm: str | None = None) -> tuple[Any, Any]:
    """numpy.fft.fft of re + i·im (im None: a real signal) as (real part, imaginary part)."""
    re, im, n = _parts(re, im, n, axis)
    out = _complex_dft(re, im, n, -1.0, _fft_scale(norm, n, inverse=False))
    return moveaxis(out[0], -1, axis), moveaxis(out[1], -1, axis)


def ifft_parts(re: Any, im: Any = None, n: int | None = None, axis: int = -1, norm: str | None = None) -> tuple[Any, Any]:
    """numpy.fft.ifft of re + i·im as (real part, imaginary part)."""
    re, im, n = _parts(re, im, n, axis)
    out = _complex_dft(re, im, n, 1.0, _fft_scale(norm, n, inverse=True))
    return moveaxis(out[0], -1, axis), moveaxis(out[1], -1, axis)


def rfft_parts(x: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> tuple[Any, Any]:
    """numpy.fft.rfft of a real signal (n // 2 + 1 frequencies) as (real part, imaginary part)."""
    x, n = _fft_operand(x, n, axis, "rfft")
    c, s = _dft_tables(n, n // 2 + 1, n, dtype_of(x))
    scale = _fft_scale(norm, n, inverse=False)
    return moveaxis(matmul(x, c * scale), -1, axis), moveaxis(matmul(x, s * -scale), -1, axis)


def irfft_parts(re: Any, im: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> Any:
    """numpy.fft.irfft of the spectrum re + i·im: the real signal of length n (default
    2 (m - 1) for m frequencies); as numpy, the imaginary parts of the zero frequency (and of
    the Nyquist one, for even n) do not matter."""
    re, im = _promoted(_arr(re), _arr(im), to=FLOATS)
    if shape_of(re) != shape_of(im):
        raise ValueError(f"the real and imaginary parts have different shapes {shape_of(re)} and {shape_of(im)}")
    m = shape_of(re)[_axis1(axis, _ndim(re))]
    n = 2 * (m - 1) if n is None else int(n)
    re, _ = _fft_operand(re, n // 2 + 1, axis, "irfft")
    im, _ = _fft_operand(im, n // 2 + 1, axis, "irfft")
    k = n // 2 + 1
    c, s = _dft_tables(k, n, n, dtype_of(re))
    weight = np.full((k, 1), 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    scale = _fft_scale(norm, n, inverse=True)
    c, s = (c * weight * scale).astype(dtype_of(re)), (s * weight * -scale).astype(dtype_of(re))
    return moveaxis(add(matmul(re, c), matmul(im, s)), -1, axis)


def _fft2(re: Any, im: Any, s: Any, axes: Any, norm: str | None, f: Callable[..., tuple[Any, Any]]) -> tuple[Any, Any]:
    axes = tuple(axes)
    sizes = [None] * len(axes) if s is None else list(s)
    if len(sizes) != len(axes):
        raise ValueError("Shape and axes have different lengths.")
    for ax, n in zip(reversed(axes), reversed(sizes), strict=True):  # numpy transforms the last axis first
        re, im = f(re, im, n, ax, norm)
    return re, im


def fft2_parts(re: Any, im: Any = None, s: Any = None, axes: Any = (-2, -1), norm: str | None = None) -> tuple[Any, Any]:
    """numpy.fft.fft2 of re + i·im as (real part, imaginary part)."""
    return _fft2(re, im, s, axes, norm, fft_parts)


def ifft2_parts(re: Any, im: Any = None, s: Any = None, axes: Any = (-2, -1), norm: str | None = None) -> tuple[Any, Any]:
    """numpy.fft.ifft2 of re + i·im as (real part, imaginary part)."""
    return _fft2(re, im, s, axes, norm, ifft_parts)


def _complex_result_function(name: str, instead: str) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"numpy.fft.{name} is not supported on traced values: it works on complex values, and traced "
                        f"values are real (the engine has no complex dtype); use gs.fft.{instead}, which takes and gives "
                        "the real and imaginary parts as two arrays")

    return f


# ---------------------------------------------------------------- numpy's signatures
# The reductions above take `gs.sum`'s argument order (x, axis, keepdims, ...); numpy's functions
# put out= (and dtype=) before keepdims. These adapters are what `np.<name>(traced)` calls.


def _np_prod(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False,
             initial: Any = None, where: Any = None) -> Any:
    _no_out(out, "prod")
    return prod(a, axis, keepdims, dtype, where=where, initial=initial)


def _np_var(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, ddof: float = 0, keepdims: bool = False, *,
            where: Any = None, mean: Any = None, correction: Any = None) -> Any:
    _no_out(out, "var")
    return _var(a, axis, keepdims, ddof, dtype, where, mean, correction)


def _np_std(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, ddof: float = 0, keepdims: bool = False, *,
            where: Any = None, mean: Any = None, correction: Any = None) -> Any:
    _no_out(out, "std")
    return std(a, axis, keepdims, ddof, dtype=dtype, where=where, mean=mean, correction=correction)


def _np_extremum(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    def reduce(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, initial: Any = None,
               where: Any = None) -> Any:
        _no_out(out, name)
        return f(a, axis, _keepdims(keepdims), where=where, initial=initial)

    return reduce


def _np_reduce(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    """numpy's (a, axis, out, keepdims, *, where) for ptp, any, all."""
    def g(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, **where: Any) -> Any:
        _no_out(out, name)
        return f(a, axis, keepdims, **where)

    return g


def _np_arg(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    """numpy's (a, axis, out, *, keepdims) for argmax and argmin."""
    def g(a: Any, axis: Any = None, out: Any = None, *, keepdims: bool = False) -> Any:
        _no_out(out, name)
        return f(a, axis, keepdims)

    return g


def _np_nansum(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False,
               initial: Any = None, where: Any = None) -> Any:
    _no_out(out, "nansum")
    return nansum(a, axis, keepdims, dtype, where=where, initial=initial)


def _np_nanmean(a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, *,
                where: Any = None) -> Any:
    _no_out(out, "nanmean")
    return nanmean(a, axis, keepdims, dtype, where=where)


def _np_quantile(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    def g(a: Any, q: Any, axis: Any = None, out: Any = None, overwrite_input: bool = False, method: str = "linear",
          keepdims: bool = False, *, weights: Any = None) -> Any:
        _no_out(out, name)
        if weights is not None:
            raise TypeError(f"numpy.{name}: weights= is not supported on traced values")
        return f(a, q, axis, keepdims, method=method)

    return g


def _np_median(a: Any, axis: Any = None, out: Any = None, overwrite_input: bool = False, keepdims: bool = False) -> Any:
    _no_out(out, "median")
    return median(a, axis, keepdims)


# ---------------------------------------------------------------- registration

UFUNCS.update({"fmod": fmod, "heaviside": heaviside, "reciprocal": reciprocal})

FUNCTIONS.update({
    np.fix: fix, np.sinc: sinc,
    np.prod: _np_prod, np.cumprod: cumprod, np.var: _np_var, np.std: _np_std,
    np.max: _np_extremum(_max, "max"), np.amax: _np_extremum(_max, "amax"),
    np.min: _np_extremum(_min, "min"), np.amin: _np_extremum(_min, "amin"),
    np.ptp: _np_reduce(ptp, "ptp"), np.argmax: _np_arg(argmax, "argmax"), np.argmin: _np_arg(argmin, "argmin"),
    np.any: _np_reduce(any, "any"), np.all: _np_reduce(all, "all"), np.nansum: _np_nansum,
    np.nanmean: _np_nanmean, np.average: average,
    np.sort: sort, np.argsort: argsort, np.take_along_axis: take_along_axis, np.searchsorted: searchsorted,
    np.quantile: _np_quantile(quantile, "quantile"), np.percentile: _np_quantile(percentile, "percentile"),
    np.median: _np_median,
    np.ravel: ravel, np.moveaxis: moveaxis, np.atleast_1d: atleast_1d, np.atleast_2d: atleast_2d,
    np.atleast_3d: atleast_3d, np.tile: tile, np.repeat: repeat, np.flip: flip, np.fliplr: fliplr,
    np.flipud: flipud, np.roll: roll, np.diff: diff, np.outer: outer, np.kron: kron, np.tril: tril, np.triu: triu,
    np.diagonal: diagonal, np.diag: diag, np.trace: trace, np.split: split, np.array_split: array_split,
    np.meshgrid: meshgrid, np.einsum: einsum,
    np.linalg.det: det, np.linalg.slogdet: slogdet, np.linalg.solve: solve, np.linalg.inv: inv,
    np.linalg.cholesky: cholesky, np.linalg.eigh: eigh, np.linalg.eigvalsh: eigvalsh, np.linalg.svd: svd,
    np.linalg.svdvals: svdvals, np.linalg.qr: qr, np.linalg.matrix_power: matrix_power, np.linalg.pinv: pinv,
    np.linalg.lstsq: lstsq, np.linalg.norm: linalg_norm,
})
FUNCTIONS.update({getattr(np.fft, name): _complex_result_function(name, instead) for name, instead in (
    ("fft", "fft_parts"), ("ifft", "ifft_parts"), ("rfft", "rfft_parts"), ("irfft", "irfft_parts"),
    ("fft2", "fft2_parts"), ("ifft2", "ifft2_parts"))})

__all__ = [
    "all", "any", "argmax", "argmin", "argsort", "array_split", "atleast_1d", "atleast_2d", "atleast_3d", "average",
    "cumprod", "diag", "diagonal", "diff", "einsum", "fix", "flip", "fliplr", "flipud", "fmod", "heaviside", "kron",
    "median", "meshgrid", "moveaxis", "nanmean", "nansum",
    "outer", "percentile", "prod", "ptp", "quantile", "ravel", "reciprocal", "repeat", "roll",
    "searchsorted", "sinc", "sort", "split", "std", "take_along_axis", "tile", "trace", "tril", "triu",
]
