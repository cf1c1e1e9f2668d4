"""Hardening: one request (or one outside process) cannot kill, wedge or bloat the job service.

Each test is a hostile tester's finding: an outside lock on jobs.sqlite; idle WatchJob streams
and waiting CancelJobs taking every server thread; a checkpoint save failing at the memory limit;
a cancel during a long step; job memory and store growth; two servers on one store; SIGTERM
during a long step; an answer over the message limit counted OK; the endpoints the token does
not cover (reflection, /metrics).

Most servers here run in process (`serve_in_process`), so a test can inject a failure or read
the job manager's counts; the shutdown test runs a real `python -m gradserve_server`."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from contextlib import closing

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_fixtures import (
    HOST,
    NOT_SERVING,
    SERVING,
    ServerProcess,
    channel,
    fill,
    health_status,
    metric,
    parse_metrics,
    rpc_error,
    scrape,
    stub,
    wait_until,
)

import gradserve as gs
from gradserve import optim
from gradserve.minimize import FAILED, minimize
from gradserve_engine.engine import Engine
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server import jobs as jobs_module
from gradserve_server.app import Config, MiB, Server
from gradserve_server.cli import build_parser, config_from_args
from gradserve_server.jobs import CANCEL_WAIT, JobManager, JobStore

# ---------------------------------------------------------------- problems

_rng = np.random.default_rng(7)
X = _rng.normal(size=(40, 3))
Y = _rng.normal(size=40)
P0 = {"w": np.zeros(3), "b": np.array(0.0)}


def quad(p, X, y):  # a fast step (well under a millisecond)
    return gs.mean((X @ p["w"] + p["b"] - y) ** 2)


CHAIN_W = _rng.normal(size=(256, 256)) * 0.05
CHAIN_X = _rng.normal(size=(64, 256))


def make_chain(n: int):
    def chain(w, x):  # ~2n kernels a step, n milliseconds or more: a long step that stops between kernels
        for _ in range(n):
            x = gs.tanh(x @ w)
        return gs.mean(x ** 2)
    return chain


class SlowEngine(Engine):
    """An engine whose every gradient first sleeps `delay` seconds: a step that no cancellation stops."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def vjp(self, *args, **kwargs):
        time.sleep(self.delay)
        return super().vjp(*args, **kwargs)


def address(server) -> str:
    return f"{HOST}:{server.port}"


def submit(remote: gs.Session, steps: int = 10**7, **kwargs):
    return remote.minimize(quad, P0, args=(X, Y), optimizer=optim.Adam(lr=0.01), steps=steps, **kwargs)


def timed(fn, *args, **kwargs):
    """(result, seconds) of fn(*args, **kwargs)."""
    start = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - start


def assert_responsive(ch: grpc.Channel, limit: float = 3.0) -> None:
    """Health, ListGraphs and ListJobs each answer within `limit` seconds."""
    st = stub(ch)
    for call in (lambda: health_status(ch, timeout=limit), lambda: st.ListGraphs(pb.ListGraphsRequest(), timeout=limit),
                 lambda: st.ListJobs(pb.ListJobsRequest(), timeout=limit)):
        _, seconds = timed(call)
        assert seconds < limit


def store_count(server, sql: str, *args) -> int:
    return server.jobs.store.query(sql, args)[0][0]


# ---------------------------------------------------------------- 1: an outside lock on jobs.sqlite


