"""Optimisation jobs: the SQLite job store and the manager that runs jobs on the engine.

A job minimises a registered graph's scalar output with a `gs.optim` optimiser, through the
same resumable loop as the local `gs.minimize`. Jobs take turns on a few runner threads, a
short quantum of steps each, so several run at once fairly. Progress (one event per step) is
kept in memory for watchers and in the store; parameters and optimiser state are checkpointed
every N steps or seconds, with a checksum. A server killed mid-job resumes each running job
from its last good checkpoint; finished results stay readable.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradserve import optim
from gradserve.minimize import LoopState, OptimizationLoop
from gradserve_engine.backend import Backend
from gradserve_engine.errors import GraphError, InvalidRequest, NotFound, StoreError
from gradserve_engine.ir import Graph, Limits, tensor_from_proto
from gradserve_engine.ops.core import FLOATS
from gradserve_engine.v1 import service_pb2 as pb

from .registry import GraphRegistry

log = logging.getLogger("gradserve.jobs")
SCHEMA_VERSION = "1"
FINISHED = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------- the store


class JobStore:
    """Jobs, their history and checkpoints in one SQLite file (in memory without a directory).
    Every write is a transaction; opening checks integrity and the schema version."""

    def __init__(self, directory: Path | None):
        self.path = directory / "jobs.sqlite" if directory is not None else None
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                      isolation_level=None)
            (ok,) = self.db.execute("PRAGMA quick_check").fetchone()
            if ok != "ok":
                raise StoreError(f"job store {self.path} is damaged: {ok}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._schema()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"job store {self.path} cannot be read ({e}); move it aside to start a new one") from None

    def _schema(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                found = row[0] if row else "unknown"
                raise StoreError(f"job store {self.path} has schema version {found}; this server reads version "
                                 f"{SCHEMA_VERSION}")
            return
        if tables:
            raise StoreError(f"job store {self.path} holds tables {sorted(tables)} but no schema version")
        with self.tx() as db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            # the spec (graph, params0, args: megabytes) has its own table: progress updates rewrite small rows
            db.execute("CREATE TABLE specs (job_id TEXT PRIMARY KEY, spec BLOB NOT NULL)")
            db.execute("""CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL,
                          step INTEGER, steps INTEGER, loss REAL, grad_norm REAL, message TEXT, created REAL,
                          updated REAL, fun REAL, graph_id TEXT, optimizer TEXT)""")
            db.execute("""CREATE TABLE history (job_id TEXT, step INTEGER, loss REAL, grad_norm REAL,
                          PRIMARY KEY (job_id, step))""")
            db.execute("""CREATE TABLE checkpoints (job_id TEXT, step INTEGER, data BLOB NOT NULL, sha256 TEXT NOT NULL,
                          created REAL, PRIMARY KEY (job_id, step))""")

    class _Tx:
        def __init__(self, store: JobStore):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store.db.execute("BEGIN IMMEDIATE")
            return self.store.db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def tx(self) -> JobStore._Tx:
        return JobStore._Tx(self)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def save_checkpoint(self, db: sqlite3.Connection, job_id: str, step: int, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads the keywords as allow_pickle
        data = buf.getvalue()
        db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                   (job_id, step, data, hashlib.sha256(data).hexdigest(), time.time()))
        db.execute("""DELETE FROM checkpoints WHERE job_id = ? AND step NOT IN
                      (SELECT step FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT 2)""", (job_id, job_id))

    def load_checkpoint(self, job_id: str) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest checkpoint whose checksum holds (a damaged one is reported and skipped)."""
        for step, data, digest in self.query("SELECT step, data, sha256 FROM checkpoints WHERE job_id = ? ORDER BY step DESC",
                                             (job_id,)):
            if hashlib.sha256(data).hexdigest() != digest:
                log.error("checkpoint of job %s at step %d fails its checksum; trying an older one", job_id, step)
                continue
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return step, {k: z[k] for k in z.files}
        return None


# ---------------------------------------------------------------- jobs


