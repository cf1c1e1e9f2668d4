"""The IR's dtypes and shapes, and the names each backend gives the dtypes."""

from __future__ import annotations

import math

import numpy as np

Shape = tuple[int, ...]
AVal = tuple[str, Shape]  # (dtype name, shape)

DTYPES = ("bool", "int32", "int64", "float32", "float64")
NP_DTYPES = {name: np.dtype(name) for name in DTYPES}
_NAMES = {dt: name for name, dt in NP_DTYPES.items()}
FLOATS = ("float32", "float64")
INTS = ("int32", "int64")
NUMERIC = INTS + FLOATS

class Shaped:
    """`ndim` and `size` of anything with a `shape` (traced values, tensor references)."""

    __slots__ = ()
    shape: Shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype: np.dtype) -> str:
    """The IR name of a numpy dtype ("float64", ...), or numpy's own name when unsupported
    (`np.dtype.name` itself is slow: this is on every call's path)."""
    name = _NAMES.get(dtype)
    return name if name is not None else dtype.name


# the names of the dtypes in the numba and CUDA element expressions
NUMBA_TYPES = {"bool": "np.bool_", "int32": "np.int32", "int64": "np.int64", "float32": "np.float32",
               "float64": "np.float64"}
C_TYPES = {"bool": "bool", "int32": "int", "int64": "long long", "float32": "float", "float64": "double"}


def numba_typed(expr: str, dtype: str) -> str:
    """numba computes int32 arithmetic in int64: wrap the result back so it wraps as numpy's."""
    return f"{NUMBA_TYPES[dtype]}({expr})" if dtype == "int32" else expr
