"""Data stays where it is used, on the workers' side: each array goes to the store once per
content version and each worker fetches it once; data-parallel gradients add up on the
workers and graph-parallel values go from worker to worker, so the driver fetches only the
results; the scheduler measures the modes instead of assuming. Byte counts and choices are
deterministic: a LocalPool simulates the store, a fake clock times the calls."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradserve as gs
from gradserve_engine.engine import Engine
from gradserve_engine.errors import WorkersUnavailable
from gradserve_engine.pool import LocalPool, Out, Shipment, Task, immutable, same_bytes
from gradserve_engine.scheduler import DistributedEngine, Policy

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(7)
OUT, IN, FETCH = ("driver_workers", "out"), ("driver_workers", "in"), ("worker_fetch", "in")


def mlp_loss(p, X, y):
    h = gs.tanh(X @ p["w1"] + p["b1"])
    return gs.cross_entropy(h @ p["w2"] + p["b2"], y)


PARAMS = {"w1": rng.standard_normal((6, 64)) * 0.3, "b1": rng.standard_normal(64), "w2": rng.standard_normal((64, 3)),
          "b2": rng.standard_normal(3)}
X, Y = rng.standard_normal((21, 6)), rng.integers(0, 3, 21)
MLP = gs.trace(mlp_loss, PARAMS, X, Y)
WRT = ["p.w1", "p.b1", "p.w2", "p.b2"]
P_BYTES = sum(v.nbytes for v in PARAMS.values())


def inputs(X=X, y=Y, params=PARAMS):
    return {**{f"p.{k}": v for k, v in params.items()}, "X": X, "y": y}


def cids(tag: str) -> dict[str, str]:
    """Content ids as the server's tensor store gives them: one per resident tensor."""
    return {f"p.{k}": f"{k}@{tag}" for k in PARAMS}


def wide(ab):
    return sum(gs.sum(gs.tanh(a @ b)) for a, b in ab)


BRANCHES = [(rng.standard_normal((12, 10)), rng.standard_normal((10, 12))) for _ in range(4)]
WIDE = gs.trace(wide, BRANCHES)
WIDE_INPUTS = {f"ab[{k}][{j}]": m for k, pair in enumerate(BRANCHES) for j, m in enumerate(pair)}


def assert_same(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol)


class Moved:
    """The bytes an engine moved since the last look."""

    def __init__(self, engine: DistributedEngine):
        self.engine, self.seen = engine, dict(engine.bytes_moved)

    def __call__(self) -> dict[tuple[str, str], int]:
        now = dict(self.engine.bytes_moved)
        delta = {k: now[k] - self.seen.get(k, 0) for k in now}
        self.seen = now
        return delta


@pytest.fixture
def local():
    pool = LocalPool(2)
    yield DistributedEngine(Engine(), pool, Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3))
    pool.shutdown()


# ---------------------------------------------------------------- each array once


def test_fan_out_sends_shared_parameters_once(local):
    items = [(inputs(X=X + 0.01 * k), None) for k in range(64)]
    want = [Engine().vjp(MLP, i, WRT) for i, _ in items]
    moved = Moved(local)
    got = local.batch_vjp(MLP, items, WRT, mode="fan_out")
    for (o, g), (wo, wg) in zip(got, want, strict=True):
        assert_same(g, wg)
        assert_same(o, wo)
    d = moved()
    # the parameters and y (the same in every item) once; each item's own X travels with its task
    assert d[OUT] == P_BYTES + Y.nbytes + 64 * X.nbytes
    assert d[FETCH] == 2 * (P_BYTES + Y.nbytes)  # each of the two workers fetched them once
    assert d[IN] == 64 * (P_BYTES + 8)  # gradients and the loss of every item
    # the same bytes in distinct arrays (as a server decodes each item of a request): still once
    copies = [(inputs(X=X + 0.01 * k, y=Y.copy(), params={n: v.copy() for n, v in PARAMS.items()}), None)
              for k in range(64)]
    local.batch_vjp(MLP, copies, WRT, mode="fan_out")
    assert moved()[OUT] == P_BYTES + Y.nbytes + 64 * X.nbytes


