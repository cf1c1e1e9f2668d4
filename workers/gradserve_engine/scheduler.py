"""The scheduler: per call, run in process or spread the work over a worker pool.

`DistributedEngine` is a Backend like the Engine, so the servicer does not know which ran. For
each gradient call the candidates are
  in-process     always (and the only one for small work: a worker hop costs more than it saves);
  data-parallel  the caller named batch axes: shards run forward+backward on the workers, and
                 their gradients add up there, in a tree of add tasks;
  graph-parallel the joint graph splits into independent, balanced parts; stage values go from
                 worker to worker;
  fan-out        a batch of input sets spread over the workers.
The scheduler measures instead of assuming: for each graph (and batch size) the first calls
time each candidate (`_Trial`: one untimed warm-up, then `Policy.samples` timed calls each,
in-process first), the fastest is kept, and the others are timed again every
`Policy.recheck_calls` calls or `recheck_seconds`. The cost model (`Policy`) is the prior: it
decides which candidates are worth trying at all (a scalar or tiny graph never leaves the
process) and, when it is sure spreading pays, which to try first. The modes chosen are counted
in `modes`, their wall time in `seconds_by_mode`, the measurements are in `timings()`, and the
bytes moved to and from the workers in `bytes_moved`. A mode can be forced for tests and
benchmarks. The pool is an interface (`LocalPool`, `RayPool`), so this is testable without Ray.

Arrays move once (see pool.py): each distinct array of a call is put into the store once, and
across calls once per content version when the caller names it (`content_ids`: input name ->
an id the caller promises names exactly those bytes, such as the server's resident tensors')
or it is a read-only array (`pool.immutable`: reused by identity while it lives).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from gradserve_engine.errors import GraphError, WorkersUnavailable
from gradserve_engine.ir import Graph
from gradserve_engine.names import residual

from . import autodiff
from .backend import Backend
from .cost import graph_flops
from .engine import CacheInfo, Engine, Residuals, check_inputs, check_wrt, differentiated_outputs, seed_feed
from .footprint import graph_bytes, partition_bytes, sharding_bytes
from .partition import Partition, partition
from .passes import optimize
from .pool import Out, Shipment, Task, WorkerLost, byte_counter
from .shard import SUM, Sharding, analyze, shard_graph, shard_sizes, split
from .threads import available_cores

log = logging.getLogger("gradserve.scheduler")
MODES = ("in_process", "data_parallel", "graph_parallel", "fan_out")
T = TypeVar("T")


@dataclass
class Policy:
    """When spreading work may pay, and how the scheduler finds out.

    The cost model: in-process work could use every core of this machine through BLAS
    (`in_process_seconds`), a worker adds the cores it holds, a hop costs `hop_seconds`. It is a
    prior, not a verdict, since in-process work does not scale perfectly over the cores:
    spreading is tried (measured) when, spread over the workers, the work would beat running
    it on a single core (`worth_trying`), and tried first when it beats every local core
    (`pays`). With `measure=False` the cost model decides alone, once per graph."""

    flops_per_core: float = 5e9  # sustained FLOP/s of one core on the kernels
    local_cores: int = field(default_factory=available_cores)
    cluster_cores: float | None = None  # cores the pool's workers hold together (None: pool size)
    hop_seconds: float = 1.3e-3
    min_gain: float = 0.9  # spread only when it takes below this fraction of in-process
    measure: bool = True  # time the candidates and keep the fastest
    samples: int = 2  # timed calls per candidate, after one untimed warm-up call
    recheck_calls: int = 200  # time the other candidates again after this many calls...
    recheck_seconds: float = 300.0  # ...or this many seconds, whichever comes first

    def in_process_seconds(self, flops: float) -> float:
        return flops / (self.flops_per_core * self.local_cores)

    def spread_seconds(self, flops: float, workers: int, cores: float, hops: int = 1) -> float:
        return flops / (self.flops_per_core * max(min(workers, cores), 1e-9)) + hops * self.hop_seconds

    def pays(self, flops: float, workers: int, cores: float, hops: int = 1) -> bool:
        return workers >= 2 and self.spread_seconds(flops, workers, cores, hops) < self.min_gain * self.in_process_seconds(flops)

    def worth_trying(self, flops: float, workers: int, cores: float, hops: int = 1) -> bool:
        """Whether spreading could pay at all: beat one core, hops included."""
        return workers >= 2 and self.spread_seconds(flops, workers, cores, hops) < self.min_gain * flops / self.flops_per_core


class _Trial:
    """The measured candidates of one graph (and batch size). Not thread-safe: the engine locks."""

    def __init__(self, candidates: tuple[str, ...], policy: Policy, now: float):
        self.candidates = candidates
        self.times: dict[str, deque[float]] = {m: deque(maxlen=max(policy.samples, 3)) for m in candidates}
        self.queue: deque[tuple[str, bool]] = deque((m, timed) for m in candidates
                                                    for timed in [False] + [True] * max(policy.samples, 1))
        self.pending = 0  # exploring calls under way
        self.chosen = candidates[0]
        self.decided = False
        self.calls = 0
        self.since = 0  # calls since the last check
        self.checked = now
        self.switches = 0

    def pick(self, policy: Policy, now: float) -> tuple[str, bool, bool]:
        """(mode, timed, exploring) for the next call."""
        if (not self.queue and self.decided and len(self.candidates) > 1
                and (self.since >= policy.recheck_calls or now - self.checked >= policy.recheck_seconds)):
            for m in self.candidates:
                if m != self.chosen:
                    self.times[m].clear()
                    self.queue.extend((m, True) for _ in range(max(policy.samples, 1)))
            self.since, self.checked = 0, now
        if self.queue:
            mode, timed = self.queue.popleft()
            self.pending += 1
            return mode, timed, True
        self.since += 1
        return self.chosen, True, False

    def record(self, mode: str, seconds: float | None, exploring: bool, policy: Policy) -> bool:
        """Note a call's time (None: not timed, or it failed for the caller's reasons); True when
        this decided the mode, or changed it."""
        self.calls += 1
        if seconds is not None and mode in self.times:
            self.times[mode].append(seconds)
        if not exploring:
            return False
        self.pending -= 1
        if self.queue or self.pending > 0:
            return False
        best = self.estimates()
        if not best:
            return False
        fastest = min(best, key=best.__getitem__)
        local = best.get("in_process")
        if local is not None and fastest != "in_process" and not best[fastest] < policy.min_gain * local:
            fastest = "in_process"  # spreading must win clearly: in process holds no workers
        changed = not self.decided or fastest != self.chosen
        self.switches += self.decided and fastest != self.chosen
        self.chosen, self.decided = fastest, True
        return changed

    def estimates(self) -> dict[str, float]:
        """The best recent time of each candidate measured."""
        return {m: min(ts) for m, ts in self.times.items() if ts}


_NO_BYTES: Counter[tuple[str, str]] = byte_counter()  # what an engine without a pool moved: nothing


class DistributedEngine(Backend):
    """A Backend over an in-process Engine and an optional worker pool: gradients may spread
    over the pool; everything else runs on the in-process Engine.

    For the server's metrics and logs: `modes` (calls per mode), `seconds_by_mode` (their wall
    seconds; `on_call(mode, seconds)`, when set, hears each call's), `bytes_moved` (the pool's
    counter: ("driver_workers", "out"|"in") and
    ("worker_fetch", "in")), `timings()` (each graph's measured candidates and choice) and
    `schedule_info()` (the same as text). `clock` times the calls (a fake one in tests)."""

    def __init__(self, engine: Engine | None = None, pool: Any = None, policy: Policy | None = None,
                 task_timeout: float = 600.0, clock: Callable[[], float] = time.perf_counter):
        self.engine = engine or Engine()
        self.kernels = self.engine.kernels
        self.pool = pool
        self.policy = policy or Policy()
        self.task_timeout = task_timeout
        self.clock = clock
        self.modes: Counter[str] = Counter()
        self.seconds_by_mode: dict[str, float] = dict.fromkeys(MODES, 0.0)
        self.on_call: Callable[[str, float], None] | None = None
        self._flops_by_id: dict[str, float] = {}
        self._choices: OrderedDict[tuple, str | _Trial] = OrderedDict()  # a fixed mode, or the candidates measured
        self._lock = threading.Lock()

    # ---- what runs in process only
    def cache_info(self) -> CacheInfo:
        """The in-process Engine's plan cache (each worker has its own)."""
        return self.engine.cache_info()

    def forget(self, graph_id: str) -> int:
        """The Engine's plans of the graph and what this scheduler derived from it (both kept by
        the Engine), and its measurements of it (workers keep their own caches, bounded, until
        they age out)."""
        with self._lock:
            for k in [k for k in self._choices if graph_id in k]:
                del self._choices[k]
            self._flops_by_id.pop(graph_id, None)
        return self.engine.forget(graph_id)

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

    # ---- what the server reads
    @property
    def workers(self) -> int:
        return self.pool.size if self.pool is not None else 0

    @property
    def bytes_moved(self) -> Counter[tuple[str, str]]:
        """Bytes moved between the driver and the workers (the pool's live counter)."""
        return _NO_BYTES if self.pool is None else self.pool.bytes_moved

    def timings(self) -> list[dict[str, Any]]:
        """Per graph (and batch size) whose mode was measured, newest last: the call kind, the
        batch size, the mode chosen, whether the measuring is done, the calls so far, and the
        best recent seconds of each candidate measured."""
        with self._lock:
            return [{"graph": key[0], "call": key[1], "size": key[3], "chosen": t.chosen, "decided": t.decided,
                     "calls": t.calls, "switches": t.switches, "seconds": t.estimates()}
                    for key, t in self._choices.items() if isinstance(t, _Trial)]

    def schedule_info(self) -> str:
        """`timings()` as lines, for logs."""
        lines = []
        for t in self.timings():
            size = f" size {t['size']}" if t["size"] is not None else ""
            measured = ", ".join(f"{m} {s * 1e3:.3g} ms" for m, s in sorted(t["seconds"].items(), key=lambda kv: kv[1]))
            state = "chose" if t["decided"] else "measuring, so far"
            lines.append(f"{t['call']} {t['graph'][:12]}{size}: {state} {t['chosen']} after {t['calls']} calls ({measured})")
        return "\n".join(lines)

    def _cores(self) -> float:
        return self.policy.cluster_cores if self.policy.cluster_cores is not None else float(self.workers)

    def _chose(self, mode: str, graph: Graph, why: str) -> str:
        self.modes[mode] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s for graph %s: %s", mode, graph.id[:12], why)
        return mode

    def _deadline(self) -> float:
        return time.monotonic() + self.task_timeout

    def _flops(self, graph: Graph) -> float:
        """Estimated FLOPs of a gradient of `graph` (about three forward passes), cached by id."""
        flops = self._flops_by_id.get(graph.id)
        if flops is None:
            if len(self._flops_by_id) > 4096:
                self._flops_by_id.clear()
            flops = self._flops_by_id[graph.id] = 3.0 * graph_flops(graph)
        return flops

    # ---- choosing: measured
    def _choice(self, key: tuple, candidates: Callable[[], tuple[tuple[str, ...], bool]]) -> str | _Trial:
        """The fixed mode or the trial for `key`; `candidates()` -> (worker modes worth trying,
        whether the cost model is sure they pay), asked once per key."""
        with self._lock:
            choice = self._choices.get(key)
        if choice is not None:
            return choice
        spread, sure = candidates()
        if not spread:
            choice = "in_process"
        elif not self.policy.measure:
            choice = spread[0] if sure else "in_process"
        else:
            order = (*spread, "in_process") if sure else ("in_process", *spread)
            choice = _Trial(order, self.policy, self.clock())
        with self._lock:
            choice = self._choices.setdefault(key, choice)
            while len(self._choices) > 4096:
                self._choices.popitem(last=False)
        return choice

    def _measured(self, choice: str | _Trial, key: tuple, run: Callable[[str], tuple[str, T]]) -> T:
        """`run(mode)` -> (the mode that ran, result), for the mode `choice` says, timed."""
        if isinstance(choice, str):
            return self._timed(choice, run)[1]
        with self._lock:
            mode, timed, exploring = choice.pick(self.policy, self.clock())
        ran, seconds = mode, None  # a call that fails says nothing about its mode (the caller's mistake, a cancel)...
        try:
            start = self.clock()
            ran, result = run(mode)
            seconds = self.clock() - start
            return result
        except WorkersUnavailable:
            seconds = math.inf  # ...unless the mode's workers failed it: not a mode to keep
            raise
        finally:
            if seconds is not None and math.isfinite(seconds):
                self._ran(ran, seconds)
            with self._lock:
                changed = choice.record(ran, seconds if timed else None, exploring, self.policy)
                chosen, best = choice.chosen, choice.estimates()
            if changed:
                log.info("%s %s%s: %s, measured %s", key[1], key[0][:12], f" size {key[3]}" if key[3] is not None else "",
                         chosen, {m: f"{s * 1e3:.3g} ms" for m, s in best.items()})

    def _timed(self, mode: str, run: Callable[[str], tuple[str, T]]) -> tuple[str, T]:
        start = self.clock()
        ran, result = run(mode)
        self._ran(ran, self.clock() - start)
        return ran, result

    def _ran(self, mode: str, seconds: float) -> None:
        self.seconds_by_mode[mode] += seconds
        if self.on_call is not None:
            self.on_call(mode, seconds)

    def _retrying(self, run: Callable[[float], T]) -> T:
        """`run(deadline)` again while workers die under it (WorkerLost), within the deadline."""
        deadline = self._deadline()
        for attempt in itertools.count():
            try:
                return run(deadline)
            except WorkerLost as e:
                if time.monotonic() >= deadline or attempt >= 2 * max(self.workers, 1):
                    raise WorkersUnavailable(f"workers kept dying during the call: {e}") from None
                log.warning("a worker died during the call (%s); running it again", e)
        raise AssertionError("unreachable")

    # ---- gradients
    def vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], seeds: Mapping[str, Any] | None = None,
            outputs: Sequence[str] | None = None, batch_axes: Mapping[str, int] | None = None, *,
            content_ids: Mapping[str, str] | None = None, residuals: Mapping[int, Any] | None = None,
            mode: str | None = None) -> tuple[dict, dict]:
        """The Engine's vjp, perhaps spread. `content_ids` (input name -> id) names inputs whose
        bytes the caller vouches for by id, so that the workers get them once per id."""
        if residuals is not None:
            return self.engine.vjp(graph, inputs, wrt, seeds, outputs, residuals=residuals)
        if mode is not None and mode not in MODES[:3]:
            raise ValueError(f"unknown mode {mode!r}; one of {list(MODES[:3])}")
        sharding = None
        axes = tuple(sorted(batch_axes.items())) if batch_axes else ()
        if batch_axes:
            # refuses graphs that mix examples
            sharding = self.engine.memo(graph.id, ("shard", axes), lambda: analyze(graph, batch_axes), sharding_bytes)
        ids = content_ids or {}

        def run(m: str) -> tuple[str, tuple[dict, dict]]:
            return self._run_vjp(m, mode is None, graph, sharding, batch_axes, inputs, wrt, seeds, outputs, ids)

        if mode is not None:
            return self._timed(mode, run)[1]
        key = (graph.id, "vjp", axes, sharding.batch if sharding is not None else None)
        choice = self._choice(key, lambda: self._vjp_candidates(graph, sharding, wrt, outputs))
        if choice == "in_process":  # the common small call: no more than this
            start = self.clock()
            self.modes["in_process"] += 1
            result = self.engine.vjp(graph, inputs, wrt, seeds, outputs)
            self._ran("in_process", self.clock() - start)
            return result
        return self._measured(choice, key, run)

    def _vjp_candidates(self, graph: Graph, sharding: Sharding | None, wrt: Sequence[str],
                        outputs: Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
        flops, n, cores = self._flops(graph), self.workers, self._cores()
        if self.pool is None or not self.policy.worth_trying(flops, n, cores):
            log.debug("in process for graph %s: %.3g flops, a worker hop would not pay", graph.id[:12], flops)
            return (), False
        spread = []
        if sharding is not None and self._sums(graph, sharding, outputs) is None:
            spread.append("data_parallel")
        if self._partition(graph, tuple(wrt), outputs) is not None:
            spread.append("graph_parallel")
        return tuple(spread), self.policy.pays(flops, n, cores)

    def _run_vjp(self, mode: str, auto: bool, graph: Graph, sharding: Sharding | None, batch_axes: Mapping[str, int] | None,
                 inputs: Mapping[str, Any], wrt: Sequence[str], seeds: Mapping[str, Any] | None,
                 outputs: Sequence[str] | None, ids: Mapping[str, str]) -> tuple[str, tuple[dict, dict]]:
        if mode == "data_parallel":
            if sharding is None or not batch_axes:
                raise GraphError("data-parallel execution needs batch_axes naming the batched inputs")
            refused = self._sums(graph, sharding, outputs)
            if refused is None or not auto:
                if refused is not None:
                    raise GraphError(refused)
                self._chose("data_parallel", graph, f"{sharding.batch} examples over {self.workers} workers")
                return mode, self._retrying(lambda deadline: self._data_parallel(
                    graph, sharding, batch_axes, inputs, wrt, seeds, outputs, ids, deadline))
        elif mode == "graph_parallel":
            parts = self._partition(graph, tuple(wrt), outputs)
            if parts is not None:
                self._chose("graph_parallel", graph, f"{len(parts.parts)} parts in {parts.stages} stage(s), "
                                                     f"{parts.cut_bytes} bytes across cuts")
                return mode, self._retrying(lambda deadline: self._graph_parallel(
                    graph, parts, inputs, wrt, seeds, outputs, ids, deadline))
        self._chose("in_process", graph, "no independent parts to run apart" if mode == "graph_parallel" else mode)
        return "in_process", self.engine.vjp(graph, inputs, wrt, seeds, outputs)

    @staticmethod
    def _sums(graph: Graph, sharding: Sharding, outputs: Sequence[str] | None) -> str | None:
        """Why data-parallel gradients cannot be added up over shards (None: they can)."""
        out_ids = dict(graph.outputs)
        for o in differentiated_outputs(graph, outputs):
            if sharding.state(out_ids[o]) != SUM:
                return (f"data-parallel gradients need every differentiated output to be a sum or mean over the "
                        f"batch; output {o!r} is not")
        return None

    def _data_parallel(self, graph: Graph, sharding: Sharding, batch_axes: Mapping[str, int], inputs: Mapping[str, Any],
                       wrt: Sequence[str], seeds: Mapping[str, Any] | None, outputs: Sequence[str] | None,
                       ids: Mapping[str, str], deadline: float) -> tuple[dict, dict]:
        """Shards on the workers; what sums over the batch (parameters' gradients, a loss) adds
        up on the workers in a tree, and the driver fetches the root; what is per example
        (gradients of batched inputs, batched outputs) is fetched per shard and joined."""
        outs = list(differentiated_outputs(graph, outputs))
        inputs = check_inputs(graph, inputs)
        sizes = shard_sizes(sharding.batch, self.workers)
        starts = np.cumsum([0, *sizes]).tolist()
        ship = Shipment(self.pool)
        tokens: list[dict[str, int]] = [{} for _ in sizes]
        for name, value in inputs.items():
            key, owner = Shipment.key(value, ids.get(name))
            axis = batch_axes.get(name)
            if axis is None:  # replicated: one put, every shard reads it
                for shard in tokens:
                    shard[name] = ship.add(value, key, owner)
                continue
            axis %= np.ndim(value)
            for k, piece in enumerate(split(value, axis, sizes)):
                pkey = None if not isinstance(key, tuple) else (*key, "shard", axis, starts[k], starts[k + 1])
                tokens[k][name] = ship.add(piece, pkey, owner)
        ship.finish()
        out_ids = dict(graph.outputs)
        state = {**{f"grad:{x}": sharding.state(graph.input(x).id) for x in wrt},
                 **{f"out:{o}": sharding.state(vid) for o, vid in out_ids.items()}}
        returns = tuple(state)
        summed = tuple(n for n in returns if (n.startswith("grad:") and not isinstance(state[n], tuple)) or state[n] == SUM)
        handles, level, where = [], [], []
        for k, (size, shard) in enumerate(zip(sizes, tokens, strict=True)):
            g = self.engine.memo(graph.id, ("shard-graph", sharding, size),
                                 functools.partial(shard_graph, graph, sharding, size), graph_bytes)
            h = self.pool.submit(Task(g, "vjp", {n: ship.ref(t) for n, t in shard.items()},
                                      {"wrt": list(wrt), "seeds": seeds, "outputs": outs}, k, returns))
            handles.append(h)
            level.append({n: Out(h, n) for n in returns})
            where.append(k)
        shards = list(level)
        while len(level) > 1 and summed:  # a reduction tree: each add on the worker that holds its left operand
            nxt, nxt_where = [], []
            for i in range(0, len(level), 2):
                if i + 1 == len(level):
                    nxt.append(level[i])
                    nxt_where.append(where[i])
                    continue
                inputs_ = {**{f"0:{n}": level[i][n] for n in summed}, **{f"1:{n}": level[i + 1][n] for n in summed}}
                h = self.pool.submit(Task(None, "add", inputs_, {"names": list(summed)}, where[i], summed))
                handles.append(h)
                nxt.append({n: Out(h, n) for n in summed})
                nxt_where.append(where[i])
            level, where = nxt, nxt_where
        wanted: list[Out] = []
        plan: dict[str, list[int] | int] = {}
        for n in returns:
            if n in summed:
                plan[n] = len(wanted)
                wanted.append(level[0][n])
            elif isinstance(state[n], tuple):  # per example: every shard's piece
                plan[n] = list(range(len(wanted), len(wanted) + len(shards)))
                wanted.extend(shard[n] for shard in shards)
            else:  # the same in every shard
                plan[n] = len(wanted)
                wanted.append(shards[0][n])
        got = self.pool.fetch(handles, wanted, deadline)
        values, grads = {}, {}
        for n in returns:
            where_ = plan[n]
            v = np.concatenate([got[i] for i in where_], axis=state[n][1]) if isinstance(where_, list) else got[where_]
            if n.startswith("grad:"):
                grads[n[5:]] = v
            else:
                values[n[4:]] = v
        return values, {x: grads[x] for x in wrt}

    def _partition(self, graph: Graph, wrt: tuple[str, ...], outputs: Sequence[str] | None) -> Partition | None:
        outs = tuple(outputs) if outputs is not None else None
        return self.engine.memo(graph.id, ("partition", wrt, outs, self.workers), lambda: partition(
            optimize(autodiff.vjp_graph(graph, check_wrt(graph, wrt), outs)), self.workers),
            lambda p: 0 if p is None else partition_bytes(p))

    def _graph_parallel(self, graph: Graph, p: Partition, inputs: Mapping[str, Any], wrt: Sequence[str],
                        seeds: Mapping[str, Any] | None, outputs: Sequence[str] | None, ids: Mapping[str, str],
                        deadline: float) -> tuple[dict, dict]:
        """Every stage's parts, then its joins, as tasks submitted at once: a task reads the
        values it needs straight from the tasks that made them; the driver fetches the results."""
        outs = list(differentiated_outputs(graph, outputs))
        local: dict[str, Any] = {**check_inputs(graph, inputs), **seed_feed(graph, outs, seeds)}
        steps: list[tuple[Graph, int | None]] = []
        for s in range(p.stages):
            steps.extend((part.graph, part.index) for part in p.parts if part.stage == s)
            driver = p.driver[s]
            if driver is not None:  # the joins run on a worker too: their operands are there
                steps.append((driver, None))
        ship = Shipment(self.pool)
        tokens = [{n: ship.add(local[n], *Shipment.key(local[n], ids.get(n))) for n in g.input_names() if n in local}
                  for g, _ in steps]
        ship.finish()
        made: dict[str, Out] = {}
        maker: dict[str, int] = {}
        handles = []
        for (g, k), mine in zip(steps, tokens, strict=True):
            task_inputs = {n: ship.ref(mine[n]) if n in mine else made[n] for n in g.input_names()}
            if k is None:  # a join: on the worker holding most of its operands' bytes
                held: Counter[int] = Counter()
                for n in g.input_names():
                    if n in maker:
                        i = g.input(n)
                        held[maker[n]] += math.prod(i.shape) * np.dtype(i.dtype).itemsize
                k = held.most_common(1)[0][0] if held else 0
            names = tuple(g.output_names())
            h = self.pool.submit(Task(g, "evaluate", task_inputs, {}, k, names))
            handles.append(h)
            for n in names:
                made[n], maker[n] = Out(h, n), k
        first = p.joint.first_node_id
        named: dict[str, Any] = {}
        wanted: dict[str, Out] = {}
        for name, vid in p.joint.outputs:
            if vid < len(p.joint.inputs):
                named[name] = local[p.joint.inputs[vid].name]
            elif vid < first:
                named[name] = p.joint.constants[vid - len(p.joint.inputs)]
            else:
                wanted[name] = made[residual(vid)]
        got = self.pool.fetch(handles, list(wanted.values()), deadline)
        named.update(zip(wanted, got, strict=True))
        grad_names = autodiff.vjp_names(graph, wrt, graph.output_names() if outputs is None else outputs).grad
        grads = {x: named.pop(grad_names[x]) for x in wrt}
        return named, grads

    # ---- many input sets
    def batch_vjp(self, graph: Graph, items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                  wrt: Sequence[str], outputs: Sequence[str] | None = None, *,
                  content_ids: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None = None,
                  mode: str | None = None) -> list[tuple[dict, dict]]:
        """`vjp` of each input set, perhaps fanned out. `content_ids`: per item (or one mapping
        for every item) input name -> content id, as for `vjp`."""
        ids: list[Mapping[str, str]] = ([content_ids] * len(items) if isinstance(content_ids, Mapping)
                                        else [c or {} for c in content_ids] if content_ids is not None
                                        else [{}] * len(items))

        def run(m: str) -> tuple[str, list[tuple[dict, dict]]]:
            if m != "fan_out" or self.pool is None or not items:
                self._chose("in_process", graph, f"batch of {len(items)}")
                return "in_process", [self.engine.vjp(graph, inputs, wrt, seeds or None, outputs) for inputs, seeds in items]
            self._chose("fan_out", graph, f"{len(items)} input sets over {self.workers} workers")
            return "fan_out", self._retrying(lambda deadline: self._fan_out(graph, items, wrt, outputs, ids, deadline))

        if mode is not None:
            return self._timed(mode, run)[1]
        key = (graph.id, "batch", (), len(items))

        def candidates() -> tuple[tuple[str, ...], bool]:
            flops, n, cores = self._flops(graph) * len(items), self.workers, self._cores()
            if self.pool is None or len(items) < 2 or not self.policy.worth_trying(flops, n, cores):
                return (), False
            return ("fan_out",), self.policy.pays(flops, n, cores)

        return self._measured(self._choice(key, candidates), key, run)

    def _fan_out(self, graph: Graph, items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                 wrt: Sequence[str], outputs: Sequence[str] | None, ids: Sequence[Mapping[str, str]],
                 deadline: float) -> list[tuple[dict, dict]]:
        """One task per input set, item k on worker k mod n; the arrays the items share go once."""
        ship = Shipment(self.pool)
        tokens = []
        for (inputs, _), cids in zip(items, ids, strict=True):
            checked = check_inputs(graph, inputs)
            tokens.append({n: ship.add(v, *Shipment.key(v, cids.get(n))) for n, v in checked.items()})
        ship.finish()
        handles = [self.pool.submit(Task(graph, "vjp", {n: ship.ref(t) for n, t in mine.items()},
                                         {"wrt": list(wrt), "seeds": seeds or None, "outputs": outputs}, k % self.workers))
                   for k, (mine, (_, seeds)) in enumerate(zip(tokens, items, strict=True))]
        return self.pool.get(handles, deadline)
