"""GPU kernels: the same kernel table over CuPy arrays, fused groups as `cupy.ElementwiseKernel`s,
a plan's calls replayed from CUDA graphs.

    from gradserve_engine.gpu import GpuKernels
    plan = Plan(graph, kernels=GpuKernels())          # numpy in, numpy out
    plan.run(inputs)                                  # inputs moved to the device once, results back once
    plan = Plan(graph, kernels=GpuKernels(to_host=False))
    plan.run_values([cupy arrays ...])                # stays on the device (benchmarks, chained calls)
    plan = Plan(graph, kernels=GpuKernels(graphs=False))  # every call launches its kernels one by one

The per-op table is `kernel_table(cupy)` (the registry's reference kernels over an array
namespace), with `scatter_add` through `cupyx.scatter_add`. A plan's constants are uploaded
once, when the plan is built. Fused groups become one elementwise CUDA kernel each: CuPy
broadcasts the inputs (each reshaped to its alignment against the group's shape) and NVRTC
compiles the body once per group signature (CuPy caches it on disk). Each member is one C++
statement on the member's own type, so float32 stays float32 as in numpy.

CUDA graphs (`CudaGraphs`, on unless `graphs=False`): a plan's first call runs step by step (it
also loads the kernels and initialises the CUDA libraries); its second records the steps, the
same `plan.run_steps` loop, into CUDA graphs by stream capture on a private stream, over static
input buffers; from then on a call copies its inputs into those buffers, launches the graphs,
and copies the results out. A step that cannot be recorded (CuPy refuses cuBLAS and cuSOLVER
calls during capture, so every matmul and decomposition; anything that reads device values on
the host, such as a while_loop's condition) runs outside the graphs, between them, writing into
a static buffer of its own, so one plan is several graphs around such steps. Memory allocated
during capture comes from a memory pool private to the plan's graphs, never handed to anything
else while they live. `plan.kernel_info()["cuda_graph"]` says what was recorded, what runs
outside and why.

CuPy is optional: importing this module never needs it; `GpuKernels()` raises a RuntimeError
that says what is missing.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Cancelled, GraphError
from .fusion import Group, KernelSet
from .ir import Node
from .ops import OUT_CAPABLE, PRIMITIVES, kernel_table
from .ops.dtypes import C_TYPES
from .plan import KernelStep, Step, run_steps

if TYPE_CHECKING:
    from .plan import Plan


def cupy_status() -> tuple[Any, str]:
    """(the cupy module or None, a line saying what is there or why not)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library mismatch at import
        return None, f"cupy is not importable ({type(e).__name__}: {e}); install cupy-cuda12x (or -cuda11x)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"cupy {cupy.__version__} finds no CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return None, f"cupy {cupy.__version__} finds no CUDA device"
    return cupy, f"cupy {cupy.__version__}, {n} device(s)"


