"""The GPU backend (CuPy): generated CUDA bodies, plans on the device, and calls replayed from
CUDA graphs.

Without a device, `fake_cupy` stands in for CuPy: numpy kernels over device memory that is real
bytes handed out by per-stream pools (which free their free blocks when cudaMalloc fails, on a
device of bounded memory that hands freed addresses out again), streams whose capture records
kernels instead of running them, graphs that replay them at the recorded addresses, the
refusals CUDA and CuPy make during a capture (host reads and writes, cuBLAS), and a sanitizer
for memory a live graph uses being handed out again, and for memory one stream uses being
reused or written on another before that stream waited for the use. The tests below that need
a real device run where CuPy finds one (and bench/gpu_mlp.py measures there).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import threading
import weakref
from pathlib import Path

import fake_cupy
import numpy as np
import pytest
from test_native import FLOATS, TABLE_CASES, TABLE_IDS, assert_close, elementwise_table_graph, mlp_grad_graph

import gradserve as gs
from gradserve.api import Functional
from gradserve_engine import footprint, gpu, native
from gradserve_engine.engine import Engine
from gradserve_engine.errors import Cancelled, GraphError, LimitError
from gradserve_engine.fusion import find_groups
from gradserve_engine.guard import Budget, stop_when, within
from gradserve_engine.ir import Builder
from gradserve_engine.names import GRAD
from gradserve_engine.passes import optimize
from gradserve_engine.plan import Plan

needs_device = pytest.mark.skipif(gpu.cupy_status()[0] is None, reason="needs CuPy and a CUDA device: " + gpu.cupy_status()[1])


@pytest.fixture
def emulated_cupy(monkeypatch):
    """The stand-in as `cupy` and `cupyx`, a fresh device per test; fails the test if memory a
    live graph uses was handed out again."""
    cp, cpx = fake_cupy.make()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cpx)
    monkeypatch.setattr(gpu, "cupy_status", lambda: (cp, "numpy standing in for cupy"))
    yield cp
    assert not fake_cupy.violations, fake_cupy.violations


def counted(fn, *args):
    """fn(*args) and what it did on the stand-in: kernels outside graphs, recorded, copies, launches."""
    before = dict(fake_cupy.stats)
    out = fn(*args)
    return out, {k: fake_cupy.stats[k] - before.get(k, 0) for k in ("kernels", "recorded", "copies", "launches")}


def varied(feed: dict, k: int) -> dict:
    """The feed with its float inputs moved (a different call each k)."""
    rng = np.random.default_rng(100 + k)
    return {n: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for n, v in feed.items()}


def host(cp, value):
    return cp.asnumpy(value) if isinstance(value, cp.ndarray) else value


def check(cp, got: dict, want: dict, what: str = "") -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = host(cp, got[name])
        assert np.asarray(g).dtype == np.asarray(w).dtype, (what, name)
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, err_msg=f"{what} {name}")


def while_graph():
    """A while_loop between elementwise steps: its condition is read on the host (and its
    subgraph's constants uploaded) every call, so it cannot be recorded."""
    def f(x, w):
        v = gs.tanh(x) * 2.0 + 1.0

        def body(c):
            i, u = c
            return i + 1, u * w + 0.1

        u = gs.while_loop(lambda c: gs.sum(c[1]) < 50.0, body, (np.int32(0), v))[1]
        return gs.exp(-u) * gs.sum(u * u)

    x, w = np.linspace(0.1, 0.9, 16), np.full(16, 1.3)
    return optimize(gs.trace(f, x, w)), {"x": x, "w": w}


def softmax_graph():
    """Elementwise groups and reductions only: nothing a capture refuses."""
    b = Builder()
    x = b.input("x", "float64", (8, 5))
    e = b.bind("exp", b.bind("sub", x, b.bind("broadcast_to", b.bind("reduce_max", x, axes=(1,), keepdims=True), shape=(8, 5))))
    s = b.bind("reduce_sum", e, axes=(1,), keepdims=True)
    p = b.bind("div", e, b.bind("broadcast_to", s, shape=(8, 5)))
    graph = b.build([("p", p), ("total", b.bind("reduce_sum", b.bind("mul", p, x), axes=(0, 1), keepdims=False))])
    return graph, {"x": np.random.default_rng(3).standard_normal((8, 5))}


# ---------------------------------------------------------------- kernels and plans


def test_gpu_kernels_need_cupy() -> None:
    if gpu.cupy_status()[0] is not None:
        pytest.skip("cupy and a device are present")
    with pytest.raises(RuntimeError, match="CuPy"):
        gpu.GpuKernels()
    with pytest.raises(RuntimeError, match="CuPy"):
        native.resolve_kernels("gpu")


def test_gpu_elementwise_source() -> None:
    """The CUDA body of a fused group: one typed statement per member, outputs assigned."""
    graph, _ = mlp_grad_graph("float32")
    groups = {g.ops: g for g in find_groups(graph)}
    ins, outs, body = gpu.elementwise_source(groups[("mul", "sub", "mul_no_nan")])
    assert ins == "float32 x0, float32 x1, float32 x2" and outs == "float32 o0"
    assert body.splitlines() == ["const float v0 = (float)(x0 * x0);", "const float v1 = (float)(x1 - v0);",
                                 "const float v2 = (x2 == 0 ? (float)0 : v1 * x2);", "o0 = v2;"]
    for g in groups.values():  # every member has a CUDA form
        gpu.elementwise_source(g)


def test_gpu_plan_path_on_the_stand_in(emulated_cupy) -> None:
    """Without graphs: constants uploaded when the plan is built, inputs once per call, results
    back once, as numpy values of the same types; fused (elementwise kernels) and unfused; every
    call launches its kernels."""
    graph, feed = mlp_grad_graph("float64")
    want = Plan(graph).run(feed)
    for fuse in (False, True):
        plan, built = counted(Plan, graph, gpu.GpuKernels(fuse=fuse, graphs=False))
        assert plan.kernel_mode == "gpu" and bool(plan.groups) == fuse and plan.kernel_info()["cuda_graph"] == "off"
        assert built["copies"] >= len(graph.constants)
        for _ in range(2):
            got, did = counted(plan.run, feed)
            assert did["copies"] == len(graph.inputs) + len(graph.outputs) and did["launches"] == did["recorded"] == 0
            assert did["kernels"] >= len(plan.steps)
            for name, value in got.items():
                assert type(value) is type(want[name])
                np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize(("dtype", "shape"), TABLE_CASES, ids=TABLE_IDS)
def test_gpu_elementwise_bodies_on_the_stand_in(emulated_cupy, dtype, shape) -> None:
    """Every elementwise primitive's CUDA form, evaluated by the stand-in, against numpy: run
    step by step, then replayed from the graph."""
    graph, feed, cases = elementwise_table_graph(dtype, shape)
    if not cases:
        pytest.skip(f"no elementwise spec of dtype {dtype} with result shape {shape}")
    plan = Plan(graph, kernels=gpu.GpuKernels())
    assert len(plan.groups) == 1
    want = Plan(graph).run(feed)
    for call in ("eager", "recording", "replay"):
        got = plan.run(feed)
        for s, name, _ in cases:
            assert_close(got[name], want[name], f"{s.name} {dtype} ({call})")
    assert plan.kernel_info()["cuda_graph"].startswith("captured: 1 graph(s)")


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("to_host", [True, False], ids=["host", "device"])
def test_replayed_calls_match_numpy(emulated_cupy, to_host) -> None:
    """The MLP gradient: the first call step by step, the second recorded, then replays; each
    call's inputs differ and every result equals numpy's. Matmuls (cuBLAS, which CuPy refuses
    in a capture) run between the graphs, writing into their static buffers: per replayed call
    one kernel each outside the graphs, one launch per graph, a copy per input and per result."""
    cp = emulated_cupy
    graph, feed = mlp_grad_graph("float64")
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=to_host))
    assert plan.kernel_info()["cuda_graph"].startswith("not recorded yet")
    n_matmuls = sum(n.op == "matmul" for n in graph.nodes)
    for k in range(5):
        f = varied(feed, k)
        values = [f[name] if to_host or k % 2 else cp.asarray(f[name]) for name, _ in plan.inputs]  # host and device inputs
        got, did = counted(plan.run_values, values)
        check(cp, got, Plan(graph).run(f), f"call {k}")
        assert all(isinstance(v, cp.ndarray) != to_host for v in got.values())
        info = plan.kernel_info()
        if k == 0:
            assert did["recorded"] == did["launches"] == 0 and info["cuda_graph"].startswith("not recorded yet")
            continue
        assert info["cuda_graph"].startswith("captured: ") and "matmul x" in info["cuda_graph"]
        assert "cuBLAS API during stream capture" in info["cuda_graph"]
        assert info["steps_outside_graphs"] == n_matmuls and info["cuda_graphs"] >= 2 and info["cuda_graph_bytes"] > 0
        assert info["cuda_graph_calls"] == k
        if k >= 2:
            assert did == {"kernels": n_matmuls, "recorded": 0, "launches": info["cuda_graphs"],
                           "copies": len(graph.inputs) + len(graph.outputs)}