def test_outside_lock_on_the_store_fails_nothing_for_good(serve_in_process, tmp_path):
    """A backup or VACUUM holding jobs.sqlite's lock past the busy timeout: the job waits for the
    store and goes on; every call answers meanwhile (writes UNAVAILABLE at worst), health says
    NOT_SERVING while the store fails and SERVING after; nothing stays locked."""
    server = serve_in_process(store=tmp_path, store_busy_seconds=0.3, checkpoint_every=5)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        job = submit(remote)
        assert wait_until(lambda: job.info().step > 20, timeout=20)
        st = stub(ch)
        with closing(sqlite3.connect(str(tmp_path / "jobs.sqlite"), isolation_level=None)) as outside:
            outside.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            seen_not_serving = False
            while time.monotonic() - locked_at < 3.0:
                (info, seconds) = timed(st.GetJob, pb.GetJobRequest(job_id=job.id, with_history=True), timeout=5)
                assert seconds < 2.5 and info.job.status == "running"
                assert_responsive(ch)
                seen_not_serving |= health_status(ch) == NOT_SERVING
                time.sleep(0.1)
            with gs.connect(address(server), timeout=1.0) as impatient:  # a write: it waits the busy timeout, retried
                start = time.monotonic()
                with pytest.raises(gs.RemoteError) as refused:
                    submit(impatient, steps=10)
                assert time.monotonic() - start < 3.0
                assert refused.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), refused.value
            assert seen_not_serving  # health told a balancer the store fails
            step_at_release = job.info().step
            outside.execute("ROLLBACK")
        assert wait_until(lambda: job.info().step > step_at_release + 20, timeout=10)  # the job went on
        assert wait_until(lambda: health_status(ch) == SERVING, timeout=5)
        for _ in range(30):  # the hostile tester's "after ~20 more calls everything hangs"
            st.GetJob(pb.GetJobRequest(job_id=job.id), timeout=5)
            st.ListJobs(pb.ListJobsRequest(), timeout=5)
        other = submit(remote, steps=50).wait(timeout=30)
        assert other.status == "succeeded"
        assert job.cancel().status == "cancelled"
        assert server.jobs.store.failing_since is None


def test_store_lock_is_released_when_begin_fails(tmp_path):
    """The wedge itself: BEGIN failing on a locked store must not leave this process's lock held."""
    store = JobStore(tmp_path, busy_seconds=0.1)
    with closing(sqlite3.connect(str(tmp_path / "jobs.sqlite"), isolation_level=None)) as outside:
        outside.execute("BEGIN EXCLUSIVE")
        for _ in range(3):
            with pytest.raises(jobs_module.StoreUnavailable, match="lock"), store.tx():
                pytest.fail("the transaction began on a locked store")
        assert store.query("SELECT count(*) FROM jobs") == [(0,)]  # reads go on meanwhile (WAL)
        outside.execute("ROLLBACK")
    with store.tx() as db:
        db.execute("INSERT INTO meta VALUES ('probe', 'ok')")
    assert store.query("SELECT value FROM meta WHERE key = 'probe'") == [("ok",)]
    store.close()


# ---------------------------------------------------------------- 2, 4: watchers and cancels never take every thread


def test_idle_watchers_do_not_take_the_threads_of_other_calls(serve_in_process):
    """As many idle WatchJob streams as server threads (the hostile tester's 16 with --threads 16)."""
    server = serve_in_process(SlowEngine(3.0), threads=2)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        job = submit(remote)
        streams = [stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30) for _ in range(4)]
        try:
            assert wait_until(lambda: server.jobs.waiting == 4, timeout=10)
            assert_responsive(ch)
            _, seconds = timed(stub(ch).GetJob, pb.GetJobRequest(job_id=job.id), timeout=5)
            assert seconds < 3
        finally:
            for s in streams:
                s.cancel()
        assert wait_until(lambda: server.jobs.waiting == 0, timeout=5)


def test_watchers_past_the_limit_are_resource_exhausted(serve_in_process):
    server = serve_in_process(SlowEngine(3.0), threads=2, max_watchers=2, metrics_port=0)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        job = submit(remote)
        held = [stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30) for _ in range(2)]
        try:
            assert wait_until(lambda: server.jobs.waiting == 2, timeout=10)
            extra = stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=10)
            err = rpc_error(next, extra)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "WatchJob" in err.details(), err.details()
            assert metric(parse_metrics(scrape(server.metrics_port)), "gradserve_job_waiters") == 2
            assert_responsive(ch)
            # a cancel past the limit answers at once: pending
            answer, seconds = timed(stub(ch).CancelJob, pb.CancelJobRequest(job_id=job.id), timeout=10)
            assert seconds < 1.5 and answer.job.status == "cancelling", (seconds, answer.job)
        finally:
            for s in held:
                s.cancel()
        assert wait_until(lambda: server.jobs.waiting == 0, timeout=5)
        events = list(stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=15))  # a slot is free again
        assert events[-1].status == "cancelled"


