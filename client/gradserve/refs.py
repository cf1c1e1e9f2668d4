"""`gs.TensorRef`: a tensor a gradserve server holds, passed in place of its bytes.

`remote.put(tree)` uploads the arrays of a tree and returns the same tree of refs; a ref is
accepted wherever a remote call takes an array (arguments of `remote.grad(f)`, inputs of
`remote.gradient`, `remote.evaluate`, `remote.batch_gradient`, `remote.vjp`, `remote.minimize`'s
`params0` and `args`), and calls made with `keep=True` return refs to results that stay on the
server. The id is the content hash (SHA-256 over dtype, shape and the bytes), so equal arrays have
equal refs on any client. A ref is no array: `remote.get(ref)` downloads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradserve_engine.ir import type_str
from gradserve_engine.ops.core import dtype_name
from gradserve_engine.ops.dtypes import Shaped
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.wire import PB_DTYPE


class TensorRef(Shaped):
    """A reference to a tensor held by a gradserve server: `id` (the content hash), `dtype`, `shape`."""

    __slots__ = ("dtype", "id", "shape")

    def __init__(self, id: str, dtype: Any, shape: tuple[int, ...]):
        self.id = id
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def to_proto(self, msg: graph_pb2.Tensor) -> graph_pb2.Tensor:
        """The wire form: `ref` set, with the dtype and shape the server checks it against."""
        msg.ref = self.id
        msg.dtype = PB_DTYPE[dtype_name(self.dtype)]
        msg.shape[:] = self.shape
        return msg

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorRef) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"TensorRef({self.id[:12]}, {type_str(dtype_name(self.dtype), self.shape)})"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(f"{self!r} is a tensor held by a gradserve server, not an array here: pass it to that "
                        "server's session (remote.grad(f)(ref), remote.gradient(..., {'x': ref}), ...) or download it "
                        "with remote.get(ref)")
