"""Worker pools: where the scheduler's tasks run, and how their arrays get there.

A task is (graph, method, inputs, options): a plain Engine call (`evaluate` or `vjp`, or `add`
of two tasks' outputs) on a worker that caches the graph and its plans by hash, both bounded in
bytes (a Ray worker's least recently used graph is dropped with its plans and sent again when a
task needs it). Failures come back as values and are raised here.

Arrays move once. The driver puts an array into the store (`put`) once per content version and
tasks carry references to it: a key the caller vouches for (a content id, or a read-only
array's identity, see `Shipment`) keeps the reference across calls, in a byte-bounded LRU.
Each worker keeps the arrays it fetched in its own byte-bounded cache by the same key, so an
array a worker already holds is not fetched again. A task may return its outputs one object
each (`Task.returns`); another task takes one of them as an input (`Out`), so intermediate
values go from worker to worker through the store without the driver reading them.

`bytes_moved` counts what crosses: ("driver_workers", "out") arrays the driver put into the
store or inlined in tasks; ("driver_workers", "in") arrays the driver fetched back;
("worker_fetch", "in") arrays workers fetched from the store on a miss of their cache
(whoever put them: the driver, or another worker's task).

`LocalPool` runs tasks in threads of this process and simulates the store (a put copies, each
worker has its cache), so the scheduler's tests, byte counts included, need no Ray; `RayPool`
runs them on Ray actors, replaces an actor that dies and retries its task, or, for a task that
reads other tasks' outputs, raises `WorkerLost` so that the caller runs its whole call again.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradserve_engine.errors import BY_NAME, GraphError, WorkersUnavailable
from gradserve_engine.ir import Graph
from gradserve_engine.v1 import graph_pb2

from .engine import CACHE_BYTES as ENGINE_CACHE_BYTES
from .engine import Engine
from .footprint import graph_bytes

log = logging.getLogger("gradserve_engine")

ROUTES = (("driver_workers", "out"), ("driver_workers", "in"), ("worker_fetch", "in"))
INLINE_BYTES = 64 * 1024  # an array used by one task and smaller than this travels inside the task
STORE_BYTES = 1 << 30  # the driver's references kept across calls (content ids, read-only arrays)
CACHE_BYTES = 1 << 30  # each worker's cache of fetched arrays
GRAPH_BYTES = 256 << 20  # each Ray worker's graphs (estimated, footprint.graph_bytes): the least recently used go


def byte_counter() -> Counter[tuple[str, str]]:
    return Counter(dict.fromkeys(ROUTES, 0))


def nbytes(value: Any) -> int:
    """Bytes of the arrays in a task's result or argument (dicts, tuples, lists of arrays)."""
    if isinstance(value, np.ndarray | np.generic):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    return 0


class WorkerLost(Exception):
    """A worker died while the call's tasks read each other's outputs: run the call again."""


# ---------------------------------------------------------------- tasks, references, replies


@dataclass(frozen=True, eq=False)
class Ref:
    """An array in the store. `key` names its content to the workers' caches (None: a worker
    does not keep it: it is used once); `obj` is the store's handle (a Ray ObjectRef, or the
    array itself in a LocalPool)."""

    key: Hashable | None
    nbytes: int
    obj: Any


@dataclass(frozen=True, eq=False)
class Out:
    """Output `name` (one of its task's `returns`) of a submitted task, as another task's input."""

    handle: Any
    name: str


@dataclass
class Task:
    graph: Graph | None  # None for `add`
    method: str  # "evaluate", "vjp" or "add"
    inputs: dict[str, Any]  # arrays, Refs or Outs
    options: dict[str, Any] = field(default_factory=dict)
    worker: int | None = None
    returns: tuple[str, ...] | None = None  # outputs returned one object each ("out:<o>", "grad:<x>" for a vjp)

    def index(self, name: str) -> int:
        assert self.returns is not None
        return self.returns.index(name)


