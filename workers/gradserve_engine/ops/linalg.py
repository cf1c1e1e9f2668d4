"""Linear algebra primitives: batched matrix multiplication, and the decompositions and solves
of `numpy.linalg` (as JAX's `lax.linalg`), batched over leading axes as numpy's.

The IR's nodes have one result each, so a decomposition with several factors packs them along
its second-to-last axis, and the SDK slices them apart: `eigh` gives (..., n+1, n) (the
eigenvalues, then the eigenvectors as columns), `svd` (..., m+1+n, k) (U, the singular values,
then V — not Vᵀ — with k = min(m, n)), `qr` (..., m+n, n) (Q, then R; m >= n), `slogdet`
(..., 2) (the sign, then log|det|). One node then yields every factor, and its VJP receives the
cotangents of all of them at once.

Conventions, chosen so results are the same on every backend and derivatives are defined:
`cholesky` and `eigh` read the symmetric part ½(A + Aᵀ) of their operand (as JAX), so their
gradients are symmetric; eigenvectors and singular vectors are signed so that each (left)
vector's entry of largest magnitude is positive (LAPACK leaves those signs to the algorithm; QR's
Householder signs are LAPACK's own, numpy's). A singular matrix to solve with, or
one not positive definite for `cholesky`, raises `LinAlgError` when the graph runs, as numpy
does. Derivatives through eigenvectors and singular vectors are those of distinct eigenvalues
(singular values): where two coincide, the coupling term between them is dropped (set to zero),
which is exact for any function that does not depend on the choice of basis within the
degenerate subspace (norms, pseudo-inverses, projectors); otherwise the derivative does not exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import LinAlgError, ShapeError
from . import emit as e
from .core import Primitive, broadcast_shapes, need, register, size_of, ufunc
from .dtypes import FLOATS, NUMERIC, AVal
from .sharding import SUM, ShardContext, ShardState, refuse, sum_refused


def _matmul_rule(a: AVal, b: AVal) -> AVal:
    if a[0] != b[0]:
        raise ShapeError(f"matmul operands have different dtypes {a[0]} and {b[0]}")
    need(a[0], NUMERIC, "matmul operands")
    if len(a[1]) < 2 or len(b[1]) < 2:
        raise ShapeError(f"matmul primitive needs rank >= 2 operands, got {a[1]} and {b[1]}")
    if a[1][-1] != b[1][-2]:
        raise ShapeError(f"matmul contracting dimensions differ: {a[1]} @ {b[1]}")
    return (a[0], (*broadcast_shapes(a[1][:-2], b[1][:-2]), a[1][-2], b[1][-1]))


def _swap(a: Any) -> Any:
    perm = list(range(a.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return e.bind("transpose", a, perm=tuple(perm))


def _vjp_matmul(g: Any, a: Any, b: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [e.unbroadcast(e.bind("matmul", g, _swap(b)), a.shape, nb) if need[0] else None,
            e.unbroadcast(e.bind("matmul", _swap(a), g), b.shape, nb) if need[1] else None]


def _jvp_matmul(ts: Sequence[Any], a: Any, b: Any, *, out: Any) -> Any:
    terms = []
    if ts[0] is not None:
        terms.append(e.bind("matmul", ts[0], b))
    if ts[1] is not None:
        terms.append(e.bind("matmul", a, ts[1]))
    t = terms[0] if len(terms) == 1 else e.add(terms[0], terms[1])
    return e.broadcast_to(t, out.shape)


def _flops_matmul(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return 2.0 * math.prod(out[1]) * ins[0][1][-1]


def _shard_matmul(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
    nd = len(n.shape)
    ra, rb = ctx.aval(n.inputs[0])[1], ctx.aval(n.inputs[1])[1]
    sa, sb = ins
    pa = None if sa is None else sa[1] - len(ra)  # negative position: -1 columns, -2 rows
    pb = None if sb is None else sb[1] - len(rb)
    if pa == -1 and pb == -2:
        return SUM  # contraction over the examples: a sum of per-example products
    if pa == -1 or pb == -2:
        raise refuse(n, "matmul contracts the batch axis of one operand with a non-batch axis of the other")
    out_axes = set()
    if pa is not None:
        out_axes.add(nd - 2 if pa == -2 else nd + pa)
    if pb is not None:
        out_axes.add(nd - 1 if pb == -1 else nd + pb)
    if len(out_axes) != 1:
        raise refuse(n, "both operands of matmul are batched along different axes")
    return ("b", out_axes.pop())


register(Primitive(
    "matmul", 2, {}, _matmul_rule, ufunc("matmul"), _vjp_matmul, _jvp_matmul, flops=_flops_matmul, out=True,
    shard=_shard_matmul, shard_sum=sum_refused))


# ---------------------------------------------------------------- helpers over the last two axes


def _mm(a: Any, b: Any) -> Any:
    return e.bind("matmul", a, b)


def _const(like: Any, value: Any) -> Any:
    return like.builder.const(np.asarray(value, like.dtype))


def _diag(x: Any) -> Any:
    """(..., n, n) -> (..., n): the diagonal."""
    return e.bind("reduce_sum", e.mul(x, _const(x, np.eye(x.shape[-1]))), axes=(x.ndim - 1,), keepdims=False)


def _diag_embed(v: Any) -> Any:
    """(..., n) -> (..., n, n): the diagonal matrix of `v`."""
    return e.mul(e.bind("expand_dims", v, axes=(v.ndim,)), _const(v, np.eye(v.shape[-1])))


def _trace(x: Any) -> Any:
    d = _diag(x)
    return e.bind("reduce_sum", d, axes=(d.ndim - 1,), keepdims=False)


def _masked(x: Any, mask: np.ndarray) -> Any:
    return e.mul(x, _const(x, mask))


def _tril(x: Any, k: int = 0) -> Any:
    return _masked(x, np.tri(x.shape[-2], x.shape[-1], k))


def _phi(x: Any) -> Any:
    """The lower triangle with the diagonal halved (the Cholesky factor's derivative)."""
    n = x.shape[-1]
    return _masked(x, np.tri(n) - 0.5 * np.eye(n))


def _sym(x: Any) -> Any:
    return e.mul(e.add(x, _swap(x)), 0.5)


def _rows(x: Any, lo: int, hi: int) -> Any:
    """Rows lo..hi of the matrices (axis -2): one factor of a packed decomposition."""
    nd = x.ndim
    return e.bind("slice", x, starts=tuple(lo if i == nd - 2 else 0 for i in range(nd)),
                  stops=tuple(hi if i == nd - 2 else d for i, d in enumerate(x.shape)), steps=(1,) * nd)


def _row(x: Any, i: int) -> Any:
    return e.bind("squeeze", _rows(x, i, i + 1), axes=(x.ndim - 2,))


def _last(x: Any, i: int) -> Any:
    """Entry i of the last axis, which goes away."""
    nd = x.ndim
    part = e.bind("slice", x, starts=tuple(i if k == nd - 1 else 0 for k in range(nd)),
                  stops=tuple(i + 1 if k == nd - 1 else d for k, d in enumerate(x.shape)), steps=(1,) * nd)
    return e.bind("squeeze", part, axes=(nd - 1,))


def _as_row(v: Any) -> Any:
    return e.bind("expand_dims", v, axes=(v.ndim - 1,))


def _pack(*parts: Any) -> Any:
    """Matrices stacked along axis -2 (their leading axes broadcast), as the decompositions pack
    their factors."""
    nd = max(p.ndim for p in parts)
    lead = broadcast_shapes(*(p.shape[:-2] for p in parts))
    return e.bind("concatenate", *(e.broadcast_to(p, (*lead, *p.shape[-2:])) for p in parts), axis=nd - 2)


def _scale_cols(x: Any, v: Any) -> Any:
    """x @ diag(v)."""
    return e.mul(x, e.bind("expand_dims", v, axes=(v.ndim - 1,)))


def _scale_rows(x: Any, v: Any) -> Any:
    """diag(v) @ x."""
    return e.mul(x, e.bind("expand_dims", v, axes=(v.ndim,)))


def _safe_recip(x: Any) -> Any:
    """1 / x, and 0 where x == 0 (with a finite derivative there too)."""
    zero = e.eq(x, 0.0)
    return e.select(zero, 0.0, e.div(1.0, e.select(zero, 1.0, x)))


def _gap_recip(w: Any) -> Any:
    """F[..., i, j] = 1 / (w_j - w_i), 0 where w_j == w_i (the diagonal, and coinciding values)."""
    return _safe_recip(e.sub(e.bind("expand_dims", w, axes=(w.ndim - 1,)), e.bind("expand_dims", w, axes=(w.ndim,))))


def _inv(a: Any) -> Any:
    return e.bind("solve", a, _const(a, np.eye(a.shape[-1])))


def _right_solve(b: Any, r: Any, transpose: bool) -> Any:
    """b @ r⁻¹ (or b @ r⁻ᵀ with `transpose`), by solving with the transposed system."""
    return _swap(e.bind("solve", r if transpose else _swap(r), _swap(b)))


# ---------------------------------------------------------------- rules shared by the decompositions


def _square(x: AVal, name: str) -> None:
    need(x[0], FLOATS, f"{name} operand")
    if len(x[1]) < 2 or x[1][-1] != x[1][-2]:
        raise ShapeError(f"{name} needs square matrices in its last two axes, got shape {x[1]}")


def _matrices(x: AVal, name: str) -> None:
    need(x[0], FLOATS, f"{name} operand")
    if len(x[1]) < 2:
        raise ShapeError(f"{name} needs matrices (rank >= 2), got shape {x[1]}")


def _flops_cubic(c: float) -> Callable[[Sequence[AVal], AVal, Mapping[str, Any]], float]:
    """c * n³ per matrix of the first operand (n its larger side), plus one pass over the result."""
    def flops(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
        shape = ins[0][1]
        n = max(shape[-2:])
        return c * math.prod(shape[:-2]) * n ** 3 + size_of(out)

    return flops


def _shard_batched(core: Sequence[int], out_core: int = 2) -> Callable[[ShardContext, Any, list[ShardState]], ShardState]:
    """Ops over the last `core[k]` axes of operand k (`out_core` of the result), batched over the
    leading ones: examples stay apart when each sharded operand is sharded along a leading axis,
    all of them the same axis of the result."""
    def shard(ctx: ShardContext, n: Any, ins: list[ShardState]) -> ShardState:
        lead = len(n.shape) - out_core
        axes = set()
        for k, st in enumerate(ins):
            if st is None:
                continue
            nd = len(ctx.aval(n.inputs[k])[1])
            if st[1] >= nd - core[k]:
                raise refuse(n, f"{n.op} mixes the rows or columns of a matrix, and the batch axis is one of them")
            axes.add(st[1] + lead - (nd - core[k]))
        if len(axes) != 1:
            raise refuse(n, "operands are batched along different axes")
        return ("b", axes.pop())

    return shard


def _kernel(name: str, what: str, fn: Callable[[ModuleType], Callable[..., Any]]) -> Callable[[ModuleType], Any]:
    """A kernel whose numpy failure (a singular matrix, ...) is the engine's LinAlgError naming the op."""
    def factory(xp: ModuleType) -> Any:
        f = fn(xp)

        def kernel(*xs: Any) -> Any:
            try:
                return f(*xs)
            except np.linalg.LinAlgError as exc:
                raise LinAlgError(f"{name}: {what} ({exc})") from None

        return kernel

    return factory


def _swapped(xp: ModuleType, a: Any) -> Any:
    return xp.swapaxes(a, -1, -2)


def _signed(xp: ModuleType, v: Any) -> Any:
    """The sign of each column that makes its entry of largest magnitude positive."""
    if v.shape[-2] == 0:
        return xp.ones((*v.shape[:-2], 1, v.shape[-1]), v.dtype)
    idx = xp.argmax(xp.abs(v), axis=-2)[..., None, :]
    s = xp.sign(xp.take_along_axis(v, idx, axis=-2))
    return xp.where(s == 0, 1, s).astype(v.dtype)


# ---------------------------------------------------------------- solve


def _solve_rule(a: AVal, b: AVal) -> AVal:
    if a[0] != b[0]:
        raise ShapeError(f"solve operands have different dtypes {a[0]} and {b[0]}")
    _square(a, "solve")
    if len(b[1]) < 2 or b[1][-2] != a[1][-1]:
        raise ShapeError(f"solve: the right-hand side {b[1]} must be matrices with {a[1][-1]} rows, as {a[1]} has")
    return (a[0], (*broadcast_shapes(a[1][:-2], b[1][:-2]), *b[1][-2:]))


def _vjp_solve(g: Any, a: Any, b: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    gb = e.bind("solve", _swap(a), g)  # Aᵀ⁻¹ g
    ga = e.unbroadcast(e.neg(_mm(gb, _swap(out))), a.shape, nb) if need[0] else None  # -Aᵀ⁻¹ g Xᵀ
    return [ga, e.unbroadcast(gb, b.shape, nb) if need[1] else None]


def _jvp_solve(ts: Sequence[Any], a: Any, b: Any, *, out: Any) -> Any:
    rhs = ts[1]
    if ts[0] is not None:
        t = _mm(ts[0], out)
        rhs = e.neg(t) if rhs is None else e.sub(rhs, t)
    return e.broadcast_to(e.bind("solve", a, rhs), out.shape)


def _flops_solve(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    n, k = out[1][-2], out[1][-1]
    return math.prod(out[1][:-2]) * (2.0 / 3.0 * n ** 3 + 2.0 * n * n * k)


register(Primitive(
    "solve", 2, {}, _solve_rule, _kernel("solve", "the matrix is singular", lambda xp: xp.linalg.solve),
    _vjp_solve, _jvp_solve, flops=_flops_solve, shard=_shard_batched((2, 2)), shard_sum=lambda n, ins: ins[0] is None))


# ---------------------------------------------------------------- cholesky


def _cholesky_rule(a: AVal) -> AVal:
    _square(a, "cholesky")
    return a


def _cholesky_kernel(xp: ModuleType) -> Callable[..., Any]:
    return lambda a: xp.linalg.cholesky((a + _swapped(xp, a)) * a.dtype.type(0.5))


def _vjp_cholesky(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    lt = _swap(out)
    p = _phi(_mm(lt, _tril(g)))  # the cotangent's upper triangle meets entries that are always zero
    s = e.bind("solve", lt, p)  # L⁻ᵀ P
    return [_sym(_right_solve(s, out, transpose=False))]  # L⁻ᵀ P L⁻¹, symmetrised


def _jvp_cholesky(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    x = e.bind("solve", out, _sym(ts[0]))  # L⁻¹ dA
    x = _swap(e.bind("solve", out, _swap(x)))  # L⁻¹ dA L⁻ᵀ
    return _mm(out, _phi(x))


register(Primitive(
    "cholesky", 1, {}, _cholesky_rule, _kernel("cholesky", "the matrix is not positive definite", _cholesky_kernel),
    _vjp_cholesky, _jvp_cholesky, flops=_flops_cubic(1.0 / 3.0), shard=_shard_batched((2,)), shard_sum=sum_refused))


# ---------------------------------------------------------------- det and slogdet


def _det_rule(a: AVal) -> AVal:
    _square(a, "det")
    return (a[0], a[1][:-2])


def _expand2(x: Any) -> Any:
    return e.bind("expand_dims", x, axes=(x.ndim, x.ndim + 1))


def _vjp_det(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [e.mul(_expand2(e.mul(g, out)), _swap(_inv(a)))]  # d det = det · A⁻ᵀ


def _jvp_det(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    return e.mul(out, _trace(e.bind("solve", a, ts[0])))


register(Primitive(
    "det", 1, {}, _det_rule, lambda xp: xp.linalg.det, _vjp_det, _jvp_det, flops=_flops_cubic(2.0 / 3.0),
    shard=_shard_batched((2,), 0), shard_sum=sum_refused))


def _slogdet_rule(a: AVal) -> AVal:
    _square(a, "slogdet")
    return (a[0], (*a[1][:-2], 2))


def _slogdet_kernel(xp: ModuleType) -> Callable[..., Any]:
    def kernel(a: Any) -> Any:
        sign, logabs = xp.linalg.slogdet(a)
        return xp.stack([sign, logabs], axis=-1).astype(a.dtype, copy=False)

    return kernel


def _vjp_slogdet(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    return [e.mul(_expand2(_last(g, 1)), _swap(_inv(a)))]  # the sign is locally constant


def _jvp_slogdet(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    t = e.bind("expand_dims", _trace(e.bind("solve", a, ts[0])), axes=(a.ndim - 2,))
    return e.bind("concatenate", e.zeros(t.shape, t.dtype, t), t, axis=t.ndim - 1)


register(Primitive(
    "slogdet", 1, {}, _slogdet_rule, _slogdet_kernel, _vjp_slogdet, _jvp_slogdet, flops=_flops_cubic(2.0 / 3.0),
    shard=_shard_batched((2,), 1), shard_sum=sum_refused))


# ---------------------------------------------------------------- eigh


def _eigh_rule(a: AVal) -> AVal:
    _square(a, "eigh")
    return (a[0], (*a[1][:-2], a[1][-1] + 1, a[1][-1]))


def _eigh_kernel(xp: ModuleType) -> Callable[..., Any]:
    def kernel(a: Any) -> Any:
        w, v = xp.linalg.eigh((a + _swapped(xp, a)) * a.dtype.type(0.5))
        return xp.concatenate([w[..., None, :], v * _signed(xp, v)], axis=-2)

    return kernel


def _eigh_parts(x: Any) -> tuple[Any, Any]:
    n = x.shape[-1]
    return _row(x, 0), _rows(x, 1, n + 1)


def _vjp_eigh(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    w, v = _eigh_parts(out)
    gw, gv = _eigh_parts(g)
    inner = e.add(_diag_embed(gw), e.mul(_gap_recip(w), _mm(_swap(v), gv)))
    return [_sym(_mm(_mm(v, inner), _swap(v)))]


def _jvp_eigh(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    w, v = _eigh_parts(out)
    m = _mm(_mm(_swap(v), _sym(ts[0])), v)
    return _pack(_as_row(_diag(m)), _mm(v, e.mul(_gap_recip(w), m)))


register(Primitive(
    "eigh", 1, {}, _eigh_rule, _kernel("eigh", "the eigenvalues did not converge", _eigh_kernel), _vjp_eigh, _jvp_eigh,
    flops=_flops_cubic(9.0), shard=_shard_batched((2,)), shard_sum=sum_refused))


# ---------------------------------------------------------------- svd


def _svd_rule(a: AVal) -> AVal:
    _matrices(a, "svd")
    m, n = a[1][-2:]
    return (a[0], (*a[1][:-2], m + 1 + n, min(m, n)))


def _svd_kernel(xp: ModuleType) -> Callable[..., Any]:
    def kernel(a: Any) -> Any:
        u, s, vh = xp.linalg.svd(a, full_matrices=False)
        sign = _signed(xp, u)
        return xp.concatenate([u * sign, s[..., None, :], _swapped(xp, vh) * sign], axis=-2)

    return kernel


def _svd_parts(x: Any, m: int) -> tuple[Any, Any, Any]:
    return _rows(x, 0, m), _row(x, m), _rows(x, m + 1, x.shape[-2])


def _vjp_svd(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    m, n = a.shape[-2:]
    k = min(m, n)
    u, s, v = _svd_parts(out, m)
    gu, gs, gv = _svd_parts(g, m)
    f = _gap_recip(e.mul(s, s))
    utgu, vtgv = _mm(_swap(u), gu), _mm(_swap(v), gv)
    j = e.mul(f, e.sub(utgu, _swap(utgu)))
    kk = e.mul(f, e.sub(vtgv, _swap(vtgv)))
    inner = e.add(e.add(_scale_cols(j, s), _diag_embed(gs)), _scale_rows(kk, s))
    ga = _mm(_mm(u, inner), _swap(v))
    s_inv = _safe_recip(s)
    if m > k:  # (I - U Uᵀ) gU S⁻¹ Vᵀ
        ga = e.add(ga, _mm(_scale_cols(e.sub(gu, _mm(u, utgu)), s_inv), _swap(v)))
    if n > k:  # U S⁻¹ gVᵀ (I - V Vᵀ)
        ga = e.add(ga, _mm(u, _scale_rows(_swap(e.sub(gv, _mm(v, vtgv))), s_inv)))
    return [ga]


def _jvp_svd(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    m, n = a.shape[-2:]
    k = min(m, n)
    u, s, v = _svd_parts(out, m)
    da = ts[0]
    ds = _mm(_mm(_swap(u), da), v)
    f = _gap_recip(e.mul(s, s))
    dss, sds = _scale_cols(ds, s), _scale_rows(ds, s)
    du = _mm(u, e.mul(f, e.add(dss, _swap(dss))))
    dv = _mm(v, e.mul(f, e.add(sds, _swap(sds))))
    s_inv = _safe_recip(s)
    if m > k:
        dav = _mm(da, v)
        du = e.add(du, _scale_cols(e.sub(dav, _mm(u, ds)), s_inv))
    if n > k:
        datu = _mm(_swap(da), u)
        dv = e.add(dv, _scale_cols(e.sub(datu, _mm(v, _swap(ds))), s_inv))
    return _pack(du, _as_row(_diag(ds)), dv)


register(Primitive(
    "svd", 1, {}, _svd_rule, _kernel("svd", "the singular values did not converge", _svd_kernel), _vjp_svd, _jvp_svd,
    flops=_flops_cubic(12.0), shard=_shard_batched((2,)), shard_sum=sum_refused))


# ---------------------------------------------------------------- qr


def _qr_rule(a: AVal) -> AVal:
    _matrices(a, "qr")
    m, n = a[1][-2:]
    if m < n:
        raise ShapeError(f"the qr primitive needs m >= n (tall or square matrices), got shape {a[1]}; "
                         "a wide matrix's factors are those of its leading square block")
    return (a[0], (*a[1][:-2], m + n, n))


def _qr_kernel(xp: ModuleType) -> Callable[..., Any]:
    def kernel(a: Any) -> Any:
        q, r = xp.linalg.qr(a)
        return xp.concatenate([q, r], axis=-2)

    return kernel


def _qr_parts(x: Any, m: int) -> tuple[Any, Any]:
    return _rows(x, 0, m), _rows(x, m, x.shape[-2])


def _vjp_qr(g: Any, a: Any, *, out: Any, need: Sequence[bool], nb: int) -> list[Any]:
    q, r = _qr_parts(out, a.shape[-2])
    gq, gr = _qr_parts(g, a.shape[-2])
    m = e.sub(_mm(r, _swap(gr)), _mm(_swap(gq), q))
    copyltu = e.add(_tril(m), _swap(_tril(m, -1)))
    return [_right_solve(e.add(gq, _mm(q, copyltu)), r, transpose=True)]


def _jvp_qr(ts: Sequence[Any], a: Any, *, out: Any) -> Any:
    q, r = _qr_parts(out, a.shape[-2])
    dx_rinv = _right_solve(ts[0], r, transpose=False)
    qt = _mm(_swap(q), dx_rinv)
    low = _tril(qt, -1)
    do = e.sub(low, _swap(low))
    dq = e.add(_mm(q, e.sub(do, qt)), dx_rinv)
    dr = _mm(e.sub(qt, do), r)
    return _pack(dq, dr)


register(Primitive(
    "qr", 1, {}, _qr_rule, _kernel("qr", "the factorisation failed", _qr_kernel), _vjp_qr, _jvp_qr,
    flops=_flops_cubic(4.0 / 3.0), shard=_shard_batched((2,)), shard_sum=sum_refused))