def test_content_ids_keep_parameters_on_the_workers_across_calls(local):
    moved = Moved(local)
    items = [(inputs(X=X + k), None) for k in range(8)]
    ids = {**cids(secrets.token_hex(4)), "y": "y@1"}
    local.batch_vjp(MLP, items, WRT, mode="fan_out", content_ids=ids)
    assert moved()[OUT] == P_BYTES + Y.nbytes + 8 * X.nbytes
    got = local.batch_vjp(MLP, items, WRT, mode="fan_out", content_ids=ids)  # resident: nothing moves but X
    d = moved()
    assert d[OUT] == 8 * X.nbytes and d[FETCH] == 0
    assert_same(got[3][1], Engine().vjp(MLP, items[3][0], WRT)[1])
    # without ids, writeable arrays may have changed between calls: sent again (once)
    local.batch_vjp(MLP, items, WRT, mode="fan_out")
    assert moved()[OUT] == P_BYTES + Y.nbytes + 8 * X.nbytes


def test_read_only_arrays_are_reused_by_identity_while_they_live(local):
    frozen = {n: v.copy() for n, v in PARAMS.items()}
    for v in frozen.values():
        v.flags.writeable = False
    items = [(inputs(X=X + k, params=frozen), None) for k in range(4)]
    moved = Moved(local)
    local.batch_vjp(MLP, items, WRT, mode="fan_out")
    assert moved()[OUT] == P_BYTES + Y.nbytes + 4 * X.nbytes
    local.batch_vjp(MLP, items, WRT, mode="fan_out")
    assert moved()[OUT] == Y.nbytes + 4 * X.nbytes  # Y is writeable: it may have changed
    held = len(local.pool.puts)
    del items, frozen, v
    assert len(local.pool.puts) == held - len(PARAMS)  # the references went with the arrays


def test_what_counts_as_unchanging_and_as_the_same():
    a = np.arange(6.0)
    assert not immutable(a)
    a.flags.writeable = False
    assert immutable(a) and immutable(a[1:])
    w = np.arange(6.0)
    view = w[1:]
    view.flags.writeable = False
    assert not immutable(view)  # a read-only view of memory someone may still write
    assert immutable(np.frombuffer(b"\0" * 16))  # over immutable bytes (a decoded request)
    assert not immutable(np.frombuffer(bytearray(16)))
    assert same_bytes(np.array([1.0, np.nan]), np.array([1.0, np.nan]))
    assert not same_bytes(np.array([0.0]), np.array([-0.0]))  # equal, but not the same bits
    assert not same_bytes(np.zeros(2), np.zeros(2, np.float32))
    key, owner = Shipment.key(a, "abc")
    assert key == ("cid", "abc", "<f8", (6,)) and owner is None
    assert Shipment.key(a) == (("id", id(a)), a) and Shipment.key(w) == (None, None)