def run_task(engine: Engine, graph: Graph | None, method: str, inputs: Mapping[str, Any],
             options: Mapping[str, Any]) -> Any:
    """One task on a worker's engine, its failure returned as a value (never raised across):
    ("ok", result) or ("error", class name, message)."""
    try:
        if method == "add":  # a node of a reduction tree: "0:<name>" + "1:<name>" for each name
            return ("ok", {n: np.add(inputs[f"0:{n}"], inputs[f"1:{n}"]) for n in options["names"]})
        if graph is None:
            return ("error", GraphError.__name__, f"task method {method!r} needs a graph")
        if method == "evaluate":
            return ("ok", engine.evaluate(graph, inputs, options.get("outputs")))
        if method == "vjp":
            return ("ok", engine.vjp(graph, inputs, options["wrt"], options.get("seeds"), options.get("outputs")))
        return ("error", "ValueError", f"unknown task method {method!r}")
    except Exception as e:  # returned as a value: the worker stays healthy
        return ("error", type(e).__name__, str(e))


def unwrap(result: Any) -> Any:
    """The result of a task, or its failure raised here: an error of the family (errors.py) as
    its own class, anything else (a bug on the worker) as a RuntimeError naming its class."""
    status, *rest = result
    if status == "ok":
        return rest[0]
    if status in ("lost", "skipped"):
        raise WorkerLost(rest[0] if rest else status)
    kind, message = rest
    cls = BY_NAME.get(kind)
    if cls is None:
        raise RuntimeError(f"{kind} on a worker: {message}")
    raise cls(message)


def flat(method: str, result: Any) -> dict[str, Any]:
    """A task's result as one dict: a vjp's (outputs, gradients) as "out:<o>" and "grad:<x>"."""
    if method == "vjp":
        outs, grads = result
        return {**{f"out:{o}": v for o, v in outs.items()}, **{f"grad:{x}": g for x, g in grads.items()}}
    return dict(result)


class ArrayCache:
    """Arrays by content key, the least recently used dropped past `max_bytes`; thread-safe."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += size - (nbytes(old) if old is not None else 0)
            self._items[key] = value
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= nbytes(dropped)


def execute(engine: Engine, graph: Graph | None, method: str, options: Mapping[str, Any], names: Sequence[str],
            specs: Sequence[tuple], returns: Sequence[str] | None, cache: ArrayCache,
            fetch: Callable[[list[Any]], list[Any]]) -> Any:
    """A task on a worker: its inputs from `specs` (("v", value) travelled with the task;
    ("r", key, [handle]) is in the store: taken from `cache` by key, else fetched and, with a
    key, kept), then run. The reply is (bytes fetched, status) or, with `returns`,
    ((bytes fetched, status), *the named outputs); status as `run_task`'s, or ("lost", why)
    when an input could not be fetched, ("skipped", why) when an input's task failed."""
    values: list[Any] = [None] * len(specs)
    missing: list[int] = []
    for i, spec in enumerate(specs):
        if spec[0] == "v":
            values[i] = spec[1]
        else:
            hit = cache.get(spec[1]) if spec[1] is not None else None
            if hit is not None:
                values[i] = hit
            else:
                missing.append(i)
    fetched = 0
    status: Any
    try:
        got = fetch([specs[i][2][0] for i in missing]) if missing else []
    except Exception as e:  # the store lost it: its producer died
        status = ("lost", f"{type(e).__name__}: {e}")
    else:
        for i, value in zip(missing, got, strict=True):
            values[i] = value
            if value is not None:
                fetched += nbytes(value)
                if specs[i][1] is not None:
                    cache.put(specs[i][1], value)
        if any(v is None for v in values):
            status = ("skipped", "an input's task failed")
        else:
            status = run_task(engine, graph, method, dict(zip(names, values, strict=True)), options)
    if returns is None:
        return (fetched, status)
    if status[0] != "ok":
        return ((fetched, status), *([None] * len(returns)))
    result = flat(method, status[1])
    return ((fetched, ("ok", None)), *(result[r] for r in returns))


# ---------------------------------------------------------------- the driver's side of the store