def test_a_plan_without_library_calls_is_one_graph(emulated_cupy) -> None:
    """Elementwise groups and reductions record into one graph: a replayed call launches it and
    copies, and runs no kernel outside it."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels())
    for k in range(4):
        f = varied(feed, k)
        got, did = counted(plan.run, f)
        check(cp, got, Plan(graph).run(f), f"call {k}")
    assert plan.kernel_info()["cuda_graph"] == f"captured: 1 graph(s) of {len(plan.steps)} steps"
    assert did == {"kernels": 0, "recorded": 0, "launches": 1, "copies": 1 + 2}


def test_device_resident_results_survive_the_next_call(emulated_cupy) -> None:
    """The graphs write every call's results into the same static buffers: what a call returns
    on the device is a copy the next call leaves alone."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=False))
    feeds = [varied(feed, k) for k in range(4)]
    kept = [plan.run({"x": cp.asarray(f["x"])}) for f in feeds]
    assert plan.kernel_info()["cuda_graph_calls"] == 3
    for f, got in zip(feeds, kept, strict=True):
        check(cp, got, Plan(graph).run(f))


@pytest.mark.parametrize("to_host", [True, False], ids=["host", "device"])
def test_recorded_memory_is_never_handed_out_again(emulated_cupy, to_host) -> None:
    """Buffers a capture allocated come from the graphs' own pool: the sanitizer sees none of
    them handed out again while the graphs live, though the while_loop between the graphs
    allocates on the same stream every call. Recording with the shared pool instead is caught:
    the sanitizer reports it (and a device-resident result comes out wrong)."""
    cp = emulated_cupy
    graph, feed = while_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=to_host))
    for k in range(4):
        f = {"x": feed["x"] + 0.02 * k, "w": feed["w"]}
        check(cp, plan.run(f), Plan(graph).run(f), f"call {k}")
    assert plan.kernel_info()["cuda_graph"].startswith("captured: 2 graph(s)")
    assert not fake_cupy.violations
    # the control: captures allocating from the default pool, whose blocks go back to the stream's arena
    cp.cuda.MemoryPool = lambda allocator=None: cp.get_default_memory_pool()
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=to_host))
    for k in range(4):
        plan.run({"x": feed["x"] + 0.02 * k, "w": feed["w"]})
    assert fake_cupy.violations and "a live CUDA graph uses" in fake_cupy.violations[0]
    fake_cupy.violations.clear()


