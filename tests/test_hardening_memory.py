"""Memory the server keeps between calls is bounded, and counted for what it keeps alive:

  1. a residual session is charged for the buffers its values keep alive (a small view of a
     large intermediate is copied out; a broadcast view counts the buffer under it);
  2. residual sessions are bounded in number (least recently used released), and expiring
     them costs O(log n) per call, not a scan of every session;
  3. the engine's plans, derived graphs and the scheduler's analyses are bounded by their
     estimated bytes, and the estimate is within a factor of 2 of what tracemalloc sees;
  4. running out of memory anywhere in a call — a kernel, building a plan, encoding or
     serialising the answer — is RESOURCE_EXHAUSTED over the wire.

Byte counts, operation counts and a fake clock: nothing here depends on timing.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from service_fixtures import HOST, channel, fill, rpc_error, stub

import gradserve as gs
from gradserve import remote as rm
from gradserve_engine import buffers, footprint
from gradserve_engine import engine as engine_module
from gradserve_engine.autodiff import vjp_graph
from gradserve_engine.backend import Residuals
from gradserve_engine.engine import Engine
from gradserve_engine.errors import LimitError, NotFound
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import KERNELS
from gradserve_engine.ops import emit as e
from gradserve_engine.partition import partition
from gradserve_engine.passes import optimize
from gradserve_engine.plan import Plan
from gradserve_engine.pool import LocalPool
from gradserve_engine.scheduler import DistributedEngine, Policy
from gradserve_engine.shard import analyze
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server import registry as registry_module
from gradserve_server import servicer as servicer_module
from gradserve_server.registry import ResidualStore

MiB = 1 << 20
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _retained(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` and the bytes still allocated once it returned (what it keeps, its result included;
    not the free buffers the recycler keeps for the next call, which belong to no one)."""
    gc.collect()
    tracemalloc.start()
    try:
        value = fn()
        gc.collect()
        buffers.RECYCLER.clear()
        return value, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _within_2x(estimate: int, real: int, what: str) -> None:
    assert real / 2 <= estimate <= 2 * real, f"{what}: estimated {estimate} bytes, tracemalloc saw {real}"


def _chain(n: int, shape: tuple[int, ...] = (3,)) -> Graph:
    b = Builder()
    x = b.input("x", "float64", shape)
    y = x
    for k in range(n):
        y = e.bind(("sin", "cos", "exp")[k % 3], y)
        if k % 5 == 0:
            y = e.mul(y, x)
    return b.build([("out", e.bind("reduce_sum", y, axes=tuple(range(len(shape))), keepdims=False))])


# ---------------------------------------------------------------- 1. residuals: what they keep alive

N = 1 << 16  # f64[N]: 512 KiB


def _view_of_intermediate(stop: int | None = None, broadcast: bool = False) -> Graph:
    """out = sum(y * w), differentiated w.r.t. w only: the backward pass reads y, which is a view
    of a larger intermediate — a slice of exp(x) (f64[N]), or a broadcast of exp(x[:3])."""
    b = Builder()
    x = b.input("x", "float64", (N,))
    if broadcast:
        y = e.broadcast_to(e.bind("exp", e.bind("slice", x, starts=(0,), stops=(3,), steps=(1,))), (1000, 3))
    else:
        y = e.bind("slice", e.bind("exp", x), starts=(0,), stops=(stop,), steps=(1,))
    w = b.input("w", "float64", y.shape)
    total = e.bind("reduce_sum", e.mul(y, w), axes=tuple(range(len(y.shape))), keepdims=False)
    return b.build([("out", total)])


def _open(graph: Graph, engine: Engine | None = None) -> Residuals:
    inputs = {"x": np.linspace(0.0, 1.0, N), "w": np.ones(graph.input("w").shape)}
    return (engine or Engine()).open_vjp(graph, inputs, ["w"])[1]


def _overhead(graph: Graph, values: int) -> int:
    """What a session is charged besides the buffers under its values: their array objects, its graph."""
    return footprint.ARRAY_BYTES * values + footprint.graph_bytes(graph)


def test_a_small_view_of_a_large_intermediate_is_copied_out_and_charged_its_bytes():
    graph = _view_of_intermediate(stop=1)
    engine = Engine()
    _open(graph, engine)  # plans built and cached: what follows keeps only the session's values
    kept, held = _retained(lambda: _open(graph, engine))
    assert kept.nbytes - _overhead(graph, 1) == 8, kept.nbytes  # the value's 8 bytes
    assert held < 64 * 1024, f"a session charged {kept.nbytes} bytes keeps {held} bytes alive"  # not the 512 KiB
    (value,) = kept.values.values()
    assert value.base is None and value.tolist() == [1.0]  # exp(0), its own copy
    grads = engine.call_vjp(kept, {"out": 2.0})
    assert grads["w"].tolist() == [2.0]


