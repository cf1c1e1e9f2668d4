"""The imperative API: `gs.tensor(..., requires_grad=True)`, `backward()`, `.grad`, `no_grad`.

Each operation runs now with the numpy kernels and, when an operand requires grad, records
its primitive on the tape: a `_Node` (torch's grad_fn) holding the op, its attributes, the
operands as they were used and the result. `backward()` turns the recorded subgraph into an IR
graph and asks the engine for the backward pass only, feeding the values the forward pass
already computed, so nothing is recomputed.

In-place operations (`+=`, `t[i] = v`, `zero_()`, ...) follow torch's rules. A tensor's array
is never written in place: an in-place operation puts a new array in the tensor's storage and
bumps the storage's version counter, so every value the tape recorded stays the value the
forward pass used, and the version counter tells when a value saved for backward has changed
since (torch then raises, and so does this).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
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

LEAF_IN_PLACE = "a leaf Variable that requires grad is being used in an in-place operation."
VIEW_OF_LEAF_IN_PLACE = "a view of a leaf Variable that requires grad is being used in an in-place operation."
MODIFIED = "one of the variables needed for gradient computation has been modified by an inplace operation"
SECOND_BACKWARD = (
    "Trying to backward through the graph a second time (or directly access saved tensors after they have "
    "already been freed). Saved intermediate values of the graph are freed when you call .backward(). "
    "Specify retain_graph=True if you need to backward through the graph a second time.")


def is_grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Operations inside record nothing (like torch.no_grad); in-place updates of leaves inside
    keep them leaves that require grad (`w -= lr * w.grad`)."""
    prev = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = prev


class _Storage:
    """A tensor's current array and version counter; `detach()` shares it, as torch's does."""

    __slots__ = ("array", "changed_by", "version")

    def __init__(self, array: np.ndarray):
        array.flags.writeable = False  # the tape may hold it: only a new array replaces it
        self.array, self.version, self.changed_by = array, 0, ""

    def replace(self, array: np.ndarray, op: str) -> None:
        array.flags.writeable = False
        self.array, self.version, self.changed_by = array, self.version + 1, op


class _Use:
    """One operand of a recorded op, as it was when the op ran."""

    __slots__ = ("leaf", "node", "saved", "storage", "value", "version")
    storage: _Storage | None

    def __init__(self, operand: Any, saved: bool):
        if isinstance(operand, Tensor):
            self.node = operand._node
            self.leaf = operand if operand.requires_grad and operand._node is None else None
            self.value, self.storage, self.version = operand.data, operand._st, operand._st.version
        else:  # a plain array or number: nothing can change it
            self.node, self.leaf, self.storage = None, None, None
            self.value, self.version = np.asarray(operand), 0
        # a plain operand cannot change, so it is never checked (torch does save `2` in x * 2: a second
        # backward of that raises in torch, and runs here)
        self.saved = saved and self.storage is not None


class _Node:
    """A recorded op (torch's grad_fn): what backward needs, and what it may check."""

    __slots__ = ("attrs", "freed", "op", "saves_output", "storage", "uses", "value", "version")

    def __init__(self, op: str, attrs: dict[str, Any], uses: tuple[_Use, ...], value: np.ndarray,
                 storage: _Storage, saves_output: bool):
        self.op, self.attrs, self.uses, self.value = op, attrs, uses, value
        self.storage, self.version, self.saves_output = storage, storage.version, saves_output
        self.freed = False

    def saves(self) -> bool:
        """Whether torch's backward of this op reads saved tensors (so it cannot run twice)."""
        return self.saves_output or any(u.saved for u in self.uses)


# ---------------------------------------------------------------- what torch saves for backward

# unary ops whose backward torch computes from the result (the others: from the operand)
_SAVES_RESULT = frozenset({"exp", "expm1", "tan", "tanh", "sqrt", "logistic"})


def _saved(op: str, needs: list[bool]) -> tuple[list[bool], bool]:
    """Which operands (and whether the result) torch saves for the backward of `op`, given which
    operands need a gradient: the tensors whose in-place change makes torch's backward raise."""
    n = len(needs)
    if op in ("mul", "matmul"):
        return [needs[1], needs[0]], False
    if op == "div":
        return [needs[1], needs[0] or needs[1]], False
    if op == "pow":
        return [True, True], needs[1]
    if op in ("select",):
        return [True] + [False] * (n - 1), False
    if op in ("take", "scatter_add"):
        return [i == 1 for i in range(n)], False
    if op in ("reduce_max", "reduce_min"):
        return [True], True
    if op in _SAVES_RESULT:
        return [False] * n, True
    if PRIMITIVES[op].linear:
        return [False] * n, False
    return [True] * n, False  # maximum, minimum, atan2, log, log1p, sin, cos, arctan, abs, ...