def _syncing(cp, how: str):
    """An exp kernel that first reads the device on the host or synchronizes its stream."""
    def exp(x, out=None):
        if how == "item":
            assert np.isfinite(float(x.ravel()[0]))
        else:
            cp.cuda.get_current_stream().synchronize()
        return cp.exp(x, out=out)

    return exp


@pytest.mark.parametrize("how", ["item", "synchronize", "while_loop"])
def test_steps_that_need_the_host_run_between_the_graphs(emulated_cupy, how) -> None:
    """A step that reads device values on the host (refused before it does anything), one that
    synchronizes its stream (which spoils the whole capture), and a while_loop: each runs
    outside the graphs, the rest is recorded around it, results stay right, and kernel_info
    names the step and why."""
    cp = emulated_cupy
    if how == "while_loop":
        graph, feed = while_graph()
        kernels = gpu.GpuKernels()
        op = "while"
    else:
        graph, feed = softmax_graph()
        kernels = gpu.GpuKernels(fuse=False)
        kernels.table["exp"] = _syncing(cp, how)
        op = "exp"
    plan = Plan(graph, kernels=kernels)
    for k in range(4):
        f = {n: v + 0.01 * k for n, v in feed.items()}
        check(cp, plan.run(f), Plan(graph).run(f), f"call {k}")
    info = plan.kernel_info()
    assert info["cuda_graph"].startswith("captured: ") and f"1 step(s) outside: {op} x1 (RuntimeError: " in info["cuda_graph"]
    assert info["cuda_graphs"] == 2 and info["steps_outside_graphs"] == 1


def test_a_plan_nothing_of_which_records_runs_eagerly_for_good(emulated_cupy) -> None:
    cp = emulated_cupy
    b = Builder()
    graph = b.build([("y", b.bind("matmul", b.input("a", "float64", (3, 4)), b.input("b", "float64", (4, 2))))])
    plan = Plan(graph, kernels=gpu.GpuKernels())
    rng = np.random.default_rng(0)
    for _ in range(4):
        f = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((4, 2))}
        got, did = counted(plan.run, f)
        check(cp, got, Plan(graph).run(f))
    assert plan.kernel_info()["cuda_graph"] == ("eager: no step could be recorded (NotImplementedError: calling cuBLAS API "
                                                "during stream capture is currently unsupported)")
    assert did["recorded"] == did["launches"] == 0 and did["kernels"] >= 1


