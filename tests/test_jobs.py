"""Optimisation jobs end to end: real `python -m gradserve_server` processes on 127.0.0.1, driven through
the SDK (`remote.minimize`, `Job`), bare stubs and the `gradserve jobs` command line.

Covers: remote jobs reaching scikit-learn's and scipy's optima; SIGKILL mid-job and a restart on the
same store (the job resumes from its checkpoint to the uninterrupted run's result, bit for bit; a
finished job stays readable); a checkpoint whose checksum fails (the older one is used); damaged or
version-mismatched stores (refused at start-up, never reset); cancel (SDK and CLI); fair turns between
concurrent jobs; every bad job spec answered INVALID_ARGUMENT; WatchJob's event stream; the progress
bar and the loss plot.

The servers run with one BLAS thread (service_fixtures.child_env); the local reference
runs here do too, so the remote and local loops can be compared to 1e-12."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_fixtures import ServerProcess, channel, child_env, stub, wait_until

# the problems and scikit-learn's fit of test_optim, reused as they are (the same objective)
from test_optim import ROSEN_X0, cancer, logistic, rosen  # noqa: F401 (cancer is a fixture)
from threadpoolctl import threadpool_limits

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve.minimize import minimize
from gradserve_engine.ir import tensor_to_proto
from gradserve_engine.v1 import service_pb2 as pb

TOL = 1e-12

# ---------------------------------------------------------------- a job that takes a while (~0.4 ms a step)

_rng = np.random.default_rng(1)
FIT_X = _rng.normal(size=(1000, 64))
FIT_Y = _rng.normal(size=(1000, 32))
FIT_P0 = {"w": _rng.normal(size=(64, 32)) * 0.1, "b": np.zeros(32)}
FIT_STEPS = 3000


def fit(p, X, Y):
    return gs.mean((gs.tanh(X @ p["w"] + p["b"]) - Y) ** 2)


def fit_opt(lr: float = 0.01) -> optim.Adam:
    return optim.Adam(lr=lr)


def submit_fit(remote: gs.Session, steps: int = FIT_STEPS, lr: float = 0.01, name: str = "") -> rm.Job:
    return remote.minimize(fit, FIT_P0, args=(FIT_X, FIT_Y), optimizer=fit_opt(lr), steps=steps, name=name)


def local_minimize(*args, **kwargs):
    """gs.minimize in this process with one BLAS thread, as the servers run (child_env)."""
    with threadpool_limits(1):
        return minimize(*args, **kwargs)


def assert_same_result(res, ref, steps: int) -> None:
    """`res` is the uninterrupted run `ref`: same params, loss and history (one entry a step)."""
    assert res.status == 1 and res.success and res.nit == steps, (res.status, res.message, res.nit)  # reached steps
    for k in ("w", "b"):
        np.testing.assert_allclose(res.x[k], ref.x[k], rtol=0, atol=TOL)
    assert abs(res.fun - ref.fun) <= TOL
    assert len(res.history["loss"]) == len(res.history["grad_norm"]) == steps
    np.testing.assert_allclose(res.history["loss"], ref.history["loss"][:steps], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.history["grad_norm"], ref.history["grad_norm"][:steps], rtol=0, atol=TOL)


# ---------------------------------------------------------------- fixtures (server, remote, bare: conftest.py)


@pytest.fixture(scope="module")
def reference(remote):
    """The fit job, FIT_STEPS steps, run uninterrupted on a server without a store."""
    job = submit_fit(remote, name="reference")
    job.wait(timeout=60)
    return job.result()


def store_db(store: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(str(store / "jobs.sqlite")))


def checkpoints(store: Path, job_id: str) -> list[tuple[int, bytes, str]]:
    with store_db(store) as db:
        return db.execute("SELECT step, data, sha256 FROM checkpoints WHERE job_id = ? ORDER BY step DESC",
                          (job_id,)).fetchall()


def job_row(store: Path, job_id: str) -> tuple:
    with store_db(store) as db:
        return db.execute("SELECT status, step, steps FROM jobs WHERE id = ?", (job_id,)).fetchone()


def flip_newest_checkpoint(store: Path, job_id: str) -> int:
    """Flip a byte in the middle of the job's newest checkpoint blob (its checksum stays); returns its step."""
    step, data, digest = checkpoints(store, job_id)[0]
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with store_db(store) as db:
        db.execute("UPDATE checkpoints SET data = ? WHERE job_id = ? AND step = ?", (bytes(flipped), job_id, step))
        db.commit()
    assert checkpoints(store, job_id)[0][1:] == (bytes(flipped), digest)
    return step


