"""Worker pools: where the scheduler's tasks run.

A task is (graph, method, inputs, options): a plain Engine call (`evaluate` or `vjp`) on a
worker that caches the graph and its plans by hash, so steady-state tasks ship inputs only.
Failures come back as values and are raised here.

`LocalPool` runs tasks in threads of this process (the scheduler's tests need no Ray);
`RayPool` runs them on Ray actors, replaces an actor that dies and retries its task.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gradserve_engine.errors import BY_NAME, GraphError, WorkersUnavailable
from gradserve_engine.ir import Graph
from gradserve_engine.v1 import graph_pb2

from .engine import Engine

log = logging.getLogger("gradserve_engine")


def run_task(engine: Engine, graph: Graph, method: str, inputs: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    """One task on a worker's engine, its failure returned as a value (never raised across):
    ("ok", result) or ("error", class name, message)."""
    try:
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
    kind, message = rest
    cls = BY_NAME.get(kind)
    if cls is None:
        raise RuntimeError(f"{kind} on a worker: {message}")
    raise cls(message)


@dataclass
class Task:
    graph: Graph
    method: str
    inputs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    worker: int | None = None


class LocalPool:
    """`size` threads, each with its own Engine: the pool interface without Ray."""

    def __init__(self, size: int = 2):
        self.size = size
        self._engines = [Engine() for _ in range(size)]
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gradserve-local-worker")
        self._next = 0
        self._lock = threading.Lock()

    def submit(self, task: Task) -> Future:
        with self._lock:
            k = task.worker if task.worker is not None else self._next % self.size
            self._next += 1

        def run() -> Any:
            return unwrap(run_task(self._engines[k], task.graph, task.method, task.inputs, task.options))

        return self._threads.submit(run)

    def get(self, handles: Sequence[Future], deadline: float | None = None) -> list[Any]:
        out = []
        for h in handles:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                out.append(h.result(timeout=timeout))
            except TimeoutError:
                raise WorkersUnavailable("workers did not answer within the deadline") from None
        return out

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def _worker_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class Worker:
        """A worker slot: caches graphs (and, through its Engine, plans) by hash."""

        def __init__(self, blas_threads: int, kernels: str = "numpy"):
            from threadpoolctl import threadpool_limits

            threadpool_limits(blas_threads)  # this worker's share of the cores: no oversubscription
            self.engine = Engine(kernels=kernels)
            self.graphs: dict[str, Graph] = {}

        def ping(self) -> int:
            return os.getpid()

        def put_graph(self, gid: str, wire: bytes) -> None:
            # the server's own graphs (stages of a partition carry transforms' names)
            self.graphs[gid] = Graph.from_proto(graph_pb2.Graph.FromString(wire), internal_names=True)

        def run(self, gid: str, method: str, options: dict, names: list[str], *values: Any) -> Any:
            graph = self.graphs.get(gid)
            if graph is None:
                return ("error", GraphError.__name__, f"worker has no graph {gid}")
            return run_task(self.engine, graph, method, dict(zip(names, values, strict=True)), options)

    return Worker


class RayPool:
    """Tasks on `size` Ray actors with `cpus` CPUs each. An actor that dies is replaced and its
    task submitted again; workers that do not answer in time raise WorkersUnavailable."""

    def __init__(self, size: int, cpus: float = 1.0, blas_threads: int = 1, start_timeout: float = 60.0,
                 kernels: str = "numpy"):
        import ray

        self._ray = ray
        self._cls = _worker_class().options(num_cpus=cpus)
        self._blas, self._kernels = blas_threads, kernels
        self.size = size
        self._actors = [self._cls.remote(blas_threads, kernels) for _ in range(size)]
        self._loaded: list[set[str]] = [set() for _ in range(size)]
        self._next = 0
        self._lock = threading.Lock()
        self.replaced = 0
        try:
            ray.get([a.ping.remote() for a in self._actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise WorkersUnavailable(f"{size} workers did not start within {start_timeout:.0f} s") from None

    def pids(self) -> list[int]:
        return self._ray.get([a.ping.remote() for a in self._actors], timeout=30)

    def _replace(self, k: int, dead: Any) -> None:
        with self._lock:
            if self._actors[k] is dead:
                log.warning("worker %d died; starting a replacement", k)
                self._actors[k] = self._cls.remote(self._blas, self._kernels)
                self._loaded[k] = set()
                self.replaced += 1

    def _send(self, task: Task, k: int) -> Any:
        actor = self._actors[k]
        gid = task.graph.id
        if gid not in self._loaded[k]:
            actor.put_graph.remote(gid, task.graph.to_proto().SerializeToString())  # ordered before run
            self._loaded[k].add(gid)
        names = list(task.inputs)
        return actor, actor.run.remote(gid, task.method, task.options, names, *(task.inputs[n] for n in names))

    def submit(self, task: Task) -> Any:
        with self._lock:
            k = task.worker if task.worker is not None else self._next % self.size
            self._next += 1
        actor, ref = self._send(task, k)
        return _RayHandle(task, k, actor, ref)

    def get(self, handles: Sequence[Any], deadline: float | None = None) -> list[Any]:
        ray = self._ray
        out = []
        for h in handles:
            while True:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    out.append(unwrap(ray.get(h.ref, timeout=timeout)))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise WorkersUnavailable("workers did not answer within the deadline") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                        ray.exceptions.ActorUnavailableError) as e:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WorkersUnavailable(f"worker {h.worker} died and the deadline passed: {e}") from None
                    self._replace(h.worker, h.actor)
                    h.actor, h.ref = self._send(h.task, h.worker)
        return out

    def shutdown(self) -> None:
        for a in self._actors:
            self._ray.kill(a)


@dataclass
class _RayHandle:
    task: Task
    worker: int
    actor: Any
    ref: Any