class GpuKernels(KernelSet):
    """Plans on one CUDA device through CuPy. `to_host`: results come back as numpy arrays;
    `graphs`: calls replay CUDA graphs from the second on (`CudaGraphs`)."""

    name = "gpu"
    in_place = True  # an elementwise CUDA thread reads its element before it writes it
    epilogues = False  # an ElementwiseKernel computes no reductions: sums stay separate steps

    def __init__(self, fuse: bool = True, to_host: bool = True, graphs: bool = True):
        cp, why = cupy_status()
        if cp is None:
            raise RuntimeError(f"the gpu kernels need CuPy and a CUDA device: {why}")
        import cupyx

        table = kernel_table(cp)
        table["scatter_add"] = _scatter_add(cp, cupyx)
        super().__init__(table, fuse=fuse)
        self.cp = cp
        self.to_host = to_host
        self.graphs = graphs
        self.reason = why

    def replays(self, plan: Plan) -> CudaGraphs | None:
        """What runs the plan's calls (plan.py's `Replays`): its CUDA graphs, unless they are off."""
        return CudaGraphs(self, plan) if self.graphs else None

    def upload(self, a: Any) -> Any:
        return self.cp.asarray(a)

    def result(self, a: Any, mode: int) -> Any:
        cp = self.cp
        if self.to_host:
            host = cp.asnumpy(a)  # a copy: never aliases an input
            return host[()] if mode == 2 else host
        return a.copy() if mode == 1 else a

    def compile_group(self, group: Group) -> Callable[..., tuple[Any, ...]] | None:
        cp = self.cp
        in_params, out_params, body = elementwise_source(group)
        name = "gradserve_fused_" + hashlib.sha256(group.signature().encode()).hexdigest()[:16]
        kernel = cp.ElementwiseKernel(in_params, out_params, body, name)
        aligned = group.aligned
        shape = group.shape
        out_dtypes = [group.members[j].dtype for j in group.outputs]

        def run(arrays: Sequence[Any], outs: Sequence[Any]) -> tuple[Any, ...]:
            ins = [cp.asarray(a).reshape(al) for a, al in zip(arrays, aligned, strict=True)]
            res = [o if o is not None else cp.empty(shape, dt) for o, dt in zip(outs, out_dtypes, strict=True)]
            kernel(*ins, *res)
            return tuple(res)

        # compile now (NVRTC, or CuPy's disk cache), so that plan.compile_seconds covers it
        tiny = [cp.zeros((1,) * len(shape), dt) for dt in group.input_dtypes]
        kernel(*tiny, *(cp.empty((1,) * len(shape), dt) for dt in out_dtypes))
        cp.cuda.Stream.null.synchronize()
        return run

    def describe(self) -> str:
        return f"gpu: {self.reason}; " + ("calls replay CUDA graphs" if self.graphs else "CUDA graphs off")


def _scatter_add(cp: Any, cupyx: Any) -> Callable[..., Any]:
    def kernel(x, idx, upd, *, axis):
        out = cp.array(x, copy=True)
        cupyx.scatter_add(out, (slice(None),) * axis + (idx,), upd)
        return out

    return kernel


def _c_expr(n: Node, args: list[str], in_dtypes: list[str]) -> str:
    """One member's value as a C++ expression, its primitive's `cuda` form (CUDA's math overloads
    keep float as float)."""
    cuda = PRIMITIVES[n.op].cuda
    if cuda is None:
        raise NotImplementedError(f"no CUDA form for {n.op}")
    return cuda(args, n.dtype, in_dtypes)


def elementwise_source(group: Group) -> tuple[str, str, str]:
    """(in_params, out_params, body) of the group's `cupy.ElementwiseKernel`."""
    in_params = ", ".join(f"{dt} x{k}" for k, dt in enumerate(group.input_dtypes))
    out_params = ", ".join(f"{group.members[j].dtype} o{k}" for k, j in enumerate(group.outputs))
    lines = []
    for j, n in enumerate(group.members):
        args = [f"v{o}" if o >= 0 else f"x{-1 - o}" for o in group.operands[j]]
        in_dt = [group.members[o].dtype if o >= 0 else group.input_dtypes[-1 - o] for o in group.operands[j]]
        lines.append(f"const {C_TYPES[n.dtype]} v{j} = {_c_expr(n, args, in_dt)};")
    lines += [f"o{k} = v{j};" for k, j in enumerate(group.outputs)]
    return in_params, out_params, "\n".join(lines)


# ---------------------------------------------------------------- CUDA graphs


class _Unrecordable(Exception):
    """The plan's calls cannot be replayed from graphs (the reason); they run step by step."""


