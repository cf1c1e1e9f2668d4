"""Numerical checks the test modules share: closeness of results (one array, or two pytrees
alike in structure) and gradients by central differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import gradserve as gs

EPS = 1e-6  # central differences, in float64


def assert_close(got: Any, want: Any, dtype: str, tol: dict[str, tuple[float, float]], what: str) -> None:
    """Same shape, `got` of `dtype`, values within `tol[dtype]` = (rtol, atol), atol scaled by
    the largest magnitude of `want` (at least 1)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    rtol, atol = tol[dtype]
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


def close(a: Any, b: Any) -> None:
    """Equal to 1e-12, relative and absolute."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def tree_close(a: Any, b: Any) -> None:
    """Two pytrees with the same leaf paths, their leaves `close`."""
    la, lb = gs.flatten(a, "")[0], gs.flatten(b, "")[0]
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (_, x), (_, y) in zip(la, lb, strict=True):
        close(x, y)


def fd_gradient(f: Callable[..., Any], arrays: list[np.ndarray], ct: np.ndarray) -> list[np.ndarray]:
    """d <ct, f(arrays)> / d arrays by central differences."""
    grads = []
    for p, x in enumerate(arrays):
        g = np.zeros_like(x)
        for i in range(x.size):
            plus, minus = x.copy(), x.copy()
            plus.flat[i] += EPS
            minus.flat[i] -= EPS
            hi = f(*arrays[:p], plus, *arrays[p + 1:])
            lo = f(*arrays[:p], minus, *arrays[p + 1:])
            g.flat[i] = np.sum(ct * (np.asarray(hi) - np.asarray(lo))) / (2 * EPS)
        grads.append(g)
    return grads