class Tensor(ArrayMethods):
    """An array that records the operations applied to it, for `backward()`."""

    __slots__ = ("_grad", "_node", "_st", "requires_grad")

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        a = np.array(data, dtype=dtype)
        if dtype_name(a.dtype) not in DTYPES:
            raise TypeError(f"tensor dtype {a.dtype} is not supported; use one of {list(DTYPES)}")
        if requires_grad and dtype_name(a.dtype) not in FLOATS:
            raise TypeError(f"only float tensors can require gradients, got dtype {a.dtype}")
        self._st = _Storage(a)
        self.requires_grad = requires_grad
        self._grad: Tensor | None = None
        self._node: _Node | None = None

    @classmethod
    def _of(cls, array: np.ndarray, storage: _Storage | None = None) -> Tensor:
        """A tensor over `array` (not copied) or over an existing storage."""
        t = cls.__new__(cls)
        t._st = storage if storage is not None else _Storage(array)
        t.requires_grad, t._grad, t._node = False, None, None
        return t

    # ---- array-like
    @property
    def data(self) -> np.ndarray:
        """The current value (read-only: change it with in-place operations)."""
        return self._st.array

    @data.setter
    def data(self, value: Any) -> None:  # torch's `t.data = ...`: a new value, no version change
        a = np.array(value, dtype=self.dtype)
        if a.shape != self.shape:
            raise RuntimeError(f"data of shape {a.shape} assigned to a tensor of shape {self.shape}")
        a.flags.writeable = False
        self._st.array = a

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
        return self._node is None

    @property
    def grad_fn(self) -> str | None:
        """The name of the op that computed this tensor (None for a leaf)."""
        return None if self._node is None else self._node.op

    @property
    def _version(self) -> int:
        """How many in-place operations changed this tensor's storage (torch's `t._version`)."""
        return self._st.version

    @property
    def grad(self) -> Tensor | None:
        return self._grad

    @grad.setter
    def grad(self, value: Any) -> None:
        if value is not None:
            value = value if isinstance(value, Tensor) else Tensor(value, dtype=self.dtype)
            if value.shape != self.shape:
                raise RuntimeError(f"assigned grad has data of a different size: {value.shape}, tensor {self.shape}")
        self._grad = value

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
        extra = f", grad_op={self.grad_fn}" if self._node else (", requires_grad=True" if self.requires_grad else "")
        return f"tensor({body}{extra})"

    def detach(self) -> Tensor:
        """The same data, cut from the tape; it shares this tensor's storage and version counter,
        so an in-place change through either is seen by both (as torch's)."""
        return Tensor._of(self.data, self._st)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if self._node is not None:
            if not requires_grad:
                raise RuntimeError(
                    "you can only change requires_grad flags of leaf variables. If you want to use a computed "
                    "variable in a subgraph that doesn't require differentiation use var_no_grad = var.detach().")
            return self
        if requires_grad and dtype_name(self.dtype) not in FLOATS:
            raise RuntimeError(f"only Tensors of floating point dtype can require gradients, got {self.dtype}")
        self.requires_grad = bool(requires_grad)
        return self

    def zero_grad(self) -> None:
        self._grad = None

    def backward(self, gradient: Any = None, retain_graph: bool | None = None, create_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires grad. The recorded
        graph is freed after, unless `retain_graph=True`: a second backward through an op that
        saved values for it raises, as torch's."""
        if create_graph:
            raise NotImplementedError("create_graph=True is not supported; use gs.grad or gs.hessian for higher derivatives")
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no operand had requires_grad=True)")
        if gradient is None:
            if self.shape != ():
                raise RuntimeError(f"backward() of a tensor of shape {self.shape} needs a gradient argument "
                                   "(grad can be implicitly created only for scalar outputs)")
            gradient = np.ones((), self.dtype)
        gradient = np.asarray(gradient, dtype=self.dtype)
        if gradient.shape != self.shape:
            raise RuntimeError(f"Mismatch in shape: gradient has a shape of {gradient.shape} and the tensor a shape "
                               f"of {self.shape}")
        if self._node is None:
            _accumulate(self, np.array(gradient))
        else:
            _backward(self._node, gradient, bool(retain_graph))

    # ---- in-place operations
    def _in_place(self, name: str, compute: Callable[[], Any], view: bool = False) -> Tensor:
        if self.requires_grad and self._node is None and is_grad_enabled():
            raise RuntimeError(VIEW_OF_LEAF_IN_PLACE if view else LEAF_IN_PLACE)
        r = compute()
        r = r if isinstance(r, Tensor) else Tensor._of(np.asarray(r))
        if r.shape != self.shape:
            raise RuntimeError(f"output with shape {list(self.shape)} doesn't match the broadcast shape {list(r.shape)}")
        if r.dtype != self.dtype:
            if not np.can_cast(r.dtype, self.dtype, "same_kind"):
                raise RuntimeError(f"result type {r.dtype} can't be cast to the desired output type {self.dtype}")
            r = numpy_api.astype(r, self.dtype)
        if r._node is not None and r._node.uses and r._node.uses[0].storage is self._st:
            r._node.uses[0].storage = None  # the in-place op keeps the old value for itself (torch's original_self)
        self._st.replace(r.data, name)
        if r._node is not None:  # recorded: this tensor is now that op's result
            self._node, self.requires_grad = r._node, True
            r._node.storage, r._node.version = self._st, self._st.version
        return self

    def __iadd__(self, o: Any) -> Tensor:
        return self._in_place("+= (add_)", lambda: numpy_api.add(self, o))

    def __isub__(self, o: Any) -> Tensor:
        return self._in_place("-= (sub_)", lambda: numpy_api.subtract(self, o))

    def __imul__(self, o: Any) -> Tensor:
        return self._in_place("*= (mul_)", lambda: numpy_api.multiply(self, o))

    def __itruediv__(self, o: Any) -> Tensor:
        return self._in_place("/= (div_)", lambda: numpy_api.divide(self, o))

    def __ipow__(self, o: Any) -> Tensor:
        return self._in_place("**= (pow_)", lambda: numpy_api.power(self, o))

    add_, sub_, mul_, div_, pow_ = __iadd__, __isub__, __imul__, __itruediv__, __ipow__

    def __setitem__(self, key: Any, value: Any) -> None:
        self._in_place("setitem (t[...] = v)", lambda: _assigned(self, key, value), view=True)

    def zero_(self) -> Tensor:
        return self._fill(0, "zero_()")

    def fill_(self, value: Any) -> Tensor:
        return self._fill(value, "fill_()")

    def _fill(self, value: Any, name: str) -> Tensor:
        nothing = np.zeros(self.shape, bool)  # a select: the old value gets a zero gradient, inf and nan too
        value = value if isinstance(value, Tensor) else numpy_api.astype(value, self.dtype)
        return self._in_place(name, lambda: numpy_api.where(nothing, self, value))


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


