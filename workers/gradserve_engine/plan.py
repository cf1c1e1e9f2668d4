"""Plans: a graph compiled once into kernel calls over value slots, with free points.

Liveness gives each value its last use; the slot is cleared right after it, so peak memory
stays close to what the computation needs. Dead intermediates' buffers are reused: an
elementwise kernel writes over an operand that dies at that step, and a buffer whose values
are all dead is kept for the next out-capable kernel of the same shape and dtype.

With fusion (`Plan(graph, kernels=<KernelSet with fuse=True>)` or `fusion=True`), groups of
elementwise nodes found by `fusion.find_groups` run as single steps (see `fusion.py`);
the same liveness and buffer reuse apply to a group's inputs and outputs. Without it (the
default, a plain kernel table) the plan is exactly the unfused one.

A step is a `KernelStep` (one node, one result) or a `FusedStep` (one group, a result per
output); each has `run(env)`, and one loop (`run_steps`) runs them all. A backend that moves
data (the GPU) differs only at the plan's edges: inputs go through its `upload` once per call,
results through its `result`. A backend may also record that loop's work once and replay it per
call (`replays`: the GPU's CUDA graphs, `gpu.CudaGraphs`).

A plan knows what a run holds at its peak (`peak_bytes`, from the same liveness) and its
largest tensor; inside the service (`guard.within`) it is admitted against the server's memory
budget before it runs. The stop condition (`guard.stop_when`) is checked between steps, and a
large matmul runs in blocks with a check between them.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np

from gradserve_engine.errors import Cancelled, GradserveError, GraphError, LimitError
from gradserve_engine.ir import Graph, Node, Var, innermost, replay, type_str

from . import threads
from .buffers import MIN_BYTES, RECYCLER
from .fusion import Group, KernelSet, find_groups, schedule
from .guard import BUDGET, STOP, poller
from .guard import stop_when as stop_when  # where the service imports it from
from .ops import IN_PLACE, KERNELS, OUT_CAPABLE, PRIMITIVES, VIEWS, Kernel
from .ops.core import WORK

NEVER = 1 << 62
_stop, _budget = STOP.get, BUDGET.get  # read once per run (the hot path)
# A matmul over this many flops (about a second on one core) runs in blocks of about
# MATMUL_BLOCK_FLOPS (a fraction of a second), with a stop check between blocks: a deadline then
# stops it within that. Smaller matmuls, an MLP's included, stay one BLAS call: blocking them
# made the MLP gradient 25% slower (measured: 11.3 -> 14.3 ms in float32 on 2 cores).
MATMUL_SPLIT_FLOPS = 1 << 34
MATMUL_BLOCK_FLOPS = 1 << 32
# an elementwise numpy step may run in slices on the thread pool (whether it does is measured per
# step: ChunkedStep) when its elements x the work of its op's cost class (ops/core.py: WORK) reach
# this: below it the hand-off (~25 us on an idle machine) cannot pay (float32 tanh gains from 1 Mi
# elements on 2 cores: `python bench/native.py --only threshold`)
PARALLEL_MIN_WORK = 1 << 18
MIN_TILE = 64  # rows or columns of a block at least (when the result has them): BLAS stays efficient


class Step:
    """One step of a plan. `run(env)` reads its operands' slots `ins` of `env` and writes its
    results `outs` (into the dead buffers `srcs` names, where >= 0); the run loop then clears
    `frees`. `unit` is the graph node or the fused group it computes; `text()` names it in
    errors."""

    __slots__ = ("fn", "frees", "ins", "outs", "srcs", "unit")

    def __init__(self, fn: Callable[..., Any], unit: Node | Group, outs: tuple[int, ...], srcs: tuple[int, ...],
                 frees: tuple[int, ...]):
        self.fn = fn
        self.unit = unit
        self.ins = unit.inputs
        self.outs = outs
        self.srcs = srcs
        self.frees = frees

    def run(self, env: list[Any]) -> None:
        raise NotImplementedError

    def text(self) -> str:
        return self.unit.text()

    def listing(self, kernel_mode: str) -> list[str]:
        """The step's lines in `str(plan)`."""
        raise NotImplementedError


