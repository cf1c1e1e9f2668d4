"""The IR: a typed SSA list of primitive nodes, like a jaxpr.

Value ids are dense: the graph's inputs, then its constants, then its nodes, in that order,
so "defined before use" is "every operand id is smaller than the node's own id".
`Graph.id` is the SHA-256 of a canonical serialisation; `to_proto`/`from_proto` convert
exactly to and from the wire message, and `validate` checks a graph that came from outside.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

from .errors import GraphError, LimitError, ShapeError
from .guard import poller
from .names import INTERNAL
from .ops.core import DTYPES, NP_DTYPES, PRIMITIVES, AVal, Shape, dtype_name, infer
from .ops.dtypes import Shaped
from .v1 import graph_pb2 as pb

MAX_RANK = 32
MAX_ATTRS = 16  # attributes of one node (no primitive has more than a few)
MAX_DEPTH = 8  # subgraphs inside subgraphs (a scan in a cond in a scan ...)
MAX_SUBGRAPHS = 64  # subgraphs in one attribute (the branches of a switch)
SHORT = {"bool": "bool", "int32": "i32", "int64": "i64", "float32": "f32", "float64": "f64"}


def type_str(dtype: str, shape: Shape) -> str:
    return f"{SHORT[dtype]}[{','.join(map(str, shape))}]"


@dataclass(frozen=True)
class Limits:
    """Size limits a graph from outside must respect (checked before anything is allocated),
    and what a call on it may hold (checked before it runs; None: not limited)."""

    max_nodes: int = 100_000
    max_elements: int = 1 << 28  # per tensor, also those a call derives (Jacobian seeds, batched results)
    max_constant_bytes: int = 1 << 30  # all constants together
    max_message_bytes: int | None = None  # a response: refused before computing when its outputs are larger
    max_call_bytes: int | None = None  # one plan's peak memory
    max_inflight_bytes: int | None = None  # the peaks of the plans running at once, together


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Input:
    id: int
    name: str
    dtype: str
    shape: Shape


@dataclass(frozen=True)
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    dtype: str
    shape: Shape

    def text(self, names: dict[int, str] | None = None) -> str:
        """One line of the printed graph, e.g. `%4:f64[3] = reduce_sum[axes=(0,) keepdims=False] %2`."""
        names = names or {}
        attrs = " ".join(f"{k}={_attr_text(v)}" for k, v in sorted(self.attrs.items()))
        args = " ".join(names.get(i, f"%{i}") for i in self.inputs)
        return f"%{self.id}:{type_str(self.dtype, self.shape)} = {self.op}{f'[{attrs}]' if attrs else ''} {args}"


def _attr_text(v: Any) -> str:
    if is_graphs(v):
        return "{" + ",".join(f"graph:{g.id[:12]}" for g in v) + "}"
    if isinstance(v, tuple):
        return "(" + ",".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
    return str(v)


@dataclass(eq=False)
class Graph:
    inputs: list[Input]
    constants: list[np.ndarray]
    nodes: list[Node]
    outputs: list[tuple[str, int]]
    _id: str | None = field(default=None, repr=False)
    _by_name: dict[str, Input] | None = field(default=None, repr=False)
    memo: dict[str, Any] = field(default_factory=dict, repr=False)  # what is derived from it once (a subgraph's liveness)

    def __eq__(self, other: object) -> bool:
        """Graphs are equal when their content is (the same id): subgraph attributes compare so."""
        return self is other or (isinstance(other, Graph) and self.id == other.id)

    def __hash__(self) -> int:
        return hash(self.id)

    # ---- types
    @property
    def n_values(self) -> int:
        return len(self.inputs) + len(self.constants) + len(self.nodes)

    @property
    def first_node_id(self) -> int:
        return len(self.inputs) + len(self.constants)

    def aval(self, vid: int) -> AVal:
        """(dtype, shape) of value `vid`."""
        if vid < len(self.inputs):
            i = self.inputs[vid]
            return (i.dtype, i.shape)
        if vid < self.first_node_id:
            c = self.constants[vid - len(self.inputs)]
            return (dtype_name(c.dtype), c.shape)
        n = self.nodes[vid - self.first_node_id]
        return (n.dtype, n.shape)

    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def input(self, name: str) -> Input:
        if self._by_name is None:
            self._by_name = {i.name: i for i in reversed(self.inputs)}  # the first of a name, as a scan finds
        i = self._by_name.get(name)
        if i is not None:
            return i
        raise GraphError(f"graph has no input named {name!r}; inputs are {self.input_names()}")

    # ---- identity
    @property
    def id(self) -> str:
        """SHA-256 of the canonical serialisation: same computation, same id, on any client."""
        if self._id is None:
            h = hashlib.sha256(b"gradserve.graph.v1\n")
            for i in self.inputs:
                h.update(f"in {i.name!r} {type_str(i.dtype, i.shape)}\n".encode())
            for c in self.constants:
                data = np.ascontiguousarray(c).astype(c.dtype.newbyteorder("<"), copy=False).tobytes()
                h.update(f"const {type_str(dtype_name(c.dtype), c.shape)} {len(data)}\n".encode())
                h.update(data)
            for n in self.nodes:
                attrs = ";".join(f"{k}={_canonical_attr(v)}" for k, v in sorted(n.attrs.items()))
                h.update(f"{n.op} {n.inputs} {{{attrs}}} {type_str(n.dtype, n.shape)}\n".encode())
            for name, vid in self.outputs:
                h.update(f"out {name!r} {vid}\n".encode())
            self._id = h.hexdigest()
        return self._id

    def __str__(self) -> str:
        ins = " ".join(f"{i.name}=%{i.id}:{type_str(i.dtype, i.shape)}" for i in self.inputs)
        consts = " ".join(f"%{len(self.inputs) + k}:{type_str(dtype_name(c.dtype), c.shape)}={_const_text(c)}"
                          for k, c in enumerate(self.constants))
        body = "\n".join("    " + n.text() for n in self.nodes)
        outs = ", ".join(f"{name}=%{vid}" for name, vid in self.outputs)
        return f"{{ lambda {ins}{' ; ' + consts if consts else ''} . let\n{body}\n  in ({outs}) }}"

    # ---- wire
    def to_proto(self):  # -> gradserve_engine.v1.graph_pb2.Graph
        msg = pb.Graph()
        for i in self.inputs:
            msg.inputs.add(id=i.id, name=i.name, dtype=_PB_DTYPE[i.dtype], shape=i.shape)
        for k, c in enumerate(self.constants):
            msg.constants.add(id=len(self.inputs) + k, value=tensor_to_proto(c))
        for n in self.nodes:
            node = msg.nodes.add(id=n.id, op=n.op, inputs=n.inputs, dtype=_PB_DTYPE[n.dtype], shape=n.shape)
            for k, v in n.attrs.items():
                _set_attr(node.attrs[k], v)
        for name, vid in self.outputs:
            msg.outputs.add(name=name, id=vid)
        return msg

    @classmethod
    def from_proto(cls, msg, limits: Limits = DEFAULT_LIMITS, internal_names: bool = False) -> Graph:
        """Decode and validate a wire graph; every problem is a GraphError naming the node.
        `internal_names`: the graph is one of gradserve's own (a stage sent to a worker), whose
        names may begin with the prefix reserved for transforms. Subgraphs (attributes of kind
        "graphs") are decoded with it and count against the same limits."""
        nodes, const_bytes = _census(msg, 0)  # over the limits with its subgraphs (alone: refused as it decodes)
        if nodes > limits.max_nodes >= len(msg.nodes):
            raise LimitError(f"graph has {nodes} nodes with those of its subgraphs, over the limit of {limits.max_nodes}")
        if const_bytes > limits.max_constant_bytes >= sum(len(c.value.data) for c in msg.constants):
            raise LimitError(f"the constants of the graph and its subgraphs exceed the limit of "
                             f"{limits.max_constant_bytes} bytes")
        graph = cls._decode(msg, limits)
        validate(graph, limits, internal_names)
        return graph

    @classmethod
    def _decode(cls, msg, limits: Limits) -> Graph:
        """The graph of a wire message, its subgraphs decoded too, checked as far as decoding needs."""
        n_values = len(msg.inputs) + len(msg.constants) + len(msg.nodes)
        if len(msg.nodes) > limits.max_nodes:
            raise LimitError(f"graph has {len(msg.nodes)} nodes, over the limit of {limits.max_nodes}")
        if len(msg.inputs) + len(msg.constants) > limits.max_nodes:
            raise LimitError(f"graph has {len(msg.inputs)} inputs and {len(msg.constants)} constants, over the limit of "
                             f"{limits.max_nodes} values")
        inputs = []
        for k, i in enumerate(msg.inputs):
            if i.id != k:
                raise GraphError(f"input {i.name!r} has id {i.id}, expected {k} (inputs come first, in order)")
            inputs.append(Input(k, i.name, _dtype_from_pb(i.dtype, f"input {i.name!r}"),
                                check_shape(i.shape, limits, f"input {i.name!r}")))
        constants = []
        const_bytes = 0
        for k, c in enumerate(msg.constants):
            vid = len(inputs) + k
            if c.id != vid:
                raise GraphError(f"constant has id {c.id}, expected {vid} (constants follow the inputs, in order)")
            data = c.value.data
            const_bytes += len(data)
            if const_bytes > limits.max_constant_bytes:
                raise LimitError(f"constant %{vid}: constants exceed the limit of {limits.max_constant_bytes} bytes")
            constants.append(tensor_from_proto(c.value, limits, f"constant %{vid}", data))
        nodes = []
        for k, n in enumerate(msg.nodes):
            vid = len(inputs) + len(constants) + k
            where = f"node %{n.id} ({n.op})"
            if n.id != vid:
                raise GraphError(f"{where}: id {n.id} out of order, expected {vid} "
                                 "(nodes are numbered after inputs and constants)")
            if len(n.attrs) > MAX_ATTRS:
                raise LimitError(f"{where}: {len(n.attrs)} attributes, over the limit of {MAX_ATTRS}")
            attrs = {key: _get_attr(a, f"{where} attribute {_short(key)}", limits) for key, a in n.attrs.items()}
            nodes.append(Node(vid, n.op, tuple(n.inputs), attrs, _dtype_from_pb(n.dtype, where),
                              check_shape(n.shape, limits, where)))
        outputs = []
        for o in msg.outputs:
            if not 0 <= o.id < n_values:
                raise GraphError(f"output {o.name!r} refers to %{o.id}, which the graph does not define")
            outputs.append((o.name, o.id))
        return cls(inputs, constants, nodes, outputs)


def _census(msg, depth: int) -> tuple[int, int]:
    """Nodes and constant bytes of a wire graph with all its subgraphs, counted before anything
    is decoded; refuses nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise LimitError(f"subgraphs nested more than {MAX_DEPTH} deep")
    nodes = len(msg.nodes)
    const_bytes = sum(len(c.value.data) for c in msg.constants)
    for n in msg.nodes:
        for a in n.attrs.values():
            if a.WhichOneof("value") == "graphs":
                if len(a.graphs.graphs) > MAX_SUBGRAPHS:
                    raise LimitError(f"node %{n.id} ({_short(n.op)}): {len(a.graphs.graphs)} subgraphs in one attribute, "
                                     f"over the limit of {MAX_SUBGRAPHS}")
                for g in a.graphs.graphs:
                    k, c = _census(g, depth + 1)
                    nodes, const_bytes = nodes + k, const_bytes + c
    return nodes, const_bytes