def _records(op: str, dtype: str, operands: tuple[Any, ...]) -> bool:
    return (is_grad_enabled() and PRIMITIVES[op].differentiable and dtype in FLOATS
            and any(isinstance(a, Tensor) and a.requires_grad for a in operands))


def _eager(op: str, *args: Any, **attrs: Any) -> Tensor:
    arrays = [a.data if isinstance(a, Tensor) else np.asarray(a) for a in args]
    value = KERNELS[op](*arrays, **attrs)
    dtype, shape = infer(op, [(dtype_name(a.dtype), a.shape) for a in arrays], attrs)
    if dtype_name(np.asarray(value).dtype) != dtype or np.shape(value) != shape:
        value = np.asarray(value, dtype=dtype).reshape(shape)
    out = Tensor._of(np.asarray(value))
    if _records(op, dtype, args):
        needs = [isinstance(a, Tensor) and a.requires_grad for a in args]
        saved, saves_output = _saved(op, needs)
        uses = tuple(_Use(a, s) for a, s in zip(args, saved, strict=True))
        out._node = _Node(op, attrs, uses, out.data, out._st, saves_output)
        out.requires_grad = True
    return out


numpy_api._EAGER.append((Tensor, _eager))


def _assigned(t: Tensor, key: Any, value: Any) -> Any:
    """`t` with `t[key] = value` applied, as numpy assigns (the last write wins), out of place and
    recorded when `t` or `value` requires grad."""
    key = tuple(np.asarray(k) if isinstance(k, Tensor) else k for k in (key if isinstance(key, tuple) else (key,)))
    if not _records("select", dtype_name(t.dtype), (t, value)):
        a = np.array(t.data)
        a[key] = value.data if isinstance(value, Tensor) else value
        return Tensor._of(a)
    n = int(np.prod(t.shape))
    pos = np.asarray(np.arange(n).reshape(t.shape)[key])  # numpy decides what the key picks (and raises)
    value = numpy_api.astype(value, t.dtype)
    try:
        np.broadcast_shapes(numpy_api.shape_of(value), pos.shape)
    except ValueError:
        raise ValueError(f"could not broadcast input array from shape {numpy_api.shape_of(value)} "
                         f"into shape {pos.shape}") from None
    flat = pos.reshape(-1)
    where, first_from_end = np.unique(flat[::-1], return_index=True)
    last = flat.size - 1 - first_from_end  # the last write to each position wins
    values = numpy_api.take(numpy_api.reshape(numpy_api.broadcast_to(value, pos.shape), (-1,)), last, axis=0)
    scattered = numpy_api.bind("scatter_add", np.zeros(n, t.dtype), where.astype(np.int64), values, axis=0)
    mask = np.zeros(n, bool)
    mask[where] = True
    return numpy_api.where(mask.reshape(t.shape), numpy_api.reshape(scattered, t.shape), t)