STORE_FLAGS = ("--checkpoint-every", "5", "--checkpoint-seconds", "0.1", "--log-level", "info")

# ---------------------------------------------------------------- 1, 2: the optima of scikit-learn and scipy


@pytest.mark.parametrize(("optimizer", "steps"), [(optim.LBFGS(), 50), (optim.Adam(lr=0.1), 300)], ids=["lbfgs", "adam"])
def test_logistic_regression_job_reaches_sklearn(remote, cancer, optimizer, steps):  # noqa: F811
    args = (cancer["X"], cancer["y"], cancer["lam"])
    job = remote.minimize(logistic, cancer["p0"], args=args, optimizer=optimizer, steps=steps, name="logistic")
    assert job.wait(timeout=60) is job
    res = job.result()
    assert res.success, res.message
    assert abs(res.fun - cancer["loss_sk"]) < 1e-4
    assert res.fun >= cancer["loss_sk"] - 1e-9  # sklearn's is the optimum
    assert set(res.x) == {"w", "b"} and res.x["w"].shape == (30,)  # shaped like params0
    assert float(gs.value_and_grad(logistic)(res.x, *args)[0]) == pytest.approx(res.fun, abs=1e-12)  # fun is the loss at x
    assert len(res.history["loss"]) == res.nstep <= steps
    assert res.optimizer == optimizer.spec()
    # the server ran the local loop: the same result as gs.minimize in this process
    local = local_minimize(logistic, cancer["p0"], args=args, optimizer=optimizer, steps=steps)
    assert (res.status, res.nit, res.nfev) == (local.status, local.nit, local.nfev) and abs(res.fun - local.fun) <= TOL
    np.testing.assert_allclose(res.x["w"], local.x["w"], rtol=0, atol=TOL)


def test_rosenbrock_job_reaches_minimum(remote):
    job = remote.minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(tolerance_change=1e-12), name="rosen")
    res = job.wait(timeout=60).result()
    assert res.status == 0 and res.success and "L-BFGS converged" in res.message
    assert isinstance(res.x, np.ndarray) and res.x.shape == (10,)
    assert np.abs(res.x - 1).max() < 1e-6
    assert res.fun < 1e-12


# ---------------------------------------------------------------- 3: SIGKILL mid-job and a restart on the same store


def test_sigkill_mid_job_resumes_to_the_uninterrupted_result(tmp_path, reference):
    store = tmp_path / "store"
    srv = ServerProcess("--store", str(store), *STORE_FLAGS)
    with gs.connect(srv.address, timeout=60) as remote:
        try:
            done = submit_fit(remote, steps=100, name="done before")
            before = done.wait(timeout=60).result()
            job = submit_fit(remote, name="killed")
            assert wait_until(lambda: job.info().step > 300, timeout=30)
            srv.kill()  # SIGKILL: no drain, no last checkpoint
        finally:
            srv.close()
        assert srv.proc.returncode == -9
        status, _, steps = job_row(store, job.id)
        saved = checkpoints(store, job.id)
        assert status == "running" and steps == FIT_STEPS
        assert saved and 0 < saved[0][0] < FIT_STEPS, [s for s, _, _ in saved]  # killed mid-run, after a checkpoint
        resumed_at = saved[0][0]

        outcome: dict = {}

        def waiter() -> None:  # the session's wait rides out the restart
            try:
                outcome["job"] = job.wait(timeout=60)
            except Exception as e:  # reported below
                outcome["error"] = e

        follower = threading.Thread(target=waiter, daemon=True)
        follower.start()
        time.sleep(0.3)  # it is retrying against a dead port
        with ServerProcess("--store", str(store), *STORE_FLAGS, port=srv.port) as srv2:
            with channel(srv2.address) as ch:  # a fresh channel: no reconnect backoff, it asks at once
                info = stub(ch).GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
            assert info.status in ("queued", "running") and resumed_at <= info.step < FIT_STEPS, info
            follower.join(60)
            assert not follower.is_alive() and "error" not in outcome, outcome
            assert job.status == "succeeded"
            res = job.result()
            assert_same_result(res, reference, FIT_STEPS)
            assert len(job.history()["loss"]) == FIT_STEPS
            assert f"job {job.id} resumes at step {resumed_at}" in srv2.stderr()
            # the job finished before the kill is still there, unchanged
            after = done.result()
            assert after.status == 1 and after.nit == 100 and after.fun == before.fun
            for k in ("w", "b"):
                np.testing.assert_array_equal(after.x[k], before.x[k])
            assert after.history == before.history and len(after.history["loss"]) == 100
            np.testing.assert_allclose(after.history["loss"], reference.history["loss"][:100], rtol=0, atol=TOL)
            with channel(srv2.address) as ch:  # its progress is replayed from the store
                events = list(stub(ch).WatchJob(pb.WatchJobRequest(job_id=done.id), timeout=10))
            assert [e.step for e in events[:-1]] == list(range(1, 101))
            assert [e.loss for e in events[:-1]] == before.history["loss"]
            assert events[-1].status == "succeeded" and events[-1].step == 100
            assert {j.id for j in remote.jobs()} == {done.id, job.id}
    assert job_row(store, job.id) == ("succeeded", FIT_STEPS, FIT_STEPS)