def test_a_view_of_most_of_its_buffer_stays_a_view_charged_the_whole_buffer():
    graph = _view_of_intermediate(stop=3 * N // 4)
    kept = _open(graph)
    (value,) = kept.values.values()
    assert value.shape == (3 * N // 4,) and value.base is not None  # copying would save little
    assert kept.nbytes - _overhead(graph, 1) == 8 * N  # what it keeps alive: exp(x), whole
    graph = _view_of_intermediate(stop=N // 4)
    quarter = _open(graph)
    (value,) = quarter.values.values()
    assert value.base is None and quarter.nbytes - _overhead(graph, 1) == 8 * N // 4  # copied out


def test_a_broadcast_view_is_charged_the_buffer_under_it_not_its_broadcast_shape():
    graph = _view_of_intermediate(broadcast=True)
    kept = _open(graph)
    (value,) = kept.values.values()
    assert value.shape == (1000, 3) and 0 in value.strides  # still the view: nothing was copied
    assert kept.nbytes - _overhead(graph, 1) == 3 * 8  # exp(x[:3]), not 1000 * 3 * 8


def test_sessions_under_the_residual_budget_keep_no_more_than_it(serve_in_process):
    """Six sessions each reporting 8 bytes once kept six whole intermediates alive; now what they
    keep alive is what they report, within the budget."""
    server = serve_in_process(residual_bytes=1 * MiB)
    graph = _view_of_intermediate(stop=1)
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=10)
        for _ in range(6):
            req = pb.OpenVjpRequest(graph_id=graph.id, wrt=["w"])
            fill(req.inputs, {"x": np.linspace(0.0, 1.0, N), "w": np.ones(1)})
            assert st.OpenVjp(req, timeout=20).residual_bytes == 8 + _overhead(graph, 1)
    sessions = list(server.residuals._sessions.values())
    assert len(sessions) == 6
    for s in sessions:
        for value in s.residuals.values.values():
            owner = value
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            assert owner.base is None and owner.nbytes == 8, owner.nbytes


def test_a_session_is_charged_for_its_graph_and_its_many_small_values():
    """A session keeps its graph even once the registry dropped it, and each value's array object:
    a session on a large graph with tiny values once held most of its memory uncharged."""
    engine = Engine()
    engine.open_vjp(_chain(600), {"x": np.full(3, 0.5)}, ["x"])  # its plans: kept by the engine, not the session
    kept, real = _retained(lambda: engine.open_vjp(_chain(600), {"x": np.full(3, 0.5)}, ["x"])[1])
    values = sum(v.nbytes for v in kept.values.values())
    assert len(kept.values) > 500 and values < real / 4  # mostly not the values' data
    _within_2x(kept.nbytes, real, "what a session keeps")


# ---------------------------------------------------------------- 2. residual sessions: count and expiry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _nothing() -> Residuals:
    return Residuals(Graph([], [], [], []), (), (), {})


def test_sessions_past_the_count_limit_release_the_least_recently_used():
    store = ResidualStore(1 * MiB, clock=Clock(), max_sessions=3)
    a, b, c = (store.open(_nothing(), 60)[0] for _ in range(3))
    store.get(a)  # a is used: b is now the least recently used
    d, _ = store.open(_nothing(), 60)
    for handle in (a, c, d):
        store.get(handle)
    with pytest.raises(NotFound, match="at most 3 sessions"):
        store.get(b)
    assert store.metrics.get("gradserve_residual_sessions") == 3


def test_a_server_with_a_session_limit_releases_the_oldest(serve_in_process):
    server = serve_in_process(residual_sessions=2)
    with gs.connect(f"{HOST}:{server.port}", timeout=20) as r:
        fns = [r.vjp(lambda x: gs.sum(x * x), np.full(2, float(k)))[1] for k in range(3)]
        with pytest.raises(rm.RemoteNotFound, match="at most 2 sessions"):
            fns[0](1.0)
        for k in (1, 2):
            assert fns[k](1.0)[0].tolist() == [2.0 * k] * 2
        assert len(server.residuals._sessions) == 2


class CountedSession(registry_module.Session):
    """A session that counts how often its expiry time is read: what an expiry pass examines."""

    reads = 0

    def __getattribute__(self, name: str) -> Any:
        if name == "expires":
            CountedSession.reads += 1
        return object.__getattribute__(self, name)


def test_expiry_examines_only_the_sessions_that_are_due(monkeypatch):
    """5000 open sessions once made every call read all 5000 expiry times (45k of them slowed
    every call twelvefold); now a call reads only those due, and each renewal costs one more."""
    monkeypatch.setattr(registry_module, "Session", CountedSession)
    clock = Clock()
    store = ResidualStore(1 * MiB, clock=clock, max_sessions=10_000)
    handles = [store.open(_nothing(), 100.0 + k % 7)[0] for k in range(5000)]  # TTLs of 100 to 106 s
    hot = handles[-1]  # 101 s
    CountedSession.reads = 0
    for _ in range(200):  # calls while nothing is due
        clock.now += 0.1
        store.get(hot)
    assert CountedSession.reads <= 2 * 200, CountedSession.reads
    CountedSession.reads = 0
    clock.now += 95.0  # +115: every session but the renewed one (due at +121) is due
    store.get(hot)
    assert CountedSession.reads <= 2 * 5000 + 10, CountedSession.reads  # each examined once
    assert len(store._sessions) == 1 and store.metrics.get("gradserve_residual_sessions") == 1
    CountedSession.reads = 0
    for _ in range(200):
        clock.now += 1.0
        store.get(hot)
    assert CountedSession.reads <= 2 * 200 + 10, CountedSession.reads


def test_expiry_follows_renewals_and_each_sessions_ttl():
    clock = Clock()
    store = ResidualStore(1 * MiB, clock=clock)
    short, _ = store.open(_nothing(), 10.0)
    long, _ = store.open(_nothing(), 50.0)
    clock.now += 8.0
    store.get(short)  # renewed: due at +18 now
    clock.now += 9.0
    assert store.alive(short) and store.get(short)  # +17: still in; renewed to +27
    clock.now += 10.5
    with pytest.raises(NotFound, match="TTL"):
        store.get(short)
    assert store.alive(long)
    clock.now += 23.0  # +50.5
    with pytest.raises(NotFound, match="TTL"):
        store.get(long)


def test_sessions_gone_early_leave_no_heap_behind():
    store = ResidualStore(1 * MiB, clock=Clock())
    for _ in range(2000):
        handle, _ = store.open(_nothing(), 3600.0)
        assert store.close(handle)
    assert not store._sessions and len(store._due) <= 64 + 1


def test_a_session_over_the_count_limit_of_zero_is_refused():
    store = ResidualStore(1 * MiB, max_sessions=0)
    with pytest.raises(LimitError, match="keeps no residual sessions"):
        store.open(_nothing(), 10.0)


# ---------------------------------------------------------------- 3. caches bounded in bytes


def _transposes(n: int) -> Graph:
    b = Builder()
    y = x = b.input("x", "float64", (2, 3, 4, 5, 6, 7))
    for _ in range(n):
        y = e.bind("sin", e.bind("transpose", y, perm=(1, 2, 3, 4, 5, 0)))
    return b.build([("out", e.bind("reduce_sum", e.mul(y, y), axes=tuple(range(6)), keepdims=False)), ("x", x)])


def _many_inputs(n: int) -> Graph:
    b = Builder()
    xs = [b.input(f"input number {k}", "float64", (4,)) for k in range(n)]
    y = xs[0]
    for x in xs[1:]:
        y = e.add(y, x)
    return b.build([("out", e.bind("reduce_sum", y, axes=(0,), keepdims=False))])


def _many_outputs(n: int) -> Graph:
    b = Builder()
    x = b.input("x", "float64", (40, 4))
    return b.build([(f"output number {k}", e.bind("sin", e.mul(x, x)) if k % 2 else e.bind("cos", x)) for k in range(n)])


def _constants(n: int) -> Graph:
    b = Builder()
    y = b.input("x", "float64", (1000,))
    for k in range(n):
        y = e.mul(y, b.const(np.full(1000, k + 0.5)))
    return b.build([("out", e.bind("reduce_sum", y, axes=(0,), keepdims=False))])


GRAPHS = {"chain": lambda: _chain(250), "rank 6": lambda: _chain(250, (2, 3, 4, 5, 6, 7)),
          "transposes": lambda: _transposes(120), "many inputs": lambda: _many_inputs(250),
          "many outputs": lambda: _many_outputs(250), "constants": lambda: _constants(100)}


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_estimates_of_graphs_and_plans_are_within_2x_of_tracemalloc(kind):
    graph, graph_real = _retained(lambda: optimize(GRAPHS[kind]()))
    _within_2x(footprint.graph_bytes(graph), graph_real, f"{kind} graph")
    plan, plan_real = _retained(lambda: Plan(graph))
    _within_2x(footprint.plan_bytes(plan), graph_real + plan_real, f"{kind} plan")  # a plan owns its graph
    engine = Engine()
    inputs = {i.name: np.full(i.shape, 0.5) for i in graph.inputs}
    _, real = _retained(lambda: engine.evaluate(graph, inputs) and None)
    _within_2x(engine.cache_info().nbytes, real, f"{kind}: what the engine keeps after evaluate")
    if kind in ("chain", "transposes", "many inputs"):
        engine = Engine()
        wrt = [graph.inputs[0].name]
        _, real = _retained(lambda: engine.vjp(graph, inputs, wrt, outputs=["out"]) and None)
        _within_2x(engine.cache_info().nbytes, real, f"{kind}: what the engine keeps after vjp")


def test_estimates_of_what_the_engine_keeps_for_hessians_and_the_scheduler():
    graph = _chain(40)
    engine = Engine()
    _, real = _retained(lambda: engine.hessian(graph, {"x": np.full(3, 0.5)}, ["x"], "out") and None)
    _within_2x(engine.cache_info().nbytes, real, "a Hessian's gradient graph and Jacobian plan")
    batched = _chain(250, (8, 3))
    sharding, real = _retained(lambda: analyze(batched, {"x": 0}))
    _within_2x(footprint.sharding_bytes(sharding), real, "a sharding analysis")
    rng = np.random.default_rng(0)
    branches = gs.trace(lambda ab: sum(gs.sum(gs.tanh(a @ b)) for a, b in ab),
                        [(rng.standard_normal((12, 10)), rng.standard_normal((10, 12))) for _ in range(40)])
    wrt = [i.name for i in branches.inputs]
    parts, real = _retained(lambda: partition(optimize(vjp_graph(branches, wrt)), 3))
    assert parts is not None
    _within_2x(footprint.partition_bytes(parts), real, "a partition")


def test_the_engine_keeps_at_most_its_byte_budget_least_recently_used_first():
    graphs = [_chain(200 + k) for k in range(4)]  # four graphs, four ids
    one = footprint.plan_bytes(Plan(optimize(graphs[0])))
    engine = Engine(max_cache_bytes=int(2.5 * one))  # room for two plans

    def use(k: int) -> None:
        engine.evaluate(graphs[k], {"x": np.full(3, 0.5)})

    use(0)
    use(1)
    use(0)  # 0 is the most recently used
    use(2)  # 1 goes
    info = engine.cache_info()
    assert info.size == 2 and info.nbytes <= info.max_bytes == int(2.5 * one), info
    hits = info.hits
    use(0)
    use(2)
    assert engine.cache_info().hits == hits + 2
    use(1)  # compiled again
    assert engine.cache_info().misses == info.misses + 1
    assert engine.forget(graphs[1].id) == 1 and engine.cache_info().size == 1
    assert engine.cache_info().nbytes == footprint.plan_bytes(next(iter(engine._plans.values())))


def test_hessians_of_many_graphs_keep_no_more_than_the_budget():
    """Each graph's Hessian leaves a gradient graph and a Jacobian plan of several times its
    nodes; without a byte bound every one stayed (512 of each) whatever the memory."""
    graphs = [_chain(10 + k) for k in range(5)]
    one = Engine()
    one.hessian(graphs[0], {"x": np.full(3, 0.5)}, ["x"], "out")
    budget = 2 * one.cache_info().nbytes  # about two graphs' worth
    engine = Engine(max_cache_bytes=budget)

    def run_all() -> None:
        for g in graphs:
            engine.hessian(g, {"x": np.full(3, 0.5)}, ["x"], "out")

    _, real = _retained(run_all)
    info = engine.cache_info()
    assert info.nbytes <= budget, info
    assert real <= 2 * budget, f"the engine keeps {real} bytes under a budget of {budget}"
    assert len(engine._graphs) + len(engine._plans) <= 2 * 2  # the older ones went


def test_what_the_scheduler_derives_is_kept_within_the_engines_budget():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 3))
    pool = LocalPool(2)
    policy = Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3)
    graphs = [_chain(60 + k, (12, 3)) for k in range(5)]
    try:
        one = DistributedEngine(Engine(), pool, policy)
        one.vjp(graphs[0], {"x": x}, ["x"], batch_axes={"x": 0}, mode="data_parallel")
        assert {key[1][0] for key in one.engine._memos} == {"shard", "shard-graph"}
        budget = int(2.5 * one.cache_info().nbytes)  # about two graphs' worth
        dist = DistributedEngine(Engine(max_cache_bytes=budget), pool, policy)
        for g in graphs:
            _, grads = dist.vjp(g, {"x": x}, ["x"], batch_axes={"x": 0}, mode="data_parallel")
            _, want = Engine().vjp(g, {"x": x}, ["x"])
            np.testing.assert_allclose(grads["x"], want["x"], rtol=1e-12, atol=1e-12)
        memos = dist.engine._memos
        assert memos and all(key[0] in {g.id for g in graphs} for key in memos)  # analyses and shard graphs
        info = dist.cache_info()
        assert 0 < info.nbytes <= info.max_bytes == budget
        assert len(memos) <= 2 * 2  # each graph's analysis and shard graph: the older ones went
        last = graphs[-1].id
        assert any(key[0] == last for key in memos)
        dist.forget(last)
        assert not any(key[0] == last for key in memos)
    finally:
        pool.shutdown()