def test_cancels_waiting_on_a_long_step_do_not_take_every_thread(serve_in_process):
    """16 CancelJobs on a job whose step takes seconds (and cannot stop mid-way) with 4 threads."""
    server = serve_in_process(SlowEngine(4.0), threads=4)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        job = submit(remote)
        assert wait_until(lambda: job.info().status == "running", timeout=10)
        answers: list = []

        def cancel():
            answers.append(timed(stub(ch).CancelJob, pb.CancelJobRequest(job_id=job.id), timeout=20))

        threads = [threading.Thread(target=cancel) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        assert_responsive(ch)
        for t in threads:
            t.join(20)
        assert len(answers) == 16
        for answer, seconds in answers:  # none waited past CANCEL_WAIT: final, or saying it is pending
            assert seconds < CANCEL_WAIT + 1.5 and answer.job.status in ("cancelling", "cancelled"), (seconds, answer.job)
        final = job.wait(timeout=15).info()
        assert final.status == "cancelled" and final.message == f"cancelled after step {final.step}", final


def test_cancel_during_a_long_step_is_final_or_pending(serve_in_process):
    """A step of seconds: the cancel stops it between kernels and the answer is final at once
    (before: 10 s, then "running")."""
    server = serve_in_process()
    with gs.connect(address(server), timeout=60) as remote:
        job = remote.minimize(make_chain(400), CHAIN_W, args=(CHAIN_X,), optimizer=optim.Adam(), steps=100)
        assert wait_until(lambda: job.info().step >= 1, timeout=30)  # its plan is compiled (that does not stop)
        time.sleep(0.2)  # inside a step
        with channel(address(server)) as ch:
            answer, seconds = timed(stub(ch).CancelJob, pb.CancelJobRequest(job_id=job.id), timeout=20)
        assert seconds < CANCEL_WAIT + 1, seconds
        done = answer.job.step
        assert (answer.job.status, answer.job.message) == ("cancelled", f"cancelled after step {done}"), answer.job
        time.sleep(0.3)
        assert job.info().status == "cancelled" and job.info().step == done < 100


def test_cancel_of_a_step_that_cannot_stop_says_pending_then_ends(serve_in_process):
    server = serve_in_process(SlowEngine(3.0))
    with gs.connect(address(server), timeout=30) as remote:
        job = submit(remote)
        assert wait_until(lambda: job.info().status == "running", timeout=10)
        time.sleep(0.5)  # inside its first step
        with channel(address(server)) as ch:
            answer, seconds = timed(stub(ch).CancelJob, pb.CancelJobRequest(job_id=job.id), timeout=20)
        assert seconds < CANCEL_WAIT + 1 and answer.job.status == "cancelling", (seconds, answer.job)
        assert job.info().status == "cancelling"
        assert job.wait(timeout=10).info().status == "cancelled"
        info = job.info()
        assert info.message == f"cancelled after step {info.step}" and len(job.history()["loss"]) == info.step


# ---------------------------------------------------------------- 3: a failing runner, health that says so


def test_checkpoint_memory_error_fails_the_job_and_the_runner_goes_on(serve_in_process, monkeypatch):
    server = serve_in_process(job_runners=1)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("checkpoint buffer")

    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        monkeypatch.setattr(JobStore, "save_checkpoint", out_of_memory)
        failed = submit(remote, steps=200, checkpoint_every=5)
        assert failed.wait(timeout=20).status == "failed"
        info = failed.info()
        assert "MemoryError" in info.message and "checkpoint buffer" in info.message, info.message
        res = failed.result()  # failed with an error: scipy-style status 3, nothing to show of its params
        assert (res.status, res.success, res.message, res.x) == (FAILED, False, info.message, {})
        assert health_status(ch) == SERVING
        monkeypatch.undo()
        ok = submit(remote, steps=100, checkpoint_every=5).wait(timeout=20)  # the one runner still runs jobs
        assert ok.status == "succeeded" and ok.result().nit == 100
        assert failed.info().status == "failed"
        assert server.jobs.active == 0


class _Crash(BaseException):
    """What no `except Exception` catches: a runner thread dies of it."""


def test_dead_runner_turns_health_not_serving(serve_in_process, monkeypatch):
    server = serve_in_process(job_runners=1)

    def crash(self, run):
        raise _Crash()

    monkeypatch.setattr(JobManager, "_turn", crash)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is the point
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        assert health_status(ch) == SERVING
        submit(remote, steps=10)
        assert wait_until(lambda: health_status(ch) == NOT_SERVING, timeout=5)
        assert "gradserve-job-0" in server.jobs.problem()


class _BrokenDisk:
    def execute(self, *args):
        raise sqlite3.OperationalError("disk I/O error")


def test_failing_store_turns_health_not_serving_until_it_works(serve_in_process, tmp_path):
    server = serve_in_process(store=tmp_path, lease_seconds=1.0, store_busy_seconds=0.5)
    store = server.jobs.store
    with channel(address(server)) as ch:
        assert health_status(ch) == SERVING
        good, store.db = store.db, _BrokenDisk()
        try:
            assert wait_until(lambda: health_status(ch) == NOT_SERVING, timeout=5)  # the lease renewal fails
            err = rpc_error(stub(ch).CancelJob, pb.CancelJobRequest(job_id="0123456789abcdef"), timeout=5)
            assert err.code() == grpc.StatusCode.NOT_FOUND  # reads still work
        finally:
            store.db = good
        assert wait_until(lambda: health_status(ch) == SERVING, timeout=5)


# ---------------------------------------------------------------- 5: bounded history, freed runs


def test_history_is_bounded_by_halving_its_resolution(serve_in_process):
    server = serve_in_process(job_history=64)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        job = submit(remote, steps=1000).wait(timeout=30)
        res = job.result()
        assert res.status == 1 and res.success and res.nit == 1000
        events = list(stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=10))
        steps = [e.step for e in events[:-1]]
        stride = steps[0]
        assert stride == 16 and steps == list(range(stride, 1001, stride)), steps  # 62 points: every 16th step
        assert events[-1].step == 1000 and events[-1].status == "succeeded"
        assert len(res.history["loss"]) == len(steps) <= 64
        assert store_count(server, "SELECT count(*) FROM history WHERE job_id = ?", job.id) == len(steps)
        local = minimize(quad, P0, args=(X, Y), optimizer=optim.Adam(lr=0.01), steps=1000)
        np.testing.assert_allclose(res.history["loss"], local.history["loss"][stride - 1::stride], rtol=0, atol=1e-12)
        for k in ("w", "b"):
            np.testing.assert_allclose(res.x[k], local.x[k], rtol=0, atol=1e-12)