# ---------------------------------------------------------------- 7: damaged stores and checkpoints


def test_checkpoint_failing_its_checksum_resumes_from_the_older_one(tmp_path, reference):
    store = tmp_path / "store"
    srv = ServerProcess("--store", str(store), *STORE_FLAGS)
    with gs.connect(srv.address, timeout=60) as remote:
        try:
            job = submit_fit(remote, name="damaged checkpoint")
            assert wait_until(lambda: job.info().checkpoint_step > 0, timeout=30)
            first = job.info().checkpoint_step
            assert wait_until(lambda: job.info().checkpoint_step > first, timeout=30)
            srv.kill()
        finally:
            srv.close()
        saved = checkpoints(store, job.id)
        assert len(saved) == 2 and saved[0][0] < FIT_STEPS, [s for s, _, _ in saved]
        newest, older = saved[0][0], saved[1][0]
        assert flip_newest_checkpoint(store, job.id) == newest

        with ServerProcess("--store", str(store), *STORE_FLAGS, port=srv.port) as srv2:
            res = job.wait(timeout=60).result()
            log = srv2.stderr()
            assert f"checkpoint of job {job.id} at step {newest} fails its checksum" in log, log
            assert f"job {job.id} resumes at step {older}" in log, log
            assert_same_result(res, reference, FIT_STEPS)


def test_finished_job_with_damaged_final_checkpoint_is_not_served_stale(tmp_path):
    store = tmp_path / "store"
    with ServerProcess("--store", str(store), *STORE_FLAGS) as srv, gs.connect(srv.address, timeout=60) as remote:
        job = submit_fit(remote, steps=300, name="finished, then damaged")
        final = job.wait(timeout=60).result()
        port = srv.port
    assert final.nit == 300 and flip_newest_checkpoint(store, job.id) == 300
    with ServerProcess("--store", str(store), port=port) as srv2, gs.connect(srv2.address, timeout=60) as remote:
        try:
            res = remote.job(job.id).result()
        except rm.RemoteError:
            return  # refusing to answer is fine
        assert res.nit == 300 and res.fun == final.fun
        np.testing.assert_array_equal(res.x["p.w"], final.x["w"])  # not the params of an older step


def test_job_checkpoint_every_is_honoured():
    with (ServerProcess("--checkpoint-every", "100000", "--checkpoint-seconds", "1000") as srv,
          gs.connect(srv.address, timeout=60) as remote):
        job = remote.minimize(fit, FIT_P0, args=(FIT_X, FIT_Y), optimizer=fit_opt(), steps=10**7, checkpoint_every=5)
        try:
            assert wait_until(lambda: job.info().step > 300, timeout=30)
            assert job.info().checkpoint_step > 0
        finally:
            job.cancel()