def is_graphs(v: Any) -> bool:
    """Whether an attribute value is a tuple of subgraphs (kind "graphs")."""
    return isinstance(v, tuple) and bool(v) and all(isinstance(g, Graph) for g in v)


def _canonical_attr(v: Any) -> str:
    if is_graphs(v):  # a subgraph by its own content hash: the id covers every nested graph
        return "g[" + ",".join(g.id for g in v) + "]"
    if isinstance(v, bool):
        return f"b{int(v)}"
    if isinstance(v, float):
        return "f" + struct.pack("<d", v).hex()
    if isinstance(v, int):
        return f"i{v}"
    if isinstance(v, tuple):
        return "[" + ",".join(str(x) for x in v) + "]"
    return "s" + repr(v)


def _const_text(c: np.ndarray) -> str:
    if c.size <= 4:
        return np.array2string(c, separator=",").replace("\n", "")
    return f"<{c.size} values>"


# ---------------------------------------------------------------- tensors and attributes on the wire

_PB_DTYPE = {"bool": 1, "int32": 2, "int64": 3, "float32": 4, "float64": 5}
_WIRE_DTYPES = {name: dt.newbyteorder("<") for name, dt in NP_DTYPES.items()}  # the wire is little-endian
_LITTLE = sys.byteorder == "little"
_DTYPE_FROM_PB = {v: k for k, v in _PB_DTYPE.items()}


