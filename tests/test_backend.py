"""The Backend interface (gradserve_engine.backend): exactly what the servicer, the job manager and
the app call on an engine. Engine and DistributedEngine implement every member themselves, with
the interface's parameters; the server is typed against it and probes for nothing else."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import HOST, channel, fill, metric, parse_metrics, stub

import gradserve as gs
from gradserve_engine.backend import Backend
from gradserve_engine.engine import Engine
from gradserve_engine.ir import tensor_from_proto
from gradserve_engine.pool import LocalPool
from gradserve_engine.scheduler import DistributedEngine, Policy
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server.app import Server
from gradserve_server.jobs import JobManager
from gradserve_server.servicer import Servicer

ROOT = Path(__file__).resolve().parent.parent
METHODS = sorted(name for name, value in vars(Backend).items() if inspect.isfunction(value) and not name.startswith("_"))
IMPLEMENTATIONS = (Engine, DistributedEngine)
rng = np.random.default_rng(3)
X, W = rng.standard_normal(4), rng.standard_normal((3, 4))


def f(x, w):
    return gs.sum(gs.tanh(w @ x) ** 2) + gs.sum(x**3)


G = gs.trace(f, X, W)
INPUTS = {"x": X, "w": W}


def test_the_interface_is_what_the_server_calls():
    assert METHODS == ["batch_vjp", "cache_info", "call_vjp", "evaluate", "forget", "hessian", "hvp", "jacobian", "jvp",
                       "open_vjp", "vjp"]
    assert set(typing.get_type_hints(Backend, include_extras=False, localns=_localns())) == {"kernels"}
    called = set()
    for path in ("servicer.py", "jobs.py", "app.py"):
        tree = ast.parse((ROOT / "server" / "gradserve_server" / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_engine(node.value):
                called.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                assert not (node.args and _is_engine(node.args[0])), f"{path}: a {node.func.id} probe on the engine"
    assert called == set(METHODS) | {"kernels"}  # modes, timings and bytes: the app asks only a DistributedEngine


def _is_engine(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "engine") or (isinstance(node, ast.Attribute) and node.attr == "engine")


def _localns() -> dict:
    from gradserve_engine.engine import CacheInfo, Residuals
    from gradserve_engine.fusion import KernelSet
    from gradserve_engine.ir import Graph

    return {"CacheInfo": CacheInfo, "Residuals": Residuals, "KernelSet": KernelSet, "Graph": Graph}


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_each_implementation_defines_every_member_with_the_interfaces_parameters(cls):
    assert Backend in cls.__mro__  # declared, not only matching
    assert "__getattr__" not in vars(cls)  # no forwarding: what it does not define, it does not have
    for name in METHODS:
        assert name in vars(cls), f"{cls.__name__}.{name} is inherited from the interface's stub"
        want = list(inspect.signature(getattr(Backend, name)).parameters.values())
        have = list(inspect.signature(getattr(cls, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in have[:len(want)]] == [(p.name, p.kind, p.default) for p in want], name
        assert all(p.default is not p.empty for p in have[len(want):]), f"{cls.__name__}.{name} needs more arguments"
    for hinted in (Servicer.__init__, JobManager.__init__):
        assert typing.get_type_hints(hinted)["engine"] is Backend
    assert typing.get_type_hints(Server.__init__)["engine"] == Backend | None


def test_distributed_engine_answers_like_the_engine_and_has_nothing_else():
    engine = Engine()
    pool = LocalPool(2)
    try:
        dist = DistributedEngine(Engine(), pool, Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3))
        with pytest.raises(AttributeError):
            dist.grad_plan  # noqa: B018 (an Engine method outside the interface is not forwarded)
        assert dist.kernels is dist.engine.kernels
        vx, vw = rng.standard_normal(4), rng.standard_normal((3, 4))
        pairs = [
            lambda e: e.evaluate(G, INPUTS),
            lambda e: e.vjp(G, INPUTS, ["x", "w"]),
            lambda e: e.batch_vjp(G, [(INPUTS, None), ({"x": 2 * X, "w": W}, None)], ["x"]),
            lambda e: e.jvp(G, INPUTS, {"x": vx, "w": vw}),
            lambda e: e.jacobian(G, INPUTS, ["x"]),
            lambda e: e.hessian(G, INPUTS, ["x", "w"], "out"),
            lambda e: e.hvp(G, INPUTS, ["x", "w"], "out", {"x": vx, "w": vw}),
            lambda e: e.call_vjp(e.open_vjp(G, INPUTS, ["w"])[1], {"out": np.float64(2.0)}),
        ]
        for call in pairs:
            _assert_same(call(dist), call(engine))
        assert dist.cache_info().misses == dist.engine.cache_info().misses > 0
    finally:
        pool.shutdown()


def _assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_a_server_over_either_backend_reports_its_plan_cache(serve_in_process, cls):
    engine = Engine() if cls is Engine else DistributedEngine(Engine())
    server = serve_in_process(engine)
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=G.to_proto()), timeout=10)
        req = pb.GradientRequest(graph_id=G.id, wrt=["x"])
        fill(req.inputs, INPUTS)
        for _ in range(2):
            resp = st.Gradient(req, timeout=10)
    _, want = Engine().vjp(G, INPUTS, ["x"])
    np.testing.assert_allclose(tensor_from_proto(resp.grads["x"]), want["x"], rtol=1e-12)
    samples = parse_metrics(server.metrics.render()[0].decode())
    info = engine.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert metric(samples, "gradserve_plan_cache_misses_total") == info.misses
    assert metric(samples, "gradserve_plan_cache_hits_total") == info.hits
    modes = metric(samples, "gradserve_calls_by_mode_total", mode="in_process")
    assert modes == (2 if cls is DistributedEngine else 0)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS)
def test_deleting_a_graph_drops_its_plans(cls, serve_in_process):
    """A deleted graph's plans do not stay behind in the engine (they held its constants)."""
    pool = LocalPool(2) if cls is DistributedEngine else None
    engine = DistributedEngine(Engine(), pool) if pool is not None else Engine()
    server = serve_in_process(engine=engine)
    try:
        g = gs.trace(lambda x, w: gs.sum(gs.tanh(w @ x)), X, W)
        with gs.connect(f"127.0.0.1:{server.port}") as remote:
            gid = remote.register(g)
            remote.gradient(gid, {"x": X, "w": W}, wrt=["w"])
            remote.evaluate(gid, {"x": X, "w": W})
            assert engine.cache_info().size == 2
            assert remote.delete(gid)
            assert engine.cache_info().size == 0
    finally:
        if pool is not None:
            pool.shutdown()
