"""Broadcasting binary primitives (arithmetic, extrema, hypot, fmod, logaddexp, atan2), comparisons, and select.

A differentiable binary op is given by its partials: `partials(g, x, y, out, need)` returns the
images of a cotangent `g` under d/dx and d/dy (None where not needed); the VJP sums them back
to each operand's shape, and the JVP applies them to the tangents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ShapeError
from . import emit as e
from .core import (
    Cost,
    Expr,
    KernelFactory,
    Primitive,
    broadcast_shapes,
    flops_elementwise,
    flops_transcendental,
    need,
    register,
    ufunc,
)
from .dtypes import C_TYPES, DTYPES, FLOATS, INTS, NUMBA_TYPES, NUMERIC, AVal, Shape, numba_typed
from .sharding import SUM, ShardState, shard_elementwise, sum_linear, sum_refused

Partials = Callable[..., tuple[Any, Any]]


def _check(x: AVal, y: AVal, allowed: tuple[str, ...], name: str) -> Shape:
    if x[0] != y[0]:
        raise ShapeError(f"{name} operands have different dtypes {x[0]} and {y[0]} (insert a cast)")
    need(x[0], allowed, f"{name} operands")
    return broadcast_shapes(x[1], y[1])


def _vjp(partials: Partials) -> Callable[..., list[Any]]:
    def rule(g: Any, x: Any, y: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
        px, py = partials(g, x, y, out, need)
        return [e.unbroadcast(px, x.shape, nb) if need[0] else None,
                e.unbroadcast(py, y.shape, nb) if need[1] else None]

    return rule


def _jvp(partials: Partials) -> Callable[..., Any]:
    def rule(ts: Sequence[Any], x: Any, y: Any, *, out: Any) -> Any:
        tx, ty = ts
        need = (tx is not None, ty is not None)
        # with the tangent as the "cotangent", the partials are the tangent's images
        terms = []
        if tx is not None:
            terms.append(partials(tx, x, y, out, need)[0])
        if ty is not None:
            terms.append(partials(ty, x, y, out, need)[1])
        t = terms[0] if len(terms) == 1 else e.add(terms[0], terms[1])
        return e.broadcast_to(t, out.shape)

    return rule


def binary(name: str, partials: Partials | None, *, kernel: str | KernelFactory, allowed: tuple[str, ...], cost: Cost,
           forms: tuple[Expr, Expr], libm: bool = False, linear: bool = False, additive: bool = False,
           identity: float | None = None, commutative: bool = False, numpy: str | None = None,
           shard_sum: Callable[[Any, list[ShardState]], bool] = sum_refused, result: str | None = None) -> Primitive:
    """Register a broadcasting binary op (`kernel`: the numpy ufunc's name, which is then also the
    numpy function it implements, or a kernel factory; `result`: a fixed result dtype, for
    comparisons; `forms`: its numba and CUDA expressions)."""
    native, cuda = forms
    def rule(x: AVal, y: AVal) -> AVal:
        return (result or x[0], _check(x, y, allowed, name))

    named = kernel if isinstance(kernel, str) else None
    return register(Primitive(
        name, 2, {}, rule, kernel if not isinstance(kernel, str) else ufunc(kernel), _vjp(partials) if partials else None,
        _jvp(partials) if partials else None,
        differentiable=partials is not None, linear=linear, identity=identity, commutative=commutative,
        dtypes=allowed, numpy=numpy or named,
        flops=flops_transcendental if cost == Cost.TRANSCENDENTAL else flops_elementwise,
        out=result is None, in_place=result is None, elementwise=True, cost=cost, libm=libm, native=native, cuda=cuda,
        shard=shard_elementwise, shard_sum=shard_sum, additive=additive))


def _infix(sym: str) -> tuple[Expr, Expr]:
    """numba and CUDA expressions `x sym y` of the result's type."""
    return (lambda a, dt, ins: numba_typed(f"{a[0]} {sym} {a[1]}", dt),
            lambda a, dt, ins: f"({C_TYPES[dt]})({a[0]} {sym} {a[1]})")


def _compare(sym: str) -> tuple[Expr, Expr]:
    same: Expr = lambda a, dt, ins: f"({a[0]} {sym} {a[1]})"  # noqa: E731 (the numba and CUDA forms agree)
    return (same, same)