class KernelStep(Step):
    """One node through its kernel (attributes bound), writing `out=` a dead buffer when it has one."""

    __slots__ = ("fresh", "operands", "out", "src")

    def __init__(self, kernel: Kernel, node: Node, src: int, frees: tuple[int, ...]):
        super().__init__(functools.partial(kernel, **node.attrs) if node.attrs else kernel, node, (node.id,), (src,), frees)
        self.operands = _getter(self.ins)
        self.out = node.id
        self.src = src
        self.fresh: tuple[tuple[int, ...], np.dtype] | None = None  # with no dead buffer: a recycled one of this type

    @staticmethod
    def of(kernel: Kernel, node: Node, src: int, frees: tuple[int, ...]) -> KernelStep:
        """The step for `node`: a `UnaryStep` when it has one operand (read without building a tuple)."""
        return (UnaryStep if len(node.inputs) == 1 else KernelStep)(kernel, node, src, frees)

    def run(self, env: list[Any]) -> None:
        if self.src >= 0:
            env[self.out] = self.fn(*self.operands(env), out=env[self.src])
        elif self.fresh is not None:
            env[self.out] = self.fn(*self.operands(env), out=RECYCLER.empty(*self.fresh))
        else:
            env[self.out] = self.fn(*self.operands(env))

    def listing(self, kernel_mode: str) -> list[str]:
        extra = f"  # out=%{self.src}" if self.src >= 0 else ""
        return [self.unit.text() + extra + _free_text(self.frees)]


class UnaryStep(KernelStep):
    """A kernel step with one operand, read straight from its slot."""

    __slots__ = ("operand",)

    def __init__(self, kernel: Kernel, node: Node, src: int, frees: tuple[int, ...]):
        super().__init__(kernel, node, src, frees)
        self.operand = node.inputs[0]

    def run(self, env: list[Any]) -> None:
        if self.src >= 0:
            env[self.out] = self.fn(env[self.operand], out=env[self.src])
        elif self.fresh is not None:
            env[self.out] = self.fn(env[self.operand], out=RECYCLER.empty(*self.fresh))
        else:
            env[self.out] = self.fn(env[self.operand])


class ChunkedStep(KernelStep):
    """An elementwise kernel over a large result that may run in slices along the result's first
    axis on the process's thread pool (numpy's loops release the GIL). Operands that span that
    axis are sliced with the result; the others broadcast whole into every slice.

    Whether slices pay depends on the machine (cores, memory bandwidth, what else runs), so the
    step measures: its first `2 * TRIALS` calls alternate whole and sliced, and it keeps the way
    whose best call was faster (slices must win by `MARGIN`)."""

    __slots__ = ("bounds", "dtype", "shape", "sliced", "split", "times")
    TRIALS = 3
    MARGIN = 0.9

    def __init__(self, kernel: Kernel, node: Node, src: int, frees: tuple[int, ...], operand_shapes: Sequence[tuple],
                 chunks: int):
        super().__init__(kernel, node, src, frees)
        self.shape, self.dtype = node.shape, np.dtype(node.dtype)
        self.split = tuple(len(s) == len(node.shape) and s[0] == node.shape[0] for s in operand_shapes)
        self.bounds = threads.cuts(node.shape[0], chunks)
        self.sliced: bool | None = None  # undecided while measuring
        self.times: tuple[list[float], list[float]] = ([], [])  # seconds of whole calls, of sliced calls

    def run(self, env: list[Any]) -> None:
        if self.sliced is None:
            self._measure(env)
        elif self.sliced:
            self._run_sliced(env)
        else:
            KernelStep.run(self, env)

    def _run_sliced(self, env: list[Any]) -> None:
        args = self.operands(env)
        out = env[self.src] if self.src >= 0 else RECYCLER.empty(self.shape, self.dtype)  # fresh is set: whole calls too
        fn, split = self.fn, self.split

        def part(lo: int, hi: int) -> None:
            fn(*[a[lo:hi] if s else a for a, s in zip(args, split, strict=True)], out=out[lo:hi])

        threads.pool().run(part, self.bounds)
        env[self.out] = out

    def _measure(self, env: list[Any]) -> None:
        whole, sliced = self.times
        way = len(sliced) < len(whole)  # alternate (concurrent callers may add a sample more: harmless)
        start = time.perf_counter()
        if way:
            self._run_sliced(env)
        else:
            KernelStep.run(self, env)
        (sliced if way else whole).append(time.perf_counter() - start)
        if len(whole) >= self.TRIALS and len(sliced) >= self.TRIALS:
            self.sliced = min(sliced) < self.MARGIN * min(whole)

    def listing(self, kernel_mode: str) -> list[str]:
        way = {None: "measuring", True: "sliced", False: "whole"}[self.sliced]
        return [f"{super().listing(kernel_mode)[0]}  # {way}: {len(self.bounds) - 1} slices on threads"]


