"""Jobs that clean up: a finished job leaves only its rows in the store (no run, argument,
parameter or plan of its graph stays in memory), DeleteJob removes the rows, and retention
deletes the finished jobs past a count or an age, at start and on a periodic sweep.

Memory is checked deterministically: weak references to the runs (dead without the cycle
collector), the manager's and the engine's tables, and tracemalloc's count of live Python and
numpy allocations (the engine's recycled-buffer free list, bounded, is accounted apart). Ages
are checked by giving the sweep its present (`sweep(now=...)`), not by waiting."""

from __future__ import annotations

import time
import tracemalloc
import weakref

import grpc
import numpy as np
import pytest
from service_fixtures import HOST, channel, rpc_error, stub, wait_until

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve_engine.buffers import RECYCLER
from gradserve_engine.engine import Engine
from gradserve_engine.errors import FailedPrecondition, NotFound
from gradserve_engine.ir import Limits, tensor_to_proto
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server import heap
from gradserve_server.jobs import DAY, FINISHED, JobManager, JobStore
from gradserve_server.registry import GraphRegistry

MiB = 1 << 20
ROWS = 131_072
X = np.random.default_rng(3).normal(size=(ROWS, 8))  # 8 MiB: the argument every job here carries
W0 = np.full(8, 0.5)
assert X.nbytes == 8 * MiB


def loss(w, X):  # its intermediates are X @ w, 1 MiB
    return gs.mean((X @ w) ** 2)


GRAPH = gs.trace(loss, W0, X)
TINY = gs.trace(lambda w: gs.sum(w ** 2), W0)


def big_spec(steps: int = 3, name: str = "") -> pb.JobSpec:
    """A job on GRAPH with X (8 MiB) as its argument."""
    s = pb.JobSpec(graph=GRAPH.to_proto(), optimizer_json='{"name": "Adam", "lr": 0.1}', steps=steps, name=name)
    tensor_to_proto(W0, s.params0["w"])
    tensor_to_proto(X, s.args["X"])
    return s


def tiny_spec(steps: int = 3, name: str = "") -> pb.JobSpec:
    s = pb.JobSpec(graph=TINY.to_proto(), optimizer_json='{"name": "Adam", "lr": 0.1}', steps=steps, name=name)
    tensor_to_proto(W0, s.params0["w"])
    return s


def make_manager(store: JobStore | None = None, registry: GraphRegistry | None = None, **kwargs) -> JobManager:
    return JobManager(Engine(), registry or GraphRegistry(1 << 30), store or JobStore(None), Limits(), **kwargs)


@pytest.fixture
def managers():
    """`managers(**kwargs)`: a started JobManager (in-memory store unless given); all stop at the end."""
    started = []

    def start(**kwargs) -> JobManager:
        m = make_manager(**kwargs)
        m.start()
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop(5)
        m.close()


@pytest.fixture
def runs(monkeypatch):
    """Weak references to every run a JobManager takes into memory from now on."""
    seen: list[weakref.ref] = []
    adopt = JobManager._adopt

    def recording(self, run):
        seen.append(weakref.ref(run))
        return adopt(self, run)

    monkeypatch.setattr(JobManager, "_adopt", recording)
    return seen


def finish(manager: JobManager, job_id: str, timeout: float = 30.0) -> pb.Job:
    assert wait_until(lambda: manager.get(job_id)[0].status in FINISHED, timeout=timeout), manager.get(job_id)
    return manager.get(job_id)[0]


def run_one(manager: JobManager, spec: pb.JobSpec) -> str:
    job_id = manager.submit(spec).job_id
    assert finish(manager, job_id).status == "succeeded"
    return job_id


def count(manager: JobManager, sql: str, *args) -> int:
    return manager.store.query(sql, args)[0][0]


def rows_of(manager: JobManager, job_id: str) -> dict[str, int]:
    return {table: count(manager, f"SELECT count(*) FROM {table} WHERE {key} = ?", job_id)
            for table, key in (("jobs", "id"), ("history", "job_id"), ("checkpoints", "job_id"), ("specs", "job_id"))}


# ---------------------------------------------------------------- a finished job holds nothing


