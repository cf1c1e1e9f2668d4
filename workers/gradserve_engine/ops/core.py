"""The primitive registry: everything the engine knows about an op, in one `Primitive`.

Each family module (`unary`, `binary`, `reductions`, `linalg`, `shape`, `indexing`) registers
its ops with one `register(Primitive(...))` call per op, as JAX's `lax.py` does: the
shape/dtype rule, the numpy kernel, the VJP and JVP rules, and the traits that passes and
backends query (fusion, buffer reuse, the cost model, data-parallel sharding, the numba and
CUDA expressions). Nothing else in the engine keeps a list of op names: every such list is a
query over `PRIMITIVES`, and `tests/test_primitives.py` fails when a primitive lacks a trait
that a backend or pass needs.

Shape rules take operand types `(dtype, shape)` and the attributes, and return the result type
or raise `ShapeError` with a message that says what disagrees.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import ShapeError
from .dtypes import DTYPES, FLOATS, INTS, NP_DTYPES, NUMERIC, AVal, Shape, dtype_name
from .sharding import ReshardRule, ShardRule, SumRule

# the dtype names, with the registry, are what the rest of the engine imports from here
__all__ = ["ATTR_KINDS", "DTYPES", "FLOATS", "INTS", "NP_DTYPES", "NUMERIC", "AVal", "Cost", "Expr", "FlopsRule",
           "JvpRule", "Kernel", "KernelFactory", "PRIMITIVES", "Primitive", "Shape", "VjpRule", "broadcast_shapes",
           "check_axes", "dtype_name", "flops_elementwise", "flops_none", "flops_of_input", "flops_transcendental",
           "infer", "kernel_table", "names_where", "need", "register", "size_of", "ufunc"]

# attribute kinds: how each attribute is typed on the wire and checked on arrival
ATTR_KINDS = ("int", "float", "bool", "dtype", "ints", "graphs")  # graphs: the subgraphs of a higher-order op

Kernel = Callable[..., Any]
KernelFactory = Callable[[ModuleType], Kernel]  # the kernel over an array namespace (numpy, CuPy)
# VJP rule: rule(g, *xs, out, need, nb, **attrs) -> [cotangent or None per operand]; cotangents may
# carry `nb` leading batch axes (stacked seeds), so axis attributes shift by nb.
VjpRule = Callable[..., list[Any]]
# JVP rule: rule(ts, *xs, out, **attrs) -> tangent; ts[i] is None for a zero tangent.
JvpRule = Callable[..., Any]
# a scalar expression of one element: (operand expressions, result dtype, operand dtypes) -> source
Expr = Callable[[Sequence[str], str, Sequence[str]], str]
FlopsRule = Callable[[Sequence[AVal], AVal, Mapping[str, Any]], float]


class Cost(enum.IntEnum):
    """What one element of an elementwise op costs (the cost model, native stages and threads)."""

    CHEAP = 0  # add, compare, select, ...
    DIV = 1  # div, sqrt: a long-latency instruction
    TRANSCENDENTAL = 2  # exp, log, tanh, sin, pow, ...: a polynomial or a libm call


# relative compute per element of each cost class: what decides whether a step is worth spreading over threads
WORK = {Cost.CHEAP: 0.5, Cost.DIV: 2.0, Cost.TRANSCENDENTAL: 8.0}


# ---------------------------------------------------------------- flops

def size_of(aval: AVal) -> int:
    return math.prod(aval[1])


def flops_elementwise(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return float(size_of(out))


def flops_transcendental(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return 10.0 * size_of(out)  # a transcendental counts as 10 operations


def flops_none(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return 0.0  # views and data movement the cost model does not charge


def flops_of_input(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return float(size_of(ins[0]))  # reductions and scans touch every input element once


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Primitive:
    name: str
    arity: int | None  # None: variadic, at least one operand
    attrs: dict[str, str]  # attribute name -> kind (ATTR_KINDS)
    rule: Callable[..., AVal]  # shape/dtype rule
    kernel: KernelFactory  # the reference kernel, over an array namespace
    vjp: VjpRule | None = None  # None exactly when not differentiable
    jvp: JvpRule | None = None
    differentiable: bool = True
    linear: bool = False  # linear in its (float) operands: the JVP is the op itself
    identity: float | None = None  # x op identity == x (the simplifier drops such operands)
    commutative: bool = False  # identity op x == x too
    flops: FlopsRule = flops_elementwise  # the cost model's operation count
    # buffers: the kernel accepts out= (a preallocated result buffer); out may be an operand
    # of the result's shape (exact aliasing is safe); the result may share memory with operand 0
    out: bool = False
    in_place: bool = False
    view: bool = False
    # fusion: elementwise ops join fused groups; a broadcast view only broadcasts or moves 1-dims,
    # so a group reads through it; cost and libm steer the native backend
    elementwise: bool = False
    dtypes: tuple[str, ...] = ()  # elementwise ops: the operand dtypes accepted (the SDK promotes others as numpy)
    numpy: str | None = None  # the numpy ufunc it implements: np.<numpy>(traced) and gs.<numpy> bind it
    broadcast_view: bool = False
    cost: Cost | None = None  # set for every elementwise op
    libm: bool = False  # the native form is a scalar libm call (slower than numpy's SIMD loop)
    native: Expr | None = None  # numba scalar expression (elementwise ops)
    cuda: Expr | None = None  # CUDA C++ scalar expression (elementwise ops)
    # data-parallel sharding (see `shard.py`)
    shard: ShardRule | None = None
    shard_sum: SumRule | None = None
    additive: bool = False  # a sum over examples plus an example-independent term: the term is split over shards
    reshard: ReshardRule | None = None
    # memory: the bytes the kernel holds while it runs besides its operands and result (the
    # values of the subgraphs a higher-order op runs); None: nothing worth counting
    scratch: Callable[[Mapping[str, Any]], int] | None = None


PRIMITIVES: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    if prim.name in PRIMITIVES:
        raise ValueError(f"primitive {prim.name!r} is registered twice")
    for key, kind in prim.attrs.items():
        if kind not in ATTR_KINDS:
            raise ValueError(f"primitive {prim.name!r}: attribute {key!r} has unknown kind {kind!r}")
    PRIMITIVES[prim.name] = prim
    return prim


def infer(op: str, operands: list[AVal], attrs: dict) -> AVal:
    """The result type of `op` applied to `operands`; raises ShapeError/GraphError."""
    return PRIMITIVES[op].rule(*operands, **attrs)


def names_where(pred: Callable[[Primitive], bool]) -> frozenset[str]:
    """The ops whose primitive satisfies `pred` (for tables built once at import)."""
    return frozenset(name for name, p in PRIMITIVES.items() if pred(p))


def kernel_table(xp: ModuleType) -> dict[str, Kernel]:
    """The kernel of every primitive over array namespace `xp` (numpy, or a drop-in such as CuPy)."""
    return {name: p.kernel(xp) for name, p in PRIMITIVES.items()}


def ufunc(name: str) -> KernelFactory:
    """The kernel that is `xp.<name>` itself (numpy ufuncs accept out=)."""
    return lambda xp: getattr(xp, name)


# ---------------------------------------------------------------- shape-rule helpers


def need(dtype: str, allowed: tuple[str, ...], what: str) -> None:
    if dtype not in allowed:
        raise ShapeError(f"{what} must have dtype in {list(allowed)}, got {dtype}")


def broadcast_shapes(*shapes: Shape) -> Shape:
    """numpy broadcasting of shapes, or ShapeError naming them."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        dims = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0} - {1}
        if len(dims) > 1:
            raise ShapeError("shapes " + " and ".join(str(tuple(s)) for s in shapes) + " do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def check_axes(axes: tuple[int, ...], ndim: int, what: str = "axes") -> tuple[int, ...]:
    for a in axes:
        if not 0 <= a < ndim:
            raise ShapeError(f"{what} {tuple(axes)} out of range for rank {ndim} (normalise to 0..{ndim - 1})")
    if len(set(axes)) != len(axes):
        raise ShapeError(f"repeated axis in {tuple(axes)}")
    return axes
