"""Traced values behave as numpy arrays in the small ways numpy code relies on: dtypes that are
numpy's, numpy's keyword arguments, ndarray methods, conversions, operators, and derivatives at
the edges as PyTorch defines them.

Each case runs the same function on plain numpy arrays and traced (through `gs.vjp`, which
returns the traced function's value), and compares values, dtypes and shapes; gradients are
compared with PyTorch's."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import gradserve as gs
from gradserve import numpy_api
from gradserve.numpy_api import ConcretizationTypeError

RNG = np.random.default_rng(18)
X = RNG.standard_normal((2, 3))
W = RNG.standard_normal((3, 4))
V = RNG.standard_normal(3)
I = np.array([[3, -7, 0], [5, 2, -4]])


def traced(f: Callable[..., Any], *args: Any) -> Any:
    """`f(*args)` computed by tracing `f` (its value, as the engine computes it)."""
    return gs.vjp(f, *args)[0]


def assert_same(got: Any, want: Any, what: str = "") -> None:
    """Equal values (to rounding), the same dtype and the same shape, leaf by leaf."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for g, w in zip(got, want, strict=True):
            assert_same(g, w, what)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, numpy's {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, numpy's {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=what)


def check(f: Callable[..., Any], *args: Any, what: str = "") -> None:
    assert_same(traced(f, *args), f(*args), what or inspect.getsource(f).strip())


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=True)


def torch_grad(f: Callable[..., torch.Tensor], *args: np.ndarray) -> list[np.ndarray]:
    ts = [t(a) for a in args]
    gs_ = torch.autograd.grad(f(*ts).sum(), ts, materialize_grads=True)
    return [g.detach().numpy() for g in gs_]


def assert_grads(got: Any, want: list[np.ndarray], what: str = "") -> None:
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-10, atol=1e-12, err_msg=what)


# ---------------------------------------------------------------- dtypes are numpy's


@pytest.mark.parametrize("a", [X, X.astype(np.float32), I.astype(np.int32), I, X > 0], ids=lambda a: str(a.dtype))
def test_dtype_is_a_numpy_dtype(a: np.ndarray) -> None:
    seen: dict[str, Any] = {}

    def f(x):
        seen.update(dtype=x.dtype, type=type(x.dtype), kind=x.dtype.kind, itemsize=x.itemsize, nbytes=x.nbytes,
                    size=x.size, ndim=x.ndim, shape=x.shape, eq=x.dtype == a.dtype.type,
                    floating=np.issubdtype(x.dtype, np.floating),
                    integer=np.issubdtype(x.dtype, np.integer), result=np.result_type(x, 1.0), shape_fn=np.shape(x),
                    ndim_fn=np.ndim(x), size_fn=np.size(x, 0), complexobj=np.iscomplexobj(x))
        return x

    gs.trace(f, a)
    assert isinstance(seen["dtype"], np.dtype) and seen["type"] is type(a.dtype)
    want = dict(dtype=a.dtype, type=type(a.dtype), kind=a.dtype.kind, itemsize=a.itemsize, nbytes=a.nbytes, size=a.size,
                ndim=a.ndim, shape=a.shape, eq=True, floating=np.issubdtype(a.dtype, np.floating),
                integer=np.issubdtype(a.dtype, np.integer), result=np.result_type(a, 1.0), shape_fn=a.shape, ndim_fn=a.ndim,
                size_fn=a.shape[0], complexobj=False)
    assert seen == want


def test_dtype_drives_numpy_code() -> None:
    """Code that branches on dtypes, as numpy code does, takes numpy's branch."""
    def f(x):
        eps = np.finfo(x.dtype).eps
        y = x.astype(np.float32) if x.dtype == np.float64 else x
        return np.zeros_like(y, dtype=y.dtype) + eps

    check(f, X)
    check(f, X.astype(np.float32))


# ---------------------------------------------------------------- numpy's keyword arguments

