"""The imperative API: `gs.tensor(..., requires_grad=True)`, `backward()`, `.grad`, `no_grad`.

Each operation runs now with the numpy kernels and, when an operand requires grad, records
its primitive on the tape (the tensor remembers op, operands and attributes). `backward()`
turns the recorded subgraph into an IR graph and asks the engine for the backward pass only,
feeding the values the forward pass already computed, so nothing is recomputed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from gradserve_engine.ir import Builder
from gradserve_engine.ops import KERNELS, PRIMITIVES
from gradserve_engine.ops.core import DTYPES, FLOATS, dtype_name, infer

from . import numpy_api
from .api import flatten
from .local import default_engine
from .numpy_api import ArrayMethods

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Operations inside record nothing (like torch.no_grad)."""
    prev = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = prev


class Tensor(ArrayMethods):
    """An array that records the operations applied to it, for `backward()`."""

    __slots__ = ("_attrs", "_op", "_parents", "data", "grad", "requires_grad")

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        a = np.array(data, dtype=dtype)
        if dtype_name(a.dtype) not in DTYPES:
            raise TypeError(f"tensor dtype {a.dtype} is not supported; use one of {list(DTYPES)}")
        if requires_grad and dtype_name(a.dtype) not in FLOATS:
            raise TypeError(f"only float tensors can require gradients, got dtype {a.dtype}")
        self.data = a
        self.requires_grad = requires_grad
        self.grad: np.ndarray | None = None
        self._op: str | None = None
        self._parents: tuple[Tensor, ...] = ()
        self._attrs: dict[str, Any] = {}

    # ---- array-like
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._op is None

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> Any:
        return self.data.item()

    def __gradserve_array__(self) -> np.ndarray:
        return self.data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    def __float__(self) -> float:
        return float(self.data)

    def __bool__(self) -> bool:
        return bool(self.data)

    def __repr__(self) -> str:
        body = np.array2string(self.data, separator=", ")
        extra = f", grad_op={self._op}" if self._op else (", requires_grad=True" if self.requires_grad else "")
        return f"tensor({body}{extra})"

    def detach(self) -> Tensor:
        """The same data, cut from the tape."""
        return Tensor(self.data, requires_grad=False)

    def zero_grad(self) -> None:
        self.grad = None

    def backward(self, gradient: Any = None) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no operand had requires_grad=True)")
        if gradient is None:
            if self.shape != ():
                raise RuntimeError(f"backward() of a tensor of shape {self.shape} needs a gradient argument")
            gradient = np.ones((), self.dtype)
        _backward(self, np.asarray(gradient, dtype=self.dtype))


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A new leaf tensor (copies `data`)."""
    if isinstance(data, Tensor):
        data = data.data
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def zero_grad(*tensors: Any) -> None:
    """Reset `.grad` of the given tensors (or of every tensor in the given pytrees)."""
    for t in tensors:
        for _, leaf in flatten(t, "")[0]:
            if isinstance(leaf, Tensor):
                leaf.grad = None


def _eager(op: str, *args: Any, **attrs: Any) -> Tensor:
    ts = [a if isinstance(a, Tensor) else Tensor(np.asarray(a)) for a in args]
    out = Tensor(KERNELS[op](*(t.data for t in ts), **attrs))
    dtype, shape = infer(op, [(dtype_name(t.data.dtype), t.data.shape) for t in ts], attrs)
    if dtype_name(out.data.dtype) != dtype or out.data.shape != shape:
        out.data = np.asarray(out.data, dtype=dtype).reshape(shape)
    if is_grad_enabled() and PRIMITIVES[op].differentiable and dtype in FLOATS and any(t.requires_grad for t in ts):
        out.requires_grad = True
        out._op, out._parents, out._attrs = op, tuple(ts), attrs
    return out


numpy_api._EAGER.append((Tensor, _eager))


def _backward(root: Tensor, gradient: np.ndarray) -> None:
    order: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:  # iterative post-order: operands before users
        t, done = stack.pop()
        if done:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        stack.extend((p, False) for p in t._parents if id(p) not in seen)
    b = Builder()
    var: dict[int, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    leaves: list[tuple[str, Tensor]] = []
    node_tensor: dict[int, Tensor] = {}
    for t in order:
        if t._op is None or not t.requires_grad:
            name = f"t{len(inputs)}"
            var[id(t)] = b.input(name, dtype_name(t.dtype), t.shape)
            inputs[name] = t.data
            if t.requires_grad:
                leaves.append((name, t))
        else:
            v = b.bind(t._op, *(var[id(p)] for p in t._parents), **t._attrs)
            var[id(t)] = v
            node_tensor[v.id] = t
    graph = b.build([("out", var[id(root)])])
    # the builder numbers values canonically; map the graph's node ids back to the recorded tensors
    residuals = _residuals(b, graph, node_tensor)
    _, grads = default_engine().vjp(graph, inputs, [n for n, _ in leaves], seeds={"out": gradient},
                                     outputs=["out"], residuals=residuals)
    for name, t in leaves:
        g = grads[name]
        t.grad = np.array(g) if t.grad is None else t.grad + g


def _residuals(b: Builder, graph: Any, node_tensor: dict[int, Tensor]) -> dict[int, np.ndarray]:
    """Values of the graph's nodes, from the tensors that recorded them (same order as built)."""
    recorded = [v for v in sorted(node_tensor)]
    values = {}
    for node, vid in zip(graph.nodes, recorded, strict=True):
        values[node.id] = node_tensor[vid].data
    return values