class PutCache:
    """The driver's references to arrays in the store by key, so that an array is put once per
    content version; least recently used dropped past `max_bytes`. An entry keyed on an array's
    identity holds a weak reference to it: it goes when the array goes."""

    def __init__(self, max_bytes: int = STORE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Ref, Any]] = OrderedDict()
        self._lock = threading.RLock()  # a weak reference's callback may run inside a locked section

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, owner: Any = None) -> Ref | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            ref, guard = entry
            if guard is not None and guard() is not owner:  # the id of a dead array, reused
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return ref

    def add(self, key: Hashable, ref: Ref, owner: Any = None) -> None:
        if ref.nbytes > self.max_bytes:
            return
        guard: Any = None
        if owner is not None:
            def gone(wr: Any, key: Hashable = key) -> None:  # wr is `guard`
                self._forget(key, wr)

            guard = weakref.ref(owner, gone)
        with self._lock:
            self._drop(key)
            self._items[key] = (ref, guard)
            self.bytes += ref.nbytes
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _forget(self, key: Hashable, guard: Any) -> None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry[1] is guard:
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0].nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


_serials = itertools.count()


class _StoreMixin:
    """`put`, byte counting and inline-or-store for both pools; `_store(value)` is the pool's own."""

    bytes_moved: Counter[tuple[str, str]]
    puts: PutCache
    inline_bytes: int
    _count_lock: threading.Lock

    def _store(self, value: np.ndarray) -> Any:
        raise NotImplementedError

    def _count(self, route: tuple[str, str], n: int) -> None:
        if n:
            with self._count_lock:
                self.bytes_moved[route] += n

    def put(self, value: np.ndarray, key: Hashable | None = None, share: bool = False, owner: Any = None) -> Ref:
        """`value` in the store: once per `key` while the key's reference is kept (with `owner`,
        only while that object lives: a key on its identity). Workers keep it by `key` (or, for
        a value without one that several tasks read, `share`, by a key for this put)."""
        if key is not None:
            ref = self.puts.get(key, owner)
            if ref is not None:
                return ref
        value = np.asarray(value)
        obj = self._store(value)
        self._count(("driver_workers", "out"), value.nbytes)
        # a content id is the content's own name, stable even once the driver drops its reference
        named = isinstance(key, tuple) and key[:1] == ("cid",)
        cache_key = key if named else ("put", next(_serials)) if key is not None or share else None
        ref = Ref(cache_key, int(value.nbytes), obj)
        if key is not None:
            self.puts.add(key, ref, owner)
        return ref

    def _spec(self, value: Any) -> tuple:
        """How an input travels: ("v", value) in the task, ("r", key, [handle]) by the store."""
        if isinstance(value, Ref):
            return ("r", value.key, [value.obj])
        if isinstance(value, Out):
            return ("r", None, [self._out_handle(value)])
        if isinstance(value, np.ndarray) and value.nbytes >= self.inline_bytes:
            return self._spec(self.put(value))
        self._count(("driver_workers", "out"), nbytes(value))
        return ("v", value)

    def _out_handle(self, out: Out) -> Any:
        raise NotImplementedError


def _replied(pool: _StoreMixin, reply: Any) -> Any:
    """Count what a worker fetched; its status."""
    fetched, status = reply
    pool._count(("worker_fetch", "in"), fetched)
    return status


# ---------------------------------------------------------------- threads


