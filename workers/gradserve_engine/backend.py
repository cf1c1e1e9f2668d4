"""The interface the server computes through: `Backend`.

The servicer, the job manager and the app call exactly these members, and nothing else, on
the engine they are given. Two classes implement it: `Engine` (everything in this process)
and the scheduler's `DistributedEngine` (the same calls, some spread over a worker pool).
Failures are errors of the family in `errors.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .footprint import ARRAY_BYTES, graph_bytes
from .fusion import KernelSet
from .ir import Graph


@dataclass
class CacheInfo:
    hits: int = 0
    misses: int = 0
    size: int = 0  # plans kept
    maxsize: int = 0
    reasons: list[str] = field(default_factory=list)  # newest last, one line per miss
    kernels: str = "numpy"  # which kernels run the plans, and why
    nbytes: int = 0  # the estimated memory of everything kept: plans, derived graphs, a scheduler's analyses
    max_bytes: int = 0
    # parallel work: the cores of the process's thread pool, the size (elements x the op's work) from
    # which a numpy elementwise step measures whether running in slices on them pays, and what the
    # kept plans' steps decided: in slices, or whole (slices did not pay on this machine)
    threads: int = 1
    parallel_min_work: int = 0
    sliced_steps: int = 0
    whole_steps: int = 0

    def __str__(self) -> str:
        return (f"CacheInfo(hits={self.hits}, misses={self.misses}, size={self.size}/{self.maxsize}, "
                f"bytes={self.nbytes}/{self.max_bytes})")


@dataclass
class Residuals:
    """What a residual session keeps: the forward values its backward pass reads, and `nbytes`,
    the memory it keeps alive (what the server's residual budget is charged): the buffers under
    the values, their array objects, and the graph (estimated, see footprint.py: a session keeps
    it even once the registry dropped it).

    A value may be a view of a larger buffer (a slice of an intermediate, a reshape of it): it
    keeps the whole buffer alive. Views that would take less than half of their buffer as copies
    are copied out (the buffer can go); the rest stay views, and each buffer they hold counts once,
    whole. A broadcast view counts the buffer under it, not its broadcast shape."""

    graph: Graph
    wrt: tuple[str, ...]
    outputs: tuple[str, ...]
    values: dict[str, Any]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.values, held = compact(self.values)
        self.nbytes = held + ARRAY_BYTES * len(self.values) + graph_bytes(self.graph)


def compact(values: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """`values` with views copied out of buffers they would keep alive for little (see
    `Residuals`), and the bytes the result keeps alive, each buffer counted once."""
    arrays = {name: v for name, v in values.items() if isinstance(v, np.ndarray)}
    by_buffer: dict[int, list[str]] = {}
    size: dict[int, int] = {}
    for name, a in arrays.items():
        key, nbytes = buffer_of(a)
        size[key] = nbytes
        by_buffer.setdefault(key, []).append(name)
    kept = dict(values)
    total = sum(np.asarray(v).nbytes for name, v in values.items() if name not in arrays)  # numbers
    for key, names in by_buffer.items():
        copies = sum(arrays[name].nbytes for name in names)  # a broadcast view's is its broadcast size
        if 2 * copies <= size[key]:
            for name in names:
                kept[name] = arrays[name].copy()
            total += copies
        else:
            total += size[key]
    return kept, total


def buffer_of(a: np.ndarray) -> tuple[int, int]:
    """(identity, bytes) of the memory `a` keeps alive: the array that owns its data, or the
    buffer under that (the bytes an array was read from)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    if a.base is None:
        return id(a), a.nbytes
    try:
        return id(a.base), memoryview(a.base).nbytes
    except TypeError:  # a base that is no buffer: what the array spans is what we know
        return id(a), a.nbytes


class Backend(Protocol):
    """Evaluate and differentiate registered graphs on named arrays. Implementations subclass
    it, so that a missing or mistyped member is an error at the class, not a surprise at a call."""

    kernels: KernelSet  # the kernels that run the plans (`.name` is what actually runs)

    def forget(self, graph_id: str) -> int:
        """Drop what is kept for graph `graph_id` (its plans, derived graphs, measurements), once
        it is deleted; returns how many plans went. Plans of graphs derived from it (a Hessian's
        gradient graph) age out of the plan cache as usual."""
        ...

    def cache_info(self) -> CacheInfo:
        """Plan cache hits and misses, and why each miss happened."""
        ...

    def evaluate(self, graph: Graph, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        """The named outputs (all by default)."""
        ...

    def vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], seeds: Mapping[str, Any] | None = None,
            outputs: Sequence[str] | None = None, batch_axes: Mapping[str, int] | None = None, *,
            content_ids: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Outputs and the gradients of sum(seed * output) w.r.t. `wrt`; a scalar output's seed is 1.
        `batch_axes` names inputs batched along an axis, their examples independent. `content_ids`
        names inputs by the content id they are stored under (resident tensors), so that a backend
        that moves data can send each once per content version."""
        ...

    def batch_vjp(self, graph: Graph, items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                  wrt: Sequence[str], outputs: Sequence[str] | None = None, *,
                  content_ids: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None = None,
                  ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """`vjp` for each (inputs, seeds) of a batch of input sets (`content_ids` per item, as `vjp`'s)."""
        ...

    def open_vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> tuple[dict[str, Any], Residuals]:
        """The forward pass once: the outputs, and the values a later `call_vjp` reads."""
        ...

    def call_vjp(self, residuals: Residuals, cotangents: Mapping[str, Any], batched: bool = False) -> dict[str, Any]:
        """The gradients for cotangents of the outputs, from kept residuals."""
        ...

    def jvp(self, graph: Graph, inputs: Mapping[str, Any],
            tangents: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Outputs and their directional derivatives along `tangents`."""
        ...

    def jacobian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
        """{(output, input): array of shape output.shape + input.shape}."""
        ...

    def hessian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                output: str) -> dict[tuple[str, str], Any]:
        """Second derivatives of a scalar output: {(xi, xj): array of shape xi.shape + xj.shape}."""
        ...

    def hvp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str,
            vectors: Mapping[str, Any]) -> dict[str, Any]:
        """Hessian-vector products of a scalar output: {x: sum_j H[x, j] v_j}."""
        ...