def _make_store(directory: Path) -> str:
    """A store written by a real server, holding one finished job; returns its id."""
    with ServerProcess("--store", str(directory)) as srv, gs.connect(srv.address, timeout=30) as r:
        job = r.minimize(rosen, ROSEN_X0, optimizer=optim.LBFGS(), name="kept")
        job.wait(timeout=30)
        job_id = job.id
    return job_id


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database\n" * 64)


def _schema_version(path: Path) -> None:
    with closing(sqlite3.connect(str(path))) as db:
        db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        db.commit()


def _no_meta(path: Path) -> None:
    with closing(sqlite3.connect(str(path))) as db:
        db.execute("DROP TABLE meta")
        db.commit()


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 + 100])


@pytest.mark.parametrize(("damage", "says"), [
    (_garbage, "cannot be read"),
    (_schema_version, "schema version 999"),
    (_no_meta, "no schema version"),
    (_truncated, "cannot be read"),
], ids=["garbage", "schema-version", "no-meta", "truncated"])
def test_damaged_store_refused_at_startup_and_left_alone(tmp_path_factory, damage, says):
    pristine = tmp_path_factory.getbasetemp() / "pristine-store"
    if not pristine.exists():
        _make_store(pristine)
    store = tmp_path_factory.mktemp("store") / "store"
    shutil.copytree(pristine, store)
    path = store / "jobs.sqlite"
    damage(path)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "gradserve_server", "--host", "127.0.0.1", "--port", "0",
                           "--store", str(store)], capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "listening" not in proc.stdout
    assert str(path) in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # a clear message, not a crash
    assert path.read_bytes() == before  # never reset


# ---------------------------------------------------------------- 4: cancel (SDK and CLI)


def test_cancel_running_job_keeps_params_and_history(remote, reference):
    job = submit_fit(remote, steps=10**7, name="to cancel")
    try:
        assert wait_until(lambda: job.info().step > 50, timeout=30)
    finally:
        assert job.cancel() is job
    assert job.status == "cancelled"
    time.sleep(0.3)  # the step in flight at the cancel may still land (see test_cancel_answer_is_final)
    info = job.info()
    n = info.step
    assert info.status == "cancelled" and info.message == f"cancelled after step {n}", info
    assert 50 < n < FIT_STEPS
    history = job.history()
    assert len(history["loss"]) == len(history["grad_norm"]) == n
    np.testing.assert_allclose(history["loss"], reference.history["loss"][:n], rtol=0, atol=TOL)  # the same run so far
    res = job.result()
    assert res.status == 99 and not res.success and res.nit == n and res.history == history
    local = local_minimize(fit, FIT_P0, args=(FIT_X, FIT_Y), optimizer=fit_opt(), steps=n)  # the params after n steps
    for k in ("w", "b"):
        np.testing.assert_allclose(res.x[k], local.x[k], rtol=0, atol=TOL)
    time.sleep(0.2)
    assert job.info().step == n and job.status == "cancelled"  # it stays stopped
    assert job.cancel().status == "cancelled"  # cancelling again is harmless


_rng2 = np.random.default_rng(2)
HEAVY_X = _rng2.normal(size=(2000, 256))
HEAVY_W0 = _rng2.normal(size=(256, 256)) * 0.05


def heavy(w, X):  # ~10 ms a step: a cancel lands mid-step
    return gs.mean(gs.tanh(X @ w) ** 2)


def test_cancel_answer_is_final(remote, bare):
    for _ in range(3):
        job = remote.minimize(heavy, HEAVY_W0, args=(HEAVY_X,), optimizer=optim.Adam(), steps=10**6, name="cancel race")
        try:
            assert wait_until(lambda job=job: job.info().step >= 5, timeout=30)
        finally:
            answer = bare.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=30).job
        time.sleep(0.5)
        later = job.info()
        assert answer.status == later.status == "cancelled"
        assert answer.message == f"cancelled after step {answer.step}", answer
        assert (later.step, later.message) == (answer.step, answer.message), (answer, later)


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("gradserve")
    cmd = [exe] if exe else [sys.executable, "-m", "gradserve_server.cli"]
    return subprocess.run([*cmd, "jobs", *args], capture_output=True, text=True, env=child_env(), timeout=60)


