"""Elementwise unary primitives: math functions, rounding, predicates, sign, cast, stop_gradient.

A differentiable unary op is given by its derivative as a function of (x, out); the VJP
multiplies the cotangent by it, the JVP the tangent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import emit as e
from .core import Cost, Expr, KernelFactory, Primitive, flops_elementwise, flops_none, flops_transcendental, need, register, ufunc
from .dtypes import C_TYPES, DTYPES, FLOATS, NUMBA_TYPES, NUMERIC, AVal, numba_typed
from .sharding import shard_elementwise, sum_linear, sum_refused

Deriv = Callable[[Any, Any], Any]  # (x, out) -> d out / d x, emitted


def _rule(allowed: tuple[str, ...], name: str, result: str | None = None) -> Callable[[AVal], AVal]:
    def rule(x: AVal) -> AVal:
        need(x[0], allowed, f"{name} operand")
        return (result or x[0], x[1])

    return rule


def _call(fn: str) -> Expr:
    """`fn(x)`: a numba or CUDA function of one argument."""
    return lambda a, dt, ins: f"{fn}({a[0]})"


def _native_fast(fn: str) -> Expr:
    """The native math module's vectorisable `fn`, float32 or float64."""
    return lambda a, dt, ins: f"_{fn}32({a[0]})" if dt == "float32" else f"_{fn}({a[0]})"