def test_a_compiled_gradient_run_every_round_keeps_its_plan_under_a_tight_budget():
    """The SDK's compiled gradient runs its plan without asking the engine for it; each call
    still marks the plan used, so one-off plans in between are the ones the budget drops, not
    the plan run every round (it was re-planned every few rounds)."""
    from gradserve.api import Functional

    x = np.linspace(0.0, 1.0, 8)
    others = [gs.trace(lambda x, k=k: gs.sum(gs.sin(x) * (k + 1.0)), x) for k in range(12)]
    probe = Engine()
    Functional(probe).grad(lambda x: gs.sum(gs.tanh(x) ** 2))(x)
    probe.evaluate(others[0], {"x": x})
    sizes = [footprint.plan_bytes(p) for p in probe._plans.values()]
    engine = Engine(max_cache_bytes=int(2.5 * max(sizes)))  # the hot plan and one other
    df = Functional(engine).grad(lambda x: gs.sum(gs.tanh(x) ** 2))
    want = df(x)
    misses = engine.cache_info().misses
    for other in others[1:]:
        np.testing.assert_allclose(df(x), want)
        engine.evaluate(other, {"x": x})
    assert engine.cache_info().misses - misses == len(others) - 1  # the one-off evaluations only
    assert len(engine._plans) < len(others)  # the budget did drop plans