KEYWORD_CASES: list[tuple[str, Callable[..., Any]]] = [
    ("clip a_min a_max", lambda x: np.clip(x, a_min=0, a_max=1)),
    ("clip min only", lambda x: np.clip(x, min=-0.5)),
    ("clip max positional None", lambda x: np.clip(x, None, 0.3)),
    ("norm default", lambda x: np.linalg.norm(x)),
    ("norm ord=1 vector", lambda x: np.linalg.norm(x[0], ord=1)),
    ("norm ord=inf axis keepdims", lambda x: np.linalg.norm(x, ord=np.inf, axis=1, keepdims=True)),
    ("norm ord=-inf axis", lambda x: np.linalg.norm(x, ord=-np.inf, axis=0)),
    ("norm ord=0", lambda x: np.linalg.norm(x, ord=0, axis=-1)),
    ("norm ord=3", lambda x: np.linalg.norm(x, ord=3, axis=1)),
    ("norm fro", lambda x: np.linalg.norm(x, ord="fro", axis=(1, 0), keepdims=True)),
    ("norm matrix 1", lambda x: np.linalg.norm(x, ord=1)),
    ("norm matrix -inf", lambda x: np.linalg.norm(x, ord=-np.inf, axis=(1, 0))),
    ("swapaxes axis1 axis2", lambda x: np.swapaxes(x, axis1=0, axis2=1)),
    ("pad constant", lambda x: np.pad(x, 1, mode="constant")),
    ("pad per side", lambda x: np.pad(x, ((1, 2), (0, 1)), constant_values=((1.5, 2.0), (3.0, -4.0)))),
    ("pad edge", lambda x: np.pad(x, ((0, 2), (1, 1)), mode="edge")),
    ("pad reflect", lambda x: np.pad(x, 2, mode="reflect")),
    ("pad symmetric", lambda x: np.pad(x, (1, 3), mode="symmetric")),
    ("pad wrap", lambda x: np.pad(x, ((1, 0), (4, 2)), mode="wrap")),
    ("sum axis keepdims dtype", lambda x: np.sum(x, axis=0, keepdims=True, dtype=np.float32)),
    ("sum initial", lambda x: np.sum(x, axis=1, initial=2.0)),
    ("mean axis keepdims", lambda x: np.mean(x, axis=1, keepdims=True)),
    ("max axis keepdims", lambda x: np.max(x, axis=-1, keepdims=True)),
    ("var ddof", lambda x: np.var(x, axis=0, ddof=1)),
    ("cumsum dtype", lambda x: np.cumsum(x, axis=1, dtype=np.float32)),
    ("take axis", lambda x: np.take(x, [0, 2], axis=1)),
    ("concatenate axis None", lambda x: np.concatenate([x, x], axis=None)),
    ("concatenate dtype", lambda x: np.concatenate([x, x], axis=1, dtype=np.float32)),
    ("stack axis", lambda x: np.stack([x, 2 * x], axis=-1)),
    ("squeeze axis", lambda x: np.squeeze(x[None], axis=0)),
    ("transpose axes", lambda x: np.transpose(x, axes=(1, 0))),
    ("reshape shape order F", lambda x: np.reshape(x, shape=(3, 2), order="F")),
    ("expand_dims axis tuple", lambda x: np.expand_dims(x, axis=(0, 2))),
    ("zeros_like dtype", lambda x: np.zeros_like(x, dtype=np.int32)),
    ("ones_like shape", lambda x: np.ones_like(x, shape=(4,))),
    ("full_like", lambda x: np.full_like(x, 2.5)),
    ("round decimals", lambda x: np.round(x, decimals=1)),
    ("around negative decimals", lambda x: np.around(100 * x, -1)),
    ("astype function", lambda x: np.astype(x, np.float32)),
    ("ufunc dtype", lambda x: np.add(x, 1, dtype=np.float32)),
    ("ufunc neutral keywords", lambda x: np.multiply(x, 2, out=None, where=True, casting="same_kind")),
]


@pytest.mark.parametrize(("name", "f"), KEYWORD_CASES, ids=[n for n, _ in KEYWORD_CASES])
def test_numpy_keyword_arguments(name: str, f: Callable[..., Any]) -> None:
    check(f, X, what=name)