def unary(name: str, deriv: Deriv | None, *, kernel: KernelFactory | None = None, allowed: tuple[str, ...] = FLOATS,
          cost: Cost, native: Expr, cuda: Expr, libm: bool = False, numpy: str | None = "",
          result: str | None = None) -> Primitive:
    """Register an elementwise unary op; `deriv(x, out)` is its derivative (None: piecewise
    constant, the gradient is zero). `numpy`: the numpy ufunc it implements, by default its own
    name. `result`: a fixed result dtype (the predicates: bool, not differentiable at all)."""
    vjp = jvp = None
    if deriv is not None:
        def vjp(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
            # a zero cotangent stays zero where the derivative is not finite (an unselected branch)
            return [e.mul_no_nan(deriv(x, out), g)]

        def jvp(ts: Sequence[Any], x: Any, *, out: Any) -> Any:
            return e.mul(ts[0], deriv(x, out))

    return register(Primitive(
        name, 1, {}, _rule(allowed, name, result), kernel or ufunc(name), vjp, jvp, differentiable=deriv is not None,
        dtypes=allowed, numpy=name if numpy == "" else numpy,
        flops=flops_transcendental if cost == Cost.TRANSCENDENTAL else flops_elementwise,
        out=result is None, in_place=result is None, elementwise=True, cost=cost, libm=libm, native=native, cuda=cuda,
        shard=shard_elementwise, shard_sum=sum_refused))


# ---------------------------------------------------------------- math functions

unary("exp", lambda x, out: out, cost=Cost.TRANSCENDENTAL, native=_native_fast("exp"), cuda=_call("exp"))
unary("log", lambda x, out: e.div(1.0, x), cost=Cost.TRANSCENDENTAL, native=_native_fast("log"), cuda=_call("log"))
unary("log1p", lambda x, out: e.div(1.0, e.add(1.0, x)), cost=Cost.TRANSCENDENTAL, native=_native_fast("log1p"),
      cuda=_call("log1p"))
unary("expm1", lambda x, out: e.add(out, 1.0), cost=Cost.TRANSCENDENTAL, native=_native_fast("expm1"),
      cuda=_call("expm1"))
unary("sin", lambda x, out: e.bind("cos", x), cost=Cost.TRANSCENDENTAL, native=_call("np.sin"), cuda=_call("sin"),
      libm=True)
unary("cos", lambda x, out: e.neg(e.bind("sin", x)), cost=Cost.TRANSCENDENTAL, native=_call("np.cos"),
      cuda=_call("cos"), libm=True)
unary("tan", lambda x, out: e.add(1.0, e.mul(out, out)), cost=Cost.TRANSCENDENTAL, native=_call("np.tan"),
      cuda=_call("tan"), libm=True)
unary("arctan", lambda x, out: e.div(1.0, e.add(1.0, e.mul(x, x))), cost=Cost.TRANSCENDENTAL,
      native=_call("np.arctan"), cuda=_call("atan"), libm=True)
unary("tanh", lambda x, out: e.sub(1.0, e.mul(out, out)), cost=Cost.TRANSCENDENTAL, native=_native_fast("tanh"),
      cuda=_call("tanh"))
unary("sqrt", lambda x, out: e.div(0.5, out), cost=Cost.DIV, native=_call("np.sqrt"), cuda=_call("sqrt"))
unary("cbrt", lambda x, out: e.div(1.0 / 3.0, e.mul(out, out)), cost=Cost.TRANSCENDENTAL, native=_call("np.cbrt"),
      cuda=_call("cbrt"), libm=True)
unary("exp2", lambda x, out: e.mul(out, math.log(2.0)), cost=Cost.TRANSCENDENTAL, native=_call("np.exp2"),
      cuda=_call("exp2"), libm=True)
unary("log2", lambda x, out: e.div(1.0 / math.log(2.0), x), cost=Cost.TRANSCENDENTAL, native=_call("np.log2"),
      cuda=_call("log2"), libm=True)
unary("log10", lambda x, out: e.div(1.0 / math.log(10.0), x), cost=Cost.TRANSCENDENTAL, native=_call("np.log10"),
      cuda=_call("log10"), libm=True)


def _inv_sqrt_one_minus_sq(x: Any) -> Any:
    return e.div(1.0, e.bind("sqrt", e.sub(1.0, e.mul(x, x))))


unary("arcsin", lambda x, out: _inv_sqrt_one_minus_sq(x), cost=Cost.TRANSCENDENTAL, native=_call("np.arcsin"),
      cuda=_call("asin"), libm=True)
unary("arccos", lambda x, out: e.neg(_inv_sqrt_one_minus_sq(x)), cost=Cost.TRANSCENDENTAL, native=_call("np.arccos"),
      cuda=_call("acos"), libm=True)
unary("sinh", lambda x, out: e.bind("cosh", x), cost=Cost.TRANSCENDENTAL, native=_call("np.sinh"), cuda=_call("sinh"),
      libm=True)
unary("cosh", lambda x, out: e.bind("sinh", x), cost=Cost.TRANSCENDENTAL, native=_call("np.cosh"), cuda=_call("cosh"),
      libm=True)
unary("arcsinh", lambda x, out: e.div(1.0, e.bind("sqrt", e.add(e.mul(x, x), 1.0))), cost=Cost.TRANSCENDENTAL,
      native=_call("np.arcsinh"), cuda=_call("asinh"), libm=True)
# 1 / sqrt(x^2 - 1) as 1 / (sqrt(x - 1) sqrt(x + 1)): no cancellation near x = 1
unary("arccosh", lambda x, out: e.div(1.0, e.mul(e.bind("sqrt", e.sub(x, 1.0)), e.bind("sqrt", e.add(x, 1.0)))),
      cost=Cost.TRANSCENDENTAL, native=_call("np.arccosh"), cuda=_call("acosh"), libm=True)
unary("arctanh", lambda x, out: e.div(1.0, e.sub(1.0, e.mul(x, x))), cost=Cost.TRANSCENDENTAL,
      native=_call("np.arctanh"), cuda=_call("atanh"), libm=True)

# ---------------------------------------------------------------- rounding: piecewise constant, zero gradient

unary("floor", None, cost=Cost.CHEAP, native=_call("np.floor"), cuda=_call("floor"))
unary("ceil", None, cost=Cost.CHEAP, native=_call("np.ceil"), cuda=_call("ceil"))
unary("trunc", None, cost=Cost.CHEAP, native=_call("np.trunc"), cuda=_call("trunc"))
# halves to even, as numpy's rint and round (and CUDA's rint in the default rounding mode)
unary("rint", None, cost=Cost.CHEAP, native=_call("np.rint"), cuda=_call("rint"))

# ---------------------------------------------------------------- predicates: bool results, no gradient

for _name in ("isnan", "isinf", "isfinite", "signbit"):
    unary(_name, None, result="bool", cost=Cost.CHEAP, native=_call(f"np.{_name}"), cuda=_call(_name))


def _logistic_kernel(xp: ModuleType) -> Any:
    def kernel(x: Any, out: Any = None) -> Any:
        # e = exp(-|x|) never overflows; 1/(1+e) for x >= 0 and e/(1+e) for x < 0 keep full
        # relative precision in both tails (sigmoid(-40) is 4.2e-18, not 0)
        ex = xp.exp(-xp.abs(x))
        if out is None:
            out = xp.empty_like(x)
        xp.divide(xp.where(x >= 0, 1.0, ex).astype(x.dtype, copy=False), ex + 1, out=out)
        return out

    return kernel


unary("logistic", lambda x, out: e.mul(out, e.sub(1.0, out)), kernel=_logistic_kernel, numpy=None, cost=Cost.TRANSCENDENTAL,
      native=_native_fast("logistic"),
      # as the numpy kernel's value: 0.5 * tanh(0.5 * x) + 0.5
      cuda=lambda a, dt, ins: f"(({C_TYPES[dt]})0.5 * tanh({a[0]} * ({C_TYPES[dt]})0.5) + ({C_TYPES[dt]})0.5)")


# ---------------------------------------------------------------- sign and magnitude


def _sign_native(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
    x, T = a[0], NUMBA_TYPES[dt]
    if dt in FLOATS:  # sign(-0.0) is 0.0 and sign(nan) nan, as numpy's
        return f"_sel({x} > 0, {T}(1.0), _sel({x} < 0, {T}(-1.0), _sel({x} != {x}, {x}, {T}(0.0))))"
    return f"_sel({x} > 0, {T}(1), _sel({x} < 0, {T}(-1), {T}(0)))"


def _sign_cuda(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
    x, T = a[0], C_TYPES[dt]
    if dt in FLOATS:
        return f"({x} > 0 ? ({T})1 : ({x} < 0 ? ({T})-1 : ({x} != {x} ? {x} : ({T})0)))"
    return f"({x} > 0 ? ({T})1 : ({x} < 0 ? ({T})-1 : ({T})0))"


unary("abs", lambda x, out: e.bind("sign", x), kernel=ufunc("abs"), allowed=NUMERIC, numpy="absolute", cost=Cost.CHEAP,
      native=lambda a, dt, ins: numba_typed(f"abs({a[0]})", dt),
      cuda=lambda a, dt, ins: f"fabs({a[0]})" if dt in FLOATS else f"({a[0]} < 0 ? ({C_TYPES[dt]})(-{a[0]}) : {a[0]})")
unary("sign", None, allowed=NUMERIC, cost=Cost.CHEAP, native=_sign_native, cuda=_sign_cuda)


def _vjp_neg(g: Any, x: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [e.neg(g)]


register(Primitive(
    "neg", 1, {}, _rule(NUMERIC, "neg"), ufunc("negative"), _vjp_neg, lambda ts, x, *, out: e.neg(ts[0]), linear=True,
    out=True, in_place=True, elementwise=True, dtypes=NUMERIC, numpy="negative", cost=Cost.CHEAP,
    native=lambda a, dt, ins: numba_typed(f"-{a[0]}", dt), cuda=lambda a, dt, ins: f"({C_TYPES[dt]})(-{a[0]})",
    shard=shard_elementwise, shard_sum=sum_linear))


# ---------------------------------------------------------------- cast and stop_gradient


def _cast_rule(x: AVal, *, dtype: str) -> AVal:
    return (dtype, x[1])


def _cast_native(a: Sequence[str], dt: str, ins: Sequence[str]) -> str:
    x, T, src = a[0], NUMBA_TYPES[dt], ins[0]
    if dt == "bool":
        return x if src == "bool" else f"({x} != 0)"
    if src == "bool":
        return f"_sel({x}, {T}(1), {T}(0))"
    return f"{T}({x})"


register(Primitive(
    "cast", 1, {"dtype": "dtype"}, _cast_rule, lambda xp: lambda x, *, dtype: x.astype(dtype),
    lambda g, x, *, out, need, nb, dtype: [e.cast(g, x.dtype)], lambda ts, x, *, out, dtype: e.cast(ts[0], dtype),
    linear=True, elementwise=True, dtypes=DTYPES, cost=Cost.CHEAP, native=_cast_native,
    cuda=lambda a, dt, ins: f"({a[0]} != 0)" if dt == "bool" and ins[0] != "bool" else f"({C_TYPES[dt]})({a[0]})",
    shard=shard_elementwise, shard_sum=sum_linear))

register(Primitive(
    "stop_gradient", 1, {}, lambda x: x, lambda xp: lambda x: x, differentiable=False, flops=flops_none, view=True,
    shard=shard_elementwise, shard_sum=sum_linear))