def test_graphs_off_and_the_kernel_line(emulated_cupy) -> None:
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels(graphs=False))
    for _ in range(3):
        _, did = counted(plan.run, feed)
        assert did["recorded"] == did["launches"] == 0 and did["kernels"] >= len(plan.steps)
    assert plan.kernel_info()["cuda_graph"] == "off" and plan.replays is None
    assert gpu.GpuKernels(graphs=False).describe().endswith("CUDA graphs off")
    assert gpu.GpuKernels().describe().endswith("calls replay CUDA graphs")
    assert Plan(graph).kernel_info()["cuda_graph"] == "off"


def test_inputs_of_another_type_are_refused(emulated_cupy) -> None:
    """Static buffers have the plan's input types: anything else is refused, naming the input."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels())
    for bad in (feed["x"].astype("float32"), feed["x"][:4], cp.asarray(feed["x"][:, :2])):
        with pytest.raises(GraphError, match=r"input 'x' is float\d\d\[\d, \d\]; this plan runs float64\[8, 5\]"):
            plan.run({"x": bad})
    for _ in range(3):
        check(cp, plan.run(feed), Plan(graph).run(feed))
    with pytest.raises(GraphError, match="input 'x' is float32"):
        plan.run({"x": feed["x"].astype("float32")})
    transposed = cp.asarray(np.ascontiguousarray(feed["x"].T)).T  # right type, not contiguous: copied on the device
    check(cp, plan.run({"x": transposed}), Plan(graph).run(feed))


def test_stop_and_budget_apply_to_each_call(emulated_cupy) -> None:
    """A stop checked while recording and between the graphs of a replay (a stopped recording
    is tried again at the next call); each call admitted against the memory budget."""
    cp = emulated_cupy
    graph, feed = while_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels())
    want = Plan(graph).run(feed)
    check(cp, plan.run(feed), want)
    with stop_when(lambda: True), pytest.raises(Cancelled, match="stopped before"):
        plan.run(feed)  # stopped while recording
    assert plan.kernel_info()["cuda_graph"].startswith("not recorded yet")
    check(cp, plan.run(feed), want)  # recorded now
    checks = iter([False, True])
    with stop_when(lambda: next(checks)), pytest.raises(Cancelled, match="between the CUDA graphs"):
        plan.run(feed)
    check(cp, plan.run(feed), want)

    class Counting(Budget):
        def __init__(self, **limits):
            super().__init__(**limits)
            self.held: list[int] = []

        def acquire(self, nbytes, what):
            super().acquire(nbytes, what)
            self.held.append(nbytes)

    budget = Counting(max_inflight_bytes=1 << 30)
    with within(budget):
        for _ in range(2):
            check(cp, plan.run(feed), want)
    assert budget.held == [plan.peak_bytes] * 2 and budget.inflight == 0
    with within(Budget(max_call_bytes=plan.peak_bytes - 1)), pytest.raises(LimitError, match="at its peak"):
        plan.run(feed)


def test_threads_calling_one_plan(emulated_cupy) -> None:
    """Calls of one plan from several threads (a server's): serialised on the plan's graphs,
    each gets its own inputs' results."""
    cp = emulated_cupy
    graph, feed = mlp_grad_graph("float64")
    plan = Plan(graph, kernels=gpu.GpuKernels())
    feeds = [varied(feed, k) for k in range(12)]
    wants = [Plan(graph).run(f) for f in feeds]
    got: dict[int, dict] = {}

    def worker(ks):
        for k in ks:
            got[k] = plan.run(feeds[k])

    workers = [threading.Thread(target=worker, args=(range(t, 12, 4),)) for t in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for k in range(12):
        check(cp, got[k], wants[k], f"call {k}")
    assert plan.kernel_info()["cuda_graph"].startswith("captured: ")


def pressure_graph():
    """exp(x) summed over its rows (its buffer dies inside the first graph, back to the graphs'
    pool), a matmul (outside the graphs), then a result larger than anything before it: the
    second graph needs memory the pool does not have."""
    b = Builder()
    x, w = b.input("x", "float64", (16, 32)), b.input("w", "float64", (32, 64))
    t = b.bind("reduce_sum", b.bind("exp", x), axes=(0,), keepdims=True)
    m = b.bind("matmul", t, w)
    graph = b.build([("y", b.bind("exp", b.bind("broadcast_to", m, shape=(16, 64))))])
    rng = np.random.default_rng(11)
    return graph, {"x": 0.1 * rng.standard_normal((16, 32)), "w": 0.1 * rng.standard_normal((32, 64))}


def test_a_step_out_of_device_memory_while_recording_stops_the_recording(emulated_cupy) -> None:
    """A step whose own allocation fails during the capture is not a step the capture refuses:
    it must not be left outside the graphs for good (it would run there, eagerly, through the
    default pool's cached memory); the recording stops and the plan runs step by step."""
    cp = emulated_cupy
    dev = fake_cupy.device()
    b = Builder()
    x = b.input("x", "float64", (64, 64))
    y = b.bind("exp", b.bind("sin", x))
    graph = b.build([("z", b.bind("reduce_sum", b.bind("mul", y, x), axes=(0, 1), keepdims=False)), ("y", y)])
    feed = {"x": np.random.default_rng(0).standard_normal((64, 64))}
    plan = Plan(graph, kernels=gpu.GpuKernels(fuse=False))
    want = Plan(graph).run(feed)
    check(cp, plan.run(feed), want, "eager")  # its intermediates stay cached in the default pool
    dev.capacity = dev.in_use + 64 * 64 * 8  # room for the static input only
    check(cp, plan.run(feed), want, "recording")
    dev.capacity = None
    for call in range(2):
        check(cp, plan.run(feed), want, f"call {call}")
    info = plan.kernel_info()
    assert info["cuda_graph"].startswith("eager: device memory ran short while recording"), info
    assert info["steps_outside_graphs"] == 0


@pytest.mark.parametrize("slack", [0, 4096], ids=["pool-shrinks", "pool-grows"])
def test_memory_running_short_while_recording_stops_it(emulated_cupy, slack) -> None:
    """cudaMalloc failing during a capture makes CuPy's pool free all its free blocks, among
    them an intermediate the first graph of the same recording writes at every replay, and the
    device then gives that address to anything. The recording notices (its pool holds less than
    it got from the device, also when it grew again after) and the plan runs step by step for
    good: no replay writes into memory another array owns."""
    cp = emulated_cupy
    dev = fake_cupy.device()
    graph, feed = pressure_graph()
    kernels = gpu.GpuKernels(fuse=False)
    squeezed = []

    def matmul(a, b, out=None):  # between the two graphs of the recording: the device fills up
        result = cp.matmul(a, b, out=out)
        s = cp.cuda.get_current_stream()
        if s is not cp.cuda.Stream.null and not s.is_capturing() and not squeezed:
            dev.capacity = dev.in_use + slack
            squeezed.append(dev.capacity)
        return result

    kernels.table["matmul"] = matmul
    plan = Plan(graph, kernels=kernels)
    want = Plan(graph).run(feed)
    for call in ("eager", "recording"):
        check(cp, plan.run(feed), want, call)
    assert squeezed
    dev.capacity = None
    mine = cp.cuda.Stream(non_blocking=True)
    with mine:  # new arrays, each on memory the device had freed while it had any
        others = []
        while dev.released:
            others.append(cp.zeros(64))
    mine.synchronize()
    for call in range(2):
        check(cp, plan.run(feed), want, f"call {call}")
    with mine:
        assert all(not np.any(cp.asnumpy(o)) for o in others), "a replay wrote into another array"
    info = plan.kernel_info()
    assert info["cuda_graph"].startswith("eager: device memory ran short while recording"), info
    assert info["cuda_graphs"] == info["cuda_graph_bytes"] == 0


@pytest.mark.parametrize("graphs", [True, False], ids=["replayed", "eager"])
def test_device_results_belong_to_the_callers_stream(emulated_cupy, graphs) -> None:
    """Device-resident results are made on the caller's stream, as an eager call makes them:
    a caller that reads one on its stream and drops it before that work ran leaves its memory
    to its own stream's next allocations, not to the next call's on the graphs' stream. And a
    call from another stream does not write the graphs' static buffers before the copies of the
    last call's results out of them ran."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=False, graphs=graphs))
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    feeds = [varied(feed, k) for k in range(6)]
    kept = []
    for k, f in enumerate(feeds):
        with streams[k % 2]:
            got = plan.run({"x": cp.asarray(f["x"])})
            kept.append({name: v * 2.0 for name, v in got.items()})  # work on the caller's stream reading the results
            del got  # dropped before that work ran
    assert plan.kernel_info().get("cuda_graph_calls", 0) == (len(feeds) - 1 if graphs else 0)  # all but the first
    for s in streams:
        s.synchronize()
    for f, doubled in zip(feeds, kept, strict=True):
        check(cp, {name: cp.asnumpy(v) / 2.0 for name, v in doubled.items()}, Plan(graph).run(f))


def test_errors_of_the_graph_machinery_make_the_plan_run_eagerly(emulated_cupy, monkeypatch) -> None:
    """A capture that cannot begin, or a graph that cannot be launched, is the machinery's
    failure, not the plan's: the call runs step by step, and so does every later one, saying
    why. A step's own error still reaches the caller (recorded again at the next call)."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    want = Plan(graph).run(feed)

    def refused(self, mode=None):
        raise RuntimeError("cudaErrorNotSupported: operation not supported")

    with monkeypatch.context() as m:
        m.setattr(fake_cupy.Stream, "begin_capture", refused)
        plan = Plan(graph, kernels=gpu.GpuKernels())
        for k in range(3):
            got, did = counted(plan.run, feed)
            check(cp, got, want, f"call {k}")
        assert did["recorded"] == did["launches"] == 0
    assert plan.kernel_info()["cuda_graph"] == ("eager: the CUDA graph machinery failed while recording (RuntimeError: "
                                                "cudaErrorNotSupported: operation not supported)")

    plan = Plan(graph, kernels=gpu.GpuKernels())
    for _ in range(2):
        plan.run(feed)
    assert plan.kernel_info()["cuda_graph"].startswith("captured: ")
    with monkeypatch.context() as m:
        m.setattr(fake_cupy.Graph, "launch", lambda self, stream=None: refused(self))
        for k in range(2):
            got, did = counted(plan.run, feed)
            check(cp, got, want, f"call {k}")
    assert did["launches"] == 0 and plan.kernel_info()["cuda_graph"].startswith(
        "eager: the CUDA graph machinery failed while replaying (RuntimeError: cudaErrorNotSupported")
    assert plan.kernel_info()["cuda_graphs"] == 0

    kernels = gpu.GpuKernels(fuse=False)
    exp = kernels.table["exp"]

    def picky_exp(x, out=None):  # a step's own error, on some inputs
        if x.shape == (8, 5) and float(cp.asnumpy(x).min()) < -40:
            raise ValueError("exp refuses such small values")
        return exp(x, out=out)

    kernels.table["exp"] = picky_exp
    plan = Plan(graph, kernels=kernels)
    check(cp, plan.run(feed), want)
    with pytest.raises(GraphError, match=r"ValueError while running .*exp refuses"):
        plan.run({"x": feed["x"] * 100.0})
    assert plan.kernel_info()["cuda_graph"].startswith("not recorded yet")
    for _ in range(2):
        check(cp, plan.run(feed), want)
    assert plan.kernel_info()["cuda_graph"].startswith("captured: ")


def test_a_call_inside_the_callers_own_capture_runs_into_it(emulated_cupy) -> None:
    """A caller capturing its own CUDA graph on its stream that calls a plan: the call runs
    step by step on that stream, into the caller's capture (the graphs' stream stays out of
    it, so the caller's capture ends cleanly), and the caller's graph computes the plan. Calls
    after it record and replay as usual."""
    cp = emulated_cupy
    graph, feed = softmax_graph()
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=False))
    mine = cp.cuda.Stream(non_blocking=True)
    pool = cp.cuda.MemoryPool()
    with mine:
        x = cp.asarray(feed["x"])
        check(cp, plan.run({"x": x}), Plan(graph).run(feed), "eager")
        with cp.cuda.using_allocator(pool.malloc):
            mine.begin_capture()
            captured = plan.run({"x": x})
            g = mine.end_capture()
        for k in range(2):
            f = varied(feed, k)
            x[...] = cp.asarray(f["x"])
            g.launch(stream=mine)
            check(cp, captured, Plan(graph).run(f), f"the caller's graph, launch {k}")
        assert plan.kernel_info()["cuda_graph"].startswith("not recorded yet")
        for k in range(3):
            f = varied(feed, 10 + k)
            check(cp, plan.run({"x": cp.asarray(f["x"])}), Plan(graph).run(f), f"call {k}")
    assert plan.kernel_info()["cuda_graph_calls"] == 3


