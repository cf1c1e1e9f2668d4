"""Faults: workers killed mid-call, clients that go away, deadlines shorter than the work."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from service_fixtures import ServerProcess, channel, fill, metric, parse_metrics, scrape, stub

import gradserve as gs
from gradserve_engine.engine import Engine
from gradserve_engine.pool import Task
from gradserve_engine.scheduler import DistributedEngine, Policy
from gradserve_engine.v1 import service_pb2 as pb

rng = np.random.default_rng(0)


def chain(x, w):
    for _ in range(40):
        x = gs.tanh(x @ w)
    return gs.sum(x)


X, W = rng.standard_normal((400, 400)) / 20, rng.standard_normal((400, 400)) / 20
CHAIN = gs.trace(chain, X, W)


def mlp_loss(p, X, y):
    return gs.cross_entropy(gs.tanh(X @ p["w1"]) @ p["w2"], y)


P = {"w1": rng.standard_normal((30, 64)) * 0.2, "w2": rng.standard_normal((64, 5)) * 0.2}
XS, YS = rng.standard_normal((4000, 30)), rng.integers(0, 5, 4000)
MLP = gs.trace(mlp_loss, P, XS, YS)
MLP_INPUTS = {"p.w1": P["w1"], "p.w2": P["w2"], "X": XS, "y": YS}


@pytest.mark.ray
def test_worker_killed_during_a_data_parallel_call(ray_pool):
    engine = DistributedEngine(Engine(), ray_pool, Policy(local_cores=1, cluster_cores=2))
    _, want = Engine().vjp(MLP, MLP_INPUTS, ["p.w1", "p.w2"])
    engine.vjp(MLP, MLP_INPUTS, ["p.w1", "p.w2"], batch_axes={"X": 0, "y": 0}, mode="data_parallel")  # warm
    victim = ray_pool.pids()[1]
    before = ray_pool.replaced
    killer = threading.Timer(0.05, os.kill, (victim, signal.SIGKILL))
    killer.start()
    for _ in range(5):  # the kill lands during one of these; every one must be right
        _, got = engine.vjp(MLP, MLP_INPUTS, ["p.w1", "p.w2"], batch_axes={"X": 0, "y": 0}, mode="data_parallel")
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)
    killer.join()
    assert ray_pool.replaced == before + 1 and victim not in ray_pool.pids()


@pytest.mark.ray
def test_a_worker_task_failure_leaves_the_worker_serving(ray_pool):
    with pytest.raises(gs.GraphError):
        ray_pool.get([ray_pool.submit(Task(MLP, "evaluate", {"X": XS}, {}))], time.monotonic() + 60)
    assert len(ray_pool.pids()) == 2


def _slow_call(address: str, timeout: float) -> grpc.Future:
    st = stub(channel(address))
    st.RegisterGraph(pb.RegisterGraphRequest(graph=CHAIN.to_proto()))
    req = pb.GradientRequest(graph_id=CHAIN.id, wrt=["w"])
    fill(req.inputs, {"x": X, "w": W})
    return st.Gradient.future(req, timeout=timeout)


def _inflight(port: int) -> float:
    return metric(parse_metrics(scrape(port)), "gradserve_inflight_requests")


def test_client_that_disconnects_mid_call_frees_the_work():
    with ServerProcess("--metrics-port", "0") as server:
        call = _slow_call(server.address, 60)
        deadline = time.monotonic() + 10
        while _inflight(server.metrics_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _inflight(server.metrics_port) == 1
        call.cancel()  # the client goes away
        t = time.monotonic()
        while _inflight(server.metrics_port) > 0 and time.monotonic() - t < 5:
            time.sleep(0.01)
        freed = time.monotonic() - t
        assert _inflight(server.metrics_port) == 0
        assert freed < 1.0  # stopped between kernels, not after the 80 kernels of the whole call
        cancelled = metric(parse_metrics(scrape(server.metrics_port)), "gradserve_requests_total",
                           method="Gradient", code="CANCELLED")
        assert cancelled == 1


def test_deadline_shorter_than_the_work_stops_within_a_kernel():
    with ServerProcess("--metrics-port", "0") as server:
        full = time.monotonic()
        _slow_call(server.address, 60).result()
        full = time.monotonic() - full
        t = time.monotonic()
        call = _slow_call(server.address, full / 10)
        with pytest.raises(grpc.RpcError) as e:
            call.result()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while _inflight(server.metrics_port) > 0 and time.monotonic() - t < 5:
            time.sleep(0.005)
        assert time.monotonic() - t < full / 10 + full / 8  # the server stopped soon after the deadline
        assert metric(parse_metrics(scrape(server.metrics_port)), "gradserve_requests_total", method="Gradient",
                      code="DEADLINE_EXCEEDED") == 1