def test_finished_jobs_hold_nothing_but_their_rows(managers, runs):
    manager = managers(runners=2)
    run_one(manager, big_spec())  # warms what is kept on purpose: the recycler's free list, numpy's caches
    assert wait_until(lambda: all(r() is None for r in runs), timeout=5)
    tracemalloc.start()
    try:
        before, free_before = tracemalloc.get_traced_memory()[0], RECYCLER.held_bytes
        ids = [manager.submit(big_spec(name=f"big {k}")).job_id for k in range(4)]  # 32 MiB of arguments
        for job_id in ids:
            assert finish(manager, job_id).status == "succeeded"
        # the runners drop a run as they end it: no cycle keeps one for the collector to find
        assert wait_until(lambda: all(r() is None for r in runs), timeout=5), [r() for r in runs]
        after, peak = tracemalloc.get_traced_memory()
        kept = after - before - (RECYCLER.held_bytes - free_before)
    finally:
        tracemalloc.stop()
    assert peak - before >= 8 * MiB  # the arguments were traced: a job that kept one would show here
    assert kept < 1 * MiB, f"{kept / MiB:.2f} MiB stayed after 4 jobs of 8 MiB each"
    assert manager.active == 0 and not manager._runs and not manager._queue
    assert manager.engine.cache_info().size == 0  # the plans of the jobs' graph (registered nowhere) went too
    assert count(manager, "SELECT count(*) FROM specs") == 0
    for job_id in ids:  # what stays is the row, its history and its last checkpoint
        rows = rows_of(manager, job_id)
        assert rows["jobs"] == 1 and rows["history"] == 3 and rows["checkpoints"] >= 1, rows
        assert set(manager.params(job_id)[0]) == {"w"}


def test_a_registered_graph_keeps_its_plans_and_a_shared_one_waits_for_the_last_job(managers):
    registry = GraphRegistry(1 << 30)
    manager = managers(registry=registry)
    gid, _ = registry.register(TINY, TINY.to_proto().SerializeToString(deterministic=True))
    by_id = pb.JobSpec(graph_id=gid, optimizer_json='{"name": "Adam", "lr": 0.1}', steps=3)
    tensor_to_proto(W0, by_id.params0["w"])
    run_one(manager, by_id)
    assert manager.engine.cache_info().size > 0  # the registry serves the graph to calls: its plans stay
    registry.delete(gid)
    endless = manager.submit(tiny_spec(steps=10**9)).job_id  # the same graph, sent with the job
    assert wait_until(lambda: manager.get(endless)[0].step > 0, timeout=10)
    run_one(manager, tiny_spec())
    assert manager.engine.cache_info().size > 0  # the endless job still runs on it
    assert manager.cancel(endless).status == "cancelled"
    assert wait_until(lambda: manager.engine.cache_info().size == 0, timeout=5)


def test_jobs_through_the_service_leave_nothing_in_the_server(serve_in_process, runs):
    server = serve_in_process()
    with gs.connect(f"{HOST}:{server.port}", timeout=60) as remote:
        jobs = [remote.minimize(loss, W0, args=(X,), optimizer=optim.Adam(lr=0.1), steps=3, name=f"s{k}")
                for k in range(3)]
        for job in jobs:
            assert job.wait(timeout=30).status == "succeeded"
        assert wait_until(lambda: all(r() is None for r in runs), timeout=5)
        assert len(runs) == 3 and server.jobs.active == 0
        assert server.engine.cache_info().size == 0
        assert all(np.shape(job.result().x) == W0.shape for job in jobs)  # the results are read from the rows


# ---------------------------------------------------------------- DeleteJob


def test_delete_removes_a_finished_jobs_rows_and_refuses_a_running_one(managers):
    manager = managers()
    done = run_one(manager, tiny_spec())
    assert rows_of(manager, done)["history"] == 3
    assert manager.delete(done) is True
    assert rows_of(manager, done) == {"jobs": 0, "history": 0, "checkpoints": 0, "specs": 0}
    assert manager.delete(done) is False  # a retried delete is harmless
    with pytest.raises(NotFound):
        manager.get(done)

    running = manager.submit(tiny_spec(steps=10**9)).job_id
    assert wait_until(lambda: manager.get(running)[0].step > 0, timeout=10)
    with pytest.raises(FailedPrecondition, match=r"is running: only a finished job can be deleted.*cancel"):
        manager.delete(running)
    assert rows_of(manager, running)["jobs"] == 1  # nothing of it was touched
    assert manager.cancel(running).status == "cancelled"
    assert manager.delete(running) is True and rows_of(manager, running)["jobs"] == 0