def test_the_engine_charges_recorded_graphs_to_its_cache(emulated_cupy) -> None:
    """A plan's CUDA graphs hold device memory from its second call on (static buffers, their
    pool): the engine's cache charges the plan for them once recorded, so past its budget the
    least recently used plans go, and with them their graphs and memory."""
    cp = emulated_cupy
    rng = np.random.default_rng(4)
    cases = []
    for k in range(4):  # four gradient graphs of their own shapes
        x, w = rng.standard_normal(24 + k), rng.standard_normal((16, 24 + k))
        cases.append((gs.trace(lambda x, w: gs.sum(gs.tanh(w @ x) ** 2) + gs.sum(gs.exp(-x)), x, w), {"x": x, "w": w}))

    def run_all(engine):
        plans = []
        for g, feed in cases:
            for k in range(3):  # step by step, recorded, replayed
                f = varied(feed, k)
                got = engine.vjp(g, f, ["x", "w"])
                want = Engine().vjp(g, f, ["x", "w"])
                for a, b in zip(got, want, strict=True):
                    check(cp, a, b)
            plans.append(next(reversed(engine._plans.values())))
        return plans

    sizes = [(footprint.plan_bytes(p), p.kernel_info()["cuda_graph_bytes"]) for p in run_all(Engine(kernels="gpu"))]
    assert all(held > 0 for _, held in sizes)
    budget = sum(est for est, _ in sizes) + max(held for _, held in sizes)  # every plan, not every plan's graphs
    engine = Engine(kernels="gpu", max_cache_bytes=budget)
    gc.disable()  # what goes must go by reference counting, as soon as it goes
    try:
        refs = [weakref.ref(p) for p in run_all(engine)]
        kept = list(engine._plans.values())
        info = engine.cache_info()
        assert info.nbytes == sum(footprint.plan_bytes(p) + p.kernel_info()["cuda_graph_bytes"] for p in kept)
        assert info.nbytes <= budget and 0 < len(kept) < len(cases), (info.nbytes, budget, len(kept))
        assert sum(r() is None for r in refs) == len(cases) - len(kept)
        assert len(fake_cupy._graphs) == sum(p.kernel_info()["cuda_graphs"] for p in kept)
    finally:
        gc.enable()