def test_cli_lists_shows_and_cancels_jobs(remote, server):
    finished = remote.minimize(rosen, ROSEN_X0, name="cli finished").wait(timeout=30)
    job = submit_fit(remote, steps=10**7, name="cli running")
    try:
        assert wait_until(lambda: job.info().step > 0, timeout=30)
        listed = _cli("list", "--address", server.address)
        assert listed.returncode == 0, listed.stderr
        lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
        assert "running" in lines[job.id] and "cli running" in lines[job.id]
        assert "succeeded" in lines[finished.id] and "cli finished" in lines[finished.id]

        shown = _cli("show", job.id, "--address", server.address)
        assert shown.returncode == 0, shown.stderr
        assert f"job {job.id} 'cli running'" in shown.stdout and "status    running" in shown.stdout
        assert '"name": "Adam"' in shown.stdout and "of 10000000" in shown.stdout

        cancelled = _cli("cancel", job.id, "--address", server.address)
        assert cancelled.returncode == 0, cancelled.stderr
        assert "status    cancelled" in cancelled.stdout
    finally:
        job.cancel()
    time.sleep(0.3)  # the step in flight at the cancel may still land (see test_cancel_answer_is_final)
    info = job.info()
    assert info.status == "cancelled" and len(job.history()["loss"]) == info.step

    missing = _cli("show", "0123456789abcdef", "--address", server.address)
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr, (missing.stdout, missing.stderr)
    no_id = _cli("cancel", "--address", server.address)
    assert no_id.returncode != 0 and "needs a job id" in no_id.stderr


# ---------------------------------------------------------------- 5: fair turns


def test_concurrent_jobs_take_fair_turns(reference):
    with ServerProcess("--job-runners", "1") as srv, gs.connect(srv.address, timeout=60) as remote:
        a = submit_fit(remote, name="a")
        b = submit_fit(remote, steps=2500, lr=0.02, name="b")
        assert wait_until(lambda: a.info().step > 0 and b.info().step > 0, timeout=30)
        samples = []  # (a's step, b's step) every 0.2 s while both run
        while True:
            time.sleep(0.2)
            ia, ib = a.info(), b.info()
            if ia.status != "running" or ib.status != "running":
                break
            samples.append((ia.step, ib.step))
        assert len(samples) >= 3, samples
        for k in (0, 1):  # one runner thread, yet both advance between every two samples
            steps = [s[k] for s in samples]
            assert all(x < y for x, y in itertools.pairwise(steps)), samples
        assert 0.5 < samples[-1][0] / samples[-1][1] < 2, samples  # and at about the same pace
        assert_same_result(a.wait(timeout=60).result(), reference, FIT_STEPS)
        local_b = local_minimize(fit, FIT_P0, args=(FIT_X, FIT_Y), optimizer=fit_opt(0.02), steps=2500)
        assert_same_result(b.wait(timeout=60).result(), local_b, 2500)


# ---------------------------------------------------------------- 6: bad job specs


SMALL_X = _rng.normal(size=(20, 3))
SMALL_Y = _rng.normal(size=20)
SMALL_P0 = {"w": np.zeros(3), "b": np.array(0.0)}


def small(p, X, y):
    return gs.mean((X @ p["w"] + p["b"] - y) ** 2)


def small_spec(X: np.ndarray = SMALL_X, y: np.ndarray = SMALL_Y, fun=small, batch_size: int = 0) -> pb.JobSpec:
    """A valid spec built by hand with the bare protobuf types (inputs p.w, p.b, X, y)."""
    rows = batch_size or len(X)
    graph = gs.trace(fun, SMALL_P0, X[:rows], y[:rows])
    spec = pb.JobSpec(graph_id=graph.id, optimizer_json=json.dumps({"name": "Adam", "lr": 0.1}), steps=20,
                      batch_size=batch_size, name="bad spec")
    spec.graph.CopyFrom(graph.to_proto())
    tensor_to_proto(SMALL_P0["w"], spec.params0["p.w"])
    tensor_to_proto(SMALL_P0["b"], spec.params0["p.b"])
    tensor_to_proto(X, spec.args["X"])
    tensor_to_proto(y, spec.args["y"])
    spec.arg_order.extend(["X", "y"])
    return spec


def _optimizer(js: str):
    def edit(spec):
        spec.optimizer_json = js
    return edit