def test_the_server_gives_its_engine_the_plan_cache_budget(serve_in_process):
    server = serve_in_process(plan_cache_bytes=3 * MiB)
    assert server.engine.cache_info().max_bytes == 3 * MiB


# ---------------------------------------------------------------- 4. out of memory is RESOURCE_EXHAUSTED


def _out_of_memory(*args: Any, **kwargs: Any) -> Any:
    raise MemoryError("cannot allocate")


@pytest.mark.parametrize("where", ["kernel", "plan build", "encode", "serialise"])
def test_out_of_memory_anywhere_is_resource_exhausted_over_the_wire(serve_in_process, monkeypatch, where):
    server = serve_in_process()
    b = Builder()
    x = b.input("x", "float64", (3,))
    graph = b.build([("out", e.bind("reduce_sum", e.bind("tanh", x), axes=(0,), keepdims=False))])
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=10)
        req = pb.GradientRequest(graph_id=graph.id, wrt=["x"])
        fill(req.inputs, {"x": np.ones(3)})
        if where == "kernel":
            monkeypatch.setitem(KERNELS, "tanh", _out_of_memory)  # read when the plan is built
        elif where == "plan build":
            monkeypatch.setattr(engine_module, "optimize", _out_of_memory)
        elif where == "encode":
            monkeypatch.setattr(servicer_module, "tensor_to_proto", _out_of_memory)
        else:
            original = servicer_module.Servicer._answer
            monkeypatch.setattr(servicer_module.Servicer, "_answer",
                                lambda self, m: _out_of_memory() if isinstance(m, pb.GradientResponse) else original(self, m))
        err = rpc_error(st.Gradient, req, timeout=10)
        assert err.code() == RESOURCE_EXHAUSTED and "out of memory" in err.details(), (where, err.code(), err.details())
        monkeypatch.undo()
        server.engine.forget(graph.id)  # a plan built with the starved kernel goes
        got = st.Gradient(req, timeout=10).grads["x"]
        assert np.allclose(np.frombuffer(got.data, "<f8"), 1.0 - np.tanh(1.0) ** 2)  # the server goes on
