"""`gradserve serve --processes 2`: two server processes on one port. Connections spread over
both; graphs and jobs are shared through the store; a vjp session stays in its process and a
call that reaches the other is told where it lives; metrics come from both, labelled; a process
that dies is started again; SIGTERM drains both."""

from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest
from service_fixtures import ServerProcess, fill, metric, parse_metrics, scrape, wait_until

import gradserve as gs
from gradserve_engine.ir import tensor_from_proto
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_engine.v1 import service_pb2_grpc

X = np.linspace(0.1, 1.0, 5)


def f(x, y):
    return gs.sum(gs.sin(x) * y)


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, whichever of its threads started them."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out += [int(c) for c in fh.read().split()]
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def stubs(address: str, n: int) -> list[tuple[grpc.Channel, service_pb2_grpc.GradientServiceStub]]:
    """`n` channels with connections of their own (as `n` client processes would have)."""
    out = []
    for _ in range(n):
        ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        out.append((ch, service_pb2_grpc.GradientServiceStub(ch)))
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    with ServerProcess("--processes", "2", "--metrics-port", "0") as s:
        assert "(2 processes)" in s.first_line
        yield s


def test_connections_spread_over_both_processes_and_graphs_are_shared(two):
    graph = gs.trace(f, X, X)
    conns = stubs(two.address, 16)
    try:
        conns[0][1].RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=30)
        for _, st in conns:  # no other RegisterGraph: every process reads the graph from the shared store
            req = pb.EvaluateRequest(graph_id=graph.id)
            fill(req.inputs, {"x": X, "y": X})
            out = tensor_from_proto(st.Evaluate(req, timeout=30).outputs["out"])
            np.testing.assert_allclose(out, np.sum(np.sin(X) * X), rtol=1e-12)
    finally:
        for ch, _ in conns:
            ch.close()
    samples = parse_metrics(scrape(two.metrics_port))
    per_process = [metric(samples, "gradserve_requests_total", method="Evaluate", code="OK", process=p) for p in "01"]
    assert sum(per_process) == 16 and min(per_process) > 0, per_process  # 2 x (1/2)**16: never all on one


def test_a_vjp_session_stays_in_its_process_and_other_processes_say_where_it_lives(two):
    with gs.connect(two.address) as remote:
        _, vjp_fn = remote.vjp(f, X, X)
        for _ in range(3):  # the session's own connection: always its process
            gx, _ = vjp_fn(1.0)
            np.testing.assert_allclose(gx, np.cos(X) * X, rtol=1e-12)
        handle = vjp_fn.handle
        conns = stubs(two.address, 16)
        try:
            answers = []
            for _, st in conns:
                req = pb.CallVjpRequest(handle=handle)
                fill(req.cotangents, {"out": np.float64(1.0)})
                try:
                    st.CallVjp(req, timeout=30)
                    answers.append("ok")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND and "lives in server process" in e.details(), e.details()
                    answers.append("elsewhere")
            assert set(answers) == {"ok", "elsewhere"}, answers
        finally:
            for ch, _ in conns:
                ch.close()
        vjp_fn.close()


def test_jobs_run_once_and_any_process_answers_for_them(two):
    with gs.connect(two.address) as a:
        job = a.minimize(lambda w, x: gs.sum((w - x) ** 2), np.zeros(3), args=(np.arange(3.0),),
                         optimizer=gs.optim.SGD(lr=0.1), steps=50)
        job_id = job.id
    for _ in range(4):  # sessions of their own: some reach the other process
        with gs.connect(two.address) as b:
            res = b.job(job_id).wait(timeout=60).result()
            np.testing.assert_allclose(res.x["w"] if isinstance(res.x, dict) else res.x, np.arange(3.0), atol=1e-3)


def test_a_process_that_dies_is_started_again(two):
    first = children(two.proc.pid)
    assert len(first) == 2
    os.kill(first[1], signal.SIGKILL)
    assert wait_until(lambda: len(children(two.proc.pid)) == 2 and first[1] not in children(two.proc.pid), timeout=60)
    with gs.connect(two.address) as r:
        np.testing.assert_allclose(r.grad(f)(X, X), np.cos(X) * X, rtol=1e-12)


def test_sigterm_drains_every_process():
    s = ServerProcess("--processes", "2", "--grace", "2")
    try:
        kids = children(s.proc.pid)
        assert len(kids) == 2
        with gs.connect(s.address) as r:
            r.grad(f)(X, X)
        assert s.stop(timeout=30) == 0
        assert not any(alive(k) for k in kids)
    finally:
        s.close()


def test_processes_with_ray_is_refused():
    with pytest.raises(RuntimeError, match="Ray"):
        ServerProcess("--processes", "2", "--ray")