class LocalPool(_StoreMixin):
    """`size` threads, each with its own Engine and cache: the pool interface without Ray. A put
    copies (the store's copy), so the counts are those a RayPool would show."""

    def __init__(self, size: int = 2, inline_bytes: int = INLINE_BYTES, store_bytes: int = STORE_BYTES,
                 cache_bytes: int = CACHE_BYTES):
        self.size = size
        self.inline_bytes = inline_bytes
        self.bytes_moved = byte_counter()
        self.puts = PutCache(store_bytes)
        self.caches = [ArrayCache(cache_bytes) for _ in range(size)]
        self._count_lock = threading.Lock()
        self._engines = [Engine() for _ in range(size)]
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gradserve-local-worker")
        self._next = 0
        self._lock = threading.Lock()
        self.replaced = 0

    def _store(self, value: np.ndarray) -> Any:
        copy = np.array(value, copy=True)
        copy.flags.writeable = False
        return copy

    def _out_handle(self, out: Out) -> Any:
        return (out.handle, out.handle.task.index(out.name))

    def _fetch(self, handles: list[Any]) -> list[Any]:
        values = []
        for h in handles:
            if isinstance(h, tuple):  # (upstream handle, index of the output): wait for it
                upstream, i = h
                values.append(upstream.future.result()[1 + i])
            else:
                values.append(h)
        return values

    def submit(self, task: Task) -> Any:
        with self._lock:
            k = task.worker if task.worker is not None else self._next % self.size
            self._next += 1
        names = list(task.inputs)
        specs = [self._spec(task.inputs[n]) for n in names]
        self._count(("driver_workers", "out"), nbytes(task.options.get("seeds")))

        def run() -> Any:
            return execute(self._engines[k], task.graph, task.method, task.options, names, specs, task.returns,
                           self.caches[k], self._fetch)

        # tasks run in submission order, so one that waits for another's output never waits on a queued task
        return _LocalHandle(task, self._threads.submit(run))

    def get(self, handles: Sequence[Any], deadline: float | None = None) -> list[Any]:
        """The results of tasks without `returns`, fetched."""
        out = []
        for h in handles:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            future = h.future if isinstance(h, _LocalHandle) else h
            try:
                result = future.result(timeout=timeout)
            except TimeoutError:
                raise WorkersUnavailable("workers did not answer within the deadline") from None
            value = unwrap(_replied(self, result))
            self._count(("driver_workers", "in"), nbytes(value))
            out.append(value)
        return out

    def fetch(self, handles: Sequence[Any], outs: Sequence[Out], deadline: float | None = None) -> list[Any]:
        """Wait for `handles` (tasks with `returns`, in submission order), raise the first
        failure, then fetch the values of `outs`."""
        error = None
        for h in handles:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            future = h.future if isinstance(h, _LocalHandle) else h
            try:
                status = _replied(self, future.result(timeout=timeout)[0])
            except TimeoutError:
                raise WorkersUnavailable("workers did not answer within the deadline") from None
            if status[0] not in ("ok", "skipped") and error is None:  # skipped: an earlier task failed
                error = status
        if error is not None:
            unwrap(error)
        values = [o.handle.future.result()[1 + o.handle.task.index(o.name)] for o in outs]
        self._count(("driver_workers", "in"), nbytes(values))
        return values

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class _LocalHandle:
    task: Task
    future: Future


# ---------------------------------------------------------------- Ray actors


def _worker_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class Worker:
        """A worker slot: caches graphs (and, through its Engine, plans) by hash, and the arrays
        it fetched by content key."""

        def __init__(self, blas_threads: int, kernels: str = "numpy", cache_bytes: int = CACHE_BYTES,
                     plan_cache_bytes: int = ENGINE_CACHE_BYTES):
            from threadpoolctl import threadpool_limits

            threadpool_limits(blas_threads)  # this worker's share of the cores: no oversubscription
            self.engine = Engine(kernels=kernels, max_cache_bytes=plan_cache_bytes)
            self.graphs: dict[str, Graph] = {}  # exactly the pool's record of this worker (RayPool._loaded)
            self.cache = ArrayCache(cache_bytes)

        def ping(self) -> int:
            return os.getpid()

        def cached(self) -> list[Hashable]:
            return list(self.cache._items)

        def graph_ids(self) -> list[str]:
            return list(self.graphs)

        def drop_graph(self, gid: str) -> None:
            """The pool evicted the graph: it and its plans go."""
            if self.graphs.pop(gid, None) is not None:
                self.engine.forget(gid)

        def put_graph(self, gid: str, wire: bytes) -> None:
            # the server's own graphs (stages of a partition carry transforms' names)
            self.graphs[gid] = Graph.from_proto(graph_pb2.Graph.FromString(wire), internal_names=True)

        def run(self, gid: str | None, method: str, options: dict, names: list[str], specs: list[tuple],
                returns: list[str] | None) -> Any:
            graph = None
            if gid is not None:
                graph = self.graphs.get(gid)
                if graph is None:
                    status = ("error", GraphError.__name__, f"worker has no graph {gid}")
                    return (0, status) if returns is None else ((0, status), *([None] * len(returns)))
            return execute(self.engine, graph, method, options, names, specs, returns, self.cache, ray.get)

    return Worker