def test_delete_job_rpc_and_the_sdk(serve_in_process):
    server = serve_in_process()
    with gs.connect(f"{HOST}:{server.port}", timeout=30) as remote, channel(f"{HOST}:{server.port}") as ch:
        done = remote.minimize(lambda w: gs.sum(w ** 2), W0, optimizer=optim.Adam(lr=0.1), steps=3).wait(timeout=30)
        endless = remote.minimize(lambda w: gs.sum(w ** 2), W0, optimizer=optim.Adam(lr=0.1), steps=10**9)
        assert wait_until(lambda: endless.info().step > 0, timeout=10)

        e = rpc_error(stub(ch).DeleteJob, pb.DeleteJobRequest(job_id=endless.id), timeout=10)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancel" in e.details().lower(), e.details()
        with pytest.raises(rm.RemoteFailedPrecondition):
            endless.delete()
        assert endless.info().status == "running"

        assert done.delete() is True
        with pytest.raises(rm.RemoteNotFound):
            done.info()
        assert remote.delete_job(done.id) is False
        assert done.id not in [j.job_id for j in remote.job_summaries()]
        endless.cancel()
        assert remote.delete_job(endless.id) is True
        assert list(remote.job_summaries()) == []


# ---------------------------------------------------------------- retention


def test_retention_keeps_the_newest_finished_jobs_and_never_touches_running_ones(managers):
    manager = managers(retention_count=2, sweep_seconds=3600)  # swept here by hand
    running = manager.submit(tiny_spec(steps=10**9)).job_id
    done = [run_one(manager, tiny_spec(name=f"d{k}")) for k in range(4)]
    assert manager.sweep() == 2
    assert [j.job_id for j in manager.list(None, 100)[0]] == [running, *done[2:]]
    for gone in done[:2]:
        assert rows_of(manager, gone) == {"jobs": 0, "history": 0, "checkpoints": 0, "specs": 0}
    assert manager.sweep() == 0
    assert manager.get(running)[0].status == "running"
    manager.cancel(running)
    assert manager.sweep() == 1  # newest is by the time a job finished: the cancelled one is kept, done[2] goes
    assert [j.job_id for j in manager.list(None, 100)[0]] == [running, done[3]]


def test_retention_by_age_deletes_what_finished_before_the_bound(managers):
    manager = managers(retention_days=1.0, sweep_seconds=3600)
    running = manager.submit(tiny_spec(steps=10**9)).job_id
    done = [run_one(manager, tiny_spec()) for _ in range(3)]
    now = time.time()
    assert manager.sweep(now=now + 0.5 * DAY) == 0
    assert manager.sweep(now=now + 2 * DAY) == 3
    assert [j.job_id for j in manager.list(None, 100)[0]] == [running]
    assert all(rows_of(manager, j)["history"] == 0 for j in done)


def test_retention_sweeps_at_start_and_periodically(managers, tmp_path):
    first = managers(store=JobStore(tmp_path))
    old = [run_one(first, tiny_spec(name=f"old {k}")) for k in range(3)]
    first.stop(5)
    first.close()
    second = managers(store=JobStore(tmp_path), retention_count=1, sweep_seconds=0.05)
    assert [j.job_id for j in second.list(None, 100)[0]] == old[-1:]  # swept before start() returned
    new = [run_one(second, tiny_spec(name=f"new {k}")) for k in range(2)]
    assert wait_until(lambda: [j.job_id for j in second.list(None, 100)[0]] == new[-1:], timeout=5)
    assert second.problem() is None  # the sweeper is alive, and counted by health


def test_retention_off_keeps_everything(managers):
    manager = managers()
    done = [run_one(manager, tiny_spec()) for _ in range(3)]
    assert not manager.retains and manager.sweep(now=time.time() + 1000 * DAY) == 0
    assert [j.job_id for j in manager.list(None, 100)[0]] == done


def test_the_heap_is_trimmed_after_a_turn_that_ended_a_job(managers, monkeypatch):
    """A finished job's arguments and state (tens of MiB) go back to the OS, not only to malloc's
    arenas, which keep freed memory per thread (the server's RSS grew by hundreds of MiB over a
    hundred jobs): a runner trims the heap after each turn in which a job ended."""
    trims = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1))
    manager = managers(runners=1)
    for k in range(3):
        run_one(manager, big_spec(name=f"trimmed {k}"))
    assert wait_until(lambda: len(trims) >= 3, timeout=5), trims