def test_finished_jobs_free_their_memory(serve_in_process):
    server = serve_in_process()
    with gs.connect(address(server), timeout=30) as remote:
        done = [submit(remote, steps=30, name=f"j{k}") for k in range(5)]
        for job in done:
            assert job.wait(timeout=20).status == "succeeded"
        assert wait_until(lambda: server.jobs.active == 0, timeout=5)  # only the rows stay
        assert store_count(server, "SELECT count(*) FROM specs") == 0  # the spec (args: megabytes) is resume's only
        for job in done:  # and every result is still there
            res = job.result()
            assert res.nit == 30 and len(res.history["loss"]) == 30 and set(res.x) == {"w", "b"}


def test_endless_job_stays_bounded_and_is_freed_on_cancel(serve_in_process):
    server = serve_in_process(job_history=64)
    with gs.connect(address(server), timeout=30) as remote:
        job = submit(remote, steps=2**62)
        assert wait_until(lambda: job.info().step > 2000, timeout=30)
        run = server.jobs._runs[job.id]
        assert len(run.history.steps) <= 64 and run.history.stride >= 32
        assert all(len(v) <= 1 for v in run.state.history.values())  # the loop's own history is drained
        assert store_count(server, "SELECT count(*) FROM history WHERE job_id = ?", job.id) <= 64
        assert job.cancel().status == "cancelled"
        assert job.id not in server.jobs._runs
        assert store_count(server, "SELECT count(*) FROM history WHERE job_id = ?", job.id) <= 64
        assert len(job.history()["loss"]) <= 64
        assert store_count(server, "SELECT count(*) FROM specs WHERE job_id = ?", job.id) == 0


