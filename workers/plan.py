"""Plans: a graph compiled once into kernel calls over value slots, with free points.

Liveness gives each value its last use; the slot is cleared right after it, so peak memory
stays close to what the computation needs. Dead intermediates' buffers are reused: an
elementwise kernel writes over an operand that dies at that step, and a buffer whose values
are all dead is kept for the next out-capable kernel of the same shape and dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import numpy as np

from gradserve.errors import Cancelled, GraphError
from gradserve.ir import Graph, Var, replay

from .kernels import IN_PLACE, KERNELS, OUT_CAPABLE, VIEWS, Kernel

NEVER = 1 << 62
_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("gradserve_stop", default=None)


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Plans run inside stop between kernels, raising Cancelled, once `check()` is true
    (the service passes "the client went away or the deadline passed")."""
    token = _STOP.set(check)
    try:
        yield
    finally:
        _STOP.reset(token)


class Plan:
    """Ordered kernel calls over slots. `run(inputs)` returns the named outputs."""

    def __init__(self, graph: Graph, kernels: Mapping[str, Kernel] = KERNELS):
        self.graph = graph
        n_in, first = len(graph.inputs), graph.first_node_id
        self.n_slots = graph.n_values
        self.inputs = [(i.name, i.id) for i in graph.inputs]
        self.constants = [(n_in + k, c) for k, c in enumerate(graph.constants)]
        self.outputs = list(graph.outputs)

        # liveness: the step index of each value's last use; outputs live to the end
        last = [-1] * self.n_slots
        for k, n in enumerate(graph.nodes):
            for i in n.inputs:
                last[i] = k
        for _, vid in graph.outputs:
            last[vid] = NEVER
        # aliasing: views share their operand's buffer; a buffer dies with its last view
        root = list(range(self.n_slots))
        for n in graph.nodes:
            if n.op in VIEWS:
                root[n.id] = root[n.inputs[0]]
        group_last = list(last)
        members: dict[int, list[int]] = {}
        for v in range(self.n_slots):
            r = root[v]
            group_last[r] = max(group_last[r], last[v])
            members.setdefault(r, []).append(v)

        def owned(v: int) -> bool:  # a fresh buffer of ours, shaped as its value, not returned
            return v >= first and root[v] == v and group_last[v] != NEVER and len(graph.aval(v)[1]) > 0

        deaths: dict[int, list[int]] = {}  # step -> owned buffers whose last alias dies there
        for r in members:
            if owned(r) and group_last[r] >= 0:
                deaths.setdefault(group_last[r], []).append(r)
        demand: dict[tuple, list[int]] = {}  # (dtype, shape) -> steps that can write into a buffer
        for k, n in enumerate(graph.nodes):
            if n.op in OUT_CAPABLE and n.shape:
                demand.setdefault((n.dtype, n.shape), []).append(k)
        frees: list[list[int]] = [[] for _ in graph.nodes]
        stash: dict[tuple, list[int]] = {}  # dead buffers kept for reuse, by (dtype, shape)
        died_at: dict[int, int] = {}
        out_src = [-1] * len(graph.nodes)
        for k, n in enumerate(graph.nodes):
            key = (n.dtype, n.shape)
            if n.op in IN_PLACE and n.shape:  # write over an operand that dies here
                for i in n.inputs:
                    if owned(i) and group_last[i] == k and graph.aval(i) == key and len(members[i]) == 1:
                        out_src[k] = i
                        break
            if out_src[k] < 0 and n.op in OUT_CAPABLE and stash.get(key):
                out_src[k] = stash[key].pop()
                frees[k].append(out_src[k])
            for i in set(n.inputs):
                if last[i] == k and not (owned(i) and i != out_src[k]):
                    frees[k].append(i)  # owned buffers are handled when their last alias dies
            for r in deaths.get(k, ()):
                if r == out_src[k]:
                    frees[k].append(r)
                elif any(j > k for j in demand.get(graph.aval(r), ())):
                    stash.setdefault(graph.aval(r), []).append(r)  # kept; freed at its reuse
                    died_at[r] = k
                else:
                    frees[k].append(r)
        for left in stash.values():  # kept but never reused after all: free when they died
            for r in left:
                frees[died_at[r]].append(r)
        self.n_reused = sum(src >= 0 for src in out_src)
        self.steps: list[tuple[Kernel, tuple[int, ...], dict[str, Any], int, int, tuple[int, ...], Any]] = [
            (kernels[n.op], n.inputs, dict(n.attrs), n.id, out_src[k], tuple(dict.fromkeys(frees[k])), n)
            for k, n in enumerate(graph.nodes)
        ]
        # 0-d results come back as numpy scalars (as numpy's own ufuncs give them); results that
        # would alias an input or a constant are copied
        self._results = [(name, vid, 2 if not graph.aval(vid)[1] else 1 if root[vid] < first else 0)
                         for name, vid in graph.outputs]

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Execute on arrays keyed by input name (see `run_values`)."""
        return self.run_values([inputs[name] for name, _ in self.inputs])

    def run_values(self, values: list[Any]) -> dict[str, Any]:
        """Execute on arrays given in the order of `self.inputs`. Given traced values instead,
        emit the plan's graph into their trace (so transforms nest: a gradient of a gradient)."""
        traced = next((v for v in values if isinstance(v, Var)), None)
        if traced is not None:
            b = traced.builder
            env = {slot: v if isinstance(v, Var) else b.const(v) for (_, slot), v in zip(self.inputs, values, strict=True)}
            replay(self.graph, b, env)
            return {name: env[vid] for name, vid in self.outputs}
        env: list[Any] = [None] * self.n_slots
        for (_, slot), v in zip(self.inputs, values, strict=True):
            env[slot] = v
        for slot, c in self.constants:
            env[slot] = c
        step = None
        stop = _STOP.get()
        try:
            with np.errstate(all="ignore"):
                for step in self.steps:
                    fn, ins, kw, out, src, frees, _ = step
                    if stop is not None and stop():
                        raise Cancelled(f"stopped before {step[-1].text()}")
                    if src >= 0:
                        env[out] = fn(*[env[i] for i in ins], out=env[src], **kw)
                    else:
                        env[out] = fn(*[env[i] for i in ins], **kw)
                    for f in frees:
                        env[f] = None
        except (IndexError, ValueError, TypeError, MemoryError) as e:
            where = step[-1].text() if step is not None else "plan start"
            raise GraphError(f"{type(e).__name__} while running {where}: {e}") from e
        return {name: env[vid] if mode == 0 else np.array(env[vid]) if mode == 1 else env[vid][()]
                for name, vid, mode in self._results}

    def __str__(self) -> str:
        lines = []
        for _fn, _ins, _kw, _out, src, frees, node in self.steps:
            extra = f"  # out=%{src}" if src >= 0 else ""
            extra += f"  free {' '.join(f'%{f}' for f in frees)}" if frees else ""
            lines.append(node.text() + extra)
        return "\n".join(lines)
