"""Optimisation jobs: the SQLite job store and the manager that runs jobs on the engine.

A job minimises a registered graph's scalar output with a `gs.optim` optimiser, through the
same resumable loop as the local `gs.minimize`. Jobs take turns on a few runner threads, a
short quantum of steps each, so several run at once fairly. Progress is kept in memory for
watchers and in the store, as a bounded history (`History`: every step up to `history_points`
points, then every 2nd, 4th, ... step); parameters and optimiser state are checkpointed every N
steps or seconds, with a checksum. A server killed mid-job resumes each running job from its
last good checkpoint; finished results stay readable, from the store only: a finished job's
memory is freed (its run, arguments and parameters, and the plans of a graph no call or other
job uses), until DeleteJob or the retention sweep deletes its rows too.

Several servers may share one store: a lease row in it (owner, expiry, renewed by its holder)
lets one of them run the jobs; the others serve them (submit, get, list, watch, cancel through
the store) and take the lease over when it expires.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradserve import optim
from gradserve.minimize import FAILED, STOPPED, LoopState, OptimizationLoop, tree_norm
from gradserve_engine.backend import Backend
from gradserve_engine.errors import (
    Cancelled,
    FailedPrecondition,
    GraphError,
    InvalidRequest,
    NotFound,
    Overloaded,
    StoreError,
    StoreUnavailable,
)
from gradserve_engine.ir import Graph, Limits, duplicates, tensor_from_proto
from gradserve_engine.ops.core import FLOATS
from gradserve_engine.plan import stop_when
from gradserve_engine.v1 import service_pb2 as pb

from . import heap
from .bounds import Slots
from .registry import GraphRegistry, is_graph_id

log = logging.getLogger("gradserve.jobs")
SCHEMA_VERSION = "1"
FINISHED = ("succeeded", "failed", "cancelled")
CANCELLING = "cancelling"  # asked to cancel; it stops after the step in flight (CancelJob's pending answer)
CANCEL_WAIT = 2.0  # seconds CancelJob waits for the step in flight before answering "cancelling"
SUMMARY_CHARS = 256  # of a name or message in ListJobs' summaries
MESSAGE_CHARS = 4000  # of a job's message as stored (a failure's text is cut to it)
LEASE = "runner"  # the lease row: the server that holds it runs the store's jobs
FINISHED_SQL = "('succeeded', 'failed', 'cancelled')"  # FINISHED, as an SQL list
SWEEP_BATCH = 500  # jobs deleted per transaction of a retention sweep (the store's lock is held that long)
DAY = 86_400.0


# ---------------------------------------------------------------- the store


def _store_failure(e: BaseException) -> bool:
    """An SQLite error of the store's state (locked, busy, I/O, full, damaged, closed), not of a statement."""
    return (isinstance(e, sqlite3.OperationalError) or type(e) is sqlite3.DatabaseError
            or (isinstance(e, sqlite3.ProgrammingError) and "closed" in str(e)))


def _busy(e: BaseException) -> bool:
    text = str(e)
    return "locked" in text or "busy" in text


