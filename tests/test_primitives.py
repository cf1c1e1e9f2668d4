"""Every primitive, from one spec table: kernels against numpy (every dtype the op allows), VJP/JVP
against central finite differences and against PyTorch, stacked-seed Jacobians, second order
(HVP, Hessian, double backward), zero gradients of the non-differentiable ops inside
differentiable graphs, and a coverage check so that a new primitive without a spec fails."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from numeric import assert_close

from gradserve_engine.autodiff import vjp_graph, vjp_names
from gradserve_engine.engine import Engine
from gradserve_engine.errors import GraphError, ShapeError
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import KERNELS
from gradserve_engine.ops.core import DTYPES, PRIMITIVES, infer

ALL = ("bool", "int32", "int64", "float32", "float64")
NUM = ("int32", "int64", "float32", "float64")
FLT = ("float32", "float64")
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}

EPS = 1e-6  # central differences, float64 only
FD_RTOL, FD_ATOL = 1e-6, 1e-7
# (rtol, atol relative to max(1, |want|)) against numpy (kernels) and PyTorch (derivatives)
KERNEL_TOL = {"float32": (2e-6, 1e-6), "float64": (1e-12, 1e-13)}
TORCH_TOL = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12)}


# ---------------------------------------------------------------- the spec table


@dataclass(frozen=True, eq=False)
class Arg:
    kind: str  # "x": data operand of the case's dtype; "idx": fixed integer indices; "cond": random bool
    shape: tuple[int, ...] = ()
    domain: str = "real"  # where "x" values are drawn from (see `sample`)
    value: np.ndarray | None = None  # the indices of an "idx" operand


def X(shape: tuple[int, ...], domain: str = "real") -> Arg:
    return Arg("x", tuple(shape), domain)


def IDX(value: Any, dtype: str = "int64") -> Arg:
    a = np.asarray(value, dtype=dtype)
    return Arg("idx", a.shape, "", a)


def COND(shape: tuple[int, ...]) -> Arg:
    return Arg("cond", tuple(shape))


@dataclass(frozen=True, eq=False)
class Spec:
    name: str
    op: str
    args: tuple[Arg, ...]
    ref: Callable[..., Any]  # numpy expression over the operands (attributes closed over)
    torch: Callable[..., Any] | None  # the same in PyTorch, for the derivative checks
    dtypes: tuple[str, ...]  # every dtype the op allows for the "x" operands
    attrs: dict[str, Any] = field(default_factory=dict)
    grad: str = "smooth"  # "smooth": derivatives checked; "zero": gradient is zero (like PyTorch); "none": no float output
    out_dtype: str | None = None  # result dtype when it is not the operands' (comparisons, cast)
    fd: bool = True  # float64 finite differences apply (False: the result is float32)
    forward: bool = True  # False: forward mode is refused by design, with a clear error (custom_vjp, as JAX)
    reverse: bool = True  # False: reverse mode is refused by design, with a clear error (while, as JAX)

    def __repr__(self) -> str:
        return self.name


SPECS: list[Spec] = []


def spec(name: str, op: str, args: tuple[Arg, ...], ref: Callable[..., Any], tfn: Callable[..., Any] | None,
         dtypes: tuple[str, ...], **kw: Any) -> None:
    SPECS.append(Spec(name, op, tuple(args), ref, tfn, dtypes, **kw))


def sid(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


# ---- elementwise unary


def np_logistic(x):
    return 1 / (1 + np.exp(-x))


def torch_cbrt(x):  # PyTorch has no cbrt
    return torch.sign(x) * torch.abs(x) ** (1 / 3)


for _op, _np, _t, _dom in (
    ("exp", np.exp, torch.exp, "real"), ("log", np.log, torch.log, "pos"), ("log1p", np.log1p, torch.log1p, "gt-1"),
    ("expm1", np.expm1, torch.expm1, "real"), ("sin", np.sin, torch.sin, "real"), ("cos", np.cos, torch.cos, "real"),
    ("tan", np.tan, torch.tan, "tan"), ("tanh", np.tanh, torch.tanh, "real"),
    ("arctan", np.arctan, torch.atan, "real"),
    ("logistic", np_logistic, torch.sigmoid, "real"), ("sqrt", np.sqrt, torch.sqrt, "pos"),
    ("cbrt", np.cbrt, torch_cbrt, "nonzero"), ("exp2", np.exp2, torch.exp2, "real"),
    ("log2", np.log2, torch.log2, "pos"), ("log10", np.log10, torch.log10, "pos"),
    ("arcsin", np.arcsin, torch.asin, "unit"), ("arccos", np.arccos, torch.acos, "unit"),
    ("sinh", np.sinh, torch.sinh, "real"), ("cosh", np.cosh, torch.cosh, "real"),
    ("arcsinh", np.arcsinh, torch.asinh, "real"), ("arccosh", np.arccosh, torch.acosh, "gt1"),
    ("arctanh", np.arctanh, torch.atanh, "unit"),
):
    for _shape in ((2, 3), ()):
        spec(f"{_op}[{sid(_shape)}]", _op, (X(_shape, _dom),), _np, _t, FLT)

for _shape in ((2, 3), ()):
    spec(f"neg[{sid(_shape)}]", "neg", (X(_shape),), np.negative, torch.neg, NUM)
    spec(f"abs[{sid(_shape)}]", "abs", (X(_shape, "nonzero"),), np.abs, torch.abs, NUM)
    # sign/floor/ceil are piecewise constant: zero gradient, as in PyTorch
    spec(f"sign[{sid(_shape)}]", "sign", (X(_shape, "nonzero"),), np.sign, torch.sign, NUM, grad="zero")
    spec(f"floor[{sid(_shape)}]", "floor", (X(_shape, "frac"),), np.floor, torch.floor, FLT, grad="zero")
    spec(f"ceil[{sid(_shape)}]", "ceil", (X(_shape, "frac"),), np.ceil, torch.ceil, FLT, grad="zero")
    spec(f"trunc[{sid(_shape)}]", "trunc", (X(_shape, "frac"),), np.trunc, torch.trunc, FLT, grad="zero")
    # exact halves too: rint rounds them to even, as numpy's and torch.round
    spec(f"rint[{sid(_shape)}]", "rint", (X(_shape, "halves"),), np.rint, torch.round, FLT, grad="zero")
    for _op, _np in (("isnan", np.isnan), ("isinf", np.isinf), ("isfinite", np.isfinite), ("signbit", np.signbit)):
        spec(f"{_op}[{sid(_shape)}]", _op, (X(_shape, "special"),), _np, None, FLT, grad="none", out_dtype="bool")
    spec(f"stop_gradient[{sid(_shape)}]", "stop_gradient", (X(_shape),), np.copy, torch.detach, ALL, grad="zero")


def _np_cast(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.astype(dtype)


def _torch_cast(dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(TORCH_DTYPE[dtype])


for _to in ALL:
    spec(f"cast[->{_to}]", "cast", (X((2, 3), "real"),), _np_cast(_to), _torch_cast(_to) if _to in FLT else None, ALL,
         attrs={"dtype": _to}, out_dtype=_to, grad="smooth" if _to in FLT else "none", fd=_to == "float64")

# ---- broadcasting binary

BROADCASTS = {
    "same": ((2, 3), (2, 3)),
    "scalar-array": ((), (2, 3)),
    "array-scalar": ((2, 3), ()),
    "col-row": ((3, 1), (1, 4)),
    "rank": ((4,), (2, 3, 4)),
    "rank-rev": ((2, 3, 4), (4,)),
}

for _op, _np, _t, _dtypes, _dx, _dy in (
    ("add", np.add, torch.add, NUM, "real", "real"),
    ("sub", np.subtract, torch.sub, NUM, "real", "real"),
    ("mul", np.multiply, torch.mul, NUM, "real", "real"),
    ("div", np.divide, torch.div, FLT, "real", "nonzero"),
    ("pow", np.power, torch.pow, FLT, "pos", "real"),
    ("maximum", np.maximum, torch.maximum, NUM, "grid", "grid"),  # grids a half-step apart: no ties
    ("minimum", np.minimum, torch.minimum, NUM, "grid", "grid"),
    ("atan2", np.arctan2, torch.atan2, FLT, "real", "nonzero"),
    ("hypot", np.hypot, torch.hypot, FLT, "nonzero", "nonzero"),
    ("fmod", np.fmod, torch.fmod, FLT, "real", "nonzero"),
    ("logaddexp", np.logaddexp, torch.logaddexp, FLT, "real", "real"),
    ("logaddexp2", np.logaddexp2, torch.logaddexp2, FLT, "real", "real"),
    ("remainder", np.remainder, torch.remainder, NUM, "real", "nonzero"),
    ("mul_no_nan", lambda x, y: np.where(y == 0, 0, x * y).astype(x.dtype), lambda x, y: torch.where(y == 0, 0, x * y),
     FLT, "real", "real"),
):
    for _case, (_sx, _sy) in BROADCASTS.items():
        spec(f"{_op}[{_case}]", _op, (X(_sx, _dx), X(_sy, _dy)), _np, _t, _dtypes)

for _op, _np, _t in (("logaddexp", np.logaddexp, torch.logaddexp), ("logaddexp2", np.logaddexp2, torch.logaddexp2)):
    # integer values: ties, where the CUDA form takes its other branch and the derivative is 1/2
    spec(f"{_op}[ties]", _op, (X((2, 3), "small"), X((2, 3), "small")), _np, _t, FLT)
for _case in ("same", "scalar-array", "col-row", "rank"):  # piecewise constant: zero gradient (torch has none)
    _sx, _sy = BROADCASTS[_case]
    spec(f"floor_divide[{_case}]", "floor_divide", (X(_sx), X(_sy, "nonzero")), np.floor_divide,
         lambda x, y: torch.floor(x / y), NUM, grad="zero")

for _op, _np in (("lt", np.less), ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal),
                 ("eq", np.equal), ("ne", np.not_equal)):
    for _case in ("same", "scalar-array", "col-row", "rank"):
        _sx, _sy = BROADCASTS[_case]
        spec(f"{_op}[{_case}]", _op, (X(_sx, "small"), X(_sy, "small")), _np, None, ALL, grad="none", out_dtype="bool")

for _case, (_sc, _sx, _sy) in {"same": ((2, 3), (2, 3), (2, 3)), "broadcast": ((3, 1), (1, 4), ()),
                               "scalar-cond": ((), (2, 3), (2, 3))}.items():
    spec(f"select[{_case}]", "select", (COND(_sc), X(_sx), X(_sy)), np.where, torch.where, ALL)

# ---- reductions


def _np_reduce(op: str, axes: tuple[int, ...], keepdims: bool) -> Callable[[np.ndarray], np.ndarray]:
    if op == "reduce_sum":
        return lambda x: np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
    fn = np.max if op == "reduce_max" else np.min
    return lambda x: fn(x, axis=axes, keepdims=keepdims)


def _torch_reduce(op: str, axes: tuple[int, ...], keepdims: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = {"reduce_sum": torch.sum, "reduce_max": torch.amax, "reduce_min": torch.amin}[op]
    if not axes:  # torch reads dim=() as "every axis"; reducing over no axis is the identity
        return lambda x: x * 1
    return lambda x: fn(x, dim=axes, keepdim=keepdims)


REDUCTIONS = {
    "reduce_sum": [((2, 3, 4), (1,), False), ((2, 3, 4), (1,), True), ((2, 3, 4), (0, 2), False), ((2, 3, 4), (0, 2), True),
                   ((2, 3, 4), (0, 1, 2), False), ((2, 3, 4), (0, 1, 2), True), ((5,), (0,), False),
                   ((2, 3), (), False)],
    "reduce_max": [((2, 3, 4), (1,), False), ((2, 3, 4), (0, 2), True), ((2, 3, 4), (0, 1, 2), False), ((3, 4), (0, 1), True)],
    "reduce_min": [((2, 3, 4), (2,), True), ((2, 3, 4), (0, 2), False), ((2, 3, 4), (0, 1, 2), True), ((3, 4), (0, 1), False)],
}
for _op, _cases in REDUCTIONS.items():
    for _shape, _axes, _keep in _cases:
        spec(f"{_op}[{sid(_shape)},axes={_axes},keepdims={_keep}]", _op, (X(_shape, "grid" if _op != "reduce_sum" else "real"),),
             _np_reduce(_op, _axes, _keep), _torch_reduce(_op, _axes, _keep), NUM, attrs={"axes": _axes, "keepdims": _keep})


def _np_cumsum(axis: int, reverse: bool) -> Callable[[np.ndarray], np.ndarray]:
    if reverse:  # suffix sums: total - prefix + self (a different route from the kernel's flips)
        return lambda x: (np.sum(x, axis=axis, keepdims=True, dtype=x.dtype) - np.cumsum(x, axis=axis, dtype=x.dtype) + x
                          ).astype(x.dtype)
    return lambda x: np.cumsum(x, axis=axis, dtype=x.dtype)


def _torch_cumsum(axis: int, reverse: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if reverse:
        return lambda x: torch.flip(torch.cumsum(torch.flip(x, (axis,)), axis), (axis,))
    return lambda x: torch.cumsum(x, axis)


for _shape, _axis, _rev in (((3, 4), 0, False), ((3, 4), 1, True), ((3, 4), 0, True), ((5,), 0, False)):
    spec(f"cumsum[{sid(_shape)},axis={_axis},reverse={_rev}]", "cumsum", (X(_shape),), _np_cumsum(_axis, _rev),
         _torch_cumsum(_axis, _rev), NUM, attrs={"axis": _axis, "reverse": _rev})

# ---- linear algebra


def np_matmul(a, b):
    return np.einsum("...ij,...jk->...ik", a, b)


for _case, (_sa, _sb) in {"2d": ((3, 4), (4, 5)), "batched": ((2, 3, 4), (2, 4, 5)), "batch-vs-2d": ((2, 3, 4), (4, 5)),
                          "2d-vs-batch": ((3, 4), (2, 4, 5)), "broadcast-batch": ((1, 3, 4), (2, 4, 5))}.items():
    spec(f"matmul[{_case}]", "matmul", (X(_sa), X(_sb)), np_matmul, torch.matmul, NUM)


# decompositions: numpy's factors packed along axis -2 as the primitives pack them, with the
# primitives' sign convention for eigen- and singular vectors (each one's largest entry positive)


def _np_signed(v):
    idx = np.argmax(np.abs(v), axis=-2)[..., None, :]
    return np.sign(np.take_along_axis(v, idx, axis=-2))


def _torch_signed(v):  # the signs are locally constant: no derivative through them
    idx = torch.argmax(v.detach().abs(), dim=-2, keepdim=True)
    return torch.sign(torch.take_along_dim(v.detach(), idx, dim=-2))


def _np_sym(a):
    return (a + np.swapaxes(a, -1, -2)) * a.dtype.type(0.5)


def _torch_sym(a):
    return (a + a.mT) * 0.5


def np_eigh(a):
    w, v = np.linalg.eigh(_np_sym(a))
    return np.concatenate([w[..., None, :], v * _np_signed(v)], axis=-2)


def torch_eigh(a):
    w, v = torch.linalg.eigh(_torch_sym(a))
    return torch.cat([w[..., None, :], v * _torch_signed(v)], dim=-2)


def np_svd(a):
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    sg = _np_signed(u)
    return np.concatenate([u * sg, s[..., None, :], np.swapaxes(vh, -1, -2) * sg], axis=-2)


def torch_svd(a):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    sg = _torch_signed(u)
    return torch.cat([u * sg, s[..., None, :], vh.mT * sg], dim=-2)


def np_qr(a):
    return np.concatenate(np.linalg.qr(a), axis=-2)


def torch_qr(a):
    return torch.cat(torch.linalg.qr(a), dim=-2)


def np_slogdet(a):
    return np.stack(np.linalg.slogdet(a), axis=-1)


def torch_slogdet(a):
    return torch.stack(torch.linalg.slogdet(a), dim=-1)


def np_cholesky(a):
    return np.linalg.cholesky(_np_sym(a))


def torch_cholesky(a):
    return torch.linalg.cholesky(_torch_sym(a))


for _case, (_sa, _sb) in {"2d": ((3, 3), (3, 2)), "batched": ((2, 3, 3), (2, 3, 2)),
                          "broadcast": ((3, 3), (2, 3, 1))}.items():
    spec(f"solve[{_case}]", "solve", (X(_sa, "invertible"), X(_sb)), np.linalg.solve, torch.linalg.solve, FLT)
for _shape in ((3, 3), (2, 3, 3)):
    spec(f"cholesky[{sid(_shape)}]", "cholesky", (X(_shape, "spd"),), np_cholesky, torch_cholesky, FLT)
    spec(f"det[{sid(_shape)}]", "det", (X(_shape, "invertible"),), np.linalg.det, torch.linalg.det, FLT)
    spec(f"slogdet[{sid(_shape)}]", "slogdet", (X(_shape, "invertible"),), np_slogdet, torch_slogdet, FLT)
    spec(f"eigh[{sid(_shape)}]", "eigh", (X(_shape),), np_eigh, torch_eigh, FLT)
for _shape in ((3, 3), (4, 3), (3, 4), (2, 4, 3)):
    spec(f"svd[{sid(_shape)}]", "svd", (X(_shape, "distinct-sv"),), np_svd, torch_svd, FLT)
for _shape in ((3, 3), (4, 3), (2, 4, 2)):
    spec(f"qr[{sid(_shape)}]", "qr", (X(_shape, "invertible"),), np_qr, torch_qr, FLT)

# ---- shape ops


def _reshaper(shape: tuple[int, ...]) -> Callable[[Any], Any]:
    return lambda x: x.reshape(shape)


for _src, _dst in (((2, 3, 4), (4, 6)), ((6,), (2, 1, 3)), ((), (1, 1)), ((2, 3), (6,))):
    spec(f"reshape[{sid(_src)}->{sid(_dst)}]", "reshape", (X(_src),), _reshaper(_dst), _reshaper(_dst), ALL,
         attrs={"shape": _dst})


def _permuter(perm: tuple[int, ...], np_side: bool) -> Callable[[Any], Any]:
    return (lambda x: np.transpose(x, perm)) if np_side else (lambda x: x.permute(perm))


for _shape, _perm in (((2, 3), (1, 0)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (0, 2, 1))):
    spec(f"transpose[{sid(_shape)},perm={_perm}]", "transpose", (X(_shape),), _permuter(_perm, True), _permuter(_perm, False),
         ALL, attrs={"perm": _perm})


def _np_broadcast(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.array(np.broadcast_to(x, shape))


def _torch_broadcast(shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.broadcast_to(x, shape)


for _src, _dst in (((3, 1), (2, 3, 4)), ((), (2, 3)), ((4,), (2, 3, 4)), ((2, 1, 4), (2, 3, 4))):
    spec(f"broadcast_to[{sid(_src)}->{sid(_dst)}]", "broadcast_to", (X(_src),), _np_broadcast(_dst), _torch_broadcast(_dst),
         ALL, attrs={"shape": _dst})

# expand_dims: axes are positions in the output; squeeze: positions in the input (both checked via the literal result shape)
for _src, _axes, _dst in (((2, 3), (0,), (1, 2, 3)), ((2, 3), (1, 3), (2, 1, 3, 1)), ((), (0, 1), (1, 1))):
    spec(f"expand_dims[{sid(_src)},axes={_axes}]", "expand_dims", (X(_src),), _reshaper(_dst), _reshaper(_dst), ALL,
         attrs={"axes": _axes})
for _src, _axes, _dst in (((2, 1, 3, 1), (1, 3), (2, 3)), ((1, 3), (0,), (3,)), ((1, 1), (0, 1), ())):
    spec(f"squeeze[{sid(_src)},axes={_axes}]", "squeeze", (X(_src),), _reshaper(_dst), _reshaper(_dst), ALL,
         attrs={"axes": _axes})


def _np_slice(starts, stops, steps):
    return lambda x: x[np.ix_(*(np.arange(a, b, s) for a, b, s in zip(starts, stops, steps, strict=True)))]


def _torch_slice(starts, stops, steps):
    return lambda x: x[tuple(slice(a, b, s) for a, b, s in zip(starts, stops, steps, strict=True))]


for _shape, _starts, _stops, _steps in (
    ((5, 6), (1, 0), (5, 6), (2, 3)),
    ((4, 5, 6), (0, 1, 2), (4, 5, 6), (1, 2, 3)),
    ((7,), (1,), (7,), (4,)),  # stop - start not a multiple of the step
    ((4, 3), (2, 0), (2, 3), (1, 1)),  # empty result
    ((3, 4), (0, 1), (3, 3), (1, 1)),
):
    spec(f"slice[{sid(_shape)},{_starts}:{_stops}:{_steps}]", "slice", (X(_shape),), _np_slice(_starts, _stops, _steps),
         _torch_slice(_starts, _stops, _steps), ALL, attrs={"starts": _starts, "stops": _stops, "steps": _steps})


def _pad_positions(shape, lo, interior):
    return [l + np.arange(d) * (i + 1) for d, l, i in zip(shape, lo, interior, strict=True)]


def _pad_shape(shape, lo, hi, interior):
    return tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(shape, lo, hi, interior, strict=True))


def _np_pad(lo, hi, interior, value):
    def f(x):
        out = np.full(_pad_shape(x.shape, lo, hi, interior), value, dtype=x.dtype)
        out[np.ix_(*_pad_positions(x.shape, lo, interior))] = x
        return out

    return f


def _torch_pad(lo, hi, interior, value):
    def f(x):
        out = torch.full(_pad_shape(tuple(x.shape), lo, hi, interior), value, dtype=x.dtype)
        idx = tuple(torch.from_numpy(i) for i in np.ix_(*_pad_positions(tuple(x.shape), lo, interior)))
        return out.index_put(idx, x)

    return f


for _shape, _lo, _hi, _int, _val in (
    ((2, 3), (1, 0), (0, 2), (1, 2), 0.0),
    ((3,), (2,), (1,), (0,), 2.0),
    ((2, 1, 3), (0, 1, 0), (1, 0, 2), (2, 3, 1), -1.0),
    ((0, 3), (1, 0), (1, 0), (2, 1), 0.0),  # empty operand
):
    spec(f"pad[{sid(_shape)},lo={_lo},hi={_hi},interior={_int},value={_val}]", "pad", (X(_shape),),
         _np_pad(_lo, _hi, _int, _val), _torch_pad(_lo, _hi, _int, _val), ALL,
         attrs={"lo": _lo, "hi": _hi, "interior": _int, "value": _val})


def _np_concat(axis):
    return lambda *xs: np.concatenate(xs, axis=axis)


def _torch_concat(axis):
    return lambda *xs: torch.cat(xs, dim=axis)


for _shapes, _axis in ((((2, 3), (1, 3), (4, 3)), 0), (((2, 1), (2, 3), (2, 2)), 1), (((2, 2, 1), (2, 2, 0), (2, 2, 2)), 2),
                       (((2, 3),), 1)):
    spec(f"concatenate[{'+'.join(map(sid, _shapes))},axis={_axis}]", "concatenate", tuple(X(s) for s in _shapes),
         _np_concat(_axis), _torch_concat(_axis), ALL, attrs={"axis": _axis})


def _np_take(axis):
    return lambda x, idx: x[(slice(None),) * axis + (idx,)]


def _torch_take(axis):
    return lambda x, idx: x[(slice(None),) * axis + (idx.long(),)]


for _shape, _idx, _idt, _axis in (
    ((4, 3), [[0, 2], [2, 3], [0, 0]], "int64", 0),  # 2-D index array, repeated indices
    ((2, 4, 3), [1, 1, 0, 3], "int64", 1),
    ((3, 4), 2, "int32", 1),  # 0-d index: the axis goes away
    ((2, 5), [[4, 4], [0, 1]], "int32", 1),
):
    _ix = IDX(_idx, _idt)
    spec(f"take[{sid(_shape)},idx={sid(_ix.shape)}:{_idt},axis={_axis}]", "take", (X(_shape), _ix), _np_take(_axis),
         _torch_take(_axis), ALL, attrs={"axis": _axis})


def _scatter_index(xshape, idx, axis):
    """Full index arrays, one per axis of x, shaped as the updates (for loops and index_put)."""
    ushape = (*xshape[:axis], *idx.shape, *xshape[axis + 1:])
    grids = np.indices(ushape)
    k = idx.ndim
    parts = [grids[i] for i in range(axis)]
    parts.append(np.broadcast_to(idx.reshape((1,) * axis + idx.shape + (1,) * (len(xshape) - axis - 1)), ushape))
    parts += [grids[axis + k + j] for j in range(len(xshape) - axis - 1)]
    return tuple(parts)


def _np_scatter_add(axis):
    def f(x, idx, upd):
        out = x.copy()
        where = _scatter_index(x.shape, idx, axis)
        for pos in np.ndindex(upd.shape):  # one update at a time: repeated indices accumulate
            at = tuple(int(w[pos]) for w in where)
            out[at] = out[at] + upd[pos]
        return out

    return f


def _torch_scatter_add(axis, idx_value):
    def f(x, idx, upd):  # the indices are the spec's constant (no .numpy() on a tensor inside torch.func.jvp)
        where = tuple(torch.tensor(np.array(w, dtype=np.int64)) for w in _scatter_index(tuple(x.shape), idx_value, axis))
        return x.index_put(where, upd, accumulate=True)

    return f


for _shape, _idx, _idt, _axis in (
    ((5, 3), [0, 2, 0, 4, 2], "int64", 0),  # repeated indices
    ((2, 4), [[1, 1], [3, 0]], "int64", 1),  # 2-D index array, repeated
    ((3,), 1, "int32", 0),  # 0-d index
):
    _ix = IDX(_idx, _idt)
    _ushape = (*_shape[:_axis], *_ix.shape, *_shape[_axis + 1:])
    spec(f"scatter_add[{sid(_shape)},idx={sid(_ix.shape)}:{_idt},axis={_axis}]", "scatter_add", (X(_shape), _ix, X(_ushape)),
         _np_scatter_add(_axis), _torch_scatter_add(_axis, _ix.value), ALL, attrs={"axis": _axis})

# ---- the ops that compute indices


def _np_argsort(axis):
    return lambda x: np.argsort(x, axis=axis, kind="stable")


for _shape, _axis, _dom in (((2, 5), 1, "small"), ((4, 3), 0, "grid"), ((6,), 0, "small")):  # "small": ties stay in order
    spec(f"argsort[{sid(_shape)},axis={_axis},{_dom}]", "argsort", (X(_shape, _dom),), _np_argsort(_axis), None, ALL,
         attrs={"axis": _axis}, grad="none", out_dtype="int64")


def _np_searchsorted(right):
    return lambda a, v: np.searchsorted(a, v, side="right" if right else "left")


for _right in (False, True):
    spec(f"searchsorted[right={_right}]", "searchsorted", (X((5,), "sorted"), X((2, 3), "small")),
         _np_searchsorted(_right), None, ALL, attrs={"right": _right}, grad="none", out_dtype="int64")

# ---- higher-order ops: subgraphs as attributes (typed, so one spec per float dtype)


def _sub(dtype: str, shapes: tuple[tuple[int, ...], ...], fn: Callable[..., list[Any]]) -> Graph:
    b = Builder()
    xs = [b.input(f"%arg{k}", dtype, shape) for k, shape in enumerate(shapes)]
    return b.build([(f"%out{k}", v) for k, v in enumerate(fn(b, *xs))])


def _branches(dtype: str) -> tuple[Graph, Graph]:
    shapes = ((2, 3), (3,))
    return (_sub(dtype, shapes, lambda b, x, y: [b.bind("mul", b.bind("sin", x), y), b.bind("mul", y, y)]),
            _sub(dtype, shapes, lambda b, x, y: [b.bind("add", b.bind("mul", x, x), y), b.bind("exp", y)]))


def _np_switch(i, x, y):
    k = min(max(int(i), 0), 1)
    outs = [np.sin(x) * y, y * y] if k == 0 else [x * x + y, np.exp(y)]
    return np.concatenate([o.ravel() for o in outs])


def _torch_switch(index):
    k = min(max(index, 0), 1)

    def f(i, x, y):
        outs = [torch.sin(x) * y, y * y] if k == 0 else [x * x + y, torch.exp(y)]
        return torch.cat([o.reshape(-1) for o in outs])

    return f


for _dt in FLT:
    for _i in (1, -3):  # -3: clipped to branch 0, as jax.lax.switch
        spec(f"switch[index={_i},{_dt}]", "switch", (IDX(_i, "int32"), X((2, 3)), X((3,))), _np_switch, _torch_switch(_i),
             (_dt,), attrs={"branches": _branches(_dt), "select": (0, 1)})


def _body(dtype: str) -> Graph:
    """(c, x, k) -> (tanh(c * k + x), c * x)"""
    return _sub(dtype, ((3,), (3,), (3,)),
                lambda b, c, x, k: [b.bind("tanh", b.bind("add", b.bind("mul", c, k), x)), b.bind("mul", c, x)])


def _scan_ref(lib, reverse):
    tanh, cat, stack = (np.tanh, np.concatenate, np.stack) if lib is np else (torch.tanh, torch.cat, torch.stack)

    def f(c, xs, k):
        ys = [None] * xs.shape[0]
        for t in reversed(range(xs.shape[0])) if reverse else range(xs.shape[0]):
            c, ys[t] = tanh(c * k + xs[t]), c * xs[t]
        return cat([c.reshape(-1), stack(ys).reshape(-1)])

    return f


for _dt in FLT:
    for _rev in (False, True):
        spec(f"scan[reverse={_rev},{_dt}]", "scan", (X((3,)), X((4, 3)), X((3,))), _scan_ref(np, _rev),
             _scan_ref(torch, _rev), (_dt,), attrs={"body": (_body(_dt),), "n_carry": 1, "n_xs": 1, "length": 4,
                                                     "reverse": _rev, "select": (0, 1)})


def _custom_rule(dtype: str) -> dict[str, Any]:
    """x * sin(y), its derivative given as a rule: fwd keeps sin(y) and x cos(y)."""
    shapes = ((2, 3), (2, 3))
    return {"fun": (_sub(dtype, shapes, lambda b, x, y: [b.bind("mul", x, b.bind("sin", y))]),),
            "fwd": (_sub(dtype, shapes, lambda b, x, y: [b.bind("mul", x, b.bind("sin", y)), b.bind("sin", y),
                                                         b.bind("mul", x, b.bind("cos", y))]),),
            "bwd": (_sub(dtype, ((2, 3),) * 3, lambda b, s, xc, g: [b.bind("mul", g, s), b.bind("mul", g, xc)]),),
            "select": (0,)}


for _dt in FLT:
    spec(f"custom_vjp[{_dt}]", "custom_vjp", (X((2, 3)), X((2, 3))), lambda x, y: (x * np.sin(y)).ravel(),
         lambda x, y: (x * torch.sin(y)).reshape(-1), (_dt,), attrs=_custom_rule(_dt), forward=False)



def _custom_jvp_rule(dtype: str) -> dict[str, Any]:
    """x * sin(y), its JVP given as a rule: tx sin(y) + ty x cos(y)."""
    def jvp(b, x, y, tx, ty):
        return [b.bind("mul", x, b.bind("sin", y)),
                b.bind("add", b.bind("mul", tx, b.bind("sin", y)), b.bind("mul", ty, b.bind("mul", x, b.bind("cos", y))))]

    return {"fun": (_sub(dtype, ((2, 3), (2, 3)), lambda b, x, y: [b.bind("mul", x, b.bind("sin", y))]),),
            "jvp": (_sub(dtype, ((2, 3),) * 4, jvp),), "select": (0,)}


for _dt in FLT:
    spec(f"custom_jvp[{_dt}]", "custom_jvp", (X((2, 3)), X((2, 3))), lambda x, y: (x * np.sin(y)).ravel(),
         lambda x, y: (x * torch.sin(y)).reshape(-1), (_dt,), attrs=_custom_jvp_rule(_dt))


def _while_graphs(dtype: str) -> dict[str, Any]:
    """while i < 4: (i, c) <- (i + 1, tanh(c * k) + c), over (i, c, k)."""
    def graph(fn: Callable[..., list[Any]]) -> Graph:
        b = Builder()
        i, c, k = b.input("%i", "int32", ()), b.input("%c", dtype, (3,)), b.input("%k", dtype, (3,))
        return b.build([(f"%out{j}", v) for j, v in enumerate(fn(b, i, c, k))])

    return {"cond": (graph(lambda b, i, c, k: [b.bind("lt", i, b.const(np.int32(4)))]),),
            "body": (graph(lambda b, i, c, k: [b.bind("add", i, b.const(np.int32(1))),
                                                b.bind("add", b.bind("tanh", b.bind("mul", c, k)), c)]),),
            "n_carry": 2, "select": (1,)}


def _while_ref(lib):
    def f(i, c, k):
        for _ in range(int(i), 4):
            c = lib.tanh(c * k) + c
        return c

    return f


for _dt in FLT:
    spec(f"while[{_dt}]", "while", (IDX(0, "int32"), X((3,)), X((3,))), _while_ref(np), _while_ref(torch), (_dt,),
         attrs=_while_graphs(_dt), reverse=False)

SPEC_BY_NAME = {s.name: s for s in SPECS}
assert len(SPEC_BY_NAME) == len(SPECS), "duplicate spec names"


# ---------------------------------------------------------------- helpers


def out_dtype(s: Spec, dtype: str) -> str:
    return s.out_dtype or dtype


def is_diff(s: Spec, dtype: str) -> bool:
    return s.grad != "none" and dtype in FLT and out_dtype(s, dtype) in FLT


def arg_dtype(a: Arg, dtype: str) -> str:
    return {"x": dtype, "cond": "bool"}.get(a.kind) or a.value.dtype.name


def diff_positions(s: Spec, dtype: str) -> list[int]:
    return [k for k, a in enumerate(s.args) if a.kind == "x"] if is_diff(s, dtype) else []


def build(s: Spec, dtype: str, scalar: np.ndarray | None = None) -> Graph:
    """The one-node graph `out = op(a0, a1, ...)`; with `scalar` (a weight array), the scalar
    graph `s = sum(scalar * out * out)` instead, for second-order checks."""
    b = Builder()
    xs = [b.input(f"a{k}", arg_dtype(a, dtype), a.shape) for k, a in enumerate(s.args)]
    y = b.bind(s.op, *xs, **s.attrs)
    if scalar is None:
        return b.build([("out", y)])
    z = b.bind("mul", b.bind("mul", y, y), b.const(scalar))
    return b.build([("s", b.bind("reduce_sum", z, axes=tuple(range(len(y.shape))), keepdims=False))])


def rng_for(*key: Any) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def sample(rng: np.random.Generator, a: Arg, dtype: str, k: int) -> np.ndarray:
    if a.kind == "idx":
        return a.value.copy()
    if a.domain == "sorted":  # searchsorted's table: "small" values (ties with the looked-up ones), sorted
        return np.sort(sample(rng, Arg(a.kind, a.shape, "small"), dtype, k), axis=-1)
    shape = a.shape
    if a.kind == "cond" or dtype == "bool":
        return rng.random(shape) < 0.5
    n, d = math.prod(shape), a.domain
    if dtype in ("int32", "int64"):
        if d == "pos":
            v = rng.integers(1, 5, shape)
        elif d == "nonzero":
            v = rng.integers(1, 5, shape) * rng.choice([-1, 1], shape)
        elif d == "grid":
            v = rng.permutation(n).reshape(shape) - n // 2
        elif d == "small":
            v = rng.integers(-2, 3, shape)
        else:
            v = rng.integers(-4, 5, shape)
        return np.asarray(v, dtype=dtype)
    if d == "pos":
        v = rng.uniform(0.5, 2.0, shape)
    elif d == "invertible":  # well-conditioned matrices, rows of either sign (negative determinants too)
        n = shape[-1]
        v = rng.uniform(-0.5, 0.5, shape) + np.eye(*shape[-2:]) * n
        v = v * rng.choice([-1.0, 1.0], (*shape[:-1], 1))
    elif d == "spd":  # symmetric positive definite
        m = rng.uniform(-1.0, 1.0, shape)
        v = m @ np.swapaxes(m, -1, -2) + np.eye(shape[-1])
    elif d == "distinct-sv":  # singular values well apart: 1, 2, 3, ... under random rotations
        m, n = shape[-2:]
        k = min(m, n)
        q1 = np.linalg.qr(rng.standard_normal((*shape[:-2], m, m)))[0][..., :k]
        q2 = np.linalg.qr(rng.standard_normal((*shape[:-2], n, n)))[0][..., :k]
        v = (q1 * np.arange(1.0, k + 1)) @ np.swapaxes(q2, -1, -2)
    elif d == "gt-1":
        v = rng.uniform(-0.5, 1.5, shape)
    elif d == "tan":
        v = rng.uniform(-1.2, 1.2, shape)
    elif d == "unit":  # arcsin, arccos, arctanh: inside (-1, 1), away from the poles
        v = rng.uniform(-0.9, 0.9, shape)
    elif d == "gt1":  # arccosh: above 1
        v = rng.uniform(1.2, 3.0, shape)
    elif d == "halves":  # integers and exact halves: rounding ties
        v = rng.integers(-6, 7, shape) * 0.5
    elif d == "special":  # the predicates: nan, both infinities, both zeros, finite values
        v = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -2.0, 1e-310]), shape)
    elif d == "nonzero":  # abs, sign: away from the kink; div, atan2: away from the pole
        v = rng.uniform(0.3, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    elif d == "grid":  # distinct values on a 0.1 grid, shifted by 0.05 per operand: no ties anywhere
        v = (rng.permutation(n).reshape(shape) - n // 2) * 0.1 + 0.05 * k
    elif d == "frac":  # away from integers: floor/ceil are locally constant
        v = rng.integers(-3, 3, shape) + rng.uniform(0.1, 0.9, shape)
    elif d == "small":  # integer values: ties for the comparisons
        v = rng.integers(-2, 3, shape)
    else:
        v = rng.uniform(-1.5, 1.5, shape)
    return np.asarray(v, dtype=dtype)


def make_inputs(s: Spec, dtype: str) -> dict[str, np.ndarray]:
    rng = rng_for(s.name, dtype)
    return {f"a{k}": sample(rng, a, dtype, k) for k, a in enumerate(s.args)}


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def kernel(s: Spec) -> Callable[[list[np.ndarray]], np.ndarray]:
    def f(arrays: list[np.ndarray]) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(KERNELS[s.op](*arrays, **s.attrs))

    return f


def assert_fd(got: Any, want: Any, what: str) -> None:
    assert_close(got, want, "float64", {"float64": (FD_RTOL, FD_ATOL)}, what)


def fd_jacobian(f: Callable[[list[np.ndarray]], np.ndarray], arrays: list[np.ndarray], p: int) -> np.ndarray:
    """d f / d arrays[p] by central differences, shaped f.shape + arrays[p].shape."""
    x = arrays[p]
    out_shape = f(arrays).shape
    cols = []
    for i in range(x.size):
        plus, minus = x.copy(), x.copy()
        plus.flat[i] += EPS
        minus.flat[i] -= EPS
        hi = f([*arrays[:p], plus, *arrays[p + 1:]])
        lo = f([*arrays[:p], minus, *arrays[p + 1:]])
        cols.append((hi - lo) / (2 * EPS))
    jac = np.stack(cols, axis=-1) if cols else np.zeros((*out_shape, 0))
    return jac.reshape(out_shape + x.shape)


def fd_directional(f: Callable[[list[np.ndarray]], Any], arrays: list[np.ndarray], tangents: dict[int, np.ndarray]) -> Any:
    plus = [a + EPS * tangents[k] if k in tangents else a for k, a in enumerate(arrays)]
    minus = [a - EPS * tangents[k] if k in tangents else a for k, a in enumerate(arrays)]
    hi, lo = f(plus), f(minus)
    if isinstance(hi, dict):
        return {key: (hi[key] - lo[key]) / (2 * EPS) for key in hi}
    return (hi - lo) / (2 * EPS)


def subsets(positions: list[int]) -> list[list[int]]:
    """All differentiable operands together, and each one alone (exercises the rules' `need`)."""
    return [positions] + ([[p] for p in positions] if len(positions) > 1 else [])


def to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a))