def _dtype_from_pb(code: int, where: str) -> str:
    if code not in _DTYPE_FROM_PB:
        raise GraphError(f"{where}: unknown dtype code {code}")
    return _DTYPE_FROM_PB[code]


def check_shape(shape: Iterable[int], limits: Limits, where: str) -> Shape:
    """A shape from outside: non-negative dims, element count within the limit (checked as it grows)."""
    shape = tuple(shape)
    if len(shape) > MAX_RANK:
        raise LimitError(f"{where}: rank {len(shape)} is over the limit of {MAX_RANK}")
    shape = tuple(int(d) for d in shape)
    count = 1
    for d in shape:
        if d < 0:
            raise GraphError(f"{where}: negative dimension in shape {list(shape)}")
        count *= d
        if count > limits.max_elements or d > limits.max_elements:  # a huge dim next to a 0 is still refused
            raise LimitError(f"{where}: shape {list(shape)} has more than {limits.max_elements} elements")
    return shape


def tensor_to_proto(a: np.ndarray, msg=None):
    a = np.asarray(a)
    code = _PB_DTYPE.get(dtype_name(a.dtype))
    if code is None:
        raise TypeError(f"dtype {a.dtype} cannot travel; use one of {list(DTYPES)}")
    if msg is None:
        msg = pb.Tensor()
    msg.dtype = code
    msg.shape[:] = a.shape
    msg.data = (a if _LITTLE and a.dtype.isnative else a.astype(a.dtype.newbyteorder("<"))).tobytes()
    return msg


