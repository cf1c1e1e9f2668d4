"""The embedded session: the process's default engine and the functional API over it.

`gs.grad` & co. run here, in process, with no server and no Ray: the same Engine the server
runs, so the embedded default and the service share one code path.
"""

from __future__ import annotations

import functools
import os

from gradserve_engine.engine import Engine
from gradserve_engine.ir import Graph
from gradserve_engine.native import resolve_kernels

from .api import Functional

_KERNELS = [os.environ.get("GRADSERVE_KERNELS", "numpy")]


@functools.cache
def default_engine() -> Engine:
    return Engine(kernels=_KERNELS[0])


def config(kernels: str | None = None) -> dict[str, str]:
    """Settings of the local engine: `kernels` is "numpy" (the reference), "native" (fused numba
    loops, the `native` extra), "auto" (native where the fused work is big enough to win) or "gpu"
    (CuPy). Changing it starts a fresh engine (caches empty). Returns the settings in force."""
    if kernels is not None and kernels != _KERNELS[0]:
        resolve_kernels(kernels)  # refuse an unknown mode before anything changes
        _KERNELS[0] = kernels
        default_engine.cache_clear()
        _local.cache_clear()
    return {"kernels": _KERNELS[0], "running": default_engine().kernels.describe()}


@functools.cache
def _local() -> Functional:
    return Functional(default_engine())


def grad(f, argnums=None, has_aux=False, batch_axes=None, argnames=None):
    """The gradient of scalar `f` w.r.t. the arguments `argnums` (a pytree like each argument).

    `argnames` selects arguments by name, passed by keyword or positionally
    (`gs.grad(f, argnames="w")(x, w=w)`); argnums then defaults to none, and with both the
    result is `(by argnums, by argnames)`. Other keyword arguments are inputs, not differentiated.
    `batch_axes` ({parameter or input name: axis}) declares batched inputs; the graph is checked
    to keep examples independent until a final sum or mean (a server with workers shards it)."""
    return _local().grad(f, argnums, has_aux, batch_axes, argnames)


def value_and_grad(f, argnums=None, has_aux=False, batch_axes=None, argnames=None):
    """Like `grad`, returning `(f(*args, **kwargs), gradient)`."""
    return _local().value_and_grad(f, argnums, has_aux, batch_axes, argnames)


def vjp(f, /, *primals, **kwargs):
    """`(f(*primals, **kwargs), vjp_fn)`; `vjp_fn(cotangent)` returns one cotangent per primal
    (keyword arguments are inputs, not differentiated)."""
    return _local().vjp(f, *primals, **kwargs)


def jvp(f, primals, tangents, /, **kwargs):
    """`(f(*primals, **kwargs), directional derivative along tangents)`, forward mode."""
    return _local().jvp(f, primals, tangents, **kwargs)


def jacobian(f, argnums=None, argnames=None):
    """The full Jacobian (shape out.shape + in.shape), computed in one pass over stacked seeds."""
    return _local().jacobian(f, argnums, argnames)


def hessian(f, argnums=None, argnames=None):
    """The Hessian of scalar `f` (shape x.shape + x.shape; nested tuples for several argnums)."""
    return _local().hessian(f, argnums, argnames)


def hvp(f, primals, vectors, /, **kwargs):
    """Hessian-vector product of scalar `f` at `primals` along `vectors`, one per primal."""
    return _local().hvp(f, primals, vectors, **kwargs)


def trace(f, /, *args, **kwargs) -> Graph:
    """Trace `f(*args, **kwargs)` into a printable Graph (inputs named after f's parameters;
    captured arrays are inputs `<global>.W`, `<closure>.W`, ...)."""
    return _local().trace(f, *args, **kwargs)


def cache_info():
    """Hits, misses and the reason for each recent miss, of the local trace and plan caches."""
    return default_engine().cache_info()


def clear_cache() -> None:
    _local().clear()
    default_engine().clear_cache()