def test_data_parallel_with_resident_parameters_moves_no_parameter_bytes(local):
    ids = cids(secrets.token_hex(4))
    moved = Moved(local)
    for step in range(3):
        Xs = X + step
        _, want = Engine().vjp(MLP, inputs(X=Xs), WRT)
        _, got = local.vjp(MLP, inputs(X=Xs), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
        assert_same(got, want)
        d = moved()
        assert d[OUT] == (P_BYTES if step == 0 else 0) + X.nbytes + Y.nbytes
        # the parameters, by each worker once; the add task reads both shards' gradients and losses
        assert d[FETCH] == (2 * P_BYTES if step == 0 else 0) + 2 * (P_BYTES + 8)
        assert d[IN] == P_BYTES + 8  # the gradients added up on the workers: one copy comes back, and the loss
    ids["X"], ids["y"] = f"X@{secrets.token_hex(4)}", "y@1"  # a resident data set too: its shards stay
    local.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
    assert moved()[OUT] == X.nbytes + Y.nbytes
    local.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
    assert moved()[OUT] == 0


def test_data_parallel_gradients_of_batched_inputs_come_back_per_shard():
    pool = LocalPool(3)
    engine = DistributedEngine(Engine(), pool)
    try:
        for n in range(1, 4):  # trees of one, two and three shards
            pool.size = n
            want_out, want = Engine().vjp(MLP, inputs(), ["X", "p.w2"])
            out, got = engine.vjp(MLP, inputs(), ["X", "p.w2"], batch_axes={"X": 0, "y": 0}, mode="data_parallel")
            assert_same(got, want)
            assert_same(out, want_out)
    finally:
        pool.shutdown()


def test_graph_parallel_values_stay_on_the_workers(local):
    want_out, want = Engine().vjp(WIDE, WIDE_INPUTS, list(WIDE_INPUTS))
    moved = Moved(local)
    out, got = local.vjp(WIDE, WIDE_INPUTS, list(WIDE_INPUTS), mode="graph_parallel")
    assert_same(got, want)
    assert_same(out, want_out)
    d = moved()
    inputs_bytes = sum(m.nbytes for m in WIDE_INPUTS.values())
    assert d[OUT] == inputs_bytes + 8  # every input once, and the seed
    assert d[IN] == inputs_bytes + 8  # only the gradients and the loss come back
    assert d[FETCH] > 0  # the branch losses went to the join's worker



def chained_failure(pool) -> None:
    """A task that fails, and one that reads its output: the first one's error comes back."""
    bad = pool.submit(Task(MLP, "evaluate", {"X": X}, {}, 0, ("out",)))
    both = pool.submit(Task(None, "add", {"0:out": Out(bad, "out"), "1:out": Out(bad, "out")}, {"names": ["out"]}, 1,
                            ("out",)))
    with pytest.raises(gs.GraphError, match="inputs do not match the graph"):
        pool.fetch([bad, both], [Out(both, "out")])
    good = pool.submit(Task(MLP, "evaluate", inputs(), {}, 0, ("out",)))
    both = pool.submit(Task(None, "add", {"0:out": Out(good, "out"), "1:out": Out(good, "out")}, {"names": ["out"]}, 1,
                            ("out",)))
    [total] = pool.fetch([good, both], [Out(both, "out")])
    assert total == 2 * Engine().evaluate(MLP, inputs())["out"]


def test_a_failed_task_s_error_comes_back_not_its_reader_s(local):
    chained_failure(local.pool)

# ---------------------------------------------------------------- the scheduler measures


class Clock:
    def __init__(self):
        self.t = 0.0
        self.local, self.workers = 5.0, 1.0  # seconds a call takes in process, on the workers

    def __call__(self) -> float:
        return self.t


class TimedEngine(Engine):
    def __init__(self, clock: Clock):
        super().__init__()
        self._clock = clock

    def vjp(self, *args, **kwargs):
        self._clock.t += self._clock.local
        return super().vjp(*args, **kwargs)


class TimedPool(LocalPool):
    def __init__(self, clock: Clock, size: int = 2):
        super().__init__(size)
        self._clock = clock

    def fetch(self, *args, **kwargs):
        self._clock.t += self._clock.workers
        return super().fetch(*args, **kwargs)

    def get(self, *args, **kwargs):
        self._clock.t += self._clock.workers
        return super().get(*args, **kwargs)


def measured(policy: Policy) -> tuple[DistributedEngine, Clock]:
    clock = Clock()
    return DistributedEngine(TimedEngine(clock), TimedPool(clock), policy, clock=clock), clock


# worth trying (two workers beat one core) but not sure to pay (four local cores): in process first
UNSURE = dict(local_cores=4, cluster_cores=2, flops_per_core=1e3, hop_seconds=0.0)


def dp_step(engine: DistributedEngine) -> dict:
    return engine.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0})[1]


def test_first_calls_time_each_mode_in_process_first_and_keep_the_fastest():
    engine, clock = measured(Policy(**UNSURE, samples=2, recheck_calls=6, recheck_seconds=1e9))
    try:
        _, want = Engine().vjp(MLP, inputs(), WRT)
        for _ in range(3):  # one warm-up and two timed calls each
            assert_same(dp_step(engine), want)
        assert engine.modes == {"in_process": 3}
        for _ in range(3):
            assert_same(dp_step(engine), want)
        assert engine.modes == {"in_process": 3, "data_parallel": 3}
        [t] = engine.timings()
        assert t["decided"] and t["chosen"] == "data_parallel" and t["size"] == 21
        assert t["seconds"] == {"in_process": 5.0, "data_parallel": 1.0}
        assert engine.seconds_by_mode["in_process"] == 15.0 and engine.seconds_by_mode["data_parallel"] == 3.0
        assert "chose data_parallel after 6 calls (data_parallel 1e+03 ms, in_process 5e+03 ms)" in engine.schedule_info()
        for _ in range(3):
            dp_step(engine)
        assert engine.modes["data_parallel"] == 6  # kept
        clock.workers = 10.0  # the workers got slow (another job on them)
        for _ in range(3):  # the chosen mode's recent times show it...
            dp_step(engine)
        assert engine.timings()[0]["seconds"]["data_parallel"] == 10.0
        for _ in range(2):  # ...and the re-check (every 6 calls) times in-process again
            dp_step(engine)
        assert engine.modes["in_process"] == 3 + 2
        [t] = engine.timings()
        assert t["chosen"] == "in_process" and t["switches"] == 1
        dp_step(engine)
        assert engine.modes["in_process"] == 6
    finally:
        engine.pool.shutdown()


