"""The Engine: evaluate and differentiate graphs with cached plans.

The embedded (local) session and the gRPC servicer both call this object, so the default and
the service run the same code. Plans are compiled once per (graph id, request) — the graph id
fixes the input signature — and kept in an LRU bounded in estimated bytes; `cache_info()` says
why each miss happened and what is kept.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from gradserve_engine.errors import GraphError, ShapeError
from gradserve_engine.ir import Graph, Var, duplicates, type_str

from . import autodiff, threads
from .backend import Backend, CacheInfo, Residuals
from .footprint import graph_bytes, plan_bytes
from .guard import check_derived
from .native import resolve_kernels
from .ops.core import FLOATS, NP_DTYPES
from .passes import optimize
from .plan import PARALLEL_MIN_WORK, Plan
from .shard import analyze

CACHE_BYTES = 1 << 30  # what an Engine keeps between calls, by default
MISSING = object()
T = TypeVar("T")


class Engine(Backend):
    """Runs graphs in process with the numpy kernels; thread-safe. The server's Backend.

    What it keeps between calls — plans, derived graphs (a Hessian's gradient), and what a
    scheduler over it derives (`memo`) — is one LRU bounded by the estimated bytes of all of it
    together (`max_cache_bytes`, see `footprint.py`; the most recently used entry stays even when
    it alone is larger) and by `max_plans` entries of each kind. A plan that records its calls
    (the GPU's CUDA graphs) is charged again once it has, for the device memory its recording
    holds (`cuda_graph_bytes`); a plan dropped from the cache releases it once its last call
    returns."""

    def __init__(self, max_plans: int = 512, max_reasons: int = 100, kernels: str = "numpy",
                 max_cache_bytes: int = CACHE_BYTES):
        self.kernel_mode = kernels
        self.kernels = resolve_kernels(kernels)  # "numpy", "native", "auto" or "gpu"
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self._memos: OrderedDict[tuple, Any] = OrderedDict()
        self._tables: dict[str, OrderedDict[tuple, Any]] = {"plan": self._plans, "graph": self._graphs,
                                                            "memo": self._memos}
        self._held: OrderedDict[tuple[str, tuple], int] = OrderedDict()  # (table, key) -> bytes, least recent first
        self._bytes = 0
        self._seen_graphs: set[str] = set()
        self._sharding_checked: OrderedDict[tuple, None] = OrderedDict()  # (graph id, batch axes) analysed
        self._max_plans = max_plans
        self._max_bytes = max_cache_bytes
        self._max_reasons = max_reasons
        self._lock = threading.Lock()
        self.info = self._fresh_info()

    def _fresh_info(self) -> CacheInfo:
        return CacheInfo(maxsize=self._max_plans, kernels=self.kernels.describe(), max_bytes=self._max_bytes)

    # ---- what is kept between calls (callers hold the lock)
    def _hit(self, table: str, key: tuple) -> Any:
        """The value kept under `key`, now the most recently used, or MISSING."""
        value = self._tables[table].get(key, MISSING)
        if value is not MISSING:
            self._tables[table].move_to_end(key)
            self._held.move_to_end((table, key))
        return value

    def _keep(self, table: str, key: tuple, value: Any, nbytes: int) -> Any:
        """Keep `value` (of `nbytes` estimated bytes), dropping the least recently used past the
        bounds; returns what is kept under `key` (another thread's, when it was first)."""
        kept = self._hit(table, key)
        if kept is not MISSING:
            return kept
        entries = self._tables[table]
        entries[key] = value
        self._held[(table, key)] = nbytes
        self._bytes += nbytes
        while len(entries) > self._max_plans:
            self._drop(table, next(iter(entries)))
        self._evict()
        return value

    def _evict(self) -> None:
        """Drop the least recently used entries while past the byte budget (the last one stays)."""
        while self._bytes > self._max_bytes and len(self._held) > 1:
            self._drop(*next(iter(self._held)))
        self.info.size = len(self._plans)

    def _drop(self, table: str, key: tuple) -> None:
        del self._tables[table][key]
        self._bytes -= self._held.pop((table, key))

    def memo(self, graph_id: str, request: tuple, build: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """What a caller derives from graph `graph_id` for `request` (a scheduler's analyses and
        partitions), built on a miss and kept with the plans: within the same bytes, dropped by
        `forget(graph_id)`. `nbytes(value)` estimates its memory."""
        key = (graph_id, request)
        with self._lock:
            kept = self._hit("memo", key)
            if kept is not MISSING:
                return kept
        value = build()
        size = nbytes(value)
        with self._lock:
            return self._keep("memo", key, value, size)

    # ---- plans
    def plan(self, graph: Graph, request: tuple, build: Callable[[], Graph]) -> Plan:
        """The cached plan for `request` on `graph`, compiling `build()` on a miss."""
        key = (graph.id, request)
        with self._lock:
            plan = self._hit("plan", key)
            if plan is not MISSING:
                self.info.hits += 1
                return plan
            self.info.misses += 1
            why = "new graph" if graph.id not in self._seen_graphs else "new request on a known graph"
            self._seen_graphs.add(graph.id)
            self._note(f"plan miss: {why} {graph.id[:12]} ({request[0]}{_describe(request[1:])})")
        plan = Plan(optimize(build()), kernels=self.kernels)
        plan.cache_key = key
        size = plan_bytes(plan)
        self._watch(key, plan, size)
        with self._lock:
            return self._keep("plan", key, plan, size)

    def _watch(self, key: tuple, plan: Plan, size: int) -> None:
        """Charge the plan kept under `key` for what its recorded calls hold (the GPU's CUDA graphs'
        device memory), each time that changes. Held weakly: a plan dropped from the cache (or
        never kept, another thread's having been first) is charged nothing, and goes once unused."""
        watch = getattr(plan.replays, "watch", None)
        if watch is None:
            return
        engine, kept = weakref.ref(self), weakref.ref(plan)

        def held(nbytes: int) -> None:
            e = engine()
            if e is not None:
                e._recharge(key, kept, size + nbytes)

        watch(held)

    def _recharge(self, key: tuple, plan: weakref.ref[Plan], nbytes: int) -> None:
        with self._lock:
            entry, kept = ("plan", key), plan()
            if kept is None or self._plans.get(key) is not kept:
                return
            self._bytes += nbytes - self._held[entry]
            self._held[entry] = nbytes
            self._evict()

    def _note(self, reason: str) -> None:
        self.info.reasons.append(reason)
        del self.info.reasons[:-self._max_reasons]

    def note_miss(self, reason: str) -> None:
        """Record a miss of a cache in front of the engine (the SDK's trace cache)."""
        with self._lock:
            self.info.misses += 1
            self._note(reason)

    def touch(self, plan: Plan) -> bool:
        """Mark a plan its caller holds and runs without asking `plan()` (the SDK's compiled
        gradients) as used now, so the cache's least recently used is the least recently run;
        False when the cache no longer keeps it (the caller then asks again)."""
        key = plan.cache_key
        if key is None:
            return False
        entry = ("plan", key)
        try:  # the most recent already (a plan called in a loop): no lock
            if self._plans.get(key) is plan and next(reversed(self._held)) == entry:
                return True
        except (RuntimeError, StopIteration):  # changed meanwhile by another thread: see under the lock
            pass
        with self._lock:
            if self._plans.get(key) is not plan:
                return False
            self._plans.move_to_end(key)
            self._held.move_to_end(entry)
            return True

    def note_hit(self) -> None:
        with self._lock:
            self.info.hits += 1

    def cache_info(self) -> CacheInfo:
        with self._lock:
            decided = [plan.slice_decisions() for plan in self._plans.values() if plan.sliceable]
            return CacheInfo(self.info.hits, self.info.misses, len(self._plans), self._max_plans, list(self.info.reasons),
                             self.kernels.describe(), self._bytes, self._max_bytes, threads.available_cores(),
                             PARALLEL_MIN_WORK, sum(d[0] for d in decided), sum(d[1] for d in decided))

    def forget(self, graph_id: str) -> int:
        with self._lock:
            gone = [(table, key) for table, key in self._held if key[0] == graph_id]
            for table, key in gone:
                self._drop(table, key)
            for key in [k for k in self._sharding_checked if k[0] == graph_id]:
                del self._sharding_checked[key]
            self._seen_graphs.discard(graph_id)
            self.info.size = len(self._plans)
        return sum(table == "plan" for table, _ in gone)

    def clear_cache(self) -> None:
        with self._lock:
            for entries in self._tables.values():
                entries.clear()
            self._held.clear()
            self._bytes = 0
            self._seen_graphs.clear()
            self._sharding_checked.clear()
            self.info = self._fresh_info()

    # ---- requests
    def evaluate(self, graph: Graph, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        outs = tuple(graph.output_names() if outputs is None else outputs)
        _check_outputs(graph, outs)
        plan = self.plan(graph, ("evaluate", outs), lambda: _select_outputs(graph, outs))
        return plan.run(check_inputs(graph, inputs))

    def vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
            seeds: Mapping[str, Any] | None = None, outputs: Sequence[str] | None = None,
            batch_axes: Mapping[str, int] | None = None, *, content_ids: Mapping[str, str] | None = None,
            residuals: Mapping[int, Any] | None = None) -> tuple[dict, dict]:
        """Outputs and the gradients of sum(seed * output) w.r.t. `wrt`; scalar outputs seed 1.

        `batch_axes` names inputs batched along an axis, examples independent: checked (a
        ShardError names a node that mixes examples), then the whole batch runs here at once.
        With `residuals` (every forward node's value by id, from a forward pass already run)
        only the backward pass runs, and the outputs dict is empty.
        """
        if batch_axes:
            self._check_sharding(graph, batch_axes)
        outs = differentiated_outputs(graph, outputs)
        wrt = tuple(wrt)
        feed = check_inputs(graph, inputs)
        feed.update(seed_feed(graph, outs, seeds))
        if residuals is not None:
            plan = self._backward_plan(graph, wrt, outs, ())
            wanted = {name for name, _ in plan.inputs}
            for vid, name in autodiff.residual_names(graph).items():
                if name in wanted:
                    feed[name] = residuals[vid]
        else:
            plan = self.plan(graph, ("vjp", wrt, outs), lambda: autodiff.vjp_graph(graph, check_wrt(graph, wrt), outs))
        res = plan.run(_only(plan, feed))
        names = autodiff.vjp_names(graph, wrt, outs, keep_outputs=residuals is None).grad
        grads = {x: res.pop(names[x]) for x in wrt}
        return res, grads

    def _check_sharding(self, graph: Graph, batch_axes: Mapping[str, int]) -> None:
        key = (graph.id, tuple(sorted(batch_axes.items())))
        with self._lock:
            if key in self._sharding_checked:
                return
        analyze(graph, batch_axes)
        with self._lock:
            self._sharding_checked[key] = None
            while len(self._sharding_checked) > self._max_plans:
                self._sharding_checked.popitem(last=False)

    def _backward_plan(self, graph: Graph, wrt: tuple[str, ...], outs: tuple[str, ...], batch: tuple[int, ...]) -> Plan:
        return self.plan(graph, ("backward", wrt, outs, batch), lambda: autodiff.vjp_graph(
            graph, check_wrt(graph, wrt), outs, batch=batch, keep_outputs=False, residuals=True))

    def open_vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> tuple[dict[str, Any], Residuals]:
        """Run the forward pass once; return the outputs and the values the backward pass reads."""
        outs = differentiated_outputs(graph, outputs)
        wrt = tuple(wrt)
        backward = self._backward_plan(graph, wrt, outs, ())
        seeds = set(autodiff.vjp_names(graph, wrt, outs, keep_outputs=False).seed.values())
        needed = {name for name, _ in backward.inputs if name not in seeds}
        kept = {vid: name for vid, name in autodiff.residual_names(graph).items() if name in needed}
        forward = self.plan(graph, ("forward", tuple(kept)), lambda: Graph(
            graph.inputs, graph.constants, graph.nodes, graph.outputs + [(name, vid) for vid, name in kept.items()]))
        feed = check_inputs(graph, inputs)
        res = forward.run(feed)
        from_forward = set(kept.values())
        values = {name: res[name] if name in from_forward else feed[name] for name in needed}
        return {o: res[o] for o in graph.output_names()}, Residuals(graph, wrt, outs, values)

    def call_vjp(self, residuals: Residuals, cotangents: Mapping[str, Any], batched: bool = False) -> dict[str, Any]:
        """The gradients for cotangents of the outputs (each with one extra leading axis when
        `batched`), from kept residuals: the forward pass is not run again."""
        r = residuals
        batch: tuple[int, ...] = ()
        if batched:
            sizes = {np.shape(c)[0] if np.ndim(c) else -1 for c in cotangents.values()}
            if len(sizes) != 1 or -1 in sizes:
                raise ShapeError(f"batched cotangents need one common leading axis, got shapes "
                                 f"{ {k: np.shape(c) for k, c in cotangents.items()} }")
            batch = (sizes.pop(),)
        plan = self._backward_plan(r.graph, r.wrt, r.outputs, batch)
        feed = {**r.values, **seed_feed(r.graph, r.outputs, cotangents, batch, "cotangent")}
        res = plan.run(feed)
        names = autodiff.vjp_names(r.graph, r.wrt, r.outputs, keep_outputs=False).grad
        return {x: res[names[x]] for x in r.wrt}

    def grad_plan(self, graph: Graph, wrt: Sequence[str], output: str) -> Plan:
        """A plan computing every output and `grad:<x>` of scalar `output` (seed 1 built in):
        the SDK's cached fast path for grad/value_and_grad."""
        wrt = tuple(wrt)
        return self.plan(graph, ("grad", wrt, output),
                         lambda: autodiff.grad_only(graph, check_wrt(graph, wrt), output, keep_outputs=True))

    def batch_vjp(self, graph: Graph, items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
                  wrt: Sequence[str], outputs: Sequence[str] | None = None, *,
                  content_ids: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None = None,
                  ) -> list[tuple[dict, dict]]:
        """`vjp` for each (inputs, seeds) of a batch of input sets (`content_ids`: the data is here already)."""
        return [self.vjp(graph, inputs, wrt, seeds or None, outputs) for inputs, seeds in items]

    def jvp(self, graph: Graph, inputs: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[dict, dict]:
        """Outputs and their directional derivatives along `tangents` (forward mode)."""
        wrt = tuple(tangents)
        tan_in, tan_out = autodiff.jvp_names(graph, wrt)
        feed = check_inputs(graph, inputs)
        for x in wrt:
            i = graph.input(x)
            feed[tan_in[x]] = _check_value(tangents[x], i.dtype, i.shape, f"tangent for input {x!r}")
        plan = self.plan(graph, ("jvp", wrt), lambda: autodiff.jvp_graph(graph, check_wrt(graph, wrt)))
        res = plan.run(feed)
        outs = {o: res[o] for o in graph.output_names()}
        return outs, {o: res[tan_out[o]] for o in graph.output_names() if tan_out[o] in res}

    def jacobian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
        """Full Jacobians {(output, input): array of shape out.shape + in.shape}, one batched pass."""
        outs = tuple(outputs) if outputs is not None else tuple(graph.output_names())
        _check_outputs(graph, outs)
        for o in outs:
            if graph.aval(dict(graph.outputs)[o])[0] not in FLOATS:
                raise GraphError(f"output {o!r} is not a float value and has no Jacobian")
        wrt = tuple(wrt)
        plan = self.plan(graph, ("jacobian", wrt, outs),
                         lambda: autodiff.jacobian_graph(graph, check_wrt(graph, wrt), outs)[0])
        feed = check_inputs(graph, inputs)
        seeds_name = autodiff.seeds_name(graph)
        if seeds_name in plan.graph.input_names():
            seeds = plan.graph.input(seeds_name)
            check_derived(seeds.shape, seeds.dtype, f"the Jacobian's seeds (the identity, one row per output element, "
                                                    f"{type_str(seeds.dtype, seeds.shape)})")
            feed[seeds_name] = np.eye(seeds.shape[0], dtype=seeds.dtype)
        res = plan.run(_only(plan, feed))
        names = autodiff.jacobian_outputs(outs, wrt)
        return {(o, x): res[names[(o, x)]] for o in outs for x in wrt}

    def hessian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str) -> dict:
        """Second derivatives of a scalar output: {(xi, xj): array of shape xi.shape + xj.shape}."""
        wrt = tuple(wrt)
        grad = self._grad_graph(graph, wrt, output)
        jac = self.jacobian(grad, inputs, wrt)
        names = autodiff.vjp_names(graph, wrt, [output], keep_outputs=False).grad
        return {(xi, xj): jac[(names[xi], xj)] for xi in wrt for xj in wrt}

    def hvp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str,
            vectors: Mapping[str, Any]) -> dict[str, Any]:
        """Hessian-vector products (forward over reverse): {x: sum_j H[x, j] v_j}."""
        wrt = tuple(wrt)
        grad = self._grad_graph(graph, wrt, output)
        missing = [x for x in wrt if x not in vectors]
        if missing:
            raise GraphError(f"hvp needs a vector for each of wrt; none given for {missing}")
        _, tangents = self.jvp(grad, inputs, {x: vectors[x] for x in wrt})
        names = autodiff.vjp_names(graph, wrt, [output], keep_outputs=False).grad
        return {x: tangents[names[x]] for x in wrt}

    def _grad_graph(self, graph: Graph, wrt: tuple[str, ...], output: str) -> Graph:
        """The gradient of scalar `output` w.r.t. `wrt` as a graph, to differentiate again."""
        _check_outputs(graph, [output])
        if not wrt:
            raise GraphError("second derivatives need at least one input in wrt")
        return self._derived(graph, ("grad", wrt, output), lambda: autodiff.grad_only(graph, check_wrt(graph, wrt), output))

    def _derived(self, graph: Graph, request: tuple, build: Callable[[], Graph]) -> Graph:
        """A transformed graph (not a plan), cached like plans: e.g. the gradient to differentiate again."""
        key = (graph.id, request)
        with self._lock:
            kept = self._hit("graph", key)
            if kept is not MISSING:
                return kept
        derived = optimize(build())
        size = graph_bytes(derived)
        with self._lock:
            return self._keep("graph", key, derived, size)


def _describe(parts: tuple) -> str:
    return "".join(f" {p if not isinstance(p, tuple) else list(p)}" for p in parts)


def differentiated_outputs(graph: Graph, outputs: Sequence[str] | None) -> tuple[str, ...]:
    """The outputs a VJP takes seeds for: those named (checked to exist), else every float output."""
    if outputs is None:
        return tuple(o for o, vid in graph.outputs if graph.aval(vid)[0] in FLOATS)
    _check_outputs(graph, outputs)
    return tuple(outputs)


def check_wrt(graph: Graph, wrt: Sequence[str]) -> tuple[str, ...]:
    """`wrt` as a tuple, each a float input of `graph` named once, or a GraphError naming the one
    that is not."""
    _no_duplicates(wrt, "wrt")
    for x in wrt:
        dtype = graph.input(x).dtype
        if dtype not in FLOATS:
            raise GraphError(f"cannot differentiate with respect to input {x!r} of dtype {dtype}; "
                             "only float32/float64 inputs have gradients")
    return tuple(wrt)


def seed_feed(graph: Graph, outs: Sequence[str], seeds: Mapping[str, Any] | None, batch: tuple[int, ...] = (),
              what: str = "seed") -> dict[str, Any]:
    """The `ct:<o>` inputs of a VJP graph: each given seed checked against batch + the output's
    type; a scalar output without one takes 1 (not with stacked seeds)."""
    feed = {}
    ids = dict(graph.outputs)
    names = autodiff.vjp_names(graph, (), outs).seed
    for o in outs:
        dtype, shape = graph.aval(ids[o])
        seed = None if seeds is None else seeds.get(o)
        if seed is None:
            if shape != () or batch:
                raise ShapeError(f"output {o!r} has shape {shape}: pass a {what} (cotangent) for it")
            seed = np.ones((), dtype)
        feed[names[o]] = _check_value(seed, dtype, batch + shape, f"{what} for output {o!r}")
    extra = sorted(set(seeds or ()) - set(outs))
    if extra:
        raise GraphError(f"{what}s given for {extra}, which are not differentiated outputs {list(outs)}")
    return feed


def _no_duplicates(names: Sequence[str], what: str) -> None:
    dup = duplicates(names)
    if dup:
        raise GraphError(f"{what} names {_few(dup)} more than once")


def _few(names: Sequence[str], limit: int = 20) -> str:
    """A list of names for a message, cut after `limit`."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _check_outputs(graph: Graph, outs: Sequence[str]) -> None:
    _no_duplicates(outs, "outputs")
    names = graph.output_names()
    known = set(names)
    for o in outs:
        if o not in known:
            raise GraphError(f"graph has no output named {o!r}; outputs are {_few(names)}")


def _select_outputs(graph: Graph, outs: tuple[str, ...]) -> Graph:
    ids = dict(graph.outputs)
    return Graph(graph.inputs, graph.constants, graph.nodes, [(o, ids[o]) for o in outs])


def _only(plan: Plan, feed: dict[str, Any]) -> dict[str, Any]:
    return {name: feed[name] for name, _ in plan.inputs}


def conform(value: Any, dtype: str, what: str) -> np.ndarray:
    """`value` as an array of `dtype`, by the one rule for values given for a typed slot (an
    input, seed, tangent or cotangent), here and in the SDK before it sends them:
      - booleans and numbers never convert into each other;
      - an array (or numpy scalar) of another numeric dtype converts only when the cast is
        exact: every value comes back the same when cast back (NaN stays NaN), integers stay in
        range; otherwise a ShapeError names `what` and both dtypes (float64 3e300 is not float32
        -inf, int64 2**40 is not int32 0; int64 4 for a float64 input is 4.0);
      - a Python int or float (weakly typed) takes `dtype` unless its value does not fit: a
        float that overflows to inf, an integer out of range, a fraction for an integer dtype.
        A float may round (0.1 as float32).
    """
    want = NP_DTYPES[dtype]
    t = type(value)
    if t is float or t is int or t is bool:
        if (t is bool) != (want.kind == "b"):
            raise ShapeError(f"{what} is {value!r}, expected a value of dtype {dtype}")
        return _python_scalar(value, want, what)
    a = np.asarray(value)
    if a.dtype == want:
        return a
    if a.dtype.kind not in "iuf" or want.kind == "b":
        raise ShapeError(f"{what} has dtype {a.dtype}, expected {dtype}")
    with np.errstate(all="ignore"):
        b = a.astype(want)
    if not _exact(a, b):
        raise ShapeError(f"{what} has dtype {a.dtype}, expected {dtype}: casting changes its values (e.g. "
                         f"{_first_change(a, b)}); cast it yourself if that is what you want")
    return b


def _python_scalar(value: bool | int | float, want: np.dtype, what: str) -> np.ndarray:
    kind = want.kind
    fits = True
    if kind in "iu":
        if isinstance(value, float):
            fits = value.is_integer()
        if fits:
            info = np.iinfo(want)
            fits = info.min <= value <= info.max
    elif kind == "f":
        try:
            with np.errstate(all="ignore"):
                fits = bool(np.isfinite(np.asarray(value, want))) or not math.isfinite(value)
        except OverflowError:  # an int beyond float64
            fits = False
    if not fits:
        text = repr(value)
        raise ShapeError(f"{what} is {text if len(text) <= 40 else text[:20] + '...'}, which does not fit in {want.name}")
    with np.errstate(all="ignore"):
        return np.asarray(value, want)


def _exact(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `b` (a cast of `a`) holds the same values as `a`."""
    src, dst = a.dtype, b.dtype
    if a.size == 0 or _always_exact(src, dst):
        return True
    if src.kind in "iu" and dst.kind in "iu":  # integers: in range (a round trip would hide a wrap)
        info = np.iinfo(dst)
        return bool(info.min <= a.min() and a.max() <= info.max)
    if src.kind == "f" and dst.kind in "iu":  # floats to integers: the cast is defined only in range
        info = np.iinfo(dst)
        if not (np.isfinite(a).all() and info.min <= a.min() and a.max() <= info.max):
            return False
    if src.kind in "iu" and dst.kind == "f" and not (np.abs(b) < 2.0 ** 63).all():  # back to int64 is defined
        return False
    with np.errstate(all="ignore"):
        back = b.astype(src)
    same = back == a
    if src.kind == "f":
        same |= np.isnan(a) & np.isnan(back)
    return bool(same.all())


def _always_exact(src: np.dtype, dst: np.dtype) -> bool:
    """Whether every value of `src` is one of `dst` (numpy calls int64 -> float64 safe; it is not exact)."""
    if src.kind == dst.kind and np.can_cast(src, dst, "safe"):
        return True
    if src.kind in "iu" and dst.kind in "iu":
        return np.can_cast(src, dst, "safe")
    if src.kind in "iu" and dst.kind == "f":
        return np.iinfo(src).bits - (src.kind == "i") <= np.finfo(dst).nmant + 1
    return False


def _first_change(a: np.ndarray, b: np.ndarray) -> str:
    """`x becomes y` for the first value of `a` that its cast `b` does not hold."""
    flat_a, flat_b = a.ravel(), b.ravel()
    with np.errstate(all="ignore"):
        back = flat_b.astype(a.dtype)
        differs = ~((back == flat_a) | ((flat_a != flat_a) & (back != back)))
        if b.dtype.kind in "iu":  # out of range (a wrap may come back the same)
            info = np.iinfo(b.dtype)
            differs |= ~((flat_a >= info.min) & (flat_a <= info.max))
    k = int(np.argmax(differs))
    return f"{flat_a[k].item()!r} becomes {flat_b[k].item()!r}"


def _check_value(value: Any, dtype: str, shape: tuple[int, ...], what: str) -> Any:
    if isinstance(value, Var):  # a traced value: the plan is inlined into its trace
        if value.shape != shape or value.ir_dtype != dtype:
            raise ShapeError(f"{what} is {value!r}, expected {type_str(dtype, shape)}")
        return value
    a = np.asarray(value)
    if a.dtype != NP_DTYPES[dtype]:
        a = conform(value, dtype, what)
    if a.shape != shape:
        raise ShapeError(f"{what} has shape {a.shape}, expected {type_str(dtype, shape)}")
    return a


def check_inputs(graph: Graph, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs as arrays of the graph's declared types, or an error naming the input."""
    names = graph.input_names()
    missing = [n for n in names if n not in inputs]
    extra = sorted(set(inputs) - set(names))
    if missing or extra:
        raise GraphError(f"inputs do not match the graph: missing {missing}, unexpected {extra}")
    return {i.name: _check_value(inputs[i.name], i.dtype, i.shape, f"input {i.name!r}") for i in graph.inputs}
