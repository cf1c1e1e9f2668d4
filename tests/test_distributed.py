"""Distributed execution: the sharding proof, the partitioner, the scheduler's modes (over a
thread pool, then Ray actors), worker faults, and a server on a two-node Ray cluster."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import gradserve as gs
from gradserve_engine.engine import Engine
from gradserve_engine.errors import WorkersUnavailable
from gradserve_engine.partition import partition
from gradserve_engine.passes import optimize
from gradserve_engine.pool import LocalPool, Task
from gradserve_engine.scheduler import DistributedEngine, Policy
from gradserve_engine.shard import ShardError, analyze

rng = np.random.default_rng(0)


def mlp_loss(p, X, y):
    h = gs.tanh(X @ p["w1"] + p["b1"])
    return gs.cross_entropy(h @ p["w2"] + p["b2"], y) + 1e-3 * gs.sum(p["w1"] ** 2)


PARAMS = {"w1": rng.standard_normal((6, 8)) * 0.5, "b1": rng.standard_normal(8), "w2": rng.standard_normal((8, 3)),
          "b2": rng.standard_normal(3)}
X, Y = rng.standard_normal((21, 6)), rng.integers(0, 3, 21)
MLP = gs.trace(mlp_loss, PARAMS, X, Y)
MLP_INPUTS = {"p.w1": PARAMS["w1"], "p.b1": PARAMS["b1"], "p.w2": PARAMS["w2"], "p.b2": PARAMS["b2"], "X": X, "y": Y}
MLP_WRT = ["p.w1", "p.b1", "p.w2", "p.b2"]
BRANCHES = [(rng.standard_normal((12, 10)), rng.standard_normal((10, 12))) for _ in range(6)]


def wide(ab):
    return sum(gs.sum(gs.tanh(a @ b)) for a, b in ab)


WIDE = gs.trace(wide, BRANCHES)
WIDE_INPUTS = {f"ab[{k}][{j}]": m for k, pair in enumerate(BRANCHES) for j, m in enumerate(pair)}
WIDE_WRT = list(WIDE_INPUTS)


def assert_same(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol)


# ---------------------------------------------------------------- the sharding proof


def test_sharding_keeps_examples_independent_until_the_sum():
    s = analyze(MLP, {"X": 0, "y": 0})
    assert s.batch == 21 and s.state(dict(MLP.outputs)["out"]) == "sum"
    assert s.state(MLP.input("p.w1").id) is None and s.state(MLP.input("X").id) == ("b", 0)


@pytest.mark.parametrize(("f", "why"), [
    (lambda w, X: gs.sum(gs.softmax(X @ w, axis=0)), "reduce_max over the batch axis mixes examples"),
    (lambda w, X: gs.sum(X[1:] @ w), "slice selects some examples"),
    (lambda w, X: gs.log(gs.sum(X @ w)), "log of a sum over examples is not linear"),
    (lambda w, X: gs.sum(gs.cumsum(X @ w, axis=0)), "cumsum along the batch axis"),
])
def test_data_parallel_refusal_names_the_node(f, why):
    g = gs.trace(f, rng.standard_normal((6, 3)), X)
    with pytest.raises(ShardError, match=why) as e:
        analyze(g, {"X": 0})
    assert "%" in str(e.value) and " = " in str(e.value)  # the printed node


def test_sdk_refuses_batch_axes_that_mix_examples():
    with pytest.raises(ShardError, match="reduce_max over the batch axis"):
        gs.grad(lambda w, X: gs.sum(gs.softmax(X @ w, axis=0)), batch_axes={"X": 0})(np.ones((6, 3)), X)
    g = gs.grad(mlp_loss, batch_axes={"X": 0, "y": 0})(PARAMS, X, Y)
    assert_same(g, gs.grad(mlp_loss)(PARAMS, X, Y))


# ---------------------------------------------------------------- the partitioner


def test_partition_keeps_branches_whole_and_balanced():
    joint = optimize(__import__("gradserve_engine.autodiff", fromlist=["vjp_graph"]).vjp_graph(WIDE, WIDE_WRT))
    p = partition(joint, 3)
    assert p is not None and p.stages == 1 and len(p.parts) == 3
    flops = [part.flops for part in p.parts]
    assert max(flops) / min(flops) < 1.01  # six equal branches, two per part
    for part in p.parts:  # each matmul's backward travels with its forward inputs: no matmul reads another part
        assert sum(n.op == "matmul" for n in part.graph.nodes) == 2 * 3
    grad_bytes = sum(m.nbytes for m in WIDE_INPUTS.values())
    assert p.cut_bytes == grad_bytes + 6 * 8  # only the gradients and the six branch losses leave the parts


def test_partition_of_a_chain_is_none():
    chain = gs.trace(lambda a: gs.sum(gs.tanh(gs.tanh(a @ a) @ a)), rng.standard_normal((8, 8)))
    from gradserve_engine.autodiff import vjp_graph

    assert partition(optimize(vjp_graph(chain, ["a"])), 4) is None


# ---------------------------------------------------------------- the scheduler over a thread pool


@pytest.fixture(scope="module")
def local():
    pool = LocalPool(3)
    yield DistributedEngine(Engine(), pool, Policy(local_cores=1, cluster_cores=3, flops_per_core=1e3))
    pool.shutdown()


def test_every_mode_equals_the_embedded_engine(local):
    engine = Engine()
    want_out, want = engine.vjp(MLP, MLP_INPUTS, MLP_WRT)
    out, got = local.vjp(MLP, MLP_INPUTS, MLP_WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel")
    assert_same(got, want)
    assert_same(out, want_out)
    want_out, want = engine.vjp(WIDE, WIDE_INPUTS, WIDE_WRT)
    out, got = local.vjp(WIDE, WIDE_INPUTS, WIDE_WRT, mode="graph_parallel")
    assert_same(got, want)
    assert_same(out, want_out)
    items = [({**MLP_INPUTS, "X": X * k}, None) for k in range(5)]
    fanned = local.batch_vjp(MLP, items, MLP_WRT, mode="fan_out")
    for (o, g), (inputs, _) in zip(fanned, items, strict=True):
        wo, wg = engine.vjp(MLP, inputs, MLP_WRT)
        assert_same(g, wg)
        assert_same(o, wo)
    assert {"data_parallel", "graph_parallel", "fan_out"} <= set(local.modes)


def test_data_parallel_gradient_wrt_a_batched_input(local):
    _, want = Engine().vjp(MLP, MLP_INPUTS, ["X", "p.w2"])
    _, got = local.vjp(MLP, MLP_INPUTS, ["X", "p.w2"], batch_axes={"X": 0, "y": 0}, mode="data_parallel")
    assert_same(got, want)


def test_scalar_graph_stays_in_process(local):
    engine = DistributedEngine(Engine(), local.pool, Policy(local_cores=2, cluster_cores=64))  # even with a big cluster
    seed = gs.trace(lambda x, y: x * y + gs.sin(x), 2.0, 3.0)
    _, g = engine.vjp(seed, {"x": np.float64(2.0), "y": np.float64(3.0)}, ["x"])
    assert g["x"] == pytest.approx(3 + np.cos(2.0))
    _, g = engine.vjp(MLP, MLP_INPUTS, MLP_WRT, batch_axes={"X": 0, "y": 0})
    assert engine.modes == {"in_process": 2}


def test_policy_spreads_only_what_pays():
    small, big = 1e5, 1e11
    two_cores = Policy(local_cores=2, cluster_cores=2)
    assert not two_cores.pays(big, 2, 2)  # the in-process BLAS already has both cores
    assert not Policy(local_cores=2).pays(small, 8, 16)  # a hop costs more than the work
    assert Policy(local_cores=2).pays(big, 8, 16)  # eight more cores for a big job


def test_unreachable_workers_raise_unavailable_not_hang():
    class Stuck(LocalPool):
        def submit(self, task):
            return self._threads.submit(time.sleep, 5)

    pool = Stuck(1)
    engine = DistributedEngine(Engine(), pool, task_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(WorkersUnavailable):
        engine.batch_vjp(MLP, [(MLP_INPUTS, None)] * 2, MLP_WRT, mode="fan_out")
    assert time.monotonic() - start < 2
    pool.shutdown()


# ---------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_modes_equal_the_embedded_engine(ray_pool):
    engine = DistributedEngine(Engine(), ray_pool, Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3))
    _, want = Engine().vjp(MLP, MLP_INPUTS, MLP_WRT)
    _, got = engine.vjp(MLP, MLP_INPUTS, MLP_WRT, batch_axes={"X": 0, "y": 0}, mode="data_parallel")
    assert_same(got, want)
    _, want = Engine().vjp(WIDE, WIDE_INPUTS, WIDE_WRT)
    _, got = engine.vjp(WIDE, WIDE_INPUTS, WIDE_WRT, mode="graph_parallel")
    assert_same(got, want)
    with pytest.raises(gs.GraphError, match="inputs do not match"):  # failures come back as values
        ray_pool.get([ray_pool.submit(Task(MLP, "vjp", {"X": X}, {"wrt": ["X"]}))])
    assert ray_pool.pids()  # and the worker is still there


@pytest.mark.ray
def test_killed_worker_is_replaced_and_the_batch_still_correct(ray_pool):
    engine = DistributedEngine(Engine(), ray_pool)
    items = [({**MLP_INPUTS, "X": X * (k + 1)}, None) for k in range(8)]
    want = [Engine().vjp(MLP, inputs, MLP_WRT)[1] for inputs, _ in items]
    engine.batch_vjp(MLP, items[:2], MLP_WRT, mode="fan_out")  # warm: graphs loaded on both workers
    victim = ray_pool.pids()[0]
    before = ray_pool.replaced
    handles = [ray_pool.submit(Task(MLP, "vjp", dict(inputs), {"wrt": MLP_WRT}, k % 2)) for k, (inputs, _) in enumerate(items)]
    os.kill(victim, signal.SIGKILL)
    got = ray_pool.get(handles, time.monotonic() + 120)
    for (_, g), w in zip(got, want, strict=True):
        assert_same(g, w)
    assert ray_pool.replaced > before and victim not in ray_pool.pids()


@pytest.mark.ray
def test_a_worker_holds_graphs_up_to_its_budget_and_gets_an_evicted_one_again(ray_pool):
    """Each graph a task needs is sent to its worker once; past `graph_cache_bytes` the worker
    drops its least recently used graph (and the plans of it), and a later task sends it again."""
    from gradserve_engine.footprint import graph_bytes
    from gradserve_engine.pool import RayPool

    graphs = [gs.trace(lambda x, k=k: gs.sum(gs.tanh(x * (k + 1.0))), X) for k in range(3)]
    small = RayPool(1, cpus=0, blas_threads=1, graph_cache_bytes=graph_bytes(graphs[0]) + 1)  # room for one graph
    try:
        for graph in (*graphs, graphs[0]):  # the last one was dropped by the next: sent again
            (got,) = small.get([small.submit(Task(graph, "evaluate", {"x": X}, {}))])
            assert_same(got, Engine().evaluate(graph, {"x": X}))
            assert small.graph_ids(0) == [graph.id]
        wide = RayPool(1, cpus=0, blas_threads=1)  # the default budget holds all of them
        try:
            for graph in (*graphs, graphs[0]):
                wide.get([wide.submit(Task(graph, "evaluate", {"x": X}, {}))])
            assert sorted(wide.graph_ids(0)) == sorted(g.id for g in graphs)
        finally:
            wide.shutdown()
    finally:
        small.shutdown()


def _start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def _ray_node(args: list[str], env: dict, log) -> subprocess.Popen:
    """A Ray node as in deploy/compose.yaml, in the foreground (`--block`) in its own process group."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--disable-usage-stats", *args], env=env, stdout=log, stderr=log, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)
    except ProcessLookupError:
        pass


