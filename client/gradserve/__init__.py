"""gradserve: trace numpy-style Python into a graph, differentiate it, run it locally or remotely.

    import gradserve as gs
    gs.grad(lambda x, y: x * y + gs.sin(x), argnums=(0, 1))(2.0, 3.0)
"""

from __future__ import annotations

import functools
import os
from typing import Any

from gradserve_engine.errors import GraphError, LimitError, ShapeError
from gradserve_engine.ir import Graph, Limits

from . import optim
from .api import Functional, flatten, unflatten
from .minimize import OptimizeResult, minimize
from .numpy_api import (
    abs,
    add,
    arctan2,
    astype,
    broadcast_to,
    cast,
    ceil,
    clip,
    concatenate,
    cos,
    cross_entropy,
    cumsum,
    divide,
    dot,
    equal,
    exp,
    expand_dims,
    expm1,
    floor,
    greater,
    greater_equal,
    less,
    less_equal,
    log,
    log1p,
    log_softmax,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    mse,
    multiply,
    negative,
    norm,
    not_equal,
    ones_like,
    pad,
    power,
    relu,
    reshape,
    sigmoid,
    sign,
    sin,
    softmax,
    sqrt,
    square,
    squeeze,
    stack,
    stop_gradient,
    subtract,
    sum,
    swapaxes,
    take,
    tan,
    tanh,
    transpose,
    var,
    where,
    zeros_like,
)
from .remote import GradientResult, RemoteError, Session, connect
from .tensor import Tensor, is_grad_enabled, no_grad, tensor, zero_grad

__version__ = "0.1.0"


_KERNELS = [os.environ.get("GRADSERVE_KERNELS", "numpy")]


@functools.cache
def _default_engine() -> Any:
    from gradserve_engine.engine import Engine

    return Engine(kernels=_KERNELS[0])


def config(kernels: str | None = None) -> dict[str, str]:
    """Settings of the local engine: `kernels` is "numpy" (the reference), "native" (fused numba
    loops, the `native` extra), "auto" (native where the fused work is big enough to win) or "gpu"
    (CuPy). Changing it starts a fresh engine (caches empty). Returns the settings in force."""
    if kernels is not None and kernels != _KERNELS[0]:
        from gradserve_engine.native import resolve_kernels

        resolve_kernels(kernels)  # refuse an unknown mode before anything changes
        _KERNELS[0] = kernels
        _default_engine.cache_clear()
        _local.cache_clear()
    return {"kernels": _KERNELS[0], "running": _default_engine().kernels.describe()}


@functools.cache
def _local() -> Functional:
    return Functional(_default_engine())


def grad(f, argnums=0, has_aux=False, batch_axes=None):
    """The gradient of scalar `f` w.r.t. the arguments `argnums` (a pytree like each argument).

    `batch_axes` ({parameter or input name: axis}) declares batched inputs; the graph is checked
    to keep examples independent until a final sum or mean (a server with workers shards it)."""
    return _local().grad(f, argnums, has_aux, batch_axes)


def value_and_grad(f, argnums=0, has_aux=False, batch_axes=None):
    """Like `grad`, returning `(f(*args), gradient)`."""
    return _local().value_and_grad(f, argnums, has_aux, batch_axes)


def vjp(f, *primals):
    """`(f(*primals), vjp_fn)`; `vjp_fn(cotangent)` returns one cotangent per primal."""
    return _local().vjp(f, *primals)


def jvp(f, primals, tangents):
    """`(f(*primals), directional derivative along tangents)`, forward mode."""
    return _local().jvp(f, primals, tangents)


def jacobian(f, argnums=0):
    """The full Jacobian (shape out.shape + in.shape), computed in one pass over stacked seeds."""
    return _local().jacobian(f, argnums)


def hessian(f, argnums=0):
    """The Hessian of scalar `f` (shape x.shape + x.shape; nested tuples for several argnums)."""
    return _local().hessian(f, argnums)


def hvp(f, primals, vectors):
    """Hessian-vector product of scalar `f` at `primals` along `vectors`, one per primal."""
    return _local().hvp(f, primals, vectors)


def trace(f, *args) -> Graph:
    """Trace `f(*args)` into a printable Graph (inputs named after f's parameters)."""
    return _local().trace(f, *args)


def cache_info():
    """Hits, misses and the reason for each recent miss, of the local trace and plan caches."""
    return _default_engine().cache_info()


def clear_cache() -> None:
    _local()._traces.clear()
    _default_engine().clear_cache()


__all__ = [
    "GradientResult", "Graph", "GraphError", "LimitError", "Limits", "OptimizeResult", "RemoteError", "Session",
    "ShapeError", "Tensor",
    "connect", "minimize", "optim",
    "abs", "add", "arctan2", "astype", "broadcast_to", "cache_info", "cast", "ceil", "clear_cache", "clip", "config",
    "concatenate", "cos", "cross_entropy", "cumsum", "divide", "dot", "equal", "exp", "expand_dims", "expm1",
    "flatten", "floor", "grad", "greater", "greater_equal", "hessian", "hvp", "is_grad_enabled", "jacobian", "jvp",
    "less", "less_equal", "log", "log1p", "log_softmax", "logsumexp", "matmul", "max", "maximum", "mean", "min",
    "minimum", "mse", "multiply", "negative", "no_grad", "norm", "not_equal", "ones_like", "pad", "power", "relu",
    "reshape", "sigmoid", "sign", "sin", "softmax", "sqrt", "square", "squeeze", "stack", "stop_gradient",
    "subtract", "sum", "swapaxes", "take", "tan", "tanh", "tensor", "trace", "transpose", "unflatten",
    "value_and_grad", "var", "vjp", "where", "zero_grad", "zeros_like",
]