def torch_vjp(s: Spec, arrays: list[np.ndarray], diff: list[int], ct: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    ts = [to_torch(a) for a in arrays]
    for p in diff:
        ts[p].requires_grad_(True)
    out = s.torch(*ts)
    if not out.requires_grad:  # detached: no path back, zero gradient
        return out.detach().numpy(), [np.zeros_like(arrays[p]) for p in diff]
    grads = torch.autograd.grad(out, [ts[p] for p in diff], to_torch(ct), allow_unused=True, materialize_grads=True)
    return out.detach().numpy(), [g.numpy() for g in grads]


def torch_jvp(s: Spec, arrays: list[np.ndarray], tangents: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    base = [to_torch(a) for a in arrays]
    keys = sorted(tangents)

    def f(*d: torch.Tensor) -> torch.Tensor:
        args = list(base)
        for p, t in zip(keys, d, strict=True):
            args[p] = t
        return s.torch(*args)

    out, tan = torch.func.jvp(f, tuple(base[p] for p in keys), tuple(to_torch(tangents[p]) for p in keys))
    return out.numpy(), tan.numpy()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def case_id(case: tuple[Spec, str]) -> str:
    return f"{case[0].name}-{case[1]}"


KERNEL_CASES = [(s, dt) for s in SPECS for dt in s.dtypes]
TORCH_CASES = [(s, dt) for s in SPECS for dt in FLT if dt in s.dtypes and is_diff(s, dt)]
FD_SPECS = [s for s in SPECS if "float64" in s.dtypes and is_diff(s, "float64") and s.fd]


def fd_ids(s: Spec) -> str:
    return s.name


# ---------------------------------------------------------------- 1. kernels against numpy, declared types


@pytest.mark.parametrize(("s", "dtype"), KERNEL_CASES, ids=list(map(case_id, KERNEL_CASES)))
def test_kernel_matches_numpy(engine: Engine, s: Spec, dtype: str) -> None:
    graph = build(s, dtype)
    inputs = make_inputs(s, dtype)
    arrays = list(inputs.values())
    before = [a.copy() for a in arrays]
    want = np.asarray(s.ref(*arrays))
    odt = out_dtype(s, dtype)
    assert want.dtype == np.dtype(odt), f"the numpy reference itself gives {want.dtype}"
    node = graph.nodes[-1]
    assert (node.dtype, node.shape) == (odt, want.shape), "declared type disagrees with numpy"
    results = {"kernel": kernel(s)(arrays), "engine": engine.evaluate(graph, inputs)["out"]}
    for where, got in results.items():
        got = np.asarray(got)
        assert got.dtype == np.dtype(odt), f"{where}: dtype {got.dtype}, declared {odt}"
        assert got.shape == want.shape, f"{where}: shape {got.shape}, declared {want.shape}"
        if odt in FLT:
            assert_close(got, want, odt, KERNEL_TOL, where)
        else:
            np.testing.assert_array_equal(got, want, err_msg=where)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b, err_msg="the kernel wrote into an operand")


def test_rules_accept_exactly_the_tabled_dtypes() -> None:
    """Each spec's dtype list is what the primitive's type rule accepts for those operands."""
    wrong = {}
    for s in SPECS:
        accepted = []
        for dt in DTYPES:
            try:
                infer(s.op, [(arg_dtype(a, dt), a.shape) for a in s.args], s.attrs)
            except ShapeError:
                continue
            accepted.append(dt)
        if tuple(accepted) != tuple(d for d in DTYPES if d in s.dtypes):
            wrong[s.name] = (accepted, s.dtypes)
    assert not wrong


# ---------------------------------------------------------------- 2. float64: VJP and JVP against central differences


@pytest.mark.parametrize("s", FD_SPECS, ids=fd_ids)
def test_vjp_matches_finite_differences(engine: Engine, s: Spec) -> None:
    graph = build(s, "float64")
    inputs = make_inputs(s, "float64")
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, "float64"))
        return
    f = kernel(s)
    rng = rng_for(s.name, "ct")
    ct = randn(rng, graph.nodes[-1].shape, "float64")
    jacs = {p: fd_jacobian(f, arrays, p) for p in diff_positions(s, "float64")}
    for wrt in subsets(diff_positions(s, "float64")):
        outs, grads = engine.vjp(graph, inputs, [f"a{p}" for p in wrt], seeds={"out": ct})
        np.testing.assert_allclose(outs["out"], f(arrays), rtol=1e-12)
        for p in wrt:
            want = (np.zeros_like(arrays[p]) if s.grad == "zero"
                    else np.tensordot(ct, jacs[p], axes=ct.ndim).reshape(arrays[p].shape))
            assert_fd(grads[f"a{p}"], want, f"grad a{p} (wrt {wrt})")


