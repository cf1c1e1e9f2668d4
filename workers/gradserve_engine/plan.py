"""Plans: a graph compiled once into kernel calls over value slots, with free points.

Liveness gives each value its last use; the slot is cleared right after it, so peak memory
stays close to what the computation needs. Dead intermediates' buffers are reused: an
elementwise kernel writes over an operand that dies at that step, and a buffer whose values
are all dead is kept for the next out-capable kernel of the same shape and dtype.

With fusion (`Plan(graph, kernels=<KernelSet with fuse=True>)` or `fusion=True`), groups of
elementwise nodes found by `fusion.find_groups` run as single steps (see `workers/fusion.py`);
the same liveness and buffer reuse apply to a group's inputs and outputs. Without it (the
default, a plain kernel table) the plan is exactly the unfused one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import numpy as np

from gradserve_engine.errors import Cancelled, GraphError
from gradserve_engine.ir import Graph, Node, Var, replay

from .fusion import Group, KernelSet, find_groups, schedule
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

    def __init__(self, graph: Graph, kernels: Mapping[str, Kernel] | KernelSet = KERNELS, fusion: bool | None = None):
        """`kernels`: a plain op table (numpy's by default; no fusion unless `fusion=True`, then
        groups are interpreted with that table), or a `KernelSet` (numpy, native, gpu) that
        fuses when its `fuse` is set (`fusion` overrides it)."""
        self.graph = graph
        n_in, first = len(graph.inputs), graph.first_node_id
        self.n_slots = graph.n_values
        self.inputs = [(i.name, i.id) for i in graph.inputs]
        self.outputs = list(graph.outputs)
        kset = kernels if isinstance(kernels, KernelSet) else None
        fuse = bool(fusion if fusion is not None else kset is not None and kset.fuse)
        if kset is None and fuse:
            kset = KernelSet(kernels, fuse=True)
        self.kernel_set = kset
        self.kernel_mode = kset.name if kset is not None else "numpy"
        table = kset.table if kset is not None else kernels
        upload = kset.upload if kset is not None else None
        self.constants = [(n_in + k, c if upload is None else upload(c)) for k, c in enumerate(graph.constants)]

        # fusion: groups of elementwise nodes the backend compiled become single steps
        self.groups: list[Group] = []
        self.compile_seconds = 0.0
        runners: dict[int, Callable[..., Any]] = {}
        units: list[Node | Group] = graph.nodes
        if fuse:
            t0 = time.perf_counter()
            for g in find_groups(graph, accept=kset.accept):
                run = kset.compile_group(g)
                if run is not None:
                    runners[id(g)] = run
                    self.groups.append(g)
            self.compile_seconds = time.perf_counter() - t0
            if self.groups:
                units = schedule(graph, self.groups)
        in_place_groups = kset is not None and kset.in_place

        # liveness: the step index of each value's last use; outputs live to the end
        last = [-1] * self.n_slots
        for k, n in enumerate(units):
            for i in n.inputs:
                last[i] = k
        for _, vid in graph.outputs:
            last[vid] = NEVER
        # aliasing: views share their operand's buffer; a buffer dies with its last view
        root = list(range(self.n_slots))
        for n in units:
            if isinstance(n, Node) and n.op in VIEWS:
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
        # per step (a node: one result; a group: one per output): each result's (dtype, shape), whether a
        # result may be written over an operand that dies at the step, whether into a kept dead buffer
        results: list[list[tuple]] = []
        over: list[bool] = []
        into: list[bool] = []
        for n in units:
            if isinstance(n, Group):
                results.append([(n.members[j].dtype, n.shape) for j in n.outputs])
                over.append(in_place_groups and bool(n.shape))
                into.append(bool(n.shape))
            else:
                results.append([(n.dtype, n.shape)])
                over.append(n.op in IN_PLACE and bool(n.shape))
                into.append(n.op in OUT_CAPABLE and bool(n.shape))
        demand: dict[tuple, list[int]] = {}  # (dtype, shape) -> steps that can write into a buffer
        for k, keys in enumerate(results):
            if into[k]:
                for key in keys:
                    demand.setdefault(key, []).append(k)
        frees: list[list[int]] = [[] for _ in units]
        stash: dict[tuple, list[int]] = {}  # dead buffers kept for reuse, by (dtype, shape)
        died_at: dict[int, int] = {}
        out_src: list[list[int]] = []  # per step, the buffer each result is written into, or -1
        for k, n in enumerate(units):
            srcs: list[int] = []
            for key in results[k]:
                src = -1
                if over[k]:  # write over an operand that dies here
                    for i in dict.fromkeys(n.inputs):
                        if (owned(i) and group_last[i] == k and graph.aval(i) == key and len(members[i]) == 1
                                and i not in srcs):
                            src = i
                            break
                if src < 0 and into[k] and stash.get(key):
                    src = stash[key].pop()
                    frees[k].append(src)
                srcs.append(src)
            out_src.append(srcs)
            for i in set(n.inputs):
                if last[i] == k and not (owned(i) and i not in srcs):
                    frees[k].append(i)  # owned buffers are handled when their last alias dies
            for r in deaths.get(k, ()):
                if r in srcs:
                    frees[k].append(r)
                elif demand.get(graph.aval(r), [-1])[-1] > k:  # demand lists are in step order
                    stash.setdefault(graph.aval(r), []).append(r)  # kept; freed at its reuse
                    died_at[r] = k
                else:
                    frees[k].append(r)
        for left in stash.values():  # kept but never reused after all: free when they died
            for r in left:
                frees[died_at[r]].append(r)
        self.n_reused = sum(s >= 0 for srcs in out_src for s in srcs)
        # a step: (kernel, operand ids, attributes, result id, buffer to write into or -1, slots to clear, node);
        # a fused step: (runner, input ids, None, result ids, buffer per result, slots to clear, group)
        self.steps: list[tuple[Any, tuple[int, ...], Any, Any, Any, tuple[int, ...], Any]] = [
            (runners[id(n)], n.inputs, None, n.output_ids, tuple(out_src[k]), tuple(dict.fromkeys(frees[k])), n)
            if isinstance(n, Group) else
            (table[n.op], n.inputs, dict(n.attrs), n.id, out_src[k][0], tuple(dict.fromkeys(frees[k])), n)
            for k, n in enumerate(units)
        ]
        # fused steps, or a backend that moves data (the GPU), take the general run loop
        self._general = fuse or (kset is not None and type(kset).upload is not KernelSet.upload)
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
        if self._general:
            return self._run_general(values)
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

    def _run_general(self, values: list[Any]) -> dict[str, Any]:
        """`run_values` for plans with fused steps or on a device: inputs are uploaded once,
        results downloaded once."""
        kset = self.kernel_set
        env: list[Any] = [None] * self.n_slots
        for (_, slot), v in zip(self.inputs, values, strict=True):
            env[slot] = kset.upload(v)
        for slot, c in self.constants:
            env[slot] = c
        step = None
        stop = _STOP.get()
        try:
            with np.errstate(all="ignore"):
                for step in self.steps:
                    fn, ins, kw, out, src, frees, _ = step
                    if stop is not None and stop():
                        raise Cancelled(f"stopped before {_step_text(step)}")
                    if kw is None:
                        res = fn([env[i] for i in ins], [env[s] if s >= 0 else None for s in src])
                        for o, r in zip(out, res, strict=True):
                            env[o] = r
                    elif src >= 0:
                        env[out] = fn(*[env[i] for i in ins], out=env[src], **kw)
                    else:
                        env[out] = fn(*[env[i] for i in ins], **kw)
                    for f in frees:
                        env[f] = None
        except (IndexError, ValueError, TypeError, MemoryError) as e:
            where = _step_text(step) if step is not None else "plan start"
            raise GraphError(f"{type(e).__name__} while running {where}: {e}") from e
        result = kset.result
        return {name: result(env[vid], mode) for name, vid, mode in self._results}

    def kernel_info(self) -> dict[str, Any]:
        """What runs this plan: the backend, fused groups and their members, compile time."""
        return {"kernels": self.kernel_mode, "fused_groups": len(self.groups),
                "fused_nodes": sum(len(g.members) for g in self.groups), "steps": len(self.steps),
                "compile_seconds": self.compile_seconds}

    def __str__(self) -> str:
        lines = []
        for _fn, _ins, kw, _out, src, frees, node in self.steps:
            if kw is None:
                extra = f"  # {self.kernel_mode}"
                reused = [f"%{node.members[j].id}=%{s}" for j, s in zip(node.outputs, src, strict=True) if s >= 0]
                extra += f"  out {' '.join(reused)}" if reused else ""
            else:
                extra = f"  # out=%{src}" if src >= 0 else ""
            extra += f"  free {' '.join(f'%{f}' for f in frees)}" if frees else ""
            lines.append(node.text() + extra)
            if kw is None:
                lines.extend("    | " + m.text() for m in node.members)
        return "\n".join(lines)


def _step_text(step: tuple) -> str:
    node = step[-1]
    return f"fused step {node.text()}" if step[2] is None else node.text()