def test_keyword_gradients_match_torch() -> None:
    x = np.array([[0.0, 0.5, 1.0], [1.5, -0.2, 0.7]])  # clip's bounds attained: torch.clamp passes the gradient there
    cases = [
        (lambda x: np.clip(x, a_min=0, a_max=1), lambda x: torch.clamp(x, 0, 1)),
        (lambda x: np.linalg.norm(x, ord=3, axis=1), lambda x: torch.linalg.vector_norm(x, 3, dim=1)),
        (lambda x: np.linalg.norm(x, ord=1), lambda x: torch.linalg.matrix_norm(x, 1)),
        (lambda x: np.linalg.norm(x, ord=np.inf, axis=(0, 1)), lambda x: torch.linalg.matrix_norm(x, math.inf)),
        (lambda x: np.linalg.norm(x), lambda x: torch.linalg.norm(x)),
        # reflect padding gathers elements: each receives the cotangents of its copies
        (lambda x: np.pad(x, ((0, 0), (2, 2)), mode="reflect") ** 2,
         lambda x: torch.nn.functional.pad(x[None], (2, 2), mode="reflect")[0] ** 2),
    ]
    for f, tf in cases:
        assert_grads(gs.grad(lambda x, f=f: np.sum(f(x) * 1.5))(x), torch_grad(lambda x, tf=tf: tf(x) * 1.5, x),
                     inspect.getsource(f))


def test_norm_at_zero_has_torchs_zero_gradient() -> None:
    z = np.zeros(3)
    assert_grads(gs.grad(lambda x: np.linalg.norm(x))(z), torch_grad(torch.linalg.norm, z))
    assert np.all(np.asarray(gs.grad(lambda x: np.linalg.norm(x))(z)) == 0)


def test_keyword_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"numpy.sum\(\): out=.* is not supported on traced values \(a result is a new "
                                        r"traced value"):
        traced(lambda x: np.sum(x, out=np.zeros(())), X)
    with pytest.raises(TypeError, match=r"numpy.max.*out=.* is not supported on traced values"):
        traced(lambda x: np.max(x, out=np.zeros(())), X)
    with pytest.raises(TypeError, match=r"numpy.clip\(\): lo=0 is not supported on traced values"):
        traced(lambda x: np.clip(x, lo=0), X)
    with pytest.raises(TypeError, match=r"numpy.pad\(mode='median'\) is not supported on traced values.*'constant', 'edge'"):
        traced(lambda x: np.pad(x, 1, mode="median"), X)
    with pytest.raises(TypeError, match=r"Cannot cast ufunc 'add' input 0 from dtype\('float64'\) to dtype\('int64'\)"):
        traced(lambda x: np.add(x, 1, dtype=np.int64), X)


# numpy's arguments that traced values cannot honour, by function: each is refused by name
NOT_TAKEN = {"out", "order", "subok", "casting", "device", "copy", "like"}
NOT_TAKEN_BY = {np.max: {"initial", "where"}, np.min: {"initial", "where"}, np.amax: {"initial", "where"},
                np.amin: {"initial", "where"}, np.var: {"where", "mean", "correction"}, np.take: {"mode"}}