def _getter(ins: tuple[int, ...]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """`env -> the values in slots ins`, as a tuple."""
    if len(ins) > 1:
        return operator.itemgetter(*ins)
    return lambda env: tuple(env[i] for i in ins)


class FusedStep(Step):
    """A fused group through the backend's runner `fn(arrays, outs) -> results`; `outs` holds
    a dead buffer or None per result."""

    __slots__ = ()

    def run(self, env: list[Any]) -> None:
        res = self.fn([env[i] for i in self.ins], [env[s] if s >= 0 else None for s in self.srcs])
        for o, r in zip(self.outs, res, strict=True):
            env[o] = r

    def text(self) -> str:
        return f"fused step {self.unit.text()}"

    def listing(self, kernel_mode: str) -> list[str]:
        group = self.unit
        assert isinstance(group, Group)
        reused = [f"%{o}=%{s}" for o, s in zip(self.outs, self.srcs, strict=True) if s >= 0]
        extra = f"  # {kernel_mode}" + (f"  out {' '.join(reused)}" if reused else "")
        return [group.text() + extra + _free_text(self.frees), *("    | " + m.text() for m in (*group.members, *group.epilogue))]


def run_steps(steps: Sequence[Step], env: list[Any], stop: Callable[[], bool] | None) -> tuple[int, Exception] | None:
    """Run `steps` in order over `env`, clearing each step's `frees` after it, checking `stop`
    before each: the one loop of every plan run (eager, and recorded into CUDA graphs by
    `gpu.CudaGraphs`). Returns None, or (the position in `steps` of the step that raised, the
    error) for the caller to name (`Plan.raise_failure`) or to act on (a step that cannot be
    recorded runs outside the graph)."""
    step = None
    try:  # one try around the loop, none per step: the hot path of a cached call
        for step in steps:
            if stop is not None and stop():
                raise Cancelled(f"stopped before {step.text()}")
            step.run(env)
            for f in step.frees:
                env[f] = None
    except Exception as e:
        return steps.index(step), e
    return None


def _free_text(frees: tuple[int, ...]) -> str:
    return f"  free {' '.join(f'%{f}' for f in frees)}" if frees else ""


class Replays(Protocol):
    """What a kernel set's `replays(plan)` gives (when it has that method and the result is not
    None): calls of the plan run through `run`, which may run `plan.run_eager` or replay work it
    recorded from the plan's steps (`gpu.CudaGraphs`)."""

    def run(self, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...


class Plan:
    """Ordered kernel calls over slots. `run(inputs)` returns the named outputs."""

    def __init__(self, graph: Graph, kernels: Mapping[str, Kernel] | KernelSet = KERNELS, fusion: bool | None = None,
                 parallel_min_work: float = PARALLEL_MIN_WORK):
        """`kernels`: a plain op table (numpy's by default; no fusion unless `fusion=True`, then
        groups are interpreted with that table), or a `KernelSet` (numpy, native, gpu) that
        fuses when its `fuse` is set (`fusion` overrides it). An elementwise step whose result
        holds at least `parallel_min_work` (elements x the work of its op's cost class) runs in
        slices on the process's thread pool."""
        self.graph = graph
        n_in, first = len(graph.inputs), graph.first_node_id
        self.n_slots = graph.n_values
        self.inputs = [(i.name, i.id) for i in graph.inputs]
        self.outputs = list(graph.outputs)
        kset: KernelSet | None
        if isinstance(kernels, KernelSet):
            kset, table = kernels, kernels.table
            fuse = kset.fuse if fusion is None else fusion
        else:
            fuse = bool(fusion)
            kset, table = (KernelSet(kernels, fuse=True) if fuse else None), kernels
        self.kernel_set = kset
        self.kernel_mode = kset.name if kset is not None else "numpy"
        upload = kset.upload if kset is not None else None
        self.constants = [(n_in + k, c if upload is None else upload(c)) for k, c in enumerate(graph.constants)]

        # fusion: groups of elementwise nodes the backend compiled become single steps
        self.groups: list[Group] = []
        self.compile_seconds = 0.0
        runners: dict[int, Callable[..., Any]] = {}
        units: Sequence[Node | Group] = graph.nodes
        if fuse and kset is not None:
            t0 = time.perf_counter()
            for g in find_groups(graph, accept=kset.accept, epilogues=kset.epilogues):
                run = kset.compile_group(g)
                if run is not None:
                    runners[id(g)] = run
                    self.groups.append(g)
            self.compile_seconds = time.perf_counter() - t0
            if self.groups:
                units = schedule(graph, self.groups)
        in_place_groups = kset is not None and kset.in_place

        # liveness: the step index of each value's last use; outputs live to the end
        poll = poller("while planning")
        last = [-1] * self.n_slots
        for k, n in enumerate(units):
            poll()
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
                results.append(n.result_types)
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
            poll()
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
        # a backend that moves data (the GPU) takes the inputs up once per call and the results back once
        self._upload = kset.upload if kset is not None and type(kset).upload is not KernelSet.upload else None
        self._result = kset.result if kset is not None and type(kset).result is not KernelSet.result else None
        blocked = self._upload is None  # kernels on this machine's arrays: large matmuls run in blocks
        self.steps: list[Step] = [
            FusedStep(runners[id(n)], n, n.output_ids, tuple(out_src[k]), tuple(dict.fromkeys(frees[k])))
            if isinstance(n, Group) else
            _kernel_step(_kernel(table, n, graph, blocked), n, graph, out_src[k][0], tuple(dict.fromkeys(frees[k])),
                         parallel_min_work, host=blocked)
            for k, n in enumerate(units)
        ]
        self.parallel_min_work = parallel_min_work
        self.sliceable = [step for step in self.steps if isinstance(step, ChunkedStep)]
        # (name, slot, mode) of each result: 0-d results come back as numpy scalars (as numpy's own
        # ufuncs give them), mode 2; results that would alias an input or a constant are copied, mode 1
        self.returns: list[tuple[str, int, int]] = [
            (name, vid, 2 if not graph.aval(vid)[1] else 1 if root[vid] < first else 0) for name, vid in graph.outputs]
        # what a run holds at its peak (bytes, inputs and constants included), and the largest
        # tensor it makes: checked against the service's budget before the plan runs
        self.peak_bytes = _peak_bytes(graph, self.steps, self.returns, first)
        self.largest = max(range(self.n_slots), key=lambda v: math.prod(graph.aval(v)[1]), default=-1)
        self.cache_key: tuple | None = None  # the key an engine's cache keeps this plan under (`Engine.plan`)
        # a backend that records a call's work and replays it (the GPU's CUDA graphs): calls go through it
        make = getattr(kset, "replays", None)
        self.replays: Replays | None = make(self) if make is not None else None

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Execute on arrays keyed by input name (see `run_values`)."""
        return self.run_values([inputs[name] for name, _ in self.inputs])

    def run_values(self, values: list[Any]) -> dict[str, Any]:
        """Execute on arrays given in the order of `self.inputs`. Given traced values instead,
        emit the plan's graph into their trace (so transforms nest: a gradient of a gradient).
        On a backend that moves data, inputs are uploaded once and results taken back once; on
        one that replays recorded work (`replays`), the call goes through it."""
        b = innermost(values)
        if b is not None:
            emitted = {slot: v if isinstance(v, Var) else b.const(v) for (_, slot), v in zip(self.inputs, values, strict=True)}
            replay(self.graph, b, emitted)
            return {name: emitted[vid] for name, vid in self.outputs}
        stop = _stop()
        budget = _budget()
        if budget is not None:  # the service's limits: admitted before anything is computed
            if self.largest >= 0:
                budget.check_elements(self.graph.aval(self.largest)[1], self._describe_largest)
            budget.acquire(self.peak_bytes, self._describe)
        try:
            if self.replays is not None:
                return self.replays.run(values, stop)
            return self.run_eager(values, stop)
        except MemoryError as e:
            raise LimitError(f"out of memory while running the plan's start or results (the plan needs "
                             f"{self.peak_bytes} bytes at its peak): {e}") from e
        except (IndexError, ValueError, TypeError) as e:
            if isinstance(e, GradserveError):  # a step's error, already named; a kernel's own (a singular matrix)
                raise
            raise GraphError(f"{type(e).__name__} while running the plan's start or results: {e}") from e
        finally:
            if budget is not None:
                budget.release(self.peak_bytes)

    def run_eager(self, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any]:
        """One call, step by step (the budget already admitted): inputs through the backend's
        `upload`, the steps, results through its `result`."""
        env: list[Any] = [None] * self.n_slots
        upload = self._upload
        for (_, slot), v in zip(self.inputs, values, strict=True):
            env[slot] = v if upload is None else upload(v)
        for slot, c in self.constants:
            env[slot] = c
        with np.errstate(all="ignore"):
            failed = run_steps(self.steps, env, stop)
        if failed is not None:
            self.raise_failure(*failed)
        result = self._result
        if result is not None:
            return {name: result(env[vid], mode) for name, vid, mode in self.returns}
        return {name: env[vid] if mode == 0 else np.array(env[vid]) if mode == 1 else env[vid][()]
                for name, vid, mode in self.returns}

    def raise_failure(self, index: int, error: Exception) -> NoReturn:
        """Raise what `run_steps` caught at `self.steps[index]`, in the engine's error family:
        out of memory as a LimitError, a kernel's IndexError/ValueError/TypeError as a GraphError
        naming the step; the family's own errors (a singular matrix, a stop) and others as they are."""
        where = self.steps[index].text()
        if isinstance(error, MemoryError):
            raise LimitError(f"out of memory while running {where} (the plan needs {self.peak_bytes} bytes at its "
                             f"peak): {error}") from error
        if isinstance(error, (IndexError, ValueError, TypeError)) and not isinstance(error, GradserveError):
            raise GraphError(f"{type(error).__name__} while running {where}: {error}") from error
        raise error

    def _describe(self) -> str:
        outs = ", ".join(repr(name) for name, _ in self.outputs[:4]) + (", ..." if len(self.outputs) > 4 else "")
        return f"the computation of {outs} ({len(self.steps)} steps)"

    def _describe_largest(self) -> str:
        v = self.largest
        dtype, shape = self.graph.aval(v)
        named = {vid: name for name, vid in self.inputs + self.outputs}
        what = f"{named[v]!r}" if v in named else f"%{v}"
        return f"{self._describe()}: the tensor {what} ({type_str(dtype, shape)})"

    def kernel_info(self) -> dict[str, Any]:
        """What runs this plan: the backend, fused groups, their members and the reductions
        computed in their pass, compile time, the elementwise steps that may run in slices on
        threads (decided by measuring: in slices, whole, or still measuring), and whether calls
        replay CUDA graphs (`cuda_graph`)."""
        sliced, whole = self.slice_decisions()
        return {"kernels": self.kernel_mode, "fused_groups": len(self.groups),
                "fused_nodes": len({n.id for g in self.groups for n in g.members if n.id not in g.recomputed}),
                "recomputed_nodes": sum(len(g.recomputed) for g in self.groups),
                "fused_reductions": sum(len(g.epilogue) for g in self.groups), "steps": len(self.steps),
                "compile_seconds": self.compile_seconds, "parallel_min_work": self.parallel_min_work,
                "threads": threads.available_cores(), "sliceable_steps": len(self.sliceable),
                "sliced_steps": sliced, "whole_steps": whole,
                **(self.replays.info() if self.replays is not None else {"cuda_graph": "off"})}

    def slice_decisions(self) -> tuple[int, int]:
        """How many of the steps that measure whether slices pay (`sliceable`) run in slices, and
        how many whole; the rest are still measuring."""
        return (sum(step.sliced is True for step in self.sliceable), sum(step.sliced is False for step in self.sliceable))

    def __str__(self) -> str:
        return "\n".join(line for step in self.steps for line in step.listing(self.kernel_mode))


# ---------------------------------------------------------------- large kernels in blocks


def _kernel_step(kernel: Kernel, node: Node, graph: Graph, src: int, frees: tuple[int, ...],
                 min_work: float, host: bool) -> KernelStep:
    """The step of `node`: in slices on the thread pool when it is elementwise, writes `out=`,
    and its result holds at least `min_work`; writing a large result into a recycled buffer when
    it has no dead one to write over. Neither for kernels over device arrays (not `host`)."""
    prim = PRIMITIVES[node.op]
    cores = threads.available_cores()
    if not host:
        return KernelStep.of(kernel, node, src, frees)
    if (cores > 1 and prim.elementwise and node.op in OUT_CAPABLE and node.shape and node.shape[0] > 1
            and prim.cost is not None and math.prod(node.shape) * WORK[prim.cost] >= min_work):
        step: KernelStep = ChunkedStep(kernel, node, src, frees, [graph.aval(i)[1] for i in node.inputs], 4 * cores)
    else:
        step = KernelStep.of(kernel, node, src, frees)
    dtype = np.dtype(node.dtype)
    if src < 0 and node.op in OUT_CAPABLE and math.prod(node.shape) * dtype.itemsize >= MIN_BYTES:
        step.fresh = (node.shape, dtype)
    return step


def _kernel(table: Mapping[str, Kernel], node: Node, graph: Graph, blocked: bool) -> Kernel:
    """The kernel of `node`'s step: the table's, or for a large matmul (when `blocked`) the
    table's run over blocks of the result with a stop check between them."""
    kernel = table[node.op]
    if blocked and node.op == "matmul":
        k = graph.aval(node.inputs[0])[1][-1]
        if 2 * math.prod(node.shape) * k > MATMUL_SPLIT_FLOPS:
            return BlockedMatmul(kernel, node.dtype)
    return kernel


class BlockedMatmul:
    """`kernel(a, b, out=...)` (a matmul) over blocks of the result: whole leading batch entries,
    then rows, then columns, each block about MATMUL_BLOCK_FLOPS; the stop condition is checked
    before each block. Each element is still one dot product over the whole contracted axis:
    whole batch entries and integers come out bit for bit, BLAS may round the edge rows of a
    block by an ulp."""

    def __init__(self, kernel: Kernel, dtype: str):
        self.kernel, self.dtype = kernel, dtype

    def __call__(self, a: Any, b: Any, out: Any = None) -> Any:
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        if out is None:
            out = np.empty(shape, self.dtype)
        stop = _stop()
        for ia, ib, io in matmul_blocks(a.shape, b.shape, shape):
            if stop is not None and stop():
                raise Cancelled(f"stopped inside a matmul of {list(a.shape)} and {list(b.shape)}")
            self.kernel(a[ia], b[ib], out=out[io])
        return out


def matmul_blocks(a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                  shape: tuple[int, ...]) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """(index of a, index of b, index of the result) of each block of `a @ b` (result `shape`):
    the first axis whose later axes fit in a block is cut into chunks, the axes before it into
    single entries; an operand's batch axes of size 1 broadcast (taken whole)."""
    nd = len(shape)
    per = max(MATMUL_BLOCK_FLOPS // max(2 * a_shape[-1], 1), 1)  # result elements per block
    axis = next(j for j in range(nd) if math.prod(shape[j + 1:]) <= per or j == nd - 1)
    step = max(per // math.prod(shape[axis + 1:]), 1)
    if axis >= nd - 2:  # rows or columns: whole multiples of MIN_TILE, so that BLAS tiles them as the whole
        step = max(step // MIN_TILE, 1) * MIN_TILE
    starts = list(range(0, shape[axis], step))
    if len(starts) > 1 and shape[axis] - starts[-1] < MIN_TILE:
        starts.pop()  # a short remainder joins the block before it
    bounds = [*starts[1:], shape[axis]]
    full = slice(None)

    def operand(op_shape: tuple[int, ...], out_index: list[slice], rows: bool) -> tuple[slice, ...]:
        k = len(op_shape)
        index = [full] * k
        for j in range(nd - 2):  # batch axes, aligned at the right
            t = j - (nd - k)
            if t >= 0 and op_shape[t] != 1:
                index[t] = out_index[j]
        if rows:  # a: the result's rows are a's rows
            index[k - 2] = out_index[nd - 2]
        else:  # b: the result's columns are b's columns
            index[k - 1] = out_index[nd - 1]
        return tuple(index)

    for lead in itertools.product(*(range(d) for d in shape[:axis])):
        for s, e in zip(starts, bounds, strict=True):
            out_index = [slice(i, i + 1) for i in lead] + [slice(s, e)] + [full] * (nd - axis - 1)
            yield operand(a_shape, out_index, True), operand(b_shape, out_index, False), tuple(out_index)


# ---------------------------------------------------------------- peak memory

_C, _BROADCAST, _OTHER = 0, 1, 2  # layouts: C-contiguous, a broadcast (stride-0 axes), anything else


def _peak_bytes(graph: Graph, steps: Sequence[Step], results: Sequence[tuple[str, int, int]], first: int) -> int:
    """The bytes a run of `steps` holds at its peak, by the plan's own bookkeeping: inputs and
    constants for the whole run; each new buffer from its step until the slots of all its
    aliases are freed (a view holds its operand's buffer; a result written over a dead buffer
    takes that buffer over); results that alias an input or constant copied at the end. A
    reshape of a value that may not be contiguous counts as a copy (numpy copies it then).
    Temporaries inside a kernel are not counted, except what a kernel declares it holds
    (`scratch`: the values of the subgraphs a higher-order op runs)."""
    n = graph.n_values
    size = [0] * n  # bytes of the buffer first held by slot v
    buf = list(range(n))  # the buffer (by its first slot) each slot holds
    refs = [0] * n  # slots holding each buffer, +1 for inputs and constants: held by the caller and the plan
    layout = [_C] * n

    def nbytes(v: int) -> int:
        dtype, shape = graph.aval(v)
        return math.prod(shape) * _ITEMSIZE[dtype]

    live = 0
    for v in range(first):
        size[v] = nbytes(v)
        refs[v] = 2
        live += size[v]
    peak = live
    poll = poller("while planning")
    for step in steps:
        poll()
        node = step.unit if isinstance(step.unit, Node) else None
        for o, src in zip(step.outs, step.srcs, strict=True):
            if node is not None and node.op in VIEWS:
                x = node.inputs[0]
                if node.op == "reshape" and layout[x] != _C:  # numpy copies: a new buffer
                    size[o] = nbytes(o)
                    refs[o] = 1
                    live += size[o]
                    continue
                buf[o] = buf[x]
                refs[buf[o]] += 1
                layout[o] = _view_layout(node, graph, layout[x])
            elif src >= 0:
                buf[o] = buf[src]
                refs[buf[o]] += 1
                layout[o] = layout[src]
            else:
                size[o] = nbytes(o)
                refs[o] = 1
                live += size[o]
                ins = step.unit.inputs
                if node is None or PRIMITIVES[node.op].elementwise:  # numpy keeps its operands' layout
                    layout[o] = _OTHER if any(layout[i] == _OTHER for i in ins) else _C
        scratch = PRIMITIVES[node.op].scratch if node is not None else None
        peak = max(peak, live + (scratch(node.attrs) if scratch is not None and node is not None else 0))
        for f in step.frees:
            b = buf[f]
            refs[b] -= 1
            if refs[b] == 0:
                live -= size[b]
    copies = sum(nbytes(vid) for _, vid, mode in results if mode == 1)
    return max(peak, live + copies)


def _view_layout(node: Node, graph: Graph, operand: int) -> int:
    op = node.op
    if op == "broadcast_to":
        return operand if node.shape == graph.aval(node.inputs[0])[1] else _BROADCAST
    if op == "transpose":
        return operand if list(node.attrs["perm"]) == sorted(node.attrs["perm"]) else _OTHER
    if op == "slice":
        return operand if node.shape == graph.aval(node.inputs[0])[1] else _OTHER
    return operand  # reshape (of a contiguous value), expand_dims, squeeze, stop_gradient


_ITEMSIZE = {"bool": 1, "int32": 4, "int64": 8, "float32": 4, "float64": 8}