def tensor_from_proto(msg, limits: Limits = DEFAULT_LIMITS, where: str = "tensor", data: bytes | None = None) -> np.ndarray:
    """The array of a wire tensor: a read-only view of its bytes. `data`: `msg.data` when the
    caller read it already (each read of a bytes field copies it out of the message)."""
    if msg.ref:  # only the service resolves references, and only in request tensors: never a graph constant
        raise GraphError(f"{where}: a reference to a stored tensor ({msg.ref[:64]!r}) is not accepted here; "
                         "references stand for request tensors only, never for values inside a graph")
    dtype = _dtype_from_pb(msg.dtype, where)
    shape = check_shape(msg.shape, limits, where)
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if data is None:
        data = msg.data
    if len(data) != want:
        raise GraphError(f"{where}: {type_str(dtype, shape)} needs {want} bytes, got {len(data)}")
    if dtype == "bool" and data.strip(b"\x00\x01"):
        raise GraphError(f"{where}: bool data holds bytes other than 0 and 1")
    return np.frombuffer(data, dtype=_WIRE_DTYPES[dtype]).astype(NP_DTYPES[dtype], copy=False).reshape(shape)


def _set_attr(msg, v: Any) -> None:
    if is_graphs(v):
        for g in v:
            msg.graphs.graphs.add().CopyFrom(g.to_proto())
    elif isinstance(v, bool):
        msg.b = v
    elif isinstance(v, int):
        msg.i = v
    elif isinstance(v, float):
        msg.f = v
    elif isinstance(v, str):
        msg.s = v
    elif isinstance(v, tuple):
        msg.ints.values[:] = v
        msg.ints.SetInParent()
    else:
        raise TypeError(f"attribute value {v!r} has no wire form")


def _get_attr(msg, where: str, limits: Limits) -> Any:
    kind = msg.WhichOneof("value")
    if kind is None:
        raise GraphError(f"{where} has no value")
    if kind == "graphs":
        if not msg.graphs.graphs:
            raise GraphError(f"{where} holds no subgraph")
        return tuple(Graph._decode(g, limits) for g in msg.graphs.graphs)
    if kind in ("ints", "floats"):
        values = getattr(msg, kind).values
        if len(values) > MAX_RANK:  # counted before anything is converted: shapes, axes, perms have one per dim
            raise LimitError(f"{where} has {len(values)} entries, over the rank limit of {MAX_RANK}")
        return tuple(values)
    return getattr(msg, kind)