# ---------------------------------------------------------------- 6: two servers on one store


def test_two_servers_on_one_store_run_each_job_once(serve_in_process, tmp_path):
    a = serve_in_process(store=tmp_path, lease_seconds=1.0)
    b = serve_in_process(store=tmp_path, lease_seconds=1.0)
    assert a.jobs.leader and not b.jobs.leader
    with gs.connect(address(a), timeout=30) as ra, gs.connect(address(b), timeout=30) as rb:
        job = submit(rb)  # through the server that does not run jobs
        assert wait_until(lambda: job.id in a.jobs._runs, timeout=5)
        assert wait_until(lambda: job.info().step > 50, timeout=10)  # b reads a's progress from the store
        for _ in range(5):
            assert job.id not in b.jobs._runs
            time.sleep(0.1)
        with channel(address(b)) as ch:  # b's watchers follow the store
            stream = stub(ch).WatchJob(pb.WatchJobRequest(job_id=job.id, from_step=job.info().step), timeout=10)
            first, second = next(stream), next(stream)
            stream.cancel()
        assert first.step < second.step and first.status == "running"
        short = submit(rb, steps=200)
        assert short.wait(timeout=30).status == "succeeded" and short.result().nit == 200
        assert job.cancel().status in ("cancelling", "cancelled")  # through b: a applies it
        assert wait_until(lambda: job.info().status == "cancelled", timeout=10)
        info = ra.job(job.id).info()
        assert info.status == "cancelled" and info.message == f"cancelled after step {info.step}"

        moved = submit(ra)
        assert wait_until(lambda: moved.info().step > 20, timeout=10)
    a.stop(grace=0)  # a gives up the lease: b takes the jobs over
    assert wait_until(lambda: b.jobs.leader and moved.id in b.jobs._runs, timeout=5)
    with gs.connect(address(b), timeout=30) as rb:
        job = rb.job(moved.id)
        resumed = job.info().step
        assert wait_until(lambda: job.info().step > resumed + 20, timeout=10)
        assert job.cancel().status == "cancelled"


def test_lapsed_lease_is_taken_over(tmp_path, serve_in_process):
    """A holder that stops renewing (killed, or cut off) loses the jobs once its lease lapses."""
    a = serve_in_process(store=tmp_path, lease_seconds=1.0)
    b = serve_in_process(store=tmp_path, lease_seconds=1.0)
    with gs.connect(address(a), timeout=30) as ra:
        job = submit(ra, checkpoint_every=5)
        assert wait_until(lambda: job.info().step > 20, timeout=10)
    with a.jobs._ready:  # a's keeper and runners stop as if frozen; nothing of a is released
        a.jobs._stopping = True
        a.jobs._stopped.set()
    assert wait_until(lambda: b.jobs.leader and job.id in b.jobs._runs, timeout=5)
    with gs.connect(address(b), timeout=30) as rb:
        moved = rb.job(job.id)
        at = moved.info().step
        assert wait_until(lambda: moved.info().step > at + 20, timeout=10)
        assert moved.cancel().status == "cancelled"


# ---------------------------------------------------------------- 7: SIGTERM exits within --grace