@pytest.mark.ray
def test_server_joins_a_two_node_cluster_by_address(tmp_path):
    pytest.importorskip("ray")
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    # the cluster authenticates its members with a token (Ray's own default once a token exists)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    with socket.socket() as s:  # a free port: a fixed one collides with another Ray on this machine (its /tmp/ray state)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 (closed at the end)
    procs = [_ray_node(["--head", f"--port={port}", "--include-dashboard=false"], env, log)]
    try:
        time.sleep(3)
        procs.append(_ray_node([f"--address=127.0.0.1:{port}"], env, log))
        procs.append(subprocess.Popen([sys.executable, "-m", "gradserve_server", "--port", "0", "--ray-address",
                                       f"127.0.0.1:{port}", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=log,
                                      text=True, env=env, start_new_session=True))
        line = procs[-1].stdout.readline()
        assert "listening" in line, (line, (tmp_path / "cluster.log").read_text()[-3000:])
        with gs.connect(line.split()[3].rstrip(","), timeout=120) as remote:
            gid = remote.register(MLP)
            res = remote.gradient(gid, MLP_INPUTS, MLP_WRT, batch_axes={"X": 0, "y": 0})
            _, want = Engine().vjp(MLP, MLP_INPUTS, MLP_WRT)
            assert_same(res.grads, want)
            results = remote.batch_gradient(gid, [MLP_INPUTS] * 3, wrt=["p.w2"])
            assert all(np.allclose(r.grads["p.w2"], want["p.w2"], rtol=1e-12) for r in results)
            assert len(results) == 3
    finally:
        for k, proc in reversed(list(enumerate(procs))):
            _stop(proc, signal.SIGTERM if k == 2 else signal.SIGKILL)  # the server drains; the nodes just go
        log.close()