# ---------------------------------------------------------------- validation

_KIND_CHECK = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "dtype": lambda v: v in DTYPES,
    "ints": lambda v: isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "graphs": lambda v: is_graphs(v) and len(v) <= MAX_SUBGRAPHS,
}


def check_attrs(op: str, attrs: dict[str, Any], where: str) -> None:
    schema = PRIMITIVES[op].attrs
    missing = sorted(set(schema) - set(attrs))
    extra = sorted(set(attrs) - set(schema))
    if missing or extra:
        raise GraphError(f"{where}: attributes {sorted(attrs)} do not match {op}'s {sorted(schema)}")
    for key, kind in schema.items():
        value = attrs[key]
        if kind == "ints" and isinstance(value, tuple) and len(value) > MAX_RANK:  # shapes, axes, perms: one per dim
            raise LimitError(f"{where}: attribute {key} has {len(value)} entries, over the rank limit of {MAX_RANK}")
        if not _KIND_CHECK[kind](value):
            raise GraphError(f"{where}: attribute {key}={_short(value)} is not of kind {kind}")


def _short(value: Any, limit: int = 200) -> str:
    """repr of a value from outside, cut to keep messages small."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def duplicates(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted (none: an empty list, cheaply)."""
    return sorted(n for n, k in Counter(names).items() if k > 1) if len(set(names)) != len(names) else []


def validate(graph: Graph, limits: Limits = DEFAULT_LIMITS, internal_names: bool = False) -> None:
    """Check a graph from outside: ids, ops, arity, attributes, types, names, limits; subgraphs
    recursively, their nodes counted with the graph's against `limits.max_nodes`."""
    _validate(graph, limits, internal_names, 0, [0])