def _set(field: str, value):
    def edit(spec):
        setattr(spec, field, value)
    return edit


def _param(name: str, value: np.ndarray | None, drop: str | None = None):
    def edit(spec):
        if drop is not None:
            del spec.params0[drop]
        if value is not None:
            tensor_to_proto(value, spec.params0[name])
    return edit


def _drop_arg(spec):
    del spec.args["y"]
    del spec.arg_order[1]


def _bad_arg(spec):
    tensor_to_proto(SMALL_Y[:7], spec.args["y"])


def _no_params(spec):
    spec.params0.clear()


def _vector_loss(spec):
    def vec(p, X, y):
        return X @ p["w"] + p["b"] - y
    good = small_spec(fun=vec)
    spec.graph.CopyFrom(good.graph)
    spec.graph_id = good.graph_id


def _batch_too_large(spec):  # a graph traced for minibatches of 21 rows, 20 rows of data
    X, y = np.concatenate([SMALL_X, SMALL_X[:1]]), np.concatenate([SMALL_Y, SMALL_Y[:1]])
    good = small_spec(X, y, batch_size=21)
    spec.graph.CopyFrom(good.graph)
    spec.graph_id = good.graph_id
    spec.batch_size = 21


def _batched_args_of_different_lengths(spec):  # minibatches of 8 rows; X has 20 rows, y 19
    spec.CopyFrom(small_spec(batch_size=8))
    tensor_to_proto(SMALL_Y[:19], spec.args["y"])


BAD_SPECS = {
    "unknown optimizer": (_optimizer('{"name": "Nadam", "lr": 0.1}'), "Nadam"),
    "optimizer without name": (_optimizer('{"lr": 0.1}'), "name"),
    "optimizer name not a string": (_optimizer('{"name": ["Adam"], "lr": 0.1}'), "name"),
    "unknown hyper-parameter": (_optimizer('{"name": "Adam", "momentum": 0.9}'), "momentum"),
    "negative lr": (_optimizer('{"name": "Adam", "lr": -0.1}'), "lr"),
    "beta1 out of range": (_optimizer('{"name": "Adam", "betas": [1.5, 0.999]}'), "betas[0]"),
    "beta2 out of range": (_optimizer('{"name": "Adam", "betas": [0.9, 1.0]}'), "betas[1]"),
    "betas not a pair": (_optimizer('{"name": "Adam", "betas": [0.9]}'), "betas"),
    "negative lbfgs history": (_optimizer('{"name": "LBFGS", "history_size": -1}'), "history_size"),
    "optimizer not JSON": (_optimizer("{Adam"), "JSON"),
    "steps 0": (_set("steps", 0), "steps"),
    "steps negative": (_set("steps", -3), "steps"),
    "negative tol": (_set("tol", -1.0), "tol"),
    "negative batch_size": (_set("batch_size", -2), "batch_size"),
    "param wrong shape": (_param("p.w", np.zeros(4)), "p.w"),
    "param wrong dtype": (_param("p.w", np.zeros(3, np.float32)), "p.w"),
    "param integer": (_param("p.w", np.zeros(3, np.int64)), "p.w"),
    "param wrong name": (_param("p.v", np.zeros(3), drop="p.w"), "p.v"),
    "param not an input": (_param("q", np.zeros(3)), "q"),
    "no params": (_no_params, "params"),
    "arg missing": (_drop_arg, "y"),
    "arg wrong shape": (_bad_arg, "y"),
    "batch larger than the data": (_batch_too_large, "batch_size=21"),
    "batched args of different lengths": (_batched_args_of_different_lengths, "same length"),
    "non-scalar loss": (_vector_loss, "scalar"),
    "loss not an output": (_set("loss", "nope"), "nope"),
    "graph_id not the graph's": (_set("graph_id", "0" * 64), "0" * 64),
}