def test_spreading_must_win_clearly_and_a_re_check_comes_with_time():
    engine, clock = measured(Policy(**UNSURE, samples=1, recheck_calls=10**6, recheck_seconds=100.0))
    clock.workers = 4.8  # faster, but not by the 10% it must win by
    try:
        for _ in range(4):
            dp_step(engine)
        assert engine.timings()[0]["chosen"] == "in_process"
        clock.workers = 1.0
        dp_step(engine)
        assert engine.modes == {"in_process": 3, "data_parallel": 2}
        clock.t += 100.0  # time passes: the other mode is timed again
        dp_step(engine)
        assert engine.modes["data_parallel"] == 3 and engine.timings()[0]["chosen"] == "data_parallel"
    finally:
        engine.pool.shutdown()


def test_when_the_cost_model_is_sure_the_workers_go_first_and_failing_workers_lose():
    engine, clock = measured(Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3, samples=1))
    items = [(inputs(X=X + k), None) for k in range(4)]
    try:
        engine.batch_vjp(MLP, items, WRT)
        assert engine.modes == {"fan_out": 1}  # the cost model's pick first
        clock.workers = 1.0
        broken = engine.pool.get
        engine.pool.get = lambda *a, **k: (_ for _ in ()).throw(WorkersUnavailable("gone"))
        with pytest.raises(WorkersUnavailable):
            engine.batch_vjp(MLP, items, WRT)
        engine.pool.get = broken
        for _ in range(2):
            engine.batch_vjp(MLP, items, WRT)
        [t] = engine.timings()
        assert t["call"] == "batch" and t["size"] == 4 and t["chosen"] == "in_process"
        assert t["seconds"]["fan_out"] == float("inf")
    finally:
        engine.pool.shutdown()


def test_small_work_is_never_timed_and_without_measuring_the_cost_model_decides():
    engine, _ = measured(Policy(local_cores=2, cluster_cores=64))  # real FLOP rates: the MLP is tiny
    try:
        for _ in range(5):
            dp_step(engine)
        assert engine.modes == {"in_process": 5} and engine.timings() == []
    finally:
        engine.pool.shutdown()
    engine, _ = measured(Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3, measure=False))
    try:
        for _ in range(3):
            dp_step(engine)
        assert engine.modes == {"data_parallel": 3} and engine.timings() == []
    finally:
        engine.pool.shutdown()


def test_auto_never_picks_a_mode_that_cannot_answer():
    """A batched graph whose output is per example cannot add up over shards: not a candidate
    (forced, it is refused), and the other modes answer."""
    g = gs.trace(lambda w, X: gs.tanh(X @ w), rng.standard_normal((6, 3)), X)
    engine, _ = measured(Policy(**UNSURE, samples=1))
    feed = {"w": rng.standard_normal((6, 3)), "X": X}
    seed = {"out": np.ones((21, 3))}
    try:
        _, want = Engine().vjp(g, feed, ["w"], seed)
        for _ in range(4):
            assert_same(engine.vjp(g, feed, ["w"], seed, batch_axes={"X": 0})[1], want)
        assert set(engine.modes) == {"in_process"}
        with pytest.raises(gs.GraphError, match="to be a sum or mean"):
            engine.vjp(g, feed, ["w"], seed, batch_axes={"X": 0}, mode="data_parallel")
    finally:
        engine.pool.shutdown()


# ---------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_fan_out_and_data_parallel_move_each_array_once(ray_pool):
    engine = DistributedEngine(Engine(), ray_pool)
    moved = Moved(engine)
    ids = cids(secrets.token_hex(4))
    items = [(inputs(X=X + k), None) for k in range(8)]
    for call in range(2):
        got = engine.batch_vjp(MLP, items, WRT, mode="fan_out", content_ids=ids)
        assert_same(got[5][1], Engine().vjp(MLP, items[5][0], WRT)[1])
        d = moved()
        assert d[OUT] == (P_BYTES if call == 0 else 0) + Y.nbytes + 8 * X.nbytes
        assert d[IN] == 8 * (P_BYTES + 8)
    for k in range(2):
        assert {("cid", ids["p.w1"], "<f8", (6, 64))} <= set(ray_pool.cached(k))
    _, want = Engine().vjp(MLP, inputs(), WRT)
    _, got = engine.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
    assert_same(got, want)
    d = moved()
    assert d[OUT] == X.nbytes + Y.nbytes and d[IN] == P_BYTES + 8  # the workers had the parameters...
    assert d[FETCH] == 2 * (P_BYTES + 8)  # ...and fetched only the shards' gradients and losses, to add them up
    out, got = engine.vjp(WIDE, WIDE_INPUTS, list(WIDE_INPUTS), mode="graph_parallel")
    want_out, want = Engine().vjp(WIDE, WIDE_INPUTS, list(WIDE_INPUTS))
    assert_same(got, want)
    assert_same(out, want_out)
    assert moved()[IN] == sum(m.nbytes for m in WIDE_INPUTS.values()) + 8  # stage values never came to the driver