_DIED = ("RayActorError", "ActorDiedError", "ActorUnavailableError")


class RayPool(_StoreMixin):
    """Tasks on `size` Ray actors with `cpus` CPUs each. An actor that dies is replaced and its
    task submitted again (or, for tasks that read other tasks' outputs, `WorkerLost` raised);
    workers that do not answer in time raise WorkersUnavailable."""

    def __init__(self, size: int, cpus: float = 1.0, blas_threads: int = 1, start_timeout: float = 60.0,
                 kernels: str = "numpy", inline_bytes: int = INLINE_BYTES, store_bytes: int = STORE_BYTES,
                 cache_bytes: int = CACHE_BYTES, plan_cache_bytes: int = ENGINE_CACHE_BYTES,
                 graph_cache_bytes: int = GRAPH_BYTES):
        """`cache_bytes`: each worker's fetched arrays; `plan_cache_bytes`: its engine's plans
        (`Engine(max_cache_bytes=)`); `graph_cache_bytes`: the graphs it holds (the least recently used
        are dropped, with their plans, and sent again when a task needs them)."""
        import ray

        self._ray = ray
        self._died = tuple(getattr(ray.exceptions, name) for name in _DIED if hasattr(ray.exceptions, name))
        self._cls = _worker_class().options(num_cpus=cpus)
        self._blas, self._kernels, self._cache_bytes = blas_threads, kernels, cache_bytes
        self._plan_cache_bytes, self._graph_cache_bytes = plan_cache_bytes, graph_cache_bytes
        self.size = size
        self.inline_bytes = inline_bytes
        self.bytes_moved = byte_counter()
        self.puts = PutCache(store_bytes)
        self._count_lock = threading.Lock()
        self._actors = [self._new_actor() for _ in range(size)]
        # per worker, the graphs it holds and their estimated bytes, least recently used first
        self._loaded: list[OrderedDict[str, int]] = [OrderedDict() for _ in range(size)]
        self._next = 0
        self._lock = threading.Lock()
        self.replaced = 0
        try:
            ray.get([a.ping.remote() for a in self._actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise WorkersUnavailable(f"{size} workers did not start within {start_timeout:.0f} s") from None

    def _new_actor(self) -> Any:
        return self._cls.remote(self._blas, self._kernels, self._cache_bytes, self._plan_cache_bytes)

    def pids(self) -> list[int]:
        return self._ray.get([a.ping.remote() for a in self._actors], timeout=30)

    def cached(self, k: int) -> list[Hashable]:
        """The keys of the arrays worker `k` holds (for tests and debugging)."""
        return self._ray.get(self._actors[k].cached.remote(), timeout=30)

    def graph_ids(self, k: int) -> list[str]:
        """The ids of the graphs worker `k` holds (for tests and debugging)."""
        return self._ray.get(self._actors[k].graph_ids.remote(), timeout=30)

    def _store(self, value: np.ndarray) -> Any:
        return self._ray.put(value)

    def _out_handle(self, out: Out) -> Any:
        return out.handle.refs[1 + out.handle.task.index(out.name)]

    def _replace(self, k: int, dead: Any) -> None:
        with self._lock:
            if self._actors[k] is dead:
                log.warning("worker %d died; starting a replacement", k)
                self._actors[k] = self._new_actor()
                self._loaded[k] = OrderedDict()
                self.replaced += 1

    def _send(self, h: _RayHandle) -> None:
        """Submit the task to its worker, the graph first when the worker does not hold it. An
        actor runs one caller's tasks in the order they were submitted, so the submissions happen
        under the lock: a graph is always sent before any task that needs it, and dropped (the
        worker's least recently used, past `graph_cache_bytes`) only after every task submitted for it."""
        task = h.task
        graph = task.graph
        n = 1 if task.returns is None else 1 + len(task.returns)
        returns = None if task.returns is None else list(task.returns)
        wire = None
        if graph is not None and graph.id not in self._loaded[h.worker]:  # serialised and stored outside the lock
            wire = self._ray.put(graph.to_proto().SerializeToString())
        with self._lock:
            actor = h.actor = self._actors[h.worker]
            if graph is not None:
                loaded = self._loaded[h.worker]
                if graph.id in loaded:
                    loaded.move_to_end(graph.id)
                else:
                    actor.put_graph.remote(graph.id, wire if wire is not None else graph.to_proto().SerializeToString())
                    loaded[graph.id] = graph_bytes(graph)
                    held = sum(loaded.values())
                    while held > self._graph_cache_bytes and len(loaded) > 1:
                        old, size = loaded.popitem(last=False)
                        actor.drop_graph.remote(old)
                        held -= size
            refs = actor.run.options(num_returns=n).remote(graph.id if graph is not None else None, task.method,
                                                           task.options, h.names, h.specs, returns)
        h.refs = [refs] if n == 1 else list(refs)

    def submit(self, task: Task) -> Any:
        with self._lock:
            k = task.worker if task.worker is not None else self._next % self.size
            self._next += 1
        names = list(task.inputs)
        h = _RayHandle(task, k, None, names, [self._spec(task.inputs[n]) for n in names], [])
        self._count(("driver_workers", "out"), nbytes(task.options.get("seeds")))
        self._send(h)
        return h

    def _timeout(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def get(self, handles: Sequence[Any], deadline: float | None = None) -> list[Any]:
        """The results of tasks without `returns`, fetched; a task whose worker died runs again
        on its replacement."""
        ray = self._ray
        out = []
        for h in handles:
            while True:
                try:
                    reply = ray.get(h.refs[0], timeout=self._timeout(deadline))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise WorkersUnavailable("workers did not answer within the deadline") from None
                except self._died as e:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WorkersUnavailable(f"worker {h.worker} died and the deadline passed: {e}") from None
                    self._replace(h.worker, h.actor)
                    if any(isinstance(v, Out) for v in h.task.inputs.values()):  # its inputs may have gone with it
                        raise WorkerLost(str(e)) from None
                    self._send(h)
            value = unwrap(_replied(self, reply))
            self._count(("driver_workers", "in"), nbytes(value))
            out.append(value)
        return out

    def fetch(self, handles: Sequence[Any], outs: Sequence[Out], deadline: float | None = None) -> list[Any]:
        """Wait for `handles` (tasks with `returns`, in submission order); when a worker died,
        replace it and raise WorkerLost (run the call again), else raise the first failure, else
        fetch the values of `outs`."""
        ray = self._ray
        lost: str | None = None
        error = None
        for h in handles:
            try:
                status = _replied(self, ray.get(h.refs[0], timeout=self._timeout(deadline)))
            except ray.exceptions.GetTimeoutError:
                raise WorkersUnavailable("workers did not answer within the deadline") from None
            except self._died as e:
                self._replace(h.worker, h.actor)
                lost = lost or f"worker {h.worker} died: {e}"
                continue
            if status[0] == "lost":
                lost = lost or status[1]
            elif status[0] not in ("ok", "skipped") and error is None:  # skipped: an earlier task failed
                error = status
        if lost is not None:
            raise WorkerLost(lost)
        if error is not None:
            unwrap(error)
        try:
            values = ray.get([self._out_handle(o) for o in outs], timeout=self._timeout(deadline))
        except ray.exceptions.GetTimeoutError:
            raise WorkersUnavailable("workers did not answer within the deadline") from None
        self._count(("driver_workers", "in"), nbytes(values))
        return values

    def shutdown(self) -> None:
        self.puts.clear()
        for a in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)


@dataclass(eq=False)
class _RayHandle:
    task: Task
    worker: int
    actor: Any
    names: list[str]
    specs: list[tuple]
    refs: list[Any]


# ---------------------------------------------------------------- one call's arrays


_memcmp: Any
try:
    _memcmp = ctypes.CDLL(None).memcmp
    _memcmp.restype, _memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
except (OSError, AttributeError):  # no C library to ask: numpy compares
    _memcmp = None


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit the same array (so -0.0 is not 0.0, and a NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if _memcmp is not None:
        return a.nbytes == 0 or _memcmp(a.ctypes.data, b.ctypes.data, a.nbytes) == 0
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def immutable(a: np.ndarray) -> bool:
    """Whether `a` cannot change without someone turning its writeable flag back on: read-only,
    and so is every array it views, down to memory it owns or an immutable bytes object."""
    x: Any = a
    while isinstance(x, np.ndarray):
        if x.flags.writeable:
            return False
        x = x.base
    return x is None or isinstance(x, bytes)


def _sample(a: np.ndarray) -> bytes:
    """A few bytes from the start, middle and end: distinct arrays of one shape rarely share them."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    n = flat.size
    return bytes(flat[:32]) + bytes(flat[n // 2:n // 2 + 32]) + bytes(flat[max(n - 32, 0):])


class Shipment:
    """The arrays of one call's tasks, each distinct array put once. `add` every array first
    (a value, and the key it may keep across calls: ("cid", ...) from a caller's content id, or
    `Shipment.key` for a read-only array's identity), then `finish`, then `ref(token)` is what a
    task takes: a Ref, or the array itself when it is small, used once and has no key.

    Within the call, arrays are the same when they are the same object or have the same bytes;
    across calls, only by key: a content id is the caller's promise that the bytes are those it
    names; an identity key is taken only for arrays that `immutable` says cannot change, and
    lasts while the array lives."""

    def __init__(self, pool: Any):
        self.pool = pool
        self._values: list[np.ndarray] = []
        self._alive: list[Any] = []  # every array added, so that no id is reused during the call
        self._keys: list[tuple[Hashable | None, Any]] = []
        self._uses: list[int] = []
        self._refs: list[Any] = []
        self._by_id: dict[int, int] = {}
        self._by_key: dict[Hashable, int] = {}
        self._by_bytes: dict[tuple, list[int]] = {}

    @staticmethod
    def key(value: np.ndarray, cid: str | None = None) -> tuple[Hashable | None, Any]:
        """(key, owner) for `value`: its content id's, else its identity's when it cannot change
        (owned by the array: the key goes with it), else none."""
        if cid is not None:
            return ("cid", cid, value.dtype.str, value.shape), None
        if immutable(value):
            return ("id", id(value)), value
        return None, None

    def add(self, value: np.ndarray, key: Hashable | None = None, owner: Any = None) -> int:
        value = np.asarray(value)
        self._alive.append(value)
        t = self._by_id.get(id(value))
        if t is None and key is not None:
            t = self._by_key.get(key)
        if t is None and key is None:
            bucket = (value.dtype.str, value.shape, _sample(value))
            t = next((i for i in self._by_bytes.get(bucket, ()) if same_bytes(self._values[i], value)), None)
            if t is None:
                self._by_bytes.setdefault(bucket, []).append(len(self._values))
        if t is None:
            t = len(self._values)
            self._values.append(value)
            self._keys.append((key, owner))
            self._uses.append(0)
            if key is not None:
                self._by_key[key] = t
        self._by_id[id(value)] = t
        self._uses[t] += 1
        return t

    def finish(self) -> None:
        for t, value in enumerate(self._values):
            key, owner = self._keys[t]
            shared = self._uses[t] > 1
            if key is not None or shared or value.nbytes >= self.pool.inline_bytes:
                self._refs.append(self.pool.put(value, key, shared, owner))
            else:
                self._refs.append(value)

    def ref(self, token: int) -> Any:
        return self._refs[token]

    @property
    def distinct(self) -> int:
        return len(self._values)