def test_valid_hand_built_spec_runs(bare):
    job = bare.SubmitJob(pb.SubmitJobRequest(spec=small_spec()), timeout=30).job
    events = list(bare.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30))
    assert events[-1].status == "succeeded" and events[-1].step == 20
    spec = small_spec(np.concatenate([SMALL_X, SMALL_X]), np.concatenate([SMALL_Y, SMALL_Y]), batch_size=8)
    job = bare.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30).job  # minibatches of 8 out of 40 rows
    events = list(bare.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30))
    assert events[-1].status == "succeeded" and events[-1].step == 20


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_job_spec_is_invalid_argument(bare, case):
    edit, says = BAD_SPECS[case]
    spec = small_spec()
    edit(spec)
    before = len(bare.ListJobs(pb.ListJobsRequest(), timeout=10).jobs)
    with pytest.raises(grpc.RpcError) as e:
        bare.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert says in e.value.details(), e.value.details()
    assert len(bare.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == before  # nothing was stored


def test_bad_jobs_through_the_sdk(remote, bare):
    before = len(remote.jobs())
    args = (SMALL_X, SMALL_Y)
    for optimizer, says in [({"name": "Nadam"}, "Nadam"), ({"name": "Adam", "lr": -1.0}, "lr"),
                            ({"name": "Adam", "betas": [0.9, 2.0]}, "betas[1]")]:
        with pytest.raises(rm.RemoteInvalidArgument, match=re.escape(says)) as e:
            remote.minimize(small, SMALL_P0, args=args, optimizer=optimizer, steps=10)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(rm.RemoteInvalidArgument, match="steps"):
        remote.minimize(small, SMALL_P0, args=args, optimizer=optim.Adam(), steps=0)
    with pytest.raises(rm.RemoteInvalidArgument, match="scalar"):
        remote.minimize(lambda p, X, y: X @ p["w"] - y, SMALL_P0, args=args, optimizer=optim.Adam(), steps=10)
    with pytest.raises(ValueError, match="batch_size=21"):  # refused before it is sent (the bare case is above)
        remote.minimize(small, SMALL_P0, args=args, optimizer=optim.Adam(), steps=10, batch_size=21)
    assert len(remote.jobs()) == before
    # an unknown job or graph is NOT_FOUND, not INVALID_ARGUMENT
    with pytest.raises(rm.RemoteNotFound):
        remote.job("0123456789abcdef")
    spec = small_spec()
    spec.ClearField("graph")
    spec.graph_id = "f" * 64
    with pytest.raises(grpc.RpcError) as e:
        bare.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- 8: progress: WatchJob, the tqdm bar, the plot


def test_watch_streams_one_event_per_step_in_order(remote, bare, reference):
    job = submit_fit(remote, steps=400, name="watched")
    events = list(bare.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=60))
    *progress, last = events
    assert [e.step for e in progress] == list(range(1, 401))
    assert all(e.job_id == job.id for e in events)
    assert all(e.status in ("queued", "running", "succeeded") for e in progress)
    assert last.status == "succeeded" and last.step == 400 and last.message == "reached steps=400"
    np.testing.assert_allclose([e.loss for e in progress], reference.history["loss"][:400], rtol=0, atol=TOL)
    assert [e.loss for e in progress] == job.history()["loss"]
    assert [e.grad_norm for e in progress] == job.history()["grad_norm"]
    # from_step: only the events after it (the job is finished: replayed from memory)
    again = list(bare.WatchJob(pb.WatchJobRequest(job_id=job.id, from_step=390), timeout=10))
    assert [e.step for e in again[:-1]] == list(range(391, 401)) and again[-1].status == "succeeded"
    with pytest.raises(grpc.RpcError) as e:
        list(bare.WatchJob(pb.WatchJobRequest(job_id="0123456789abcdef"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_wait_progress_bar_and_plot(remote, capsys, tmp_path):
    job = submit_fit(remote, steps=1500, name="progress")
    assert job.wait(timeout=60, progress=True) is job
    err = capsys.readouterr().err
    assert f"job {job.id}" in err and "1500/1500" in err, err[-500:]
    fig = job.plot(tmp_path / "loss.png")  # the Figure, saved as the suffix says (more in test_optim_parity)
    assert fig.axes[0].get_title() == f"job {job.id}" and len(fig.axes[0].lines[0].get_ydata()) == 1500
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_wait_timeout(remote):
    job = submit_fit(remote, steps=10**7, name="too long")
    try:
        start = time.monotonic()
        with pytest.raises(rm.RemoteDeadlineExceeded):
            job.wait(timeout=0.3)
        assert time.monotonic() - start < 5
        assert job.status == "running"
    finally:
        job.cancel()