def test_every_dispatched_function_takes_numpys_keywords() -> None:
    """Every numpy function traced values answer takes numpy's own parameter names (bound against
    numpy's signature), apart from those that cannot apply to a traced value."""
    missing = {}
    for func, impl in numpy_api.FUNCTIONS.items():
        if isinstance(func, np.ufunc) or impl.__qualname__.startswith("_data_dependent_function"):
            continue  # ufuncs reach traced values through __array_ufunc__
        signatures = numpy_api._signatures(func, impl)
        assert signatures is not None, func
        sig, names, any_keyword = signatures
        params = list(sig.parameters.values())
        wanted = {p.name for i, p in enumerate(params) if i > 0 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        lacking = wanted - names - NOT_TAKEN - NOT_TAKEN_BY.get(func, set())
        if lacking and not any_keyword:
            missing[func.__name__] = sorted(lacking)
    assert missing == {}


# ---------------------------------------------------------------- ndarray methods

METHOD_CASES: list[tuple[str, Callable[..., Any]]] = [
    ("ravel", lambda x: x.ravel()), ("ravel F", lambda x: x.ravel("F")), ("flatten", lambda x: x.flatten()),
    ("sum axis", lambda x: x.sum(axis=0)), ("sum keepdims", lambda x: x.sum(1, keepdims=True)), ("mean", lambda x: x.mean()),
    ("max", lambda x: x.max()), ("min axis keepdims", lambda x: x.min(axis=1, keepdims=True)),
    ("clip", lambda x: x.clip(0, 1)), ("clip max", lambda x: x.clip(max=0.5)), ("dot", lambda x: x.dot(W)),
    ("astype", lambda x: x.astype(np.float32)), ("astype int", lambda x: (10 * x).astype(np.int32)),
    ("reshape ints", lambda x: x.reshape(3, 2)), ("reshape tuple -1", lambda x: x.reshape((1, -1))),
    ("reshape order F", lambda x: x.reshape(3, 2, order="F")), ("T", lambda x: x.T), ("mT", lambda x: x[None].mT),
    ("conj", lambda x: x.conj()), ("conjugate", lambda x: x.conjugate()), ("real", lambda x: x.real),
    ("imag", lambda x: x.imag), ("copy", lambda x: x.copy()), ("squeeze", lambda x: x[:, None].squeeze()),
    ("transpose ints", lambda x: x[None].transpose(2, 0, 1)), ("transpose tuple", lambda x: x.transpose((1, 0))),
    ("swapaxes", lambda x: x.swapaxes(0, 1)), ("cumsum", lambda x: x.cumsum(axis=0)), ("var ddof", lambda x: x.var(ddof=1)),
    ("round", lambda x: x.round(1)), ("take", lambda x: x.take([1, 0], axis=1)),
    ("attributes", lambda x: np.array([x.size, x.nbytes, x.ndim, x.itemsize, len(x)])),
]


@pytest.mark.parametrize(("name", "f"), METHOD_CASES, ids=[n for n, _ in METHOD_CASES])
def test_array_methods(name: str, f: Callable[..., Any]) -> None:
    check(f, X, what=name)


def test_method_gradients_match_torch() -> None:
    def f(x):
        return (x.clip(-0.5, 1.0).ravel().reshape(3, 2).T.dot(W).sum(axis=0) * x.mean()).max()

    def tf(x):
        return ((x.clamp(-0.5, 1.0).reshape(-1).reshape(3, 2).T @ torch.tensor(W)).sum(0) * x.mean()).max()

    assert_grads(gs.grad(f)(X), torch_grad(tf, X))


def test_item_and_tolist_need_the_value() -> None:
    with pytest.raises(ConcretizationTypeError, match=r"\.item\(\) of a traced value Traced<f64\[\]> \(at "
                                                      r"test_numpy_fidelity.py:\d+\) needs its value"):
        gs.grad(lambda x: x.sum().item())(X)
    with pytest.raises(ConcretizationTypeError, match=r"\.tolist\(\).*Keep computing with the array"):
        gs.grad(lambda x: x.tolist())(X)


# ---------------------------------------------------------------- conversions


@pytest.mark.parametrize(("convert", "fix"), [
    (float, "Keep computing with the array"), (int, "Keep computing with the array"),
    (complex, "Keep computing with the array"), (lambda v: v.item(), "Keep computing with the array"),
    (np.float64, "np.asarray"), (bool, "np.where"), (range, "np.take")], ids=["float", "int", "complex", "item",
                                                                          "np.float64", "bool", "range"])
def test_scalar_conversions_raise_naming_the_fix(convert: Callable[[Any], Any], fix: str) -> None:
    with pytest.raises(ConcretizationTypeError, match=r"Traced<f64\[\]> \(at test_numpy_fidelity.py:\d+\)") as e:
        gs.grad(lambda x: convert(x.sum()))(X)
    assert isinstance(e.value, TypeError) and isinstance(e.value, gs.GraphError) and fix in str(e.value)


def test_asarray_and_array_of_traced_values_stay_traced() -> None:
    seen = {}

    def f(x):
        a = np.asarray(x)
        b = np.array(x)
        if isinstance(x, numpy_api.Traced):  # (check runs f on numpy arrays too)
            seen.update(asarray_is_x=a is x, array_is_copy=b is not x and isinstance(b, numpy_api.Traced))
        b += 1  # a copy: x is untouched
        return a, b, np.asanyarray(x, dtype=np.float32), np.ascontiguousarray(x), np.array(x, ndmin=4)

    check(f, X)
    assert seen == {"asarray_is_x": True, "array_is_copy": True}
    assert np.asarray is np.asarray and type(np.asarray).__name__ == "builtin_function_or_method"  # restored after


@pytest.mark.parametrize(("name", "f"), [
    ("scalars", lambda x: np.array([x[0, 0], x[1, 2]])),
    ("nested with constants", lambda x: np.array([[x[0, 0], 1.0], [2.0, x[1, 1] * x[0, 1]]])),
    ("rows and an array", lambda x: np.array([x[0], np.ones(3), x[1]])),
    ("tuple, float32 with a float", lambda x: np.array((x.astype(np.float32)[0, 0], 1.5))),
    ("float32 scalars stay float32", lambda x: np.array([x.astype(np.float32)[0, 0], x.astype(np.float32)[1, 0]])),
    ("ints with a dtype", lambda x: np.asarray([(10 * x).astype(np.int32)[0, 0], 7], dtype=np.int64)),
])
def test_array_of_traced_scalars_stacks(name: str, f: Callable[..., Any]) -> None:
    check(f, X, what=name)


def test_array_of_traced_values_gradient_and_numpys_errors() -> None:
    assert_grads(gs.grad(lambda x: np.sum(np.array([x[0] * x[1], x[0] + x[1]]) ** 2))(V[:2]),
                 torch_grad(lambda x: torch.stack([x[0] * x[1], x[0] + x[1]]) ** 2, V[:2]))
    with pytest.raises(ValueError, match="inhomogeneous"):
        traced(lambda x: np.array([x[0], x[:2]]), V)


# ---------------------------------------------------------------- operators


@pytest.mark.parametrize("a", [X * 3, I, I.astype(np.int32)], ids=lambda a: str(a.dtype))
def test_remainder_floor_divide_divmod_abs_round(a: np.ndarray) -> None:
    d = np.array([2, -3, 4]) if a.dtype.kind == "i" else np.array([2.5, -1.5, 0.75])
    for what, f in [("%", lambda x: x % d), ("% scalar", lambda x: x % 3), ("r%", lambda x: 7 % (x + 10 * (x == 0))),
                    ("np.mod", lambda x: np.mod(x, d)), ("np.remainder", lambda x: np.remainder(x, -2)),
                    ("//", lambda x: x // d), ("r//", lambda x: 9 // (x + 10 * (x == 0))), ("divmod", lambda x: divmod(x, d)),
                    ("np.divmod", lambda x: np.divmod(x, 3)), ("abs", abs), ("np.round", np.round),
                    ("round of a scalar", lambda x: round(x.sum() / 7, 2)), ("np.floor_divide", lambda x: np.floor_divide(x, d))]:
        check(f, a, what=f"{what} {a.dtype}")


def test_division_by_zero_and_signed_zeros_as_numpy() -> None:
    a = np.array([1.0, -1.0, 0.0, -0.0, 3.0, np.inf])
    b = np.array([0.0, 0.0, -2.0, 2.0, -0.0, 2.0])
    with np.errstate(all="ignore"):
        for f in (lambda x, y: x % y, lambda x, y: x // y):
            got, want = traced(f, a, b), f(a, b)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    ints = np.array([7, -7, np.iinfo(np.int64).min, 5])
    with np.errstate(all="ignore"):
        check(lambda x, y: (x // y, x % y), ints, np.array([0, -1, -1, -2]))


def test_remainder_and_power_gradients_match_torch() -> None:
    x, y = X * 3, np.array([2.5, -1.5, 0.75])
    assert_grads(gs.grad(lambda x, y: np.sum(x % y), argnums=(0, 1))(x, y),
                 torch_grad(lambda x, y: torch.remainder(x, y), x, y))
    assert_grads(gs.grad(lambda x: np.sum(x // 0.7 * x))(x), torch_grad(lambda x: torch.floor(x / 0.7) * x, x))
    base = np.array([0.5, 2.0, 3.0])
    assert_grads(gs.grad(lambda e: np.sum(base ** e))(V), torch_grad(lambda e: torch.tensor(base) ** e, V))
    assert_grads(gs.grad(lambda e: np.sum(2.0 ** e))(V), torch_grad(lambda e: 2.0 ** e, V))
    assert_grads(gs.grad(lambda b, e: np.sum(np.abs(b) ** e), argnums=(0, 1))(X, X[::-1]),
                 torch_grad(lambda b, e: torch.abs(b) ** e, X, X[::-1]))


def test_integer_power_stays_integer() -> None:
    check(lambda x: x ** 2, I)
    check(lambda x: x ** np.array([0, 1, 3]), I.astype(np.int32))
    check(lambda x: 2 ** np.abs(x), I)


def test_comparison_chains_and_logical_operators() -> None:
    with pytest.raises(ConcretizationTypeError, match=r"truth value.*comparison chain.*\(a < x\) & \(x < b\)"):
        traced(lambda x: 0 < x < 1, X)
    with pytest.raises(ConcretizationTypeError, match="truth value"):
        traced(lambda x: x > 0 and x < 1, X)
    check(lambda x: ((x > 0) & (x < 1), (x < 0) | (x > 1), ~(x > 0), (x > 0) ^ (x > 0.5)), X)
    check(lambda x: (np.logical_and(x, x > 0), np.logical_or(x > 0, 0), np.logical_not(x), np.logical_xor(x > 0, x < 1)), X)
    check(lambda x: np.where((x > -0.5) & (x < 0.5), x, 0.0), X)
    with pytest.raises(TypeError, match="boolean operands"):
        traced(lambda x: x & 3, I)


@pytest.mark.parametrize(("name", "a", "b"), [
    ("1-D @ 2-D", V, W), ("2-D @ 1-D", X, V), ("1-D @ 1-D", V, V[::-1]), ("batched @ 1-D", np.stack([X, 2 * X]), V),
    ("1-D @ batched", V[:2], np.stack([X, -X]))])
def test_matmul_with_1d_operands(name: str, a: np.ndarray, b: np.ndarray) -> None:
    check(lambda x, y: x @ y, a, b, what=name)
    check(lambda x, y: np.matmul(x, y), a, b, what=name)
    assert_grads(gs.grad(lambda x, y: np.sum((x @ y) ** 2), argnums=(0, 1))(a, b),
                 torch_grad(lambda x, y: (x @ y) ** 2, a, b), name)


def test_in_place_operators_are_functional_updates() -> None:
    def f(x):
        y = x.copy()
        y += 1
        y *= x
        y -= 0.5
        y /= 2.0
        y **= 2
        y //= 0.3
        y %= 7.0
        z = x  # a second name of the same array: numpy's in-place update shows through it
        z += 10
        return x, y, z

    def tf(x):
        y = torch.remainder(torch.floor((((x + 1) * x - 0.5) / 2.0) ** 2 / 0.3), 7.0)
        return (x + 10) * (x + 10) + y

    check(lambda x: f(x.copy()), X)
    assert_grads(gs.grad(lambda x: (lambda r: np.sum(r[0] * r[2] + r[1]))(f(x)))(X), torch_grad(tf, X))

    def g(x):
        i = (10 * x).astype(np.int64)
        i += 3
        i //= 2
        i %= 5
        m = x > 0
        m &= x < 1
        m |= x < -1
        m ^= x > 1.5
        f32 = x.astype(np.float32)
        f32 += x  # float64 computed, cast back to float32 (same kind)
        a = np.zeros((2, 3)) + x
        a @= np.eye(3)
        return i, m, f32, a

    check(g, X)


def test_in_place_operators_refuse_as_numpy() -> None:
    def cast_up(x):
        i = (10 * x).astype(np.int64)
        i += 1.5
        return i

    with pytest.raises(TypeError, match=r"Cannot cast ufunc output from dtype\('float64'\) to dtype\('int64'\)"):
        traced(cast_up, X)
    with pytest.raises(TypeError, match=r"Cannot cast ufunc 'add' output from dtype\('float64'\) to dtype\('int64'\)"):
        cast_up(X)

    def grow(x):
        v = x[0].copy()
        v += x
        return v

    with pytest.raises(ValueError, match="non-broadcastable output operand with shape"):
        traced(grow, X)
    with pytest.raises(ValueError, match="non-broadcastable output operand with shape"):
        grow(X)


def test_item_assignment_is_a_functional_update() -> None:
    mask = X > 0.5

    def f(x):
        y = x.copy()
        y[0] = 0.0
        y[1, ::2] = x[0, :2] * 3
        y[:, 1] += 1  # numpy's y.__setitem__(k, y[k] + 1)
        y[mask] = -1.0  # a constant mask
        return y

    def tf(x):
        y = x.clone()
        y[0] = 0.0
        y[1, ::2] = x[0, :2] * 3
        y[:, 1] += 1
        y[torch.tensor(mask)] = -1.0
        return y

    def g(x):
        y = np.zeros_like(x) + x
        y[[0, 1, 0], [2, 2, 2]] = x[1, :3] * 2  # repeated positions: the last write wins, as numpy's
        y[...] = y * 2
        i = (10 * x).astype(np.int32)
        i[1] = x[0] * 3.7  # cast to the target's dtype, as numpy's assignment casts
        j = i.copy()
        j.fill(4)
        return y, i, j

    check(f, X)
    check(g, X)
    assert_grads(gs.grad(lambda x: np.sum(f(x) ** 2))(X), torch_grad(lambda x: tf(x) ** 2, X))
    with pytest.raises(TypeError, match="assignment at traced indices"):
        traced(lambda x: f(x).__setitem__(x > 0, 0.0), X)


# ---------------------------------------------------------------- derivatives at the edges, as torch's


def torch_derivatives(f: Callable[[torch.Tensor], torch.Tensor], x: float, order: int) -> list[float]:
    """d^k f / dx^k at x for k = 1..order, by torch (a derivative with no graph is 0)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y, out = f(xt), []
    for _ in range(order):
        if not y.requires_grad:
            out.append(0.0)
            y = torch.zeros((), dtype=torch.float64)
            continue
        (y,) = torch.autograd.grad(y, xt, create_graph=True, materialize_grads=True)
        out.append(float(y.detach()))
    return out


def gs_derivatives(f: Callable[[Any], Any], x: float, order: int) -> list[float]:
    out, g = [], f
    for _ in range(order):
        g = gs.grad(g)
        out.append(float(g(x)))
    return out


@pytest.mark.parametrize(("name", "f", "tf", "x", "order"), [
    ("x**0 at 0", lambda x: x ** 0, lambda x: x ** 0, 0.0, 3),
    ("x**0.0 at 0", lambda x: x ** 0.0, lambda x: x ** 0.0, 0.0, 3),
    ("x**1 at 0", lambda x: x ** 1, lambda x: x ** 1, 0.0, 2),
    ("x**2 at 0", lambda x: x ** 2, lambda x: x ** 2, 0.0, 3),
    ("abs at 0", abs, torch.abs, 0.0, 2),
    ("sqrt at 0", np.sqrt, torch.sqrt, 0.0, 1),
    ("log1p near 0", np.log1p, torch.log1p, 1e-12, 3),
    ("expm1 near 0", np.expm1, torch.expm1, -3e-11, 3),
    ("log1p of a subnormal", np.log1p, torch.log1p, 5e-310, 2),
])
def test_derivatives_at_the_edges_match_torch(name: str, f: Callable, tf: Callable, x: float, order: int) -> None:
    got, want = gs_derivatives(f, x, order), torch_derivatives(tf, x, order)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0, err_msg=name)


def test_log1p_expm1_values_keep_full_precision_near_zero() -> None:
    x = np.array([1e-300, -1e-20, 3e-16, -2.5e-12, 1e-8, 5e-310])
    for fn in (np.log1p, np.expm1):
        got = traced(fn, x)
        np.testing.assert_array_equal(got, fn(x))  # x itself to full precision, where log(1 + x) would give 0
    assert_grads(gs.grad(lambda x: np.sum(np.log1p(x) + np.expm1(x)))(x),
                 torch_grad(lambda x: torch.log1p(x) + torch.expm1(x), x))


def test_max_min_ties_split_the_gradient_evenly_as_torch() -> None:
    """gradserve's convention, torch's: a reduction's cotangent is shared evenly by the positions
    that attain the extremum (torch.amax; JAX's max gives it to them all), and np.maximum's ties
    give each operand half (torch.maximum)."""
    a = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    b = np.array([[1.0, 0.0, 3.0], [2.5, 2.0, -1.0]])
    cases = [
        (lambda x: np.max(x), lambda x: torch.amax(x)),
        (lambda x: np.max(x, axis=1), lambda x: torch.amax(x, 1)),
        (lambda x: np.min(x, axis=0, keepdims=True), lambda x: torch.amin(x, 0, keepdim=True)),
        (lambda x: x.max() * 2, lambda x: torch.max(x) * 2),
    ]
    for f, tf in cases:
        assert_grads(gs.grad(lambda x, f=f: np.sum(f(x)))(a), torch_grad(tf, a), inspect.getsource(f))
    assert_grads(gs.grad(lambda x, y: np.sum(np.maximum(x, y) * 3), argnums=(0, 1))(a, b),
                 torch_grad(lambda x, y: torch.maximum(x, y) * 3, a, b))
    assert_grads(gs.grad(lambda x, y: np.sum(np.minimum(x, y)), argnums=(0, 1))(a, b),
                 torch_grad(torch.minimum, a, b))


@pytest.mark.parametrize(("name", "f", "safe"), [
    ("sqrt of a negative", lambda x: np.where(x > 0, np.sqrt(x), 0.0),
     lambda x: torch.where(x > 0, torch.sqrt(torch.where(x > 0, x, 1.0)), 0.0)),
    ("log of 0 and negatives", lambda x: np.where(x > 0, np.log(x) * x, 0.0),
     lambda x: torch.where(x > 0, torch.log(torch.where(x > 0, x, 1.0)) * x, 0.0)),
    ("a chain after the nan", lambda x: np.where(x > 0, np.tanh(np.sqrt(x)) ** 2, x),
     lambda x: torch.where(x > 0, torch.tanh(torch.sqrt(torch.where(x > 0, x, 1.0))) ** 2, x)),
    ("division by 0", lambda x: np.where(x != 0, 1.0 / x, 0.0),
     lambda x: torch.where(x != 0, 1.0 / torch.where(x != 0, x, 1.0), 0.0)),
    ("overflow to inf", lambda x: np.where(x < 100, np.exp(x * 10), 0.0),
     lambda x: torch.where(x < 100, torch.exp(torch.where(x < 100, x, 0.0) * 10), 0.0)),
    ("power", lambda x: np.where(x > 0, x ** 0.5 + x ** -1.0, 1.0),
     lambda x: torch.where(x > 0, torch.where(x > 0, x, 1.0) ** 0.5 + torch.where(x > 0, x, 1.0) ** -1.0, 1.0)),
])
def test_where_unselected_nan_does_not_poison_the_gradient(name: str, f: Callable, safe: Callable) -> None:
    """The gradient of np.where(c, f(x), g(x)) is what the double-where trick gives in torch (and
    JAX): a branch's non-finite values where it is not selected leave no nan, at any order."""
    x = np.array([-2.0, -0.0, 0.0, 0.25, 1.5, 1e3])
    got = np.asarray(gs.grad(lambda x: np.sum(f(x)))(x))
    assert np.isfinite(got).all(), got
    assert_grads(got, torch_grad(safe, x), name)
    tx = t(x)
    (g,) = torch.autograd.grad(safe(tx).sum(), tx, create_graph=True)
    hvp_want = torch.autograd.grad(g.sum(), tx, materialize_grads=True)[0].numpy()
    np.testing.assert_allclose(np.asarray(gs.hvp(lambda x: np.sum(f(x)), (x,), (np.ones_like(x),))[0]), hvp_want,
                               rtol=1e-10, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------- remote


def remote_sample(x, w):
    y = x.copy()
    y += np.clip(x, a_min=-0.5, a_max=0.5) % 0.3
    z = np.array([y[0].sum(), y[1].max(), np.linalg.norm(y, ord=1)])
    return np.sum(np.where(y > 0, np.sqrt(y), 0.0) @ w) * z.mean() + np.sum(y.ravel().reshape(3, 2).T ** 2)


def test_remote_path_matches_local(remote) -> None:
    assert_grads(remote.grad(remote_sample, argnums=(0, 1))(X, W), list(gs.grad(remote_sample, argnums=(0, 1))(X, W)))
    v, _ = remote.vjp(lambda x: (x // 0.4, divmod(x, 0.7), x.astype(np.float32).round(1), x.T @ V[:2]), X)
    assert_same(v, (X // 0.4, divmod(X, 0.7), X.astype(np.float32).round(1), X.T @ V[:2]))