def test_a_compiled_gradient_holds_its_plan_through_the_cache(emulated_cupy) -> None:
    """The SDK's compiled `grad` keeps the plan the engine cached for it weakly: once the cache
    drops it (another plan came, the budget is one plan), the plan and its CUDA graphs go, and
    the next call plans again."""
    cp = emulated_cupy
    engine = Engine(kernels="gpu", max_cache_bytes=1)  # only the entry used last stays
    fn = Functional(engine)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(6), rng.standard_normal((4, 6))
    df = fn.grad(lambda x, w: gs.sum(gs.tanh(w @ x) ** 2), argnums=(0, 1))
    dg = fn.grad(lambda x, w: gs.sum(gs.exp(-(w @ x))), argnums=(0, 1))
    want_f = gs.grad(lambda x, w: gs.sum(gs.tanh(w @ x) ** 2), argnums=(0, 1))(x, w)
    gc.disable()  # what goes must go by reference counting
    try:
        for _ in range(3):
            check(cp, dict(enumerate(df(x, w))), dict(enumerate(want_f)))
        (plan_f,) = engine._plans.values()
        assert plan_f.kernel_info()["cuda_graph_calls"] == 2
        kept, plan_f = weakref.ref(plan_f), None
        for _ in range(3):
            dg(x, w)
        assert kept() is None and len(engine._plans) == 1
        misses = engine.cache_info().misses
        check(cp, dict(enumerate(df(x, w))), dict(enumerate(want_f)))
        assert engine.cache_info().misses == misses + 1
    finally:
        gc.enable()