@pytest.mark.parametrize("s", FD_SPECS, ids=fd_ids)
def test_jvp_matches_finite_differences(engine: Engine, s: Spec) -> None:
    graph = build(s, "float64")
    inputs = make_inputs(s, "float64")
    arrays = list(inputs.values())
    if not s.forward:
        assert_forward_refused(engine, graph, inputs, diff_positions(s, "float64"))
        return
    rng = rng_for(s.name, "tangent")
    for wrt in subsets(diff_positions(s, "float64")):
        tangents = {p: randn(rng, arrays[p].shape, "float64") for p in wrt}
        _, tans = engine.jvp(graph, inputs, {f"a{p}": t for p, t in tangents.items()})
        want = fd_directional(kernel(s), arrays, tangents)
        if s.grad == "zero":
            want = np.zeros_like(want)
        assert_fd(tans["out"], want, f"tangent (along {wrt})")


@pytest.mark.parametrize("s", FD_SPECS, ids=fd_ids)
def test_jacobian_with_stacked_seeds_matches_finite_differences(engine: Engine, s: Spec) -> None:
    """eng.jacobian runs every VJP rule with a leading batch of seeds (nb=1)."""
    graph = build(s, "float64")
    inputs = make_inputs(s, "float64")
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, "float64"))
        return
    wrt = diff_positions(s, "float64")
    jac = engine.jacobian(graph, inputs, [f"a{p}" for p in wrt])
    for p in wrt:
        want = fd_jacobian(kernel(s), arrays, p)
        assert_fd(jac[("out", f"a{p}")], np.zeros_like(want) if s.grad == "zero" else want, f"jacobian wrt a{p}")