# ---------------------------------------------------------------- backward


def _check(node: _Node) -> None:
    """torch's checks before running a node's backward: not freed, saved values unchanged."""
    if node.freed and node.saves():
        raise RuntimeError(SECOND_BACKWARD)
    if node.saves_output and node.storage.version != node.version:
        raise RuntimeError(_modified(node.value, node.storage, node.version, f", which is output 0 of {node.op},",
                                     node.op))
    for u in node.uses:
        if u.saved and u.storage is not None and u.storage.version != u.version:
            raise RuntimeError(_modified(u.value, u.storage, u.version, "", node.op))


def _modified(value: np.ndarray, storage: _Storage, version: int, which: str, saver: str) -> str:
    return (f"{MODIFIED}: [{value.dtype} {list(value.shape)}]{which} is at version {storage.version}; expected "
            f"version {version} instead. {saver} saved it for its backward, and {storage.changed_by} changed it "
            "after: compute the new value out of place (y = y + 1), or change it after backward().")


def _accumulate(t: Tensor, g: np.ndarray) -> None:
    """torch's AccumulateGrad: the first gradient becomes `.grad`, later ones add into it in place."""
    if t._grad is None:
        t._grad = Tensor._of(np.array(g, dtype=t.dtype))
    else:
        t._grad._st.replace(np.asarray(t._grad.data + g, dtype=t._grad.dtype), "gradient accumulation")


def _backward(root: _Node, gradient: np.ndarray, retain_graph: bool) -> None:
    order: list[_Node] = []
    seen: set[int] = set()
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: operands before users
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((u.node, False) for u in node.uses if u.node is not None and id(u.node) not in seen)
    for node in order:
        _check(node)
    b = Builder()
    var: dict[int, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    by_value: dict[tuple[int, int], Any] = {}
    leaves: list[tuple[str, Tensor]] = []
    recorded: dict[int, _Node] = {}
    for node in order:
        args = []
        for u in node.uses:
            if u.node is not None:
                args.append(var[id(u.node)])
                continue
            key = (id(u.leaf), id(u.value))  # a leaf changed in place between uses is two inputs
            if key not in by_value:
                name = f"t{len(inputs)}"
                by_value[key] = b.input(name, dtype_name(u.value.dtype), u.value.shape)
                inputs[name] = u.value
                if u.leaf is not None:
                    leaves.append((name, u.leaf))
            args.append(by_value[key])
        v = b.bind(node.op, *args, **node.attrs)
        var[id(node)] = v
        recorded[v.id] = node
    graph = b.build([("out", var[id(root)])])
    # the builder numbers nodes in the order they were bound; map the graph's ids back to them
    residuals = {gn.id: recorded[vid].value for gn, vid in zip(graph.nodes, sorted(recorded), strict=True)}
    _, grads = default_engine().vjp(graph, inputs, [n for n, _ in leaves], seeds={"out": gradient},
                                     outputs=["out"], residuals=residuals)
    for name, t in leaves:
        _accumulate(t, grads[name])
    if not retain_graph:
        for node in order:
            node.freed = True
