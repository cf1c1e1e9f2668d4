"""Memory the server keeps between calls is bounded, and counted for what it keeps alive:

  1. a residual session is charged for the buffers its values keep alive (a small view of a
     large intermediate is copied out; a broadcast view counts the buffer under it);
  2. residual sessions are bounded in number (least recently used released), and expiring
     them costs O(log n) per call, not a scan of every session.

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
from service_fixtures import HOST, channel, fill, stub

import gradserve as gs
from gradserve import remote as rm
from gradserve_engine.backend import Residuals
from gradserve_engine.engine import Engine
from gradserve_engine.errors import LimitError, NotFound
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import emit as e
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server import registry as registry_module
from gradserve_server.registry import ResidualStore

MiB = 1 << 20
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _retained(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` and the bytes still allocated once it returned (what it keeps, its result included)."""
    gc.collect()
    tracemalloc.start()
    try:
        value = fn()
        gc.collect()
        return value, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


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


def test_a_small_view_of_a_large_intermediate_is_copied_out_and_charged_its_bytes():
    graph = _view_of_intermediate(stop=1)
    engine = Engine()
    _open(graph, engine)  # plans built and cached: what follows keeps only the session's values
    kept, held = _retained(lambda: _open(graph, engine))
    assert kept.nbytes == 8, kept.nbytes
    assert held < 64 * 1024, f"a session charged {kept.nbytes} bytes keeps {held} bytes alive"  # not the 512 KiB
    (value,) = kept.values.values()
    assert value.base is None and value.tolist() == [1.0]  # exp(0), its own copy
    grads = engine.call_vjp(kept, {"out": 2.0})
    assert grads["w"].tolist() == [2.0]


def test_a_view_of_most_of_its_buffer_stays_a_view_charged_the_whole_buffer():
    kept = _open(_view_of_intermediate(stop=3 * N // 4))
    (value,) = kept.values.values()
    assert value.shape == (3 * N // 4,) and value.base is not None  # copying would save little
    assert kept.nbytes == 8 * N  # what it keeps alive: exp(x), whole
    quarter = _open(_view_of_intermediate(stop=N // 4))
    (value,) = quarter.values.values()
    assert value.base is None and quarter.nbytes == 8 * N // 4  # a quarter: copied out


def test_a_broadcast_view_is_charged_the_buffer_under_it_not_its_broadcast_shape():
    kept = _open(_view_of_intermediate(broadcast=True))
    (value,) = kept.values.values()
    assert value.shape == (1000, 3) and 0 in value.strides  # still the view: nothing was copied
    assert kept.nbytes == 3 * 8  # exp(x[:3]), not 1000 * 3 * 8


def test_sessions_under_the_residual_budget_keep_no_more_than_it(serve_in_process):
    """Six sessions each reporting 8 bytes once kept six whole intermediates alive; now what they
    keep alive is within the budget (and what they report)."""
    server = serve_in_process(residual_bytes=1 * MiB)
    graph = _view_of_intermediate(stop=1)
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=10)
        for _ in range(6):
            req = pb.OpenVjpRequest(graph_id=graph.id, wrt=["w"])
            fill(req.inputs, {"x": np.linspace(0.0, 1.0, N), "w": np.ones(1)})
            assert st.OpenVjp(req, timeout=20).residual_bytes == 8
    sessions = list(server.residuals._sessions.values())
    assert len(sessions) == 6
    for s in sessions:
        for value in s.residuals.values.values():
            owner = value
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            assert owner.base is None and owner.nbytes <= s.nbytes == 8, (owner.nbytes, s.nbytes)


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