def assert_reverse_refused(engine: Engine, graph: Graph, inputs: dict[str, np.ndarray], wrt: list[int]) -> None:
    with pytest.raises(GraphError, match="reverse-mode differentiation does not work"):
        engine.vjp(graph, inputs, [f"a{p}" for p in wrt], seeds={graph.output_names()[0]: np.ones(graph.nodes[-1].shape)})


def assert_forward_refused(engine: Engine, graph: Graph, inputs: dict[str, np.ndarray], wrt: list[int]) -> None:
    with pytest.raises(GraphError, match="forward mode"):
        engine.jvp(graph, inputs, {f"a{p}": inputs[f"a{p}"] for p in wrt})


# ---------------------------------------------------------------- 3. float32 and float64: against PyTorch


@pytest.mark.parametrize(("s", "dtype"), TORCH_CASES, ids=list(map(case_id, TORCH_CASES)))
def test_vjp_matches_torch(engine: Engine, s: Spec, dtype: str) -> None:
    graph = build(s, dtype)
    inputs = make_inputs(s, dtype)
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, dtype))
        return
    ct = randn(rng_for(s.name, dtype, "ct"), graph.nodes[-1].shape, out_dtype(s, dtype))
    for wrt in subsets(diff_positions(s, dtype)):
        outs, grads = engine.vjp(graph, inputs, [f"a{p}" for p in wrt], seeds={"out": ct})
        t_out, t_grads = torch_vjp(s, arrays, wrt, ct)
        assert_close(outs["out"], t_out, out_dtype(s, dtype), TORCH_TOL, "output")
        for p, want in zip(wrt, t_grads, strict=True):
            assert_close(grads[f"a{p}"], want, dtype, TORCH_TOL, f"grad a{p} (wrt {wrt})")