def _validate(graph: Graph, limits: Limits, internal_names: bool, depth: int, total: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise LimitError(f"subgraphs nested more than {MAX_DEPTH} deep")
    total[0] += len(graph.nodes)
    if total[0] > limits.max_nodes:
        raise LimitError(f"graph has {total[0]} nodes with those of its subgraphs, over the limit of {limits.max_nodes}")
    if len(graph.nodes) > limits.max_nodes:
        raise LimitError(f"graph has {len(graph.nodes)} nodes, over the limit of {limits.max_nodes}")
    if len(graph.inputs) + len(graph.constants) > limits.max_nodes:
        raise LimitError(f"graph has {len(graph.inputs)} inputs and {len(graph.constants)} constants, over the limit of "
                         f"{limits.max_nodes} values")
    for kind, names in (("input", graph.input_names()), ("output", graph.output_names())):
        dup = duplicates(names)
        if dup:
            raise GraphError(f"duplicate {kind} names {_short(dup)}")
        reserved = [] if internal_names else sorted(n for n in names if n.startswith(INTERNAL))
        if reserved:
            raise GraphError(f"{kind} names {_short(reserved)} begin with {INTERNAL!r}, which is reserved for the names "
                             "gradserve's transforms add")
    if not graph.outputs:
        raise GraphError("graph has no outputs")
    for k, i in enumerate(graph.inputs):
        if i.id != k:
            raise GraphError(f"input {i.name!r} has id {i.id}, expected {k} (inputs come first, in order)")
        check_shape(i.shape, limits, f"input {i.name!r}")
    for name, vid in graph.outputs:
        if not 0 <= vid < graph.n_values:
            raise GraphError(f"output {name!r} refers to %{vid}, which the graph does not define")
    for k, n in enumerate(graph.nodes):
        where = n.text()
        if n.id != graph.first_node_id + k:
            raise GraphError(f"node id %{n.id} out of order, expected %{graph.first_node_id + k}, at {where}")
        if n.op not in PRIMITIVES:
            raise GraphError(f"unknown op {n.op!r} at {where}")
        prim = PRIMITIVES[n.op]
        if (prim.arity is not None and len(n.inputs) != prim.arity) or (prim.arity is None and not n.inputs):
            want = prim.arity if prim.arity is not None else "at least 1"
            raise GraphError(f"{n.op} takes {want} operands, got {len(n.inputs)}, at {where}")
        for operand in n.inputs:
            if not 0 <= operand < n.id:
                raise GraphError(f"operand %{operand} is used before it is defined (a cycle or a forward reference) at {where}")
        check_attrs(n.op, n.attrs, where)
        for key, value in sorted(n.attrs.items()):
            if is_graphs(value):  # a subgraph's names are the transforms' own: the reserved prefix is allowed
                for k, g in enumerate(value):
                    try:
                        _validate(g, limits, True, depth + 1, total)
                    except (GraphError, ShapeError) as e:
                        raise type(e)(f"in subgraph {key}[{k}]: {e}, at {where}") from None
        try:
            dtype, shape = infer(n.op, [graph.aval(i) for i in n.inputs], n.attrs)
        except ShapeError as e:
            raise ShapeError(f"{e} at {where}") from None
        if (dtype, tuple(shape)) != (n.dtype, n.shape):
            raise ShapeError(f"declared type {type_str(n.dtype, n.shape)} but {n.op} gives {type_str(dtype, shape)} at {where}")
        check_shape(shape, limits, where)


# ---------------------------------------------------------------- builder


class Var(Shaped):
    """A value being built: its id in the builder, dtype and shape. The engine emits with the
    strict functions of `ops.emit`; the SDK's traced values subclass this with numpy's operators.

    `ir_dtype` is the IR's name of the dtype ("float64"), what the builder and the type rules
    read. `dtype` is how the value presents it: the name itself here, numpy's `np.dtype` on the
    SDK's traced values (as a numpy user expects), so code that may meet either reads `ir_dtype`."""

    __slots__ = ("builder", "id", "ir_dtype", "shape")

    def __init__(self, builder: Builder, vid: int, dtype: str, shape: Shape):
        self.builder, self.id, self.ir_dtype, self.shape = builder, vid, dtype, shape

    @property
    def dtype(self) -> str:
        return self.ir_dtype

    @property
    def aval(self) -> AVal:
        return (self.ir_dtype, self.shape)

    def __repr__(self) -> str:
        return f"Traced<{type_str(self.ir_dtype, self.shape)}>"


class Builder:
    """Emits nodes with type inference; `build` numbers them canonically and drops dead ones.
    Values are of `value_type` (the SDK traces with its numpy-style subclass of `Var`).
    `depth` > 0: a trace nested in others (the body of a loop), which takes values of the
    traces around it as its own inputs; an op on values of several traces goes to the innermost."""

    depth = 0

    def __init__(self, value_type: type[Var] = Var) -> None:
        self.value_type = value_type
        self._inputs: list[tuple[int, str, str, Shape]] = []
        self._consts: dict[tuple, tuple[int, np.ndarray]] = {}
        self._nodes: list[tuple[int, str, tuple[int, ...], dict[str, Any], str, Shape]] = []
        self._count = 0
        self._const_by_id: dict[int, np.ndarray] = {}

    def _new(self, dtype: str, shape: Shape) -> Var:
        v = self.value_type(self, self._count, dtype, tuple(shape))
        self._count += 1
        return v

    def input(self, name: str, dtype: str, shape: Shape) -> Var:
        v = self._new(dtype, shape)
        self._inputs.append((v.id, name, dtype, v.shape))
        return v

    def const(self, value: Any, dtype: str | None = None) -> Var:
        a = np.asarray(value, dtype=dtype)
        if dtype_name(a.dtype) not in DTYPES:
            raise TypeError(f"constant of dtype {a.dtype} is not supported; use one of {list(DTYPES)}")
        key = (dtype_name(a.dtype), a.shape, a.tobytes())
        if key not in self._consts:
            v = self._new(dtype_name(a.dtype), a.shape)
            a = a.copy()
            a.setflags(write=False)
            self._consts[key] = (v.id, a)
            self._const_by_id[v.id] = a
            return v
        vid, a = self._consts[key]
        return self.value_type(self, vid, dtype_name(a.dtype), a.shape)

    def constant_value(self, v: Var) -> np.ndarray | None:
        """The array of `v` when it is a constant (used for folding and shortcuts), else None."""
        return self._const_by_id.get(v.id)

    def bind(self, op: str, *args: Var, **attrs: Any) -> Var:
        for a in args:
            if not isinstance(a, Var) or a.builder is not self:
                raise GraphError(f"{op}: operand {a!r} does not belong to this trace (a value leaked from another trace?)")
        attrs = {k: _attr_value(v) for k, v in attrs.items()}
        check_attrs(op, attrs, op)
        try:
            dtype, shape = infer(op, [a.aval for a in args], attrs)
        except ShapeError as e:
            operands = ", ".join(type_str(a.ir_dtype, a.shape) for a in args)
            raise ShapeError(f"{op}({operands}): {e}{_user_frame()}") from None
        v = self._new(dtype, shape)
        self._nodes.append((v.id, op, tuple(a.id for a in args), attrs, dtype, v.shape))
        return v

    def build(self, outputs: Sequence[tuple[str, Var]], prune_inputs: bool = False) -> Graph:
        """The graph computing `outputs`: nodes that no output needs are dropped (and inputs
        too with `prune_inputs`); ids are renumbered inputs, constants, nodes."""
        live = {v.id for _, v in outputs}
        poll = poller("while building a graph")
        for vid, _op, ins, *_ in reversed(self._nodes):
            poll()
            if vid in live:
                live.update(ins)
        renum: dict[int, int] = {}
        inputs = []
        for vid, name, dtype, shape in self._inputs:
            if prune_inputs and vid not in live:
                continue
            renum[vid] = len(renum)
            inputs.append(Input(renum[vid], name, dtype, shape))
        constants = []
        for vid, a in sorted(self._consts.values(), key=lambda t: t[0]):
            if vid in live:
                renum[vid] = len(renum)
                constants.append(a)
        nodes = []
        for vid, op, ins, attrs, dtype, shape in self._nodes:
            if vid in live:
                renum[vid] = len(renum)
                nodes.append(Node(renum[vid], op, tuple(renum[i] for i in ins), attrs, dtype, shape))
        return Graph(inputs, constants, nodes, [(name, renum[v.id]) for name, v in outputs])


def _attr_value(v: Any) -> Any:
    """An attribute as nodes hold it: subgraphs as a tuple of graphs, other sequences as tuples of
    ints, a dtype by its IR name."""
    if isinstance(v, (list, tuple)):
        return tuple(v) if is_graphs(tuple(v)) else tuple(int(x) for x in v)
    if isinstance(v, (np.dtype, type)):
        return dtype_name(np.dtype(v))
    return v


def innermost(values: Iterable[Any]) -> Builder | None:
    """The innermost trace among the traced values in `values` (None: none is traced)."""
    b: Builder | None = None
    for v in values:
        if isinstance(v, Var) and (b is None or v.builder.depth > b.depth):
            b = v.builder
    return b


def _user_frame() -> str:
    """` (at file:line)` of the innermost caller outside gradserve's packages, for trace-time errors."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if not frame.f_globals.get("__name__", "").startswith("gradserve"):
            return f" (at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    return ""


def copy_into(graph: Graph, b: Builder, shape_of: Callable[[Input], Shape] | None = None) -> dict[int, Var]:
    """Declare `graph`'s inputs (shaped by `shape_of`, default their own shape) and constants in
    `b`; returns the map from `graph`'s value ids to them, for a transform to fill with nodes."""
    env = {i.id: b.input(i.name, i.dtype, i.shape if shape_of is None else shape_of(i)) for i in graph.inputs}
    for k, c in enumerate(graph.constants):
        env[len(graph.inputs) + k] = b.const(c)
    return env


def replay(graph: Graph, b: Builder, env: dict[int, Var]) -> dict[int, Var]:
    """Emit `graph`'s constants and nodes into `b`; `env` maps its input ids to Vars and is filled in."""
    for k, c in enumerate(graph.constants):
        env[len(graph.inputs) + k] = b.const(c)
    poll = poller("while building a graph")
    for n in graph.nodes:
        poll()
        env[n.id] = b.bind(n.op, *(env[i] for i in n.inputs), **n.attrs)
    return env