# ---------------------------------------------------------------- arithmetic
#
# Partials apply their local derivatives with `e.mul_no_nan`: a zero cotangent gives a zero
# gradient even where the derivative is not finite, so the branch a `where` did not select
# (sqrt of a negative, log of 0, x / 0) leaves no nan in the gradient.


def _pow(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
    gx = gy = None
    if need[0]:
        # y * x**(y-1), and 0 for y == 0 (torch's and JAX's convention); the base is 1 there (the
        # double where), so no inf enters the graph and every higher derivative of x**0 is 0 too
        y0 = e.eq(y, 0.0)
        gx = e.mul_no_nan(e.select(y0, 0.0, e.mul(y, e.pow_(e.select(y0, 1.0, x), e.sub(y, 1.0)))), g)
    if need[1]:
        # x**y * log(x), and 0 where x == 0 and y >= 0 (torch's convention), with the same guard
        z = e.select(e.eq(x, 0.0), e.ge(y, 0.0), False)
        gy = e.mul_no_nan(e.select(z, 0.0, e.mul(out, e.bind("log", e.select(z, 1.0, x)))), g)
    return gx, gy


def _extremum(cmp: str) -> Partials:
    def partials(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
        # ties split the cotangent evenly, like PyTorch's maximum/minimum
        w = e.add(e.cast(e.bind(cmp, x, y), x.dtype), e.mul(0.5, e.cast(e.eq(x, y), x.dtype)))
        return e.mul(g, w), e.mul(g, e.sub(1.0, w))

    return partials


def _atan2(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
    r = e.add(e.mul(x, x), e.mul(y, y))
    return e.mul_no_nan(e.div(y, r), g), e.mul_no_nan(e.neg(e.div(x, r)), g)


def _div(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
    return (e.mul_no_nan(e.div(1.0, y), g) if need[0] else None,
            e.mul_no_nan(e.neg(e.div(out, y)), g) if need[1] else None)


def _remainder(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
    # x - y * floor(x / y): d/dx is 1, d/dy is -floor(x / y) (torch's convention)
    return g, e.mul_no_nan(e.neg(e.bind("floor_divide", x, y)), g) if need[1] else None


def _divmod_native(fn: str) -> Expr:
    """numba: `native_math`'s numpy-exact floor division or remainder for the dtype."""
    def form(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
        name = f"i{fn}" if dt in INTS else f"{fn}32" if dt == "float32" else fn
        return numba_typed(f"_{name}({a[0]}, {a[1]})", dt)

    return form


def _c_remainder(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
    x, y, T = a[0], a[1], C_TYPES[dt]
    if dt in INTS:  # C's % truncates: move a remainder of the wrong sign by y; 0 for y == 0 or -1, as numpy's
        r = f"({x} % {y})"
        return f"({y} == 0 || {y} == -1 ? ({T})0 : ({r} != 0 ? (({r} < 0) != ({y} < 0) ? {r} + {y} : {r}) : ({T})0))"
    m = f"fmod({x}, {y})"  # numpy's npy_divmod: fmod, moved to the divisor's sign, a zero one signed as y
    return f"({y} == 0 ? {m} : ({m} == 0 ? copysign(({T})0, {y}) : (({m} < 0) != ({y} < 0) ? {m} + {y} : {m})))"


def _c_floor_divide(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
    x, y, T = a[0], a[1], C_TYPES[dt]
    if dt in INTS:  # truncating division, one less where the remainder has the wrong sign; -1 wraps as numpy's
        r = f"({x} % {y})"
        return (f"({y} == 0 ? ({T})0 : ({y} == -1 ? ({T})(-{x}) : "
                f"({T})({x} / {y} - ({r} != 0 ? (({r} < 0) != ({y} < 0) ? 1 : 0) : 0))))")
    m = f"fmod({x}, {y})"  # numpy's npy_divmod: (x - fmod) / y, snapped to the nearest integer
    d = f"(({x} - {m}) / {y} - ({m} != 0 ? (({m} < 0) != ({y} < 0) ? 1 : 0) : 0))"
    q = f"({d} == 0 ? copysign(({T})0, {x} / {y}) : ({d} - floor({d}) > 0.5 ? floor({d}) + 1 : floor({d})))"
    return f"({y} == 0 ? {x} / {y} : ({T})({q}))"


def _mul_no_nan_kernel(xp: Any) -> Any:
    def kernel(x: Any, y: Any, out: Any = None) -> Any:
        zero = y == 0  # before out (which may be y) is written
        out = xp.asarray(xp.multiply(x, y, out=out))  # an array for 0-d operands too
        xp.copyto(out, 0, where=zero)
        return out

    return kernel


def _sum_mul(n: Any, ins: list[ShardState]) -> bool:
    return ins.count(SUM) == 1  # a sum over examples scaled by an example-independent factor


def _sum_div(n: Any, ins: list[ShardState]) -> bool:
    return ins[0] == SUM and ins[1] is None


binary("add", lambda g, x, y, out, need: (g, g), kernel="add", allowed=NUMERIC, cost=Cost.CHEAP, forms=_infix("+"),
       linear=True, additive=True, shard_sum=sum_linear, identity=0.0, commutative=True)
binary("sub", lambda g, x, y, out, need: (g, e.neg(g) if need[1] else None), kernel="subtract", allowed=NUMERIC,
       cost=Cost.CHEAP, forms=_infix("-"), linear=True, additive=True, shard_sum=sum_linear, identity=0.0)
binary("mul", lambda g, x, y, out, need: (e.mul_no_nan(y, g) if need[0] else None, e.mul_no_nan(x, g) if need[1] else None),
       kernel="multiply", allowed=NUMERIC, cost=Cost.CHEAP, forms=_infix("*"), shard_sum=_sum_mul, identity=1.0,
       commutative=True)
# x * y, and 0 wherever y is 0 (even for an inf or nan x): how rules apply a derivative to a cotangent.
# Its own partials keep that: where y is 0, nothing flows to x (a nan tangent of the derivative
# included), and a zero cotangent g stays zero
binary("mul_no_nan", lambda g, x, y, out, need: (e.mul_no_nan(g, y) if need[0] else None,
                                                 e.mul_no_nan(x, g) if need[1] else None),
       kernel=_mul_no_nan_kernel, allowed=FLOATS, cost=Cost.CHEAP, shard_sum=_sum_mul, identity=1.0,
       forms=(lambda a, dt, ins: f"_sel({a[1]} == 0, {NUMBA_TYPES[dt]}(0), {a[0]} * {a[1]})",
              lambda a, dt, ins: f"({a[1]} == 0 ? ({C_TYPES[dt]})0 : {a[0]} * {a[1]})"))
binary("div", _div, kernel="divide", allowed=FLOATS, cost=Cost.DIV, forms=_infix("/"), shard_sum=_sum_div, identity=1.0)
# numpy's floor division and remainder (the remainder takes the divisor's sign), every numeric dtype
binary("floor_divide", None, kernel="floor_divide", allowed=NUMERIC, cost=Cost.DIV,
       forms=(_divmod_native("floor_divide"), _c_floor_divide))
binary("remainder", _remainder, kernel="remainder", allowed=NUMERIC, cost=Cost.DIV,
       forms=(_divmod_native("remainder"), _c_remainder))
binary("pow", _pow, kernel="power", allowed=FLOATS, cost=Cost.TRANSCENDENTAL, libm=True,
       forms=(lambda a, dt, ins: f"{NUMBA_TYPES[dt]}({a[0]} ** {a[1]})", lambda a, dt, ins: f"pow({a[0]}, {a[1]})"))
# NaN propagates, and ties give the second operand, as numpy's
binary("maximum", _extremum("gt"), kernel="maximum", allowed=NUMERIC, cost=Cost.CHEAP,
       forms=(lambda a, dt, ins: f"_sel(({a[0]} > {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})",
              lambda a, dt, ins: f"(({a[0]} > {a[1]} || {a[0]} != {a[0]}) ? {a[0]} : {a[1]})"))
binary("minimum", _extremum("lt"), kernel="minimum", allowed=NUMERIC, cost=Cost.CHEAP,
       forms=(lambda a, dt, ins: f"_sel(({a[0]} < {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})",
              lambda a, dt, ins: f"(({a[0]} < {a[1]} || {a[0]} != {a[0]}) ? {a[0]} : {a[1]})"))
binary("hypot", lambda g, x, y, out, need: (e.mul(g, e.div(x, out)) if need[0] else None,
                                            e.mul(g, e.div(y, out)) if need[1] else None),
       kernel="hypot", allowed=FLOATS, cost=Cost.DIV, libm=True,
       forms=(lambda a, dt, ins: f"np.hypot({a[0]}, {a[1]})", lambda a, dt, ins: f"hypot({a[0]}, {a[1]})"))
# x - trunc(x / y) * y, computed exactly: d/dy is -trunc(x / y) (zero at the jumps' sides, as PyTorch's)
binary("fmod", lambda g, x, y, out, need: (g, e.neg(e.mul(g, e.bind("trunc", e.div(x, y)))) if need[1] else None),
       kernel="fmod", allowed=FLOATS, cost=Cost.DIV, libm=True,
       forms=(lambda a, dt, ins: f"np.fmod({a[0]}, {a[1]})", lambda a, dt, ins: f"fmod({a[0]}, {a[1]})"))
def _logaddexp(exp: str) -> Partials:
    # d/dx log(e^x + e^y) = e^(x - out): smooth to every order, ties included
    def partials(g: Any, x: Any, y: Any, out: Any, need: Sequence[bool]) -> tuple[Any, Any]:
        return (e.mul(g, e.bind(exp, e.sub(x, out))) if need[0] else None,
                e.mul(g, e.bind(exp, e.sub(y, out))) if need[1] else None)

    return partials


def _logaddexp_cuda(exp: str, tie: float, scale: float) -> Expr:
    """max(x, y) + log1p(exp(-|x - y|)) (scaled), with ties (infinities too) as x + log(2), and NaN
    propagated, as numpy's logaddexp and logaddexp2."""
    def form(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
        x, y, T = a[0], a[1], C_TYPES[dt]
        big = f"(({x} > {y} || {x} != {x}) ? {x} : {y})"
        return (f"({x} == {y} ? {x} + ({T}){tie!r} : "
                f"{big} + log1p({exp}(-fabs({x} - {y}))) * ({T}){scale!r})")

    return form


binary("logaddexp", _logaddexp("exp"), kernel="logaddexp", allowed=FLOATS, cost=Cost.TRANSCENDENTAL, libm=True,
       forms=(lambda a, dt, ins: f"np.logaddexp({a[0]}, {a[1]})", _logaddexp_cuda("exp", math.log(2.0), 1.0)))
binary("logaddexp2", _logaddexp("exp2"), kernel="logaddexp2", allowed=FLOATS, cost=Cost.TRANSCENDENTAL, libm=True,
       forms=(lambda a, dt, ins: f"np.logaddexp2({a[0]}, {a[1]})", _logaddexp_cuda("exp2", 1.0, 1.0 / math.log(2.0))))
binary("atan2", _atan2, kernel="arctan2", allowed=FLOATS, cost=Cost.TRANSCENDENTAL, libm=True,
       forms=(lambda a, dt, ins: f"np.arctan2({a[0]}, {a[1]})", lambda a, dt, ins: f"atan2({a[0]}, {a[1]})"))

# ---------------------------------------------------------------- comparisons: bool results, no gradient

for _name, _kernel, _sym in (("lt", "less", "<"), ("le", "less_equal", "<="), ("gt", "greater", ">"),
                             ("ge", "greater_equal", ">="), ("eq", "equal", "=="), ("ne", "not_equal", "!=")):
    binary(_name, None, kernel=_kernel, allowed=DTYPES, cost=Cost.CHEAP, result="bool", forms=_compare(_sym))


# ---------------------------------------------------------------- select


def _select_rule(c: AVal, x: AVal, y: AVal) -> AVal:
    need(c[0], ("bool",), "select condition")
    if x[0] != y[0]:
        raise ShapeError(f"select branches have different dtypes {x[0]} and {y[0]}")
    return (x[0], broadcast_shapes(c[1], x[1], y[1]))


def _vjp_select(g: Any, c: Any, x: Any, y: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [None,
            e.unbroadcast(e.select(c, g, 0), x.shape, nb) if need[1] else None,
            e.unbroadcast(e.select(c, 0, g), y.shape, nb) if need[2] else None]


def _jvp_select(ts: Sequence[Any], c: Any, x: Any, y: Any, *, out: Any) -> Any:
    tx = ts[1] if ts[1] is not None else 0.0
    ty = ts[2] if ts[2] is not None else 0.0
    return e.broadcast_to(e.select(c, tx, ty), out.shape)


register(Primitive(
    "select", 3, {}, _select_rule, lambda xp: xp.where, _vjp_select, _jvp_select, elementwise=True, dtypes=DTYPES,
    cost=Cost.CHEAP,
    native=lambda a, dt, ins: f"_sel({a[0]}, {a[1]}, {a[2]})", cuda=lambda a, dt, ins: f"({a[0]} ? {a[1]} : {a[2]})",
    shard=shard_elementwise, shard_sum=sum_refused))