@pytest.mark.ray
def test_ray_a_failed_task_s_error_comes_back_not_its_reader_s(ray_pool):
    chained_failure(ray_pool)
    assert len(ray_pool.pids()) == 2


@pytest.mark.ray
def test_ray_worker_killed_while_holding_cached_arrays(ray_pool):
    engine = DistributedEngine(Engine(), ray_pool)
    ids = cids(secrets.token_hex(4))
    _, want = Engine().vjp(MLP, inputs(), WRT)
    engine.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
    key = ("cid", ids["p.w1"], "<f8", (6, 64))
    assert all(key in ray_pool.cached(k) for k in range(2))
    moved = Moved(engine)
    assert P_BYTES % (X.nbytes + Y.nbytes) != 0
    for victim in range(2):  # a data-parallel step (tasks that read each other's outputs), then a fan-out
        before = ray_pool.replaced
        os.kill(ray_pool.pids()[victim], signal.SIGKILL)
        if victim == 0:
            _, got = engine.vjp(MLP, inputs(), WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel", content_ids=ids)
            assert_same(got, want)
        else:
            got = engine.batch_vjp(MLP, [(inputs(), None)] * 4, WRT, mode="fan_out", content_ids=ids)
            for _, g in got:
                assert_same(g, want)
        assert ray_pool.replaced == before + 1
        assert key in ray_pool.cached(victim)  # the replacement fetched the parameters from the store...
        d = moved()
        assert d[FETCH] >= P_BYTES
        if victim == 0:  # each run of the step sends its batch (P_BYTES is no multiple of it): no parameters again
            assert d[OUT] > 0 and d[OUT] % (X.nbytes + Y.nbytes) == 0
        else:  # the failed tasks went again with the references they had
            assert d[OUT] == X.nbytes + Y.nbytes

# ---------------------------------------------------------------- the benchmark's network namespace


def test_scaling_bench_can_skip_the_network_namespace():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--no-netns" in out and "GRADSERVE_NO_NETNS" in out
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "bench" / "scaling.py")
    assert spec is not None and spec.loader is not None
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    assert scaling.netns_plan(no_netns=True, env={}, loopback=False) == "run"
    assert scaling.netns_plan(no_netns=False, env={"GRADSERVE_NO_NETNS": "1"}, loopback=False) == "run"
    assert scaling.netns_plan(no_netns=False, env={}, loopback=True) == "run"
    assert scaling.netns_plan(no_netns=False, env={"GRADSERVE_NO_NETNS": "0"}, loopback=False) in ("reexec", "refuse")


class _DataParallel(DistributedEngine):
    """The scheduler with data-parallel chosen for every gradient (what the measurement picks
    where workers win), so that a server test sees what crosses to the workers."""

    def vjp(self, *args, **kwargs):
        kwargs.setdefault("mode", "data_parallel")
        return super().vjp(*args, **kwargs)


def test_the_server_sends_resident_parameters_to_the_workers_once(serve_in_process):
    """Parameters put into the server's tensor store reach the workers by their content id: after
    the first step, a data-parallel gradient moves only the data set driver -> workers."""
    pool = LocalPool(2)
    engine = _DataParallel(Engine(), pool)
    server = serve_in_process(engine=engine)
    try:
        with gs.connect(f"127.0.0.1:{server.port}") as remote:
            refs = remote.put(PARAMS)
            gid = remote.register(MLP)
            moved = Moved(engine)
            for step in range(3):
                Xs = X + step
                res = remote.gradient(gid, {**{f"p.{k}": r for k, r in refs.items()}, "X": Xs, "y": Y}, WRT,
                                      batch_axes={"X": 0, "y": 0})
                assert_same(res.grads, Engine().vjp(MLP, inputs(X=Xs), WRT)[1])
                assert moved()[OUT] == (P_BYTES if step == 0 else 0) + X.nbytes + Y.nbytes
    finally:
        pool.shutdown()