@pytest.mark.parametrize(("s", "dtype"), TORCH_CASES, ids=list(map(case_id, TORCH_CASES)))
def test_jvp_matches_torch(engine: Engine, s: Spec, dtype: str) -> None:
    graph = build(s, dtype)
    inputs = make_inputs(s, dtype)
    arrays = list(inputs.values())
    if not s.forward:
        assert_forward_refused(engine, graph, inputs, diff_positions(s, dtype))
        return
    rng = rng_for(s.name, dtype, "tangent")
    for wrt in subsets(diff_positions(s, dtype)):
        tangents = {p: randn(rng, arrays[p].shape, dtype) for p in wrt}
        _, tans = engine.jvp(graph, inputs, {f"a{p}": t for p, t in tangents.items()})
        _, want = torch_jvp(s, arrays, tangents)
        assert_close(tans["out"], want, out_dtype(s, dtype), TORCH_TOL, f"tangent (along {wrt})")


# ---------------------------------------------------------------- 4. second order


def weights(s: Spec, dtype: str) -> np.ndarray:
    graph = build(s, dtype)
    return randn(rng_for(s.name, dtype, "w"), graph.nodes[-1].shape, out_dtype(s, dtype))


def scalar_grad(engine: Engine, graph: Graph, names: list[str]) -> Callable[[list[np.ndarray]], dict[str, np.ndarray]]:
    def g(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        return engine.vjp(graph, {f"a{k}": a for k, a in enumerate(arrays)}, names)[1]

    return g


@pytest.mark.parametrize("s", FD_SPECS, ids=fd_ids)
def test_hvp_matches_finite_differences_of_the_gradient(engine: Engine, s: Spec) -> None:
    """Forward over reverse on s = sum(w * op(x)**2): JVP rules applied to the VJP graph."""
    graph = build(s, "float64", scalar=weights(s, "float64"))
    inputs = make_inputs(s, "float64")
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, "float64"))
        return
    wrt = diff_positions(s, "float64")
    names = [f"a{p}" for p in wrt]
    if not s.forward:
        with pytest.raises(GraphError, match="forward mode"):
            engine.hvp(graph, inputs, names, "s", {n: inputs[n] for n in names})
        return
    rng = rng_for(s.name, "hvp")
    vectors = {p: randn(rng, arrays[p].shape, "float64") for p in wrt}
    hv = engine.hvp(graph, inputs, names, "s", {f"a{p}": v for p, v in vectors.items()})
    want = fd_directional(scalar_grad(engine, graph, names), arrays, vectors)
    for name in names:
        assert_fd(hv[name], want[name], f"H.v for {name}")


