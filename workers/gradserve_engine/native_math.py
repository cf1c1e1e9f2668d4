"""Vectorisable math for the native kernels: the functions the generated kernel sources import.

numba without Intel SVML (not installed here) lowers `np.exp` & co. to scalar libm calls, 3-10x
slower than numpy's own SIMD loops, which would lose the fusion gain. So the kernels that
`gradserve_engine.native` generates call these instead, for exp, expm1, log, log1p and tanh (and
logistic, built on tanh op by op as the numpy kernel is): Cody-Waite range reduction,
polynomials evaluated with fused multiply-adds, exponent bits through LLVM bitcasts, branch-free
selects (`sel`, which kernels also use for sign, maximum, minimum and select). float64 and
float32 each have their own (the ``...32`` functions: float32 arithmetic, 16 lanes); both agree
with numpy within 3 ulp of their dtype, including inf, nan, signed zeros, overflow and subnormal
results.

Everything is ``inline="always"`` (or an LLVM intrinsic), so each kernel compiles its own copy
into its loop, which LLVM then vectorises. A generated kernel imports the names it calls as
``from gradserve_engine.native_math import exp as _exp, sel as _sel``.

numba's disk cache of a kernel does not notice edits to the functions it inlined from here, so
`native.load_kernel` names each kernel file by a digest of its source and of this file's bytes:
editing this file yields new kernel files, compiled afresh.

This module imports numba: only the generated kernels (and tests) import it, never the engine
itself, which runs without numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["exp", "exp32", "exponent", "expm1", "expm132", "floor_divide", "floor_divide32", "fma", "ifloor_divide",
           "iremainder", "log", "log1p", "log1p32", "log32", "logistic", "logistic32", "mantissa", "pow2", "remainder",
           "remainder32", "sel", "tanh", "tanh32"]

# ---------------------------------------------------------------- LLVM intrinsics


def _from_bits(name: str, build):
    """An intrinsic of one float argument computed on its bits: `build(builder, x, f32, ity, fty)`
    gets the LLVM builder, the argument, whether it is float32, and the integer and float LLVM
    types of its width."""
    def typer(typingctx, x):
        def codegen(context, builder, signature, args):
            f32 = signature.return_type == types.float32
            ity = context.get_value_type(types.int32 if f32 else types.int64)
            return build(builder, args[0], f32, ity, context.get_value_type(signature.return_type))
        return x(x), codegen

    typer.__name__ = name
    return intrinsic(typer)


def _pow2(b, kf, f32, ity, fty):
    # 2**kf for an integral float kf in the normal exponent range, built from exponent bits
    biased = b.add(b.fptosi(kf, ity), ity(127 if f32 else 1023))
    return b.bitcast(b.shl(biased, ity(23 if f32 else 52)), fty)


def _exponent(b, x, f32, ity, fty):
    # the unbiased exponent field of a normal x, as a float
    field = b.and_(b.lshr(b.bitcast(x, ity), ity(23 if f32 else 52)), ity(0xFF if f32 else 0x7FF))
    return b.sitofp(b.sub(field, ity(127 if f32 else 1023)), fty)


def _mantissa(b, x, f32, ity, fty):
    # x's significand as a float in [1, 2)
    frac = b.and_(b.bitcast(x, ity), ity((1 << 23) - 1 if f32 else (1 << 52) - 1))
    return b.bitcast(b.or_(frac, ity(0x3F800000 if f32 else 0x3FF0000000000000)), fty)


pow2, exponent, mantissa = _from_bits("pow2", _pow2), _from_bits("exponent", _exponent), _from_bits("mantissa", _mantissa)


@intrinsic
def fma(typingctx, a, b, c):
    # a * b + c rounded once (llvm.fma: one instruction where the CPU has FMA)
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, a, a), codegen


@intrinsic
def sel(typingctx, c, a, b):
    # c ? a : b without a branch (llvm select), so that loops stay vectorisable
    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])
    return a(types.boolean, a, a), codegen


# ---------------------------------------------------------------- float64

# Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2; expm1(r) by its Taylor series
# to r**13 (truncation < 1e-17 relative); fdlibm's e_log.c for log. Within 1-3 ulp of numpy.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@njit(inline="always", error_model="numpy")
def _expm1_red(x, kf):
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = fma(r, 1.0 / 6227020800, 1.0 / 479001600)
    p = fma(r, p, 1.0 / 39916800)
    p = fma(r, p, 1.0 / 3628800)
    p = fma(r, p, 1.0 / 362880)
    p = fma(r, p, 1.0 / 40320)
    p = fma(r, p, 1.0 / 5040)
    p = fma(r, p, 1.0 / 720)
    p = fma(r, p, 1.0 / 120)
    p = fma(r, p, 1.0 / 24)
    p = fma(r, p, 1.0 / 6)
    p = fma(r, p, 0.5)
    return fma(r * r, p, r)


@njit(inline="always", error_model="numpy")
def _k(x):  # round(x / ln2), clamped (NaN too) so that 2**(k/2) stays normal
    kf = np.floor(x * 1.4426950408889634 + 0.5)
    kf = sel(kf > -1100.0, kf, -1100.0)
    return sel(kf < 1100.0, kf, 1100.0)


@njit(inline="always", error_model="numpy")
def exp(x):
    kf = _k(x)
    q = _expm1_red(x, kf)
    k1 = np.floor(kf * 0.5)
    res = (1.0 + q) * pow2(k1) * pow2(kf - k1)  # two factors: results near overflow and subnormal ones
    res = sel(x < 709.782712893384, res, np.inf)
    res = sel(x > -745.1332191019412, res, 0.0)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def expm1(x):
    kf = _k(x)
    q = _expm1_red(x, kf)
    kc = sel(kf < 1023.0, kf, 1023.0)
    s = pow2(kc)
    res = fma(s, q, s - 1.0)  # 2**k - 1 is exact for the k where it matters
    k1 = np.floor(kf * 0.5)
    res = sel(kf < 1023.0, res, (1.0 + q) * pow2(k1) * pow2(kf - k1) - 1.0)
    res = sel(kf == 0.0, q, res)
    res = sel(x < 709.782712893384, res, np.inf)
    res = sel(x > -50.0, res, -1.0)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def log(x):
    # x = 2**e * m, m in [sqrt(1/2), sqrt(2)); log(1 + f) as in fdlibm's e_log.c (< 1 ulp)
    tiny = x < 2.2250738585072014e-308
    xs = sel(tiny, x * 18014398509481984.0, x)
    e = exponent(xs) - sel(tiny, 54.0, 0.0)
    m = mantissa(xs)
    big = m > 1.4142135623730951
    m = sel(big, m * 0.5, m)
    dk = sel(big, e + 1.0, e)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * fma(w, fma(w, 1.531383769920937332e-01, 2.222219843214978396e-01), 3.999999999940941908e-01)
    t2 = z * fma(w, fma(w, fma(w, 1.479819860511658591e-01, 1.818357216161805012e-01), 2.857142874366239149e-01),
                  6.666666666666735130e-01)
    R = t2 + t1
    hfsq = 0.5 * f * f
    res = dk * _LN2_HI - ((hfsq - (s * (hfsq + R) + dk * _LN2_LO)) - f)
    res = sel(x < np.inf, res, np.inf)
    res = sel(x != 0.0, res, -np.inf)
    res = sel(x >= 0.0, res, np.nan)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def log1p(x):
    u = 1.0 + x
    d = u - 1.0
    res = log(u) * (x / d)  # Goldberg: the rounding of 1 + x cancels
    res = sel(d == 0.0, x, res)
    res = sel(x < np.inf, res, np.inf)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def tanh(x):
    # e / (e + 2) with e = expm1(2x); |x| <= 20 (tanh(20) is 1 in float64) keeps 2**k normal
    xc = sel(x > 20.0, 20.0, x)
    xc = sel(xc < -20.0, -20.0, xc)  # NaN passes both
    t = 2.0 * xc
    kf = np.floor(t * 1.4426950408889634 + 0.5)
    kf = sel(kf == kf, kf, 0.0)
    q = _expm1_red(t, kf)
    s = pow2(kf)
    e = sel(kf == 0.0, q, fma(s, q, s - 1.0))
    return e / (e + 2.0)


@njit(inline="always", error_model="numpy")
def logistic(x):
    return 0.5 * tanh(x * 0.5) + 0.5  # as the numpy kernel: 0.5 * (1 + tanh(x / 2)), op by op


# ---------------------------------------------------------------- float32

# The same algorithms in float32 arithmetic (16 lanes), shorter polynomials (the
# Taylor series to r**7; fdlibm's e_logf.c); within 1-3 float32 ulp of numpy
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_FH = np.float32(0.5)
_FINF = np.float32(np.inf)
_FNAN = np.float32(np.nan)
_FLOG2E = np.float32(1.4426950408889634)


@njit(inline="always", error_model="numpy")
def _expm1_red32(x, kf):
    r = fma(kf, np.float32(-0.693359375), x)  # ln2 = 0.693359375 - 2.12194440e-4 (Cephes)
    r = fma(kf, np.float32(2.12194440e-4), r)
    p = fma(r, np.float32(1.0 / 5040), np.float32(1.0 / 720))
    p = fma(r, p, np.float32(1.0 / 120))
    p = fma(r, p, np.float32(1.0 / 24))
    p = fma(r, p, np.float32(1.0 / 6))
    p = fma(r, p, _FH)
    return fma(r * r, p, r)


@njit(inline="always", error_model="numpy")
def _k32(x):
    kf = np.floor(x * _FLOG2E + _FH)
    kf = sel(kf > np.float32(-200.0), kf, np.float32(-200.0))
    return sel(kf < np.float32(200.0), kf, np.float32(200.0))


@njit(inline="always", error_model="numpy")
def exp32(x):
    kf = _k32(x)
    q = _expm1_red32(x, kf)
    k1 = np.floor(kf * _FH)
    res = (_F1 + q) * pow2(k1) * pow2(kf - k1)
    res = sel(x < np.float32(88.72283935546875), res, _FINF)
    res = sel(x > np.float32(-103.97208), res, _F0)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def expm132(x):
    kf = _k32(x)
    q = _expm1_red32(x, kf)
    kc = sel(kf < np.float32(127.0), kf, np.float32(127.0))
    s = pow2(kc)
    res = fma(s, q, s - _F1)
    k1 = np.floor(kf * _FH)
    res = sel(kf < np.float32(127.0), res, (_F1 + q) * pow2(k1) * pow2(kf - k1) - _F1)
    res = sel(kf == _F0, q, res)
    res = sel(x < np.float32(88.72283935546875), res, _FINF)
    res = sel(x > np.float32(-25.0), res, -_F1)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def log32(x):
    tiny = x < np.float32(1.17549435e-38)
    xs = sel(tiny, x * np.float32(33554432.0), x)
    e = exponent(xs) - sel(tiny, np.float32(25.0), _F0)
    m = mantissa(xs)
    big = m > np.float32(1.4142135623730951)
    m = sel(big, m * _FH, m)
    dk = sel(big, e + _F1, e)
    f = m - _F1
    s = f / (_F2 + f)
    z = s * s
    w = z * z
    t1 = w * fma(w, np.float32(0.24279078841), np.float32(0.40000972152))
    t2 = z * fma(w, np.float32(0.28498786688), np.float32(0.66666662693))
    R = t2 + t1
    hfsq = _FH * f * f
    res = dk * np.float32(6.9313812256e-01) - ((hfsq - (s * (hfsq + R) + dk * np.float32(9.0580006145e-06))) - f)
    res = sel(x < _FINF, res, _FINF)
    res = sel(x != _F0, res, -_FINF)
    res = sel(x >= _F0, res, _FNAN)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def log1p32(x):
    u = _F1 + x
    d = u - _F1
    res = log32(u) * (x / d)
    res = sel(d == _F0, x, res)
    res = sel(x < _FINF, res, _FINF)
    return sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def tanh32(x):
    xc = sel(x > np.float32(9.0), np.float32(9.0), x)  # tanh(9) is 1 in float32
    xc = sel(xc < np.float32(-9.0), np.float32(-9.0), xc)
    t = _F2 * xc
    kf = np.floor(t * _FLOG2E + _FH)
    kf = sel(kf == kf, kf, _F0)
    q = _expm1_red32(t, kf)
    s = pow2(kf)
    e = sel(kf == _F0, q, fma(s, q, s - _F1))
    return e / (e + _F2)


@njit(inline="always", error_model="numpy")
def logistic32(x):
    return _FH * tanh32(x * _FH) + _FH


# ---------------------------------------------------------------- floor division and remainder

# numpy's npy_divmod, case for case (numba's own `%` and `//` differ on signed zeros, and an
# integer division of the least integer by -1 traps): the remainder takes the divisor's sign
# (a zero one too), the quotient is snapped to the nearest integer, and a zero divisor gives
# fmod's nan and a / b, as numpy's. One pair per float width, so the constants keep its type.


def _float_divmod(zero, one, half):
    @njit(inline="always", error_model="numpy")
    def remainder(a, b):
        mod = np.fmod(a, b)
        if b == zero:
            return mod
        if mod != zero:
            if (b < zero) != (mod < zero):
                mod += b
        else:
            mod = np.copysign(zero, b)
        return mod

    @njit(inline="always", error_model="numpy")
    def floor_divide(a, b):
        if b == zero:
            return a / b
        mod = np.fmod(a, b)
        div = (a - mod) / b
        if mod != zero and (b < zero) != (mod < zero):
            div -= one
        if div == zero:
            return np.copysign(zero, a / b)
        q = np.floor(div)
        if div - q > half:
            q += one
        return q

    return remainder, floor_divide


remainder, floor_divide = _float_divmod(0.0, 1.0, 0.5)
remainder32, floor_divide32 = _float_divmod(_F0, _F1, _FH)


@njit(inline="always", error_model="numpy")
def iremainder(a, b):
    # numpy's integer remainder: 0 for a zero divisor, and for -1 (where the least integer traps)
    if b == 0 or b == -1:
        return a - a
    return a % b


@njit(inline="always", error_model="numpy")
def ifloor_divide(a, b):
    # numpy's integer floor division: 0 for a zero divisor; -a (wrapping) for -1
    if b == 0:
        return a - a
    if b == -1:
        return -a
    return a // b
