"""The scheduler: per call, run in process or spread the work over a worker pool.

`DistributedEngine` is a Backend like the Engine, so the servicer does not know which ran. For
each gradient call it estimates the work (FLOPs of the gradient graph) and picks one of
  in-process     small work, or no pool: a worker hop costs more than it saves;
  data-parallel  the caller named batch axes: shards run forward+backward, gradients add up;
  graph-parallel the joint graph splits into independent, balanced parts;
  fan-out        a batch of input sets spread over the workers;
and says which in the log and in `modes` (surfaced as a metric). A mode can be forced for
tests and benchmarks. The pool is an interface (`LocalPool`, `RayPool`), so this is testable
without Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Graph
from gradserve_engine.names import residual

from . import autodiff
from .backend import Backend
from .cost import graph_flops
from .engine import CacheInfo, Engine, Residuals, check_inputs, check_wrt, differentiated_outputs, seed_feed
from .partition import Partition, partition
from .passes import optimize
from .pool import Task
from .shard import SUM, Sharding, analyze, shard_graph, shard_sizes, split

log = logging.getLogger("gradserve.scheduler")
MODES = ("in_process", "data_parallel", "graph_parallel", "fan_out")


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(int(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass
    return cores


@dataclass
class Policy:
    """When spreading work pays. In-process work uses every core of this machine through BLAS,
    so another worker only helps by the cores it adds; a hop costs `hop_seconds`."""

    flops_per_core: float = 5e9  # sustained FLOP/s of one core on the kernels
    local_cores: int = field(default_factory=available_cores)
    cluster_cores: float | None = None  # cores the pool's workers hold together (None: pool size)
    hop_seconds: float = 1.3e-3
    min_gain: float = 0.9  # spread only when the estimate is below this fraction of in-process

    def in_process_seconds(self, flops: float) -> float:
        return flops / (self.flops_per_core * self.local_cores)

    def spread_seconds(self, flops: float, workers: int, cores: float, hops: int = 1) -> float:
        return flops / (self.flops_per_core * max(min(workers, cores), 1e-9)) + hops * self.hop_seconds

    def pays(self, flops: float, workers: int, cores: float, hops: int = 1) -> bool:
        return workers >= 2 and self.spread_seconds(flops, workers, cores, hops) < self.min_gain * self.in_process_seconds(flops)


class DistributedEngine(Backend):
    """A Backend over an in-process Engine and an optional worker pool: gradients may spread
    over the pool; everything else runs on the in-process Engine."""

    def __init__(self, engine: Engine | None = None, pool: Any = None, policy: Policy | None = None,
                 task_timeout: float = 600.0):
        self.engine = engine or Engine()
        self.kernels = self.engine.kernels
        self.pool = pool
        self.policy = policy or Policy()
        self.task_timeout = task_timeout
        self.modes: Counter[str] = Counter()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._flops_by_id: dict[str, float] = {}
        self._decided: dict[tuple[str, bool], str] = {}  # the mode chosen per (graph, sharded)
        self._lock = threading.Lock()

    # ---- what runs in process only
    def cache_info(self) -> CacheInfo:
        """The in-process Engine's plan cache (each worker has its own)."""
        return self.engine.cache_info()

    def evaluate(self, graph: Graph, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        return self.engine.evaluate(graph, inputs, outputs)

    def open_vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> tuple[dict[str, Any], Residuals]:
        return self.engine.open_vjp(graph, inputs, wrt, outputs)

    def call_vjp(self, residuals: Residuals, cotangents: Mapping[str, Any], batched: bool = False) -> dict[str, Any]:
        return self.engine.call_vjp(residuals, cotangents, batched)

    def jvp(self, graph: Graph, inputs: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[dict, dict]:
        return self.engine.jvp(graph, inputs, tangents)

    def jacobian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
        return self.engine.jacobian(graph, inputs, wrt, outputs)

    def hessian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str) -> dict:
        return self.engine.hessian(graph, inputs, wrt, output)

    def hvp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str,
            vectors: Mapping[str, Any]) -> dict[str, Any]:
        return self.engine.hvp(graph, inputs, wrt, output, vectors)

    @property
    def workers(self) -> int:
        return self.pool.size if self.pool is not None else 0

    def _cores(self) -> float:
        return self.policy.cluster_cores if self.policy.cluster_cores is not None else float(self.workers)

    def _memo(self, key: tuple, build: Any) -> Any:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = build()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return value

    def _chose(self, mode: str, graph: Graph, why: str) -> str:
        self.modes[mode] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s for graph %s: %s", mode, graph.id[:12], why)
        return mode

    def _deadline(self) -> float:
        return time.monotonic() + self.task_timeout

    # ---- gradients
    def vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], seeds: Mapping[str, Any] | None = None,
            outputs: Sequence[str] | None = None, batch_axes: Mapping[str, int] | None = None,
            residuals: Mapping[int, Any] | None = None, mode: str | None = None) -> tuple[dict, dict]:
        if residuals is not None:
            return self.engine.vjp(graph, inputs, wrt, seeds, outputs, residuals=residuals)
        if mode is not None and mode not in MODES[:3]:
            raise ValueError(f"unknown mode {mode!r}; one of {list(MODES[:3])}")
        sharding = None
        if batch_axes:
            key = ("shard", graph.id, tuple(sorted(batch_axes.items())))
            sharding = self._memo(key, lambda: analyze(graph, batch_axes))  # refuses graphs that mix examples
        if mode is None:
            decided = (graph.id, sharding is not None)
            mode = self._decided.get(decided)
            if mode is None:
                if len(self._decided) > 4096:
                    self._decided.clear()
                mode = self._decided[decided] = self._choose(graph, self._flops(graph), sharding)
            if mode == "in_process":
                self.modes[mode] += 1
                return self.engine.vjp(graph, inputs, wrt, seeds, outputs)
        chosen = mode
        if chosen == "data_parallel":
            if sharding is None or not batch_axes:
                raise GraphError("data-parallel execution needs batch_axes naming the batched inputs")
            return self._data_parallel(graph, sharding, batch_axes, inputs, wrt, seeds, outputs)
        if chosen == "graph_parallel":
            parts = self._partition(graph, tuple(wrt), outputs)
            if parts is not None:
                return self._graph_parallel(graph, parts, inputs, wrt, seeds, outputs)
            self._chose("in_process", graph, "no independent parts to run apart")
        return self.engine.vjp(graph, inputs, wrt, seeds, outputs)

    def _flops(self, graph: Graph) -> float:
        """Estimated FLOPs of a gradient of `graph` (about three forward passes), cached by id."""
        flops = self._flops_by_id.get(graph.id)
        if flops is None:
            if len(self._flops_by_id) > 4096:
                self._flops_by_id.clear()
            flops = self._flops_by_id[graph.id] = 3.0 * graph_flops(graph)
        return flops

    def _choose(self, graph: Graph, flops: float, sharding: Sharding | None) -> str:
        """The mode for this graph (decided once per graph): counted by the caller."""
        n, cores = self.workers, self._cores()
        if not self.policy.pays(flops, n, cores):
            log.debug("in process for graph %s: %.3g flops, a worker hop would not pay", graph.id[:12], flops)
            return "in_process"
        return "data_parallel" if sharding is not None else "graph_parallel"

    def _data_parallel(self, graph: Graph, sharding: Sharding, batch_axes: Mapping[str, int], inputs: Mapping[str, Any],
                       wrt: Sequence[str], seeds: Mapping[str, Any] | None,
                       outputs: Sequence[str] | None) -> tuple[dict, dict]:
        out_ids = dict(graph.outputs)
        outs = list(differentiated_outputs(graph, outputs))
        for o in outs:
            if sharding.state(out_ids[o]) != SUM:
                raise GraphError(f"data-parallel gradients need every differentiated output to be a sum or mean over the "
                                 f"batch; output {o!r} is not")
        inputs = check_inputs(graph, inputs)
        sizes = shard_sizes(sharding.batch, self.workers)
        self._chose("data_parallel", graph, f"{len(sizes)} shards of {sizes} examples")
        shards: list[dict[str, Any]] = [dict() for _ in sizes]
        for name, value in inputs.items():
            axis = batch_axes.get(name)
            pieces = split(np.asarray(value), axis % np.ndim(value), sizes) if axis is not None else [value] * len(sizes)
            for shard, piece in zip(shards, pieces, strict=True):
                shard[name] = piece
        handles = []
        for k, (size, shard) in enumerate(zip(sizes, shards, strict=True)):
            g = self._memo(("shard-graph", graph.id, sharding, size), lambda size=size: shard_graph(graph, sharding, size))
            handles.append(self.pool.submit(Task(g, "vjp", shard, {"wrt": list(wrt), "seeds": seeds, "outputs": outs}, k)))
        results = self.pool.get(handles, self._deadline())
        grads = {}
        for x in wrt:
            s = sharding.state(graph.input(x).id)
            parts = [r[1][x] for r in results]
            grads[x] = np.concatenate(parts, axis=s[1]) if isinstance(s, tuple) else np.sum(parts, axis=0)
        values = {}
        for o in results[0][0]:
            s = sharding.state(out_ids[o])
            parts = [r[0][o] for r in results]
            values[o] = (np.sum(parts, axis=0) if s == SUM else
                         np.concatenate(parts, axis=s[1]) if isinstance(s, tuple) else parts[0])
        return values, grads

    def _partition(self, graph: Graph, wrt: tuple[str, ...], outputs: Sequence[str] | None) -> Partition | None:
        outs = tuple(outputs) if outputs is not None else None
        key = ("partition", graph.id, wrt, outs, self.workers)
        return self._memo(key, lambda: partition(optimize(autodiff.vjp_graph(graph, check_wrt(graph, wrt), outs)),
                                                 self.workers))

    def _graph_parallel(self, graph: Graph, p: Partition, inputs: Mapping[str, Any], wrt: Sequence[str],
                        seeds: Mapping[str, Any] | None, outputs: Sequence[str] | None) -> tuple[dict, dict]:
        self._chose("graph_parallel", graph, f"{len(p.parts)} parts in {p.stages} stage(s), {p.cut_bytes} bytes across cuts")
        outs = list(differentiated_outputs(graph, outputs))
        values: dict[str, Any] = {**check_inputs(graph, inputs), **seed_feed(graph, outs, seeds)}
        deadline = self._deadline()
        for s in range(p.stages):
            stage = [part for part in p.parts if part.stage == s]
            handles = [self.pool.submit(Task(part.graph, "evaluate", {n: values[n] for n in part.graph.input_names()}, {},
                                             part.index)) for part in stage]
            for result in self.pool.get(handles, deadline):
                values.update(result)
            driver = p.driver[s]
            if driver is not None:
                values.update(self.engine.evaluate(driver, {n: values[n] for n in driver.input_names()}))
        first = p.joint.first_node_id
        named = {}
        for name, vid in p.joint.outputs:
            if vid < len(p.joint.inputs):
                named[name] = values[p.joint.inputs[vid].name]
            elif vid < first:
                named[name] = p.joint.constants[vid - len(p.joint.inputs)]
            else:
                named[name] = values[residual(vid)]
        names = autodiff.vjp_names(graph, wrt, graph.output_names() if outputs is None else outputs).grad
        grads = {x: named.pop(names[x]) for x in wrt}
        return named, grads

    # ---- many input sets
    def batch_vjp(self, graph: Graph, items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                  wrt: Sequence[str], outputs: Sequence[str] | None = None, mode: str | None = None) -> list[tuple[dict, dict]]:
        flops = self._flops(graph) * len(items)
        fan_out = mode == "fan_out" or (mode is None and len(items) >= 2 and self.policy.pays(flops, self.workers, self._cores()))
        if not fan_out or self.pool is None:
            self._chose("in_process", graph, f"batch of {len(items)}")
            return [self.engine.vjp(graph, inputs, wrt, seeds or None, outputs) for inputs, seeds in items]
        self._chose("fan_out", graph, f"{len(items)} input sets over {self.workers} workers")
        handles = [self.pool.submit(Task(graph, "vjp", dict(inputs), {"wrt": list(wrt), "seeds": seeds or None,
                                                                     "outputs": outputs}, k % self.workers))
                   for k, (inputs, seeds) in enumerate(items)]
        return self.pool.get(handles, self._deadline())