@pytest.mark.parametrize("s", FD_SPECS, ids=fd_ids)
def test_hessian_matches_finite_differences_of_the_gradient(engine: Engine, s: Spec) -> None:
    """Reverse over reverse with stacked seeds: the batched VJP rules of the VJP graph's ops."""
    graph = build(s, "float64", scalar=weights(s, "float64"))
    inputs = make_inputs(s, "float64")
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, "float64"))
        return
    names = [f"a{p}" for p in diff_positions(s, "float64")]
    hess = engine.hessian(graph, inputs, names, "s")
    grad = scalar_grad(engine, graph, names)
    for pj in diff_positions(s, "float64"):
        cols = {n: [] for n in names}
        for i in range(arrays[pj].size):
            e = np.zeros_like(arrays[pj])
            e.flat[i] = 1.0
            d = fd_directional(grad, arrays, {pj: e})
            for n in names:
                cols[n].append(d[n])
        for n in names:
            shape_i = inputs[n].shape
            want = (np.stack(cols[n], axis=-1) if cols[n] else np.zeros((*shape_i, 0))).reshape(shape_i + arrays[pj].shape)
            assert_fd(hess[(n, f"a{pj}")], want, f"hessian block ({n}, a{pj})")


def torch_double_backward(s: Spec, arrays: list[np.ndarray], diff: list[int], ct: np.ndarray,
                          us: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """d/d(x, ct) of sum_i <u_i, grad_i(x, ct)>: PyTorch's double backward."""
    ts = [to_torch(a) for a in arrays]
    xs = [ts[p].requires_grad_(True) for p in diff]
    ct_t = to_torch(ct).requires_grad_(True)
    out = s.torch(*ts)
    zeros = [np.zeros_like(arrays[p]) for p in diff], np.zeros_like(ct)
    if not out.requires_grad:
        return zeros
    g1 = torch.autograd.grad(out, xs, ct_t, create_graph=True, allow_unused=True, materialize_grads=True)
    live = [(g, to_torch(u)) for g, u in zip(g1, us, strict=True) if g.requires_grad]
    if not live:
        return zeros
    g2 = torch.autograd.grad([g for g, _ in live], [*xs, ct_t], [u for _, u in live], allow_unused=True,
                             materialize_grads=True)
    return [g.detach().numpy(force=True) for g in g2[:-1]], g2[-1].detach().numpy(force=True)


@pytest.mark.parametrize(("s", "dtype"), TORCH_CASES, ids=list(map(case_id, TORCH_CASES)))
def test_vjp_of_the_vjp_graph_matches_torch_double_backward(engine: Engine, s: Spec, dtype: str) -> None:
    graph = build(s, dtype)
    inputs = make_inputs(s, dtype)
    arrays = list(inputs.values())
    if not s.reverse:
        assert_reverse_refused(engine, graph, inputs, diff_positions(s, dtype))
        return
    wrt = diff_positions(s, dtype)
    names = [f"a{p}" for p in wrt]
    rng = rng_for(s.name, dtype, "double")
    ct = randn(rng, graph.nodes[-1].shape, out_dtype(s, dtype))
    us = [randn(rng, arrays[p].shape, dtype) for p in wrt]
    g2 = vjp_graph(graph, names)
    named = vjp_names(graph, names, ["out"])
    assert [n for n in g2.output_names() if n != "out"] == [named.grad[n] for n in names]
    ct_name = named.seed["out"]
    has_ct = ct_name in g2.input_names()
    feed = {**inputs, **({ct_name: ct} if has_ct else {})}
    _, grads = engine.vjp(g2, feed, [*names, *([ct_name] if has_ct else [])],
                          seeds={named.grad[n]: u for n, u in zip(names, us, strict=True)},
                          outputs=[named.grad[n] for n in names])
    want_x, want_ct = torch_double_backward(s, arrays, wrt, ct, us)
    for n, want in zip(names, want_x, strict=True):
        assert_close(grads[n], want, dtype, TORCH_TOL, f"second-order grad {n}")
    if has_ct:
        assert_close(grads[ct_name], want_ct, out_dtype(s, dtype), TORCH_TOL, "second-order grad of the cotangent")
    else:
        assert not np.any(want_ct), "the VJP graph ignores the cotangent, but PyTorch's gradient depends on it"


# ---------------------------------------------------------------- 5. non-differentiable ops inside differentiable graphs


@dataclass(frozen=True)
class Composite:
    name: str
    ops: tuple[str, ...]  # the non-differentiable ops it exercises
    build: Callable[[Builder, Any, Any], Any]  # (builder, x, y) -> out
    torch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    partials: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # elementwise d out/dx, d out/dy

    def __repr__(self) -> str:
        return self.name


def _times_op_plus_y(op: str) -> Callable[[Builder, Any, Any], Any]:
    return lambda b, x, y: b.bind("add", b.bind("mul", x, b.bind(op, x)), y)


def _masked(cmp: str) -> Callable[[Builder, Any, Any], Any]:
    return lambda b, x, y: b.bind("add", b.bind("mul", x, b.bind("cast", b.bind(cmp, x, y), dtype=x.dtype)), y)


def _torch_masked(fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, y: x * fn(x, y).to(x.dtype) + y


def _np_masked(fn: Callable[..., np.ndarray]) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return lambda x, y: (fn(x, y).astype(x.dtype), np.ones_like(y))


def _select_on(pred: str) -> Callable[[Builder, Any, Any], Any]:
    return lambda b, x, y: b.bind("select", b.bind(pred, x), x, y)


def _torch_select_on(fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, y: torch.where(fn(x), x, y)


def _np_select_on(fn: Callable[..., np.ndarray]) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return lambda x, y: (fn(x).astype(x.dtype), (~fn(x)).astype(y.dtype))


_TABLE = np.array([-1.0, -0.25, 0.5, 1.5])  # searchsorted's sorted operand in the composite below


COMPOSITES = [
    Composite("x*floor(x)+y", ("floor",), _times_op_plus_y("floor"), lambda x, y: x * torch.floor(x) + y,
              lambda x, y: (np.floor(x), np.ones_like(y))),
    Composite("x*ceil(x)+y", ("ceil",), _times_op_plus_y("ceil"), lambda x, y: x * torch.ceil(x) + y,
              lambda x, y: (np.ceil(x), np.ones_like(y))),
    Composite("x*trunc(x)+y", ("trunc",), _times_op_plus_y("trunc"), lambda x, y: x * torch.trunc(x) + y,
              lambda x, y: (np.trunc(x), np.ones_like(y))),
    Composite("x*rint(x)+y", ("rint",), _times_op_plus_y("rint"), lambda x, y: x * torch.round(x) + y,
              lambda x, y: (np.rint(x), np.ones_like(y))),
    *(Composite(f"select({p}(x),x,y)", (p,), _select_on(p), _torch_select_on(tfn), _np_select_on(nfn))
      for p, tfn, nfn in (("isnan", torch.isnan, np.isnan), ("isinf", torch.isinf, np.isinf),
                          ("isfinite", torch.isfinite, np.isfinite), ("signbit", torch.signbit, np.signbit))),
    Composite("x*argsort(x)+y", ("argsort",),
              lambda b, x, y: b.bind("add", b.bind("mul", x, b.bind("cast", b.bind("argsort", x, axis=1), dtype=x.dtype)), y),
              lambda x, y: x * torch.argsort(x, dim=1, stable=True).to(x.dtype) + y,
              lambda x, y: (np.argsort(x, axis=1, kind="stable").astype(x.dtype), np.ones_like(y))),
    Composite("x*searchsorted(t,x)+y", ("searchsorted",),
              lambda b, x, y: b.bind("add", b.bind("mul", x, b.bind("cast", b.bind(
                  "searchsorted", b.const(_TABLE.astype(x.dtype)), x, right=False), dtype=x.dtype)), y),
              lambda x, y: x * torch.searchsorted(torch.tensor(_TABLE, dtype=x.dtype), x).to(x.dtype) + y,
              lambda x, y: (np.searchsorted(_TABLE.astype(x.dtype), x).astype(x.dtype), np.ones_like(y))),
    Composite("x*sign(x)+y", ("sign",), _times_op_plus_y("sign"), lambda x, y: x * torch.sign(x) + y,
              lambda x, y: (np.sign(x), np.ones_like(y))),
    Composite("x*stop_gradient(x)+y", ("stop_gradient",), _times_op_plus_y("stop_gradient"), lambda x, y: x * x.detach() + y,
              lambda x, y: (x.copy(), np.ones_like(y))),
    Composite("exp(stop_gradient(x))*y", ("stop_gradient",),
              lambda b, x, y: b.bind("mul", b.bind("exp", b.bind("stop_gradient", x)), y),
              lambda x, y: torch.exp(x.detach()) * y, lambda x, y: (np.zeros_like(x), np.exp(x))),
    Composite("floor(x)+ceil(y)", ("floor", "ceil"), lambda b, x, y: b.bind("add", b.bind("floor", x), b.bind("ceil", y)),
              lambda x, y: torch.floor(x) + torch.ceil(y), lambda x, y: (np.zeros_like(x), np.zeros_like(y))),
    Composite("x*rint(x)+y", ("rint",), _times_op_plus_y("rint"), lambda x, y: x * torch.round(x) + y,
              lambda x, y: (np.rint(x), np.ones_like(y))),
    Composite("floor_divide(x,y)*y", ("floor_divide",),
              lambda b, x, y: b.bind("mul", b.bind("floor_divide", x, b.bind("add", b.bind("abs", y),
                                                                             b.const(np.ones((), x.dtype)))), y),
              lambda x, y: torch.floor(x / (torch.abs(y) + 1)) * y,
              lambda x, y: (np.zeros_like(x), np.floor_divide(x, np.abs(y) + 1))),
    Composite("cast(ge(x,y))", ("ge",), lambda b, x, y: b.bind("cast", b.bind("ge", x, y), dtype=x.dtype),
              lambda x, y: (x >= y).to(x.dtype), lambda x, y: (np.zeros_like(x), np.zeros_like(y))),
    Composite("select(gt(x,y),x,y)", ("gt",), lambda b, x, y: b.bind("select", b.bind("gt", x, y), x, y),
              lambda x, y: torch.where(x > y, x, y), lambda x, y: ((x > y).astype(x.dtype), (x <= y).astype(y.dtype))),
    *(Composite(f"x*cast({cmp}(x,y))+y", (cmp,), _masked(cmp), _torch_masked(tfn), _np_masked(nfn))
      for cmp, tfn, nfn in (("lt", torch.lt, np.less), ("le", torch.le, np.less_equal), ("gt", torch.gt, np.greater),
                            ("ge", torch.ge, np.greater_equal), ("eq", torch.eq, np.equal), ("ne", torch.ne, np.not_equal))),
]
COMPOSITE_CASES = [(c, dt) for c in COMPOSITES for dt in FLT]


@pytest.mark.parametrize(("c", "dtype"), COMPOSITE_CASES, ids=[f"{c.name}-{dt}" for c, dt in COMPOSITE_CASES])
def test_non_differentiable_ops_pass_zero_gradient(engine: Engine, c: Composite, dtype: str) -> None:
    b = Builder()
    x, y = b.input("x", dtype, (2, 3)), b.input("y", dtype, (2, 3))
    graph = b.build([("out", c.build(b, x, y))])
    assert set(c.ops) <= {n.op for n in graph.nodes}
    rng = rng_for(c.name, dtype)
    # integer-valued points (ties for the comparisons) and fractional ones (inside floor's flat pieces)
    xv = np.asarray(np.concatenate([rng.integers(-2, 3, 3), rng.uniform(-2, 2, 3)]).reshape(2, 3), dtype=dtype)
    yv = np.asarray(np.concatenate([rng.integers(-2, 3, 3), rng.uniform(-2, 2, 3)]).reshape(2, 3), dtype=dtype)
    xv[0, 0] = yv[0, 0]  # at least one tie
    ct, tx, ty = (randn(rng, (2, 3), dtype) for _ in range(3))
    px, py = c.partials(xv, yv)

    _, grads = engine.vjp(graph, {"x": xv, "y": yv}, ["x", "y"], seeds={"out": ct})
    assert_close(grads["x"], ct * px, dtype, TORCH_TOL, "grad x")
    assert_close(grads["y"], ct * py, dtype, TORCH_TOL, "grad y")
    xt, yt = to_torch(xv).requires_grad_(True), to_torch(yv).requires_grad_(True)
    out = c.torch(xt, yt)
    if out.requires_grad:
        t_gx, t_gy = torch.autograd.grad(out, [xt, yt], to_torch(ct), allow_unused=True, materialize_grads=True)
    else:
        t_gx, t_gy = torch.zeros_like(xt), torch.zeros_like(yt)
    assert_close(grads["x"], t_gx.detach().numpy(), dtype, TORCH_TOL, "grad x vs torch")
    assert_close(grads["y"], t_gy.detach().numpy(), dtype, TORCH_TOL, "grad y vs torch")

    _, tans = engine.jvp(graph, {"x": xv, "y": yv}, {"x": tx, "y": ty})
    assert_close(tans["out"], tx * px + ty * py, dtype, TORCH_TOL, "tangent")
    _, t_tan = torch.func.jvp(c.torch, (to_torch(xv), to_torch(yv)), (to_torch(tx), to_torch(ty)))
    assert_close(tans["out"], t_tan.numpy(), dtype, TORCH_TOL, "tangent vs torch")


# ---------------------------------------------------------------- 6. coverage


def test_every_primitive_has_a_spec_a_kernel_and_rules() -> None:
    tabled = {s.op for s in SPECS}
    assert sorted(set(PRIMITIVES) - tabled) == [], "primitives without a spec in this table"
    assert sorted(tabled - set(PRIMITIVES)) == [], "specs for ops that are not primitives"
    assert sorted(set(PRIMITIVES) - set(KERNELS)) == [], "primitives without a kernel"
    no_rules = sorted(f"{name}: no {' and no '.join(kind for kind, rule in (('VJP', p.vjp), ('JVP', p.jvp)) if rule is None)}"
                      for name, p in PRIMITIVES.items() if p.differentiable and (p.vjp is None or p.jvp is None))
    assert no_rules == [], "differentiable primitives without a VJP or JVP rule"
    assert [name for name, p in PRIMITIVES.items() if not p.differentiable and (p.vjp or p.jvp)] == [], \
        "non-differentiable primitives with rules"


def test_every_primitive_has_every_trait_the_passes_and_backends_need() -> None:
    """The registry is the only list of ops: a primitive missing a trait that fusion, the cost model,
    sharding, the native or the CUDA backend reads would be mishandled silently, so each is checked
    here on the spec table's cases (every dtype the op allows)."""
    missing = []
    for name, p in PRIMITIVES.items():
        if p.shard is None or p.shard_sum is None:
            missing.append(f"{name}: no data-parallel sharding rule (shard and shard_sum)")
        if p.in_place and not p.out:
            missing.append(f"{name}: writes over an operand but takes no out= buffer")
        if p.broadcast_view and not p.view:
            missing.append(f"{name}: a broadcast view that is not a view")
        if (p.identity is not None or p.additive) and p.arity != 2:
            missing.append(f"{name}: identity or additive traits need a binary op")
        if p.elementwise and (p.cost is None or p.native is None or p.cuda is None):
            missing.append(f"{name}: elementwise without a cost class, a native or a CUDA expression")
        if not p.elementwise and (p.libm or p.native or p.cuda or p.cost is not None):
            missing.append(f"{name}: element-expression traits on an op that fusion never groups")
        if ("shape" in p.attrs or "stops" in p.attrs) and p.reshard is None:  # attributes that spell out the batch dim
            missing.append(f"{name}: its attributes hold dimensions, but no reshard rule for a shard's batch size")
    for s in SPECS:
        p = PRIMITIVES[s.op]
        for dt in s.dtypes:
            ins = [(dt if a.kind == "x" else "bool" if a.kind == "cond" else str(a.value.dtype), a.shape) for a in s.args]
            out = infer(s.op, ins, s.attrs)
            flops = p.flops(ins, out, s.attrs)
            if not (isinstance(flops, float) and math.isfinite(flops) and flops >= 0):
                missing.append(f"{s.name}: flops {flops!r}")
            if p.elementwise:
                names = [f"a{k}" for k in range(len(ins))]
                for backend, expr in (("native", p.native), ("cuda", p.cuda)):
                    text = expr(names, out[0], [d for d, _ in ins])
                    if not isinstance(text, str) or not all(n in text for n in names):
                        missing.append(f"{s.name} {dt}: {backend} expression {text!r} does not use every operand")
    assert missing == []


def test_the_spec_table_exercises_every_primitive_fully() -> None:
    """Both float dtypes for every op; derivative checks (finite differences and PyTorch) for every
    op with a float result; the non-differentiable ones inside differentiable graphs too."""
    missing = []
    for name in PRIMITIVES:
        specs = [s for s in SPECS if s.op == name]
        for dt in FLT:
            if not any(dt in s.dtypes for s in specs):
                missing.append(f"{name}: no {dt} spec")
        if any(s.grad != "none" for s in specs):
            if not any(s in FD_SPECS for s in specs):
                missing.append(f"{name}: no finite-difference case")
            for dt in FLT:
                if not any(case[0].op == name and case[1] == dt for case in TORCH_CASES):
                    missing.append(f"{name}: no PyTorch case in {dt}")
    for s in SPECS:
        if any(is_diff(s, dt) for dt in FLT) and s.torch is None:
            missing.append(f"{s.name}: differentiable but no PyTorch reference")
    exercised = {op for c in COMPOSITES for op in c.ops}
    zero_grad_ops = {name for name, p in PRIMITIVES.items() if not p.differentiable} | {s.op for s in SPECS if s.grad == "zero"}
    missing += [f"{op}: not exercised inside a differentiable graph" for op in sorted(zero_grad_ops - exercised)]
    assert missing == []
