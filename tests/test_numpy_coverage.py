"""numpy's everyday functions on traced values: each case is one function written with plain
`np.<name>` calls, run by numpy on arrays (the reference) and traced by gradserve. Values must
agree in float32 and float64 (dtype and shape too); gradients agree with central finite
differences (float64) and with PyTorch where it has the function; a few second derivatives
and a few calls through the server are checked too. README's coverage list is checked against
the dispatch tables here."""

from __future__ import annotations

import math
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numeric import EPS, fd_gradient

import gradserve as gs
from gradserve.numpy_api import FUNCTIONS, UFUNCS

FLT = ("float32", "float64")
VALUE_TOL = {"float32": (2e-6, 2e-6), "float64": (1e-12, 1e-13)}
TORCH_TOL = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12)}


@dataclass(frozen=True)
class Case:
    name: str
    f: Callable[..., Any]  # plain numpy code: the reference on arrays, traced on traced values
    shapes: tuple[tuple[int, ...], ...]
    domain: str = "real"
    torch: Callable[..., Any] | None = None  # the same in PyTorch, for the gradient
    grad: bool = True  # differentiable (False: integer or boolean results, or zero gradient)

    def __repr__(self) -> str:
        return self.name


def sample(name: str, dtype: str, shapes: tuple[tuple[int, ...], ...], domain: str) -> list[np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    out = []
    for shape in shapes:
        n = math.prod(shape)
        if domain == "distinct":  # no ties: sorts, medians and extrema have one derivative
            v = (rng.permutation(n).reshape(shape) - n // 2) * 0.37 + rng.uniform(-0.1, 0.1, shape)
        elif domain == "pos":
            v = rng.uniform(0.5, 2.0, shape)
        elif domain == "unit":
            v = rng.uniform(-0.9, 0.9, shape)
        elif domain == "gt1":
            v = rng.uniform(1.2, 3.0, shape)
        elif domain == "nonzero":
            v = rng.uniform(0.3, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        elif domain == "frac":
            v = rng.integers(-3, 3, shape) + rng.uniform(0.1, 0.9, shape)
        elif domain == "nan":  # some NaNs among finite values
            v = rng.uniform(-1.5, 1.5, shape)
            v[rng.random(shape) < 0.3] = np.nan
        else:
            v = rng.uniform(-1.5, 1.5, shape)
        out.append(np.asarray(v, dtype=dtype))
    return out


W = np.array([0.5, 1.0, 2.0, 1.5])  # average's weights


CASES = [
    # ---- elementwise: primitives
    *(Case(n, f, ((2, 3),), d, t) for n, f, d, t in (
        ("arcsin", np.arcsin, "unit", torch.asin), ("arccos", np.arccos, "unit", torch.acos),
        ("arctan", np.arctan, "real", torch.atan), ("sinh", np.sinh, "real", torch.sinh),
        ("cosh", np.cosh, "real", torch.cosh), ("arcsinh", np.arcsinh, "real", torch.asinh),
        ("arccosh", np.arccosh, "gt1", torch.acosh), ("arctanh", np.arctanh, "unit", torch.atanh),
        ("exp2", np.exp2, "real", torch.exp2), ("log2", np.log2, "pos", torch.log2),
        ("log10", np.log10, "pos", torch.log10), ("cbrt", np.cbrt, "nonzero", None),
    )),
    *(Case(n, f, ((2, 3), (3,)), d, t) for n, f, d, t in (
        ("hypot", np.hypot, "nonzero", torch.hypot), ("logaddexp", np.logaddexp, "real", torch.logaddexp),
        ("logaddexp2", np.logaddexp2, "real", torch.logaddexp2), ("fmod", np.fmod, "nonzero", torch.fmod),
        ("remainder", np.remainder, "nonzero", torch.remainder), ("mod", np.mod, "nonzero", torch.remainder),
    )),
    # ---- elementwise: compositions
    Case("reciprocal", np.reciprocal, ((2, 3),), "nonzero", torch.reciprocal),
    Case("sinc", np.sinc, ((2, 3),), "real", torch.sinc),
    Case("sinc-at-0", lambda x: np.sinc(x * 0), ((3,),), "real", grad=False),
    Case("heaviside", lambda x, y: np.heaviside(np.round(x), y), ((2, 3), (3,)), "real", grad=False),
    *(Case(n, f, ((2, 3),), "frac", grad=False) for n, f in (
        ("round", np.round), ("round-2", lambda x: np.round(x * 7, 2)), ("round--1", lambda x: np.round(x * 70, -1)),
        ("around", np.around), ("rint", np.rint), ("trunc", np.trunc), ("fix", np.fix), ("floor", np.floor),
        ("ceil", np.ceil),
    )),
    *(Case(n, f, ((2, 3),), "nan", grad=False) for n, f in (
        ("isnan", np.isnan), ("isinf", lambda x: np.isinf(x / 0.5 + np.isnan(x))), ("isfinite", np.isfinite),
        ("signbit", np.signbit), ("where-isnan", lambda x: np.where(np.isnan(x), 0.0, x)),
    )),
    # ---- reductions
    Case("prod", np.prod, ((2, 3),), "real", torch.prod),
    Case("prod-axis", lambda x: np.prod(x, axis=1, keepdims=True), ((3, 5),), "real", lambda x: torch.prod(x, 1, True)),
    Case("prod-zeros", lambda x: np.prod(x * (np.abs(x) > 0.5), axis=0), ((4, 3),), "real"),
    Case("prod-where", lambda x: np.prod(x, axis=0, where=x > 0), ((3, 2),), "real"),
    Case("cumprod", lambda x: np.cumprod(x, axis=1), ((2, 5),), "real", lambda x: torch.cumprod(x, 1)),
    Case("cumprod-flat", np.cumprod, ((2, 3),), "real"),
    Case("std", np.std, ((3, 4),), "real", lambda x: torch.std(x, correction=0)),
    Case("std-ddof", lambda x: np.std(x, axis=0, ddof=1), ((3, 4),), "real", lambda x: torch.std(x, 0, correction=1)),
    Case("var-ddof", lambda x: np.var(x, 1, None, None, 1, True), ((3, 4),), "real",
         lambda x: torch.var(x, 1, correction=1, keepdim=True)),
    Case("var-where", lambda x: np.var(x, axis=1, where=x > -1), ((3, 4),), "real"),
    Case("argmax", lambda x: np.argmax(x, axis=1), ((3, 4),), "distinct", grad=False),
    Case("argmin", np.argmin, ((3, 4),), "distinct", grad=False),
    Case("argmax-ties-nan", lambda x: np.argmax(np.round(x), axis=0, keepdims=True), ((4, 3),), "nan", grad=False),
    Case("any-all", lambda x: np.stack([np.any(x > 1, axis=0), np.all(x > -1, axis=0)]), ((3, 4),), "real",
         grad=False),
    Case("any-where", lambda x: np.any(x > 1, where=x < 1.4), ((3, 4),), "real", grad=False),
    Case("logical", lambda x: np.stack([np.logical_and(x > 0, x < 1), np.logical_or(x, x > 1),
                                        np.logical_xor(x > 0, np.round(x)), np.logical_not(x > 0.5)]), ((2, 3),),
         "frac", grad=False),
    Case("nansum", lambda x: np.nansum(x, axis=1), ((3, 4),), "nan"),
    Case("nanmean", np.nanmean, ((3, 4),), "nan"),
    Case("sum-where", lambda x: np.sum(x, axis=0, where=x > 0), ((3, 4),), "real"),
    Case("mean-where", lambda x: np.mean(x, axis=1, where=x > -1), ((3, 4),), "real"),
    Case("max-where", lambda x: np.max(x, axis=0, where=x < 1, initial=-5.0), ((3, 4),), "distinct"),
    Case("min-where", lambda x: np.min(x, where=x > -1, initial=5.0), ((3, 4),), "distinct"),
    Case("ptp", lambda x: np.ptp(x, axis=1), ((3, 4),), "distinct"),
    Case("median-odd", lambda x: np.median(x, axis=1), ((2, 5),), "distinct", lambda x: torch.quantile(x, 0.5, 1)),
    Case("median-even", np.median, ((2, 3),), "distinct", lambda x: torch.quantile(x, 0.5)),
    Case("median-nan", lambda x: np.median(x, axis=0), ((3, 4),), "nan", grad=False),
    Case("quantile", lambda x: np.quantile(x, [0.1, 0.5, 0.9], axis=0), ((5, 2),), "distinct",
         lambda x: torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype), 0)),
    Case("quantile-keepdims", lambda x: np.quantile(x, 0.3, axis=(0, 2), keepdims=True), ((2, 3, 2),), "distinct"),
    *(Case(f"quantile-{m}", lambda x, m=m: np.quantile(x, [0.25, 0.5, 0.6], method=m), ((7,),), "distinct")
      for m in ("lower", "higher", "nearest", "midpoint")),
    Case("percentile", lambda x: np.percentile(x, 30), ((3, 4),), "distinct"),
    Case("average", lambda x: np.average(x, axis=1, weights=W), ((3, 4),), "real"),
    Case("average-traced-weights", lambda x, w: np.average(x, weights=w), ((2, 3), (2, 3)), "pos"),
    # ---- shape and order
    Case("ravel", lambda x: np.ravel(x.T), ((2, 3),), "real", lambda x: torch.ravel(x.T)),
    Case("ravel-F", lambda x: np.ravel(x, order="F"), ((2, 3),), "real"),
    Case("tile", lambda x: np.tile(x, (2, 1, 3)), ((2, 3),), "real", lambda x: torch.tile(x, (2, 1, 3))),
    Case("repeat", lambda x: np.repeat(x, 3, axis=1), ((2, 3),), "real",
         lambda x: torch.repeat_interleave(x, 3, 1)),
    Case("repeat-counts", lambda x: np.repeat(x, [1, 0, 2]), ((3,),), "real"),
    Case("flip", lambda x: np.flip(x), ((2, 3),), "real", lambda x: torch.flip(x, (0, 1))),
    Case("fliplr-flipud", lambda x: np.fliplr(x) * np.flipud(x), ((2, 3),), "real"),
    Case("roll", lambda x: np.roll(x, 2, axis=1), ((2, 3),), "real", lambda x: torch.roll(x, 2, 1)),
    Case("roll-flat", lambda x: np.roll(x, (-1, 4), axis=(0, 1)) + np.roll(x, 7), ((2, 3),), "real"),
    Case("diff", lambda x: np.diff(x, axis=0), ((3, 4),), "real", lambda x: torch.diff(x, dim=0)),
    Case("diff-2", lambda x: np.diff(x, n=2, prepend=0.5, append=x[:, :1]), ((3, 4),), "real"),
    Case("outer", np.outer, ((3,), (2, 2)), "real", lambda a, b: torch.outer(a, b.ravel())),
    Case("kron", np.kron, ((2, 3), (2, 2)), "real", torch.kron),
    Case("kron-ranks", np.kron, ((3,), (2, 2)), "real"),
    Case("triu", lambda x: np.triu(x, 1), ((3, 4),), "real", lambda x: torch.triu(x, 1)),
    Case("tril", lambda x: np.tril(x, -1), ((2, 3, 3),), "real", lambda x: torch.tril(x, -1)),
    Case("diag", lambda x: np.diag(x, -1), ((3,),), "real", lambda x: torch.diag(x, -1)),
    Case("diag-of-2d", lambda x: np.diag(x, 1), ((3, 4),), "real", lambda x: torch.diag(x, 1)),
    Case("diagonal", lambda x: np.diagonal(x, -1, 2, 0), ((3, 2, 4),), "real",
         lambda x: torch.diagonal(x, -1, 2, 0)),
    Case("trace", np.trace, ((3, 4),), "real", torch.trace),
    Case("split", lambda x: np.split(x, 2, axis=1)[1] * np.array_split(x, 3, axis=1)[0], ((1, 4),), "real"),
    Case("array_split", lambda x: np.concatenate(np.array_split(x, [1, 3])[::-1]), ((5,),), "real"),
    Case("moveaxis", lambda x: np.moveaxis(x, [0, 1], [-1, 0]), ((2, 3, 4),), "real",
         lambda x: torch.movedim(x, (0, 1), (-1, 0))),
    Case("atleast", lambda x: np.atleast_3d(x) * np.atleast_2d(x[0]).sum() + np.atleast_1d(x[0, 0]).sum(), ((2, 3),),
         "real"),
    Case("meshgrid", lambda x, y: np.meshgrid(x, y)[0] * np.meshgrid(x, y, indexing="ij")[1].T, ((3,), (2,)), "real"),
    Case("sort", lambda x: np.sort(x, axis=0), ((3, 4),), "distinct", lambda x: torch.sort(x, 0).values),
    Case("sort-flat", lambda x: np.sort(x, axis=None), ((3, 4),), "distinct"),
    Case("argsort", lambda x: np.argsort(x, axis=1), ((3, 4),), "distinct", grad=False),
    Case("take_along_axis", lambda x: np.take_along_axis(x, np.argsort(x, axis=1)[:, ::-1], axis=1), ((3, 4),),
         "distinct"),
    Case("take_along_axis-const", lambda x: np.take_along_axis(x, np.array([[0, -1, 1]]), axis=1), ((2, 3),), "real"),
    *(Case(f"einsum[{sub}]", lambda *xs, sub=sub: np.einsum(sub, *xs), shapes, "real",
           lambda *xs, sub=sub: torch.einsum(sub, *xs))
      for sub, shapes in (("ij,jk->ik", ((2, 3), (3, 4))), ("bij,bjk->bik", ((2, 2, 3), (2, 3, 2))),
                          ("ii->i", ((3, 3),)), ("ii", ((3, 3),)), ("ba", ((2, 3),)), ("i,j->ij", ((3,), (2,))),
                          ("...ij,jk", ((2, 2, 3), (3, 2))), ("ij,ij->ij", ((1, 3), (2, 3))),
                          ("iij->ji", ((2, 2, 3),)), ("ij,jk,kl->il", ((2, 3), (3, 4), (4, 2))),
                          ("ab,bc,ca", ((2, 3), (3, 2), (2, 2))))),
    Case("array-likes", lambda x: np.outer(x, [1.0, 2.0]) + np.kron([1, 1], x)[:3, None]
         + np.take_along_axis(x[:, None], np.zeros((3, 1), np.uint8), 0) + np.searchsorted([0.0, 0.5], x)[:, None],
         ((3,),), "real"),
    Case("searchsorted", lambda a, v: np.searchsorted(np.sort(a), v, side="right"), ((5,), (2, 3)), "real",
         grad=False),
]
CASE_IDS = [c.name for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def assert_close(got: Any, want: Any, dtype: str, tol: dict, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, numpy {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, numpy {want.dtype}"
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    rtol, atol = tol[dtype]
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", FLT)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_value_matches_numpy(case: Case, dtype: str) -> None:
    arrays = sample(case.name, dtype, case.shapes, case.domain)
    with np.errstate(all="ignore"):
        want = case.f(*arrays)
    got, _ = gs.vjp(case.f, *arrays)
    assert_close(got, want, dtype, VALUE_TOL, case.name)


GRAD_CASES = [c for c in CASES if c.grad]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_gradient_matches_finite_differences(case: Case) -> None:
    arrays = sample(case.name, "float64", case.shapes, case.domain)
    out, vjp_fn = gs.vjp(case.f, *arrays)
    ct = np.random.default_rng(zlib.crc32(case.name.encode())).standard_normal(np.shape(out))
    got = vjp_fn(ct)
    for p, want in enumerate(fd_gradient(case.f, arrays, ct)):
        np.testing.assert_allclose(got[p], want, rtol=1e-6, atol=1e-7, err_msg=f"{case.name}: gradient of operand {p}")


TORCH_CASES = [(c, dt) for c in CASES if c.grad and c.torch is not None for dt in FLT]


@pytest.mark.parametrize(("case", "dtype"), TORCH_CASES, ids=[f"{c.name}-{dt}" for c, dt in TORCH_CASES])
def test_gradient_matches_torch(case: Case, dtype: str) -> None:
    arrays = sample(case.name, dtype, case.shapes, case.domain)
    out, vjp_fn = gs.vjp(case.f, *arrays)
    ct = np.random.default_rng(zlib.crc32(f"{case.name}/{dtype}".encode())).standard_normal(np.shape(out)).astype(dtype)
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    t_out = case.torch(*ts)
    # (numpy may promote where torch does not: np.quantile(float32, [list]) is float64)
    assert_close(out, t_out.detach().numpy().astype(out.dtype), dtype, TORCH_TOL, f"{case.name}: value")
    want = torch.autograd.grad(t_out, ts, torch.tensor(ct), allow_unused=True, materialize_grads=True)
    for p, (g, w) in enumerate(zip(vjp_fn(ct), want, strict=True)):
        assert_close(g, w.numpy(), dtype, TORCH_TOL, f"{case.name}: gradient of operand {p} against torch")


# ---------------------------------------------------------------- integer operands: numpy's dtypes and values

INT_CASES = [
    Case("fmod-int", np.fmod, ((2, 3), (3,)), "int"),
    Case("remainder-int", lambda x, y: np.remainder(x, y) + np.mod(-x, 3), ((2, 3), (3,)), "int"),
    Case("prod-int", lambda x: np.prod(x, axis=0), ((3, 4),), "int"),
    Case("cumprod-int", np.cumprod, ((2, 3),), "int"),
    Case("argmax-bool", lambda x: np.argmax(x > 0, axis=1), ((3, 4),), "int"),
    Case("any-all-int", lambda x: np.stack([np.any(x, axis=0), np.all(x, axis=0)]), ((3, 4),), "int"),
    Case("round-int", lambda x: np.round(x * 7, -1) + np.round(x, 2), ((2, 3),), "int"),
    Case("quantile-int", lambda x: np.quantile(x, [0.2, 0.5], axis=1), ((3, 4),), "int"),
    Case("quantile-int-lower", lambda x: np.median(x) + np.quantile(x, 0.5, method="lower"), ((3, 4),), "int"),
    Case("nansum-int", lambda x: np.nansum(x, axis=1), ((3, 4),), "int"),
    Case("sort-int", lambda x: np.sort(x, axis=0) * np.argsort(x, axis=None, kind="stable").reshape(x.shape),
         ((3, 4),), "int"),
    Case("diff-bool", lambda x: np.diff(x > 0, axis=1), ((3, 4),), "int"),
    Case("tril-bool", lambda x: np.tril(x > 0) * np.trace(x), ((3, 3),), "int"),
    Case("diag-bool", lambda x: np.diag(x > 0), ((3,),), "int"),
]


@pytest.mark.parametrize("dtype", ("int32", "int64"))
@pytest.mark.parametrize("case", INT_CASES, ids=[c.name for c in INT_CASES])
def test_integer_value_matches_numpy(case: Case, dtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{case.name}/{dtype}".encode()))
    arrays = [rng.integers(-5, 6, s).astype(dtype) for s in case.shapes]
    if case.name.startswith(("fmod", "remainder")):
        arrays[1][arrays[1] == 0] = 3  # numpy's integer division by zero warns and gives 0
    want = case.f(*arrays)
    got = gs.vjp(case.f, *arrays)[0]
    assert_close(got, want, "float64", VALUE_TOL, case.name)


# ---------------------------------------------------------------- second order


SECOND_ORDER = {
    "sort": lambda x: np.sum(np.cos(np.sort(x)) * np.arange(1.0, 7.0)),
    "median": lambda x: np.cos(np.median(x)) * np.sum(x * x),
    "quantile": lambda x: np.sum(np.sin(np.quantile(x, [0.3, 0.8]))),
    "prod-with-a-zero": lambda x: np.prod(x * np.array([1, 1, 0, 1, 1, 1])),
    "cumprod": lambda x: np.sum(np.cumprod(x) * np.arange(6.0)),
    "std": lambda x: np.std(x, ddof=1) * np.sum(x),
    "logaddexp": lambda x: np.sum(np.logaddexp(x, x[::-1]) ** 2),
    "logaddexp2": lambda x: np.sum(np.logaddexp2(x, 2 * x) ** 2),
    "sinc-at-0": lambda x: np.sum(np.sinc(x)),  # x[1] == 0: d2/dx2 sinc(0) = -pi^2 / 3
    "hypot-fmod": lambda x: np.sum(np.hypot(x, 1.5) * np.fmod(x, 0.7)),
    "einsum": lambda x: np.einsum("i,j,ij->", x, np.cos(x), np.outer(x, x)),
}


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_hessian_matches_finite_differences_of_the_gradient(name: str) -> None:
    f = SECOND_ORDER[name]
    x = np.array([0.3, 0.0, -0.45, 0.8, 0.61, 0.35])
    hess = gs.hessian(f)(x)
    grad = gs.grad(f)
    want = np.stack([(grad(x + EPS * e) - grad(x - EPS * e)) / (2 * EPS) for e in np.eye(x.size)], axis=-1)
    np.testing.assert_allclose(hess, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_second_derivatives_at_a_logaddexp_tie_and_sinc_at_zero() -> None:
    """The points where a composition would get them wrong: logaddexp(x, y) at x == y has Hessian
    [[1, -1], [-1, 1]] / 4, and sinc''(0) = -pi^2 / 3."""
    h = gs.hessian(lambda v: np.logaddexp(v[0], v[1]))(np.array([0.7, 0.7]))
    np.testing.assert_allclose(h, np.array([[1, -1], [-1, 1]]) / 4, rtol=1e-12)
    np.testing.assert_allclose(gs.hessian(np.sinc)(0.0), -np.pi ** 2 / 3, rtol=1e-9)


# ---------------------------------------------------------------- clear errors


def test_what_cannot_be_traced_says_why() -> None:
    x = np.arange(6.0).reshape(2, 3)
    cases = [
        (lambda x: np.quantile(x, x[0, 0]), TypeError, "q must be known while tracing"),
        (lambda x: np.quantile(x, 1.5), ValueError, r"Quantiles must be in the range \[0, 1\]"),
        (lambda x: np.quantile(x, 0.5, method="weibull"), ValueError, "method 'weibull' is not supported"),
        (lambda x: np.max(x, where=x > 1), ValueError, "to use a where mask one has to specify 'initial'"),
        (lambda x: np.repeat(x, np.argmax(x)), IndexError, "depends on the data"),
        (lambda x: np.reciprocal(np.argsort(x)), TypeError, "reciprocal of integers truncates"),
        (lambda x: np.sort(x, order="a"), TypeError, "order= .* not supported"),
        (lambda x: np.take_along_axis(x, np.array([0, 1]), axis=1), ValueError, "same number of dimensions"),
        (lambda x: np.take_along_axis(x, np.array([[0.5]]), axis=1), IndexError, "integer array"),
        (lambda x: np.split(x, 2, axis=1), ValueError, "does not result in an equal division"),
        (lambda x: np.argmax(x[:, :0], axis=1), ValueError, "argmax of an empty sequence"),
        (lambda x: np.diagonal(x[0]), ValueError, "at least two dimensions"),
        (lambda x: np.searchsorted(x, x[0]), Exception, "1-D sorted operand"),
        (lambda x: np.einsum("ij,jk", x, x), ValueError, "subscript 'j' has sizes 3 and 2"),
        (lambda x: np.einsum("ij->k", x), ValueError, "output subscript 'k'"),
        (lambda x: np.einsum("ij,j", x), ValueError, "2 operand subscripts"),
        (lambda x: np.einsum("...i->i", x), ValueError, "must keep the '...' dimensions"),
        (lambda x: np.einsum(x, [0, 1]), TypeError, "as a string"),
    ]
    for f, err, says in cases:
        with pytest.raises(err, match=says):
            gs.vjp(f, x)


def test_an_index_out_of_range_raises_when_the_graph_runs() -> None:
    def f(x):
        return np.take_along_axis(x, np.argsort(x, axis=1) + 1, axis=1)

    with pytest.raises(Exception, match="out of bounds"):
        gs.vjp(f, np.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------- imperative tensors and the server


def test_imperative_tensors_take_the_same_functions() -> None:
    x = np.array([[0.3, -1.2, 0.8], [1.1, 0.2, -0.4]])
    t = gs.tensor(x, requires_grad=True)
    (gs.sum(np.sort(t, axis=1) * np.arange(3.0)) + np.median(t) + gs.prod(t)).backward()
    want = gs.grad(lambda v: gs.sum(np.sort(v, axis=1) * np.arange(3.0)) + np.median(v) + gs.prod(v))(x)
    np.testing.assert_allclose(t.grad, want, rtol=1e-12)


# every primitive this family of functions added, in one function: the server's op allow-list is
# the registry, so registering and differentiating this graph remotely checks that it accepts them
NEW_PRIMITIVES = {"arcsin", "arccos", "sinh", "cosh", "arcsinh", "arccosh", "arctanh", "exp2", "log2", "log10", "cbrt",
                  "hypot", "fmod", "logaddexp", "logaddexp2", "trunc", "rint", "isnan", "isinf", "isfinite",
                  "signbit", "argsort", "searchsorted"}


def everything(x, y):
    u = np.tanh(x) * 0.9
    elementwise = (np.arcsin(u) + np.arccos(u) + np.sinh(x) + np.cosh(y) + np.arcsinh(x) + np.arccosh(2 + y * y)
                   + np.arctanh(u) + np.exp2(x) + np.log2(1 + y * y) + np.log10(2 + x * x) + np.cbrt(x)
                   + np.hypot(x, y) + np.fmod(x, 0.7) + np.remainder(y, 0.4) + np.logaddexp(x, y) + np.logaddexp2(x, y)
                   + np.trunc(x) + np.rint(y) + np.sinc(x))
    flags = np.logical_or(np.logical_or(np.isnan(x), np.isinf(y)), np.logical_xor(np.isfinite(x), np.signbit(y)))
    reductions = (np.std(x, ddof=1) + np.prod(y) + np.median(x) + np.quantile(y, 0.3) + np.ptp(x)
                  + np.average(x, weights=np.arange(1.0, 7.0)) + np.nansum(np.where(flags, np.nan, y)))
    order = np.sort(x) * np.cumprod(y) + np.searchsorted(np.sort(y), x) + np.argmax(x) + np.roll(np.diff(x, prepend=0), 2)
    return np.sum(elementwise * order) + reductions + np.trace(np.outer(x, y)) + np.sum(np.triu(np.kron(x[:2], y[:3])))


def test_every_new_primitive_runs_on_the_server(remote) -> None:
    x = np.array([0.3, -1.2, 0.8, 1.1, 0.2, -0.4])
    y = np.array([0.55, 0.9, -0.7, 1.3, -0.25, 0.6])  # away from rint's and searchsorted's jumps
    assert {n.op for n in gs.trace(everything, x, y).nodes} >= NEW_PRIMITIVES
    want = gs.value_and_grad(everything, argnums=(0, 1))(x, y)
    got = remote.value_and_grad(everything, argnums=(0, 1))(x, y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    fd = fd_gradient(everything, [x, y], np.ones(()))
    for g, w in zip(got[1], fd, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- README's list


def _function_name(fn: Callable[..., Any]) -> str:
    return (fn.__module__.removeprefix("numpy").lstrip(".") + "." + fn.__name__).lstrip(".")


def coverage_block() -> str:
    """README's list of numpy names, from the dispatch tables themselves."""
    refused = sorted(_function_name(f) for f, impl in FUNCTIONS.items()
                     if impl.__qualname__.startswith("_data_dependent_function"))
    complex_results = sorted(_function_name(f) for f, impl in FUNCTIONS.items()
                             if impl.__qualname__.startswith("_complex_result_function"))
    functions = sorted({_function_name(f) for f in FUNCTIONS} - set(refused) - set(complex_results))

    def para(title: str, names: list[str]) -> str:
        return textwrap.fill(title + ", ".join(f"`{n}`" for n in names) + ".", width=100, break_on_hyphens=False)

    return "\n\n".join([para("ufuncs (`np.<name>(x)` and `gs.<name>(x)`): ", sorted(UFUNCS)),
                         para("functions (`np.<name>(x)`): ", functions),
                         para("refused, because the result's shape depends on the data: ", refused),
                         para("refused, because their values are complex (`gs.fft` takes real and imaginary parts): ",
                              complex_results)])


def test_readme_lists_exactly_the_numpy_names_that_trace() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- numpy-coverage -->\n", "\n<!-- /numpy-coverage -->"
    assert start in text and end in text, "README.md lost its numpy coverage list"
    listed = text[text.index(start) + len(start):text.index(end)].strip()
    want = coverage_block()
    assert listed == want, "README.md's numpy coverage list is out of date; it should read:\n\n" + want