@dataclass
class Run:
    """A job being run: its loop, its progress for watchers, its cancel flag."""

    job_id: str
    spec: pb.JobSpec
    graph: Graph
    loss: str
    param_names: list[str]
    optimizer: optim.Optimizer
    state: LoopState
    loop: OptimizationLoop
    status: str = "queued"
    message: str = ""
    events: list[tuple[int, float, float]] = field(default_factory=list)
    cancel: bool = False
    fun: float = math.nan
    checkpoint_step: int = 0
    checkpoint_time: float = field(default_factory=time.monotonic)
    changed: threading.Condition = field(default_factory=threading.Condition)
    steps_iter: Iterator[Any] | None = None
    in_turn: bool = False  # a runner is stepping it now (guarded by the manager's queue lock)


class JobManager:
    """Validates, stores, runs, checkpoints and resumes jobs; `runners` threads take turns."""

    def __init__(self, engine: Backend, registry: GraphRegistry, store: JobStore, limits: Limits, runners: int = 2,
                 checkpoint_every: int = 500, checkpoint_seconds: float = 30.0, quantum_seconds: float = 0.05):
        self.engine, self.registry, self.store, self.limits = engine, registry, store, limits
        self.checkpoint_every, self.checkpoint_seconds, self.quantum = checkpoint_every, checkpoint_seconds, quantum_seconds
        self._runs: dict[str, Run] = {}
        self._queue: deque[str] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._runner, name=f"gradserve-job-{k}", daemon=True) for k in range(runners)]

    # ---- lifecycle
    def start(self) -> None:
        for (job_id,) in self.store.query("SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created"):
            try:
                self._resume(job_id)
            except Exception as e:  # one bad job must not keep the others from running
                log.error("job %s cannot resume: %s", job_id, e)
                self._finish_row(job_id, "failed", f"could not resume after a restart: {e}")
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop taking turns; running jobs stay 'running' in the store and resume on the next start."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=30)

    # ---- requests
    def submit(self, spec: pb.JobSpec) -> pb.Job:
        run = self._build(secrets.token_hex(8), spec, resume=None)
        if not spec.HasField("graph"):  # keep the graph with the job: it must not depend on the registry's LRU
            spec.graph.CopyFrom(run.graph.to_proto())
        now = time.time()
        with self.store.tx() as db:
            db.execute("INSERT INTO specs VALUES (?, ?)", (run.job_id, spec.SerializeToString()))
            db.execute("INSERT INTO jobs VALUES (?, ?, 'queued', 0, ?, NULL, NULL, '', ?, ?, NULL, ?, ?)",
                       (run.job_id, spec.name, spec.steps, now, now, run.graph.id, spec.optimizer_json))
        self._enqueue(run)
        return self.get(run.job_id)[0]

    def get(self, job_id: str) -> tuple[pb.Job, float]:
        rows = self.store.query("""SELECT id, name, status, step, steps, loss, grad_norm, message, created, updated,
                                   graph_id, optimizer, fun FROM jobs WHERE id = ?""", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id} does not exist")
        return self._job(rows[0]), rows[0][12] if rows[0][12] is not None else math.nan

    def list(self) -> list[pb.Job]:
        rows = self.store.query("""SELECT id, name, status, step, steps, loss, grad_norm, message, created, updated,
                                   graph_id, optimizer, fun FROM jobs ORDER BY created""")
        return [self._job(r) for r in rows]

    def _job(self, r: tuple) -> pb.Job:
        run = self._runs.get(r[0])
        job = pb.Job(job_id=r[0], name=r[1] or "", status=r[2], step=r[3] or 0, steps=r[4] or 0,
                     loss=r[5] if r[5] is not None else math.nan, grad_norm=r[6] if r[6] is not None else math.nan,
                     message=r[7] or "", created=r[8], updated=r[9], graph_id=r[10] or "", optimizer_json=r[11] or "")
        if run is not None:  # fresher than the store between checkpoints
            job.status, job.message, job.checkpoint_step = run.status, run.message, run.checkpoint_step
            if run.events:
                job.step, job.loss, job.grad_norm = run.events[-1]
        return job

    def history(self, job_id: str) -> tuple[builtins.list[float], builtins.list[float]]:
        self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            return list(run.state.history["loss"]), list(run.state.history["grad_norm"])
        rows = self.store.query("SELECT loss, grad_norm FROM history WHERE job_id = ? ORDER BY step", (job_id,))
        return [r[0] for r in rows], [r[1] for r in rows]

    def params(self, job_id: str) -> dict[str, np.ndarray]:
        self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            return dict(run.state.params)
        found = self.store.load_checkpoint(job_id)
        if found is None:
            return {}
        job, _ = self.get(job_id)
        if found[0] != job.step:
            raise NotFound(f"the parameters of job {job_id} at step {job.step} are damaged in the store (checksum); "
                           f"only those of step {found[0]} are intact")
        return {k[len("params."):]: v for k, v in found[1].items() if k.startswith("params.")}

    def cancel(self, job_id: str) -> pb.Job:
        self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None and run.status not in FINISHED:
            with run.changed:
                run.cancel = True
            with self._ready:  # a job in a turn sees the flag after its current step
                if job_id not in self._queue and not run.in_turn:
                    self._queue.append(job_id)
                    self._ready.notify()
            deadline = time.monotonic() + 10
            with run.changed:
                run.changed.wait_for(lambda: run.status in FINISHED, timeout=max(deadline - time.monotonic(), 0))
        return self.get(job_id)[0]

    def watch(self, job_id: str, from_step: int, active) -> Iterator[pb.JobEvent]:
        """Progress events after `from_step` until the job finishes (or the watcher leaves)."""
        job, _ = self.get(job_id)
        run = self._runs.get(job_id)
        if run is None:  # finished before this server started: replay the stored history
            rows = self.store.query("SELECT step, loss, grad_norm FROM history WHERE job_id = ? AND step > ? ORDER BY step",
                                    (job_id, from_step))
            for step, loss, gnorm in rows:
                yield pb.JobEvent(job_id=job_id, step=step, loss=loss, grad_norm=gnorm, status=job.status)
            yield pb.JobEvent(job_id=job_id, step=job.step, loss=job.loss, status=job.status, message=job.message)
            return
        sent = from_step
        while active():
            with run.changed:
                def ready(after: int = sent) -> bool:
                    return len(run.events) > after or run.status in FINISHED

                run.changed.wait_for(ready, timeout=0.5)
                new = run.events[sent:]  # events[i] is step i + 1
                status, message = run.status, run.message
            for step, loss, gnorm in new:
                yield pb.JobEvent(job_id=job_id, step=step, loss=loss, grad_norm=gnorm, status=status)
                sent = step
            if status in FINISHED:
                last = run.events[-1] if run.events else (0, math.nan, math.nan)
                yield pb.JobEvent(job_id=job_id, step=last[0], loss=last[1], grad_norm=last[2], status=status,
                                  message=message)
                return

    # ---- building and resuming
    def _build(self, job_id: str, spec: pb.JobSpec, resume: tuple[int, dict[str, np.ndarray]] | None) -> Run:
        """Validate a spec into a runnable job; every problem is an InvalidRequest (or GraphError) naming it."""
        if spec.HasField("graph"):
            graph = Graph.from_proto(spec.graph, self.limits)
            if spec.graph_id and spec.graph_id != graph.id:
                raise GraphError(f"job graph hashes to {graph.id}, not the graph_id {spec.graph_id} given")
        else:
            graph = self.registry.get(spec.graph_id)
        outputs = graph.output_names()
        loss = spec.loss or (outputs[0] if len(outputs) == 1 else "")
        if loss not in outputs:
            raise GraphError(f"job loss {spec.loss!r} is not an output of the graph; outputs are {outputs}")
        dtype, shape = graph.aval(dict(graph.outputs)[loss])
        if shape != () or dtype not in FLOATS:
            raise GraphError(f"job loss {loss!r} must be a scalar float, got {dtype}{list(shape)}")
        try:
            optimizer = optim.from_spec(json.loads(spec.optimizer_json or "{}"))
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"optimizer spec is not JSON: {e}") from None
        except ValueError as e:  # from_spec's ValueError names the bad field
            raise InvalidRequest(str(e)) from None
        if spec.steps < 1:
            raise InvalidRequest(f"steps must be at least 1, got {spec.steps}")
        if spec.tol < 0 or not math.isfinite(spec.tol) or spec.seed < 0 or spec.batch_size < 0:
            raise InvalidRequest(f"tol, seed and batch_size must be non-negative "
                                 f"(got {spec.tol}, {spec.seed}, {spec.batch_size})")
        names = set(graph.input_names())
        param_names = [n for n in graph.input_names() if n in spec.params0]
        unknown = sorted(set(spec.params0) - names)
        if unknown or not param_names:
            raise GraphError(f"params {sorted(spec.params0)} do not match the graph's inputs {graph.input_names()}")
        params0 = {}
        for n in param_names:
            a = tensor_from_proto(spec.params0[n], self.limits, f"params0 {n!r}")
            inp = graph.input(n)
            if inp.dtype not in FLOATS or a.dtype.name != inp.dtype or a.shape != inp.shape:
                raise GraphError(f"params0 {n!r} is {a.dtype}{list(a.shape)}; the graph's input is "
                                 f"{inp.dtype}{list(inp.shape)} (parameters must be float)")
            params0[n] = a
        arg_names = list(spec.arg_order) or sorted(spec.args)
        if set(arg_names) != names - set(param_names) or set(spec.args) != set(arg_names):
            raise GraphError(f"args {sorted(spec.args)} must be exactly the graph's other inputs "
                             f"{sorted(names - set(param_names))}")
        args = []
        for n in arg_names:
            a = tensor_from_proto(spec.args[n], self.limits, f"args {n!r}")
            want = graph.input(n).shape
            ok = a.shape == want if not spec.batch_size else (
                a.ndim >= 1 and a.shape[1:] == want[1:] and want[:1] == (spec.batch_size,) and a.shape[0] >= spec.batch_size)
            if a.dtype.name != graph.input(n).dtype or not ok:
                batched = f" with batch_size={spec.batch_size} along axis 0" if spec.batch_size else ""
                raise GraphError(f"args {n!r} is {a.dtype}{list(a.shape)}; the graph's input is "
                                 f"{graph.input(n).dtype}{list(want)}{batched}")
            args.append(a)
        axes = dict(spec.batch_axes)
        engine = self.engine

        def value_and_grad(params: dict[str, np.ndarray], batch: tuple) -> tuple[Any, Any]:
            outs, grads = engine.vjp(graph, {**params, **dict(zip(arg_names, batch, strict=True))}, param_names,
                                     outputs=[loss], batch_axes=axes or None)
            return outs[loss], grads

        state = LoopState.start(params0, optimizer) if resume is None else LoopState.from_arrays(resume[1], optimizer, params0)
        try:
            loop = OptimizationLoop(value_and_grad, optimizer, state, args=tuple(args), steps=int(spec.steps),
                                    batch_size=int(spec.batch_size) or None, seed=int(spec.seed), tol=spec.tol or None)
        except ValueError as e:  # the loop's ValueError names the argument (batch_size against the args' rows)
            raise InvalidRequest(str(e)) from None
        run = Run(job_id, spec, graph, loss, param_names, optimizer, state, loop)
        run.events = list(zip(range(1, state.step + 1), state.history["loss"], state.history["grad_norm"], strict=True))
        run.checkpoint_step = state.step
        return run

    def _resume(self, job_id: str) -> None:
        (spec_bytes,) = self.store.query("SELECT spec FROM specs WHERE job_id = ?", (job_id,))[0]
        spec = pb.JobSpec.FromString(spec_bytes)
        found = self.store.load_checkpoint(job_id)
        run = self._build(job_id, spec, found)
        with self.store.tx() as db:  # history past the checkpoint is redone
            db.execute("DELETE FROM history WHERE job_id = ? AND step > ?", (job_id, run.state.step))
        log.info("job %s resumes at step %d", job_id, run.state.step)
        self._enqueue(run)

    def _enqueue(self, run: Run) -> None:
        self._runs[run.job_id] = run
        run.steps_iter = iter(run.loop)
        with self._ready:
            self._queue.append(run.job_id)
            self._ready.notify()

    # ---- running
    def _runner(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                run = self._runs[self._queue.popleft()]
                run.in_turn = True
            try:
                requeue = self._turn(run)
            except Exception as e:  # a failing job fails alone
                log.exception("job %s failed", run.job_id)
                self._end(run, "failed", f"{type(e).__name__}: {e}")
                requeue = False
            with self._ready:
                run.in_turn = False
                if requeue or (run.cancel and run.status not in FINISHED):
                    self._queue.append(run.job_id)
                    self._ready.notify()

    def _turn(self, run: Run) -> bool:
        """One quantum of steps; returns whether the job goes back in the queue."""
        if run.cancel:
            self._end(run, "cancelled", f"cancelled after step {run.state.step}")
            return False
        if run.status == "queued":
            run.status = "running"
            with self.store.tx() as db:
                db.execute("UPDATE jobs SET status = 'running', updated = ? WHERE id = ?", (time.time(), run.job_id))
        rows, done = [], False
        until = time.monotonic() + self.quantum
        steps = run.steps_iter
        while steps is not None and time.monotonic() < until and not run.cancel and not self._stopping:
            info = next(steps, None)
            if info is None:
                done = True
                break
            rows.append((run.job_id, info.step, info.loss, info.grad_norm))
            with run.changed:
                run.events.append((info.step, info.loss, info.grad_norm))
                run.changed.notify_all()
        every = run.spec.checkpoint_every or self.checkpoint_every  # the job's own setting, else the server's
        seconds = run.spec.checkpoint_seconds or self.checkpoint_seconds
        due = run.state.step - run.checkpoint_step >= every or time.monotonic() - run.checkpoint_time >= seconds
        with self.store.tx() as db:
            db.executemany("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)", rows)
            if rows:
                db.execute("UPDATE jobs SET step = ?, loss = ?, grad_norm = ?, updated = ? WHERE id = ?",
                           (rows[-1][1], rows[-1][2], rows[-1][3], time.time(), run.job_id))
            if (due or done or run.cancel) and run.state.step > run.checkpoint_step:
                self.store.save_checkpoint(db, run.job_id, run.state.step, run.state.to_arrays(run.optimizer))
                run.checkpoint_step, run.checkpoint_time = run.state.step, time.monotonic()
        if done:
            loop = run.loop
            if loop.last_eval is not None:
                run.fun = float(loop.last_eval[0])
            elif loop.batch_size is None:
                run.fun = float(loop.value_and_grad(run.state.params, loop.args)[0])
            else:
                run.fun = run.state.history["loss"][-1] if run.state.history["loss"] else math.nan
            self._end(run, "succeeded" if loop.success else "failed", loop.message)
            return False
        if run.cancel:
            self._end(run, "cancelled", f"cancelled after step {run.state.step}")
            return False
        return not self._stopping

    def _end(self, run: Run, status: str, message: str) -> None:
        if run.status in FINISHED:  # the first ending is final
            return
        with self.store.tx() as db:
            if run.state.step > run.checkpoint_step:
                self.store.save_checkpoint(db, run.job_id, run.state.step, run.state.to_arrays(run.optimizer))
                run.checkpoint_step = run.state.step
            db.execute("UPDATE jobs SET status = ?, message = ?, fun = ?, updated = ? WHERE id = ?",
                       (status, message, None if math.isnan(run.fun) else run.fun, time.time(), run.job_id))
        with run.changed:
            run.status, run.message = status, message
            run.changed.notify_all()

    def _finish_row(self, job_id: str, status: str, message: str) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET status = ?, message = ?, updated = ? WHERE id = ?",
                       (status, message, time.time(), job_id))