def test_the_server_with_gpu_kernels_replays_graphs(emulated_cupy, serve_in_process) -> None:
    """`gradserve serve --kernels gpu`: the server's engine plans with GpuKernels, graphs on, and
    its calls after the first two replay them."""
    cp = emulated_cupy
    server = serve_in_process(kernels="gpu")
    engine = server.engine.engine  # the in-process Engine under the server's scheduler
    assert engine.kernels.name == "gpu" and engine.kernels.graphs
    assert engine.cache_info().kernels.endswith("calls replay CUDA graphs")
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(6), rng.standard_normal((4, 6))
    g = gs.trace(lambda x, w: gs.sum(gs.tanh(w @ x) ** 2) + gs.sum(gs.exp(-x)), x, w)
    with gs.connect(f"127.0.0.1:{server.port}") as remote:
        gid = remote.register(g)
        for k in range(4):
            inputs = {"x": x, "w": w + 0.1 * k}
            want_out, want_grads = Engine().vjp(g, inputs, ["x", "w"])
            got = remote.gradient(gid, inputs, wrt=["x", "w"])
            check(cp, got.grads, want_grads, f"call {k}")
            check(cp, got.outputs, want_out, f"call {k}")
    infos = [p.kernel_info() for p in engine._plans.values()]
    assert any(i["cuda_graph"].startswith("captured: ") and i["cuda_graph_calls"] == 3 for i in infos), infos