def test_sigterm_exits_within_grace_during_a_long_step_and_a_long_call(tmp_path):
    grace = 2.0
    s = ServerProcess("--grace", str(grace), "--store", str(tmp_path))
    try:
        chain = make_chain(1500)
        with gs.connect(s.address, timeout=60) as remote, channel(s.address) as ch:
            job = remote.minimize(chain, CHAIN_W, args=(CHAIN_X,), optimizer=optim.Adam(), steps=10)
            wide_x = np.tile(CHAIN_X, (8, 1))  # 8 times a step's work: tens of seconds, well past the grace
            graph = gs.trace(chain, CHAIN_W, wide_x)
            req = pb.GradientRequest(graph_id=remote.register(graph), wrt=[graph.input_names()[0]])
            fill(req.inputs, dict(zip(graph.input_names(), (CHAIN_W, wide_x), strict=True)))
            outcome: dict = {}

            def long_call():
                try:
                    stub(ch).Gradient(req, timeout=60)
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    outcome["code"] = e.code()

            caller = threading.Thread(target=long_call, daemon=True)
            assert wait_until(lambda: job.info().status == "running", timeout=20)
            caller.start()
            time.sleep(1.0)  # the step and the call are under way
            signalled = time.monotonic()
            s.signal(signal.SIGTERM)
            code = s.proc.wait(grace + 3)
            took = time.monotonic() - signalled
            caller.join(10)
        assert code == 0 and took < grace + 3, took
        assert outcome["code"] != grpc.StatusCode.OK  # cut off at the end of the grace, not waited for
    finally:
        s.close()
    with closing(sqlite3.connect(str(tmp_path / "jobs.sqlite"))) as db:  # the job resumes on the next start
        assert db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("running",)


# ---------------------------------------------------------------- 8: metrics and the endpoints without the token


def test_answer_over_the_message_limit_is_counted_resource_exhausted(serve_in_process):
    server = serve_in_process(max_message_bytes=MiB, metrics_port=0)
    graph = gs.trace(lambda x: gs.broadcast_to(x, (200_000,)), 1.0)  # a 1.6 MB answer
    with channel(address(server)) as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=10)
        req = pb.EvaluateRequest(graph_id=graph.id)
        fill(req.inputs, {graph.input_names()[0]: 1.0})
        before = parse_metrics(scrape(server.metrics_port))
        err = rpc_error(st.Evaluate, req, timeout=10)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in err.details(), err.details()
        after = parse_metrics(scrape(server.metrics_port))
    for code, want in (("RESOURCE_EXHAUSTED", 1), ("OK", 0)):
        delta = (metric(after, "gradserve_requests_total", code=code, method="Evaluate")
                 - metric(before, "gradserve_requests_total", code=code, method="Evaluate"))
        assert delta == want, (code, delta)


def _list_services(ch, metadata=()) -> list[str]:
    responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata)
    return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_can_require_the_token(serve_in_process):
    token = "s3cret-token"
    open_server = serve_in_process(token=token)
    closed = serve_in_process(token=token, reflection_needs_token=True)
    with channel(address(open_server)) as ch:  # the default: reflection stays open, like health
        assert "gradserve.v1.GradientService" in _list_services(ch)
    with channel(address(closed)) as ch:
        err = rpc_error(_list_services, ch)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "gradserve.v1.GradientService" in _list_services(ch, metadata=(("authorization", f"Bearer {token}"),))
        assert health_status(ch) == SERVING  # probes send no token
    args = build_parser().parse_args(["serve", "--reflection-needs-token"])
    with pytest.raises(SystemExit, match="--token-file"):
        config_from_args(args)


def test_metrics_bind_loopback_unless_told(serve_in_process):
    wide = Server(Config(host="0.0.0.0", port=0, metrics_port=0)).start()  # gRPC on every address, metrics not
    try:
        assert wide._http is not None and wide._http.server_address[0] == "127.0.0.1"
        assert metric(parse_metrics(scrape(wide.metrics_port)), "gradserve_serving") == 1
    finally:
        wide.stop(grace=0)
    told = serve_in_process(metrics_port=0, metrics_host="0.0.0.0")
    assert told._http.server_address[0] == "0.0.0.0"
    assert config_from_args(build_parser().parse_args(["serve"])).metrics_host == "127.0.0.1"