class _Outside:
    """A step that could not be recorded, run between the graphs: its operands are the static
    buffers the recording left in their slots (`kept`), its results go into static buffers of
    their own (`outs`) that the following graphs read. An out-capable kernel writes its result
    there directly; otherwise it is copied."""

    __slots__ = ("held", "index", "kept", "outs", "reason", "steps")

    def __init__(self, index: int, steps: list[Step], kept: list[tuple[int, Any]], outs: list[tuple[int, Any]],
                 reason: str, held: int):
        self.index, self.steps, self.kept, self.outs, self.reason = index, steps, kept, outs, reason
        self.held = held  # bytes of the static buffers it allocated

    def run(self, plan: Plan, scratch: list[Any], cp: Any) -> None:
        for slot, a in self.kept:
            scratch[slot] = a
        try:
            failed = run_steps(self.steps, scratch, None)
            if failed is not None:
                plan.raise_failure(self.index, failed[1])
            for slot, static in self.outs:
                if scratch[slot] is not static:
                    cp.copyto(static, scratch[slot])
        finally:
            for slot, _ in (*self.kept, *self.outs):
                scratch[slot] = None


class CudaGraphs:
    """A plan's calls replayed from CUDA graphs (plan.py's `Replays`; see the module docstring).

    The first call runs eagerly (`plan.run_eager`); the second records: on a private
    non-blocking stream, with the inputs in static buffers, it captures the plan's steps with
    `run_steps` until one raises (cuBLAS refused, a device-to-host read), records again
    the steps before that one (the failed capture may hold part of its work) and launches them,
    runs the step eagerly, and goes on after it. Allocations during capture come from a private
    `cupy.cuda.MemoryPool`: a graph writes its intermediates at the addresses it was recorded
    with, so nothing else may ever be given that memory while the graphs live. A plan whose
    steps none could be recorded runs eagerly for good, and says why (`info`).

    Each later call, under the plan's lock (the graphs share one set of static buffers):
    inputs copied into the static buffers (host arrays `set`, device arrays copied on the
    device), the graphs launched and the outside steps run in order with the stop condition
    checked between them, the results copied out (to the host, or to new device arrays: the
    next call writes over the static ones). Calls of one plan from several threads are
    serialised rather than run eagerly beside a replay: a replay costs the host little, an
    eager call much (the GIL) for a device that is busy either way. The private stream waits
    for the caller's current stream before it reads device inputs, and in device-resident mode
    the caller's stream waits for the results before it goes on."""

    def __init__(self, kernels: GpuKernels, plan: Plan):
        self.cp = kernels.cp
        self.to_host = kernels.to_host
        self._plan = weakref.ref(plan)  # the plan holds this; it is alive while it runs a call
        self._types = [(name, np.dtype(plan.graph.aval(slot)[0]), plan.graph.aval(slot)[1]) for name, slot in plan.inputs]
        self._lock = threading.Lock()
        self._warm = False  # a call has completed: kernels loaded, libraries initialised
        self._program: list[Any] | None = None  # graphs and _Outside steps, in order
        self._stream: Any = None
        self._pool: Any = None
        self._events: tuple[Any, Any] | None = None
        self._statics: list[Any] = []
        self._outs: list[tuple[str, Any, int]] = []
        self._scratch: list[Any] = []
        self.reason: str | None = None  # why calls run eagerly for good
        self.graphs = 0
        self.recorded_steps = 0
        self.outside: list[tuple[str, str]] = []  # (the step's op, why it was not recorded)
        self.held_bytes = 0
        self.replayed = 0  # calls run through the graphs (the recording one included)

    def run(self, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any]:
        plan = self._plan()
        assert plan is not None, "a plan's graphs ran after the plan"
        self._check(values)
        if self._warm and self.reason is None:
            with self._lock:
                if self._program is not None:
                    return self._replay(plan, values, stop)
                if self.reason is None:
                    got = self._record(plan, values, stop)
                    if got is not None:
                        return got
        out = plan.run_eager(values, stop)
        self._warm = True
        return out

    def info(self) -> dict[str, Any]:
        if self.reason is not None:
            state = f"eager: {self.reason}"
        elif self._program is None:
            state = "not recorded yet: the first call runs step by step, the second records"
        else:
            state = f"captured: {self.graphs} graph(s) of {self.recorded_steps} steps"
            if self.outside:
                counts: dict[tuple[str, str], int] = {}
                for key in self.outside:
                    counts[key] = counts.get(key, 0) + 1
                state += f"; {len(self.outside)} step(s) outside: " + "; ".join(
                    f"{op} x{n} ({why})" for (op, why), n in counts.items())
        return {"cuda_graph": state, "cuda_graphs": self.graphs, "steps_outside_graphs": len(self.outside),
                "cuda_graph_bytes": self.held_bytes, "cuda_graph_calls": self.replayed}

    def _check(self, values: list[Any]) -> None:
        """Inputs of the plan's types: the static buffers are."""
        if len(values) != len(self._types):
            raise GraphError(f"{len(values)} inputs for a plan of {len(self._types)}")
        for v, (name, dtype, shape) in zip(values, self._types, strict=True):
            a = v if isinstance(v, self.cp.ndarray) else np.asarray(v)
            if a.dtype != dtype or a.shape != shape:
                raise GraphError(f"input {name!r} is {a.dtype.name}{list(a.shape)}; this plan runs "
                                 f"{dtype.name}{list(shape)} (a plan is built per signature)")

    def _load(self, values: list[Any]) -> None:
        """The inputs into the static buffers, on the private stream (the current one)."""
        cp = self.cp
        for a, v in zip(self._statics, values, strict=True):
            if isinstance(v, cp.ndarray):
                if v.flags.c_contiguous:
                    a.data.copy_from_device_async(v.data, a.nbytes, self._stream)
                else:
                    cp.copyto(a, v)
            else:
                a.set(np.asarray(v), stream=self._stream)

    def _results(self) -> dict[str, Any]:
        cp = self.cp
        if self.to_host:
            got = {}
            for name, a, mode in self._outs:
                host = cp.asnumpy(a, stream=self._stream)  # waits for the stream
                got[name] = host[()] if mode == 2 else host
            return got
        return {name: a.copy() for name, a, _ in self._outs}  # the next call writes over the static ones

    def _replay(self, plan: Plan, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any]:
        cp, stream, program = self.cp, self._stream, self._program
        assert program is not None and self._events is not None
        ready, done = self._events
        caller = cp.cuda.get_current_stream()
        with stream:
            stream.wait_event(caller.record(ready))
            self._load(values)
            for item in program:
                if stop is not None and stop():
                    raise Cancelled("stopped between the CUDA graphs of a call")
                if isinstance(item, _Outside):
                    item.run(plan, self._scratch, cp)
                else:
                    item.launch(stream=stream)
            out = self._results()
            if not self.to_host:
                caller.wait_event(stream.record(done))
        self.replayed += 1
        return out

    def _record(self, plan: Plan, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any] | None:
        """Record the plan's graphs while running this call through them; None (and `reason` set)
        when its calls cannot be replayed, then the caller runs it eagerly."""
        cp = self.cp
        steps = plan.steps
        if not steps:
            self.reason = "the plan has no steps"
            return None
        try:
            self._stream = stream = cp.cuda.Stream(non_blocking=True)
            self._pool = cp.cuda.MemoryPool()
            self._events = (cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True))
        except Exception as e:
            self.reason = f"no stream to capture on ({type(e).__name__}: {e})"
            return None
        env: list[Any] = [None] * plan.n_slots
        program: list[Any] = []
        graphs = recorded = 0
        caller = cp.cuda.get_current_stream()
        try:
            with stream:
                stream.wait_event(caller.record(self._events[0]))
                self._statics = [cp.empty(shape, dtype) for _, dtype, shape in self._types]
                self._load(values)
                for (_, slot), a in zip(plan.inputs, self._statics, strict=True):
                    env[slot] = a
                for slot, c in plan.constants:
                    env[slot] = c
                k = 0
                while k < len(steps):
                    if stop is not None and stop():
                        raise Cancelled(f"stopped before {steps[k].text()}")
                    before = list(env)
                    graph, failed = self._capture(steps[k:], env)
                    end = len(steps) if failed is None else k + failed[0]
                    if failed is not None:
                        env[:] = before  # the failed capture's buffers go back to the private pool
                        if end > k:
                            graph, again = self._capture(steps[k:end], env)
                            if again is not None:
                                raise _Unrecordable(f"recording is not repeatable: {steps[k + again[0]].text()} "
                                                    f"failed the second time ({_why(again[1])})")
                    if end > k:
                        graph.launch(stream=stream)
                        program.append(graph)
                        graphs += 1
                        recorded += end - k
                    if failed is not None:
                        program.append(self._outside(plan, end, env, _why(failed[1])))
                    k = end + 1
                if not graphs:
                    assert isinstance(program[0], _Outside)
                    raise _Unrecordable(f"no step could be recorded ({program[0].reason})")
                self._outs = [(name, env[vid], mode) for name, vid, mode in plan.returns]
                out = self._results()
                if not self.to_host:
                    caller.wait_event(stream.record(self._events[1]))
        except _Unrecordable as e:
            self._forget()
            self.reason = str(e)
            return None
        except BaseException:
            self._forget()  # a step's own error, or a stop: recorded again at the next call
            raise
        self._scratch = [None] * plan.n_slots
        self._program = program
        self.graphs, self.recorded_steps = graphs, recorded
        self.outside = [(_op(steps[item.index]), item.reason) for item in program if isinstance(item, _Outside)]
        self.held_bytes = self._pool.total_bytes() + sum(a.nbytes for a in self._statics) + sum(
            item.held for item in program if isinstance(item, _Outside))
        self.replayed = 1
        return out

    def _capture(self, steps: Sequence[Step], env: list[Any]) -> tuple[Any, tuple[int, Exception] | None]:
        """(the graph of `steps` recorded over `env`, None), or (None, (the position of the step
        that raised, its error)); the capture is ended either way."""
        cp, stream = self.cp, self._stream
        with cp.cuda.using_allocator(self._pool.malloc):
            failed: tuple[int, Exception] | None = None
            stream.begin_capture()
            try:
                failed = run_steps(steps, env, None)
            finally:
                try:
                    graph = stream.end_capture()
                except Exception as e:  # the capture was invalidated: by the failed step, or else unknown
                    if failed is None:
                        raise _Unrecordable(f"the capture failed at its end ({_why(e)})") from e
        return (graph, None) if failed is None else (None, failed)

    def _outside(self, plan: Plan, index: int, env: list[Any], reason: str) -> _Outside:
        """Run steps[index] eagerly now, its results kept as static buffers, and return how to
        run it between the graphs."""
        step = plan.steps[index]
        kept = [(i, env[i]) for i in dict.fromkeys((*step.ins, *(s for s in step.srcs if s >= 0)))]
        failed = run_steps([step], env, None)
        if failed is not None:
            plan.raise_failure(index, failed[1])
        outs = [(o, env[o]) for o in step.outs]
        fresh = sum(a.nbytes for _, a in outs if all(a is not b for _, b in kept))  # not written over an operand
        node = step.unit
        runs: list[Step] = [step]
        if (isinstance(step, KernelStep) and isinstance(node, Node) and step.src < 0 and node.op in OUT_CAPABLE
                and node.shape and plan.kernel_set is not None):
            # the same kernel writing its result straight into the static buffer (no copy per call)
            runs = [KernelStep.of(plan.kernel_set.table[node.op], node, node.id, ())]
            kept.append(outs[0])
        return _Outside(index, runs, kept, outs, reason, fresh)

    def _forget(self) -> None:
        self._stream = self._pool = self._events = None
        self._statics, self._outs = [], []


def _why(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 160 else text[:157] + "..."


def _op(step: Step) -> str:
    return step.unit.op if isinstance(step.unit, Node) else "fused group"