def gpu_bench():
    """bench/gpu_mlp.py as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_mlp.py"
    spec = importlib.util.spec_from_file_location("gpu_mlp", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_gpu_benchmark_script_runs_on_the_stand_in(emulated_cupy, tmp_path, capsys) -> None:
    """bench/gpu_mlp.py end to end at a small batch (PyTorch CUDA absent here: gradserve's
    contenders only, step by step and replayed)."""
    script = gpu_bench()
    rc = script.main(["--batch", "64", "--repeat", "2", "--block", "2", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("gradserve GPU vs CPU", "# gradserve CUDA graphs: captured: ", "# device-resident: median ms:",
                "# with transfers: median ms:"):
        assert row in out, out
    assert "gradserve eager" in out and "gradserve graphs" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["device-resident"]) == set(result["with transfers"]) == {"gradserve eager", "gradserve graphs"}


# ---------------------------------------------------------------- on a device


@needs_device
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_mlp_gradient_matches_numpy(dtype) -> None:
    graph, feed = mlp_grad_graph(dtype)
    plan = Plan(graph, kernels=gpu.GpuKernels(graphs=False))
    assert plan.groups
    want = Plan(graph).run(feed)
    tol = {"float32": 1e-4, "float64": 1e-10}[dtype]
    for name, value in plan.run(feed).items():
        np.testing.assert_allclose(value, want[name], rtol=tol, atol=tol, err_msg=name)


@needs_device
def test_gpu_every_elementwise_primitive() -> None:
    ks = gpu.GpuKernels(graphs=False)
    for dtype, shape in TABLE_CASES:
        graph, feed, cases = elementwise_table_graph(dtype, shape)
        if not cases:
            continue
        got = Plan(graph, kernels=ks).run(feed)
        want = Plan(graph).run(feed)
        for s, name, _ in cases:
            w = np.asarray(want[name])
            tol = 1e-4 if w.dtype == np.float32 else 1e-11
            if w.dtype.kind == "f":
                np.testing.assert_allclose(got[name], w, rtol=tol, atol=tol, err_msg=f"{s.name} {dtype}")
            else:
                np.testing.assert_array_equal(got[name], w, err_msg=f"{s.name} {dtype}")


@needs_device
@pytest.mark.parametrize("to_host", [True, False], ids=["host", "device"])
def test_gpu_cuda_graphs_replay_on_the_device(to_host) -> None:
    """The MLP gradient replayed from real CUDA graphs: results of calls with different inputs
    against numpy, device-resident results kept across calls, matmuls outside the graphs."""
    import cupy as cp

    graph, feed = mlp_grad_graph("float64")
    plan = Plan(graph, kernels=gpu.GpuKernels(to_host=to_host))
    feeds = [varied(feed, k) for k in range(5)]
    got = [plan.run(f) for f in feeds]
    info = plan.kernel_info()
    assert info["cuda_graph"].startswith("captured: ") and info["cuda_graph_calls"] == 4, info
    for k, (f, g) in enumerate(zip(feeds, got, strict=True)):
        want = Plan(graph).run(f)
        for name, w in want.items():
            np.testing.assert_allclose(host(cp, g[name]), w, rtol=1e-10, atol=1e-10, err_msg=f"call {k} {name}")


def test_gpu_benchmark_checks_every_contenders_gradients(emulated_cupy, monkeypatch, tmp_path, capsys) -> None:
    """PyTorch's contenders are checked against the CPU plan as gradserve's are, the replayed
    and with-transfers ones included: one that is off makes the script exit 1. (PyTorch CUDA is
    absent here: contenders giving the CPU plan's gradients, one of them off, stand in for it.)"""
    import torch

    script = gpu_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def add_torch(torch_, params, x, y, steps, transfer_steps):
        graph, feed = script.grad_graph(len(x))
        res = Plan(graph).run(feed)
        grads = [res[GRAD + f"params.{n}"] for n in script.NAMES]
        steps["pytorch eager"] = steps["pytorch graphs"] = lambda: tuple(torch.from_numpy(g) for g in grads)
        transfer_steps["pytorch eager"] = lambda: list(grads)
        transfer_steps["pytorch graphs"] = lambda: [g * 1.01 for g in grads]  # a replay gone wrong
        return grads

    monkeypatch.setattr(script, "add_torch", add_torch)
    rc = script.main(["--batch", "32", "--repeat", "2", "--block", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "MISMATCH" in out, out
    checked = json.loads((tmp_path / "r.json").read_text())["grad_check"]
    names = ("gradserve eager", "gradserve graphs", "pytorch eager", "pytorch graphs")
    assert set(checked) >= {f"{n}{label} vs CPU" for n in names for label in ("", " with transfers")}, checked
    assert [k for k, v in checked.items() if v > 1e-3] == ["pytorch graphs with transfers vs CPU"], checked
