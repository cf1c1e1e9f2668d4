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
during capture comes from a memory pool private to the plan's graphs, which gives it back to the
device only when the graphs go: should cudaMalloc fail during the recording (CuPy's pool then
frees its free blocks, which may hold a recorded graph's intermediates), the recording stops and
the plan runs step by step for good, as it does when the graph machinery itself fails. A call
runs on a private stream ordered after the caller's; device-resident results are copied on the
caller's stream, as an eager call makes them (a call made while the caller's stream captures a
graph of its own runs step by step, into that capture). `plan.kernel_info()["cuda_graph"]` says what was
recorded, what runs outside and why; `["cuda_graph_bytes"]` the device memory the graphs hold,
which an Engine charges to its plan cache.

CuPy is optional: importing this module never needs it; `GpuKernels()` raises a RuntimeError
that says what is missing.
"""

from __future__ import annotations

import contextlib
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


class _StepFailed(Exception):
    """A step of the plan raised while running eagerly between the graphs: its own error, for
    `Plan.raise_failure` to name."""

    def __init__(self, index: int, error: Exception):
        super().__init__(index, error)
        self.index, self.error = index, error


_SHORT = ("device memory ran short while recording (when cudaMalloc fails, CuPy's pool frees its free blocks, which "
          "held intermediates a recorded graph writes)")  # a reason in kernel_info


class _CountingMalloc:
    """cudaMalloc for the graphs' private pool, counting the bytes the pool got: it holds less
    than that only once it freed blocks (CuPy's pool frees all its free blocks, and tries
    again, when cudaMalloc fails or it reaches its limit)."""

    def __init__(self, cp: Any):
        self.cp = cp
        self.bytes = 0

    def __call__(self, size: int) -> Any:
        mem = self.cp.cuda.MemoryPointer(self.cp.cuda.Memory(size), 0)
        self.bytes += size
        return mem


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

    def run(self, scratch: list[Any], cp: Any) -> None:
        for slot, a in self.kept:
            scratch[slot] = a
        try:
            _run(self.steps, scratch, self.index)
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
    with, so nothing else may ever be given that memory while the graphs live. The pool keeps
    every block it got (a dead intermediate's is free for a later capture of the same recording
    only) unless cudaMalloc fails during the recording: CuPy's pool then frees its free blocks,
    which the device may give to anything, so the recording stops there (the pool holds less
    than it got) and the plan runs eagerly for good. So does a plan whose steps none could be
    recorded, or whose recording or replay the CUDA graph machinery itself failed (a capture
    that cannot begin, a graph that cannot launch); `info` says why. A step's own error reaches
    the caller (named by `Plan.raise_failure`), and a stopped recording is tried again at the
    next call. A call made while the caller's stream captures (the caller recording its own
    graph) runs step by step on that stream, into the caller's capture, and leaves the private
    stream out of it.

    Each later call, under the plan's lock (the graphs share one set of static buffers):
    inputs copied into the static buffers (host arrays `set`, device arrays copied on the
    device), the graphs launched and the outside steps run in order with the stop condition
    checked between them, the results copied out (to the host, or to new device arrays: the
    next call writes over the static ones). Calls of one plan from several threads are
    serialised rather than run eagerly beside a replay: a replay costs the host little, an
    eager call much (the GIL) for a device that is busy either way.

    Streams: the private stream waits for the caller's current stream before it reads device
    inputs, and, before it writes the static buffers again, for the copies of the last call's
    results out of them. The caller's stream waits for the private stream when the call ends
    (it read the caller's inputs), however the call ends; device-resident results are copied
    on the caller's stream, as an eager call makes them, so CuPy's pool reuses their memory
    only in that stream's order.

    `held_bytes` (the static buffers and the pool) is what the graphs hold on the device;
    `watch(callback)` has `callback(held_bytes)` called, under the plan's lock, whenever it
    changes (the engine charges a cached plan for it)."""

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
        self._malloc: _CountingMalloc | None = None
        self._events: tuple[Any, Any, Any] | None = None  # (caller ready, private stream done, results copied)
        self._statics: list[Any] = []
        self._outs: list[tuple[str, Any, int]] = []
        self._scratch: list[Any] = []
        self._watch: Callable[[int], None] | None = None
        self.reason: str | None = None  # why calls run eagerly for good
        self.graphs = 0
        self.recorded_steps = 0
        self.outside: list[tuple[str, str]] = []  # (the step's op, why it was not recorded)
        self.held_bytes = 0
        self.replayed = 0  # calls run through the graphs (the recording one included)

    def watch(self, callback: Callable[[int], None]) -> None:
        """Call `callback(held_bytes)` whenever the device memory the graphs hold changes."""
        self._watch = callback

    def run(self, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any]:
        plan = self._plan()
        assert plan is not None, "a plan's graphs ran after the plan"
        self._check(values)
        if self._warm and self.reason is None and not self._caller_captures():
            with self._lock:
                held = self.held_bytes
                try:
                    if self.reason is None:
                        got = self._call(plan, values, stop)
                        if got is not None:
                            return got
                finally:
                    if self.held_bytes != held and self._watch is not None:
                        self._watch(self.held_bytes)
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

    def _caller_captures(self) -> bool:
        """Whether the caller's stream is capturing (the caller records a graph of its own)."""
        try:
            return bool(self.cp.cuda.get_current_stream().is_capturing())
        except self.cp.cuda.runtime.CUDARuntimeError:  # refused while a capture elsewhere forbids it: keep out of its way
            return True

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

    def _call(self, plan: Plan, values: list[Any], stop: Callable[[], bool] | None) -> dict[str, Any] | None:
        """One call through the graphs, recording them first if they are not yet; None (and
        `reason` set) when the plan's calls run eagerly from now on, this one included."""
        cp = self.cp
        recording = self._program is None
        caller = cp.cuda.get_current_stream()
        try:
            if recording:
                if not plan.steps:
                    raise _Unrecordable("the plan has no steps")
                self._start()
            assert self._events is not None
            stream, (ready, done, copied), program = self._stream, self._events, self._program
            with stream:
                stream.wait_event(caller.record(ready))  # the caller's inputs are written
                stream.wait_event(copied)  # the last call's results are copied out of the static buffers
                if recording:
                    self._statics = [cp.empty(shape, dtype) for _, dtype, shape in self._types]
                self._load(values)
                if recording:
                    self._record(plan, stop)
                else:
                    assert program is not None
                    for item in program:
                        if stop is not None and stop():
                            raise Cancelled("stopped between the CUDA graphs of a call")
                        if isinstance(item, _Outside):
                            item.run(self._scratch, cp)
                        else:
                            item.launch(stream=stream)
                out = self._to_host() if self.to_host else None
                stream.record(done)
            caller.wait_event(done)
            if out is None:  # on the caller's stream, as an eager call makes them; the next call writes the static ones
                out = {name: a.copy() for name, a, _ in self._outs}
                caller.record(copied)
        except _StepFailed as failed:
            self._end(caller, recording)
            plan.raise_failure(failed.index, failed.error)
        except Exception as e:
            passes = isinstance(e, Cancelled) or (isinstance(e, MemoryError) and not recording)
            self._end(caller, forget=recording or not passes)
            if passes:
                raise  # a stop (a recording is tried again at the next call); a replay's results found no memory
            self.reason = _unrecordable(e, recording)
            return None
        except BaseException:
            self._end(caller, recording)
            raise
        self.replayed += 1
        return out

    def _start(self) -> None:
        cp = self.cp
        try:
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._malloc = _CountingMalloc(cp)
            self._pool = cp.cuda.MemoryPool(self._malloc)
            self._events = (cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True),
                            cp.cuda.Event(disable_timing=True))
        except Exception as e:
            raise _Unrecordable(f"no stream to capture on ({_why(e)})") from e

    def _record(self, plan: Plan, stop: Callable[[], bool] | None) -> None:
        """Record the plan's graphs while running this call through them (on the private stream,
        the inputs loaded)."""
        steps = plan.steps
        env: list[Any] = [None] * plan.n_slots
        for (_, slot), a in zip(plan.inputs, self._statics, strict=True):
            env[slot] = a
        for slot, c in plan.constants:
            env[slot] = c
        program: list[Any] = []
        graphs = recorded = k = 0
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
                                            f"failed the second time ({again[1]})")
            if end > k:
                graph.launch(stream=self._stream)
                program.append(graph)
                graphs += 1
                recorded += end - k
            if failed is not None:
                program.append(self._outside(plan, end, env, failed[1]))
            k = end + 1
        if not graphs:
            assert isinstance(program[0], _Outside)
            raise _Unrecordable(f"no step could be recorded ({program[0].reason})")
        self._outs = [(name, env[vid], mode) for name, vid, mode in plan.returns]
        self._scratch = [None] * plan.n_slots
        self._program = program
        self.graphs, self.recorded_steps = graphs, recorded
        self.outside = [(_op(steps[item.index]), item.reason) for item in program if isinstance(item, _Outside)]
        self.held_bytes = self._pool.total_bytes() + sum(a.nbytes for a in self._statics) + sum(
            item.held for item in program if isinstance(item, _Outside))

    def _capture(self, steps: Sequence[Step], env: list[Any]) -> tuple[Any, tuple[int, str] | None]:
        """(the graph of `steps` recorded over `env`, None), or (None, (the position of the step
        that raised, its error in words: the error itself is not kept, its traceback holds the
        recording's frames and graphs)); the capture is ended either way."""
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
        short = failed is not None and isinstance(failed[1], MemoryError)  # a step's own cudaMalloc failed
        why = None if failed is None else (failed[0], _why(failed[1]))
        failed = None
        assert self._malloc is not None
        if short or self._pool.total_bytes() < self._malloc.bytes:
            raise _Unrecordable(_SHORT)
        return (graph, None) if why is None else (None, why)

    def _outside(self, plan: Plan, index: int, env: list[Any], reason: str) -> _Outside:
        """Run steps[index] eagerly now, its results kept as static buffers, and return how to
        run it between the graphs."""
        step = plan.steps[index]
        kept = [(i, env[i]) for i in dict.fromkeys((*step.ins, *(s for s in step.srcs if s >= 0)))]
        _run([step], env, index)
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

    def _to_host(self) -> dict[str, Any]:
        got = {}
        for name, a, mode in self._outs:
            host = self.cp.asnumpy(a, stream=self._stream)  # waits for the stream
            got[name] = host[()] if mode == 2 else host
        return got

    def _end(self, caller: Any, forget: bool) -> None:
        """A call that raised: the caller's stream waits for the private stream (which read the
        caller's inputs); with `forget`, the graphs and their memory go (recorded again at the
        next call unless `reason` is set)."""
        if self._stream is not None and self._events is not None:
            with contextlib.suppress(Exception):  # failing already: that error is the one to report
                caller.wait_event(self._stream.record(self._events[1]))
        if forget:
            self._stream = self._pool = self._malloc = self._events = self._program = None
            self._statics, self._outs, self._scratch = [], [], []
            self.graphs = self.recorded_steps = self.held_bytes = 0
            self.outside = []


def _run(steps: Sequence[Step], env: list[Any], index: int) -> None:
    """`run_steps` between the graphs: a step's error raised as `_StepFailed` (plan.steps[index]),
    and not kept in this frame, which that error's traceback holds (a cycle would keep the
    recording's frames and graphs alive until a garbage collection)."""
    failed = run_steps(steps, env, None)
    if failed is not None:
        try:
            raise _StepFailed(index, failed[1])
        finally:
            failed = None


def _unrecordable(e: Exception, recording: bool) -> str:
    """Why the plan's calls run eagerly from now on, after `e` (the machinery's, not a step's)."""
    if isinstance(e, _Unrecordable):
        return str(e)
    if isinstance(e, MemoryError):
        return f"device memory ran short while recording ({_why(e)})"
    return f"the CUDA graph machinery failed while {'recording' if recording else 'replaying'} ({_why(e)})"


def _why(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 160 else text[:157] + "..."


def _op(step: Step) -> str:
    return step.unit.op if isinstance(step.unit, Node) else "fused group"
