"""numpy.linalg and numpy.fft on traced values: each case is written with plain `np.linalg.<name>`
calls (run by numpy on arrays as the reference, traced by gradserve), or for the FFT as
`gs.fft.<name>_parts` against numpy's complex transform. Values agree with numpy in float32 and
float64 (batched where numpy batches); gradients agree with central finite differences (float64)
and PyTorch (both dtypes); det and inv to second order; singular, non-square and non-positive-
definite operands get numpy's errors; a few cases run through the server."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from numeric import EPS, assert_close, fd_gradient

import gradserve as gs
from gradserve_engine.errors import LinAlgError
from gradserve_engine.shard import ShardError, analyze

FLT = ("float32", "float64")
VALUE_TOL = {"float32": (2e-5, 2e-5), "float64": (1e-11, 1e-12)}
TORCH_TOL = {"float32": (2e-4, 2e-5), "float64": (1e-9, 1e-11)}


@dataclass(frozen=True)
class Case:
    name: str
    f: Callable[..., Any]  # traced by gradserve (and, unless `ref` is given, numpy's reference on arrays)
    shapes: tuple[tuple[int, ...], ...]
    domain: str = "real"
    torch: Callable[..., Any] | None = None  # the same in PyTorch, for the gradient
    ref: Callable[..., Any] | None = None  # numpy's reference, where `f` is not plain numpy code

    def __repr__(self) -> str:
        return self.name


def sample(name: str, dtype: str, shapes: tuple[tuple[int, ...], ...], domain: str) -> list[np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    out = []
    for shape in shapes:
        if domain == "invertible":  # well conditioned, determinants of either sign
            v = rng.uniform(-0.5, 0.5, shape) + np.eye(*shape[-2:]) * shape[-1]
            v = v * rng.choice([-1.0, 1.0], (*shape[:-1], 1))
        elif domain == "spd":
            m = rng.uniform(-1.0, 1.0, shape)
            v = m @ np.swapaxes(m, -1, -2) + np.eye(shape[-1])
        elif domain == "distinct-sv":  # singular values 1, 2, ... (eigenvalues too, once symmetric)
            m, n = shape[-2:]
            k = min(m, n)
            q1 = np.linalg.qr(rng.standard_normal((*shape[:-2], m, m)))[0][..., :k]
            q2 = np.linalg.qr(rng.standard_normal((*shape[:-2], n, n)))[0][..., :k]
            v = (q1 * np.arange(1.0, k + 1)) @ np.swapaxes(q2 if m != n else q1, -1, -2)
        else:
            v = rng.uniform(-1.5, 1.5, shape)
        out.append(np.asarray(v, dtype=dtype))
    return out


def _sq(t: Any) -> Any:
    return t * t  # eigen- and singular vectors up to sign: compared squared (numpy's signs are LAPACK's)


def _t_sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.mT) / 2


def _np_svd_parts(a: np.ndarray) -> np.ndarray:
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    return np.concatenate([_sq(u).reshape(-1), s.reshape(-1), _sq(vh).reshape(-1)])


def _t_svd_parts(a: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return torch.cat([_sq(u).reshape(-1), s.reshape(-1), _sq(vh).reshape(-1)])


def _np_eigh_parts(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return np.concatenate([w.reshape(-1), _sq(v).reshape(-1)])


def _t_eigh_parts(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(_t_sym(a))
    return torch.cat([w.reshape(-1), _sq(v).reshape(-1)])


B3 = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]])


def _np_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x, res, _, s = np.linalg.lstsq(a, b)
    return np.concatenate([x.reshape(-1), res.reshape(-1), s])


def _t_lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = torch.linalg.pinv(a) @ b
    res = torch.sum((b - a @ x) ** 2, 0)
    return torch.cat([x.reshape(-1), res.reshape(-1), torch.linalg.svdvals(a)])


def _norm_case(x_shape: tuple[int, ...], ord: Any, axis: Any, keepdims: bool, torch_fn: Callable[..., Any]) -> Case:
    domain = "distinct-sv" if len(x_shape) == 2 and axis is None else "real"  # the spectral norms: apart singular values
    return Case(f"norm[{x_shape},ord={ord},axis={axis},keepdims={keepdims}]",
                lambda x: np.linalg.norm(x, ord, axis, keepdims), (x_shape,), domain, torch_fn)


VECTOR_ORDS = (None, 1, 2, math.inf, -math.inf, 3, 0.5)
MATRIX_ORDS = ("fro", "nuc", 1, -1, 2, -2, math.inf, -math.inf)


def _t_vector_norm(ord: Any, dim: Any, keepdim: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.linalg.vector_norm(x, 2 if ord is None else ord, dim, keepdim)


def _t_matrix_norm(ord: Any, dim: Any, keepdim: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.linalg.matrix_norm(x, ord, dim, keepdim)


def _fft_case(name: str, parts: Callable[..., Any], ref: Callable[..., Any], shapes: tuple[tuple[int, ...], ...],
              tfn: Callable[..., Any]) -> Case:
    """A transform's two parts stacked, against numpy's complex result split the same way."""
    return Case(name, lambda *xs: np.stack(parts(*xs)),
                shapes, torch=lambda *xs: torch.stack(torch.view_as_real(tfn(*xs)).unbind(-1)),
                ref=lambda *xs: np.stack([ref(*xs).real, ref(*xs).imag]))


def _c(re: Any, im: Any) -> Any:
    return re + 1j * im if isinstance(re, np.ndarray) else torch.complex(re, im)


CASES = [
    Case("det", np.linalg.det, ((3, 3),), "invertible", torch.linalg.det),
    Case("det-batched", np.linalg.det, ((2, 3, 3),), "invertible", torch.linalg.det),
    Case("slogdet", lambda a: np.linalg.slogdet(a).sign * np.linalg.slogdet(a).logabsdet, ((2, 3, 3),), "invertible",
         lambda a: torch.linalg.slogdet(a)[0] * torch.linalg.slogdet(a)[1]),
    Case("inv", np.linalg.inv, ((2, 3, 3),), "invertible", torch.linalg.inv),
    Case("solve-matrix", np.linalg.solve, ((3, 3), (3, 2)), "invertible", torch.linalg.solve),
    Case("solve-vector", np.linalg.solve, ((3, 3), (3,)), "invertible", torch.linalg.solve),
    Case("solve-batched-broadcast", np.linalg.solve, ((2, 3, 3), (3, 1)), "invertible", torch.linalg.solve),
    Case("cholesky", np.linalg.cholesky, ((2, 3, 3),), "spd", lambda a: torch.linalg.cholesky(_t_sym(a))),
    Case("cholesky-upper", lambda a: np.linalg.cholesky(a, upper=True), ((3, 3),), "spd",
         lambda a: torch.linalg.cholesky(_t_sym(a), upper=True)),
    Case("eigh", _np_eigh_parts, ((3, 3),), "distinct-sv", _t_eigh_parts),
    Case("eigh-batched", _np_eigh_parts, ((2, 3, 3),), "distinct-sv", _t_eigh_parts),
    Case("eigvalsh", np.linalg.eigvalsh, ((2, 3, 3),), "distinct-sv", lambda a: torch.linalg.eigvalsh(_t_sym(a))),
    Case("svd-square", _np_svd_parts, ((3, 3),), "distinct-sv", _t_svd_parts),
    Case("svd-tall-batched", _np_svd_parts, ((2, 4, 3),), "distinct-sv", _t_svd_parts),
    Case("svd-wide", _np_svd_parts, ((2, 4),), "distinct-sv", _t_svd_parts),
    Case("svd-values", lambda a: np.linalg.svd(a, compute_uv=False), ((2, 4, 3),), "real", torch.linalg.svdvals),
    Case("svdvals", np.linalg.svdvals, ((3, 4),), "real", torch.linalg.svdvals),
    Case("qr-tall", lambda a: np.concatenate([x.reshape(-1) for x in np.linalg.qr(a)]), ((4, 3),), "invertible",
         lambda a: torch.cat([x.reshape(-1) for x in torch.linalg.qr(a)])),
    Case("qr-batched", lambda a: np.linalg.qr(a).R, ((2, 3, 3),), "invertible", lambda a: torch.linalg.qr(a)[1]),
    Case("qr-wide", lambda a: np.concatenate([x.reshape(-1) for x in np.linalg.qr(a)]), ((2, 4),), "distinct-sv",
         lambda a: torch.cat([x.reshape(-1) for x in torch.linalg.qr(a)])),
    Case("qr-r", lambda a: np.linalg.qr(a, mode="r"), ((4, 3),), "invertible", lambda a: torch.linalg.qr(a)[1]),
    Case("pinv-tall", np.linalg.pinv, ((4, 3),), "distinct-sv", torch.linalg.pinv),
    Case("pinv-wide-batched", np.linalg.pinv, ((2, 2, 4),), "distinct-sv", torch.linalg.pinv),
    Case("lstsq", _np_lstsq, ((3, 2), (3, 2)), "distinct-sv", _t_lstsq),
    Case("matrix_power-3", lambda a: np.linalg.matrix_power(a, 3), ((2, 3, 3),), "real",
         lambda a: torch.linalg.matrix_power(a, 3)),
    Case("matrix_power--2", lambda a: np.linalg.matrix_power(a, -2), ((3, 3),), "invertible",
         lambda a: torch.linalg.matrix_power(a, -2)),
    *(_norm_case((2, 5), o, 1, k, _t_vector_norm(o, 1, k)) for o in VECTOR_ORDS for k in (False, True)),
    _norm_case((5,), 0, None, False, lambda x: torch.linalg.vector_norm(x, 0)),
    _norm_case((4,), 3, None, False, lambda x: torch.linalg.vector_norm(x, 3)),
    _norm_case((3, 4), None, None, True, lambda x: torch.linalg.norm(x, None, None, True)),
    *(_norm_case((3, 4), o, None, False, _t_matrix_norm(o, (-2, -1), False)) for o in MATRIX_ORDS),
    *(_norm_case((3, 2, 4), o, (2, 0), True, _t_matrix_norm(o, (2, 0), True)) for o in (1, -math.inf, "nuc", 2)),
    _fft_case("fft", lambda x, y: gs.fft.fft_parts(x, y), lambda x, y: np.fft.fft(_c(x, y)), ((3, 6), (3, 6)),
              lambda x, y: torch.fft.fft(_c(x, y))),
    _fft_case("fft-real-n-axis", lambda x: gs.fft.fft_parts(x, n=5, axis=0), lambda x: np.fft.fft(x, n=5, axis=0),
              ((4, 3),), lambda x: torch.fft.fft(x, n=5, dim=0)),
    _fft_case("ifft-ortho", lambda x, y: gs.fft.ifft_parts(x, y, norm="ortho"),
              lambda x, y: np.fft.ifft(_c(x, y), norm="ortho"), ((2, 5), (2, 5)),
              lambda x, y: torch.fft.ifft(_c(x, y), norm="ortho")),
    _fft_case("rfft", gs.fft.rfft_parts, np.fft.rfft, ((3, 8),), torch.fft.rfft),
    _fft_case("rfft-odd-forward", lambda x: gs.fft.rfft_parts(x, n=7, norm="forward"),
              lambda x: np.fft.rfft(x, n=7, norm="forward"), ((2, 6),), lambda x: torch.fft.rfft(x, n=7, norm="forward")),
    _fft_case("fft2", lambda x, y: gs.fft.fft2_parts(x, y), lambda x, y: np.fft.fft2(_c(x, y)), ((2, 3, 4), (2, 3, 4)),
              lambda x, y: torch.fft.fft2(_c(x, y))),
    _fft_case("ifft2-s", lambda x, y: gs.fft.ifft2_parts(x, y, s=(4, 3)), lambda x, y: np.fft.ifft2(_c(x, y), s=(4, 3)),
              ((3, 4), (3, 4)), lambda x, y: torch.fft.ifft2(_c(x, y), s=(4, 3))),
    Case("irfft", lambda x, y: gs.fft.irfft_parts(x, y), (((2, 5)), (2, 5)),
         torch=lambda x, y: torch.fft.irfft(_c(x, y)), ref=lambda x, y: np.fft.irfft(_c(x, y))),
    Case("irfft-odd", lambda x, y: gs.fft.irfft_parts(x, y, n=7, norm="ortho"), ((4,), (4,)),
         torch=lambda x, y: torch.fft.irfft(_c(x, y), n=7, norm="ortho"),
         ref=lambda x, y: np.fft.irfft(_c(x, y), n=7, norm="ortho")),
]


def reference(case: Case, arrays: list[np.ndarray]) -> np.ndarray:
    want = (case.ref or case.f)(*arrays)
    return np.asarray(want).astype(arrays[0].dtype)  # numpy's FFT is float64 (complex128) whatever the input


@pytest.mark.parametrize("dtype", FLT)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_value_matches_numpy(case: Case, dtype: str) -> None:
    arrays = sample(case.name, dtype, case.shapes, case.domain)
    got, _ = gs.vjp(case.f, *arrays)
    assert_close(got, reference(case, arrays), dtype, VALUE_TOL, case.name)


def _symmetric_part_reader(case: Case) -> bool:
    """cholesky and eigh read ½(A + Aᵀ), numpy one triangle: finite differences of numpy's function
    see the triangle, so they are taken of the symmetrised one."""
    return case.name.startswith(("cholesky", "eigh", "eigvalsh"))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gradient_matches_finite_differences(case: Case) -> None:
    arrays = sample(case.name, "float64", case.shapes, case.domain)
    out, vjp_fn = gs.vjp(case.f, *arrays)
    ct = np.random.default_rng(zlib.crc32(case.name.encode())).standard_normal(np.shape(out))
    ref = case.ref or case.f
    if _symmetric_part_reader(case):
        f = ref
        ref = lambda a: f((a + np.swapaxes(a, -1, -2)) / 2)  # noqa: E731
    for p, want in enumerate(fd_gradient(ref, arrays, ct)):
        np.testing.assert_allclose(vjp_fn(ct)[p], want, rtol=1e-6, atol=1e-7, err_msg=f"{case.name}: operand {p}")


TORCH_CASES = [(c, dt) for c in CASES for dt in FLT]


@pytest.mark.parametrize(("case", "dtype"), TORCH_CASES, ids=[f"{c.name}-{dt}" for c, dt in TORCH_CASES])
def test_gradient_matches_torch(case: Case, dtype: str) -> None:
    arrays = sample(case.name, dtype, case.shapes, case.domain)
    out, vjp_fn = gs.vjp(case.f, *arrays)
    ct = np.random.default_rng(zlib.crc32(f"{case.name}/{dtype}".encode())).standard_normal(np.shape(out)).astype(dtype)
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    t_out = case.torch(*ts)
    assert_close(out, t_out.detach().numpy(), dtype, TORCH_TOL, f"{case.name}: value against torch")
    want = torch.autograd.grad(t_out, ts, torch.tensor(ct), allow_unused=True, materialize_grads=True)
    for p, (g, w) in enumerate(zip(vjp_fn(ct), want, strict=True)):
        assert_close(g, w.numpy(), dtype, TORCH_TOL, f"{case.name}: gradient of operand {p} against torch")


def test_the_vector_signs_are_fixed_and_the_factors_are_numpys() -> None:
    """Eigen- and singular vectors are numpy's up to each one's sign, chosen so that its entry of
    largest magnitude is positive: the same answer on every backend."""
    a = sample("signs", "float64", ((2, 4, 3),), "real")[0]
    sym = a[:, :3] + np.swapaxes(a[:, :3], -1, -2)
    w, v = gs.linalg.eigh(sym)
    u, s, vh = gs.linalg.svd(a, full_matrices=False)
    for got, want in ((v, np.linalg.eigh(sym)[1]), (u, np.linalg.svd(a, full_matrices=False)[0])):
        np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-12, atol=1e-12)
        top = np.take_along_axis(got, np.argmax(np.abs(got), axis=-2)[..., None, :], axis=-2)
        assert np.all(top > 0)
    np.testing.assert_allclose(u * s[..., None, :] @ vh, a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v * w[..., None, :] @ np.swapaxes(v, -1, -2), sym, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- second order


@pytest.mark.parametrize("name", ["det", "inv", "slogdet-solve"])
def test_hessian_matches_finite_differences_of_the_gradient(name: str) -> None:
    f = {"det": lambda x: np.linalg.det(x.reshape(3, 3)),
         "inv": lambda x: np.sum(np.linalg.inv(x.reshape(3, 3)) * np.arange(9.0).reshape(3, 3)),
         "slogdet-solve": lambda x: np.linalg.slogdet(x.reshape(3, 3))[1] * np.sum(np.linalg.solve(x.reshape(3, 3), x[:3])),
         }[name]
    x = sample(name, "float64", ((3, 3),), "invertible")[0].reshape(-1)
    hess = gs.hessian(f)(x)
    grad = gs.grad(f)
    want = np.stack([(grad(x + EPS * e) - grad(x - EPS * e)) / (2 * EPS) for e in np.eye(x.size)], axis=-1)
    np.testing.assert_allclose(hess, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_hessian_of_det_matches_torch() -> None:
    a = sample("det-hessian", "float64", ((3, 3),), "invertible")[0]
    want = torch.autograd.functional.hessian(torch.linalg.det, torch.tensor(a)).numpy()
    np.testing.assert_allclose(gs.hessian(np.linalg.det)(a), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- errors


SINGULAR = np.array([[1.0, 2.0], [2.0, 4.0]])


@pytest.mark.parametrize("f", [lambda a: np.linalg.solve(a, np.ones(2)), np.linalg.inv,
                               lambda a: np.linalg.matrix_power(a, -1)], ids=["solve", "inv", "matrix_power"])
def test_a_singular_matrix_raises_linalgerror_when_the_graph_runs(f: Callable[..., Any]) -> None:
    g = gs.trace(f, SINGULAR)  # tracing knows shapes only
    assert "solve" in {n.op for n in g.nodes}
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        gs.value_and_grad(lambda a: np.sum(f(a)))(SINGULAR)
    with pytest.raises(LinAlgError):  # the engine's: INVALID_ARGUMENT from the server
        gs.vjp(f, SINGULAR)


def test_cholesky_of_a_matrix_that_is_not_positive_definite_raises() -> None:
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        gs.grad(lambda a: np.sum(np.linalg.cholesky(a)))(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_det_of_a_singular_matrix_is_zero_and_its_gradient_needs_an_inverse() -> None:
    np.testing.assert_allclose(gs.vjp(np.linalg.det, SINGULAR)[0], 0.0, atol=1e-15)
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        gs.grad(np.linalg.det)(SINGULAR)


@pytest.mark.parametrize(("f", "arg", "error", "match"), [
    (np.linalg.det, np.ones((2, 3)), np.linalg.LinAlgError, "must be square"),
    (np.linalg.inv, np.ones(3), np.linalg.LinAlgError, "at least two-dimensional"),
    (np.linalg.cholesky, np.ones((3, 2)), np.linalg.LinAlgError, "must be square"),
    (np.linalg.eigh, np.ones((2, 3, 4)), np.linalg.LinAlgError, "must be square"),
    (lambda a: np.linalg.solve(a, np.ones(3)), np.eye(2), ValueError, "do not match"),
    (np.linalg.svd, np.ones((3, 2)), ValueError, "full_matrices=False"),
    (lambda a: np.linalg.qr(a, mode="complete"), np.ones((3, 2)), ValueError, "mode='reduced'"),
    (lambda a: np.linalg.qr(a, mode="raw"), np.ones((3, 2)), ValueError, "not supported"),
    (lambda a: np.linalg.norm(a, "fro"), np.ones(3), ValueError, "Invalid norm order"),
    (lambda a: np.linalg.norm(a, 3), np.ones((2, 2)), ValueError, "Invalid norm order for matrices"),
    (lambda a: np.linalg.norm(a, 2), np.ones((2, 2, 2)), ValueError, "Improper number of dimensions"),
    (lambda a: np.linalg.matrix_power(a, 1.5), np.eye(2), TypeError, "integer"),
    (lambda a: np.linalg.eigh(a, UPLO="X"), np.eye(2), ValueError, "UPLO"),
    (np.fft.fft, np.ones(4), TypeError, r"complex.*gs\.fft\.fft_parts"),
    (np.fft.rfft, np.ones(4), TypeError, r"gs\.fft\.rfft_parts"),
    (lambda a: gs.fft.fft_parts(a, n=0), np.ones(4), ValueError, "Invalid number of FFT data points"),
    (lambda a: gs.fft.fft_parts(a, norm="bad"), np.ones(4), ValueError, "Invalid norm value"),
    (lambda a: gs.fft.irfft_parts(a, a[:2]), np.ones(4), ValueError, "different shapes"),
], ids=["det-nonsquare", "inv-1d", "cholesky-nonsquare", "eigh-nonsquare", "solve-rows", "svd-full", "qr-complete",
        "qr-raw", "norm-fro-vector", "norm-3-matrix", "norm-3d", "matrix_power-float", "eigh-uplo", "fft", "rfft",
        "fft-n", "fft-norm", "irfft-parts"])
def test_bad_operands_get_numpys_errors_while_tracing(f: Callable[..., Any], arg: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        gs.grad(lambda a: np.sum(f(a)))(arg)


def test_integer_operands_are_computed_in_float64() -> None:
    a = np.array([[4, 1], [1, 3]])
    got = gs.vjp(lambda m: np.linalg.inv(m) + np.linalg.cholesky(m) + np.linalg.eigh(m)[0], a)[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.linalg.inv(a) + np.linalg.cholesky(a) + np.linalg.eigh(a)[0], rtol=1e-12)


def test_lstsq_gives_numpys_rank_and_singular_values() -> None:
    a = np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]])  # rank 1
    b = np.array([1.0, 2.0, 3.0])
    x, _, rank, s = gs.vjp(lambda m: np.linalg.lstsq(m, b), a)[0]
    want = np.linalg.lstsq(a, b)
    np.testing.assert_allclose(x, want[0], rtol=1e-12)
    assert rank == want[2]
    np.testing.assert_allclose(s, want[3], rtol=1e-12, atol=1e-15)


def test_the_two_norm_has_torchs_zero_gradient_at_zero() -> None:
    for ord, axis, shape in ((None, None, (3,)), (2, 1, (2, 3)), ("fro", None, (2, 3)), (None, None, (2, 3))):
        x = np.zeros(shape)
        got = gs.grad(lambda v, o=ord, a=axis: np.sum(np.linalg.norm(v, o, a)))(x)
        t = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        torch.sum(torch.linalg.norm(t, ord, axis)).backward()
        np.testing.assert_array_equal(got, t.grad.numpy())
        assert not np.any(got)


# ---------------------------------------------------------------- through the server


def spectral(a: np.ndarray, b: np.ndarray) -> Any:
    sym = a @ a.T + np.eye(3)
    w, v = np.linalg.eigh(sym)
    r = np.linalg.qr(a).R
    return (np.sum(np.linalg.solve(sym, b)) + np.linalg.slogdet(sym)[1] + np.sum(w * np.sum(v * v, 0))
            + np.sum(np.linalg.cholesky(sym)) + np.sum(np.linalg.svd(a, compute_uv=False) ** 2) + np.sum(r * r)
            + np.linalg.norm(a, "nuc") + np.sum(np.linalg.pinv(a[:, :2])) + np.sum(np.stack(gs.fft.rfft_parts(b)) ** 2))


def test_linalg_and_fft_run_on_the_server(remote) -> None:
    a = sample("remote", "float64", ((3, 3),), "invertible")[0]
    b = np.array([0.3, -1.2, 0.8])
    assert {n.op for n in gs.trace(spectral, a, b).nodes} >= {"solve", "slogdet", "eigh", "qr", "cholesky", "svd"}
    want = gs.value_and_grad(spectral, argnums=(0, 1))(a, b)
    got = remote.value_and_grad(spectral, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    for g, w in zip(got[1], fd_gradient(spectral, [a, b], np.ones(())), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_a_singular_matrix_on_the_server_is_invalid_argument(remote) -> None:
    with pytest.raises(gs.remote.RemoteInvalidArgument, match="singular"):
        remote.value_and_grad(lambda a: np.sum(np.linalg.inv(a)))(SINGULAR)


# ---------------------------------------------------------------- data-parallel sharding


def test_per_example_matrices_shard_and_mixed_ones_are_refused() -> None:
    """A batch of matrices keeps its examples apart through every factorisation (the batch axis
    leads); a matrix whose rows are the examples mixes them, and the sharding proof says where."""
    rng = np.random.default_rng(3)
    w, xs = rng.standard_normal((3, 3)), rng.standard_normal((5, 3, 3))

    def per_example(w: Any, x: Any) -> Any:
        a = x @ w + 3 * np.eye(3)
        spd = a @ np.swapaxes(a, -1, -2)
        return (np.sum(np.linalg.slogdet(a)[1] + np.linalg.det(a)) + np.sum(np.linalg.solve(a, np.ones((3, 1))))
                + np.sum(np.linalg.eigh(spd)[0]) + np.sum(np.linalg.svd(a, compute_uv=False)) + np.sum(np.linalg.qr(a).R)
                + np.sum(np.linalg.cholesky(spd)))

    g = gs.trace(per_example, w, xs)
    assert analyze(g, {"x": 0}).state(dict(g.outputs)["out"]) == "sum"
    mixed = gs.trace(lambda w, x: np.linalg.det(x @ w), w, rng.standard_normal((3, 3)))
    with pytest.raises(ShardError, match="det mixes the rows or columns of a matrix"):
        analyze(mixed, {"x": 0})


@pytest.mark.parametrize("ord", [None, 1, 2, 3, 0.5, np.inf])
def test_vector_norms_have_gradient_zero_at_zero_as_torch(ord):
    got = gs.grad(lambda x: np.linalg.norm(x, ord=ord))(np.zeros(3))
    t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch.linalg.vector_norm(t, 2 if ord is None else ord).backward()
    np.testing.assert_array_equal(got, t.grad.numpy())
