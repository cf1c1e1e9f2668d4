"""gradserve: trace numpy-style Python into a graph, differentiate it, run it locally or remotely.

    import gradserve as gs
    gs.grad(lambda x, y: x * y + gs.sin(x), argnums=(0, 1))(2.0, 3.0)
"""

from __future__ import annotations

from typing import Any

from gradserve_engine.errors import GraphError, LimitError, ShapeError
from gradserve_engine.ir import Graph, Limits

from . import fft, linalg, numpy_api, optim
from .aio import AsyncSession, aconnect
from .api import flatten, register_pytree_node, unflatten
from .control import checkpoint, cond, custom_jvp, custom_vjp, fori_loop, scan, switch, vmap, while_loop
from .local import (
    cache_info,
    clear_cache,
    config,
    grad,
    hessian,
    hvp,
    jacobian,
    jvp,
    trace,
    value_and_grad,
    vjp,
)
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
    full_like,
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
    round,
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
from .numpy_extra import (
    all,
    any,
    argmax,
    argmin,
    argsort,
    array_split,
    atleast_1d,
    atleast_2d,
    atleast_3d,
    average,
    cumprod,
    diag,
    diagonal,
    diff,
    einsum,
    fix,
    flip,
    fliplr,
    flipud,
    fmod,
    heaviside,
    kron,
    median,
    meshgrid,
    moveaxis,
    nanmean,
    nansum,
    outer,
    percentile,
    prod,
    ptp,
    quantile,
    ravel,
    reciprocal,
    repeat,
    roll,
    searchsorted,
    sinc,
    sort,
    split,
    std,
    take_along_axis,
    tile,
    tril,
    triu,
)
from .refs import TensorRef
from .remote import GradientResult, RemoteError, Session, connect
from .tensor import Tensor, is_grad_enabled, no_grad, tensor, zero_grad

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """numpy's other elementwise functions: every one the primitive registry implements is
    `gs.<numpy name>` (the names imported above are the same functions)."""
    if name in numpy_api.UFUNCS:
        return numpy_api.UFUNCS[name]
    raise AttributeError(f"module 'gradserve' has no attribute {name!r}")


__all__ = [
    "AsyncSession", "GradientResult", "Graph", "GraphError", "LimitError", "Limits", "OptimizeResult", "RemoteError", "Session",
    "ShapeError", "Tensor", "TensorRef",
    "aconnect", "connect", "fft", "linalg", "minimize", "optim",
    "checkpoint", "cond", "custom_jvp", "custom_vjp", "fori_loop", "scan", "switch", "vmap", "while_loop",
    "abs", "add", "arctan", "arctan2", "astype", "broadcast_to", "cache_info", "cast", "ceil", "clear_cache", "clip", "config",
    "concatenate", "cos", "cross_entropy", "cumsum", "divide", "dot", "equal", "exp", "expand_dims", "expm1",
    "flatten", "floor", "full_like", "grad", "greater", "greater_equal", "hessian", "hvp", "is_grad_enabled", "jacobian", "jvp",
    "less", "less_equal", "log", "log1p", "log_softmax", "logsumexp", "matmul", "max", "maximum", "mean", "min",
    "minimum", "mse", "multiply", "negative", "no_grad", "norm", "not_equal", "ones_like", "pad", "power", "relu",
    "register_pytree_node", "reshape", "round", "sigmoid", "sign", "sin", "softmax", "sqrt", "square", "squeeze", "stack",
    "stop_gradient", "subtract", "sum", "swapaxes", "take", "tan", "tanh", "tensor", "trace", "transpose", "unflatten",
    "value_and_grad", "var", "vjp", "where", "zero_grad", "zeros_like",
    # numpy_extra (numpy's trace is np.trace(traced): gs.trace traces a function)
    "all", "any", "argmax", "argmin", "argsort", "array_split", "atleast_1d", "atleast_2d", "atleast_3d", "average",
    "cumprod", "diag", "diagonal", "diff", "einsum", "fix", "flip", "fliplr", "flipud", "fmod", "heaviside", "kron",
    "median", "meshgrid", "moveaxis", "nanmean", "nansum",
    "outer", "percentile", "prod", "ptp", "quantile", "ravel", "reciprocal", "repeat", "roll",
    "searchsorted", "sinc", "sort", "split", "std", "take_along_axis", "tile", "tril", "triu",
]