def _rollback(db: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # nothing to roll back: BEGIN failed, or SQLite rolled back itself
        db.execute("ROLLBACK")


class JobStore:
    """Jobs, their history and checkpoints in one SQLite file (in memory without a directory).

    Every write is a transaction on the writer connection; reads go through a second connection,
    which (WAL) keeps reading while a writer, this server or another process (a backup, a
    VACUUM), holds the write lock. Every statement waits at most `busy_seconds` for a lock held
    elsewhere and every lock of this process is released on every path: a store locked for
    longer answers StoreUnavailable (UNAVAILABLE, retry), it never wedges a thread. Opening
    checks integrity and the schema version."""

    def __init__(self, directory: Path | None, busy_seconds: float = 5.0):
        self.path = directory / "jobs.sqlite" if directory is not None else None
        self.busy_seconds = float(busy_seconds)
        self.lock_seconds = 2 * self.busy_seconds + 10  # the most a call waits for this process's other writers
        self._lock = threading.Lock()
        self.failing_since: float | None = None  # monotonic time of the first failure since the last good write
        self.last_error = ""
        target = str(self.path) if self.path else ":memory:"
        try:
            self.db = self._connect(target)
            (ok,) = self.db.execute("PRAGMA quick_check").fetchone()
            if ok != "ok":
                raise StoreError(f"job store {self.path} is damaged: {ok}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back to 64 MiB after a checkpoint
            self._schema()
            self.reader = self._connect(target) if self.path else self.db
        except sqlite3.OperationalError as e:
            if _busy(e):
                raise StoreUnavailable(f"job store {self.path} is locked by another process ({e}) for more than "
                                       f"{self.busy_seconds:g} s; start again once it is released") from None
            raise StoreError(f"job store {self.path} cannot be read ({e}); move it aside to start a new one") from None
        except sqlite3.DatabaseError as e:
            raise StoreError(f"job store {self.path} cannot be read ({e}); move it aside to start a new one") from None
        self._read_lock = threading.Lock() if self.path else self._lock  # one connection in memory

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, timeout=self.busy_seconds, check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={int(self.busy_seconds * 1000)}")
        return db

    def _schema(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                found = row[0] if row else "unknown"
                raise StoreError(f"job store {self.path} has schema version {found}; this server reads version "
                                 f"{SCHEMA_VERSION}")
            if "lease" not in tables:  # a store of a server before leases: the table is added, nothing else changes
                with self.tx() as db:
                    db.execute(self._LEASE_TABLE)
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
            db.execute(self._LEASE_TABLE)

    _LEASE_TABLE = "CREATE TABLE IF NOT EXISTS lease (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)"

    # ---- failures: counted for health, answered UNAVAILABLE
    def unavailable(self, e: BaseException) -> StoreUnavailable:
        """The StoreUnavailable for SQLite error `e` (noted: health reports it until a write succeeds)."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("job store %s fails: %s", self.path or "(in memory)", e)
        self.last_error = f"{type(e).__name__}: {e}"
        hint = " (another process holds its lock, e.g. a backup or VACUUM)" if _busy(e) else ""
        return StoreUnavailable(f"the job store cannot be used now{hint}: {e}; retry later")

    def _ok(self) -> None:
        if self.failing_since is not None:
            log.warning("job store %s works again", self.path or "(in memory)")
            self.failing_since = None

    def _acquire(self, lock: threading.Lock) -> None:
        if not lock.acquire(timeout=self.lock_seconds):
            raise self.unavailable(TimeoutError(f"the store's lock was held for more than {self.lock_seconds:g} s"))

    class _Tx:
        def __init__(self, store: JobStore):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            store = self.store
            store._acquire(store._lock)
            try:
                store.db.execute("BEGIN IMMEDIATE")  # waits up to busy_seconds for a lock held elsewhere
            except BaseException as e:
                store._lock.release()
                if _store_failure(e):
                    raise store.unavailable(e) from None
                raise
            return store.db

        def __exit__(self, exc_type, exc, tb) -> None:
            store = self.store
            try:
                if exc_type is not None:
                    _rollback(store.db)
                    if _store_failure(exc):
                        raise store.unavailable(exc) from None
                    return
                try:
                    store.db.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(store.db)
                    if _store_failure(e):
                        raise store.unavailable(e) from None
                    raise
                store._ok()
            finally:
                store._lock.release()

    def tx(self) -> JobStore._Tx:
        return JobStore._Tx(self)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        self._acquire(self._read_lock)
        try:
            return self.reader.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            if _store_failure(e):
                raise self.unavailable(e) from None
            raise
        finally:
            self._read_lock.release()

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

    def close(self) -> None:
        """Close the connections (the last one folds the WAL into the file)."""
        with self._lock:
            for db in {id(self.reader): self.reader, id(self.db): self.db}.values():
                with contextlib.suppress(sqlite3.Error):
                    db.close()


# ---------------------------------------------------------------- progress, bounded


class History:
    """A job's progress points (step, loss, grad_norm), at most `limit` of them: every step until
    the history is full, then every 2nd step, then every 4th, ...: each time it fills, `stride`
    doubles and the points between go. A job of any length keeps an evenly spaced curve of
    limit/2 to limit points, at the steps that are multiples of `stride`."""

    def __init__(self, limit: int, stride: int = 1):
        self.limit, self.stride = max(int(limit), 2), max(int(stride), 1)
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.grad_norm: list[float] = []

    def add(self, step: int, loss: float, grad_norm: float) -> bool:
        """Record step `step`; returns whether it is kept (for now: a later halving may drop it)."""
        if step % self.stride:
            return False
        self.steps.append(step)
        self.loss.append(loss)
        self.grad_norm.append(grad_norm)
        while len(self.steps) > self.limit:
            self.stride *= 2
            keep = [i for i, s in enumerate(self.steps) if s % self.stride == 0]
            self.steps = [self.steps[i] for i in keep]
            self.loss = [self.loss[i] for i in keep]
            self.grad_norm = [self.grad_norm[i] for i in keep]
        return step % self.stride == 0

    def after(self, step: int) -> list[tuple[int, float, float]]:
        """The points past `step`."""
        i = bisect.bisect_right(self.steps, step)
        return list(zip(self.steps[i:], self.loss[i:], self.grad_norm[i:], strict=True))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"history.step": np.array(self.steps, np.int64), "history.loss": np.array(self.loss, np.float64),
                "history.grad_norm": np.array(self.grad_norm, np.float64), "history.stride": np.array(self.stride)}


def _split_checkpoint(arrays: dict[str, np.ndarray], limit: int) -> tuple[dict[str, np.ndarray], int, int, History]:
    """A checkpoint's loop arrays (with an empty history, for LoopState.from_arrays), its step and
    evaluations, and its History. Checkpoints written before histories were bounded hold a point
    for every step and no `history.step`."""
    arrays = {k: v for k, v in arrays.items() if not k.startswith("result.")}  # what the job's result reads
    step, nfev = int(np.asarray(arrays["step"])), int(np.asarray(arrays["nfev"]))
    loss = np.asarray(arrays.pop("history.loss", np.zeros(0)), np.float64)
    gnorm = np.asarray(arrays.pop("history.grad_norm", np.zeros(0)), np.float64)
    arrays.pop("history.nfev", None)
    steps = arrays.pop("history.step", None)
    stride = int(np.asarray(arrays.pop("history.stride", np.array(1))))
    steps = np.arange(1, len(loss) + 1) if steps is None else np.asarray(steps, np.int64)
    if not len(steps) == len(loss) == len(gnorm):
        raise ValueError(f"checkpoint history lengths {len(steps)}, {len(loss)}, {len(gnorm)} differ")
    history = History(limit, stride)
    for s, lo, g in zip(steps.tolist(), loss.tolist(), gnorm.tolist(), strict=True):
        history.add(s, lo, g)
    arrays.update({"step": np.array(0), "nfev": np.array(0), "history.loss": np.zeros(0), "history.grad_norm": np.zeros(0),
                   "history.nfev": np.zeros(0, np.int64)})
    return arrays, step, nfev, history


# ---------------------------------------------------------------- jobs


def _cut(message: str) -> str:
    """A job's message as stored: at most MESSAGE_CHARS characters."""
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + f"... (cut from {len(message)} characters)"


def _progress(status: str) -> str:
    """The status a progress event carries: a finished status only on the stream's last event (a
    watcher stops at the first finished status it sees)."""
    return "running" if status in FINISHED else status


class _LeaseLost(Exception):
    """Another server holds the store's lease now: this one must not write its jobs."""


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
    history: History
    status: str = "queued"
    message: str = ""
    last: tuple[int, float, float] | None = None  # the newest step's (step, loss, grad_norm)
    cancel: bool = False
    fun: float = math.nan
    jac: dict[str, np.ndarray] | None = None  # the gradient at the final params on all the data, when known
    final_nfev: int = 0  # evaluations made for fun and jac after the loop
    checkpoint_step: int = 0
    checkpoint_time: float = field(default_factory=time.monotonic)
    changed: threading.Condition = field(default_factory=threading.Condition)
    steps_iter: Iterator[Any] | None = None
    in_turn: bool = False  # a runner (or a cancel) is working on it now (guarded by the manager's queue lock)
    pending: list[tuple[int, float, float]] = field(default_factory=list)  # kept points not yet in the store
    store_stride: int = 1  # the history stride the store's rows have
    final: tuple[str, str] | None = None  # an ending (status, message) not yet written to the store
    dropped: bool = False  # another server runs it now (this one lost the lease)


class JobManager:
    """Validates, stores, runs, checkpoints and resumes jobs; `runners` threads take turns.

    `history_points` bounds each job's progress points (see History); `max_waiters` bounds the
    calls that wait on jobs (WatchJob streams, CancelJob waiting for the step in flight), so they
    never take the threads other calls need: a watcher past it is refused (RESOURCE_EXHAUSTED), a
    cancel past it answers at once. With a store directory, `lease_seconds` is the lease's term.
    `max_name` and `max_optimizer_json` bound those fields of a spec (characters).

    Retention: finished jobs past the newest `retention_count` (by the time they finished) or
    finished more than `retention_days` ago are deleted (0: no such bound), at start and every
    `sweep_seconds` by the server that runs the jobs."""

    def __init__(self, engine: Backend, registry: GraphRegistry, store: JobStore, limits: Limits, runners: int = 2,
                 checkpoint_every: int = 500, checkpoint_seconds: float = 30.0, quantum_seconds: float = 0.05,
                 history_points: int = 10_000, max_waiters: int = 16, lease_seconds: float = 15.0,
                 max_name: int = 256, max_optimizer_json: int = 65_536, retention_count: int = 0,
                 retention_days: float = 0.0, sweep_seconds: float = 60.0):
        self.engine, self.registry, self.store, self.limits = engine, registry, store, limits
        self.checkpoint_every, self.checkpoint_seconds, self.quantum = checkpoint_every, checkpoint_seconds, quantum_seconds
        self.history_points, self.lease_seconds = history_points, lease_seconds
        self.max_name, self.max_optimizer_json = max_name, max_optimizer_json
        self.retention_count, self.retention_days, self.sweep_seconds = retention_count, retention_days, sweep_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.shared = store.path is not None  # a store on disk may be shared: only the lease holder runs jobs
        self.leader = False
        self._runs: dict[str, Run] = {}
        self._ended = 0  # jobs ended so far (a runner trims the heap after a turn that ended one)
        self._queue: deque[str] = deque()
        self._ready = threading.Condition()  # guards _runs, _queue, in_turn
        self._stopping = False
        self._stopped = threading.Event()  # set with _stopping: what waits for a time, or the stop, waits on it
        self._started = False
        self.waiters = Slots(max_waiters)  # calls waiting on jobs
        self._threads = [threading.Thread(target=self._runner, name=f"gradserve-job-{k}", daemon=True) for k in range(runners)]
        self._keeper = threading.Thread(target=self._keep_loop, name="gradserve-job-lease", daemon=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="gradserve-job-retention", daemon=True)
        self._tick = min(1.0, lease_seconds / 5)

    # ---- lifecycle
    def start(self) -> None:
        """Take the lease (or learn who holds it), resume this store's jobs if it is ours, start the runners."""
        try:
            self._keep()
        except StoreUnavailable as e:  # the keeper tries again every tick
            log.warning("job store: %s", e)
        self._sweep_if_leader()
        for t in self._threads:
            t.start()
        if self.shared:
            self._keeper.start()
        if self.retains:
            self._sweeper.start()
        self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking turns (a step in flight stops between kernels); running jobs stay 'running' in the
        store, checkpointed, and resume on the next start. The lease is given up for another server."""
        deadline = time.monotonic() + timeout
        with self._ready:
            self._stopping = True
            self._stopped.set()
            self._ready.notify_all()
        for t in [*self._threads, self._keeper, self._sweeper]:
            if t.is_alive():
                t.join(timeout=max(deadline - time.monotonic(), 0.0))
        if self.shared and self.leader:
            try:
                with self.store.tx() as db:  # an empty owner: nobody's, and no late write of ours passes the check
                    db.execute("UPDATE lease SET owner = '', expires = 0 WHERE name = ? AND owner = ?", (LEASE, self.owner))
            except StoreUnavailable as e:
                log.warning("could not give up the job lease (it expires in %g s): %s", self.lease_seconds, e)
            self.leader = False

    def close(self) -> None:
        """After `stop` and the last call: close the store (unless a step that ignores its
        cancellation still runs: it keeps it)."""
        if not any(t.is_alive() for t in self._threads):
            self.store.close()

    def problem(self) -> str | None:
        """Why this server cannot run its jobs now (None: it can): a dead runner, a store whose writes
        have failed for `busy_seconds` and more (a lock held a moment longer is not a reason)."""
        if self._started and not self._stopping:
            others = [*([self._keeper] if self.shared else []), *([self._sweeper] if self.retains else [])]
            dead = [t.name for t in [*self._threads, *others] if not t.is_alive()]
            if dead:
                return f"job threads {', '.join(dead)} stopped"
        store = self.store
        if store.failing_since is not None:  # a write failed since the last good one: does one go through now?
            with contextlib.suppress(StoreUnavailable), store.tx():
                pass
        since = store.failing_since
        if since is not None and time.monotonic() - since >= store.busy_seconds:  # not a lock held a moment
            return f"the job store fails: {store.last_error}"
        return None

    @property
    def waiting(self) -> int:
        """Calls waiting on jobs now (WatchJob streams, CancelJob waits)."""
        return self.waiters.held

    @property
    def active(self) -> int:
        """Jobs held in memory (queued or running here)."""
        return len(self._runs)

    # ---- the lease (a store on disk)
    def _keep_loop(self) -> None:
        while not self._stopped.wait(self._tick):
            try:
                self._keep()
            except StoreUnavailable:
                pass  # noted by the store (health); tried again next tick
            except Exception:  # the keeper must outlive any one failure
                log.exception("job lease keeper")

    def _keep(self) -> None:
        """Renew or take the lease; as its holder, run the jobs submitted or cancelled through other servers."""
        if not self.shared:
            self.leader = True
            return
        now = time.time()
        with self.store.tx() as db:
            row = db.execute("SELECT owner, expires FROM lease WHERE name = ?", (LEASE,)).fetchone()
            mine = (row is None or row[0] == self.owner or row[1] < now) and not self._stopping
            if mine:
                db.execute("INSERT OR REPLACE INTO lease VALUES (?, ?, ?)", (LEASE, self.owner, now + self.lease_seconds))
        if mine and not self.leader:
            log.info("this server runs the jobs of %s (it holds the lease)", self.store.path)
            self.leader = True
        elif not mine and self.leader:
            log.error("another server (%s) took over the jobs of %s; this one stops running them", row[0], self.store.path)
            self.leader = False
            self._drop_all()
        elif not mine and not self._started:
            log.info("another server (%s) runs the jobs of %s; this one serves them without running them",
                     row[0], self.store.path)
        if self.leader:
            self._sync()

    def _check_lease(self, db: sqlite3.Connection) -> None:
        """Inside a write: raise _LeaseLost unless this server holds the lease."""
        if self.shared:
            row = db.execute("SELECT owner FROM lease WHERE name = ?", (LEASE,)).fetchone()
            if row is None or row[0] != self.owner:
                raise _LeaseLost()

    def _sync(self) -> None:
        """Resume the store's unfinished jobs this server does not run yet (after a restart, a
        takeover, or submitted through another server) and apply cancels asked through another."""
        for job_id, status in self.store.query(
                "SELECT id, status FROM jobs WHERE status IN ('queued', 'running', 'cancelling') ORDER BY created"):
            if self._stopping or not self.leader:
                return
            run = self._runs.get(job_id)
            if run is not None:
                if status == CANCELLING and not run.cancel:
                    self._request_cancel(run)
                continue
            try:
                if status == CANCELLING:
                    self._finish_stored_cancel(job_id)
                else:
                    self._resume(job_id)
            except (StoreUnavailable, _LeaseLost):
                return  # tried again next tick
            except Exception as e:  # one bad job must not keep the others from running
                log.error("job %s cannot resume: %s", job_id, e)
                self._finish_row(job_id, "failed", f"could not resume after a restart: {e}")

    def _drop_all(self) -> None:
        """Forget every run (another server runs them now, from their checkpoints)."""
        with self._ready:
            runs = list(self._runs.values())
            self._runs.clear()
            self._queue.clear()
        for run in runs:
            self._drop(run)

    def _drop(self, run: Run) -> None:
        with self._ready:
            if self._runs.get(run.job_id) is run:
                del self._runs[run.job_id]
        with run.changed:
            run.dropped = True
            run.changed.notify_all()
        self._forget_plans(run)

    def _forget_plans(self, run: Run) -> None:
        """A run left this server: its graph's plans go too, unless another run here uses the graph
        or the registry serves it to calls (they are the registry's then: DeleteGraph drops them)."""
        gid = run.graph.id
        with self._ready:
            if any(other.graph.id == gid for other in self._runs.values()):
                return
        if not self.registry.holds(gid):
            self.engine.forget(gid)

    # ---- retention
    @property
    def retains(self) -> bool:
        """Whether retention bounds the finished jobs kept (a count, an age, or both)."""
        return self.retention_count > 0 or self.retention_days > 0

    def _sweep_loop(self) -> None:
        while not self._stopped.wait(self.sweep_seconds):
            self._sweep_if_leader()

    def _sweep_if_leader(self) -> None:
        """The sweep, by the server that runs the jobs (the others leave it to that one)."""
        if not (self.retains and self.leader):
            return
        try:
            self.sweep()
        except StoreUnavailable as e:  # noted by the store (health); tried again next sweep
            log.warning("job retention: the sweep waits for the store: %s", e)
        except Exception:  # the sweeper outlives any one failure
            log.exception("job retention sweep")

    def sweep(self, now: float | None = None) -> int:
        """Delete the finished jobs retention does not keep: those past the newest `retention_count`
        (by the time they finished) and those finished more than `retention_days` before `now`
        (default: the present), in transactions of SWEEP_BATCH jobs. Returns how many went."""
        if not self.retains:
            return 0
        now = time.time() if now is None else now
        bounds, args = [], []
        if self.retention_days > 0:
            bounds.append("updated < ?")
            args.append(now - self.retention_days * DAY)
        if self.retention_count > 0:
            bounds.append(f"""id IN (SELECT id FROM jobs WHERE status IN {FINISHED_SQL}
                              ORDER BY updated DESC, id DESC LIMIT -1 OFFSET ?)""")
            args.append(self.retention_count)
        deleted = 0
        while not self._stopping:
            with self.store.tx() as db:
                ids = [r[0] for r in db.execute(f"SELECT id FROM jobs WHERE status IN {FINISHED_SQL} AND "
                                                f"({' OR '.join(bounds)}) LIMIT ?", (*args, SWEEP_BATCH))]
                self._delete_rows(db, ids)
            deleted += len(ids)
            if len(ids) < SWEEP_BATCH:
                break
        if deleted:
            log.info("job retention: %d finished jobs deleted", deleted)
        return deleted

    @staticmethod
    def _delete_rows(db: sqlite3.Connection, ids: builtins.list[str]) -> None:
        """Every row of these jobs: the job, its history, checkpoints and spec (inside a write)."""
        for table, key in (("jobs", "id"), ("history", "job_id"), ("checkpoints", "job_id"), ("specs", "job_id")):
            db.executemany(f"DELETE FROM {table} WHERE {key} = ?", [(i,) for i in ids])

    # ---- requests
    def submit(self, spec: pb.JobSpec) -> pb.Job:
        self._check_fields(spec)
        run = self._build(secrets.token_hex(8), spec, resume=None)
        if not spec.HasField("graph"):  # keep the graph with the job: it must not depend on the registry's LRU
            spec.graph.CopyFrom(run.graph.to_proto())
        runs_here = self.leader and not self._stopping
        if runs_here:
            self._adopt(run)  # before the row exists: the lease keeper must not resume it a second time
        now = time.time()
        try:
            with self.store.tx() as db:
                db.execute("INSERT INTO specs VALUES (?, ?)", (run.job_id, spec.SerializeToString()))
                db.execute("INSERT INTO jobs VALUES (?, ?, 'queued', 0, ?, NULL, NULL, '', ?, ?, NULL, ?, ?)",
                           (run.job_id, spec.name, spec.steps, now, now, run.graph.id, spec.optimizer_json))
        except BaseException:
            self._drop(run)
            raise
        if runs_here:
            self._schedule(run)
        return self.get(run.job_id)[0]

    def get(self, job_id: str) -> tuple[pb.Job, float]:
        rows = self.store.query("""SELECT id, name, status, step, steps, loss, grad_norm, message, created, updated,
                                   graph_id, optimizer, fun FROM jobs WHERE id = ?""", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id} does not exist")
        return self._job(rows[0]), rows[0][12] if rows[0][12] is not None else math.nan

    def list(self, after: tuple[float, str] | None, limit: int) -> tuple[builtins.list[pb.Job], bool]:
        """A page of job summaries, oldest first (by created time, then id): the first `limit` after
        the job whose (created, id) is `after` (None: from the first), and whether more follow. A
        summary leaves out the optimizer spec and cuts the name and message to SUMMARY_CHARS: a
        page's size is bounded."""
        where, args = ("WHERE created > ? OR (created = ? AND id > ?)", (after[0], after[0], after[1])) if after else ("", ())
        rows = self.store.query(f"""SELECT id, substr(name, 1, {SUMMARY_CHARS}), status, step, steps, loss, grad_norm,
                                    substr(message, 1, {SUMMARY_CHARS}), created, updated, graph_id, '' FROM jobs {where}
                                    ORDER BY created, id LIMIT ?""", (*args, limit + 1))
        jobs = [self._job(r) for r in rows[:limit]]
        for job in jobs:  # a running job's message is its run's, which may be longer
            job.message = job.message[:SUMMARY_CHARS]
        return jobs, len(rows) > limit

    def _check_fields(self, spec: pb.JobSpec) -> None:
        """The bounds on a spec's free-form fields (the rest is checked against the graph)."""
        for what, text, limit in (("name", spec.name, self.max_name),
                                  ("optimizer_json", spec.optimizer_json, self.max_optimizer_json)):
            if len(text) > limit:
                raise InvalidRequest(f"job spec {what} has {len(text)} characters, over the limit of {limit}")
        if spec.graph_id and not is_graph_id(spec.graph_id):
            raise InvalidRequest(f"job spec graph_id {spec.graph_id[:80]!r} is not a graph id (64 lowercase hex digits, "
                                 "what RegisterGraph answers)")

    def _job(self, r: tuple) -> pb.Job:
        run = self._runs.get(r[0])
        job = pb.Job(job_id=r[0], name=r[1] or "", status=r[2], step=r[3] or 0, steps=r[4] or 0,
                     loss=r[5] if r[5] is not None else math.nan, grad_norm=r[6] if r[6] is not None else math.nan,
                     message=r[7] or "", created=r[8], updated=r[9], graph_id=r[10] or "", optimizer_json=r[11] or "")
        if run is not None and r[2] not in FINISHED:  # fresher than the store between writes
            with run.changed:
                job.status, job.message, job.checkpoint_step = run.status, run.message, run.checkpoint_step
                if run.last is not None:
                    job.step, job.loss, job.grad_norm = run.last
        return job

    def history(self, job_id: str) -> tuple[builtins.list[float], builtins.list[float]]:
        """The job's kept progress points (every step up to `history_points`, then evenly spaced: see History)."""
        self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            with run.changed:
                return list(run.history.loss), list(run.history.grad_norm)
        rows = self.store.query("SELECT loss, grad_norm FROM history WHERE job_id = ? ORDER BY step", (job_id,))
        return [r[0] for r in rows], [r[1] for r in rows]

    def params(self, job_id: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
        """The job's current (or final) parameters by input name, the gradient at the final
        params where the job evaluated it (by input name; empty otherwise), and what its
        OptimizeResult counts: `nit` (the optimiser's iterations), `nfev` and, once finished,
        `status` (scipy-style)."""
        job, _ = self.get(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            arrays = {f"params.{k}": v for k, v in run.state.params.items()}
            arrays.update(self._result_arrays(run))
        else:
            found = self.store.load_checkpoint(job_id)
            job, _ = self.get(job_id)
            if found is not None and found[0] != job.step:
                raise NotFound(f"the parameters of job {job_id} at step {job.step} are not intact in the store (damaged, "
                               f"or their checkpoint could not be saved); only those of step {found[0]} are")
            arrays = found[1] if found is not None else {}
        if "result.status" not in arrays and job.status in ("cancelled", "failed"):  # ended from outside the loop
            arrays = {**arrays, "result.status": np.array(STOPPED if job.status == "cancelled" else FAILED)}
        params = {k[len("params."):]: v for k, v in arrays.items() if k.startswith("params.")}
        jac = {k[len("result.jac."):]: v for k, v in arrays.items() if k.startswith("result.jac.")}
        counts = {k[len("result."):]: int(v) for k, v in arrays.items()
                  if k.startswith("result.") and not k.startswith("result.jac.")}
        return params, jac, counts

    def cancel(self, job_id: str) -> pb.Job:
        """Cancel a job. The answer is final (cancelled at the last step done) unless a step is in
        flight that does not stop within CANCEL_WAIT seconds: then it says "cancelling", and the job
        stops after that step."""
        job, _ = self.get(job_id)
        if job.status in FINISHED:
            return job
        run = self._runs.get(job_id)
        if run is None:  # run by another server (or not picked up yet): it sees the request in the store
            self._store_cancel(job_id)
            return self.get(job_id)[0]
        self._request_cancel(run)
        claimed = False
        with self._ready:
            if not run.in_turn and self._runs.get(job_id) is run:
                run.in_turn = claimed = True
                if job_id in self._queue:
                    self._queue.remove(job_id)
        if claimed:  # between turns: end it here, now
            try:
                self._end(run, "cancelled", f"cancelled after step {run.state.step}")
            except (StoreUnavailable, _LeaseLost) as e:
                log.warning("job %s: the cancel is recorded; writing it waits for the store: %s", job_id, e)
            finally:
                self._release(run, requeue=run.status not in FINISHED)
        elif self.waiters.take():  # a step is in flight: it stops between kernels
            try:
                with run.changed:
                    run.changed.wait_for(lambda: run.status in FINISHED or run.dropped, timeout=CANCEL_WAIT)
            finally:
                self.waiters.give()
        if run.status not in FINISHED:  # pending: a restart must not forget it
            try:
                self._store_cancel(job_id)
            except StoreUnavailable as e:
                log.warning("job %s: the cancel is not in the store yet: %s", job_id, e)
        return self.get(job_id)[0]

    def _request_cancel(self, run: Run) -> None:
        with run.changed:
            run.cancel = True
            if run.status not in FINISHED:
                run.status = CANCELLING
            run.changed.notify_all()

    def _store_cancel(self, job_id: str) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET status = ?, updated = ? WHERE id = ? AND status IN ('queued', 'running')",
                       (CANCELLING, time.time(), job_id))

    def delete(self, job_id: str) -> bool:
        """Delete a finished job: its row, history and checkpoints (its memory went when it finished).
        False when there is no such job (deleted already: a retried delete is harmless). A job not
        finished is refused (FailedPrecondition): a delete never throws work away; cancel it first."""
        with self.store.tx() as db:  # the status is read in the write: a job cannot start or resume in between
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            if row[0] not in FINISHED:
                then = "once it has stopped" if row[0] == CANCELLING else "after cancelling it (CancelJob)"
                raise FailedPrecondition(f"job {job_id} is {row[0]}: only a finished job can be deleted; delete it {then}")
            self._delete_rows(db, [job_id])
        return True

    def watch(self, job_id: str, from_step: int, active: Callable[[], bool]) -> Iterator[pb.JobEvent]:
        """Progress events after `from_step` (the kept points: see History) until the job finishes
        or the watcher leaves. A watcher of an unfinished job holds one of `max_waiters` slots."""
        job, _ = self.get(job_id)
        run = self._runs.get(job_id)
        if run is None and job.status in FINISHED:  # replay the stored history
            yield from self._replay(job_id, from_step)
            return
        if not self.waiters.take():
            raise Overloaded(f"the server is at its limit of {self.waiters.limit} calls waiting on jobs (WatchJob streams, "
                             f"cancels); retry later, or poll GetJob")
        try:
            if run is not None:
                yield from self._watch_run(run, from_step, active)
            else:
                yield from self._watch_store(job_id, from_step, active)
        finally:
            self.waiters.give()

    def _replay(self, job_id: str, after: int) -> Iterator[pb.JobEvent]:
        job, _ = self.get(job_id)
        rows = self.store.query("SELECT step, loss, grad_norm FROM history WHERE job_id = ? AND step > ? ORDER BY step",
                                (job_id, after))
        for step, loss, gnorm in rows:
            yield pb.JobEvent(job_id=job_id, step=step, loss=loss, grad_norm=gnorm, status=_progress(job.status))
        yield pb.JobEvent(job_id=job_id, step=job.step, loss=job.loss, grad_norm=job.grad_norm, status=job.status,
                          message=job.message)

    def _watch_run(self, run: Run, sent: int, active: Callable[[], bool]) -> Iterator[pb.JobEvent]:
        while active():
            with run.changed:
                def ready(after: int = sent) -> bool:
                    steps = run.history.steps
                    return bool(steps and steps[-1] > after) or run.status in FINISHED or run.dropped

                run.changed.wait_for(ready, timeout=0.5)
                new = run.history.after(sent)
                status, message, last, dropped = run.status, run.message, run.last, run.dropped
            for step, loss, gnorm in new:
                yield pb.JobEvent(job_id=run.job_id, step=step, loss=loss, grad_norm=gnorm, status=_progress(status))
                sent = step
            if status in FINISHED:
                step, loss, gnorm = last or (0, math.nan, math.nan)
                yield pb.JobEvent(job_id=run.job_id, step=step, loss=loss, grad_norm=gnorm, status=status, message=message)
                return
            if dropped:  # another server runs it now: follow the store
                yield from self._watch_store(run.job_id, sent, active)
                return

    def _watch_store(self, job_id: str, sent: int, active: Callable[[], bool]) -> Iterator[pb.JobEvent]:
        """Follow a job another server runs, through the store (twice a second)."""
        while active():
            job, _ = self.get(job_id)  # the status first: once finished, the history read next is complete
            if job.status in FINISHED:
                yield from self._replay(job_id, sent)
                return
            rows = self.store.query("SELECT step, loss, grad_norm FROM history WHERE job_id = ? AND step > ? "
                                    "ORDER BY step", (job_id, sent))
            for step, loss, gnorm in rows:
                yield pb.JobEvent(job_id=job_id, step=step, loss=loss, grad_norm=gnorm, status=_progress(job.status))
                sent = step
            if self._stopped.wait(0.5):
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
        except RecursionError:
            raise InvalidRequest("optimizer spec nests too deeply (an optimizer spec is one flat object)") from None
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
        repeated = duplicates(arg_names)
        if repeated:
            raise GraphError(f"arg_order names {repeated[:10]} more than once")
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

        if resume is None:
            state, history = LoopState.start(params0, optimizer), History(self.history_points)
        else:
            try:
                arrays, step, nfev, history = _split_checkpoint(resume[1], self.history_points)
                state = LoopState.from_arrays(arrays, optimizer, params0)
            except (ValueError, KeyError) as e:
                raise StoreError(f"the checkpoint of job {job_id} at step {resume[0]} does not fit its spec: {e}") from None
            state.step, state.nfev = step, nfev
        try:
            loop = OptimizationLoop(value_and_grad, optimizer, state, args=tuple(args), steps=int(spec.steps),
                                    batch_size=int(spec.batch_size) or None, seed=int(spec.seed), tol=spec.tol or None)
        except ValueError as e:  # the loop's ValueError names the argument (batch_size against the args' rows)
            raise InvalidRequest(str(e)) from None
        run = Run(job_id, spec, graph, loss, param_names, optimizer, state, loop, history)
        if history.steps:
            run.last = (history.steps[-1], history.loss[-1], history.grad_norm[-1])
        run.checkpoint_step, run.store_stride = state.step, history.stride
        return run

    def _resume(self, job_id: str) -> None:
        rows = self.store.query("SELECT spec FROM specs WHERE job_id = ?", (job_id,))
        if not rows:
            raise StoreError(f"job {job_id} has no spec in the store")
        spec = pb.JobSpec.FromString(rows[0][0])
        found = self.store.load_checkpoint(job_id)
        run = self._build(job_id, spec, found)
        if not self._adopt(run):
            return
        try:
            with self.store.tx() as db:  # the store's history becomes the checkpoint's: what follows is redone
                self._check_lease(db)
                db.execute("DELETE FROM history WHERE job_id = ?", (job_id,))
                db.executemany("INSERT INTO history VALUES (?, ?, ?, ?)",
                               [(job_id, *p) for p in run.history.after(0)])
        except BaseException:
            self._drop(run)
            raise
        log.info("job %s resumes at step %d", job_id, run.state.step)
        self._schedule(run)

    def _finish_stored_cancel(self, job_id: str) -> None:
        """A job cancelled while no server ran it: it ends at its checkpoint."""
        found = self.store.load_checkpoint(job_id)
        step = found[0] if found is not None else 0
        with self.store.tx() as db:
            self._check_lease(db)
            db.execute("DELETE FROM history WHERE job_id = ? AND step > ?", (job_id, step))
            last = db.execute("SELECT loss, grad_norm FROM history WHERE job_id = ? ORDER BY step DESC LIMIT 1",
                              (job_id,)).fetchone() or (None, None)
            db.execute("""UPDATE jobs SET status = 'cancelled', message = ?, step = ?, loss = ?, grad_norm = ?,
                          updated = ? WHERE id = ? AND status = ?""",
                       (f"cancelled after step {step}", step, last[0], last[1], time.time(), job_id, CANCELLING))
            db.execute("DELETE FROM specs WHERE job_id = ?", (job_id,))
        log.info("job %s cancelled at its checkpoint, step %d", job_id, step)

    def _adopt(self, run: Run) -> bool:
        """Hold `run` in memory (False: a run of that job is already held)."""
        with self._ready:
            if run.job_id in self._runs:
                return False
            self._runs[run.job_id] = run
            return True

    def _schedule(self, run: Run) -> None:
        run.steps_iter = iter(run.loop)
        with self._ready:
            if self._runs.get(run.job_id) is run:
                self._queue.append(run.job_id)
                self._ready.notify()

    def _release(self, run: Run, requeue: bool) -> None:
        """End a turn on `run` (a runner's or a cancel's); back in the queue if it goes on."""
        with self._ready:
            run.in_turn = False
            if requeue and self._runs.get(run.job_id) is run and not self._stopping:
                self._queue.append(run.job_id)
                self._ready.notify()

    # ---- running
    def _runner(self) -> None:
        ended = self._ended
        while (backoff := self._next_turn()) is not None:
            if self._ended != ended:  # a job ended in that turn, its memory freed: give it back to the OS
                ended = self._ended
                heap.trim()
            if backoff:
                self._stopped.wait(backoff)

    def _next_turn(self) -> float | None:
        """Wait for a job and run one turn of it; returns the seconds to wait before the next (the
        store is failing), None once stopping. The run is this frame's alone: between turns a
        runner holds no job, so a finished one is freed at once, not at the runner's next turn."""
        with self._ready:
            self._ready.wait_for(lambda: self._queue or self._stopping)
            if self._stopping:
                return None
            run = self._runs.get(self._queue.popleft())
            if run is None or run.in_turn:  # dropped, finished, or a cancel is ending it
                return 0.0
            run.in_turn = True
        backoff = 0.0
        requeue = False
        try:
            requeue = self._turn(run)
        except _LeaseLost:
            log.error("job %s: another server holds the lease now; this one stops running it", run.job_id)
            self._drop(run)
        except StoreUnavailable as e:  # a locked or failing store: the job waits for it, then goes on
            log.warning("job %s waits for the store: %s", run.job_id, e)
            requeue, backoff = True, 1.0
        except Exception as e:  # a failing job fails alone (MemoryError included)
            log.exception("job %s failed", run.job_id)
            requeue = self._fail(run, f"{type(e).__name__}: {e}")
        finally:
            self._release(run, requeue or (run.cancel and run.status not in FINISHED))
        return backoff

    def _fail(self, run: Run, message: str) -> bool:
        """End `run` failed; returns whether it goes back in the queue to write that later (the store fails)."""
        run.final = run.final or ("failed", message)
        try:
            self._end(run, *run.final)
        except _LeaseLost:
            self._drop(run)
        except StoreUnavailable as e:
            log.warning("job %s failed; recording it waits for the store: %s", run.job_id, e)
            return True
        except Exception:  # the store cannot take it: it stays failed here, and 'running' there until a restart
            log.exception("job %s: its failure cannot be recorded", run.job_id)
            with run.changed:
                run.status, run.message = run.final
                run.changed.notify_all()
            self._drop(run)
        return False

    def _turn(self, run: Run) -> bool:
        """One quantum of steps; returns whether the job goes back in the queue."""
        if run.final is not None:  # an ending the store could not take yet
            self._end(run, *run.final)
            return False
        if run.cancel:
            self._end(run, "cancelled", f"cancelled after step {run.state.step}")
            return False
        if run.pending:  # the points of a turn the store could not take
            self._write(run, checkpoint=False)
        if run.status == "queued":
            with self.store.tx() as db:
                self._check_lease(db)
                db.execute("UPDATE jobs SET status = 'running', updated = ? WHERE id = ? AND status = 'queued'",
                           (time.time(), run.job_id))
            with run.changed:
                if run.status == "queued":
                    run.status = "running"
        done = interrupted = False
        until = time.monotonic() + self.quantum
        steps = run.steps_iter
        history = run.state.history
        with stop_when(lambda: run.cancel or self._stopping):  # a cancel or a shutdown stops a step between kernels
            while steps is not None and time.monotonic() < until and not run.cancel and not self._stopping:
                try:
                    info = next(steps, None)
                except Cancelled:
                    if not (run.cancel or self._stopping):
                        raise
                    interrupted = True  # the step is lost, the state is the last step's
                    run.steps_iter = None
                    break
                if info is None:
                    done = True
                    break
                for points in history.values():  # the loop's own history is unbounded: the job keeps a History
                    points.clear()
                with run.changed:
                    point = (info.step, info.loss, info.grad_norm)
                    run.last = point
                    if run.history.add(*point):
                        run.pending.append(point)
                    run.changed.notify_all()
            if done:
                try:
                    self._final_eval(run)
                except Cancelled:
                    if not (run.cancel or self._stopping):
                        raise
                    done, interrupted = False, True
        every = run.spec.checkpoint_every or self.checkpoint_every  # the job's own setting, else the server's
        seconds = run.spec.checkpoint_seconds or self.checkpoint_seconds
        due = run.state.step - run.checkpoint_step >= every or time.monotonic() - run.checkpoint_time >= seconds
        # a finished run's checkpoint holds its result (see _result_arrays), even at the step of the last one
        self._write(run, checkpoint=done or ((due or run.cancel or self._stopping) and run.state.step > run.checkpoint_step))
        if done:
            loop = run.loop
            self._end(run, "succeeded" if loop.success else "failed", loop.message)
            return False
        if run.cancel:
            self._end(run, "cancelled", f"cancelled after step {run.state.step}")
            return False
        if interrupted:  # stopping: the job resumes from its checkpoint on the next start
            return False
        return not self._stopping

    def _final_eval(self, run: Run) -> None:
        """fun and jac at the final params on all the data, as `gs.minimize` reports them (the loop's
        last evaluation, or one more). With minibatches the graph takes one minibatch: fun is the
        last step's loss and there is no jac."""
        loop = run.loop
        if loop.last_eval is not None:
            run.fun, run.jac = float(loop.last_eval[0]), dict(loop.last_eval[1])
        elif loop.batch_size is None:
            loss, grads = loop.value_and_grad(run.state.params, loop.args)
            run.fun, run.jac, run.final_nfev = float(loss), dict(grads), 1
        else:
            run.fun = run.last[1] if run.last is not None else math.nan
            return
        loop.check_final(run.fun, tree_norm(run.jac))

    def _result_arrays(self, run: Run) -> dict[str, np.ndarray]:
        """What the job's result reports beyond params: `result.nit`, `result.nfev`, and once the
        loop has ended `result.status` and (where evaluated) `result.jac.<name>`."""
        loop = run.loop
        out = {"result.nit": np.array(run.optimizer.iterations(run.state.opt_state)),
               "result.nfev": np.array(run.state.nfev + loop.extra_nfev + run.final_nfev)}
        if loop.status is not None:
            out["result.status"] = np.array(loop.status)
        if run.jac is not None:
            out.update({f"result.jac.{k}": np.asarray(v) for k, v in run.jac.items()})
        return out

    def _checkpoint_arrays(self, run: Run) -> dict[str, np.ndarray]:
        arrays = run.state.to_arrays(run.optimizer)  # the loop's history is empty: the job's History goes instead
        arrays.update(self._result_arrays(run))
        with run.changed:
            arrays.update(run.history.to_arrays())
        return arrays

    def _write(self, run: Run, checkpoint: bool, end: tuple[str, str] | None = None) -> None:
        """One transaction: the points not yet stored (the store's history thinned like the job's),
        the job's progress, a checkpoint, and an ending. Nothing of it is marked written unless it commits."""
        with run.changed:
            stride, pending = run.history.stride, list(run.pending)
            last = run.last
        arrays = self._checkpoint_arrays(run) if checkpoint else None
        step = run.state.step
        with self.store.tx() as db:
            self._check_lease(db)
            if stride > run.store_stride:
                db.execute("DELETE FROM history WHERE job_id = ? AND step % ? != 0", (run.job_id, stride))
            db.executemany("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)",
                           [(run.job_id, *p) for p in pending if p[0] % stride == 0])
            if last is not None:
                db.execute("UPDATE jobs SET step = ?, loss = ?, grad_norm = ?, updated = ? WHERE id = ?",
                           (*last, time.time(), run.job_id))
            if arrays is not None:
                self.store.save_checkpoint(db, run.job_id, step, arrays)
            if end is not None:
                db.execute("UPDATE jobs SET status = ?, message = ?, fun = ?, updated = ? WHERE id = ?",
                           (*end, None if math.isnan(run.fun) else run.fun, time.time(), run.job_id))
                db.execute("DELETE FROM specs WHERE job_id = ?", (run.job_id,))  # only a resume reads it
        with run.changed:
            del run.pending[:len(pending)]
            run.store_stride = max(run.store_stride, stride)
        if arrays is not None:
            run.checkpoint_step, run.checkpoint_time = step, time.monotonic()

    def _end(self, run: Run, status: str, message: str) -> None:
        """Write the job's ending (with a last checkpoint), then free its memory: only the row stays.
        A checkpoint that cannot be made (e.g. MemoryError) does not keep the ending from being written."""
        if run.status in FINISHED:  # the first ending is final
            return
        message = _cut(message)  # a failure's text can be long: GetJob answers it
        run.final = (status, message)
        checkpoint = run.state.step > run.checkpoint_step
        try:
            self._write(run, checkpoint=checkpoint, end=(status, message))
        except (StoreUnavailable, _LeaseLost):
            raise
        except Exception as e:
            if not checkpoint:
                raise
            log.exception("job %s: its last checkpoint cannot be saved", run.job_id)
            message = _cut(f"{message}; its last checkpoint could not be saved ({type(e).__name__}: {e}): the "
                           f"parameters kept are those of step {run.checkpoint_step}")
            run.final = (status, message)
            self._write(run, checkpoint=False, end=(status, message))
        with run.changed:
            run.status, run.message = status, message
            run.changed.notify_all()
        with self._ready:
            if self._runs.get(run.job_id) is run:
                del self._runs[run.job_id]
            self._ended += 1
        self._forget_plans(run)

    def _finish_row(self, job_id: str, status: str, message: str) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE jobs SET status = ?, message = ?, updated = ? WHERE id = ?",
                       (status, _cut(message), time.time(), job_id))
